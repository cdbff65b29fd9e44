//! Group 0, the metadata group: the cluster's nodes, the partition table and placement, and
//! the routing table from partition to leader.
//!
//! `membership` knows Raft only through `raftlog`'s [`Applier`]; it knows nothing of chats,
//! storage layout or the network.

mod hash;
mod placement;
mod routing;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use chatd_raftlog::{Applier, ApplyTxn, GroupId, NodeId};
use serde::{Deserialize, Serialize};

pub use hash::{partition_of, stable_hash};
pub use placement::{
    default_replication, place, PartitionAssignment, PartitionTable, PlacementError,
};
pub use routing::RoutingTable;

/// The metadata group's id.
pub const META_GROUP: GroupId = 0;

/// Where a node can be reached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's id.
    pub id: NodeId,
    /// QUIC address for node-to-node traffic.
    pub cluster_addr: String,
    /// Address of the client API (HTTP and WebSocket).
    pub api_addr: String,
}

/// Everything group 0 holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMeta {
    /// The cluster's id.
    pub cluster_id: String,
    /// The nodes, by id.
    pub nodes: BTreeMap<NodeId, NodeInfo>,
    /// Partition placement.
    pub table: PartitionTable,
}

/// Commands of the metadata group.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Sets the cluster metadata if it was never set; a second bootstrap is a no-op that
    /// answers with the metadata already there (so every node may try it safely).
    Bootstrap(ClusterMeta),
}

const CLUSTER_KEY: &[u8] = b"cluster";

/// The metadata group's state machine, with the latest applied metadata cached in memory.
#[derive(Default)]
pub struct MetaApplier {
    current: RwLock<Option<Arc<ClusterMeta>>>,
}

impl MetaApplier {
    /// An applier with nothing applied yet; [`Self::load`] fills it from the store.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Reads the applied metadata from the store (after a restart).
    pub fn load(&self, store: &chatd_storage::Storage) -> Result<(), MembershipError> {
        if let Some(bytes) = chatd_raftlog::read_record(store, META_GROUP, CLUSTER_KEY)? {
            let meta: ClusterMeta = chatd_codec::decode(&bytes)?;
            self.set(meta);
        }
        Ok(())
    }

    /// The metadata applied so far, if the cluster was bootstrapped.
    pub fn current(&self) -> Option<Arc<ClusterMeta>> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set(&self, meta: ClusterMeta) {
        let mut g = match self.current.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *g = Some(Arc::new(meta));
    }
}

impl Applier for MetaApplier {
    fn apply(
        &self,
        _group: GroupId,
        _index: u64,
        command: &[u8],
        txn: &mut ApplyTxn<'_>,
    ) -> Result<Vec<u8>, chatd_storage::StorageError> {
        let corrupt = |e: chatd_codec::CodecError| chatd_storage::StorageError::Corrupt {
            cf: "sm",
            cause: e.to_string(),
        };
        let cmd: MetaCommand = match chatd_codec::decode(command) {
            Ok(c) => c,
            // A command this build cannot read changes nothing; the proposer hears why.
            Err(e) => return Ok(format!("malformed metadata command: {e}").into_bytes()),
        };
        match cmd {
            MetaCommand::Bootstrap(meta) => {
                let stored = match txn.get(CLUSTER_KEY)? {
                    Some(existing) => existing,
                    None => {
                        let bytes = chatd_codec::encode(&meta).map_err(corrupt)?;
                        txn.put(CLUSTER_KEY, bytes.clone());
                        bytes
                    }
                };
                let applied: ClusterMeta = chatd_codec::decode(&stored).map_err(corrupt)?;
                self.set(applied);
                Ok(stored)
            }
        }
    }
}

/// Errors of the membership layer.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// Reading the metadata failed.
    #[error(transparent)]
    Storage(#[from] chatd_storage::StorageError),
    /// The stored metadata is not readable.
    #[error("corrupt cluster metadata: {0}")]
    Codec(#[from] chatd_codec::CodecError),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn golden_bytes_of_cluster_meta() {
        let mut nodes = BTreeMap::new();
        nodes.insert(
            1,
            NodeInfo {
                id: 1,
                cluster_addr: "a".into(),
                api_addr: "b".into(),
            },
        );
        let meta = ClusterMeta {
            cluster_id: "c".into(),
            nodes,
            table: place(&[1], 1, 1).unwrap(),
        };
        let bytes = chatd_codec::encode(&MetaCommand::Bootstrap(meta.clone())).unwrap();
        let golden: &[u8] = &[1, 0, 1, b'c', 1, 1, 1, 1, b'a', 1, b'b', 1, 1, 1, 1, 1, 1];
        assert_eq!(bytes, golden);
        let back: MetaCommand = chatd_codec::decode(golden).unwrap();
        let MetaCommand::Bootstrap(m) = back;
        assert_eq!(m, meta);
    }
}
