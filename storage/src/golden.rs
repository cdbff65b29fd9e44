//! Golden values of what storage itself puts on disk: the column family names, the
//! identity record's key and its encoding. A failure means a format changed: that needs a
//! migration, not a new golden value.

#![allow(clippy::unwrap_used)]

use crate::identity::IDENTITY_KEY;
use crate::{Cf, NodeIdentity};

#[test]
fn golden_column_families_and_identity() {
    let names: Vec<&str> = Cf::ALL.iter().map(|cf| cf.name()).collect();
    // `blobs` came later, with its migration: a directory without it gains it at open
    // (tests/it.rs, `a_directory_from_before_the_blobs_family_…`). The first five never
    // change.
    assert_eq!(
        names,
        [
            "raft_log",
            "raft_meta",
            "sm",
            "sm_meta",
            "node_meta",
            "blobs"
        ]
    );
    assert_eq!(IDENTITY_KEY, b"identity");
    let identity = NodeIdentity {
        cluster_id: "c1".into(),
        node_id: 300,
    };
    // version 1 · "c1" · node 300 (varint fb 2c 01)
    let golden: &[u8] = &[1, 2, b'c', b'1', 0xfb, 0x2c, 0x01];
    assert_eq!(chatd_codec::encode(&identity).unwrap(), golden);
    assert_eq!(
        chatd_codec::decode::<NodeIdentity>(golden).unwrap(),
        identity
    );
}
