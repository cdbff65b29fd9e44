//! Per-partition Raft logs: openraft groups that share one node's RocksDB and one QUIC
//! connection per peer.
//!
//! `raftlog` knows Raft, but nothing of chats: a group's commands are opaque bytes handed to
//! an [`Applier`] that the layer above provides. It knows the network only as
//! `chatd_transport::Endpoint` moving opaque bytes between nodes.
//!
//! Durability: a log append is acknowledged to openraft only after the storage layer's group
//! commit has fdatasynced it; votes and purges are synced before they return. The state
//! machine writes its effects and its last-applied log id in one RocksDB write batch, so an
//! entry is applied exactly once even across crashes.

// openraft's StorageError (224 bytes) is fixed by the storage traits we implement.
#![allow(clippy::result_large_err)]

mod batcher;
pub mod clock;
#[cfg(test)]
mod golden;
mod keys;
mod log_store;
mod log_tail;
mod network;
mod peers;
mod registry;
mod state_machine;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use batcher::{
    Committed, ProposeError, BATCHES_IN_FLIGHT_MAX, BATCH_BYTES_MAX, BATCH_COMMANDS_MAX,
    PROPOSAL_QUEUE_MAX,
};
pub use log_store::LogStore;
pub use log_tail::{
    TailBudget, LOG_TAIL_APPLIED_KEEP_BYTES, LOG_TAIL_APPLIED_KEEP_ENTRIES, LOG_TAIL_BYTES_MAX,
    LOG_TAIL_ENTRIES_MAX, LOG_TAIL_NODE_BYTES_MAX,
};
pub use network::{
    NetworkFactory, QuiesceRequest, RaftReply, RaftRequest, RAFT_SERVICE_TAG,
    UNREACHABLE_BACKOFF_MS,
};
pub use peers::{
    LinkError, LinkStats, Liveness, PeerHealth, PeerLife, BATCHES_IN_FLIGHT_PER_PEER_MAX,
    BATCH_RPCS_MAX, LINK_QUEUE_RPCS_MAX, PEER_BATCH_BYTES_MAX, RAFT_BATCH_SERVICE_TAG,
};
pub use registry::{
    ApplyBacklog, GroupStatus, LeadershipWatch, Registry, ELECTION_HOLD_MS_MAX,
    HANDOVER_CATCH_UP_MS_MAX, QUIESCE_ROUND_GROUPS_MAX,
};
pub use state_machine::{read_record, scan_records, Applier, ApplyTxn, StateMachine};

/// A node's id in the cluster.
pub type NodeId = u64;
/// A Raft group's id: 0 is the metadata group, 1..=P the partitions.
pub type GroupId = u64;

/// The payload of one Raft entry: a batch of opaque commands for the group's state machine,
/// applied in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command(pub Vec<serde_bytes::ByteBuf>);

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "batch of {} commands", self.0.len())
    }
}

/// The state machine's answers to one entry's commands, in order; opaque to raftlog.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response(pub Vec<serde_bytes::ByteBuf>);

openraft::declare_raft_types!(
    /// chatd's openraft type configuration.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = crate::clock::CoalescedTokio,
);

/// A group's Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;
/// Log id of an entry.
pub type LogId = openraft::LogId<NodeId>;
/// openraft's storage error for our node id type.
pub type StorageError = openraft::StorageError<NodeId>;

/// Errors raised by raftlog outside openraft's own error types.
#[derive(Debug, thiserror::Error)]
pub enum RaftlogError {
    /// The openraft configuration is invalid.
    #[error("invalid raft configuration: {0}")]
    Config(String),
    /// openraft refused to start the group (storage unreadable, ...).
    #[error("cannot start raft group {group}: {cause}")]
    Start { group: GroupId, cause: String },
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] chatd_storage::StorageError),
    /// The snapshot directory could not be prepared.
    #[error("snapshot directory {path}: {cause}")]
    SnapshotDir { path: String, cause: String },
}

/// Tunables of every group, with units in their names.
#[derive(Clone, Debug)]
pub struct RaftOptions {
    /// Leader heartbeat period.
    pub heartbeat_interval_ms: u64,
    /// Lower bound of the randomised election timeout.
    pub election_timeout_min_ms: u64,
    /// Upper bound of the randomised election timeout.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many applied entries since the last one.
    pub snapshot_logs_since_last: u64,
    /// Entries kept in the log below the snapshot, for slow followers.
    pub snapshot_logs_to_keep: u64,
    /// Size of one snapshot chunk sent to a follower.
    pub snapshot_chunk_bytes_max: u64,
    /// Entries sent in one AppendEntries.
    pub append_entries_max: u64,
    /// A group with nothing proposed, read or changed for this long, and every replica
    /// holding all of it, stops heartbeating (quiesces) until the next proposal, read or
    /// vote; 0: never.
    pub quiesce_idle_ms: u64,
    /// How often a node pings each peer it shares a group with.
    pub liveness_ping_ms: u64,
    /// A peer not heard from for this long is taken for dead: the groups it led elect a
    /// new leader at once (quiesced) or as soon as its lease allows (active).
    pub liveness_timeout_ms: u64,
}

impl Default for RaftOptions {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 100,
            // openraft's leader lease equals the maximum: a follower grants no vote within it
            // of the last heartbeat, so a tight range keeps failover near one timeout.
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 450,
            snapshot_logs_since_last: 50_000,
            snapshot_logs_to_keep: 5_000,
            snapshot_chunk_bytes_max: 1 << 20,
            append_entries_max: 512,
            quiesce_idle_ms: 2_000,
            liveness_ping_ms: 200,
            liveness_timeout_ms: 500,
        }
    }
}

impl RaftOptions {
    /// The validated openraft configuration for a group.
    pub fn to_config(&self, cluster_name: &str) -> Result<openraft::Config, RaftlogError> {
        let config = openraft::Config {
            cluster_name: cluster_name.to_string(),
            // openraft ticks every 1.5 of this (even a quiesced group's timer task wakes)
            // and gives each AppendEntries this long. The registry sends heartbeats itself
            // at `heartbeat_interval_ms`; openraft's own clock only needs to be fine enough
            // for election timeouts: two thirds of the minimum.
            heartbeat_interval: (self.election_timeout_min_ms * 2 / 3)
                .max(self.heartbeat_interval_ms),
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            install_snapshot_timeout: 5_000,
            max_payload_entries: self.append_entries_max,
            replication_lag_threshold: self.snapshot_logs_to_keep.max(1),
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_logs_since_last),
            snapshot_max_chunk_size: self.snapshot_chunk_bytes_max,
            max_in_snapshot_log_to_keep: self.snapshot_logs_to_keep,
            // Purge in steps of a quarter snapshot interval (bounded): a purge is one
            // synced range delete, cheap, but not worth doing per entry.
            purge_batch_size: (self.snapshot_logs_since_last / 4).clamp(1, 1024),
            // The registry sends every group's heartbeats together, once per interval, so
            // they leave for each peer in one batch (and not at all from quiesced groups).
            enable_heartbeat: false,
            ..Default::default()
        };
        if self.liveness_ping_ms == 0 || self.liveness_timeout_ms < 2 * self.liveness_ping_ms {
            return Err(RaftlogError::Config(format!(
                "liveness_timeout_ms ({}) must be at least twice liveness_ping_ms ({}), which \
                 must not be 0",
                self.liveness_timeout_ms, self.liveness_ping_ms
            )));
        }
        config
            .validate()
            .map_err(|e| RaftlogError::Config(e.to_string()))
    }
}
