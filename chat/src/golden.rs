//! Golden bytes of the chat state machine's persisted records, its replies and events, and
//! its key layout inside a partition. Each test builds a value with every field set, checks
//! the exact encoding and decodes it back. A failure here means a format changed: that
//! needs a new format version (and a reader of the old one), not a new golden value.
//!
//! Not pinned here: `DedupRecord`, `ChatCommand::Send` and the dedup keys (their format is
//! pinned next to the code that changes them).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use crate::{
    keys, ChatCommand, ChatEvent, ChatKind, ChatRecord, ChatReply, Cursor, LogRecord,
    MessageRecord, ReceiptUpdate, Span,
};

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Asserts `value` encodes to `golden` (hex) and decodes back equal.
pub(crate) fn pin<T>(value: &T, golden: &str)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let golden: String = golden.split_whitespace().collect();
    let bytes = chatd_codec::encode(value).unwrap();
    assert_eq!(hex(&bytes), golden, "encoding of {value:?}");
    let back: T = chatd_codec::decode(&bytes).unwrap();
    assert_eq!(&back, value);
}

fn message() -> MessageRecord {
    MessageRecord {
        chat: "g:1".into(),
        seq: 300,
        sender: "al".into(),
        kind: "text".into(),
        text: "hi".into(),
        ts: 1_700_000_000_000,
        reply_to: Some(7),
        target: Some(5),
        edited_ts: Some(9),
        files: Vec::new(),
    }
}

fn attachment() -> crate::Attachment {
    crate::Attachment {
        file_id: "f".into(),
        name: "n".into(),
        mime: "m".into(),
        size: 3,
    }
}
// "f" · "n" · "m" · 3
const ATTACHMENT: &str = "0166016e016d03";

#[test]
fn golden_message_record() {
    // version 1 · "g:1" · seq 300 (varint fb 2c 01) · "al" · "text" · "hi" ·
    // ts 1_700_000_000_000 (fd + u64 LE) · Some(7) · Some(5) · Some(9) · no files
    pin(
        &message(),
        "0103673a31fb2c0102616c04746578740268\
         69fd0068e5cf8b010000010701050109 00",
    );
    let mut with_file = message();
    with_file.files.push(attachment());
    pin(
        &with_file,
        &format!(
            "0103673a31fb2c0102616c04746578740268\
             69fd0068e5cf8b010000010701050109 01{ATTACHMENT}"
        ),
    );
}

#[test]
fn messages_stored_before_attachments_are_read_without_files() {
    // The layout of log format 1 (no `files`), as stored by earlier builds.
    let old: String = "0103673a31fb2c0102616c04746578740268\
                       69fd0068e5cf8b010000010701050109"
        .split_whitespace()
        .collect();
    let bytes: Vec<u8> = (0..old.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&old[i..i + 2], 16).unwrap())
        .collect();
    assert_eq!(crate::decode_stored_message(&bytes).unwrap(), message());
    // The new layout is read as it is, and neither is mistaken for the other.
    let mut with_file = message();
    with_file.files.push(attachment());
    let new = chatd_codec::encode(&with_file).unwrap();
    assert_eq!(crate::decode_stored_message(&new).unwrap(), with_file);
    // Bytes of neither layout are refused, not guessed at.
    assert!(crate::decode_stored_message(&bytes[..bytes.len() - 1]).is_err());
    let mut extra = new.clone();
    extra.push(0);
    assert!(crate::decode_stored_message(&extra).is_err());
}

#[test]
fn golden_chat_record() {
    let mut members = BTreeMap::new();
    members.insert(
        "a".to_string(),
        Span {
            from: 1,
            to: Some(4),
        },
    );
    members.insert("b".to_string(), Span { from: 2, to: None });
    let record = ChatRecord {
        chat: "g:1".into(),
        kind: ChatKind::Group,
        name: "team".into(),
        creator: "a".into(),
        members,
        last_seq: 6,
        created_ts: 1000,
    };
    // "g:1" · Group (1) · "team" · "a" · 2 members: "a" {1, Some(4)}, "b" {2, None} ·
    // last_seq 6 · created_ts 1000 (fb e8 03)
    pin(
        &record,
        "0103673a3101047465616d016102016101010401620200\
         06fbe803",
    );
    let direct = ChatRecord {
        kind: ChatKind::Direct,
        ..record
    };
    assert_eq!(
        &hex(&chatd_codec::encode(&direct).unwrap())[..12],
        "0103673a3100"
    );
}

#[test]
fn golden_cursor_and_log_record() {
    pin(
        &Cursor {
            delivered: 260,
            read: 3,
        },
        "01fb040103",
    );
    pin(
        &LogRecord {
            seq: 2,
            index: 9,
            payload: vec![0xde, 0xad],
        },
        "01020902dead",
    );
}

#[test]
fn golden_replies() {
    pin(
        &ChatReply::Acked {
            seq: 2,
            ts: 5,
            duplicate: true,
        },
        "0100020501",
    );
    pin(&ChatReply::Done { seq: 3 }, "010103");
    pin(
        &ChatReply::Rejected {
            code: "forbidden".into(),
            message: "no".into(),
        },
        "010209666f7262696464656e026e6f",
    );
    pin(&ChatReply::Appended { seq: 4 }, "010304");
    pin(
        &ChatReply::Content {
            canonical: Some("f".into()),
        },
        "0104 01 0166",
    );
}

#[test]
fn golden_events() {
    let recipients = vec!["a".to_string(), "b".to_string()];
    // The message as in `golden_message_record`, no files (log format 2: the events
    // between nodes carry the message's attachments).
    let m = "03673a31fb2c0102616c0474657874026869fd0068e5cf8b010000010701050109 00";
    pin(
        &ChatEvent::Message {
            message: message(),
            recipients: recipients.clone(),
        },
        &format!("0100{m}0201610162"),
    );
    pin(
        &ChatEvent::Updated {
            message: message(),
            recipients: recipients.clone(),
        },
        &format!("0101{m}0201610162"),
    );
    pin(
        &ChatEvent::Receipt {
            chat: "g:1".into(),
            user: "b".into(),
            cursor: Cursor {
                delivered: 4,
                read: 3,
            },
            recipients,
        },
        "010203673a31016204030201610162",
    );
}

#[test]
fn golden_commands_other_than_send() {
    pin(
        &ChatCommand::Edit {
            chat: "c".into(),
            sender: "a".into(),
            seq: 3,
            text: "t".into(),
            ts: 5,
        },
        "010201630161030174 05",
    );
    pin(
        &ChatCommand::Delete {
            chat: "c".into(),
            sender: "a".into(),
            seq: 3,
            ts: 5,
        },
        "01030163016103 05",
    );
    pin(
        &ChatCommand::OpenDirect {
            chat: "d:a:b".into(),
            a: "a".into(),
            b: "b".into(),
            ts: 5,
        },
        "010405643a613a620161016205",
    );
    pin(
        &ChatCommand::CreateGroup {
            chat: "g:1".into(),
            creator: "a".into(),
            name: "n".into(),
            members: vec!["b".into()],
            members_max: 256,
            ts: 5,
        },
        "010503673a310161016e010162fb000105",
    );
    pin(
        &ChatCommand::AddMembers {
            chat: "g:1".into(),
            by: "a".into(),
            users: vec!["c".into(), "d".into()],
            members_max: 4,
            ts: 5,
        },
        "010603673a31016102016301640405",
    );
    pin(
        &ChatCommand::RemoveMember {
            chat: "g:1".into(),
            by: "a".into(),
            user: "c".into(),
            ts: 5,
        },
        "010703673a3101610163 05",
    );
    pin(
        &ChatCommand::Receipts(vec![ReceiptUpdate {
            chat: "c".into(),
            user: "u".into(),
            delivered: Some(4),
            read: None,
        }]),
        "010801016301750104 00",
    );
    pin(
        &ChatCommand::IndexChat {
            user: "u".into(),
            chat: "c".into(),
        },
        "010901750163",
    );
    pin(
        &ChatCommand::FileBegin(file_record()),
        &format!("010b{FILE_RECORD}"),
    );
    pin(
        &ChatCommand::FileProgress {
            file: "f".into(),
            offset: 3,
        },
        "010c016603",
    );
    pin(
        &ChatCommand::FileComplete {
            file: "f".into(),
            sha256: "h".into(),
        },
        "010d01660168",
    );
    pin(&ChatCommand::FileDrop { file: "f".into() }, "010e0166");
    // "c" · "s" · "k" · "t" · None · ts 1 · window 2 · one attachment
    pin(
        &ChatCommand::SendWithFiles {
            chat: "c".into(),
            sender: "s".into(),
            client_msg_id: "k".into(),
            text: "t".into(),
            reply_to: None,
            ts: 1,
            dedup_window_ms: 2,
            files: vec![attachment()],
        },
        &format!("010f 0163 0173 016b 0174 00 01 02 01{ATTACHMENT}"),
    );
    pin(
        &ChatCommand::FileAttach {
            file: "f".into(),
            chat: "c".into(),
            sender: "s".into(),
            ts: 4,
        },
        "0110 0166 0163 0173 04",
    );
    pin(
        &ChatCommand::FileDetach {
            file: "f".into(),
            chat: "c".into(),
            attached_ms: 4,
        },
        "0111 0166 0163 04",
    );
    pin(
        &ChatCommand::FileCollect {
            file: "f".into(),
            ts: 9,
            upload_ttl_ms: 2,
            unattached_ttl_ms: 3,
        },
        "0112 0166 09 02 03",
    );
    pin(
        &ChatCommand::FileContent {
            file: "f".into(),
            content: crate::Content::Alias("g".into()),
        },
        "0113 0166 02 0167",
    );
    pin(
        &ChatCommand::FileContent {
            file: "f".into(),
            content: crate::Content::Canonical,
        },
        "0113 0166 01",
    );
    pin(
        &ChatCommand::ContentHold {
            sha256: "h".into(),
            file: "f".into(),
        },
        "0114 0168 0166",
    );
    pin(
        &ChatCommand::ContentRelease {
            sha256: "h".into(),
            file: "f".into(),
            ts: 7,
        },
        "0115 0168 0166 07",
    );
    pin(
        &ChatCommand::QuotaCharge {
            user: "u".into(),
            file: "f".into(),
            bytes: 5,
            quota_bytes: 9,
            ts: 7,
        },
        "0116 0175 0166 05 09 07",
    );
    pin(
        &ChatCommand::QuotaRefund {
            user: "u".into(),
            file: "f".into(),
        },
        "0117 0175 0166",
    );
    // What stays beside the commands: a file's state, a content entry, a charge, a use.
    pin(
        &crate::FileState {
            content: crate::Content::Canonical,
            released_ms: Some(3),
        },
        "01 01 0103",
    );
    pin(
        &crate::content::ContentEntry {
            canonical: "f".into(),
            holders: 2,
        },
        "01 0166 02",
    );
    pin(&crate::quota::Charge { bytes: 5, ts: 7 }, "01 05 07");
    pin(&crate::quota::QuotaUsage { bytes: 5, files: 1 }, "01 05 01");
}

pub(crate) fn file_record() -> crate::FileRecord {
    crate::FileRecord {
        id: "f".into(),
        owner: "o".into(),
        size: 5,
        mime: "m".into(),
        name: "n".into(),
        chunk_bytes: 2,
        offset: 1,
        sha256: Some("h".into()),
        created_ms: 9,
    }
}
// "f" · "o" · 5 · "m" · "n" · 2 · 1 · Some("h") · 9
pub(crate) const FILE_RECORD: &str = "0166016f05016d016e0201010168 09";

#[test]
fn golden_key_layout() {
    assert_eq!(keys::LOG_COUNT, b"n");
    assert_eq!(keys::log_record(258), b"l\0\0\0\0\0\0\x01\x02".to_vec());
    assert_eq!(keys::chat("g:1"), b"c\0g:1".to_vec());
    assert_eq!(
        keys::message("g:1", 258),
        b"m\0g:1\0\0\0\0\0\0\0\x01\x02".to_vec()
    );
    assert_eq!(keys::cursor("g:1", "al"), b"r\0g:1\0al".to_vec());
    assert_eq!(keys::cursor_prefix("g:1"), b"r\0g:1\0".to_vec());
    assert_eq!(keys::user_chat("al", "g:1"), b"u\0al\0g:1".to_vec());
    assert_eq!(keys::user_chat_prefix("al"), b"u\0al\0".to_vec());
    assert_eq!(keys::prefix_end(b"r\0g:1\0"), b"r\0g:1\0\xff".to_vec());
    assert_eq!(keys::file("f:1"), b"f\0f:1".to_vec());
    assert_eq!(
        keys::attachment("g:1", "f:1", 258),
        b"a\0g:1\0f:1\0\0\0\0\0\0\0\x01\x02".to_vec()
    );
    assert_eq!(
        keys::attachment_prefix("g:1", "f:1"),
        b"a\0g:1\0f:1\0".to_vec()
    );
    assert_eq!(keys::file_state("f:1"), b"fs\0f:1".to_vec());
    assert_eq!(keys::content("ab"), b"ci\0ab".to_vec());
    assert_eq!(keys::content_holder("ab", "f:1"), b"ch\0ab\0f:1".to_vec());
    assert_eq!(keys::content_released("ab", "f:1"), b"ct\0ab\0f:1".to_vec());
    assert_eq!(
        keys::content_released_expiry(258, b"ct\0ab\0f:1"),
        b"cx\0\0\0\0\0\0\0\x01\x02ct\0ab\0f:1".to_vec()
    );
    assert_eq!(keys::quota_usage("al"), b"qu\0al".to_vec());
    assert_eq!(keys::quota_charge("al", "f:1"), b"qf\0al\0f:1".to_vec());
    // Messages of a chat sort by seq (big endian), and stay inside the chat's prefix.
    assert!(keys::message("g:1", 255) < keys::message("g:1", 256));
    assert!(keys::message("g:1", u64::MAX).starts_with(b"m\0g:1\0"));
}
