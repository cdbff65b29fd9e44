//! `chatd bench log`: replicated appends on an in-process cluster (real RocksDB with fsync,
//! real QUIC on loopback), proposals made directly on each partition's leader.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::config::{Config, RaftSection};
use crate::init::{init_cluster, InitSpec};
use crate::node::Node;
use chatd_chat::ChatCommand;

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchSpec {
    pub nodes: u32,
    pub partitions: u32,
    pub in_flight: usize,
    pub seconds: u64,
    pub entry_bytes: usize,
    pub base_port: u16,
}

/// What was measured.
#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub nodes: u32,
    pub partitions: u32,
    pub in_flight: usize,
    pub entry_bytes: usize,
    pub seconds: f64,
    pub entries: u64,
    pub errors: u64,
    pub entries_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub fsyncs_per_node: Vec<u64>,
}

/// Creates a cluster of `nodes` on loopback in `dir` (`partitions` partitions, API ports
/// from `base_port`), starts every node in this process, and waits until all are ready.
pub(crate) async fn start_local_cluster(
    dir: &std::path::Path,
    nodes: u32,
    partitions: u32,
    base_port: u16,
    ready_within: Duration,
) -> anyhow::Result<Vec<Arc<Node>>> {
    let files = init_cluster(&InitSpec {
        nodes,
        out: dir.to_path_buf(),
        hosts: vec![std::net::IpAddr::from([127, 0, 0, 1])],
        base_port,
        partitions,
        raft: RaftSection::default(),
        gateway: Default::default(),
        notify: Default::default(),
        data_dir_root: None,
    })?;
    let mut started = Vec::new();
    for f in &files {
        started.push(Node::start(Config::load(&f.config)?).await?);
    }
    wait_ready(&started, ready_within).await?;
    Ok(started)
}

/// Waits until every node of `nodes` is ready, at most `within`.
pub(crate) async fn wait_ready(nodes: &[Arc<Node>], within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !nodes.iter().all(|n| n.ready()) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "cluster not ready within {} s",
            within.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Runs the benchmark and returns its figures.
pub async fn bench_log(spec: &BenchSpec) -> anyhow::Result<BenchResult> {
    let dir = tempfile::tempdir().context("cannot create a temp dir")?;
    let nodes = start_local_cluster(
        dir.path(),
        spec.nodes,
        spec.partitions,
        spec.base_port,
        Duration::from_secs(30),
    )
    .await?;
    let syncs_before: Vec<u64> = nodes.iter().map(|n| n.store.sync_stats().0).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let payload = vec![b'x'; spec.entry_bytes];
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..spec.in_flight {
        let nodes = nodes.clone();
        let stop = stop.clone();
        let errors = errors.clone();
        let payload = payload.clone();
        let partitions = spec.partitions as u64;
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .map_err(|e| anyhow::anyhow!("histogram: {e}"))?;
            let mut i = w as u64;
            while !stop.load(Ordering::Relaxed) {
                let group = 1 + i % partitions;
                i += 7919;
                let leader = nodes.iter().find(|n| n.registry.leads(group));
                let Some(node) = leader else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                let cmd = chatd_codec::encode(&ChatCommand::Append(payload.clone()))?;
                let t = Instant::now();
                match node.propose(group, cmd).await {
                    Ok(_) => {
                        let us = t.elapsed().as_micros() as u64;
                        let _ = hist.record(us.max(1));
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok::<_, anyhow::Error>(hist)
        }));
    }
    tokio::time::sleep(Duration::from_secs(spec.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| anyhow::anyhow!("histogram: {e}"))?;
    for t in tasks {
        let h = t.await.context("bench worker panicked")??;
        total
            .add(h)
            .map_err(|e| anyhow::anyhow!("histogram: {e}"))?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let fsyncs_per_node = nodes
        .iter()
        .zip(&syncs_before)
        .map(|(n, b)| n.store.sync_stats().0 - b)
        .collect();
    for n in &nodes {
        n.shutdown().await;
    }
    let ms = |q: f64| total.value_at_quantile(q) as f64 / 1000.0;
    Ok(BenchResult {
        nodes: spec.nodes,
        partitions: spec.partitions,
        in_flight: spec.in_flight,
        entry_bytes: spec.entry_bytes,
        seconds: elapsed,
        entries: total.len(),
        errors: errors.load(Ordering::Relaxed),
        entries_per_sec: total.len() as f64 / elapsed,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: total.max() as f64 / 1000.0,
        fsyncs_per_node,
    })
}
