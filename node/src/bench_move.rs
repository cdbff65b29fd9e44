//! `chatd bench move`: the time to move one replica of a partition that holds many
//! records to a new node, and the write latency on that partition while it moves. An
//! in-process cluster (real RocksDB with fsync, real QUIC on loopback): three nodes hold
//! one partition (R = 3); it is filled; a fourth node joins; the replica of one follower
//! moves to it (learner, snapshot + log catch-up, joint consensus) while one writer keeps
//! appending to the partition.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chatd_chat::ChatCommand;
use chatd_membership::{MemberCommand, MemberReply, NodeState};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::bench::{start_local_cluster, wait_ready};
use crate::config::Config;
use crate::init::{add_node, AddNodeSpec};
use crate::node::Node;

/// Longest wait for the cluster (and the added node) to be ready.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// The partition that is filled and moved.
const GROUP: u64 = 1;
/// Longest the move may take before the benchmark gives up.
const MOVE_DEADLINE_S: u64 = 1_800;

/// What to run.
#[derive(Clone, Debug)]
pub struct MoveSpec {
    /// Records written to the partition before the move.
    pub records: u64,
    /// Bytes per record.
    pub record_bytes: usize,
    /// Appends in flight while filling.
    pub fill_in_flight: usize,
    /// First port (node i uses base + 10·(i−1) and the next one).
    pub base_port: u16,
}

/// Latency figures of a single writer (one append in flight).
#[derive(Debug, Serialize)]
pub struct Latency {
    pub appends: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// What was measured.
#[derive(Debug, Serialize)]
pub struct MoveResult {
    pub records: u64,
    pub record_bytes: usize,
    pub fill_seconds: f64,
    pub move_seconds: f64,
    pub before_move: Latency,
    pub during_move: Latency,
}

/// Runs the benchmark and returns its figures.
pub async fn bench_move(spec: &MoveSpec) -> anyhow::Result<MoveResult> {
    let dir = tempfile::tempdir().context("cannot create a temp dir")?;
    let mut nodes = start_local_cluster(dir.path(), 3, 1, spec.base_port, READY_WITHIN).await?;

    // Fill the partition.
    let fill_started = Instant::now();
    let written = Arc::new(AtomicU64::new(0));
    let payload = vec![b'x'; spec.record_bytes];
    let mut tasks = Vec::new();
    for w in 0..spec.fill_in_flight.max(1) {
        let (nodes, written, payload) = (nodes.clone(), written.clone(), payload.clone());
        let records = spec.records;
        tasks.push(tokio::spawn(async move {
            let cmd = chatd_codec::encode(&ChatCommand::Append(payload))?;
            while written.fetch_add(1, Ordering::Relaxed) < records {
                let node = &nodes[w % nodes.len()];
                if node.propose(GROUP, cmd.clone()).await.is_err() {
                    written.fetch_sub(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let fill_seconds = fill_started.elapsed().as_secs_f64();

    // One writer before the move (baseline), then during it.
    let before_move = single_writer(&nodes[0], &payload, None, Duration::from_secs(5)).await?;

    let extra = add_node(&AddNodeSpec {
        ca_dir: dir.path().to_path_buf(),
        id: 4,
        host: std::net::IpAddr::from([127, 0, 0, 1]),
        api_port: spec.base_port.saturating_add(30),
        out: dir.path().join("node-4"),
        seed_config: None,
        data_dir_root: None,
    })?;
    nodes.push(Node::start(Config::load(&extra.config)?).await?);
    wait_ready(&nodes, READY_WITHIN).await?;
    // Ready is not yet active: the new node asks group 0 to activate it (retried every
    // 500 ms), and a move to a node that is not active is refused.
    let deadline = Instant::now() + READY_WITHIN;
    let m = loop {
        let m = nodes[0]
            .meta
            .membership()
            .context("group 0 not known on node 1")?;
        if m.state_of(4) == Some(NodeState::Active) {
            break m;
        }
        anyhow::ensure!(Instant::now() < deadline, "node 4 not active within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let part = m.part(GROUP).context("no partition 1")?;
    let leader = nodes[0].registry.leader(GROUP);
    let remove = *part
        .replicas
        .iter()
        .rev()
        .find(|r| Some(**r) != leader)
        .context("no follower to move")?;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (node, payload, stop) = (nodes[0].clone(), payload.clone(), stop.clone());
        tokio::spawn(async move {
            single_writer(
                &node,
                &payload,
                Some(stop),
                Duration::from_secs(MOVE_DEADLINE_S),
            )
            .await
        })
    };
    let move_started = Instant::now();
    match nodes[0]
        .propose_member(MemberCommand::BeginMove {
            group: GROUP,
            epoch: part.epoch,
            add: 4,
            remove,
        })
        .await
    {
        Ok(MemberReply::Done { .. }) => {}
        Ok(other) => anyhow::bail!("the move was refused: {other}"),
        Err(e) => anyhow::bail!("the move was not recorded: {e}"),
    }
    let deadline = Instant::now() + Duration::from_secs(MOVE_DEADLINE_S);
    loop {
        let done = nodes[0].meta.membership().is_some_and(|m| {
            m.part(GROUP)
                .is_some_and(|p| p.moving.is_none() && p.replicas.contains(&4))
        });
        if done {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the move did not end in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let move_seconds = move_started.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    let during_move = writer.await??;
    for n in &nodes {
        n.shutdown().await;
    }
    Ok(MoveResult {
        records: spec.records,
        record_bytes: spec.record_bytes,
        fill_seconds,
        move_seconds,
        before_move,
        during_move,
    })
}

/// Appends one record at a time through `node` until `stop` is set (or for `limit`).
async fn single_writer(
    node: &Node,
    payload: &[u8],
    stop: Option<Arc<AtomicBool>>,
    limit: Duration,
) -> anyhow::Result<Latency> {
    let cmd = chatd_codec::encode(&ChatCommand::Append(payload.to_vec()))?;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let (mut appends, mut errors) = (0, 0);
    let started = Instant::now();
    while started.elapsed() < limit && !stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
        let t = Instant::now();
        match node.propose(GROUP, cmd.clone()).await {
            Ok(_) => {
                appends += 1;
                hist.saturating_record(t.elapsed().as_micros() as u64);
            }
            Err(_) => errors += 1,
        }
    }
    let ms = |v: u64| v as f64 / 1000.0;
    Ok(Latency {
        appends,
        errors,
        p50_ms: ms(hist.value_at_quantile(0.5)),
        p99_ms: ms(hist.value_at_quantile(0.99)),
        max_ms: ms(hist.max()),
    })
}
