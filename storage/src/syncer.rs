//! The group-commit syncer: one thread that turns many durable-write requests into one
//! fdatasync of the WAL.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Weak};

use crate::{Inner, StorageError};

/// Called once the write it belongs to is on disk (or the sync failed).
pub type DurableCallback = Box<dyn FnOnce(Result<(), StorageError>) + Send>;

/// Upper bound on callbacks served by one fdatasync; more wait for the next one.
pub(crate) const SYNC_BATCH_WRITES_MAX: usize = 8192;

pub(crate) struct Syncer {
    tx: SyncSender<DurableCallback>,
    stats: Arc<Stats>,
}

#[derive(Default)]
struct Stats {
    syncs: AtomicU64,
    writes: AtomicU64,
}

impl Syncer {
    pub(crate) fn start(db: Weak<Inner>, queue_writes_max: usize) -> Self {
        let (tx, rx) = sync_channel(queue_writes_max.max(1));
        let stats = Arc::new(Stats::default());
        let thread_stats = stats.clone();
        let spawned = std::thread::Builder::new()
            .name("chatd-syncer".into())
            .spawn(move || run(db, rx, thread_stats));
        if let Err(e) = spawned {
            // Without the thread every durable write fails with Closed: loud, never silent.
            tracing::error!(error = %e, "cannot start the WAL syncer thread");
        }
        Self { tx, stats }
    }

    /// Queues `cb` for the next sync. Blocks while `queue_writes_max` callbacks are waiting:
    /// backpressure on writers when the disk cannot keep up.
    pub(crate) fn submit(&self, cb: DurableCallback) -> Result<(), StorageError> {
        self.tx.send(cb).map_err(|_| StorageError::Closed)
    }

    pub(crate) fn stats(&self) -> (u64, u64) {
        (
            self.stats.syncs.load(Ordering::Relaxed),
            self.stats.writes.load(Ordering::Relaxed),
        )
    }
}

/// The WAL's fdatasync. A debug build (never the release binary) can be told to skip it
/// and acknowledge anyway (`CHATD_TEST_ACK_BEFORE_SYNC=1`): the deliberately broken build
/// chatd-jepsen's power cuts must catch.
fn sync_wal(db: &rocksdb::DB) -> Result<(), rocksdb::Error> {
    #[cfg(debug_assertions)]
    if ack_before_sync() {
        return db.flush_wal(false);
    }
    db.flush_wal(true)
}

/// Whether the broken-build switch is on (debug builds only; read once).
#[cfg(debug_assertions)]
pub fn ack_before_sync() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("CHATD_TEST_ACK_BEFORE_SYNC").as_deref() == Ok("1"))
}

/// How long the syncer waits for more writes once several are already waiting.
pub(crate) const SYNC_LINGER_US: u64 = 200;

fn drain(rx: &Receiver<DurableCallback>, pending: &mut Vec<DurableCallback>) {
    while pending.len() < SYNC_BATCH_WRITES_MAX {
        match rx.try_recv() {
            Ok(cb) => pending.push(cb),
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
        }
    }
}

fn run(db: Weak<Inner>, rx: Receiver<DurableCallback>, stats: Arc<Stats>) {
    let mut pending: Vec<DurableCallback> = Vec::with_capacity(SYNC_BATCH_WRITES_MAX);
    while let Ok(first) = rx.recv() {
        pending.push(first);
        drain(&rx, &mut pending);
        // Under load (more than one writer waiting), linger briefly so the fdatasync serves
        // more writes: on a VM an fdatasync costs CPU (exits) as well as time. A lone writer
        // is synced at once.
        if pending.len() > 1 && SYNC_LINGER_US > 0 {
            std::thread::sleep(std::time::Duration::from_micros(SYNC_LINGER_US));
            drain(&rx, &mut pending);
        }
        // Every write whose callback is in `pending` returned before its callback was
        // queued, so it is in the WAL buffer now and this one sync covers all of them.
        let result = match db.upgrade() {
            Some(inner) => sync_wal(&inner.db).map_err(|e| {
                crate::disk_failed_if("sync_wal", &e);
                e.into_string()
            }),
            None => Err("storage is shut down".to_string()),
        };
        stats.syncs.fetch_add(1, Ordering::Relaxed);
        stats
            .writes
            .fetch_add(pending.len() as u64, Ordering::Relaxed);
        if let Err(cause) = &result {
            tracing::error!(%cause, "WAL fdatasync failed; failing {} durable writes", pending.len());
        }
        for cb in pending.drain(..) {
            cb(result.clone().map_err(|cause| StorageError::Rocks {
                op: "sync_wal",
                cause,
            }));
        }
    }
}
