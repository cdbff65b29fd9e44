//! The chat state machine: what a partition's log means.
//!
//! Commands are applied deterministically by every replica: per-chat gapless seqs, the
//! dedup records of retried sends, membership spans (a member sees exactly the messages
//! from its join to its leave), edits and deletes as ordered log entries, and monotonic
//! receipt cursors. `chat` knows chats and the raftlog `Applier` interface; it knows
//! nothing of WebSockets, QUIC or RocksDB.

pub mod content;
pub mod e2e;
#[cfg(test)]
mod e2e_tests;
pub mod files;
#[cfg(test)]
mod golden;
mod keys;
mod model;
pub mod quota;
mod read;

use std::collections::{BTreeMap, HashMap};

use chatd_raftlog::{Applier, ApplyTxn, GroupId};
use chatd_storage::StorageError;
use serde::{Deserialize, Serialize};

pub use files::{Content, FileRecord, FileState};
pub use model::LogRecord;
pub use model::{
    decode_stored_message, Attachment, ChatKind, ChatRecord, Cursor, DedupRecord, MessageRecord,
    Span,
};
pub use read::{
    chat_record, cursor, cursors, file_carried, file_readable, history, log_count, log_records,
    message, unread, user_chats, HistoryPage, PageRequest, UNREAD_SCAN_MAX,
};

/// Files one message may carry, at most.
pub const MESSAGE_FILES_MAX: usize = 10;

/// Default (and upper) bound of a group's members.
pub const GROUP_MEMBERS_MAX: usize = 256;

/// A command of a partition's log. The gateway validates ids and sizes and stamps `ts`
/// (milliseconds since the epoch); the state machine checks everything that depends on
/// state (membership, existence, ownership).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ChatCommand {
    /// An opaque record (the foundation's test log).
    Append(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A send written by builds before dedup records expired (variant 1 of the log
    /// format). Still applied as it was logged, with [`DEDUP_WINDOW_MS_DEFAULT`]; new
    /// builds write [`ChatCommand::Send`].
    SendWithoutWindow {
        chat: String,
        sender: String,
        client_msg_id: String,
        text: String,
        reply_to: Option<u64>,
        ts: u64,
    },
    Edit {
        chat: String,
        sender: String,
        seq: u64,
        text: String,
        ts: u64,
    },
    Delete {
        chat: String,
        sender: String,
        seq: u64,
        ts: u64,
    },
    /// Creates the direct chat of `a` and `b` if it does not exist.
    OpenDirect {
        chat: String,
        a: String,
        b: String,
        ts: u64,
    },
    CreateGroup {
        chat: String,
        creator: String,
        name: String,
        members: Vec<String>,
        members_max: usize,
        ts: u64,
    },
    AddMembers {
        chat: String,
        by: String,
        users: Vec<String>,
        members_max: usize,
        ts: u64,
    },
    /// Removes `user` (by itself: leaving).
    RemoveMember {
        chat: String,
        by: String,
        user: String,
        ts: u64,
    },
    /// Moves cursors forward (max-merge); a batch from one gateway.
    Receipts(Vec<ReceiptUpdate>),
    /// Records that `user` is in `chat` (kept on the user's own partition).
    IndexChat { user: String, chat: String },
    /// A message. `(chat, sender, client_msg_id)` is its idempotency key: a retry within
    /// `dedup_window_ms` of `ts` answers the original seq. `ts` is the gateway's clock,
    /// written in the log, so expiry is the same on every replica.
    Send {
        chat: String,
        sender: String,
        client_msg_id: String,
        text: String,
        reply_to: Option<u64>,
        ts: u64,
        dedup_window_ms: u64,
    },
    /// A file's upload begins (docs/files.md): its record, with nothing acknowledged yet.
    FileBegin(files::FileRecord),
    /// `file`'s upload is acknowledged (on a majority of its replicas) up to `offset`.
    FileProgress { file: String, offset: u64 },
    /// `file`'s upload is complete, its bytes hashing to `sha256` (lowercase hex).
    FileComplete { file: String, sha256: String },
    /// `file` is forgotten (a failed upload, or collected); its chunks go with it.
    FileDrop { file: String },
    /// A message with files attached (log format 2): a [`ChatCommand::Send`] whose
    /// message carries `files` (at most [`MESSAGE_FILES_MAX`]; the gateway checked that
    /// each is a complete file of the sender's). Each becomes readable by whoever may read
    /// the message.
    SendWithFiles {
        chat: String,
        sender: String,
        client_msg_id: String,
        text: String,
        reply_to: Option<u64>,
        ts: u64,
        dedup_window_ms: u64,
        files: Vec<Attachment>,
    },
    /// `sender` attaches `file` (theirs, complete) in `chat` at `ts`: proposed to the
    /// file's home partition before the message, so collection never misses a reference.
    FileAttach {
        file: String,
        chat: String,
        sender: String,
        ts: u64,
    },
    /// No message of `chat` carries `file` any more (the collector asked the chat's
    /// partition): the attach of `attached_ms` is forgotten (not a later one).
    FileDetach {
        file: String,
        chat: String,
        attached_ms: u64,
    },
    /// Collection, at log time `ts`: `file` goes if it is still an upload begun more than
    /// `upload_ttl_ms` before, or complete, attached nowhere, and begun more than
    /// `unattached_ttl_ms` before. Otherwise nothing changes.
    FileCollect {
        file: String,
        ts: u64,
        upload_ttl_ms: u64,
        unattached_ttl_ms: u64,
    },
    /// What the content index answered for `file` (complete): set once.
    FileContent {
        file: String,
        content: files::Content,
    },
    /// `file` (complete, hashing to `sha256`) holds that content, in the content's
    /// partition (answers [`ChatReply::Content`]).
    ContentHold { sha256: String, file: String },
    /// `file` lets the content go at `ts`, for good (answers [`ChatReply::Content`]).
    ContentRelease {
        sha256: String,
        file: String,
        ts: u64,
    },
    /// `user` holds `file` of `bytes` from `ts`, within `quota_bytes` (in the user's
    /// partition).
    QuotaCharge {
        user: String,
        file: String,
        bytes: u64,
        quota_bytes: u64,
        ts: u64,
    },
    /// `file` no longer counts for `user`.
    QuotaRefund { user: String, file: String },
    /// Creates the E2E chat `chat` with `creator` in it, at epoch 0 (`crate::e2e`).
    CreateE2e {
        chat: String,
        creator: String,
        name: String,
        direct: bool,
        ts: u64,
    },
    /// An opaque MLS message in an E2E chat (answers like a send).
    E2eSend(e2e::E2eMessage),
    /// KeyPackages of `user`'s `device`, in the user's partition (answers `Devices`).
    KeyPackagesPut {
        user: String,
        device: String,
        packages: Vec<e2e::KeyPackage>,
        last_resort: Option<e2e::KeyPackage>,
        bounds: e2e::KeyPackageBounds,
        ts: u64,
    },
    /// One KeyPackage of each device of `user`, handed out once (answers `KeyPackages`).
    KeyPackagesClaim {
        user: String,
        bounds: e2e::KeyPackageBounds,
        ts: u64,
    },
    /// Forgets `user`'s `device` and its KeyPackages.
    RetireDevice {
        user: String,
        device: String,
        bounds: e2e::KeyPackageBounds,
    },
}

/// How long a send's idempotency record answers retries unless configured otherwise: 24 h.
pub const DEDUP_WINDOW_MS_DEFAULT: u64 = 24 * 60 * 60 * 1000;
/// Most expired dedup records one applied send removes. Each send adds one record, so the
/// expired backlog shrinks by up to this many minus one per send and never grows.
pub const DEDUP_EXPIRED_SWEEP_PER_SEND_MAX: usize = 8;

/// One cursor move.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptUpdate {
    pub chat: String,
    pub user: String,
    pub delivered: Option<u64>,
    pub read: Option<u64>,
}

/// The answer to a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChatReply {
    /// Send committed (or found committed: `duplicate`).
    Acked { seq: u64, ts: u64, duplicate: bool },
    /// The change is at `seq` of the chat's log (0: nothing appended).
    Done { seq: u64 },
    /// The command changed nothing; `code` is a protocol error code.
    Rejected { code: String, message: String },
    /// Foundation log answer.
    Appended { seq: u64 },
    /// The content index's answer: the canonical file of the content, if any.
    Content { canonical: Option<String> },
    /// E2E devices (after an upload: the uploading one; after a retire: none).
    Devices(Vec<e2e::DeviceInfo>),
    /// Claimed KeyPackages: (device, base64 KeyPackage).
    KeyPackages(Vec<(String, String)>),
}

/// What delivery needs to know after a batch is applied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ChatEvent {
    /// A new entry in a chat's log, with everyone who may see it.
    Message {
        message: MessageRecord,
        recipients: Vec<String>,
    },
    /// An earlier message changed (edited or deleted).
    Updated {
        message: MessageRecord,
        recipients: Vec<String>,
    },
    /// A member's cursors moved.
    Receipt {
        chat: String,
        user: String,
        cursor: Cursor,
        recipients: Vec<String>,
    },
}

fn reject(code: &str, message: impl Into<String>) -> ChatReply {
    ChatReply::Rejected {
        code: code.to_string(),
        message: message.into(),
    }
}

fn corrupt(e: chatd_codec::CodecError) -> StorageError {
    StorageError::Corrupt {
        cf: "sm",
        cause: e.to_string(),
    }
}

fn get<T: serde::de::DeserializeOwned>(
    txn: &ApplyTxn<'_>,
    key: &[u8],
) -> Result<Option<T>, StorageError> {
    txn.get(key)?
        .map(|b| chatd_codec::decode(&b).map_err(corrupt))
        .transpose()
}

fn put<T: Serialize>(txn: &mut ApplyTxn<'_>, key: &[u8], value: &T) -> Result<(), StorageError> {
    txn.put(key, chatd_codec::encode(value).map_err(corrupt)?);
    Ok(())
}

/// The partition state machine.
pub struct ChatApplier<F: Fn(GroupId, Vec<ChatEvent>) + Send + Sync + 'static> {
    on_events: F,
    /// Per group: what is known of its dedup expiry index (see [`SweepHint`]).
    sweep_hints: std::sync::Mutex<HashMap<GroupId, SweepHint>>,
}

impl<F: Fn(GroupId, Vec<ChatEvent>) + Send + Sync + 'static> ChatApplier<F> {
    /// A state machine that hands the events of each applied batch to `on_events`.
    pub fn new(on_events: F) -> Self {
        Self {
            on_events,
            sweep_hints: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn hints(&self) -> std::sync::MutexGuard<'_, HashMap<GroupId, SweepHint>> {
        // A panic while holding it cannot leave a hint wrong in a way that matters more
        // than a lost one: take the map either way.
        self.sweep_hints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What the applier knows of one group's dedup expiry index, so that a send's sweep can
/// skip its scan when nothing can have expired: every expiry in the index (stored or
/// written earlier in the same batch) is at or after `expiries_from_ms`.
///
/// Derived from the stored state, never stored: unknown (`None`) after a restart, a
/// snapshot install or a failed apply, learned again by the next scan. A sweep skips its
/// scan only when the scan would have found nothing to remove, so every replica removes
/// exactly the same records whatever its hint (`sweep_hint_never_changes_what_is_removed`).
/// Without it every stored send opened a RocksDB iterator over the index: ~40 % of a
/// send's apply CPU in a profile under load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepHint {
    expiries_from_ms: Option<u64>,
}

impl<F: Fn(GroupId, Vec<ChatEvent>) + Send + Sync + 'static> Applier for ChatApplier<F> {
    fn apply(
        &self,
        group: GroupId,
        index: u64,
        command: &[u8],
        txn: &mut ApplyTxn<'_>,
    ) -> Result<Vec<u8>, StorageError> {
        let reply = match chatd_codec::decode::<ChatCommand>(command) {
            Err(e) => reject("malformed", format!("undecodable command: {e}")),
            Ok(cmd) => {
                let mut hint = self.hints().get(&group).copied().unwrap_or_default();
                match apply_command(index, cmd, txn, &mut hint) {
                    Ok(reply) => {
                        self.hints().insert(group, hint);
                        reply
                    }
                    Err(e) => {
                        // The batch is not written: what the hint learned from it may be
                        // false of the stored state.
                        self.hints().remove(&group);
                        return Err(e);
                    }
                }
            }
        };
        chatd_codec::encode(&reply).map_err(corrupt)
    }

    fn installed(&self, group: GroupId, _store: &chatd_storage::Storage) {
        self.hints().remove(&group);
    }

    fn applied(&self, group: GroupId, events: Vec<Vec<u8>>) {
        let decoded: Vec<ChatEvent> = events
            .iter()
            .filter_map(|e| chatd_codec::decode(e).ok())
            .collect();
        if !decoded.is_empty() {
            (self.on_events)(group, decoded);
        }
    }
}

fn emit(txn: &mut ApplyTxn<'_>, event: &ChatEvent) -> Result<(), StorageError> {
    txn.emit(chatd_codec::encode(event).map_err(corrupt)?);
    Ok(())
}

/// Appends a message to `chat`'s log: next seq, stored, emitted to the visible members.
fn append_message(
    txn: &mut ApplyTxn<'_>,
    chat: &mut ChatRecord,
    mut message: MessageRecord,
) -> Result<u64, StorageError> {
    chat.last_seq += 1;
    message.seq = chat.last_seq;
    put(txn, &keys::message(&message.chat, message.seq), &message)?;
    for f in &message.files {
        txn.put(
            &keys::attachment(&message.chat, &f.file_id, message.seq),
            Vec::new(),
        );
    }
    let recipients = chat.members_at(message.seq);
    emit(
        txn,
        &ChatEvent::Message {
            message: message.clone(),
            recipients,
        },
    )?;
    Ok(message.seq)
}

/// A message to append, as a send command carries it.
struct Outgoing {
    chat: String,
    sender: String,
    client_msg_id: String,
    text: String,
    reply_to: Option<u64>,
    ts: u64,
    files: Vec<Attachment>,
}

/// Applies a send: the answer of an unexpired earlier send with the same key, or the next
/// seq. A stored send also removes up to [`DEDUP_EXPIRED_SWEEP_PER_SEND_MAX`] dedup records
/// expired at its `ts`; a refused one changes nothing.
fn send(
    txn: &mut ApplyTxn<'_>,
    m: Outgoing,
    dedup_window_ms: u64,
    hint: &mut SweepHint,
) -> Result<ChatReply, StorageError> {
    let Outgoing {
        chat,
        sender,
        client_msg_id,
        text,
        reply_to,
        ts,
        files,
    } = m;
    if files.len() > MESSAGE_FILES_MAX {
        return Ok(reject(
            "too_large",
            format!(
                "{} files; a message carries {MESSAGE_FILES_MAX} at most",
                files.len()
            ),
        ));
    }
    let dedup = match dedup_check(txn, &chat, &sender, &client_msg_id, ts)? {
        Ok(d) => d,
        Err(duplicate) => return Ok(duplicate),
    };
    let Some(mut record) = get::<ChatRecord>(txn, &keys::chat(&chat))? else {
        return Ok(reject("unknown_chat", format!("no chat {chat}")));
    };
    if !record.is_member(&sender) {
        return Ok(reject("not_member", format!("{sender} is not in {chat}")));
    }
    if record.kind.is_e2e() {
        return Ok(reject(
            "forbidden",
            format!("{chat} is end-to-end encrypted: it takes e2e_send only"),
        ));
    }
    if let Some(r) = reply_to {
        if r == 0 || r > record.last_seq {
            return Ok(reject(
                "unknown_message",
                format!("no message {r} in {chat}"),
            ));
        }
    }
    let seq = append_message(
        txn,
        &mut record,
        MessageRecord {
            chat: chat.clone(),
            seq: 0,
            sender,
            kind: "text".into(),
            text,
            ts,
            reply_to,
            target: None,
            edited_ts: None,
            files,
        },
    )?;
    put(txn, &keys::chat(&chat), &record)?;
    dedup_store(txn, dedup, seq, ts, dedup_window_ms, hint)?;
    Ok(ChatReply::Acked {
        seq,
        ts,
        duplicate: false,
    })
}

/// A send's idempotency key and the record stored under it, if any (expired).
pub(crate) struct Dedup {
    key: Vec<u8>,
    earlier: Option<DedupRecord>,
}

/// The first step of every send: `Err` with the original's ack for a retry within its
/// window, else the key to record the send under.
pub(crate) fn dedup_check(
    txn: &ApplyTxn<'_>,
    chat: &str,
    sender: &str,
    client_msg_id: &str,
    ts: u64,
) -> Result<Result<Dedup, ChatReply>, StorageError> {
    let key = keys::dedup(chat, sender, client_msg_id);
    let earlier = get::<DedupRecord>(txn, &key)?;
    if let Some(d) = &earlier {
        if !d.expired_at(ts) {
            return Ok(Err(ChatReply::Acked {
                seq: d.seq,
                ts: d.ts,
                duplicate: true,
            }));
        }
    }
    Ok(Ok(Dedup { key, earlier }))
}

/// The last step of a stored send: up to [`DEDUP_EXPIRED_SWEEP_PER_SEND_MAX`] expired
/// records swept, and the send's record (answering retries with `seq` until `ts` +
/// `window_ms`) written with its expiry index entry.
pub(crate) fn dedup_store(
    txn: &mut ApplyTxn<'_>,
    dedup: Dedup,
    seq: u64,
    ts: u64,
    window_ms: u64,
    hint: &mut SweepHint,
) -> Result<(), StorageError> {
    sweep_expired_dedup(txn, ts, hint)?;
    if let Some(d) = dedup.earlier {
        // Expired but maybe not swept yet: its index entry goes now, so a later sweep
        // never removes the record this send writes under the same key.
        txn.delete(&keys::dedup_expiry(d.expires_ms, &dedup.key));
    }
    let expires_ms = ts.saturating_add(window_ms);
    put(
        txn,
        &dedup.key,
        &DedupRecord {
            seq,
            ts,
            expires_ms,
        },
    )?;
    txn.put(&keys::dedup_expiry(expires_ms, &dedup.key), Vec::new());
    if let Some(from) = &mut hint.expiries_from_ms {
        *from = (*from).min(expires_ms);
    }
    Ok(())
}

/// Removes up to [`DEDUP_EXPIRED_SWEEP_PER_SEND_MAX`] dedup records that expired at log
/// time `now_ms`, oldest first. Skips the scan when `hint` says nothing has expired, and
/// learns from the scan when the next expiry is due.
fn sweep_expired_dedup(
    txn: &mut ApplyTxn<'_>,
    now_ms: u64,
    hint: &mut SweepHint,
) -> Result<(), StorageError> {
    if hint.expiries_from_ms.is_some_and(|from| now_ms < from) {
        return Ok(());
    }
    // One past the most it may remove: the first record not removed says when the next
    // one expires (or that more have expired already).
    let found = txn.scan(
        keys::DEDUP_EXPIRY_START,
        keys::DEDUP_EXPIRY_END,
        DEDUP_EXPIRED_SWEEP_PER_SEND_MAX + 1,
    )?;
    // All of the index was read unless the scan hit its limit.
    let mut next = (found.len() <= DEDUP_EXPIRED_SWEEP_PER_SEND_MAX).then_some(u64::MAX);
    for (removed, (index_key, _)) in found.into_iter().enumerate() {
        let Some(expires_ms) = keys::expiry_of(&index_key) else {
            // Not written by this code: leave it, learn nothing.
            next = None;
            break;
        };
        if expires_ms > now_ms {
            next = Some(expires_ms);
            break;
        }
        if removed == DEDUP_EXPIRED_SWEEP_PER_SEND_MAX {
            // More have expired than one sweep removes.
            next = None;
            break;
        }
        if let Some(dedup_key) = keys::dedup_key_of_expiry(&index_key) {
            txn.delete(dedup_key);
        }
        txn.delete(&index_key);
    }
    hint.expiries_from_ms = next;
    Ok(())
}

fn apply_command(
    index: u64,
    cmd: ChatCommand,
    txn: &mut ApplyTxn<'_>,
    hint: &mut SweepHint,
) -> Result<ChatReply, StorageError> {
    Ok(match cmd {
        ChatCommand::FileBegin(record) => files::begin(txn, record)?,
        ChatCommand::FileProgress { file, offset } => files::progress(txn, &file, offset)?,
        ChatCommand::FileComplete { file, sha256 } => files::complete(txn, &file, sha256)?,
        ChatCommand::FileDrop { file } => files::drop_file(txn, &file)?,
        ChatCommand::FileAttach {
            file,
            chat,
            sender,
            ts,
        } => files::attach(txn, &file, &chat, &sender, ts)?,
        ChatCommand::FileDetach {
            file,
            chat,
            attached_ms,
        } => files::detach(txn, &file, &chat, attached_ms)?,
        ChatCommand::FileCollect {
            file,
            ts,
            upload_ttl_ms,
            unattached_ttl_ms,
        } => files::collect(txn, &file, ts, upload_ttl_ms, unattached_ttl_ms)?,
        ChatCommand::FileContent { file, content } => files::set_content(txn, &file, content)?,
        ChatCommand::ContentHold { sha256, file } => content::hold(txn, &sha256, &file)?,
        ChatCommand::ContentRelease { sha256, file, ts } => {
            content::release(txn, &sha256, &file, ts)?
        }
        ChatCommand::QuotaCharge {
            user,
            file,
            bytes,
            quota_bytes,
            ts,
        } => quota::charge(txn, &user, &file, bytes, quota_bytes, ts)?,
        ChatCommand::QuotaRefund { user, file } => quota::refund(txn, &user, &file)?,
        ChatCommand::CreateE2e {
            chat,
            creator,
            name,
            direct,
            ts,
        } => e2e::create(txn, &chat, &creator, name, direct, ts)?,
        ChatCommand::E2eSend(m) => e2e::send(txn, m, hint)?,
        ChatCommand::KeyPackagesPut {
            user,
            device,
            packages,
            last_resort,
            bounds,
            ts,
        } => e2e::put_key_packages(txn, &user, &device, packages, last_resort, bounds, ts)?,
        ChatCommand::KeyPackagesClaim { user, bounds, ts } => {
            e2e::claim_key_packages(txn, &user, bounds, ts)?
        }
        ChatCommand::RetireDevice {
            user,
            device,
            bounds,
        } => e2e::retire_device(txn, &user, &device, bounds)?,
        ChatCommand::Append(payload) => {
            let n: u64 = get(txn, keys::LOG_COUNT)?.unwrap_or(0) + 1;
            put(txn, keys::LOG_COUNT, &n)?;
            put(
                txn,
                &keys::log_record(n),
                &model::LogRecord {
                    seq: n,
                    index,
                    payload,
                },
            )?;
            ChatReply::Appended { seq: n }
        }
        ChatCommand::SendWithoutWindow {
            chat,
            sender,
            client_msg_id,
            text,
            reply_to,
            ts,
        } => send(
            txn,
            Outgoing {
                chat,
                sender,
                client_msg_id,
                text,
                reply_to,
                ts,
                files: Vec::new(),
            },
            DEDUP_WINDOW_MS_DEFAULT,
            hint,
        )?,
        ChatCommand::Send {
            chat,
            sender,
            client_msg_id,
            text,
            reply_to,
            ts,
            dedup_window_ms,
        } => send(
            txn,
            Outgoing {
                chat,
                sender,
                client_msg_id,
                text,
                reply_to,
                ts,
                files: Vec::new(),
            },
            dedup_window_ms,
            hint,
        )?,
        ChatCommand::SendWithFiles {
            chat,
            sender,
            client_msg_id,
            text,
            reply_to,
            ts,
            dedup_window_ms,
            files,
        } => send(
            txn,
            Outgoing {
                chat,
                sender,
                client_msg_id,
                text,
                reply_to,
                ts,
                files,
            },
            dedup_window_ms,
            hint,
        )?,
        ChatCommand::Edit {
            chat,
            sender,
            seq,
            text,
            ts,
        } => change_message(txn, &chat, &sender, seq, Some(text), ts)?,
        ChatCommand::Delete {
            chat,
            sender,
            seq,
            ts,
        } => change_message(txn, &chat, &sender, seq, None, ts)?,
        ChatCommand::OpenDirect { chat, a, b, ts } => {
            if let Some(existing) = get::<ChatRecord>(txn, &keys::chat(&chat))? {
                return Ok(ChatReply::Done {
                    seq: existing.last_seq,
                });
            }
            let mut record = ChatRecord {
                chat: chat.clone(),
                kind: ChatKind::Direct,
                name: String::new(),
                creator: a.clone(),
                members: BTreeMap::new(),
                last_seq: 0,
                created_ts: ts,
            };
            for u in [&a, &b] {
                record.members.insert(u.clone(), Span { from: 1, to: None });
            }
            put(txn, &keys::chat(&chat), &record)?;
            ChatReply::Done { seq: 0 }
        }
        ChatCommand::CreateGroup {
            chat,
            creator,
            name,
            members,
            members_max,
            ts,
        } => {
            if get::<ChatRecord>(txn, &keys::chat(&chat))?.is_some() {
                return Ok(reject("invalid_field", format!("chat {chat} exists")));
            }
            let mut all: Vec<String> = vec![creator.clone()];
            for m in members {
                if !all.contains(&m) {
                    all.push(m);
                }
            }
            if all.len() > members_max {
                return Ok(reject(
                    "group_full",
                    format!("{} members exceed the limit of {members_max}", all.len()),
                ));
            }
            let mut record = ChatRecord {
                chat: chat.clone(),
                kind: ChatKind::Group,
                name,
                creator: creator.clone(),
                members: BTreeMap::new(),
                last_seq: 0,
                created_ts: ts,
            };
            let mut seq = 0;
            for u in all {
                seq = join(txn, &mut record, &creator, &u, ts)?;
            }
            put(txn, &keys::chat(&chat), &record)?;
            ChatReply::Done { seq }
        }
        ChatCommand::AddMembers {
            chat,
            by,
            users,
            members_max,
            ts,
        } => {
            let mut record = match group_changed_by(txn, &chat, &by, false)? {
                Ok(r) => r,
                Err(rejected) => return Ok(rejected),
            };
            let mut new: Vec<String> = Vec::new();
            for u in users {
                if !record.is_member(&u) && !new.contains(&u) {
                    new.push(u);
                }
            }
            if record.current_members().len() + new.len() > members_max {
                return Ok(reject(
                    "group_full",
                    format!("the group would exceed {members_max} members"),
                ));
            }
            let mut seq = record.last_seq;
            for u in new {
                seq = join(txn, &mut record, &by, &u, ts)?;
            }
            put(txn, &keys::chat(&chat), &record)?;
            ChatReply::Done { seq }
        }
        ChatCommand::RemoveMember { chat, by, user, ts } => {
            let mut record = match group_changed_by(txn, &chat, &by, by == user)? {
                Ok(r) => r,
                Err(rejected) => return Ok(rejected),
            };
            if by != user && by != record.creator {
                return Ok(reject("forbidden", "only the creator removes others"));
            }
            if !record.is_member(&user) {
                return Ok(reject("not_member", format!("{user} is not in {chat}")));
            }
            let seq = append_message(
                txn,
                &mut record,
                MessageRecord {
                    chat: chat.clone(),
                    seq: 0,
                    sender: by.clone(),
                    kind: "leave".into(),
                    text: user.clone(),
                    ts,
                    reply_to: None,
                    target: None,
                    edited_ts: None,
                    files: Vec::new(),
                },
            )?;
            if let Some(span) = record.members.get_mut(&user) {
                span.to = Some(seq);
            }
            put(txn, &keys::chat(&chat), &record)?;
            ChatReply::Done { seq }
        }
        ChatCommand::Receipts(updates) => {
            for u in updates {
                let Some(record) = get::<ChatRecord>(txn, &keys::chat(&u.chat))? else {
                    continue;
                };
                if !record.is_member(&u.user) {
                    continue;
                }
                let key = keys::cursor(&u.chat, &u.user);
                let old: Cursor = get(txn, &key)?.unwrap_or_default();
                let last = record.last_seq;
                let read = u.read.unwrap_or(0).min(last).max(old.read);
                let delivered = u
                    .delivered
                    .unwrap_or(0)
                    .min(last)
                    .max(old.delivered)
                    .max(read);
                let new = Cursor { delivered, read };
                if new != old {
                    put(txn, &key, &new)?;
                    emit(
                        txn,
                        &ChatEvent::Receipt {
                            chat: u.chat.clone(),
                            user: u.user.clone(),
                            cursor: new,
                            recipients: record.current_members(),
                        },
                    )?;
                }
            }
            ChatReply::Done { seq: 0 }
        }
        ChatCommand::IndexChat { user, chat } => {
            txn.put(&keys::user_chat(&user, &chat), Vec::new());
            ChatReply::Done { seq: 0 }
        }
    })
}

/// The group `chat` if `by` may change its membership (exists, is a group, `by` is in it;
/// of an E2E group only by leaving it, `leaving`); otherwise the rejection to answer.
fn group_changed_by(
    txn: &ApplyTxn<'_>,
    chat: &str,
    by: &str,
    leaving: bool,
) -> Result<Result<ChatRecord, ChatReply>, StorageError> {
    let Some(record) = get::<ChatRecord>(txn, &keys::chat(chat))? else {
        return Ok(Err(reject("unknown_chat", format!("no chat {chat}"))));
    };
    if record.kind == ChatKind::E2eGroup && !leaving {
        return Ok(Err(reject(
            "forbidden",
            "members of an end-to-end encrypted chat change by commit (e2e_send)",
        )));
    }
    if record.kind != ChatKind::Group && record.kind != ChatKind::E2eGroup {
        return Ok(Err(reject(
            "forbidden",
            "members of a direct chat cannot change",
        )));
    }
    if !record.is_member(by) {
        return Ok(Err(reject("not_member", format!("{by} is not in {chat}"))));
    }
    Ok(Ok(record))
}

/// Adds `user` to `record` with a join entry; returns the entry's seq.
pub(crate) fn join(
    txn: &mut ApplyTxn<'_>,
    record: &mut ChatRecord,
    by: &str,
    user: &str,
    ts: u64,
) -> Result<u64, StorageError> {
    let from = record.last_seq + 1;
    record
        .members
        .insert(user.to_string(), Span { from, to: None });
    append_message(
        txn,
        record,
        MessageRecord {
            chat: record.chat.clone(),
            seq: 0,
            sender: by.to_string(),
            kind: "join".into(),
            text: user.to_string(),
            ts,
            reply_to: None,
            target: None,
            edited_ts: None,
            files: Vec::new(),
        },
    )
}

/// Edit (`text` is Some) or delete (None) of `seq` by `sender`: the original changes and a
/// marker entry is appended to the log, so every member sees the change in order.
fn change_message(
    txn: &mut ApplyTxn<'_>,
    chat: &str,
    sender: &str,
    seq: u64,
    text: Option<String>,
    ts: u64,
) -> Result<ChatReply, StorageError> {
    let Some(mut record) = get::<ChatRecord>(txn, &keys::chat(chat))? else {
        return Ok(reject("unknown_chat", format!("no chat {chat}")));
    };
    if !record.is_member(sender) {
        return Ok(reject("not_member", format!("{sender} is not in {chat}")));
    }
    let key = keys::message(chat, seq);
    let stored = txn
        .get(&key)?
        .map(|b| decode_stored_message(&b).map_err(corrupt))
        .transpose()?;
    let Some(mut original) = stored else {
        return Ok(reject(
            "unknown_message",
            format!("no message {seq} in {chat}"),
        ));
    };
    let changeable = original.kind == "text"
        || (original.kind == e2e::MlsKind::Application.entry_kind() && text.is_none());
    if original.sender != sender || !changeable {
        return Ok(reject(
            "forbidden",
            "only the sender edits or deletes a text message (or deletes an E2E one)",
        ));
    }
    let kind = if text.is_some() { "edit" } else { "delete" };
    match &text {
        Some(t) => original.text = t.clone(),
        None => {
            original.kind = "deleted".into();
            original.text = String::new();
            // Its files are no longer readable through it.
            for f in std::mem::take(&mut original.files) {
                txn.delete(&keys::attachment(chat, &f.file_id, seq));
            }
        }
    }
    original.edited_ts = Some(ts);
    put(txn, &key, &original)?;
    let recipients = record.members_at(seq);
    emit(
        txn,
        &ChatEvent::Updated {
            message: original,
            recipients,
        },
    )?;
    let marker = append_message(
        txn,
        &mut record,
        MessageRecord {
            chat: chat.to_string(),
            seq: 0,
            sender: sender.to_string(),
            kind: kind.into(),
            text: text.unwrap_or_default(),
            ts,
            reply_to: None,
            target: Some(seq),
            edited_ts: None,
            files: Vec::new(),
        },
    )?;
    put(txn, &keys::chat(chat), &record)?;
    Ok(ChatReply::Done { seq: marker })
}

#[cfg(test)]
mod tests;
