//! The Raft log of one group, in the node's shared RocksDB.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use std::sync::Arc;

use chatd_storage::{Batch, Cf, Storage};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, OptionalSend, RaftLogReader, StorageIOError, Vote};

use crate::keys::{log_key, meta_key, META_COMMITTED, META_PURGED, META_VOTE};
use crate::log_tail::LogTail;
use crate::state_machine::AppliedMark;
use crate::{GroupId, LogId, NodeId, StorageError, TypeConfig};

/// Upper bound on entries returned by one log read.
pub const LOG_READ_ENTRIES_MAX: usize = 4096;

/// One group's log. Clones share the database and are used as log readers.
#[derive(Clone)]
pub struct LogStore {
    group: GroupId,
    store: Storage,
    /// How far the group's state machine is durable: no entry is purged before that.
    applied: Arc<AppliedMark>,
    /// The newest entries, decoded: most reads are answered from here.
    tail: Arc<LogTail>,
}

fn io_read(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_logs(&e).into()
}
fn io_write(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_logs(&e).into()
}

impl LogStore {
    /// The log of `group` in `store`, whose state machine's durability `applied` tracks;
    /// `tail` keeps its newest entries (shared with the state machine, which trims it).
    pub(crate) fn new(
        group: GroupId,
        store: Storage,
        applied: Arc<AppliedMark>,
        tail: Arc<LogTail>,
    ) -> Self {
        Self {
            group,
            store,
            applied,
            tail,
        }
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        tag: u8,
    ) -> Result<Option<T>, StorageError> {
        match self
            .store
            .get(Cf::RaftMeta, &meta_key(self.group, tag))
            .map_err(io_read)?
        {
            Some(bytes) => chatd_codec::decode(&bytes).map(Some).map_err(io_read),
            None => Ok(None),
        }
    }

    fn last_purged(&self) -> Result<Option<LogId>, StorageError> {
        self.read_meta(META_PURGED)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&i) => i.saturating_add(1),
            Bound::Excluded(&i) => i,
            Bound::Unbounded => u64::MAX,
        };
        if let Some(entries) = self.tail.get(start, end, LOG_READ_ENTRIES_MAX) {
            return Ok(entries);
        }
        let end = log_key(self.group, end);
        let mut out = Vec::new();
        let mut failure = None;
        self.store
            .scan_with(Cf::RaftLog, &log_key(self.group, start), &end, |_, v| {
                match chatd_codec::decode::<Entry<TypeConfig>>(v) {
                    Ok(entry) => out.push(entry),
                    Err(e) => {
                        failure = Some(e);
                        return false;
                    }
                }
                out.len() < LOG_READ_ENTRIES_MAX
            })
            .map_err(io_read)?;
        if let Some(e) = failure {
            return Err(io_read(e));
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id = self.last_purged()?;
        let last = self
            .store
            .last_in_range(
                Cf::RaftLog,
                &log_key(self.group, 0),
                &log_key(self.group, u64::MAX),
            )
            .map_err(io_read)?;
        let last_log_id = match last {
            Some((_, v)) => Some(
                chatd_codec::decode::<Entry<TypeConfig>>(&v)
                    .map_err(io_read)?
                    .log_id,
            ),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let bytes = chatd_codec::encode(vote).map_err(|e| StorageIOError::write_vote(&e))?;
        let mut b = Batch::new();
        self.store
            .batch(&mut b)
            .put(Cf::RaftMeta, &meta_key(self.group, META_VOTE), &bytes);
        self.store
            .write_synced(b)
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    /// Read once, when the group starts (openraft's initial state). A committed vote comes
    /// back *uncommitted*, so no replica resumes a leadership after a restart without a new
    /// election. openraft would restore a leader whose own committed vote it reads at once,
    /// in the same term; but a leader's entries count as committed once a majority of
    /// *followers* synced them, before its own sync, so after every node lost power at once
    /// it can come back with a shorter log than its followers, propose new entries under the
    /// same log ids as theirs (which they keep as already present), and answer reads from
    /// a commit index that misses acknowledged writes (chatd-jepsen's `power-cut-all`
    /// found the stale reads). An uncommitted vote for the same leader in the same term
    /// keeps every promise this replica made (it grants no other vote in that term) and
    /// still accepts that leader's messages; the group elects a leader in a new term,
    /// which only a replica with every committed entry can win.
    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        let vote: Option<Vote<NodeId>> = self.read_meta(META_VOTE)?;
        Ok(vote.map(|mut v| {
            v.committed = false;
            v
        }))
    }

    /// Recorded without a sync: a stale committed id after a crash only means re-learning it
    /// from the leader; with it, a restarted node re-applies its committed entries at once.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let bytes = chatd_codec::encode(&committed).map_err(io_write)?;
        let mut b = Batch::new();
        self.store
            .batch(&mut b)
            .put(Cf::RaftMeta, &meta_key(self.group, META_COMMITTED), &bytes);
        self.store.write(b).map_err(io_write)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.read_meta::<Option<LogId>>(META_COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = Batch::new();
        let mut buf = Vec::with_capacity(1200);
        let mut written = Vec::new();
        {
            let mut w = self.store.batch(&mut batch);
            for entry in entries {
                buf.clear();
                chatd_codec::encode_into(&entry, &mut buf).map_err(io_write)?;
                w.put(Cf::RaftLog, &log_key(self.group, entry.log_id.index), &buf);
                written.push((entry, buf.len()));
            }
        }
        // Visible to readers on return; openraft hears of it only once fdatasynced.
        self.store
            .write_durable(
                batch,
                Box::new(move |result| {
                    callback.log_io_completed(result.map_err(std::io::Error::other));
                }),
            )
            .map_err(io_write)?;
        // Readable in the log now, so the tail may answer for them.
        self.tail.appended(written);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Forgotten before they are deleted: the tail never answers for a deleted index.
        self.tail.truncate_from(log_id.index);
        let mut b = Batch::new();
        self.store.batch(&mut b).delete_range(
            Cf::RaftLog,
            &log_key(self.group, log_id.index),
            &log_key(self.group, u64::MAX),
        );
        self.store.write_synced(b).await.map_err(io_write)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // The state machine's records are written without the WAL: an entry leaves the log
        // only once what it produced is on disk, or a crash could lose both.
        let durable = self
            .applied
            .make_durable(
                &self.store,
                log_id.index.saturating_add(1),
                std::time::Duration::from_millis(crate::state_machine::PURGE_WAITS_FOR_APPLY_MS),
            )
            .await
            .map_err(|e| io_write(std::io::Error::other(e)))?;
        if !durable {
            return Err(io_write(std::io::Error::other(format!(
                "group {}: purge up to {} asked, but the state machine did not apply that far \
                 within {} ms",
                self.group,
                log_id.index,
                crate::state_machine::PURGE_WAITS_FOR_APPLY_MS
            ))));
        }
        let bytes = chatd_codec::encode(&log_id).map_err(io_write)?;
        self.tail.purge_through(log_id.index);
        let mut b = Batch::new();
        {
            let mut w = self.store.batch(&mut b);
            w.put(Cf::RaftMeta, &meta_key(self.group, META_PURGED), &bytes);
            w.delete_range(
                Cf::RaftLog,
                &log_key(self.group, 0),
                &log_key(self.group, log_id.index.saturating_add(1)),
            );
        }
        self.store.write_synced(b).await.map_err(io_write)
    }
}

/// openraft's storage suite against the real log and state machine (RocksDB in a temporary
/// directory), with the in-memory tail on: every read, truncate, purge and append case it
/// checks is answered through the tail where it can be.
#[cfg(test)]
mod suite {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use chatd_storage::{NodeIdentity, Storage, StorageOptions};
    use openraft::testing::{StoreBuilder, Suite};

    use super::*;
    use crate::log_tail::{LogTail, TailBudget, LOG_TAIL_NODE_BYTES_MAX};
    use crate::state_machine::StateMachine;
    use crate::{Applier, ApplyTxn};

    struct Nothing;

    impl Applier for Nothing {
        fn apply(
            &self,
            _group: GroupId,
            _index: u64,
            _command: &[u8],
            _txn: &mut ApplyTxn<'_>,
        ) -> Result<Vec<u8>, chatd_storage::StorageError> {
            Ok(Vec::new())
        }
    }

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
            let dir = tempfile::tempdir().unwrap();
            let ident = NodeIdentity {
                cluster_id: "suite".into(),
                node_id: 1,
            };
            let store =
                Storage::open(&dir.path().join("db"), &ident, &StorageOptions::default()).unwrap();
            let mut sm = StateMachine::open(
                7,
                store.clone(),
                Arc::new(Nothing),
                &dir.path().join("snap"),
            )
            .unwrap();
            let tail = Arc::new(LogTail::new(TailBudget::new(LOG_TAIL_NODE_BYTES_MAX)));
            sm.trim_after_apply(tail.clone());
            // The suite purges entries it never applied: the log's purge must not wait for
            // them here (that wait has its own tests).
            let applied = Arc::new(AppliedMark::default());
            applied.durable_at(u64::MAX);
            Ok((dir, LogStore::new(7, store, applied, tail), sm))
        }
    }

    #[test]
    fn openraft_storage_suite_passes_with_the_tail() {
        Suite::test_all(Builder).unwrap();
    }

    #[tokio::test]
    async fn a_committed_vote_reads_back_uncommitted_so_no_restart_resumes_leading() {
        let (_dir, mut log, _sm) = Builder.build().await.unwrap();
        let mut leader = Vote::new(3, 1);
        leader.commit();
        log.save_vote(&leader).await.unwrap();
        let read = log.read_vote().await.unwrap().unwrap();
        assert!(!read.is_committed());
        // The same term and the same leader: every promise kept, no other vote granted.
        assert_eq!(read, Vote::new(3, 1));
        assert!(leader > read, "the leader's messages are still accepted");
        // An uncommitted vote is stored as it is.
        log.save_vote(&Vote::new(4, 2)).await.unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(4, 2)));
    }
}
