//! Golden bytes of group 0's records and commands and of its key layout: the cluster
//! metadata (nodes and partition table), users, the metadata commands and their answers.
//! Each value has every field set; the test checks the exact encoding and that decoding
//! gives it back. A failure means a format changed: that needs a new format version (and a
//! reader of the old one), not a new golden value.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use serde::{de::DeserializeOwned, Serialize};

use crate::{
    user_key, ClusterMeta, MetaCommand, NodeInfo, PartitionAssignment, PartitionTable, UserRecord,
    UserReply, CLUSTER_KEY,
};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Asserts `value` encodes to `golden` (hex) and that the decoded value encodes the same;
/// returns the decoded value.
fn pin<T: Serialize + DeserializeOwned + std::fmt::Debug>(value: &T, golden: &str) -> T {
    let golden: String = golden.split_whitespace().collect();
    let bytes = chatd_codec::encode(value).unwrap();
    assert_eq!(hex(&bytes), golden, "encoding of {value:?}");
    let back: T = chatd_codec::decode(&bytes).unwrap();
    assert_eq!(hex(&chatd_codec::encode(&back).unwrap()), golden);
    back
}

fn meta() -> ClusterMeta {
    let mut nodes = BTreeMap::new();
    for id in [1u64, 2] {
        nodes.insert(
            id,
            NodeInfo {
                id,
                cluster_addr: format!("10.0.0.{id}:7001"),
                api_addr: format!("10.0.0.{id}:7000"),
            },
        );
    }
    ClusterMeta {
        cluster_id: "c1".into(),
        nodes,
        table: PartitionTable {
            partitions: 2,
            replication: 2,
            assignments: vec![
                PartitionAssignment {
                    group: 1,
                    replicas: vec![1, 2],
                },
                PartitionAssignment {
                    group: 2,
                    replicas: vec![2, 1],
                },
            ],
        },
    }
}

// "c1" · 2 nodes: 1 → {1, "10.0.0.1:7001", "10.0.0.1:7000"}, 2 → {...} · table: P 2, R 2,
// assignments [{1, [1, 2]}, {2, [2, 1]}]
const META: &str = "02 6331
    02 01 01 0d 31302e302e302e313a37303031 0d 31302e302e302e313a37303030
       02 02 0d 31302e302e302e323a37303031 0d 31302e302e302e323a37303030
    02 02 02 01 02 0102 02 02 0201";

#[test]
fn golden_cluster_meta() {
    assert_eq!(pin(&meta(), &format!("01 {META}")), meta());
}

#[test]
fn golden_meta_commands() {
    let back = pin(&MetaCommand::Bootstrap(meta()), &format!("01 00 {META}"));
    assert!(matches!(back, MetaCommand::Bootstrap(m) if m == meta()));
    pin(
        &MetaCommand::CreateUser {
            user: "al".into(),
            token_sha256: "ab01".into(),
        },
        "01 01 02616c 0461623031",
    );
    pin(
        &MetaCommand::DisableUser { user: "al".into() },
        "01 02 02616c",
    );
}

#[test]
fn golden_user_record_and_replies() {
    let user = UserRecord {
        user: "al".into(),
        token_sha256: "ab01".into(),
        disabled: true,
    };
    assert_eq!(pin(&user, "01 02616c 0461623031 01"), user);
    let replies = [
        (UserReply::Created, "0100"),
        (UserReply::Disabled, "0101"),
        (UserReply::Exists, "0102"),
        (UserReply::Unknown, "0103"),
        (UserReply::Rotated, "0104"),
        (UserReply::IsDisabled, "0105"),
    ];
    for (reply, golden) in replies {
        assert_eq!(pin(&reply, golden), reply);
    }
}

#[test]
fn golden_key_layout() {
    assert_eq!(CLUSTER_KEY, b"cluster");
    assert_eq!(user_key("al"), b"user\0al".to_vec());
    // Every user key sorts after the prefix and before its end, and apart from `cluster`.
    assert!(user_key("").as_slice() < user_key("a").as_slice());
    assert!(user_key("\u{10ffff}").as_slice() < b"user\0\xff".as_slice());
    assert!(!user_key("x").starts_with(CLUSTER_KEY));
}

#[test]
fn golden_membership_records_commands_and_keys() {
    use crate::members::{node_key, part_key};
    use crate::{MemberCommand, MemberReply, NodeRecord, NodeState, PartitionRecord, ReplicaMove};
    let info = NodeInfo {
        id: 4,
        cluster_addr: "a".into(),
        api_addr: "b".into(),
    };
    pin(
        &NodeRecord {
            info: info.clone(),
            state: NodeState::Draining,
        },
        "01 04 01 61 01 62 02",
    );
    pin(
        &PartitionRecord {
            group: 7,
            replicas: vec![1, 4],
            epoch: 3,
            moving: Some(ReplicaMove { add: 5, remove: 1 }),
        },
        "01 07 02 01 04 03 01 05 01",
    );
    pin(
        &MetaCommand::Member(MemberCommand::AddNode { info }),
        "01 04 00 04 01 61 01 62",
    );
    pin(
        &MetaCommand::Member(MemberCommand::SetNodeState {
            id: 4,
            state: NodeState::Removed,
        }),
        "01 04 01 04 03",
    );
    pin(
        &MetaCommand::Member(MemberCommand::BeginMove {
            group: 7,
            epoch: 3,
            add: 5,
            remove: 1,
        }),
        "01 04 02 07 03 05 01",
    );
    pin(
        &MetaCommand::Member(MemberCommand::EndMove {
            group: 7,
            epoch: 4,
            done: true,
        }),
        "01 04 03 07 04 01",
    );
    pin(
        &MetaCommand::Member(MemberCommand::SetPreferredLeader {
            group: 7,
            epoch: 5,
            leader: 4,
        }),
        "01 04 04 07 05 04",
    );
    pin(
        &MetaCommand::Member(MemberCommand::SetRebalancePaused { paused: true }),
        "01 04 05 01",
    );
    pin(&MemberReply::Done { epoch: 9 }, "01 00 09");
    pin(&MemberReply::Tombstoned(4), "01 03 04");
    pin(&MemberReply::Refused("x".into()), "01 09 01 78");
    assert_eq!(hex(&node_key(4)), "6e6f6465000000000000000004");
    assert_eq!(hex(&part_key(7)), "70617274000000000000000007");
    assert_eq!(crate::members::REBALANCE_KEY, b"rebalance");
}
