//! Group commit on its own: `writers` threads each doing synced 1 KiB writes in a loop.
//! Prints durable writes per second and writes per fdatasync.
//!
//! cargo run -p chatd-storage --example group_commit -- [writers] [seconds]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatd_storage::{Batch, Cf, NodeIdentity, Storage, StorageOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let writers: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(64);
    let seconds: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(5);
    let dir = tempfile::tempdir()?;
    let id = NodeIdentity {
        cluster_id: "bench".into(),
        node_id: 1,
    };
    let store = Storage::open(dir.path(), &id, &StorageOptions::default())?;
    if std::env::var("ASYNC").is_ok() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let done = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        rt.block_on(async {
            let stop = Arc::new(AtomicBool::new(false));
            let tasks: Vec<_> = (0..writers)
                .map(|w| {
                    let (store, stop, done) = (store.clone(), stop.clone(), done.clone());
                    tokio::spawn(async move {
                        let value = vec![7u8; 1024];
                        let mut i = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            let mut b = Batch::new();
                            let key = [(w as u64).to_be_bytes(), i.to_be_bytes()].concat();
                            store.batch(&mut b).put(Cf::RaftLog, &key, &value);
                            if store.write_synced(b).await.is_ok() {
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                            i += 1;
                        }
                    })
                })
                .collect();
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            stop.store(true, Ordering::Relaxed);
            for t in tasks {
                let _ = t.await;
            }
        });
        let secs = started.elapsed().as_secs_f64();
        println!(
            "async writers={writers} durable_writes/s={:.0}",
            done.load(Ordering::Relaxed) as f64 / secs
        );
        return Ok(());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let (store, stop, done) = (store.clone(), stop.clone(), done.clone());
            std::thread::spawn(move || {
                let value = vec![7u8; 1024];
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut b = Batch::new();
                    let key = [(w as u64).to_be_bytes(), i.to_be_bytes()].concat();
                    store.batch(&mut b).put(Cf::RaftLog, &key, &value);
                    if store.write_synced_blocking(b).is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let secs = started.elapsed().as_secs_f64();
    let (syncs, writes) = store.sync_stats();
    println!(
        "writers={writers} durable_writes/s={:.0} fdatasyncs/s={:.0} writes_per_sync={:.1}",
        done.load(Ordering::Relaxed) as f64 / secs,
        syncs as f64 / secs,
        writes as f64 / syncs.max(1) as f64
    );
    Ok(())
}
