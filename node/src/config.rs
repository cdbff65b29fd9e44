//! The node's configuration: a TOML file, every key known, every path resolved.
//!
//! The types, defaults, parsing and validation live in `chatd-config` (no RocksDB, so the
//! parser is fuzzed: `fuzz/`, target `config`) and are re-exported here. This module adds
//! what needs the crates that link RocksDB: the conversions to `chatd-storage`'s and
//! `chatd-raftlog`'s options, and tests that the defaults agree with theirs.

pub use chatd_config::*;

/// The options of the crate a configuration section configures.
pub trait SectionOptions {
    /// The options type.
    type Options;
    /// The options these settings describe.
    fn options(&self) -> Self::Options;
}

impl SectionOptions for RaftSection {
    type Options = chatd_raftlog::RaftOptions;
    fn options(&self) -> chatd_raftlog::RaftOptions {
        chatd_raftlog::RaftOptions {
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            election_timeout_min_ms: self.election_timeout_min_ms,
            election_timeout_max_ms: self.election_timeout_max_ms,
            snapshot_logs_since_last: self.snapshot_logs_since_last,
            snapshot_logs_to_keep: self.snapshot_logs_to_keep,
            snapshot_chunk_bytes_max: self.snapshot_chunk_bytes_max,
            append_entries_max: self.append_entries_max,
            quiesce_idle_ms: self.quiesce_idle_ms,
            liveness_ping_ms: self.liveness_ping_ms,
            liveness_timeout_ms: self.liveness_timeout_ms,
        }
    }
}

impl SectionOptions for StorageSection {
    type Options = chatd_storage::StorageOptions;
    fn options(&self) -> chatd_storage::StorageOptions {
        chatd_storage::StorageOptions {
            block_cache_bytes: self.block_cache_bytes,
            write_buffer_bytes: self.write_buffer_bytes,
            max_open_files: self.max_open_files,
            background_jobs: self.background_jobs,
            wal_buffered: self.wal_buffered,
            sync_queue_writes_max: self.sync_queue_writes_max,
            blob_gc: self.blob_gc,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_agree_with_the_crates_they_configure() {
        let raft = RaftSection::default().options();
        let want = chatd_raftlog::RaftOptions::default();
        assert_eq!(format!("{raft:?}"), format!("{want:?}"));
        let storage = StorageSection::default().options();
        let want = chatd_storage::StorageOptions::default();
        assert_eq!(format!("{storage:?}"), format!("{want:?}"));
        assert_eq!(GROUP_MEMBERS_MAX_DEFAULT, chatd_chat::GROUP_MEMBERS_MAX);
        assert_eq!(DEDUP_WINDOW_MS_DEFAULT, chatd_chat::DEDUP_WINDOW_MS_DEFAULT);
        assert_eq!(
            chatd_config::PARTITIONS_MAX,
            chatd_membership::PARTITIONS_MAX
        );
        let gateway = GatewayConfig::default();
        assert_eq!(gateway.text_bytes_max, chatd_proto::TEXT_BYTES_MAX);
        for nodes in 0..10 {
            assert_eq!(
                default_replication(nodes),
                chatd_membership::default_replication(nodes)
            );
        }
    }
}
