//! Golden bytes of the node-to-node service (`NODE_SERVICE_TAG` calls): every
//! `NodeRequest` and `NodeReply` variant, the chat queries and their answers, and the
//! ephemeral items gateways exchange, every field set. Nodes of one cluster may run
//! different builds during a rolling upgrade: a failure here means they would no longer
//! understand each other, which needs a new format version, not a new golden value.

#![allow(clippy::unwrap_used)]

use chatd_chat::{ChatEvent, Cursor, MessageRecord};
use chatd_proto::ChatState;
use chatd_raftlog::GroupStatus;
use serde::{de::DeserializeOwned, Serialize};

use crate::gateway::Ephemeral;
use crate::node::{NodeReply, NodeRequest, NodeStatus, NODE_SERVICE_TAG};
use crate::queries::{ChatInspection, ChatQuery, ChatQueryReply};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Asserts `value` encodes to `golden` (hex, spaces ignored) and that the decoded value
/// encodes the same (these types have no `PartialEq`).
fn pin<T: Serialize + DeserializeOwned + std::fmt::Debug>(value: &T, golden: &str) {
    let golden: String = golden.split_whitespace().collect();
    let bytes = chatd_codec::encode(value).unwrap();
    assert_eq!(hex(&bytes), golden, "encoding of {value:?}");
    let back: T = chatd_codec::decode(&bytes).unwrap();
    assert_eq!(hex(&chatd_codec::encode(&back).unwrap()), golden);
}

fn message() -> MessageRecord {
    MessageRecord {
        chat: "c".into(),
        seq: 2,
        sender: "a".into(),
        kind: "text".into(),
        text: "hi".into(),
        ts: 7,
        reply_to: Some(1),
        target: Some(1),
        edited_ts: Some(8),
        files: vec![chatd_chat::Attachment {
            file_id: "f".into(),
            name: "n".into(),
            mime: "m".into(),
            size: 3,
        }],
    }
}
// "c" · 2 · "a" · "text" · "hi" · 7 · Some(1) · Some(1) · Some(8) · one file ("f" · "n" ·
// "m" · 3): messages carry their attachments between nodes since log format 2
const MESSAGE: &str = "0163 02 0161 0474657874 026869 07 0101 0101 0108 01 0166016e016d03";

#[test]
fn golden_node_requests() {
    assert_eq!(NODE_SERVICE_TAG, 0x02);
    pin(
        &NodeRequest::Propose {
            group: 3,
            command: vec![0xab, 0xcd],
        },
        "01 00 03 02abcd",
    );
    pin(&NodeRequest::Status, "01 01");
    pin(
        &NodeRequest::Query {
            group: 3,
            query: ChatQuery::Members { chat: "c".into() },
        },
        "01 02 03 03 0163",
    );
    pin(
        &NodeRequest::Deliver {
            events: vec![
                ChatEvent::Message {
                    message: message(),
                    recipients: vec!["a".into()],
                },
                ChatEvent::Receipt {
                    chat: "c".into(),
                    user: "b".into(),
                    cursor: Cursor {
                        delivered: 2,
                        read: 1,
                    },
                    recipients: vec!["a".into()],
                },
            ],
        },
        &format!("01 03 02 00 {MESSAGE} 01 0161 02 0163 0162 0201 01 0161"),
    );
    pin(
        &NodeRequest::Ephemeral {
            items: vec![
                Ephemeral::Typing {
                    chat: "c".into(),
                    user: "a".into(),
                    recipients: vec!["b".into()],
                },
                Ephemeral::Presence {
                    node: 2,
                    user: "a".into(),
                    online: true,
                    at_ms: 9,
                },
                Ephemeral::Online {
                    node: 2,
                    users: vec!["a".into(), "b".into()],
                },
            ],
        },
        "01 04 03 00 0163 0161 01 0162 01 02 0161 01 09 02 02 02 0161 0162",
    );
    pin(
        &NodeRequest::Ephemeral {
            items: vec![Ephemeral::Roster {
                node: 2,
                round: 7,
                part: 0,
                parts: 1,
                users: vec!["a".into()],
            }],
        },
        "01 04 01 03 02 07 00 01 01 0161",
    );
    pin(
        &NodeRequest::Presence {
            users: vec!["a".into()],
        },
        "01 05 01 0161",
    );
    pin(&NodeRequest::Elect { group: 4 }, "01 06 04");
    pin(
        &NodeRequest::HoldElections { group: 4, ms: 1500 },
        "01 07 04 fb dc 05",
    );
    pin(
        &NodeRequest::Join {
            info: chatd_membership::NodeInfo {
                id: 4,
                cluster_addr: "a".into(),
                api_addr: "b".into(),
            },
        },
        "01 08 04 01 61 01 62",
    );
    pin(
        &NodeRequest::AddLearner {
            group: 3,
            node: 4,
            addr: "a".into(),
        },
        "01 09 03 04 01 61",
    );
    pin(
        &NodeRequest::ChangeVoters {
            group: 3,
            voters: vec![1, 4],
            drop: vec![5],
            catch_up_ms: 100,
        },
        "01 0a 03 02 01 04 01 05 64",
    );
    pin(
        &NodeRequest::TransferLeadership { group: 3, to: 2 },
        "01 0b 03 02",
    );
    pin(
        &NodeRequest::StatusPage {
            after: Some(9),
            limit: 100,
        },
        "01 0c 01 09 64",
    );
    pin(
        &NodeRequest::PutChunk {
            group: 3,
            file: "f:1".into(),
            index: 2,
            bytes: vec![0xab],
        },
        "01 0d 03 03663a31 02 01ab",
    );
    pin(
        &NodeRequest::GetChunk {
            group: 3,
            file: "f:1".into(),
            index: 2,
        },
        "01 0e 03 03663a31 02",
    );
    pin(&NodeRequest::RepairFiles { group: 3 }, "01 0f 03");
}

#[test]
fn golden_chat_queries() {
    pin(
        &ChatQuery::History {
            chat: "c".into(),
            user: "a".into(),
            before: Some(9),
            after: Some(2),
            limit: 50,
        },
        "01 00 0163 0161 0109 0102 32",
    );
    pin(
        &ChatQuery::Summaries {
            chats: vec!["c".into()],
            user: "a".into(),
        },
        "01 01 01 0163 0161",
    );
    pin(
        &ChatQuery::UserChats {
            user: "a".into(),
            after: Some("c".into()),
            limit: 10,
        },
        "01 02 0161 01 0163 0a",
    );
    pin(&ChatQuery::Members { chat: "c".into() }, "01 03 0163");
    pin(&ChatQuery::Inspect { chat: "c".into() }, "01 04 0163");
    pin(&ChatQuery::File { file: "f".into() }, "01 05 0166");
    pin(
        &ChatQuery::FileAccess {
            chat: "c".into(),
            file: "f".into(),
            user: "u".into(),
        },
        "01 06 0163 0166 0175",
    );
    pin(
        &ChatQuery::FileCarried {
            chat: "c".into(),
            file: "f".into(),
        },
        "01 07 0163 0166",
    );
    pin(&ChatQuery::FileEntry { file: "f".into() }, "01 08 0166");
    pin(
        &ChatQuery::ContentOf {
            sha256: "h".into(),
            file: "f".into(),
        },
        "01 09 0168 0166",
    );
    pin(&ChatQuery::Quota { user: "u".into() }, "01 0a 0175");
    pin(
        &ChatQuery::Cursors {
            chat: "c".into(),
            user: "u".into(),
        },
        "01 0b 0163 0175",
    );
    pin(
        &ChatQuery::Devices {
            user: "u".into(),
            bounds: chatd_chat::e2e::KeyPackageBounds {
                per_device_max: 3,
                devices_max: 2,
            },
            now_ms: 300,
        },
        "01 0c 0175 03 02 fb2c01",
    );
}

#[test]
fn golden_node_replies() {
    pin(
        &NodeReply::Proposed {
            index: 300,
            response: vec![1, 2],
        },
        "01 00 fb2c01 020102",
    );
    pin(&NodeReply::NotLeader { leader: Some(2) }, "01 01 0102");
    pin(
        &NodeReply::Status(NodeStatus {
            node_id: 1,
            groups: vec![GroupStatus {
                group: 3,
                role: "Leader".into(),
                leader: Some(1),
                term: 2,
                last_index: 9,
                committed_index: 8,
                applied_index: 7,
                purged_index: Some(4),
                snapshot_index: Some(5),
                voters: vec![1, 2],
            }],
        }),
        "01 02 01 01 03 064c6561646572 0101 02 09 08 07 0104 0105 020102",
    );
    pin(
        &NodeReply::QueryResult(ChatQueryReply::History {
            messages: vec![message()],
            more: true,
        }),
        &format!("01 03 00 01 {MESSAGE} 01"),
    );
    pin(&NodeReply::Delivered, "01 04");
    pin(
        &NodeReply::Presence(vec![("a".into(), true, Some(9))]),
        "01 05 01 0161 01 0109",
    );
    pin(&NodeReply::Overloaded("q".into()), "01 06 0171");
    pin(&NodeReply::Failed("x".into()), "01 07 0178");
    pin(&NodeReply::Refused("x".into()), "01 08 0178");
    pin(
        &NodeReply::Chunk(Some(serde_bytes::ByteBuf::from(vec![0xab]))),
        "01 09 01 01ab",
    );
    pin(&NodeReply::Chunk(None), "01 09 00");
    pin(&NodeReply::FilesMissing(3), "01 0a 03");
}

#[test]
fn golden_chat_query_replies() {
    pin(
        &ChatQueryReply::Summaries(vec![ChatState {
            chat: "g:1".into(),
            kind: "group".into(),
            name: "n".into(),
            members: vec!["a".into()],
            last_seq: 9,
            delivered: 8,
            read: 7,
            unread: 2,
        }]),
        "01 01 01 03673a31 0567726f7570 016e 01 0161 09 08 07 02",
    );
    pin(
        &ChatQueryReply::UserChats(vec!["c".into()]),
        "01 02 01 0163",
    );
    pin(
        &ChatQueryReply::Members(Some(vec!["a".into()])),
        "01 03 01 01 0161",
    );
    pin(
        &ChatQueryReply::Inspection(Some(ChatInspection {
            chat: "c".into(),
            kind: "group".into(),
            name: "n".into(),
            creator: "a".into(),
            created_ts: 1,
            last_seq: 3,
            members: vec![("a".into(), 1, None), ("b".into(), 2, Some(3))],
            cursors: vec![("b".into(), 3, 2)],
        })),
        "01 04 01 0163 0567726f7570 016e 0161 01 03 02 0161 01 00 0162 02 0103 01 0162 03 02",
    );
    pin(
        &ChatQueryReply::Rejected {
            code: "internal".into(),
            message: "m".into(),
        },
        "01 05 08696e7465726e616c 016d",
    );
    pin(&ChatQueryReply::File(None), "01 06 00");
    pin(
        &ChatQueryReply::File(Some(chatd_chat::FileRecord {
            id: "f".into(),
            owner: "o".into(),
            size: 5,
            mime: "m".into(),
            name: "n".into(),
            chunk_bytes: 2,
            offset: 1,
            sha256: Some("h".into()),
            created_ms: 9,
        })),
        "01 06 01 0166 016f 05 016d 016e 02 01 01 0168 09",
    );
    pin(&ChatQueryReply::Allowed(true), "01 07 01");
    pin(&ChatQueryReply::FileEntry(None), "01 08 00");
    pin(
        &ChatQueryReply::ContentOf(chatd_chat::content::ContentOf {
            canonical: Some("f".into()),
            held: true,
            released: false,
        }),
        "01 09 01 0166 01 00",
    );
    pin(
        &ChatQueryReply::Quota(chatd_chat::quota::QuotaUsage { bytes: 5, files: 1 }),
        "01 0a 05 01",
    );
    pin(
        &ChatQueryReply::Cursors(vec![("u".into(), 7, 5)]),
        "01 0b 01 0175 07 05",
    );
    pin(
        &ChatQueryReply::Devices(vec![chatd_chat::e2e::DeviceInfo {
            device: "d".into(),
            available: 2,
            last_resort: true,
        }]),
        "01 0c 01 0164 02 01",
    );
}
