//! The state machine of one group: the application's records under the group's prefix in
//! the shared database, plus last-applied and membership, written in one batch per apply.

use std::collections::BTreeMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chatd_codec::frame::FrameError;
use chatd_storage::{Batch, Cf, Storage};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::LogIdOptionExt;
use openraft::{
    BasicNode, Entry, EntryPayload, OptionalSend, RaftSnapshotBuilder, SnapshotMeta,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use crate::keys::{
    group_range, meta_key, sm_key, META_LAST_APPLIED, META_MEMBERSHIP, META_PENDING_INSTALL,
    META_SNAPSHOT,
};
use crate::{GroupId, LogId, NodeId, Response, StorageError, TypeConfig};

// Snapshot files are frames of `[u32 LE length][codec]`; the format and its reader live in
// `chatd_codec::frame` (fuzzed there, without RocksDB).
use chatd_codec::frame::{SnapshotFrame, SNAPSHOT_FRAME_BYTES_MAX, SNAPSHOT_FRAME_BYTES_TARGET};

/// The application side of a group: turns committed commands into records.
///
/// `apply` must be deterministic: every replica applies the same commands in the same order
/// and must end in the same state. It reads and writes only through `txn`.
pub trait Applier: Send + Sync + 'static {
    /// Applies the command committed at `index` of `group`; the returned bytes go back to
    /// the proposer. An error stops the group (storage is broken), it is not a reply.
    fn apply(
        &self,
        group: GroupId,
        index: u64,
        command: &[u8],
        txn: &mut ApplyTxn<'_>,
    ) -> Result<Vec<u8>, chatd_storage::StorageError>;

    /// Called after a batch of applied entries is written, with the events that `apply`
    /// emitted, in order. Runs on the apply path: it must not block.
    fn applied(&self, _group: GroupId, _events: Vec<Vec<u8>>) {}

    /// Called after a snapshot replaced the group's state (a replica far behind, or a new
    /// one, caught up from a leader's snapshot): an applier that caches state in memory
    /// reloads it from `store` here.
    fn installed(&self, _group: GroupId, _store: &Storage) {}
}

/// The reads and writes of one apply batch: writes are buffered and land atomically with
/// the new last-applied log id; reads see the batch's own earlier writes.
pub struct ApplyTxn<'a> {
    group: GroupId,
    store: &'a Storage,
    overlay: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    events: Vec<Vec<u8>>,
}

impl<'a> ApplyTxn<'a> {
    /// A transaction outside Raft, for testing an `Applier` against real storage;
    /// [`Self::commit`] writes it.
    pub fn standalone(group: GroupId, store: &'a Storage) -> Self {
        Self {
            group,
            store,
            overlay: BTreeMap::new(),
            events: Vec::new(),
        }
    }

    /// Writes a standalone transaction's records; returns the events it emitted.
    pub fn commit(self) -> Result<Vec<Vec<u8>>, chatd_storage::StorageError> {
        let mut batch = Batch::new();
        {
            let mut w = self.store.batch(&mut batch);
            for (k, v) in &self.overlay {
                let key = sm_key(self.group, k);
                match v {
                    Some(v) => w.put(Cf::StateMachine, &key, v),
                    None => w.delete(Cf::StateMachine, &key),
                }
            }
        }
        self.store.write(batch)?;
        Ok(self.events)
    }

    /// Reads `key` of this group.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, chatd_storage::StorageError> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        self.store.get(Cf::StateMachine, &sm_key(self.group, key))
    }
    /// The first `limit` records of this group with keys in `from..to`, in key order, as the
    /// batch sees them (its own writes and deletes included). Reads at most
    /// `limit` + (writes of this batch in the range) stored records.
    pub fn scan(
        &self,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> Result<Vec<chatd_storage::KeyValue>, chatd_storage::StorageError> {
        if limit == 0 || from >= to {
            return Ok(Vec::new());
        }
        let pending: Vec<(&Vec<u8>, &Option<Vec<u8>>)> = self
            .overlay
            .range::<[u8], _>((
                std::ops::Bound::Included(from),
                std::ops::Bound::Excluded(to),
            ))
            .collect();
        let stored = self.store.scan(
            Cf::StateMachine,
            &sm_key(self.group, from),
            &sm_key(self.group, to),
            limit.saturating_add(pending.len()),
        )?;
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = stored
            .into_iter()
            .map(|(mut k, v)| {
                k.drain(..8);
                (k, v)
            })
            .collect();
        for (k, v) in pending {
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged.into_iter().take(limit).collect())
    }
    /// Sets `key` of this group to `value`.
    pub fn put(&mut self, key: &[u8], value: Vec<u8>) {
        self.overlay.insert(key.to_vec(), Some(value));
    }
    /// Deletes `key` of this group.
    pub fn delete(&mut self, key: &[u8]) {
        self.overlay.insert(key.to_vec(), None);
    }
    /// Emits an event delivered to [`Applier::applied`] once the batch is written.
    pub fn emit(&mut self, event: Vec<u8>) {
        self.events.push(event);
    }
}

/// Reads a group's committed records directly (outside apply).
pub fn read_record(
    store: &Storage,
    group: GroupId,
    key: &[u8],
) -> Result<Option<Vec<u8>>, chatd_storage::StorageError> {
    store.get(Cf::StateMachine, &sm_key(group, key))
}

/// Scans up to `limit` committed records of `group` with user keys in `from..to`.
pub fn scan_records(
    store: &Storage,
    group: GroupId,
    from: &[u8],
    to: &[u8],
    limit: usize,
) -> Result<Vec<chatd_storage::KeyValue>, chatd_storage::StorageError> {
    let mut out = store.scan(
        Cf::StateMachine,
        &sm_key(group, from),
        &sm_key(group, to),
        limit,
    )?;
    for (k, _) in out.iter_mut() {
        k.drain(..8);
    }
    Ok(out)
}

/// The current snapshot (and a pending install) as `sm_meta` records it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct SnapshotRecord {
    pub(crate) meta: SnapshotMeta<NodeId, BasicNode>,
    pub(crate) file: String,
}

fn sm_read(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_state_machine(&e).into()
}
fn sm_write(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_state_machine(&e).into()
}
fn snap_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_snapshot(None, &e).into()
}

/// How far one group's applied state is on disk.
///
/// Applies are written without the write-ahead log ([`Storage::write_unlogged`]): the Raft
/// log already holds every committed entry durably, so a message's body goes through the
/// WAL and its fdatasync once per replica, not twice. After a crash the state machine is
/// back at its last flush, its records and last-applied mark together (one atomic flush),
/// and openraft applies the rest again from the log (exactly once: the mark and the
/// effects never disagree). The log may therefore drop (purge) an entry only once the
/// state it produced is durable: [`LogStore`](crate::LogStore)'s purge asks this mark and
/// flushes first when it must. Indexes are "next" indexes (one past the last applied; 0:
/// nothing).
#[derive(Debug, Default)]
pub(crate) struct AppliedMark {
    state: std::sync::Mutex<MarkState>,
    /// Woken when `written` moves.
    moved: tokio::sync::Notify,
}

/// How long a purge waits for the state it needs to be applied. openraft may ask to purge
/// up to a snapshot it is still installing (the install runs on the state machine's task,
/// the purge on the log's): the purge waits for the install rather than fail the group.
pub const PURGE_WAITS_FOR_APPLY_MS: u64 = 30_000;

#[derive(Debug, Default)]
struct MarkState {
    /// Effects written up to here (not necessarily durable).
    written: u64,
    /// Effects known durable up to here.
    durable: u64,
    /// Written up to `.0` when flush number `.1` (of the storage's unlogged flushes) had
    /// started: durable once a flush numbered above `.1` succeeded.
    candidate: Option<(u64, u64)>,
}

impl AppliedMark {
    fn lock(&self) -> std::sync::MutexGuard<'_, MarkState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applied state durable up to `next` (read from disk at open, or a snapshot installed
    /// with a synced write).
    pub(crate) fn durable_at(&self, next: u64) {
        {
            let mut m = self.lock();
            m.written = m.written.max(next);
            m.durable = m.durable.max(next);
        }
        self.moved.notify_waiters();
    }

    /// Effects written (unlogged) up to `next`.
    fn written(&self, next: u64) {
        {
            let mut m = self.lock();
            m.written = m.written.max(next);
        }
        self.moved.notify_waiters();
    }

    /// Makes the applied state durable up to at least `next`, flushing the storage's
    /// unlogged writes if no flush since covers it; false if the state is not applied up to
    /// `next` within `wait` ([`PURGE_WAITS_FOR_APPLY_MS`] for a purge). A flush made for one
    /// group serves every group written before it.
    pub(crate) async fn make_durable(
        &self,
        store: &Storage,
        next: u64,
        wait: std::time::Duration,
    ) -> Result<bool, String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let moved = self.moved.notified();
            tokio::pin!(moved);
            // Registered before the check: a move between the check and the wait wakes it.
            moved.as_mut().enable();
            if self.lock().written >= next {
                break;
            }
            if tokio::time::timeout_at(deadline, moved).await.is_err() {
                return Ok(false);
            }
        }
        let (started, flushed_through) = store.unlogged_flushes();
        {
            let mut m = self.lock();
            if let Some((w, s)) = m.candidate {
                if flushed_through > s {
                    m.durable = m.durable.max(w);
                    m.candidate = None;
                }
            }
            if m.candidate.is_none() && m.written > m.durable {
                // A later flush, whoever asks for it, will cover what is written now.
                m.candidate = Some((m.written, started));
            }
            if m.durable >= next {
                return Ok(true);
            }
        }
        let written = self.lock().written;
        let flushing = store.clone();
        tokio::task::spawn_blocking(move || flushing.flush_unlogged())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let mut m = self.lock();
        m.durable = m.durable.max(written);
        Ok(m.durable >= next)
    }
}

/// One group's state machine.
pub struct StateMachine {
    group: GroupId,
    store: Storage,
    applier: Arc<dyn Applier>,
    dir: PathBuf,
    last_applied: Option<LogId>,
    membership: StoredMembership<NodeId, BasicNode>,
    receiving: Option<PathBuf>,
    snapshot_lock: Arc<tokio::sync::Mutex<()>>,
    applied_mark: Arc<AppliedMark>,
    /// The group log's newest entries: applied ones are dropped from it.
    log_tail: Option<Arc<crate::log_tail::LogTail>>,
}

fn decode_meta<T: serde::de::DeserializeOwned>(
    bytes: Option<Vec<u8>>,
) -> Result<Option<T>, StorageError> {
    bytes
        .map(|b| chatd_codec::decode(&b))
        .transpose()
        .map_err(sm_read)
}

impl StateMachine {
    /// Opens the state machine of `group`, finishing a snapshot install a crash interrupted.
    pub fn open(
        group: GroupId,
        store: Storage,
        applier: Arc<dyn Applier>,
        snapshot_root: &Path,
    ) -> Result<Self, StorageError> {
        let dir = snapshot_root.join(format!("group-{group}"));
        std::fs::create_dir_all(&dir).map_err(snap_err)?;
        let pending: Option<SnapshotRecord> = decode_meta(
            store
                .get(Cf::StateMeta, &meta_key(group, META_PENDING_INSTALL))
                .map_err(sm_read)?,
        )?;
        if let Some(record) = pending {
            tracing::warn!(group, file = %record.file, "finishing an interrupted snapshot install");
            install_from_file(&store, group, &dir, &record)?;
            applier.installed(group, &store);
        }
        let last_applied: Option<LogId> = decode_meta::<Option<LogId>>(
            store
                .get(Cf::StateMeta, &meta_key(group, META_LAST_APPLIED))
                .map_err(sm_read)?,
        )?
        .flatten();
        let membership = decode_meta(
            store
                .get(Cf::StateMeta, &meta_key(group, META_MEMBERSHIP))
                .map_err(sm_read)?,
        )?
        .unwrap_or_default();
        // What is read now is on disk: unlogged writes lost in a crash are not here.
        let applied_mark = Arc::new(AppliedMark::default());
        applied_mark.durable_at(last_applied.next_index());
        Ok(Self {
            group,
            store,
            applier,
            dir,
            last_applied,
            membership,
            receiving: None,
            snapshot_lock: Arc::new(tokio::sync::Mutex::new(())),
            applied_mark,
            log_tail: None,
        })
    }

    /// The group log's tail, trimmed of applied entries after each apply.
    pub(crate) fn trim_after_apply(&mut self, tail: Arc<crate::log_tail::LogTail>) {
        self.log_tail = Some(tail);
    }

    /// How far this state machine's applied state is durable; shared with the group's log.
    pub(crate) fn applied_mark(&self) -> Arc<AppliedMark> {
        self.applied_mark.clone()
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, BasicNode>), StorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut txn = ApplyTxn {
            group: self.group,
            store: &self.store,
            overlay: BTreeMap::new(),
            events: Vec::new(),
        };
        let mut responses = Vec::new();
        let mut last_applied = self.last_applied;
        let mut membership = None;
        for entry in entries {
            let response = match &entry.payload {
                EntryPayload::Blank => Response::default(),
                EntryPayload::Normal(batch) => {
                    let mut answers = Vec::with_capacity(batch.0.len());
                    for cmd in &batch.0 {
                        let answer = self
                            .applier
                            .apply(self.group, entry.log_id.index, cmd, &mut txn)
                            .map_err(|e| StorageIOError::apply(entry.log_id, &e))?;
                        answers.push(serde_bytes::ByteBuf::from(answer));
                    }
                    Response(answers)
                }
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m.clone()));
                    Response::default()
                }
            };
            last_applied = Some(entry.log_id);
            responses.push(response);
        }
        let ApplyTxn {
            overlay, events, ..
        } = txn;
        let mut batch = Batch::new();
        {
            let mut w = self.store.batch(&mut batch);
            for (k, v) in &overlay {
                let key = sm_key(self.group, k);
                match v {
                    Some(v) => w.put(Cf::StateMachine, &key, v),
                    None => w.delete(Cf::StateMachine, &key),
                }
            }
            let la = chatd_codec::encode(&last_applied).map_err(sm_write)?;
            w.put(Cf::StateMeta, &meta_key(self.group, META_LAST_APPLIED), &la);
            if let Some(m) = &membership {
                let mb = chatd_codec::encode(m).map_err(sm_write)?;
                w.put(Cf::StateMeta, &meta_key(self.group, META_MEMBERSHIP), &mb);
            }
        }
        // Effects and last-applied land together: a restart never applies an entry twice.
        // Without the WAL: the log holds the entries durably, and a crash takes effects and
        // mark back together to the last flush (see `AppliedMark`).
        self.store.write_unlogged(batch).map_err(sm_write)?;
        self.applied_mark.written(last_applied.next_index());
        if let Some(tail) = &self.log_tail {
            tail.applied(last_applied.next_index());
        }
        self.last_applied = last_applied;
        if let Some(m) = membership {
            self.membership = m;
        }
        if !events.is_empty() {
            self.applier.applied(self.group, events);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            group: self.group,
            store: self.store.clone(),
            dir: self.dir.clone(),
            lock: self.snapshot_lock.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let path = self.dir.join(format!("recv-{}.tmp", unique_suffix()));
        let file = tokio::fs::File::create(&path).await.map_err(snap_err)?;
        if let Some(old) = self.receiving.replace(path) {
            let _ = tokio::fs::remove_file(old).await;
        }
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let _guard = self.snapshot_lock.clone().lock_owned().await;
        snapshot.sync_all().await.map_err(snap_err)?;
        drop(snapshot);
        let received = self.receiving.take().ok_or_else(|| {
            snap_err(std::io::Error::other("install without a received snapshot"))
        })?;
        let file = snapshot_file_name(meta);
        tokio::fs::rename(&received, self.dir.join(&file))
            .await
            .map_err(snap_err)?;
        let record = SnapshotRecord {
            meta: meta.clone(),
            file,
        };
        // Record the intent first: a crash from here on finishes the install at open.
        let mut b = Batch::new();
        let bytes = chatd_codec::encode(&record).map_err(snap_err)?;
        self.store.batch(&mut b).put(
            Cf::StateMeta,
            &meta_key(self.group, META_PENDING_INSTALL),
            &bytes,
        );
        self.store.write_synced(b).await.map_err(snap_err)?;
        let (store, group, dir) = (self.store.clone(), self.group, self.dir.clone());
        let rec = record.clone();
        tokio::task::spawn_blocking(move || install_from_file(&store, group, &dir, &rec))
            .await
            .map_err(snap_err)??;
        self.last_applied = meta.last_log_id;
        // install_from_file ends with a synced write of the mark: durable.
        self.applied_mark.durable_at(meta.last_log_id.next_index());
        self.membership = meta.last_membership.clone();
        self.applier.installed(self.group, &self.store);
        tracing::info!(group = self.group, last_log_id = ?meta.last_log_id, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        // A point read, but RocksDB may still go to disk: on a blocking-pool thread.
        let (store, key) = (self.store.clone(), meta_key(self.group, META_SNAPSHOT));
        let bytes = tokio::task::spawn_blocking(move || store.get(Cf::StateMeta, &key))
            .await
            .map_err(sm_read)?
            .map_err(sm_read)?;
        let record: Option<SnapshotRecord> = decode_meta(bytes)?;
        let Some(record) = record else {
            return Ok(None);
        };
        let file = tokio::fs::File::open(self.dir.join(&record.file))
            .await
            .map_err(|e| StorageIOError::read_snapshot(Some(record.meta.signature()), &e))?;
        Ok(Some(Snapshot {
            meta: record.meta,
            snapshot: Box::new(file),
        }))
    }
}

/// Builds a group's snapshot from a point-in-time view of its records.
pub struct SnapshotBuilder {
    group: GroupId,
    store: Storage,
    dir: PathBuf,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let _guard = self.lock.clone().lock_owned().await;
        let (store, group, dir) = (self.store.clone(), self.group, self.dir.clone());
        let record = tokio::task::spawn_blocking(move || build_to_file(&store, group, &dir))
            .await
            .map_err(snap_err)??;
        let file = tokio::fs::File::open(self.dir.join(&record.file))
            .await
            .map_err(snap_err)?;
        tracing::debug!(group = self.group, last_log_id = ?record.meta.last_log_id, "built snapshot");
        Ok(Snapshot {
            meta: record.meta,
            snapshot: Box::new(file),
        })
    }
}

fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{nanos:x}")
}

fn snapshot_file_name(meta: &SnapshotMeta<NodeId, BasicNode>) -> String {
    let (term, index) = meta
        .last_log_id
        .map(|l| (l.leader_id.term, l.index))
        .unwrap_or((0, 0));
    format!("snap-{term}-{index}-{}.bin", unique_suffix())
}

fn build_to_file(
    store: &Storage,
    group: GroupId,
    dir: &Path,
) -> Result<SnapshotRecord, StorageError> {
    let view = store.view();
    let last_log_id: Option<LogId> = decode_meta::<Option<LogId>>(
        view.get(Cf::StateMeta, &meta_key(group, META_LAST_APPLIED))
            .map_err(sm_read)?,
    )?
    .flatten();
    let last_membership: StoredMembership<NodeId, BasicNode> = decode_meta(
        view.get(Cf::StateMeta, &meta_key(group, META_MEMBERSHIP))
            .map_err(sm_read)?,
    )?
    .unwrap_or_default();
    let meta = SnapshotMeta {
        last_log_id,
        last_membership,
        snapshot_id: format!(
            "{}-{}",
            last_log_id.map(|l| l.index).unwrap_or(0),
            unique_suffix()
        ),
    };
    let file = snapshot_file_name(&meta);
    let tmp = dir.join(format!("{file}.tmp"));
    let mut out = BufWriter::new(std::fs::File::create(&tmp).map_err(snap_err)?);
    let mut frame = SnapshotFrame {
        records: Vec::new(),
    };
    let mut frame_bytes = 0usize;
    let (start, end) = group_range(group);
    let mut write_err = None;
    view.scan_with(Cf::StateMachine, &start, &end, |k, v| {
        frame.records.push((
            serde_bytes::ByteBuf::from(&k[8..]),
            serde_bytes::ByteBuf::from(v),
        ));
        frame_bytes += k.len() + v.len();
        if frame_bytes >= SNAPSHOT_FRAME_BYTES_TARGET {
            if let Err(e) = write_frame(&mut out, &frame) {
                write_err = Some(e);
                return Ok(false);
            }
            frame.records.clear();
            frame_bytes = 0;
        }
        Ok(true)
    })
    .map_err(snap_err)?;
    if let Some(e) = write_err {
        return Err(snap_err(e));
    }
    if !frame.records.is_empty() {
        write_frame(&mut out, &frame).map_err(snap_err)?;
    }
    let f = out.into_inner().map_err(|e| snap_err(e.into_error()))?;
    f.sync_all().map_err(snap_err)?;
    drop(f);
    std::fs::rename(&tmp, dir.join(&file)).map_err(snap_err)?;
    let record = SnapshotRecord { meta, file };
    let previous: Option<SnapshotRecord> = decode_meta(
        store
            .get(Cf::StateMeta, &meta_key(group, META_SNAPSHOT))
            .map_err(sm_read)?,
    )?;
    let mut b = Batch::new();
    let bytes = chatd_codec::encode(&record).map_err(snap_err)?;
    store
        .batch(&mut b)
        .put(Cf::StateMeta, &meta_key(group, META_SNAPSHOT), &bytes);
    store.write_synced_blocking(b).map_err(snap_err)?;
    if let Some(prev) = previous {
        let _ = std::fs::remove_file(dir.join(prev.file));
    }
    Ok(record)
}

fn write_frame(out: &mut impl Write, frame: &SnapshotFrame) -> Result<(), FrameError> {
    chatd_codec::frame::write_frame(out, frame, SNAPSHOT_FRAME_BYTES_MAX)
}

/// Reads the next frame; `None` at a clean end of file.
fn read_frame(input: &mut impl Read) -> Result<Option<SnapshotFrame>, FrameError> {
    chatd_codec::frame::read_frame(input, SNAPSHOT_FRAME_BYTES_MAX)
}

/// Replaces the group's records with the snapshot's and records it as current. Idempotent,
/// so a crash at any point is repaired by running it again at open.
fn install_from_file(
    store: &Storage,
    group: GroupId,
    dir: &Path,
    record: &SnapshotRecord,
) -> Result<(), StorageError> {
    let file = std::fs::File::open(dir.join(&record.file)).map_err(snap_err)?;
    let mut input = BufReader::new(file);
    let (start, end) = group_range(group);
    let mut b = Batch::new();
    store
        .batch(&mut b)
        .delete_range(Cf::StateMachine, &start, &end);
    store.write(b).map_err(snap_err)?;
    while let Some(frame) = read_frame(&mut input).map_err(snap_err)? {
        let mut b = Batch::new();
        {
            let mut w = store.batch(&mut b);
            for (k, v) in &frame.records {
                w.put(Cf::StateMachine, &sm_key(group, k), v);
            }
        }
        store.write(b).map_err(snap_err)?;
    }
    let previous: Option<SnapshotRecord> = decode_meta(
        store
            .get(Cf::StateMeta, &meta_key(group, META_SNAPSHOT))
            .map_err(sm_read)?,
    )?;
    let mut b = Batch::new();
    {
        let mut w = store.batch(&mut b);
        let la = chatd_codec::encode(&record.meta.last_log_id).map_err(snap_err)?;
        w.put(Cf::StateMeta, &meta_key(group, META_LAST_APPLIED), &la);
        let mb = chatd_codec::encode(&record.meta.last_membership).map_err(snap_err)?;
        w.put(Cf::StateMeta, &meta_key(group, META_MEMBERSHIP), &mb);
        let rb = chatd_codec::encode(record).map_err(snap_err)?;
        w.put(Cf::StateMeta, &meta_key(group, META_SNAPSHOT), &rb);
        w.delete(Cf::StateMeta, &meta_key(group, META_PENDING_INSTALL));
    }
    store.write_synced_blocking(b).map_err(snap_err)?;
    if let Some(prev) = previous {
        if prev.file != record.file {
            let _ = std::fs::remove_file(dir.join(prev.file));
        }
    }
    Ok(())
}

#[cfg(test)]
mod applied_mark_tests {
    #![allow(clippy::unwrap_used)]
    use std::time::{Duration, Instant};

    use chatd_storage::{NodeIdentity, StorageOptions};

    use super::*;

    fn store() -> (tempfile::TempDir, Storage) {
        let dir = tempfile::tempdir().unwrap();
        let ident = NodeIdentity {
            cluster_id: "t".into(),
            node_id: 1,
        };
        let store = Storage::open(dir.path(), &ident, &StorageOptions::default()).unwrap();
        (dir, store)
    }

    fn unlogged(store: &Storage, key: &[u8]) {
        let mut b = Batch::new();
        store.batch(&mut b).put(Cf::StateMachine, key, b"v");
        store.write_unlogged(b).unwrap();
    }

    #[tokio::test]
    async fn durable_state_needs_no_flush_and_written_state_is_flushed_once() {
        let (_dir, store) = store();
        let mark = AppliedMark::default();
        mark.durable_at(10);
        let wait = Duration::from_secs(5);
        assert_eq!(mark.make_durable(&store, 10, wait).await, Ok(true));
        assert_eq!(
            store.unlogged_flushes(),
            (0, 0),
            "durable already: no flush"
        );
        unlogged(&store, b"a");
        mark.written(20);
        assert_eq!(mark.make_durable(&store, 15, wait).await, Ok(true));
        assert_eq!(
            store.unlogged_flushes(),
            (1, 1),
            "one flush made 11..20 durable"
        );
        assert_eq!(mark.make_durable(&store, 20, wait).await, Ok(true));
        assert_eq!(store.unlogged_flushes(), (1, 1), "and covers a later ask");
    }

    #[tokio::test]
    async fn a_flush_for_another_group_covers_what_was_written_before_it() {
        let (_dir, store) = store();
        let (a, b) = (AppliedMark::default(), AppliedMark::default());
        let wait = Duration::from_secs(5);
        unlogged(&store, b"b");
        b.written(30);
        // b's ask records what a later flush will cover; nothing to flush for 0.
        assert_eq!(b.make_durable(&store, 0, wait).await, Ok(true));
        unlogged(&store, b"a");
        a.written(5);
        assert_eq!(a.make_durable(&store, 5, wait).await, Ok(true));
        assert_eq!(store.unlogged_flushes(), (1, 1));
        assert_eq!(b.make_durable(&store, 30, wait).await, Ok(true));
        assert_eq!(store.unlogged_flushes(), (1, 1), "a's flush served b");
    }

    /// At the bound: a purge past what is applied waits for the apply (an install finishing
    /// on the state machine's task) and goes on; one that nothing applies in time fails.
    #[tokio::test]
    async fn a_purge_past_the_applied_state_waits_for_it_up_to_the_bound() {
        let (_dir, store) = store();
        let mark = Arc::new(AppliedMark::default());
        mark.written(3);
        let later = mark.clone();
        let installer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            later.durable_at(400);
        });
        let started = Instant::now();
        assert_eq!(
            mark.make_durable(&store, 400, Duration::from_secs(10))
                .await,
            Ok(true)
        );
        assert!(started.elapsed() >= Duration::from_millis(150));
        installer.await.unwrap();
        let started = Instant::now();
        assert_eq!(
            mark.make_durable(&store, 401, Duration::from_millis(300))
                .await,
            Ok(false)
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
    }
}
