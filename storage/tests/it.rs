#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Storage against real RocksDB in temp directories.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use chatd_storage::{Batch, Cf, NodeIdentity, Storage, StorageError, StorageOptions};

fn ident(cluster: &str, node: u64) -> NodeIdentity {
    NodeIdentity {
        cluster_id: cluster.into(),
        node_id: node,
    }
}

fn put(store: &Storage, key: &[u8], value: &[u8]) -> Batch {
    let mut b = Batch::new();
    store.batch(&mut b).put(Cf::RaftLog, key, value);
    b
}

#[tokio::test]
async fn synced_writes_survive_reopen_and_group_commit_shares_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StorageOptions::default();
    {
        let store = Storage::open(dir.path(), &ident("c1", 1), &opts).unwrap();
        let mut tasks = Vec::new();
        for i in 0..2000u32 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                let b = put(&s, &i.to_be_bytes(), b"v");
                s.write_synced(b).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let (syncs, writes) = store.sync_stats();
        assert_eq!(writes, 2000);
        assert!(
            syncs >= 1 && syncs <= writes,
            "syncs {syncs} writes {writes}"
        );
    }
    let store = Storage::open(dir.path(), &ident("c1", 1), &opts).unwrap();
    let all = store
        .scan(Cf::RaftLog, &[], &[0xff; 8], usize::MAX)
        .unwrap();
    assert_eq!(all.len(), 2000);
    assert_eq!(
        store
            .get(Cf::RaftLog, &7u32.to_be_bytes())
            .unwrap()
            .as_deref(),
        Some(&b"v"[..])
    );
}

#[tokio::test]
async fn a_full_sync_queue_applies_backpressure_not_failure() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StorageOptions {
        sync_queue_writes_max: 1,
        ..StorageOptions::default()
    };
    let store = Storage::open(dir.path(), &ident("c1", 1), &opts).unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    for t in 0..4u32 {
        let s = store.clone();
        let d = done.clone();
        threads.push(std::thread::spawn(move || {
            for i in 0..200u32 {
                let d = d.clone();
                let key = [t.to_be_bytes(), i.to_be_bytes()].concat();
                s.write_durable(
                    put(&s, &key, b"x"),
                    Box::new(move |r| {
                        r.unwrap();
                        d.fetch_add(1, Ordering::SeqCst);
                    }),
                )
                .unwrap();
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    // One more synced write flushes the tail; then every callback has fired exactly once.
    store.write_synced(put(&store, b"z", b"z")).await.unwrap();
    assert_eq!(done.load(Ordering::SeqCst), 800);
}

#[test]
fn a_directory_of_another_node_or_cluster_is_refused_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StorageOptions::default();
    {
        let store = Storage::open(dir.path(), &ident("c1", 1), &opts).unwrap();
        store.write(put(&store, b"k", b"v")).unwrap();
        store.sync_wal().unwrap();
    }
    let err = Storage::open(dir.path(), &ident("c1", 2), &opts)
        .err()
        .expect("other node id must be refused");
    assert!(
        matches!(err, StorageError::IdentityMismatch { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("node 1 of cluster c1"), "{err}");
    let err = Storage::open(dir.path(), &ident("c2", 1), &opts)
        .err()
        .expect("other cluster must be refused");
    assert!(err.to_string().contains("cluster c2"), "{err}");
    let store = Storage::open(dir.path(), &ident("c1", 1), &opts).unwrap();
    assert_eq!(
        store.get(Cf::RaftLog, b"k").unwrap().as_deref(),
        Some(&b"v"[..])
    );
}

#[test]
fn a_truncated_directory_is_an_open_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StorageOptions::default();
    {
        let store = Storage::open(dir.path(), &ident("c1", 1), &opts).unwrap();
        store.write(put(&store, b"k", b"v")).unwrap();
        store.sync_wal().unwrap();
    }
    // Lose CURRENT: RocksDB no longer knows which MANIFEST is live.
    std::fs::remove_file(dir.path().join("CURRENT")).unwrap();
    let err = Storage::open(dir.path(), &ident("c1", 1), &opts)
        .err()
        .expect("truncated directory must be refused");
    assert!(matches!(err, StorageError::Open { .. }), "{err}");
    assert!(err.to_string().contains("CURRENT"), "{err}");

    // Lose the MANIFEST files but keep CURRENT.
    let dir2 = tempfile::tempdir().unwrap();
    {
        let store = Storage::open(dir2.path(), &ident("c1", 1), &opts).unwrap();
        store.write(put(&store, b"k", b"v")).unwrap();
    }
    for e in std::fs::read_dir(dir2.path()).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("MANIFEST") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    let err = Storage::open(dir2.path(), &ident("c1", 1), &opts)
        .err()
        .expect("missing manifest must be refused");
    assert!(matches!(err, StorageError::Open { .. }), "{err}");
}

#[test]
fn scans_respect_bounds_and_views_are_point_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = Storage::open(dir.path(), &ident("c1", 1), &StorageOptions::default()).unwrap();
    for i in 0u8..10 {
        store.write(put(&store, &[i], &[i])).unwrap();
    }
    let got = store.scan(Cf::RaftLog, &[2], &[5], 100).unwrap();
    assert_eq!(
        got.iter().map(|(k, _)| k[0]).collect::<Vec<_>>(),
        vec![2, 3, 4]
    );
    assert_eq!(store.scan(Cf::RaftLog, &[0], &[10], 3).unwrap().len(), 3);
    assert_eq!(
        store
            .last_in_range(Cf::RaftLog, &[0], &[7])
            .unwrap()
            .unwrap()
            .0,
        vec![6]
    );
    assert!(store
        .last_in_range(Cf::RaftLog, &[20], &[30])
        .unwrap()
        .is_none());
    let view = store.view();
    let mut b = Batch::new();
    store.batch(&mut b).delete_range(Cf::RaftLog, &[0], &[10]);
    store.write(b).unwrap();
    let mut seen = 0;
    view.scan_with(Cf::RaftLog, &[0], &[10], |_, _| {
        seen += 1;
        Ok(true)
    })
    .unwrap();
    assert_eq!(seen, 10, "the view predates the delete");
    assert!(store
        .scan(Cf::RaftLog, &[0], &[10], 100)
        .unwrap()
        .is_empty());
}

/// The crash model of unlogged writes, in a real process that dies without any cleanup
/// (`abort`: no destructor, no flush, as kill -9): synced WAL writes survive; unlogged
/// writes survive only if an explicit flush started after them; an unlogged batch over two
/// column families is lost or kept whole (atomic flush); and the flush counters say which.
#[test]
fn unlogged_writes_survive_a_crash_only_once_flushed_and_stay_atomic() {
    const CHILD: &str = "CHATD_STORAGE_CRASH_CHILD";
    if let Ok(dir) = std::env::var(CHILD) {
        // The child: write, then die.
        let store = Storage::open(
            std::path::Path::new(&dir),
            &ident("c1", 1),
            &StorageOptions::default(),
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(store.write_synced(put(&store, b"logged", b"1")))
            .unwrap();
        let two = |k: &[u8]| {
            let mut b = Batch::new();
            let mut w = store.batch(&mut b);
            w.put(Cf::StateMachine, k, b"record");
            w.put(Cf::StateMeta, k, b"mark");
            b
        };
        store.write_unlogged(two(b"early")).unwrap();
        let (started, through) = store.unlogged_flushes();
        assert_eq!((started, through), (0, 0));
        store.flush_unlogged().unwrap();
        let (started, through) = store.unlogged_flushes();
        assert_eq!(
            (started, through),
            (1, 1),
            "a write made at 0 is durable: 1 > 0"
        );
        store.write_unlogged(two(b"late")).unwrap();
        // A synced WAL write after it does not make the unlogged one durable.
        rt.block_on(store.write_synced(put(&store, b"logged-after", b"2")))
            .unwrap();
        assert_eq!(
            store.get(Cf::StateMachine, b"late").unwrap().as_deref(),
            Some(&b"record"[..])
        );
        std::process::abort();
    }
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "unlogged_writes_survive_a_crash_only_once_flushed_and_stay_atomic",
            "--nocapture",
        ])
        .env(CHILD, dir.path())
        .status()
        .unwrap();
    assert!(!status.success(), "the child must die by abort");
    let store = Storage::open(dir.path(), &ident("c1", 1), &StorageOptions::default()).unwrap();
    let get = |cf, k: &[u8]| store.get(cf, k).unwrap();
    assert_eq!(get(Cf::RaftLog, b"logged").as_deref(), Some(&b"1"[..]));
    assert_eq!(
        get(Cf::RaftLog, b"logged-after").as_deref(),
        Some(&b"2"[..])
    );
    assert_eq!(
        get(Cf::StateMachine, b"early").as_deref(),
        Some(&b"record"[..])
    );
    assert_eq!(get(Cf::StateMeta, b"early").as_deref(), Some(&b"mark"[..]));
    assert_eq!(get(Cf::StateMachine, b"late"), None, "never flushed: lost");
    assert_eq!(get(Cf::StateMeta, b"late"), None, "lost with its record");
}

/// A clean close flushes unlogged writes: nothing to replay at the next start.
#[test]
fn unlogged_writes_survive_a_clean_close() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Storage::open(dir.path(), &ident("c1", 1), &StorageOptions::default()).unwrap();
        let mut b = Batch::new();
        store.batch(&mut b).put(Cf::StateMachine, b"k", b"v");
        store.write_unlogged(b).unwrap();
        assert_eq!(store.unlogged_stats().0, 1);
    }
    let store = Storage::open(dir.path(), &ident("c1", 1), &StorageOptions::default()).unwrap();
    assert_eq!(
        store.get(Cf::StateMachine, b"k").unwrap().as_deref(),
        Some(&b"v"[..])
    );
}

/// The column families of the directory at `path`, as RocksDB lists them.
fn families(path: &std::path::Path) -> Vec<String> {
    let mut names = rocksdb::DB::list_cf(&rocksdb::Options::default(), path).unwrap();
    names.sort();
    names
}

#[test]
fn a_directory_from_before_the_blobs_family_gains_it_only_once_its_identity_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StorageOptions::default();
    {
        let store = Storage::open(dir.path(), &ident("c1", 1), &opts).unwrap();
        store.write(put(&store, b"k", b"v")).unwrap();
        store.sync_wal().unwrap();
    }
    // Make it a directory written before `blobs` existed.
    {
        let names = rocksdb::DB::list_cf(&rocksdb::Options::default(), dir.path()).unwrap();
        let mut db =
            rocksdb::DB::open_cf(&rocksdb::Options::default(), dir.path(), &names).unwrap();
        db.drop_cf(Cf::Blobs.name()).unwrap();
    }
    let before = families(dir.path());
    assert!(!before.iter().any(|n| n == "blobs"), "{before:?}");
    // Another node's open is refused and adds nothing.
    let err = Storage::open(dir.path(), &ident("c1", 2), &opts)
        .err()
        .expect("other node id must be refused");
    assert!(
        matches!(err, StorageError::IdentityMismatch { .. }),
        "{err}"
    );
    assert_eq!(families(dir.path()), before);
    // Its own node opens it, keeps its data and gains the family, for good.
    {
        let store = Storage::open(dir.path(), &ident("c1", 1), &opts).unwrap();
        assert_eq!(
            store.get(Cf::RaftLog, b"k").unwrap().as_deref(),
            Some(&b"v"[..])
        );
        let chunk = vec![7u8; (chatd_storage::BLOB_FILE_MIN_BYTES as usize) * 2];
        let mut b = Batch::new();
        store.batch(&mut b).put(Cf::Blobs, b"chunk", &chunk);
        store.write(b).unwrap();
        store.sync_wal().unwrap();
    }
    assert!(families(dir.path()).iter().any(|n| n == "blobs"));
    let store = Storage::open(dir.path(), &ident("c1", 1), &opts).unwrap();
    assert_eq!(
        store.get(Cf::Blobs, b"chunk").unwrap().map(|v| v.len()),
        Some((chatd_storage::BLOB_FILE_MIN_BYTES as usize) * 2)
    );
}
