//! Records of the chat state machine (encoded with chatd-codec; golden tests in lib tests).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Direct (two users, fixed) or group; E2E chats (appended: the codec writes variant
/// indexes) carry opaque MLS messages and change members by commit only (`crate::e2e`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChatKind {
    Direct,
    Group,
    /// An end-to-end encrypted group.
    E2eGroup,
    /// An end-to-end encrypted chat of at most two members.
    E2eDirect,
}

impl ChatKind {
    /// True for the E2E kinds.
    pub fn is_e2e(self) -> bool {
        matches!(self, ChatKind::E2eGroup | ChatKind::E2eDirect)
    }
    /// The protocol's name of the kind (`ChatState.kind`).
    pub fn as_str(self) -> &'static str {
        match self {
            ChatKind::Direct => "direct",
            ChatKind::Group => "group",
            ChatKind::E2eGroup => "e2e",
            ChatKind::E2eDirect => "e2e_direct",
        }
    }
}

/// The seqs a member may see: from its join entry to its leave entry (inclusive).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub from: u64,
    pub to: Option<u64>,
}

impl Span {
    /// True if `seq` is inside the span.
    pub fn contains(&self, seq: u64) -> bool {
        seq >= self.from && self.to.is_none_or(|t| seq <= t)
    }
}

/// A chat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatRecord {
    pub chat: String,
    pub kind: ChatKind,
    pub name: String,
    pub creator: String,
    /// Current and former members with their spans.
    pub members: BTreeMap<String, Span>,
    pub last_seq: u64,
    pub created_ts: u64,
}

impl ChatRecord {
    /// True if `user` is a member now.
    pub fn is_member(&self, user: &str) -> bool {
        self.members.get(user).is_some_and(|s| s.to.is_none())
    }
    /// Current members.
    pub fn current_members(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|(_, s)| s.to.is_none())
            .map(|(u, _)| u.clone())
            .collect()
    }
    /// Members (current or former) who may see `seq`.
    pub fn members_at(&self, seq: u64) -> Vec<String> {
        self.members
            .iter()
            .filter(|(_, s)| s.contains(seq))
            .map(|(u, _)| u.clone())
            .collect()
    }
    /// The span `user` may read, if any.
    pub fn span_of(&self, user: &str) -> Option<Span> {
        self.members.get(user).copied()
    }
}

/// An entry of a chat's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRecord {
    pub chat: String,
    pub seq: u64,
    pub sender: String,
    /// `text`, `join`, `leave`, `edit`, `delete`, or `deleted` (a deleted text or
    /// `mls_application` message); in E2E chats `mls_application`, `mls_commit`,
    /// `mls_proposal`, `mls_welcome`, whose `text` is the sender's base64 of the opaque
    /// MLS message and whose `target` is the MLS epoch (`crate::e2e`).
    pub kind: String,
    pub text: String,
    pub ts: u64,
    pub reply_to: Option<u64>,
    /// For `edit` and `delete` entries: the seq they change.
    pub target: Option<u64>,
    pub edited_ts: Option<u64>,
    /// Files attached to a `text` message (docs/files.md); empty for every other kind and
    /// once the message is deleted. Added in log format 2: a record stored before has no
    /// such field and is read by [`decode_stored_message`] as one without files.
    pub files: Vec<Attachment>,
}

/// A file attached to a message: what its readers see of it (the file's record, in the
/// file's home partition, has the rest).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub file_id: String,
    pub name: String,
    pub mime: String,
    pub size: u64,
}

/// A message as stored before attachments (log format 1): [`MessageRecord`] without its
/// last field.
#[derive(Deserialize)]
struct MessageRecordV1 {
    chat: String,
    seq: u64,
    sender: String,
    kind: String,
    text: String,
    ts: u64,
    reply_to: Option<u64>,
    target: Option<u64>,
    edited_ts: Option<u64>,
}

/// Decodes a stored message of either layout. The two never overlap: bytes of the old
/// layout end where the new one still expects the attachments' length, and bytes of the
/// new layout have that length left over after the old one.
pub fn decode_stored_message(bytes: &[u8]) -> Result<MessageRecord, chatd_codec::CodecError> {
    match chatd_codec::decode::<MessageRecord>(bytes) {
        Ok(m) => Ok(m),
        Err(e) => match chatd_codec::decode::<MessageRecordV1>(bytes) {
            Ok(m) => Ok(MessageRecord {
                chat: m.chat,
                seq: m.seq,
                sender: m.sender,
                kind: m.kind,
                text: m.text,
                ts: m.ts,
                reply_to: m.reply_to,
                target: m.target,
                edited_ts: m.edited_ts,
                files: Vec::new(),
            }),
            Err(_) => Err(e),
        },
    }
}

impl MessageRecord {
    /// The globally unique id of the entry.
    pub fn msg_id(&self) -> String {
        format!("{}/{}", self.chat, self.seq)
    }
}

/// A send's idempotency record: (chat, sender, client_msg_id) → where it went, until
/// `expires_ms` (the send's log time plus the dedup window). Expiry is judged against the
/// `ts` of the command being applied, which is in the log, so every replica agrees.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupRecord {
    pub seq: u64,
    pub ts: u64,
    pub expires_ms: u64,
}

impl DedupRecord {
    /// True if the record no longer answers retries at log time `now_ms`.
    pub fn expired_at(&self, now_ms: u64) -> bool {
        self.expires_ms <= now_ms
    }
}

/// A member's delivered and read cursors in a chat; only ever move forward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub delivered: u64,
    pub read: u64,
}

/// A record of the foundation's opaque log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    pub seq: u64,
    pub index: u64,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}
