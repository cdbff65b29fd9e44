//! One RocksDB per node, with column families, explicit options and group commit.
//!
//! `storage` knows nothing of Raft, chats or the network: it stores keys and values in named
//! column families and makes writes durable. Its one promise beyond RocksDB's is
//! [`Storage::write_durable`]: the callback fires only after the write is fdatasynced, and one
//! fdatasync covers every durable write made by every caller since the previous one (group
//! commit). A dedicated syncer thread does the syncing; callers never block on the disk.

#[cfg(test)]
mod golden;
mod identity;
mod syncer;
#[cfg(debug_assertions)]
pub use syncer::ack_before_sync;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use identity::NodeIdentity;
use rocksdb::{BlockBasedOptions, ColumnFamilyDescriptor, FlushOptions, Options, WriteOptions, DB};
pub use syncer::DurableCallback;
use syncer::Syncer;

/// A key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// The column families of a chatd node's database.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cf {
    /// Replicated logs: `group | index` to an encoded entry.
    RaftLog,
    /// Log metadata per group: vote, last purged log id.
    RaftMeta,
    /// State machine data of every group, under the group's prefix.
    StateMachine,
    /// State machine metadata per group: last applied, membership, snapshot.
    StateMeta,
    /// This node's identity: which cluster and which node the directory belongs to.
    NodeMeta,
    /// File chunks, beside the Raft logs (never in them): `group | file | index` to the
    /// chunk's bytes. Values from [`BLOB_FILE_MIN_BYTES`] on live in RocksDB's blob files,
    /// written once, not rewritten by compaction. Added after the first release: a data
    /// directory without it gains it at open, once its identity is checked.
    Blobs,
}

/// Values of [`Cf::Blobs`] this large or larger are kept in blob files.
pub const BLOB_FILE_MIN_BYTES: u64 = 64 << 10;

/// The `blobs` family's memtable size: chunk bytes pass through it before their blob file,
/// so it bounds what uploads hold in memory (two of them at most: one filling, one being
/// flushed), not the other families' 64 MiB.
pub const BLOBS_WRITE_BUFFER_BYTES: usize = 8 << 20;

impl Cf {
    /// Every column family, in creation order.
    pub const ALL: [Cf; 6] = [
        Cf::RaftLog,
        Cf::RaftMeta,
        Cf::StateMachine,
        Cf::StateMeta,
        Cf::NodeMeta,
        Cf::Blobs,
    ];

    /// The column family's name in RocksDB (frozen: renaming one loses its data).
    pub fn name(self) -> &'static str {
        match self {
            Cf::RaftLog => "raft_log",
            Cf::RaftMeta => "raft_meta",
            Cf::StateMachine => "sm",
            Cf::StateMeta => "sm_meta",
            Cf::NodeMeta => "node_meta",
            Cf::Blobs => "blobs",
        }
    }
}

/// Errors of the storage layer. Each names what failed and where.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// RocksDB refused to open the directory: missing files, corruption, a truncated directory.
    #[error("cannot open the database in {path}: {cause} (is the data directory complete and written by chatd?)")]
    Open { path: PathBuf, cause: String },
    /// The directory belongs to another cluster or node.
    #[error("data directory {path} belongs to {found}, but this node is configured as {expected}; refusing to start")]
    IdentityMismatch {
        path: PathBuf,
        found: NodeIdentity,
        expected: NodeIdentity,
    },
    /// A value in the database could not be decoded.
    #[error("corrupt value in column family {cf}: {cause}")]
    Corrupt { cf: &'static str, cause: String },
    /// A read or write failed.
    #[error("rocksdb {op} failed: {cause}")]
    Rocks { op: &'static str, cause: String },
    /// The syncer thread has stopped (the store is shutting down).
    #[error("storage is shut down")]
    Closed,
}

fn rocks(op: &'static str) -> impl FnOnce(rocksdb::Error) -> StorageError {
    move |e| {
        disk_failed_if(op, &e);
        StorageError::Rocks {
            op,
            cause: e.into_string(),
        }
    }
}

/// What the process does when its disk fails: set once, by the binary, at start.
static DISK_FAILURE: std::sync::OnceLock<fn(&'static str, &str)> = std::sync::OnceLock::new();

/// Sets what happens when RocksDB reports an I/O error or corruption on any read, write
/// or sync (EIO, ENOSPC, a failed fdatasync): `handler(op, cause)`. chatd stops the
/// process at once (fail-stop): after a failed sync the kernel may have dropped the
/// unsynced pages, so running on, or retrying the sync, could acknowledge writes that
/// are not on disk ("fsyncgate"); a restart recovers from what was synced. Without a
/// handler (tests, tools) the error is only returned. The first handler set wins.
pub fn on_disk_failure(handler: fn(&'static str, &str)) {
    let _ = DISK_FAILURE.set(handler);
}

/// Calls the disk-failure handler if `e` is one (an I/O error or corruption).
fn disk_failed_if(op: &'static str, e: &rocksdb::Error) {
    if matches!(
        e.kind(),
        rocksdb::ErrorKind::IOError | rocksdb::ErrorKind::Corruption
    ) {
        if let Some(h) = DISK_FAILURE.get() {
            h(op, e.as_ref());
        }
    }
}

/// RocksDB and group-commit settings, all explicit.
#[derive(Clone, Debug)]
pub struct StorageOptions {
    /// Shared block cache for all column families.
    pub block_cache_bytes: usize,
    /// Memtable size per column family.
    pub write_buffer_bytes: usize,
    /// Upper bound on open SST files.
    pub max_open_files: i32,
    /// Background compaction and flush threads.
    pub background_jobs: i32,
    /// Keep WAL writes in RocksDB's buffer until the next sync (true), so that a crash loses
    /// exactly what was never synced, as a power loss would. Every write that needs to be
    /// durable is synced explicitly, so this costs nothing in safety.
    pub wal_buffered: bool,
    /// Upper bound on durable writes waiting for the next fdatasync.
    pub sync_queue_writes_max: usize,
    /// RocksDB's blob garbage collection in the `blobs` family: compactions rewrite the
    /// live chunks of the oldest blob files so that files partly freed by collection
    /// shrink. Off by default: those rewrites halved upload throughput (1 GiB at R = 3:
    /// 62 vs 127 MiB/s), and without them a blob file (one memtable flush, at most
    /// `BLOBS_WRITE_BUFFER_BYTES` of chunks) is deleted once none of its chunks is live.
    pub blob_gc: bool,
}

impl Default for StorageOptions {
    fn default() -> Self {
        Self {
            block_cache_bytes: 256 << 20,
            write_buffer_bytes: 64 << 20,
            max_open_files: 4096,
            background_jobs: 2,
            wal_buffered: true,
            sync_queue_writes_max: 65_536,
            blob_gc: false,
        }
    }
}

/// A set of writes applied atomically.
#[derive(Default)]
pub struct Batch {
    inner: rocksdb::WriteBatch,
    ops: usize,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }
    /// Number of operations in the batch.
    pub fn len(&self) -> usize {
        self.ops
    }
    /// True when the batch holds no operation.
    pub fn is_empty(&self) -> bool {
        self.ops == 0
    }
    /// Bytes the batch will write.
    pub fn size_bytes(&self) -> usize {
        self.inner.size_in_bytes()
    }
    fn push(&mut self) {
        self.ops += 1;
    }
}

/// One batch against a specific store: column families resolved.
pub struct BatchWriter<'a> {
    store: &'a Storage,
    batch: &'a mut Batch,
}

impl BatchWriter<'_> {
    /// Sets `key` to `value` in `cf`.
    pub fn put(&mut self, cf: Cf, key: &[u8], value: &[u8]) {
        self.batch.inner.put_cf(self.store.cf(cf), key, value);
        self.batch.push();
    }
    /// Deletes `key` in `cf`.
    pub fn delete(&mut self, cf: Cf, key: &[u8]) {
        self.batch.inner.delete_cf(self.store.cf(cf), key);
        self.batch.push();
    }
    /// Deletes every key in `from..to` in `cf`.
    pub fn delete_range(&mut self, cf: Cf, from: &[u8], to: &[u8]) {
        self.batch
            .inner
            .delete_range_cf(self.store.cf(cf), from, to);
        self.batch.push();
    }
}

/// The node's database. Cheap to clone.
#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

struct Inner {
    db: DB,
    path: PathBuf,
    syncer: Syncer,
    unlogged_writes: std::sync::atomic::AtomicU64,
    unlogged_flushes_started: std::sync::atomic::AtomicU64,
    unlogged_flushed_through: std::sync::atomic::AtomicU64,
    unlogged_flushes_failed: std::sync::atomic::AtomicU64,
    flushing: std::sync::Mutex<()>,
}

impl Storage {
    /// Opens (or creates) the database in `path` for the node `identity`.
    ///
    /// A directory written by another cluster or node id is refused with
    /// [`StorageError::IdentityMismatch`]; a directory RocksDB cannot open (corrupt, truncated)
    /// with [`StorageError::Open`]. Nothing is modified in either case.
    pub fn open(
        path: &Path,
        identity: &NodeIdentity,
        options: &StorageOptions,
    ) -> Result<Self, StorageError> {
        let open_err = |cause: String| StorageError::Open {
            path: path.to_path_buf(),
            cause,
        };
        let fresh = !path.join("CURRENT").exists();
        if fresh && path.exists() && dir_has_rocksdb_files(path) {
            // SST or WAL files without CURRENT: a truncated copy, not a new directory.
            return Err(open_err(
                "the directory holds database files but no CURRENT file (truncated?)".into(),
            ));
        }
        std::fs::create_dir_all(path).map_err(|e| open_err(e.to_string()))?;

        let cache = rocksdb::Cache::new_lru_cache(options.block_cache_bytes);
        let mut block = BlockBasedOptions::default();
        block.set_block_cache(&cache);
        block.set_bloom_filter(10.0, false);
        block.set_block_size(16 << 10);

        let mut db_opts = Options::default();
        db_opts.create_if_missing(fresh);
        db_opts.create_missing_column_families(fresh);
        db_opts.set_paranoid_checks(true);
        db_opts.set_max_open_files(options.max_open_files);
        db_opts.set_max_background_jobs(options.background_jobs);
        db_opts.set_manual_wal_flush(options.wal_buffered);
        // Unlogged writes (`write_unlogged`: the state machines) are durable only once
        // flushed; their families must flush together, at one sequence number, or a crash
        // could keep a state machine's records from one moment and its last-applied mark
        // from another.
        db_opts.set_atomic_flush(true);
        db_opts.set_keep_log_file_num(4);
        db_opts.set_max_total_wal_size(512 << 20);

        let cf_options = |cf: Cf| {
            let mut o = Options::default();
            o.set_write_buffer_size(options.write_buffer_bytes);
            o.set_block_based_table_factory(&block);
            o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            if cf == Cf::Blobs {
                // File bytes: out of the LSM tree, not recompressed (media is compressed).
                o.set_write_buffer_size(BLOBS_WRITE_BUFFER_BYTES);
                o.set_max_write_buffer_number(2);
                o.set_enable_blob_files(true);
                o.set_min_blob_size(BLOB_FILE_MIN_BYTES);
                o.set_blob_compression_type(rocksdb::DBCompressionType::None);
                o.set_enable_blob_gc(options.blob_gc);
            }
            o
        };
        // The families the directory has: a directory from before a family was added opens
        // without it and gains it below, after its identity is checked (a directory of
        // another node is left exactly as it was).
        let existing: Vec<String> = if fresh {
            Cf::ALL.iter().map(|cf| cf.name().to_string()).collect()
        } else {
            DB::list_cf(&db_opts, path).map_err(|e| open_err(e.into_string()))?
        };
        let descriptors = Cf::ALL
            .iter()
            .filter(|cf| existing.iter().any(|name| name == cf.name()))
            .map(|cf| ColumnFamilyDescriptor::new(cf.name(), cf_options(*cf)));
        let mut db = DB::open_cf_descriptors(&db_opts, path, descriptors)
            .map_err(|e| open_err(e.into_string()))?;
        identity::check_or_claim(&db, path, identity, fresh)?;
        for cf in Cf::ALL {
            if db.cf_handle(cf.name()).is_none() {
                tracing::info!(path = %path.display(), family = cf.name(), "adding a column family to the data directory");
                db.create_cf(cf.name(), &cf_options(cf))
                    .map_err(|e| open_err(e.into_string()))?;
            }
        }

        let inner = Arc::new_cyclic(|weak: &std::sync::Weak<Inner>| Inner {
            db,
            path: path.to_path_buf(),
            syncer: Syncer::start(weak.clone(), options.sync_queue_writes_max),
            unlogged_writes: Default::default(),
            unlogged_flushes_started: Default::default(),
            unlogged_flushed_through: Default::default(),
            unlogged_flushes_failed: Default::default(),
            flushing: std::sync::Mutex::new(()),
        });
        Ok(Self { inner })
    }

    /// The directory of the database.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn cf(&self, cf: Cf) -> &rocksdb::ColumnFamily {
        // Every family in Cf::ALL is created at open, so the handle always exists.
        match self.inner.db.cf_handle(cf.name()) {
            Some(handle) => handle,
            None => unreachable!("column family {} created at open", cf.name()),
        }
    }

    /// Builds `batch` with column families resolved against this store.
    pub fn batch<'a>(&'a self, batch: &'a mut Batch) -> BatchWriter<'a> {
        BatchWriter { store: self, batch }
    }

    /// Reads `key` from `cf`.
    pub fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.db.get_cf(self.cf(cf), key).map_err(rocks("get"))
    }

    /// Reads up to `limit` pairs with keys in `from..to`, in key order.
    pub fn scan(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> Result<Vec<KeyValue>, StorageError> {
        let mut out = Vec::new();
        self.scan_with(cf, from, to, |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            out.len() < limit
        })?;
        Ok(out)
    }

    /// Calls `f` for each pair with a key in `from..to`, in key order, until it returns false.
    pub fn scan_with(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(to.to_vec());
        let mut it = self.inner.db.raw_iterator_cf_opt(self.cf(cf), ro);
        it.seek(from);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !f(k, v) {
                return Ok(());
            }
            it.next();
        }
        it.status().map_err(rocks("scan"))
    }

    /// The last pair with a key in `from..to`, if any.
    pub fn last_in_range(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
    ) -> Result<Option<KeyValue>, StorageError> {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_lower_bound(from.to_vec());
        ro.set_iterate_upper_bound(to.to_vec());
        let mut it = self.inner.db.raw_iterator_cf_opt(self.cf(cf), ro);
        it.seek_to_last();
        let found = match (it.key(), it.value()) {
            (Some(k), Some(v)) => Some((k.to_vec(), v.to_vec())),
            _ => None,
        };
        it.status().map_err(rocks("last_in_range"))?;
        Ok(found)
    }

    /// A consistent point-in-time view for long reads (snapshots).
    pub fn view(&self) -> View<'_> {
        View {
            store: self,
            snap: self.inner.db.snapshot(),
        }
    }

    /// Writes `batch` without waiting for the disk. Visible to readers on return; durable after
    /// the next sync (any later [`Self::write_durable`] or [`Self::write_synced`]).
    pub fn write(&self, batch: Batch) -> Result<(), StorageError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(false);
        self.inner
            .db
            .write_opt(batch.inner, &wo)
            .map_err(rocks("write"))
    }

    /// Writes `batch` without the write-ahead log: visible to readers on return, durable only
    /// once its memtables are flushed ([`Self::flush_unlogged`], RocksDB's own flushes, or
    /// closing the database). A crash before then loses the write, atomically with every
    /// later unlogged write. For state rebuilt from a durable log after a crash (the state
    /// machines, replayed from their Raft logs past their durable last-applied mark), so
    /// that their records do not go through the WAL and its fdatasync a second time.
    pub fn write_unlogged(&self, batch: Batch) -> Result<(), StorageError> {
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.inner
            .db
            .write_opt(batch.inner, &wo)
            .map_err(rocks("write_unlogged"))?;
        self.inner
            .unlogged_writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Makes every unlogged write made before the call durable: flushes the state
    /// machines' column families (atomically: one sequence number for both) to SST files
    /// and waits. Blocks the calling thread for the flush (milliseconds to a second): call
    /// it from a blocking context.
    pub fn flush_unlogged(&self) -> Result<(), StorageError> {
        use std::sync::atomic::Ordering::SeqCst;
        // One at a time, so that "flush n started after x" and "flush n is done" can be
        // told apart with two counters (see `unlogged_flushes`).
        let _one = self
            .inner
            .flushing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let number = self.inner.unlogged_flushes_started.fetch_add(1, SeqCst) + 1;
        let mut fo = FlushOptions::default();
        fo.set_wait(true);
        let cfs = [self.cf(Cf::StateMachine), self.cf(Cf::StateMeta)];
        let result = self
            .inner
            .db
            .flush_cfs_opt(&cfs, &fo)
            .map_err(rocks("flush_unlogged"));
        if result.is_ok() {
            self.inner.unlogged_flushed_through.store(number, SeqCst);
        } else {
            self.inner.unlogged_flushes_failed.fetch_add(1, SeqCst);
        }
        result
    }

    /// Explicit flushes of unlogged writes, numbered from 1 as they start: `(started,
    /// flushed_through)`, the number of the last one started and of the last one that
    /// succeeded. They run one at a time, each covering every write made before it started,
    /// so an unlogged write made when `started` was `s` is durable once
    /// `flushed_through > s`.
    pub fn unlogged_flushes(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::SeqCst;
        (
            self.inner.unlogged_flushes_started.load(SeqCst),
            self.inner.unlogged_flushed_through.load(SeqCst),
        )
    }

    /// Unlogged writes made, explicit flushes started, and explicit flushes that failed.
    pub fn unlogged_stats(&self) -> (u64, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.inner.unlogged_writes.load(Relaxed),
            self.inner.unlogged_flushes_started.load(Relaxed),
            self.inner.unlogged_flushes_failed.load(Relaxed),
        )
    }

    /// Writes `batch` (visible on return) and calls `on_durable` once it is fdatasynced.
    /// One fdatasync serves every durable write waiting at that moment: group commit.
    pub fn write_durable(
        &self,
        batch: Batch,
        on_durable: DurableCallback,
    ) -> Result<(), StorageError> {
        self.write(batch)?;
        self.inner.syncer.submit(on_durable)
    }

    /// Writes `batch` and waits until it is fdatasynced.
    pub async fn write_synced(&self, batch: Batch) -> Result<(), StorageError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.write_durable(
            batch,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )?;
        rx.await.map_err(|_| StorageError::Closed)?
    }

    /// Flushes and fdatasyncs the WAL now (used by the syncer and at shutdown).
    pub fn sync_wal(&self) -> Result<(), StorageError> {
        self.inner.db.flush_wal(true).map_err(rocks("sync_wal"))
    }

    /// How many fdatasyncs the syncer has done, and how many durable writes they covered.
    pub fn sync_stats(&self) -> (u64, u64) {
        self.inner.syncer.stats()
    }
}

/// A point-in-time view of the database.
pub struct View<'a> {
    store: &'a Storage,
    snap: rocksdb::Snapshot<'a>,
}

impl View<'_> {
    /// Reads `key` from `cf` as of the view.
    pub fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.snap
            .get_cf(self.store.cf(cf), key)
            .map_err(rocks("view get"))
    }

    /// Calls `f` for each pair with a key in `from..to` as of the view, until it returns false.
    pub fn scan_with(
        &self,
        cf: Cf,
        from: &[u8],
        to: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> Result<bool, StorageError>,
    ) -> Result<(), StorageError> {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(to.to_vec());
        let mut it = self.snap.raw_iterator_cf_opt(self.store.cf(cf), ro);
        it.seek(from);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !f(k, v)? {
                return Ok(());
            }
            it.next();
        }
        it.status().map_err(rocks("view scan"))
    }
}

fn dir_has_rocksdb_files(path: &Path) -> bool {
    std::fs::read_dir(path)
        .map(|entries| {
            entries.flatten().any(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.ends_with(".sst") || name.ends_with(".log") || name.starts_with("MANIFEST")
            })
        })
        .unwrap_or(false)
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Make everything written so far durable before the handle goes away: the WAL, and
        // the unlogged writes (a clean stop then needs no replay at the next start).
        if let Err(e) = self.db.flush_wal(true) {
            tracing::warn!(error = %e, "final WAL sync failed");
        }
        if *self.unlogged_writes.get_mut() > 0 {
            let mut fo = FlushOptions::default();
            fo.set_wait(true);
            let cfs: Vec<&rocksdb::ColumnFamily> = [Cf::StateMachine, Cf::StateMeta]
                .iter()
                .filter_map(|cf| self.db.cf_handle(cf.name()))
                .collect();
            if let Err(e) = self.db.flush_cfs_opt(&cfs, &fo) {
                tracing::warn!(error = %e, "final flush of unlogged writes failed");
            }
        }
    }
}

impl Storage {
    /// How many handles to this database exist, this one included. The database is
    /// closed, and its directory lock released, when the last one is dropped; a reopen in
    /// the same process must wait for that.
    pub fn handles(&self) -> usize {
        Arc::strong_count(&self.inner)
    }

    /// Writes `batch` and blocks the calling thread until it is fdatasynced. For blocking
    /// contexts (snapshot install); async code uses [`Self::write_synced`].
    pub fn write_synced_blocking(&self, batch: Batch) -> Result<(), StorageError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.write_durable(
            batch,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )?;
        rx.recv().map_err(|_| StorageError::Closed)?
    }
}
