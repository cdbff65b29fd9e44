//! The client protocol of chatd: JSON text frames over WebSocket (`/v1/ws`).
//!
//! Every frame is a JSON object with a `type` field. Client requests that expect an answer
//! carry an `id` (a client-chosen string, ≤ 64 bytes) that the answer repeats. This crate
//! holds the frame types, their limits, the error codes and the close codes; `docs/protocol.md`
//! documents them for client authors. It knows nothing of Raft, storage or sockets.

use serde::{Deserialize, Serialize};

/// Largest WebSocket frame a client may send.
pub const FRAME_BYTES_MAX: usize = 64 * 1024;
/// Largest message text, in bytes of UTF-8 (default; configurable per cluster).
pub const TEXT_BYTES_MAX: usize = 16 * 1024;
/// Longest request id.
pub const REQUEST_ID_BYTES_MAX: usize = 64;
/// Longest client message id (idempotency key).
pub const CLIENT_MSG_ID_BYTES_MAX: usize = 64;
/// Longest chat id.
pub const CHAT_ID_BYTES_MAX: usize = 96;
/// Longest user id.
pub const USER_ID_BYTES_MAX: usize = 32;
/// Most messages in one history page.
pub const HISTORY_PAGE_MAX: u32 = 100;
/// Most chats in one `sync` page, and the page size when a `sync` gives no `limit`. A page
/// reads at most this many entries of the user's chat index and this many chats' states.
pub const SYNC_PAGE_CHATS_MAX: u32 = 100;
/// Most users in one presence query or subscription.
pub const PRESENCE_USERS_MAX: usize = 256;
/// Most members added in one request.
pub const ADD_MEMBERS_MAX: usize = 256;

/// End-to-end encrypted chats (MLS, RFC 9420; docs/protocol.md §20). The server stores and
/// orders opaque MLS messages; these bound what it stores.
pub mod e2e {
    /// Largest MLS message (`data`, and a commit's `welcome`), in bytes before base64. A
    /// frame carries both within [`super::FRAME_BYTES_MAX`], so a commit with a welcome
    /// has about as much again between them.
    pub const DATA_BYTES_MAX: usize = 46_000;
    /// Largest KeyPackage, in bytes before base64.
    pub const KEY_PACKAGE_BYTES_MAX: usize = 2_048;
    /// Most KeyPackages in one upload.
    pub const KEY_PACKAGES_PER_UPLOAD_MAX: usize = 20;
    /// Most unclaimed KeyPackages a device holds on the server (the last-resort one aside).
    pub const KEY_PACKAGES_PER_DEVICE_MAX: usize = 100;
    /// Most devices (with KeyPackages) per user.
    pub const DEVICES_PER_USER_MAX: usize = 5;
    /// Most members (users) of an E2E chat: with every member's devices, what one welcome
    /// (which carries the group's ratchet tree) fits in one frame.
    pub const GROUP_MEMBERS_MAX: usize = 20;
    /// Longest device id (1-32 of A-Z a-z 0-9 _ . : -).
    pub const DEVICE_ID_BYTES_MAX: usize = 32;
    /// Latest expiry of a KeyPackage, from the upload: 90 days.
    pub const KEY_PACKAGE_LIFETIME_MS_MAX: u64 = 90 * 24 * 3600 * 1000;
    /// The kinds of MLS message an `e2e_send` carries.
    pub const KINDS: [&str; 3] = ["application", "commit", "proposal"];
}

/// WebSocket close codes chatd uses (4000–4999 are application codes).
pub mod close {
    /// The token was missing, malformed or wrong.
    pub const UNAUTHORIZED: u16 = 4001;
    /// The client did not authenticate within the deadline.
    pub const AUTH_TIMEOUT: u16 = 4002;
    /// The user already has the maximum number of sessions.
    pub const TOO_MANY_SESSIONS: u16 = 4003;
    /// The user was disabled or its token rotated while the session was open: do not
    /// reconnect with this token.
    pub const REVOKED: u16 = 4004;
    /// The client did not read fast enough: its outbound queue filled. Reconnect and sync.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// A frame larger than `FRAME_BYTES_MAX`, or a binary / non-UTF-8 frame.
    pub const BAD_FRAME: u16 = 4009;
    /// The node is shutting down: reconnect to another node.
    pub const GOING_AWAY: u16 = 1001;
    /// Heartbeats stopped: no frame within the presence TTL.
    pub const IDLE: u16 = 4010;
    /// The node holds `sessions_max` sessions: connect to another node, or later.
    pub const SERVER_FULL: u16 = 4013;
}

/// Error codes in `error` frames (stable strings).
pub mod code {
    pub const MALFORMED: &str = "malformed";
    pub const UNKNOWN_TYPE: &str = "unknown_type";
    pub const INVALID_FIELD: &str = "invalid_field";
    pub const UNAUTHORIZED: &str = "unauthorized";
    pub const FORBIDDEN: &str = "forbidden";
    pub const NOT_MEMBER: &str = "not_member";
    pub const UNKNOWN_CHAT: &str = "unknown_chat";
    pub const UNKNOWN_USER: &str = "unknown_user";
    pub const UNKNOWN_MESSAGE: &str = "unknown_message";
    pub const TOO_LARGE: &str = "too_large";
    pub const RATE_LIMITED: &str = "rate_limited";
    pub const GROUP_FULL: &str = "group_full";
    pub const UNAVAILABLE: &str = "unavailable";
    /// The node holds as many sessions as it may (`sessions_max`).
    pub const SERVER_FULL: &str = "server_full";
    pub const OUTCOME_UNKNOWN: &str = "outcome_unknown";
    pub const INTERNAL: &str = "internal";
    /// An E2E commit for an epoch the chat has left: another commit won it. Process the
    /// chat's log and commit again on the new epoch.
    pub const STALE_EPOCH: &str = "stale_epoch";
    /// A per-user or per-device bound is reached (devices, KeyPackages).
    pub const LIMIT_REACHED: &str = "limit_reached";
}

/// Frames a client sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// First frame when the token is not in the Authorization header.
    Auth { token: String },
    /// Keeps presence alive; answered with `pong`.
    Ping {
        #[serde(default)]
        id: Option<String>,
    },
    /// Sends a message. A retry with the same `client_msg_id` returns the original ack.
    Send {
        id: String,
        chat: String,
        client_msg_id: String,
        text: String,
        #[serde(default)]
        reply_to: Option<u64>,
        /// Files to attach: complete uploads of the sender's (at most
        /// [`MESSAGE_FILES_MAX`]).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        files: Vec<FileRef>,
    },
    /// Replaces the text of one of the sender's messages.
    Edit {
        id: String,
        chat: String,
        seq: u64,
        text: String,
    },
    /// Deletes one of the sender's messages (history keeps a tombstone).
    Delete { id: String, chat: String, seq: u64 },
    /// The direct chat with `user` (created on first use); answers `chat`.
    OpenDirect { id: String, user: String },
    /// Creates a group with the caller and `members`; answers `chat`.
    CreateGroup {
        id: String,
        name: String,
        #[serde(default)]
        members: Vec<String>,
    },
    /// Adds users to a group (members may add).
    AddMembers {
        id: String,
        chat: String,
        users: Vec<String>,
    },
    /// Removes a user from a group (its creator may remove anyone; anyone may remove self).
    RemoveMember {
        id: String,
        chat: String,
        user: String,
    },
    /// Leaves a group.
    Leave { id: String, chat: String },
    /// A page of history: `before` or `after` a seq (exclusive), at most `limit` (≤ 100).
    History {
        id: String,
        chat: String,
        #[serde(default)]
        before: Option<u64>,
        #[serde(default)]
        after: Option<u64>,
        #[serde(default)]
        limit: Option<u32>,
    },
    /// A page of the caller's chats (sorted by chat id) with their last seq, cursors and
    /// unread count: the chats after `after` (exclusive; from the first when absent), at
    /// most `limit` (1–[`SYNC_PAGE_CHATS_MAX`], default [`SYNC_PAGE_CHATS_MAX`]). The answer's
    /// `next` is the `after` of the next page; absent on the last page.
    Sync {
        id: String,
        #[serde(default)]
        after: Option<String>,
        #[serde(default)]
        limit: Option<u32>,
    },
    /// Moves the caller's delivered and/or read cursor forward in a chat.
    Receipt {
        chat: String,
        #[serde(default)]
        delivered: Option<u64>,
        #[serde(default)]
        read: Option<u64>,
    },
    /// Who is online among `users` (≤ 256).
    Presence { id: String, users: Vec<String> },
    /// Subscribes to presence changes of `users` (≤ 256 per request).
    Subscribe { id: String, users: Vec<String> },
    /// The caller is typing in `chat` (ephemeral, rate-limited, never stored).
    Typing { chat: String },
    /// The cursors of every current member of `chat` (the caller must be one): what
    /// `receipt` pushes say from then on, for a client that starts (or restarts) without
    /// them.
    Cursors { id: String, chat: String },
    /// Creates an end-to-end encrypted chat with the caller as its only member (epoch 0);
    /// members join by commit (`e2e_send` with `add`). `direct`: at most two members.
    CreateE2e {
        id: String,
        #[serde(default)]
        name: String,
        #[serde(default)]
        direct: bool,
    },
    /// An opaque MLS message in an E2E chat (base64 `data`), stored in the chat's one order
    /// and answered with `ack` like `send` (same dedup by `client_msg_id`). `kind`:
    /// `application`, `commit` or `proposal`. A `commit` must name the chat's current
    /// `epoch` (else `stale_epoch`), may carry the `welcome` for the devices it adds and
    /// changes the chat's members: `add` joins users, `remove` removes them, in the same
    /// log entry group.
    E2eSend {
        id: String,
        chat: String,
        client_msg_id: String,
        kind: String,
        epoch: u64,
        data: String,
        #[serde(default)]
        welcome: Option<String>,
        #[serde(default)]
        add: Vec<String>,
        #[serde(default)]
        remove: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        files: Vec<FileRef>,
    },
    /// Stores KeyPackages of the caller's `device` (others claim them to add it to E2E
    /// chats); answers `devices` with the device's state.
    KeyPackagesUpload {
        id: String,
        device: String,
        packages: Vec<KeyPackageUpload>,
        /// Replaces the device's last-resort KeyPackage: handed out when no other is left,
        /// and never consumed.
        #[serde(default)]
        last_resort: Option<KeyPackageUpload>,
    },
    /// Takes one KeyPackage of each device of `user` (each handed out once); answers
    /// `key_packages`.
    KeyPackagesClaim { id: String, user: String },
    /// The E2E devices of `user` and their unclaimed KeyPackages; answers `devices`.
    Devices { id: String, user: String },
    /// Forgets the caller's `device` and its KeyPackages; answers `devices`.
    RetireDevice { id: String, device: String },
}

/// A KeyPackage to store: base64 of its MLS encoding and when it expires (ms since the
/// epoch; it is never handed out after).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPackageUpload {
    pub data: String,
    pub expires: u64,
}

/// One device's E2E state on the server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceView {
    pub device: String,
    /// Unclaimed, unexpired KeyPackages (the last-resort one not counted).
    pub available: u64,
    pub last_resort: bool,
}

/// A claimed KeyPackage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimedKeyPackage {
    pub device: String,
    pub data: String,
}

impl ClientFrame {
    /// The request id, for frames that carry one.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            ClientFrame::Send { id, .. }
            | ClientFrame::Edit { id, .. }
            | ClientFrame::Delete { id, .. }
            | ClientFrame::OpenDirect { id, .. }
            | ClientFrame::CreateGroup { id, .. }
            | ClientFrame::AddMembers { id, .. }
            | ClientFrame::RemoveMember { id, .. }
            | ClientFrame::Leave { id, .. }
            | ClientFrame::History { id, .. }
            | ClientFrame::Sync { id, .. }
            | ClientFrame::Presence { id, .. }
            | ClientFrame::Subscribe { id, .. }
            | ClientFrame::Cursors { id, .. }
            | ClientFrame::CreateE2e { id, .. }
            | ClientFrame::E2eSend { id, .. }
            | ClientFrame::KeyPackagesUpload { id, .. }
            | ClientFrame::KeyPackagesClaim { id, .. }
            | ClientFrame::Devices { id, .. }
            | ClientFrame::RetireDevice { id, .. } => Some(id),
            ClientFrame::Ping { id } => id.as_deref(),
            ClientFrame::Auth { .. } | ClientFrame::Receipt { .. } | ClientFrame::Typing { .. } => {
                None
            }
        }
    }
}

/// Files one message may carry, at most.
pub const MESSAGE_FILES_MAX: usize = 10;

/// A file named in a `send`: its id, and optionally what the sender says of it (a `name`
/// to show instead of the uploaded one; `mime` and `size`, checked against the upload).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    pub file_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// A file attached to a message, as its readers see it: download it with
/// `GET /v1/files/{file_id}?chat={chat}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileView {
    pub file_id: String,
    pub name: String,
    pub mime: String,
    pub size: u64,
}

/// A message as clients see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MessageView {
    pub chat: String,
    pub seq: u64,
    pub msg_id: String,
    pub sender: String,
    /// `text`; `join` / `leave` (membership changes; `text` is the user id); `edit` /
    /// `delete` (markers, `reply_to` is the changed seq); `deleted` (a deleted text message).
    pub kind: String,
    pub text: String,
    pub ts: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reply_to: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub edited_ts: Option<u64>,
    /// Attached files (absent when none).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub files: Vec<FileView>,
    /// E2E entries (`mls_*` kinds): the MLS epoch the sender gave (for `mls_commit`, the
    /// epoch it moves the chat from; for `mls_welcome`, the epoch it joins at).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub epoch: Option<u64>,
}

/// One chat in a sync answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatState {
    pub chat: String,
    /// `direct`, `group`, `e2e` (an end-to-end encrypted group) or `e2e_direct`.
    pub kind: String,
    pub name: String,
    pub members: Vec<String>,
    pub last_seq: u64,
    pub delivered: u64,
    pub read: u64,
    pub unread: u64,
}

/// One member's cursors in a chat (answer to `cursors`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorView {
    pub user: String,
    pub delivered: u64,
    pub read: u64,
}

/// Presence of one user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PresenceView {
    pub user: String,
    pub online: bool,
    /// Milliseconds since the epoch; absent if never seen.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_seen: Option<u64>,
}

/// Frames the server sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// Authentication succeeded.
    Ready { user: String, session: String },
    /// Answer to `ping`.
    Pong {
        #[serde(skip_serializing_if = "Option::is_none", default)]
        id: Option<String>,
    },
    /// The send is committed (fsynced on a majority). `duplicate` is true for a retry.
    Ack {
        id: String,
        chat: String,
        seq: u64,
        msg_id: String,
        ts: u64,
        duplicate: bool,
    },
    /// Answer to open_direct / create_group / add_members / remove_member / leave / edit /
    /// delete: the chat and the seq of the last log entry the change appended; if it
    /// appended none (a direct chat that existed, members already in), the chat's last seq.
    Done { id: String, chat: String, seq: u64 },
    /// A history page, in ascending seq order.
    History {
        id: String,
        chat: String,
        messages: Vec<MessageView>,
        /// True if more messages exist in the paging direction.
        more: bool,
    },
    /// Answer to sync: one page of chats, sorted by chat id. `next` is present when more
    /// chats may follow: send `sync` again with `after` = `next`.
    Chats {
        id: String,
        chats: Vec<ChatState>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        next: Option<String>,
    },
    /// Answer to presence.
    PresenceList {
        id: String,
        users: Vec<PresenceView>,
    },
    /// A new message (or membership event) in one of the caller's chats.
    Message { message: MessageView },
    /// A message was edited or deleted; `message` is its new state.
    Updated { message: MessageView },
    /// Someone's cursors moved in a chat the caller is in.
    Receipt {
        chat: String,
        user: String,
        delivered: u64,
        read: u64,
    },
    /// A subscribed user's presence changed.
    Presence { presence: PresenceView },
    /// Someone is typing.
    Typing { chat: String, user: String },
    /// Answer to cursors: every current member's cursors in `chat`, sorted by user.
    Cursors {
        id: String,
        chat: String,
        cursors: Vec<CursorView>,
    },
    /// Answer to key_packages_upload, devices and retire_device: E2E devices of `user`.
    Devices {
        id: String,
        user: String,
        devices: Vec<DeviceView>,
    },
    /// Answer to key_packages_claim: one KeyPackage per device of `user` that had one.
    KeyPackages {
        id: String,
        user: String,
        packages: Vec<ClaimedKeyPackage>,
    },
    /// A request failed; nothing changed. `id` is the request's id when it had one.
    Error {
        #[serde(skip_serializing_if = "Option::is_none", default)]
        id: Option<String>,
        code: String,
        message: String,
    },
}

/// Why a text frame is not a valid client frame.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, (&'static str, String)> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| (code::MALFORMED, format!("not JSON: {e}")))?;
    let Some(kind) = value.get("type").and_then(|t| t.as_str()) else {
        return Err((code::MALFORMED, "missing string field \"type\"".into()));
    };
    const KNOWN: &[&str] = &[
        "auth",
        "ping",
        "send",
        "edit",
        "delete",
        "open_direct",
        "create_group",
        "add_members",
        "remove_member",
        "leave",
        "history",
        "sync",
        "receipt",
        "presence",
        "subscribe",
        "typing",
        "cursors",
        "create_e2e",
        "e2e_send",
        "key_packages_upload",
        "key_packages_claim",
        "devices",
        "retire_device",
    ];
    if !KNOWN.contains(&kind) {
        return Err((code::UNKNOWN_TYPE, format!("unknown frame type {kind:?}")));
    }
    serde_json::from_value(value).map_err(|e| (code::INVALID_FIELD, e.to_string()))
}

/// The request id of a frame that failed to parse, if it had a string `id`, for the error.
pub fn request_id_of(text: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    v.get("id")?
        .as_str()
        .filter(|s| s.len() <= REQUEST_ID_BYTES_MAX)
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn golden_frames() {
        let f = parse_client_frame(
            r#"{"type":"send","id":"1","chat":"d:alice:bob","client_msg_id":"m1","text":"hi"}"#,
        )
        .unwrap();
        assert_eq!(
            f,
            ClientFrame::Send {
                id: "1".into(),
                chat: "d:alice:bob".into(),
                client_msg_id: "m1".into(),
                text: "hi".into(),
                reply_to: None,
                files: Vec::new(),
            }
        );
        let ack = ServerFrame::Ack {
            id: "1".into(),
            chat: "d:alice:bob".into(),
            seq: 1,
            msg_id: "d:alice:bob/1".into(),
            ts: 5,
            duplicate: false,
        };
        assert_eq!(
            serde_json::to_string(&ack).unwrap(),
            r#"{"type":"ack","id":"1","chat":"d:alice:bob","seq":1,"msg_id":"d:alice:bob/1","ts":5,"duplicate":false}"#
        );
        let f = parse_client_frame(r#"{"type":"cursors","id":"2","chat":"g:1"}"#).unwrap();
        assert_eq!(
            f,
            ClientFrame::Cursors {
                id: "2".into(),
                chat: "g:1".into()
            }
        );
        assert_eq!(f.request_id(), Some("2"));
        let answer = ServerFrame::Cursors {
            id: "2".into(),
            chat: "g:1".into(),
            cursors: vec![CursorView {
                user: "bob".into(),
                delivered: 7,
                read: 5,
            }],
        };
        assert_eq!(
            serde_json::to_string(&answer).unwrap(),
            r#"{"type":"cursors","id":"2","chat":"g:1","cursors":[{"user":"bob","delivered":7,"read":5}]}"#
        );
    }

    #[test]
    fn sync_pages_are_optional_and_next_is_omitted_on_the_last_page() {
        // A client that knows nothing of paging still sends a valid frame (first page).
        assert_eq!(
            parse_client_frame(r#"{"type":"sync","id":"1"}"#).unwrap(),
            ClientFrame::Sync {
                id: "1".into(),
                after: None,
                limit: None
            }
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"sync","id":"2","after":"d:a:b","limit":100}"#).unwrap(),
            ClientFrame::Sync {
                id: "2".into(),
                after: Some("d:a:b".into()),
                limit: Some(SYNC_PAGE_CHATS_MAX)
            }
        );
        let last = ServerFrame::Chats {
            id: "1".into(),
            chats: vec![],
            next: None,
        };
        assert_eq!(
            serde_json::to_string(&last).unwrap(),
            r#"{"type":"chats","id":"1","chats":[]}"#
        );
        let more = ServerFrame::Chats {
            id: "1".into(),
            chats: vec![],
            next: Some("g:00".into()),
        };
        assert_eq!(
            serde_json::to_string(&more).unwrap(),
            r#"{"type":"chats","id":"1","chats":[],"next":"g:00"}"#
        );
    }

    #[test]
    fn bad_frames_get_distinct_codes() {
        assert_eq!(parse_client_frame("{").unwrap_err().0, code::MALFORMED);
        assert_eq!(parse_client_frame("[1]").unwrap_err().0, code::MALFORMED);
        assert_eq!(
            parse_client_frame(r#"{"type":"fly"}"#).unwrap_err().0,
            code::UNKNOWN_TYPE
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"send","id":"1"}"#)
                .unwrap_err()
                .0,
            code::INVALID_FIELD
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"history","id":"1","chat":"c","limit":"x"}"#)
                .unwrap_err()
                .0,
            code::INVALID_FIELD
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"ping","extra":1}"#)
                .unwrap_err()
                .0,
            code::INVALID_FIELD
        );
        assert_eq!(
            request_id_of(r#"{"type":"send","id":"7"}"#).as_deref(),
            Some("7")
        );
    }
}
