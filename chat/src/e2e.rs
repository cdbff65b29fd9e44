//! End-to-end encrypted chats (MLS, RFC 9420): the server's half, which is storage and
//! order only — it never decrypts, and needs no cryptography.
//!
//! * **KeyPackages**, in the owner's user partition: each device uploads up to
//!   `per_device_max` (and one last-resort package); a claim hands out one package per
//!   device of a user, each at most once (the command is in the log, so two claimers never
//!   get the same one), never an expired one (expiry is judged against the command's `ts`,
//!   which is in the log). The last-resort package is handed out only when a device has no
//!   other, and is kept.
//! * **E2E chats** (`ChatKind::E2eGroup`, `E2eDirect`): their log carries the opaque MLS
//!   messages the clients give (base64 in `text`, the MLS epoch in `target`) with the
//!   dedup, history, sync, receipts and delivery of every chat. The one rule the server
//!   adds is MLS's delivery-service rule: **one commit per epoch**. A commit must name the
//!   chat's epoch; the first one in log order wins and moves the epoch on, any other for
//!   that epoch is refused (`stale_epoch`) without being stored, so every member applies
//!   the same commits in the same order. A commit changes the chat's members in the same
//!   command: removed users leave after the commit (they see it, and nothing after), added
//!   users join after it and the welcome follows their joins (they see it and what
//!   follows). Members change no other way (a member may still leave; the others' clients
//!   then commit its removal).

use chatd_raftlog::ApplyTxn;
use chatd_storage::StorageError;
use serde::{Deserialize, Serialize};

use crate::model::{Attachment, ChatKind, ChatRecord, MessageRecord, Span};
use crate::{append_message, get, keys, put, reject, ChatReply, SweepHint};

/// The kind of an MLS message in an E2E chat's log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MlsKind {
    Application,
    Commit,
    Proposal,
}

impl MlsKind {
    /// The protocol's name (`e2e_send`'s `kind`).
    pub fn parse(s: &str) -> Option<MlsKind> {
        match s {
            "application" => Some(MlsKind::Application),
            "commit" => Some(MlsKind::Commit),
            "proposal" => Some(MlsKind::Proposal),
            _ => None,
        }
    }
    /// The log entry's kind.
    pub fn entry_kind(self) -> &'static str {
        match self {
            MlsKind::Application => "mls_application",
            MlsKind::Commit => "mls_commit",
            MlsKind::Proposal => "mls_proposal",
        }
    }
}

/// The entry kind of a commit's welcome.
pub const WELCOME_KIND: &str = "mls_welcome";

/// An MLS message to store, as the gateway checked it (`data`, `welcome`: base64 within
/// the protocol's bounds; users known).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct E2eMessage {
    pub chat: String,
    pub sender: String,
    pub client_msg_id: String,
    pub kind: MlsKind,
    pub epoch: u64,
    pub data: String,
    pub welcome: Option<String>,
    pub add: Vec<String>,
    pub remove: Vec<String>,
    pub files: Vec<Attachment>,
    pub members_max: usize,
    pub ts: u64,
    pub dedup_window_ms: u64,
}

/// A chat's E2E state beside its record: the epoch its next commit must name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct E2eState {
    pub epoch: u64,
}

/// A KeyPackage as stored: the client's base64 and its expiry (ms since the epoch).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyPackage {
    pub data: String,
    pub expires_ms: u64,
}

/// A device's record: the index its next KeyPackage is stored under, its last-resort
/// KeyPackage.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub next_index: u64,
    pub last_resort: Option<KeyPackage>,
}

/// A device as the owner and claimers see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub device: String,
    /// Unclaimed KeyPackages not expired at the time of the read or command.
    pub available: u64,
    pub last_resort: bool,
}

/// The bounds a KeyPackage command is applied with (from the protocol's constants).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyPackageBounds {
    pub per_device_max: u64,
    pub devices_max: u64,
}

/// Creates an E2E chat with `creator` as its only member, at epoch 0.
pub(crate) fn create(
    txn: &mut ApplyTxn<'_>,
    chat: &str,
    creator: &str,
    name: String,
    direct: bool,
    ts: u64,
) -> Result<ChatReply, StorageError> {
    if get::<ChatRecord>(txn, &keys::chat(chat))?.is_some() {
        return Ok(reject("invalid_field", format!("chat {chat} exists")));
    }
    let mut record = ChatRecord {
        chat: chat.to_string(),
        kind: if direct {
            ChatKind::E2eDirect
        } else {
            ChatKind::E2eGroup
        },
        name,
        creator: creator.to_string(),
        members: Default::default(),
        last_seq: 0,
        created_ts: ts,
    };
    let seq = crate::join(txn, &mut record, creator, creator, ts)?;
    put(txn, &keys::chat(chat), &record)?;
    put(txn, &keys::e2e(chat), &E2eState::default())?;
    Ok(ChatReply::Done { seq })
}

/// Stores an MLS message (see the module's rules); answers like a send.
pub(crate) fn send(
    txn: &mut ApplyTxn<'_>,
    m: E2eMessage,
    hint: &mut SweepHint,
) -> Result<ChatReply, StorageError> {
    let dedup = match crate::dedup_check(txn, &m.chat, &m.sender, &m.client_msg_id, m.ts)? {
        Ok(d) => d,
        Err(duplicate) => return Ok(duplicate),
    };
    let chat = m.chat.as_str();
    let Some(mut record) = get::<ChatRecord>(txn, &keys::chat(chat))? else {
        return Ok(reject("unknown_chat", format!("no chat {chat}")));
    };
    if !record.is_member(&m.sender) {
        return Ok(reject(
            "not_member",
            format!("{} is not in {chat}", m.sender),
        ));
    }
    if !record.kind.is_e2e() {
        return Ok(reject(
            "invalid_field",
            format!("{chat} is not end-to-end encrypted"),
        ));
    }
    if m.files.len() > crate::MESSAGE_FILES_MAX
        || (!m.files.is_empty() && m.kind != MlsKind::Application)
    {
        return Ok(reject(
            "invalid_field",
            "files go with an application message, at most 10",
        ));
    }
    let mut state: E2eState = get(txn, &keys::e2e(chat))?.unwrap_or_default();
    if m.kind != MlsKind::Commit {
        if m.welcome.is_some() || !m.add.is_empty() || !m.remove.is_empty() {
            return Ok(reject(
                "invalid_field",
                "welcome, add and remove go with a commit",
            ));
        }
        if m.epoch > state.epoch {
            return Ok(reject(
                "invalid_field",
                format!("epoch {} is ahead of the chat's {}", m.epoch, state.epoch),
            ));
        }
    } else if m.epoch != state.epoch {
        return Ok(reject(
            "stale_epoch",
            format!(
                "{chat} is at epoch {}: a commit for epoch {} lost",
                state.epoch, m.epoch
            ),
        ));
    }
    // Who joins and leaves: the current members that stay, plus new ones.
    let mut joins: Vec<String> = Vec::new();
    for u in &m.add {
        if !record.is_member(u) && !joins.contains(u) {
            joins.push(u.clone());
        }
    }
    let mut leaves: Vec<String> = Vec::new();
    for u in &m.remove {
        if *u == m.sender {
            return Ok(reject(
                "invalid_field",
                "a member does not commit its own removal: leave instead",
            ));
        }
        if !record.is_member(u) {
            return Ok(reject("not_member", format!("{u} is not in {chat}")));
        }
        if joins.contains(u) {
            return Ok(reject(
                "invalid_field",
                format!("{u} both added and removed"),
            ));
        }
        if !leaves.contains(u) {
            leaves.push(u.clone());
        }
    }
    let after = record.current_members().len() + joins.len() - leaves.len();
    let max = match record.kind {
        ChatKind::E2eDirect => 2,
        _ => m.members_max,
    };
    if after > max {
        return Ok(reject(
            "group_full",
            format!("{chat} would have {after} members; at most {max}"),
        ));
    }
    if record.kind == ChatKind::E2eDirect && leaves.contains(&record.creator) {
        return Ok(reject("forbidden", "a direct chat's creator stays in it"));
    }
    let seq = append_message(
        txn,
        &mut record,
        MessageRecord {
            chat: chat.to_string(),
            seq: 0,
            sender: m.sender.clone(),
            kind: m.kind.entry_kind().into(),
            text: m.data,
            ts: m.ts,
            reply_to: None,
            target: Some(m.epoch),
            edited_ts: None,
            files: m.files,
        },
    )?;
    if m.kind == MlsKind::Commit {
        for u in &leaves {
            let at = append_message(txn, &mut record, marker(chat, &m.sender, "leave", u, m.ts))?;
            if let Some(span) = record.members.get_mut(u) {
                span.to = Some(at);
            }
        }
        for u in &joins {
            let from = record.last_seq + 1;
            record.members.insert(u.clone(), Span { from, to: None });
            append_message(txn, &mut record, marker(chat, &m.sender, "join", u, m.ts))?;
        }
        state.epoch += 1;
        if let Some(welcome) = m.welcome {
            let mut entry = marker(chat, &m.sender, WELCOME_KIND, "", m.ts);
            entry.text = welcome;
            entry.target = Some(state.epoch);
            append_message(txn, &mut record, entry)?;
        }
        put(txn, &keys::e2e(chat), &state)?;
    }
    put(txn, &keys::chat(chat), &record)?;
    crate::dedup_store(txn, dedup, seq, m.ts, m.dedup_window_ms, hint)?;
    Ok(ChatReply::Acked {
        seq,
        ts: m.ts,
        duplicate: false,
    })
}

fn marker(chat: &str, sender: &str, kind: &str, text: &str, ts: u64) -> MessageRecord {
    MessageRecord {
        chat: chat.to_string(),
        seq: 0,
        sender: sender.to_string(),
        kind: kind.into(),
        text: text.to_string(),
        ts,
        reply_to: None,
        target: None,
        edited_ts: None,
        files: Vec::new(),
    }
}

/// The device's stored KeyPackages, oldest first: (key, package), at most `limit`.
fn packages(
    txn: &ApplyTxn<'_>,
    user: &str,
    device: &str,
    limit: usize,
) -> Result<Vec<(Vec<u8>, KeyPackage)>, StorageError> {
    let prefix = keys::key_package_prefix(user, device);
    txn.scan(&prefix, &keys::prefix_end(&prefix), limit)?
        .into_iter()
        .map(|(k, v)| Ok((k, chatd_codec::decode(&v).map_err(crate::corrupt)?)))
        .collect()
}

/// The user's devices with their records, at most `limit`.
fn devices(
    txn: &ApplyTxn<'_>,
    user: &str,
    limit: usize,
) -> Result<Vec<(String, DeviceRecord)>, StorageError> {
    let prefix = keys::device_prefix(user);
    let mut out = Vec::new();
    for (k, v) in txn.scan(&prefix, &keys::prefix_end(&prefix), limit)? {
        let Some(device) = k.get(prefix.len()..) else {
            continue;
        };
        let device = String::from_utf8_lossy(device).into_owned();
        out.push((device, chatd_codec::decode(&v).map_err(crate::corrupt)?));
    }
    Ok(out)
}

/// Stores `uploaded` KeyPackages of `user`'s `device` (and its last-resort one), after
/// dropping its expired ones; refused, changing nothing, past the bounds.
#[allow(clippy::too_many_arguments)]
pub(crate) fn put_key_packages(
    txn: &mut ApplyTxn<'_>,
    user: &str,
    device: &str,
    uploaded: Vec<KeyPackage>,
    last_resort: Option<KeyPackage>,
    bounds: KeyPackageBounds,
    ts: u64,
) -> Result<ChatReply, StorageError> {
    let device_key = keys::device(user, device);
    let existing: Option<DeviceRecord> = get(txn, &device_key)?;
    if existing.is_none() {
        let n = devices(txn, user, bounds.devices_max as usize + 1)?.len() as u64;
        if n >= bounds.devices_max {
            return Ok(reject(
                "limit_reached",
                format!(
                    "{user} has {n} devices; at most {} (retire one first)",
                    bounds.devices_max
                ),
            ));
        }
    }
    let mut record = existing.unwrap_or_default();
    let stored = packages(txn, user, device, bounds.per_device_max as usize + 1)?;
    let (expired, live): (Vec<_>, Vec<_>) =
        stored.into_iter().partition(|(_, p)| p.expires_ms <= ts);
    let total = live.len() as u64 + uploaded.len() as u64;
    if total > bounds.per_device_max {
        return Ok(reject(
            "limit_reached",
            format!(
                "{device} would hold {total} KeyPackages; at most {}",
                bounds.per_device_max
            ),
        ));
    }
    for (k, _) in expired {
        txn.delete(&k);
    }
    for p in uploaded {
        put(txn, &keys::key_package(user, device, record.next_index), &p)?;
        record.next_index += 1;
    }
    if last_resort.is_some() {
        record.last_resort = last_resort;
    }
    put(txn, &device_key, &record)?;
    Ok(ChatReply::Devices(vec![DeviceInfo {
        device: device.to_string(),
        available: total,
        last_resort: record
            .last_resort
            .as_ref()
            .is_some_and(|p| p.expires_ms > ts),
    }]))
}

/// Hands out one KeyPackage per device of `user` (the oldest unexpired; else the
/// last-resort one, kept), deleting what it hands out and the expired ones it passes.
pub(crate) fn claim_key_packages(
    txn: &mut ApplyTxn<'_>,
    user: &str,
    bounds: KeyPackageBounds,
    ts: u64,
) -> Result<ChatReply, StorageError> {
    let mut out = Vec::new();
    for (device, record) in devices(txn, user, bounds.devices_max as usize)? {
        let mut taken = None;
        for (k, p) in packages(txn, user, &device, bounds.per_device_max as usize + 1)? {
            txn.delete(&k);
            if p.expires_ms > ts {
                taken = Some(p.data);
                break;
            }
        }
        let taken = taken.or_else(|| {
            record
                .last_resort
                .filter(|p| p.expires_ms > ts)
                .map(|p| p.data)
        });
        if let Some(data) = taken {
            out.push((device, data));
        }
    }
    Ok(ChatReply::KeyPackages(out))
}

/// Forgets `user`'s `device` and every KeyPackage of it.
pub(crate) fn retire_device(
    txn: &mut ApplyTxn<'_>,
    user: &str,
    device: &str,
    bounds: KeyPackageBounds,
) -> Result<ChatReply, StorageError> {
    if get::<DeviceRecord>(txn, &keys::device(user, device))?.is_none() {
        return Ok(reject("invalid_field", format!("no device {device}")));
    }
    for (k, _) in packages(txn, user, device, bounds.per_device_max as usize + 1)? {
        txn.delete(&k);
    }
    txn.delete(&keys::device(user, device));
    Ok(ChatReply::Devices(Vec::new()))
}

/// The devices of `user` as committed (outside apply): how many KeyPackages each has left
/// at `now_ms`. Reads at most `devices_max` devices and `per_device_max` + 1 packages
/// each.
pub fn device_infos(
    store: &chatd_storage::Storage,
    group: chatd_raftlog::GroupId,
    user: &str,
    bounds: KeyPackageBounds,
    now_ms: u64,
) -> Result<Vec<DeviceInfo>, StorageError> {
    let prefix = keys::device_prefix(user);
    let rows = chatd_raftlog::scan_records(
        store,
        group,
        &prefix,
        &keys::prefix_end(&prefix),
        bounds.devices_max as usize,
    )?;
    let mut out = Vec::new();
    for (k, v) in rows {
        let Some(device) = k.get(prefix.len()..) else {
            continue;
        };
        let device = String::from_utf8_lossy(device).into_owned();
        let record: DeviceRecord = chatd_codec::decode(&v).map_err(crate::corrupt)?;
        let pprefix = keys::key_package_prefix(user, &device);
        let mut available = 0;
        for (_, v) in chatd_raftlog::scan_records(
            store,
            group,
            &pprefix,
            &keys::prefix_end(&pprefix),
            bounds.per_device_max as usize + 1,
        )? {
            let p: KeyPackage = chatd_codec::decode(&v).map_err(crate::corrupt)?;
            if p.expires_ms > now_ms {
                available += 1;
            }
        }
        out.push(DeviceInfo {
            device,
            available,
            last_resort: record.last_resort.is_some_and(|p| p.expires_ms > now_ms),
        });
    }
    Ok(out)
}
