//! Golden bytes of everything raftlog persists or sends: log entries (openraft's `Entry` of
//! our type config, every payload kind), the vote, the log ids kept as metadata, the state
//! machine's membership and snapshot records, snapshot frames with their header, and the
//! Raft RPC envelope and replies. Each value has every field set; the test checks the
//! exact encoding and that decoding gives it back. A failure means a format changed: that
//! needs a new format version (and a reader of the old one), not a new golden value.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use chatd_codec::frame::{write_frame, SnapshotFrame, SNAPSHOT_FRAME_BYTES_MAX};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{
    BasicNode, CommittedLeaderId, Entry, EntryPayload, Membership, SnapshotMeta, StoredMembership,
    Vote,
};
use serde::{de::DeserializeOwned, Serialize};
use serde_bytes::ByteBuf;

use crate::keys::{
    meta_key, META_COMMITTED, META_LAST_APPLIED, META_MEMBERSHIP, META_PENDING_INSTALL,
    META_PURGED, META_SNAPSHOT, META_VOTE,
};
use crate::network::{RaftEnvelope, RaftReply, RaftRequest};
use crate::state_machine::SnapshotRecord;
use crate::{Command, LogId, NodeId, Response, TypeConfig};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Asserts `value` encodes to `golden` (hex) and that the decoded value encodes the same
/// (for openraft types without `PartialEq`); returns the decoded value.
fn pin<T: Serialize + DeserializeOwned + std::fmt::Debug>(value: &T, golden: &str) -> T {
    let golden: String = golden.split_whitespace().collect();
    let bytes = chatd_codec::encode(value).unwrap();
    assert_eq!(hex(&bytes), golden, "encoding of {value:?}");
    let back: T = chatd_codec::decode(&bytes).unwrap();
    assert_eq!(hex(&chatd_codec::encode(&back).unwrap()), golden);
    back
}

fn log_id(term: u64, node: NodeId, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, node), index)
}

fn membership() -> Membership<NodeId, BasicNode> {
    let mut nodes = BTreeMap::new();
    nodes.insert(1, BasicNode::new("a:1"));
    nodes.insert(2, BasicNode::new("b:2"));
    nodes.insert(3, BasicNode::new("c:3"));
    Membership::new(vec![BTreeSet::from([1, 2])], nodes)
}

// Hex of the values above, reused inside larger values.
const LOG_ID_2_1_300: &str = "0201fb2c01"; // leader (term 2, node 1) · index 300
const MEMBERSHIP: &str = "01020102\
                          03 01 03613a31 02 03623a32 03 03633a33";
const VOTE_2_1_COMMITTED: &str = "020101"; // leader (term 2, node 1) · committed

fn compact(s: &str) -> String {
    s.split_whitespace().collect()
}

#[test]
fn golden_log_entries() {
    let normal: Entry<TypeConfig> = Entry {
        log_id: log_id(2, 1, 300),
        payload: EntryPayload::Normal(Command(vec![
            ByteBuf::from(b"ab".to_vec()),
            ByteBuf::from(Vec::new()),
        ])),
    };
    // log id · Normal (1) · 2 commands: "ab", ""
    let back = pin(&normal, &format!("01{LOG_ID_2_1_300}0102026162 00"));
    assert_eq!(back.log_id, normal.log_id);
    let blank: Entry<TypeConfig> = Entry {
        log_id: log_id(1, 1, 1),
        payload: EntryPayload::Blank,
    };
    pin(&blank, "0101010100");
    let change: Entry<TypeConfig> = Entry {
        log_id: log_id(2, 1, 300),
        payload: EntryPayload::Membership(membership()),
    };
    pin(
        &change,
        &compact(&format!("01{LOG_ID_2_1_300}02{MEMBERSHIP}")),
    );
}

#[test]
fn golden_vote_and_log_id_metadata() {
    let vote = Vote::<NodeId>::new_committed(2, 1);
    assert_eq!(pin(&vote, &format!("01{VOTE_2_1_COMMITTED}")), vote);
    let uncommitted = Vote::<NodeId>::new(3, 2);
    assert_eq!(pin(&uncommitted, "01030200"), uncommitted);
    // Last purged: a log id. Committed and last applied: an optional log id.
    assert_eq!(
        pin(&log_id(2, 1, 300), &format!("01{LOG_ID_2_1_300}")),
        log_id(2, 1, 300)
    );
    let some = Some(log_id(2, 1, 300));
    assert_eq!(pin(&some, &format!("0101{LOG_ID_2_1_300}")), some);
    assert_eq!(pin(&None::<LogId>, "0100"), None);
}

#[test]
fn golden_state_machine_metadata() {
    let stored = StoredMembership::new(Some(log_id(2, 1, 300)), membership());
    let back = pin(
        &stored,
        &compact(&format!("0101{LOG_ID_2_1_300}{MEMBERSHIP}")),
    );
    assert_eq!(back, stored);
    let record = SnapshotRecord {
        meta: SnapshotMeta {
            last_log_id: Some(log_id(2, 1, 300)),
            last_membership: stored,
            snapshot_id: "300-ab".into(),
        },
        file: "snap-2-300-ab.bin".into(),
    };
    let golden = compact(&format!(
        "01 01{LOG_ID_2_1_300} 01{LOG_ID_2_1_300}{MEMBERSHIP} 06 3330302d6162 \
         11 736e61702d322d3330302d61622e62696e"
    ));
    let back = pin(&record, &golden);
    assert_eq!((back.meta, back.file), (record.meta, record.file));
}

#[test]
fn golden_snapshot_frame_with_its_header() {
    let frame = SnapshotFrame {
        records: vec![(ByteBuf::from(b"c\0g:1".to_vec()), ByteBuf::from(vec![1, 2]))],
    };
    let mut file = Vec::new();
    write_frame(&mut file, &frame, SNAPSHOT_FRAME_BYTES_MAX).unwrap();
    // [u32 LE 11][version 1][1 record]["c\0g:1"][01 02]
    assert_eq!(hex(&file), "0b0000000101056300673a31020102");
    let mut input = file.as_slice();
    let back: SnapshotFrame = chatd_codec::frame::read_frame(&mut input, SNAPSHOT_FRAME_BYTES_MAX)
        .unwrap()
        .unwrap();
    assert_eq!(back, frame);
}

#[test]
fn golden_raft_rpcs() {
    let entry: Entry<TypeConfig> = Entry {
        log_id: log_id(2, 1, 300),
        payload: EntryPayload::Normal(Command(vec![ByteBuf::from(b"x".to_vec())])),
    };
    let append = RaftEnvelope {
        group: 5,
        request: RaftRequest::Append(AppendEntriesRequest {
            vote: Vote::new_committed(2, 1),
            prev_log_id: Some(log_id(2, 1, 299)),
            entries: vec![entry],
            leader_commit: Some(log_id(1, 1, 7)),
        }),
    };
    pin(
        &append,
        &compact(&format!(
            "01 05 00 {VOTE_2_1_COMMITTED} 01 0201fb2b01 01 {LOG_ID_2_1_300} 01 01 01 78 01 010107"
        )),
    );
    let vote = RaftEnvelope {
        group: 0,
        request: RaftRequest::Vote(VoteRequest {
            vote: Vote::new(3, 2),
            last_log_id: Some(log_id(2, 1, 300)),
        }),
    };
    pin(
        &vote,
        &compact(&format!("01 00 01 030200 01 {LOG_ID_2_1_300}")),
    );
    let snapshot = RaftEnvelope {
        group: 1,
        request: RaftRequest::Snapshot(InstallSnapshotRequest {
            vote: Vote::new_committed(2, 1),
            meta: SnapshotMeta {
                last_log_id: Some(log_id(2, 1, 300)),
                last_membership: StoredMembership::new(Some(log_id(2, 1, 300)), membership()),
                snapshot_id: "s".into(),
            },
            offset: 4,
            data: vec![9, 8],
            done: true,
        }),
    };
    pin(
        &snapshot,
        &compact(&format!(
            "01 01 02 {VOTE_2_1_COMMITTED} 01{LOG_ID_2_1_300} 01{LOG_ID_2_1_300}{MEMBERSHIP} \
             0173 04 020908 01"
        )),
    );
}

#[test]
fn golden_raft_replies() {
    pin(
        &RaftReply::Append(Ok(AppendEntriesResponse::Success)),
        "01000000",
    );
    pin(
        &RaftReply::Append(Ok(AppendEntriesResponse::PartialSuccess(Some(log_id(
            2, 1, 300,
        ))))),
        &format!("0100000101{LOG_ID_2_1_300}"),
    );
    pin(
        &RaftReply::Append(Ok(AppendEntriesResponse::Conflict)),
        "01000002",
    );
    pin(
        &RaftReply::Append(Ok(AppendEntriesResponse::HigherVote(Vote::new_committed(
            2, 1,
        )))),
        &format!("01000003{VOTE_2_1_COMMITTED}"),
    );
    pin(
        &RaftReply::Vote(Ok(VoteResponse {
            vote: Vote::new(3, 2),
            vote_granted: true,
            last_log_id: Some(log_id(2, 1, 300)),
        })),
        &format!("01010003020001 01{LOG_ID_2_1_300}"),
    );
    pin(
        &RaftReply::Snapshot(Ok(InstallSnapshotResponse {
            vote: Vote::new_committed(2, 1),
        })),
        &format!("010200{VOTE_2_1_COMMITTED}"),
    );
    pin(&RaftReply::UnknownGroup(7), "010307");
    pin(&RaftReply::Malformed("bad".into()), "010403626164");
    // The state machine's answers to one entry.
    let response = Response(vec![ByteBuf::from(b"ok".to_vec())]);
    assert_eq!(pin(&response, "0101026f6b"), response);
}

#[test]
fn golden_quiesce_and_peer_batches() {
    use crate::network::QuiesceRequest;
    use crate::peers::{BatchedRpc, PeerBatch, PeerBatchReply, RAFT_BATCH_SERVICE_TAG};
    assert_eq!(RAFT_BATCH_SERVICE_TAG, 0x03);
    let quiesce = RaftEnvelope {
        group: 1,
        request: RaftRequest::Quiesce(QuiesceRequest {
            leader: 1,
            term: 2,
            index: 300,
        }),
    };
    pin(&quiesce, "01 01 03 01 02 fb2c01");
    pin(&RaftReply::Quiesce(true), "01 05 01");
    pin(&RaftReply::Quiesce(false), "01 05 00");
    let batch = PeerBatch {
        from: 2,
        incarnation: 7,
        rpcs: vec![BatchedRpc {
            ttl_ms: 100,
            frame: ByteBuf::from(vec![1, 2]),
        }],
    };
    pin(&batch, "01 02 07 01 64 02 0102");
    let ping = PeerBatch {
        from: 2,
        incarnation: 7,
        rpcs: Vec::new(),
    };
    pin(&ping, "01 02 07 00");
    let reply = PeerBatchReply {
        incarnation: 7,
        replies: vec![ByteBuf::new(), ByteBuf::from(vec![5])],
    };
    pin(&reply, "01 07 02 00 01 05");
    use crate::peers::{LivenessPing, LIVENESS_DATAGRAM_TAG};
    assert_eq!(LIVENESS_DATAGRAM_TAG, 0x04);
    let ping = LivenessPing {
        from: 2,
        incarnation: 7,
        answer: false,
    };
    pin(&ping, "01 02 07 00");
    let datagram = ping.datagram().unwrap();
    assert_eq!(&datagram[..], [0x04, 0x01, 0x02, 0x07, 0x00]);
    pin(
        &LivenessPing {
            from: 3,
            incarnation: 1 << 40,
            answer: true,
        },
        "01 03 fd0000000000010000 01",
    );
}

#[test]
fn golden_metadata_tags() {
    let tags = [
        META_VOTE,
        META_PURGED,
        META_COMMITTED,
        META_LAST_APPLIED,
        META_MEMBERSHIP,
        META_SNAPSHOT,
        META_PENDING_INSTALL,
    ];
    assert_eq!(tags, [1, 2, 3, 10, 11, 12, 13]);
    assert_eq!(meta_key(258, META_SNAPSHOT), [0, 0, 0, 0, 0, 0, 1, 2, 12]);
}
