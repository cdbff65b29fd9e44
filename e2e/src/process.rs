//! Feeding a chat's log to a device: [`Device::process`].

use openmls::prelude::*;

use crate::device::{identity, identity_string, join_config, sha256};
use crate::error::mls;
use crate::{Device, E2eError, Event, Kind, Stored};

/// Decodes one whole MLS message. Not openmls's `tls_deserialize_exact_bytes`: openmls 0.8.3
/// finds the remainder there by re-serializing the message, and a non-canonical encoding
/// whose re-serialization is longer than the input panics (slice out of range; found by
/// the `e2e_entry` fuzz target, inputs in `tests/fuzz_regressions/`). This reads from
/// the bytes and checks that nothing is left.
pub(crate) fn parse_mls_message(data: &[u8]) -> Result<MlsMessageIn, tls_codec::Error> {
    let mut rest = data;
    let msg = <MlsMessageIn as tls_codec::Deserialize>::tls_deserialize(&mut rest)?;
    if !rest.is_empty() {
        return Err(tls_codec::Error::TrailingData);
    }
    Ok(msg)
}

fn ignored(seq: u64, reason: impl Into<String>) -> Event {
    Event::Ignored {
        seq,
        reason: reason.into(),
    }
}

fn undecryptable(seq: u64, reason: impl Into<String>) -> Event {
    Event::Undecryptable {
        seq,
        reason: reason.into(),
    }
}

/// The "user/device" strings a commit adds and removes, read before it is merged.
fn describe(group: &MlsGroup, commit: &StagedCommit) -> (Vec<String>, Vec<String>) {
    let added = commit
        .add_proposals()
        .map(|p| identity_string(p.add_proposal().key_package().leaf_node().credential()))
        .collect();
    let removed = commit
        .remove_proposals()
        .map(|p| {
            let index = p.remove_proposal().removed();
            group
                .member(index)
                .map_or_else(|| format!("<leaf {}>", index.u32()), identity_string)
        })
        .collect();
    (added, removed)
}

impl Device {
    /// Processes entry `seq` of `chat`'s log. Entries must come in increasing seq order; an
    /// entry at or below [`Device::processed_seq`] is [`Event::Ignored`], so feeding one
    /// twice is harmless. Every entry above the cursor moves it, whatever the event.
    ///
    /// * **Welcome**: joins the group when this device is not an active member and the
    ///   welcome holds a secret for one of its KeyPackages ([`Event::Joined`]); otherwise
    ///   ignored. A last-resort KeyPackage stays usable; others are used up.
    /// * **Commit**: our pending commit (byte-identical) is merged; another commit on the
    ///   group's epoch is verified and merged, and our own pending commit, if any, lost the
    ///   epoch and is dropped (make it again on the new epoch). Both give [`Event::Epoch`];
    ///   `removed_self` when it removed this device, after which the group is inactive. A
    ///   commit on another epoch is ignored ("stale commit").
    /// * **Application**: decrypted ([`Event::Message`]) and kept in the history; our own
    ///   messages are recognized by their bytes. A message whose MLS sender is not of
    ///   `sender_user` (the server's word) is refused as undecryptable.
    /// * **Proposal**: not used by chatd's clients; ignored and not stored.
    ///
    /// Before the device has a group, everything but a welcome is ignored. Malformed bytes,
    /// an entry whose MLS content does not match `kind`, or one that fails to decrypt or
    /// verify is [`Event::Undecryptable`] and changes nothing but the cursor. An `Err` means
    /// openmls failed while changing the state (the cursor then stays; do not save).
    ///
    /// Does not save the state: call [`Device::save`] after a batch.
    pub fn process(
        &mut self,
        chat: &str,
        seq: u64,
        sender_user: &str,
        kind: Kind,
        data: &[u8],
        ts_ms: u64,
    ) -> Result<Event, E2eError> {
        let cursor = self.processed_seq(chat);
        if seq <= cursor {
            return Ok(ignored(
                seq,
                format!("already processed (cursor at seq {cursor})"),
            ));
        }
        let event = self.process_entry(chat, seq, sender_user, kind, data, ts_ms)?;
        self.chats
            .entry(chat.to_string())
            .or_default()
            .processed_seq = seq;
        Ok(event)
    }

    fn process_entry(
        &mut self,
        chat: &str,
        seq: u64,
        sender_user: &str,
        kind: Kind,
        data: &[u8],
        ts_ms: u64,
    ) -> Result<Event, E2eError> {
        let msg = match parse_mls_message(data) {
            Ok(msg) => msg,
            Err(e) => return Ok(undecryptable(seq, format!("malformed MLS message: {e}"))),
        };
        let wire = msg.wire_format();
        if wire == WireFormat::Welcome {
            if kind != Kind::Welcome {
                return Ok(undecryptable(seq, format!("a welcome in a {kind} entry")));
            }
            let MlsMessageBodyIn::Welcome(welcome) = msg.extract() else {
                return Ok(undecryptable(seq, "welcome without a welcome body"));
            };
            return self.process_welcome(chat, seq, welcome);
        }
        let message = match msg.try_into_protocol_message() {
            Ok(m) => m,
            Err(_) => {
                return Ok(undecryptable(
                    seq,
                    format!("not a group message (wire format {wire:?})"),
                ))
            }
        };
        let content = match message.content_type() {
            ContentType::Application => Kind::Application,
            ContentType::Commit => Kind::Commit,
            ContentType::Proposal => Kind::Proposal,
        };
        if content != kind {
            return Ok(undecryptable(seq, format!("a {content} in a {kind} entry")));
        }
        if message.group_id().as_slice() != chat.as_bytes() {
            return Ok(undecryptable(seq, "a message of another group"));
        }
        let Some(group) = self.groups.get(chat) else {
            return Ok(ignored(seq, "not a member yet (no group on this device)"));
        };
        if !group.is_active() {
            return Ok(match kind {
                Kind::Application => undecryptable(seq, "this device was removed from the group"),
                _ => ignored(seq, "this device was removed from the group"),
            });
        }
        match kind {
            Kind::Commit => self.process_commit(chat, seq, message, data),
            Kind::Application => {
                self.process_application(chat, seq, sender_user, message, data, ts_ms)
            }
            Kind::Proposal | Kind::Welcome => Ok(ignored(seq, "standalone proposals are not used")),
        }
    }

    fn process_welcome(
        &mut self,
        chat: &str,
        seq: u64,
        welcome: Welcome,
    ) -> Result<Event, E2eError> {
        let replace = match self.groups.get(chat) {
            Some(group) if group.is_active() => return Ok(ignored(seq, "already a member")),
            Some(_) => true,
            None => false,
        };
        let config = join_config();
        let builder = match StagedWelcome::build_from_welcome(&self.provider, &config, welcome) {
            Ok(b) => b,
            Err(WelcomeError::NoMatchingKeyPackage) => {
                return Ok(ignored(seq, "a welcome for other devices"));
            }
            Err(e) => return Ok(undecryptable(seq, format!("welcome does not open: {e}"))),
        };
        let group_id = builder
            .processed_welcome()
            .unverified_group_info()
            .group_id();
        if group_id.as_slice() != chat.as_bytes() {
            return Ok(undecryptable(seq, "a welcome to another group"));
        }
        // Leaves that never committed keep their KeyPackage's lifetime; an old one must not
        // keep new members out. KeyPackages are checked when they are added.
        let mut builder = builder.skip_lifetime_validation();
        if replace {
            builder = builder.replace_old_group();
        }
        let staged = match builder.build() {
            Ok(s) => s,
            Err(e) => return Ok(undecryptable(seq, format!("welcome does not verify: {e}"))),
        };
        let group = match staged.into_group(&self.provider) {
            Ok(g) => g,
            Err(e) => return Ok(undecryptable(seq, format!("welcome does not join: {e}"))),
        };
        let epoch = group.epoch().as_u64();
        self.groups.insert(chat.to_string(), group);
        let state = self.chats.entry(chat.to_string()).or_default();
        state.pending = None;
        state.sent.clear();
        state.joined_epoch = epoch;
        Ok(Event::Joined { seq, epoch })
    }

    fn process_commit(
        &mut self,
        chat: &str,
        seq: u64,
        message: ProtocolMessage,
        data: &[u8],
    ) -> Result<Event, E2eError> {
        let Some(group) = self.groups.get_mut(chat) else {
            return Ok(ignored(seq, "not a member yet (no group on this device)"));
        };
        let state = self.chats.entry(chat.to_string()).or_default();
        let group_epoch = group.epoch().as_u64();
        let ours = state.pending.as_ref().is_some_and(|p| p.data == data);
        if ours {
            let Some(staged) = group.pending_commit() else {
                // Our bytes, but openmls holds no pending commit: it cannot be followed.
                state.pending = None;
                return Ok(undecryptable(
                    seq,
                    "our commit, but its pending state is gone",
                ));
            };
            let (added, removed) = describe(group, staged);
            group.merge_pending_commit(&self.provider).map_err(mls)?;
            state.pending = None;
            return Ok(Event::Epoch {
                seq,
                epoch: group.epoch().as_u64(),
                added,
                removed,
                removed_self: false,
            });
        }
        let message_epoch = message.epoch().as_u64();
        if message_epoch != group_epoch {
            return Ok(ignored(
                seq,
                format!(
                    "stale commit: made on epoch {message_epoch}, the group is at {group_epoch}"
                ),
            ));
        }
        let processed = match group.process_message(&self.provider, message) {
            Ok(p) => p,
            Err(e) => return Ok(undecryptable(seq, format!("commit does not process: {e}"))),
        };
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            return Ok(undecryptable(seq, "a commit entry that is not a commit"));
        };
        let (added, removed) = describe(group, &staged);
        let removed_self = staged.self_removed();
        // Merging clears our own pending commit of this epoch, if any: it lost.
        group
            .merge_staged_commit(&self.provider, *staged)
            .map_err(mls)?;
        state.pending = None;
        Ok(Event::Epoch {
            seq,
            epoch: group.epoch().as_u64(),
            added,
            removed,
            removed_self,
        })
    }

    fn process_application(
        &mut self,
        chat: &str,
        seq: u64,
        sender_user: &str,
        message: ProtocolMessage,
        data: &[u8],
        ts_ms: u64,
    ) -> Result<Event, E2eError> {
        let hash = sha256(data);
        let state = self.chats.entry(chat.to_string()).or_default();
        let own = sender_user == self.user;
        if let Some(pos) = state.sent.iter().position(|s| own && s.hash == hash) {
            let plaintext = state
                .sent
                .remove(pos)
                .map(|s| s.plaintext)
                .unwrap_or_default();
            let (user, device) = (self.user.clone(), self.device.clone());
            return Ok(self.deliver(chat, seq, user, device, plaintext, ts_ms));
        }
        if message.epoch().as_u64() < state.joined_epoch {
            return Ok(ignored(seq, "sent before this device joined"));
        }
        let Some(group) = self.groups.get_mut(chat) else {
            return Ok(ignored(seq, "not a member yet (no group on this device)"));
        };
        let processed = match group.process_message(&self.provider, message) {
            Ok(p) => p,
            Err(e) => return Ok(undecryptable(seq, format!("cannot decrypt: {e}"))),
        };
        let Some((user, device)) = identity(processed.credential()) else {
            return Ok(undecryptable(
                seq,
                format!(
                    "sender credential {:?} is not \"user/device\"",
                    identity_string(processed.credential())
                ),
            ));
        };
        let ProcessedMessageContent::ApplicationMessage(app) = processed.into_content() else {
            return Ok(undecryptable(
                seq,
                "an application entry that is not an application message",
            ));
        };
        if user != sender_user {
            return Ok(undecryptable(
                seq,
                format!(
                    "sender mismatch: the server says {sender_user:?}, the MLS credential {user:?}"
                ),
            ));
        }
        Ok(self.deliver(chat, seq, user, device, app.into_bytes(), ts_ms))
    }

    fn deliver(
        &mut self,
        chat: &str,
        seq: u64,
        user: String,
        device: String,
        text: Vec<u8>,
        ts_ms: u64,
    ) -> Event {
        self.remember(
            chat,
            Stored {
                seq,
                sender_user: user.clone(),
                sender_device: device.clone(),
                text: text.clone(),
                ts_ms,
            },
        );
        Event::Message {
            seq,
            sender_user: user,
            sender_device: device,
            plaintext: text,
        }
    }
}
