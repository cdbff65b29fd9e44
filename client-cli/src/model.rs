//! The JSON the node's admin API returns, as the CLI reads it.
//!
//! These mirror the node's `ClusterView` types without depending on the node crate, so
//! the CLI builds without RocksDB. Unknown fields are ignored, so newer nodes that add
//! fields stay readable.

use serde::{Deserialize, Serialize};

/// A node id.
pub type NodeId = u64;
/// A Raft group id: 0 is the metadata group, 1..=P are partitions.
pub type GroupId = u64;

/// `GET /v1/admin/cluster`: the cluster as seen by the answering node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    /// The cluster's id.
    pub cluster_id: String,
    /// The node that answered the request.
    pub answered_by: NodeId,
    /// Whether the metadata group has been bootstrapped.
    pub metadata_bootstrapped: bool,
    /// Every node in the cluster and whether the answering node could reach it.
    pub nodes: Vec<NodeView>,
    /// Group 0 (metadata) and every partition.
    pub partitions: Vec<PartitionView>,
    /// Replica moves in progress (absent from servers before live membership).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moves: Vec<MoveView>,
    /// Whether the rebalancer is paused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rebalance_paused: bool,
    /// The next page starts after this group (`None`: last page, or a server that does not
    /// page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<GroupId>,
}

/// A replica move in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveView {
    /// The partition.
    pub group: u64,
    /// The node that gets a replica.
    pub add: NodeId,
    /// The node that gives its replica up.
    pub remove: NodeId,
    /// The partition record's epoch.
    pub epoch: u64,
}

/// A node in the cluster view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// Node id.
    pub id: NodeId,
    /// Client (HTTP) address.
    pub api_addr: String,
    /// Node-to-node (QUIC) address.
    pub cluster_addr: String,
    /// Whether the answering node got this node's status.
    pub reachable: bool,
    /// Why it could not, when it could not.
    #[serde(default)]
    pub error: Option<String>,
    /// Its membership state: joining, active, draining (absent from older servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Bytes of file chunks it holds (`chatd_file_bytes` of its /metrics, read by
    /// chat-cli itself; absent when it could not be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_bytes: Option<u64>,
}

/// A partition (or the metadata group) in the cluster view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionView {
    /// The group.
    pub group: GroupId,
    /// Its replicas.
    pub replicas: Vec<NodeId>,
    /// The leader with the highest term among the replicas that answered.
    #[serde(default)]
    pub leader: Option<NodeId>,
    /// The leader's term (0 without a leader).
    pub term: u64,
    /// The leader's last log index.
    pub last_index: u64,
    /// The leader's committed index.
    pub committed_index: u64,
    /// The leader's applied index.
    pub applied_index: u64,
    /// Whether the node judged the group healthy.
    pub healthy: bool,
    /// The view of each replica that answered.
    #[serde(default)]
    pub replica_views: Vec<ReplicaView>,
}

/// One replica's view of a partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaView {
    /// The replica's node.
    pub node: NodeId,
    /// Leader, Follower, Candidate or Learner.
    pub role: String,
    /// Its term.
    pub term: u64,
    /// Its last log index.
    pub last_index: u64,
    /// Its committed index.
    pub committed_index: u64,
    /// Its applied index.
    pub applied_index: u64,
    /// Index up to which its log was purged.
    #[serde(default)]
    pub purged_index: Option<u64>,
    /// Index covered by its latest snapshot.
    #[serde(default)]
    pub snapshot_index: Option<u64>,
}
