//! Running a node: start-up (with systemd notifications), serving, and the graceful drain
//! on SIGTERM or Ctrl-C.
//!
//! Start-up: `EXTEND_TIMEOUT_USEC` while storage opens, logs replay and partitions find
//! leaders (bounded by `lifecycle.startup_extend_max_ms`), then `READY=1` once `/readyz`
//! would answer 200. `WATCHDOG=1` all along when the unit has a watchdog.
//!
//! Drain, in order: `STOPPING=1`; no new WebSocket sessions (`/v1/ws` and `/readyz`
//! answer 503 `draining`); the leadership of every group this node leads moves to another
//! healthy replica (`lifecycle.drain_partition_timeout_ms` per group, all of it within
//! `lifecycle.drain_timeout_ms`); client sessions are closed with 1001 (reconnect to another
//! node); storage is synced; groups and QUIC stop (`SHUTDOWN_TIMEOUT_MS`); exit 0. A second
//! signal skips what is left of the drain.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chatd_raftlog::{GroupId, NodeId};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::api::Readiness;
use crate::config::{Config, LifecycleSection};
use crate::node::Node;
use crate::systemd::Notifier;

/// How often start-up checks whether the node is ready.
const READY_POLL_MS: u64 = 100;
/// How often start-up refreshes its status line while not ready.
const STARTUP_STATUS_EVERY_MS: u64 = 2_000;
/// Each start-up extension asks systemd for this much more time ...
const STARTUP_EXTEND_MS: u64 = 30_000;
/// ... and is renewed this often, well inside it.
const STARTUP_EXTEND_EVERY_MS: u64 = 10_000;
/// How long the drain waits for sessions to end after asking them to close (1001).
pub const SESSIONS_CLOSE_WAIT_MS: u64 = 1_000;
/// How often the drain re-sends the close to sessions that are still open (a session
/// that was being set up when the drain started registers late).
const SESSIONS_CLOSE_POLL_MS: u64 = 50;
/// Bound on one attempt to hand a group to one replica during a drain (the group's own
/// bound, `lifecycle.drain_partition_timeout_ms`, covers every attempt).
pub const DRAIN_ATTEMPT_TIMEOUT_MS: u64 = 1_000;
/// Bound on stopping the Raft groups and the QUIC endpoint after the drain.
pub const SHUTDOWN_TIMEOUT_MS: u64 = 5_000;

/// The directive added to every log filter that does not mention
/// `openraft::replication`: openraft logs each failed replication RPC at ERROR, per group
/// and retry (~1,700 lines in 30 s while one peer was down); chatd reports a peer's loss
/// and return once each instead (`chatd_raftlog::PeerHealth`, `chatd_peer_*` metrics).
/// Its engine's replication handler also warns per group and failed heartbeat (~750 lines
/// in 30 s of faults): off too. Name `openraft::replication` in the filter to see openraft's
/// own lines.
pub const REPLICATION_LOG_DIRECTIVE: &str =
    "openraft::replication=off,openraft::engine::handler::replication_handler=off";

/// The filter text in effect: `configured` plus [`REPLICATION_LOG_DIRECTIVE`] unless it
/// says something about `openraft::replication` itself.
pub fn effective_log_filter(configured: &str) -> String {
    if configured.contains("openraft::replication") {
        configured.to_string()
    } else if configured.trim().is_empty() {
        REPLICATION_LOG_DIRECTIVE.to_string()
    } else {
        format!("{configured},{REPLICATION_LOG_DIRECTIVE}")
    }
}

/// Sets up tracing from the config (RUST_LOG overrides its filter).
pub fn init_tracing(config: &Config) {
    let configured = std::env::var("RUST_LOG").unwrap_or_else(|_| config.log.filter.clone());
    let filter = tracing_subscriber::EnvFilter::try_new(effective_log_filter(&configured))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = if config.log.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Exit status of a node stopped by its disk failing (the process aborts: 134, SIGABRT).
/// Fail-stop: after a failed write or sync the node cannot trust what its log holds
/// beyond what was synced, so it stops at once rather than run on or retry the sync;
/// systemd restarts it (`Restart=on-failure`) and the restart recovers from the disk.
fn stop_on_disk_failure(op: &'static str, cause: &str) {
    tracing::error!(
        op,
        cause,
        "the disk failed: stopping this node at once (fail-stop); a restart recovers \
         what was synced, and the cluster goes on without it meanwhile"
    );
    std::process::abort();
}

/// Logs a failed notification; systemd being unreachable never stops the node.
fn sd_log(result: Result<(), crate::systemd::NotifyError>) {
    if let Err(e) = result {
        tracing::warn!(error = %e, "systemd notification failed");
    }
}

/// What ends a node that group 0 removed from the cluster (in place of a signal's name).
const REMOVED: &str = "removed from the cluster";

/// Loads the config at `path`, runs the node, and drains it gracefully on a signal, or once
/// group 0 removed it from the cluster (then it exits 0 and never starts again).
pub async fn run(path: &Path) -> anyhow::Result<()> {
    // Signals first: a SIGTERM during start-up must drain, not kill.
    let mut signals = Signals::install()?;
    let config = Config::load(path)?;
    init_tracing(&config);
    chatd_storage::on_disk_failure(stop_on_disk_failure);
    #[cfg(debug_assertions)]
    if chatd_storage::ack_before_sync() {
        tracing::error!(
            "CHATD_TEST_ACK_BEFORE_SYNC=1: writes are acknowledged BEFORE they are synced; \
             a deliberately broken build for fault-injection tests, never for real data"
        );
    }
    let lifecycle = config.lifecycle.clone();
    let sd = Notifier::from_env();
    if sd.enabled() {
        tracing::info!(
            watchdog_ms = sd.watchdog_interval().map(|d| d.as_millis() as u64),
            "systemd notifications on"
        );
    }
    let watchdog = sd.watchdog_interval().map(|every| {
        let sd = sd.clone();
        tokio::spawn(async move {
            loop {
                sd_log(sd.watchdog());
                tokio::time::sleep(every).await;
            }
        })
    });
    sd_log(sd.status("starting: opening storage and replaying logs"));
    let extender = tokio::spawn(extend_startup(
        sd.clone(),
        Duration::from_millis(lifecycle.startup_extend_max_ms),
    ));
    let started = Node::start(config)
        .await
        .with_context(|| format!("node with config {} could not start", path.display()));
    let node = match started {
        Ok(n) => n,
        Err(e) => {
            extender.abort();
            sd_log(sd.status(&format!("failed: {e:#}")));
            return Err(e);
        }
    };
    let server = match serve_api(node.clone()).await {
        Ok(s) => s,
        Err(e) => {
            extender.abort();
            sd_log(sd.status(&format!("failed: {e:#}")));
            node.shutdown().await;
            return Err(e);
        }
    };
    let signalled = tokio::select! {
        _ = wait_ready(&node, &sd) => None,
        s = signals.recv() => Some(s),
        _ = node.retired() => Some(REMOVED),
    };
    extender.abort();
    let first = match signalled {
        Some(s) => s,
        None => {
            let status = format!(
                "ready: node {} serving clients on {}, {} groups hosted",
                node.id,
                node.api_addr().map(|a| a.to_string()).unwrap_or_default(),
                node.registry.groups().len()
            );
            tracing::info!("{status}");
            sd_log(sd.ready(&status));
            tokio::select! {
                s = signals.recv() => s,
                _ = node.retired() => REMOVED,
            }
        }
    };
    tracing::info!(signal = first, "signal received: draining");
    tokio::select! {
        report = drain(&node, &sd, &lifecycle) => {
            tracing::info!(
                moved = report.moved.len(),
                not_moved = report.not_moved.len(),
                sessions_left = report.sessions_left,
                "drain: done"
            );
        }
        s = signals.recv() => {
            tracing::warn!(signal = s, "second signal: skipping the rest of the drain");
        }
    }
    server.abort();
    sd_log(sd.status("stopping: syncing storage, stopping groups"));
    tracing::info!("drain: syncing storage");
    if let Err(e) = node.store.sync_wal() {
        tracing::warn!(error = %e, "drain: storage sync failed");
    }
    let shutdown = Duration::from_millis(SHUTDOWN_TIMEOUT_MS);
    if tokio::time::timeout(shutdown, node.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout_ms = SHUTDOWN_TIMEOUT_MS,
            "groups did not stop in time; syncing storage and exiting"
        );
        if let Err(e) = node.store.sync_wal() {
            tracing::warn!(error = %e, "final storage sync failed");
        }
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    tracing::info!("exiting");
    Ok(())
}

/// While start-up runs, asks systemd for more time (`EXTEND_TIMEOUT_USEC`), at most
/// `max` in all; then the unit's own start timeout applies.
async fn extend_startup(sd: Notifier, max: Duration) {
    if !sd.enabled() {
        return;
    }
    let began = Instant::now();
    loop {
        let left = max.saturating_sub(began.elapsed());
        if left.is_zero() {
            tracing::warn!(
                startup_extend_max_ms = max.as_millis() as u64,
                "start-up is taking longer than lifecycle.startup_extend_max_ms; no more \
                 start timeout extensions"
            );
            return;
        }
        let by = left.min(Duration::from_millis(STARTUP_EXTEND_MS));
        sd_log(sd.extend_timeout(by));
        tokio::time::sleep(by.min(Duration::from_millis(STARTUP_EXTEND_EVERY_MS))).await;
    }
}

/// Returns once the node is ready as `/readyz` sees it; reports progress meanwhile.
async fn wait_ready(node: &Node, sd: &Notifier) {
    let mut last_status = Instant::now() - Duration::from_millis(STARTUP_STATUS_EVERY_MS);
    loop {
        if crate::api::readiness(node) == Readiness::Ready {
            return;
        }
        if last_status.elapsed() >= Duration::from_millis(STARTUP_STATUS_EVERY_MS) {
            last_status = Instant::now();
            let groups = node.registry.groups();
            let led = groups
                .iter()
                .filter(|g| node.registry.leader(**g).is_some())
                .count();
            let status = format!(
                "recovering: {led} of {} hosted groups have a leader, metadata {}",
                groups.len(),
                if node.meta.current().is_some() {
                    "bootstrapped"
                } else {
                    "pending"
                }
            );
            tracing::info!("{status}");
            sd_log(sd.status(&status));
        }
        tokio::time::sleep(Duration::from_millis(READY_POLL_MS)).await;
    }
}

/// What a drain did.
#[derive(Debug, Default)]
pub struct DrainReport {
    /// Groups whose leadership moved, and to whom.
    pub moved: Vec<(GroupId, NodeId)>,
    /// Groups this node still led, and why.
    pub not_moved: Vec<(GroupId, String)>,
    /// Sessions still open when the close wait ended.
    pub sessions_left: i64,
}

/// Drains `node`: no new sessions, leadership away, sessions closed with 1001. Bounded by
/// `lifecycle.drain_timeout_ms` plus `SESSIONS_CLOSE_WAIT_MS`. Storage sync and shutdown
/// are the caller's.
pub async fn drain(node: &Arc<Node>, sd: &Notifier, lifecycle: &LifecycleSection) -> DrainReport {
    let deadline = Instant::now() + Duration::from_millis(lifecycle.drain_timeout_ms);
    sd_log(sd.stopping("draining: no new sessions, moving partition leadership away"));
    node.start_draining();
    tracing::info!("drain: refusing new sessions (/v1/ws and /readyz answer 503 draining)");

    let (moved, not_moved) = move_leadership(
        node,
        Duration::from_millis(lifecycle.drain_partition_timeout_ms),
        deadline,
    )
    .await;

    let open = node.gateway.metrics.connections.load(Ordering::Relaxed);
    sd_log(sd.status(&format!("draining: closing {open} client sessions (1001)")));
    tracing::info!(sessions = open, "drain: closing client sessions with 1001");
    let close_deadline = Instant::now() + Duration::from_millis(SESSIONS_CLOSE_WAIT_MS);
    let sessions_left = loop {
        node.gateway.close_all(
            chatd_proto::close::GOING_AWAY,
            "node draining: reconnect to another node",
        );
        let left = node.gateway.metrics.connections.load(Ordering::Relaxed);
        if left <= 0 || Instant::now() >= close_deadline {
            break left.max(0);
        }
        tokio::time::sleep(Duration::from_millis(SESSIONS_CLOSE_POLL_MS)).await;
    };
    if sessions_left > 0 {
        tracing::warn!(
            sessions = sessions_left,
            wait_ms = SESSIONS_CLOSE_WAIT_MS,
            "drain: sessions still open after the close wait"
        );
    }
    DrainReport {
        moved,
        not_moved,
        sessions_left,
    }
}

/// Moves the leadership of every group `node` leads to another replica that answers,
/// the most caught-up first. Each group within `per_group`, all before `deadline`.
async fn move_leadership(
    node: &Arc<Node>,
    per_group: Duration,
    deadline: Instant,
) -> (Vec<(GroupId, NodeId)>, Vec<(GroupId, String)>) {
    let led = node.led_groups();
    if led.is_empty() {
        tracing::info!("drain: this node leads no group");
        return (Vec::new(), Vec::new());
    }
    let others: Vec<NodeId> = node
        .peers()
        .keys()
        .copied()
        .filter(|id| *id != node.id)
        .collect();
    if others.is_empty() {
        tracing::info!(
            groups = led.len(),
            "drain: single-node cluster, no replica to take over"
        );
        return (Vec::new(), Vec::new());
    }
    tracing::info!(groups = ?led, "drain: moving leadership away");
    // Healthy candidates: the peers that answer a status call, with their log positions.
    let statuses = tokio::time::timeout_at(
        deadline.into(),
        futures::future::join_all(
            others
                .iter()
                .map(|id| async move { (*id, node.peer_status(*id).await) }),
        ),
    )
    .await
    .unwrap_or_default();
    let mut reachable = HashSet::new();
    let mut last_index: HashMap<(NodeId, GroupId), u64> = HashMap::new();
    for (id, status) in statuses {
        match status {
            Ok(s) => {
                reachable.insert(id);
                for g in s.groups {
                    last_index.insert((id, g.group), g.last_index);
                }
            }
            Err(e) => tracing::warn!(node = id, error = %e, "drain: peer not answering"),
        }
    }
    let (reachable, last_index) = (&reachable, &last_index);
    let results = futures::future::join_all(led.iter().map(|&group| async move {
        let group_deadline = deadline.min(Instant::now() + per_group);
        let mut candidates: Vec<NodeId> = node
            .replicas_of(group)
            .unwrap_or_default()
            .into_iter()
            .filter(|r| *r != node.id && reachable.contains(r))
            .collect();
        candidates
            .sort_by_key(|r| std::cmp::Reverse(last_index.get(&(*r, group)).copied().unwrap_or(0)));
        if candidates.is_empty() {
            return (group, Err("no other replica answers".to_string()));
        }
        // Try the candidates in turn, each attempt bounded, until the group's time is up.
        // A lost campaign leaves the group to a normal election among the others (this
        // node no longer campaigns), so "someone else leads now" is success too.
        let mut why = String::from("no time left");
        for to in candidates.iter().cycle() {
            let left = group_deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let attempt = left.min(Duration::from_millis(DRAIN_ATTEMPT_TIMEOUT_MS));
            match tokio::time::timeout(attempt, node.transfer_leadership(group, *to)).await {
                Ok(Ok(leader)) => return (group, Ok(leader)),
                Ok(Err(e)) => why = e,
                Err(_) => {
                    why = format!(
                        "node {to} did not take over within {} ms",
                        attempt.as_millis()
                    )
                }
            }
            if let Some(l) = node.local_leader(group).filter(|l| *l != node.id) {
                return (group, Ok(l));
            }
            tracing::debug!(group, to, error = %why, "drain: transfer attempt failed");
        }
        (group, Err(why))
    }))
    .await;
    let (mut moved, mut not_moved) = (Vec::new(), Vec::new());
    for (group, r) in results {
        match r {
            Ok(to) => {
                tracing::info!(group, to, "drain: leadership moved");
                moved.push((group, to));
            }
            Err(why) => {
                tracing::warn!(group, error = %why, "drain: leadership not moved");
                not_moved.push((group, why));
            }
        }
    }
    (moved, not_moved)
}

/// Binds the node's API address and serves the HTTP API in a task.
pub async fn serve_api(node: Arc<Node>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let addr = node
        .api_addr()
        .context("this node has no API address in the peer list")?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on the API address {addr}"))?;
    tracing::info!(%addr, "API listening");
    let app = crate::api::router(node);
    // Small frames (acks, pushes) must not wait for Nagle's algorithm: with delayed ACKs
    // on the peer that costs ~40 ms per exchange.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "API server failed");
        }
    }))
}

/// SIGTERM and SIGINT, listened for from the moment they are installed (a signal that
/// arrives before `recv` is called is not lost).
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Installs the handlers.
    pub fn install() -> anyhow::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
        })
    }

    /// The next signal's name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    match Signals::install() {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod log_filter_tests {
    use super::*;

    #[test]
    fn openraft_replication_lines_are_off_unless_the_filter_names_them() {
        assert_eq!(
            effective_log_filter("info,openraft=warn"),
            "info,openraft=warn,openraft::replication=off,\
             openraft::engine::handler::replication_handler=off"
        );
        assert_eq!(effective_log_filter(""), REPLICATION_LOG_DIRECTIVE);
        assert_eq!(
            effective_log_filter("info,openraft::replication=debug"),
            "info,openraft::replication=debug"
        );
    }
}
