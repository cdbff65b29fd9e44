//! Nemeses: the faults, and a schedule of them drawn from a seed. Each fault is recorded
//! in the history as `invoke` (it starts) and `ok` (it is healed), with a description.
//!
//! Room is left for membership changes and lost unsynced writes (power-cut semantics):
//! they come with the issues that add them to chatd.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::cluster::{Cluster, NodeState, READY_TIMEOUT, STOP_TIMEOUT};
use crate::history::{History, Kind, Op, F};

/// A kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// kill -9 a random node, restart it when healed.
    Kill,
    /// kill -9 the leader of a partition holding the test's chats.
    KillLeader,
    /// SIGSTOP a random node, SIGCONT when healed.
    Pause,
    /// SIGSTOP the leader of a partition holding the test's chats, SIGCONT when healed.
    PauseLeader,
    /// Cut one random node off from the others.
    PartitionOne,
    /// Cut the leader of a test partition off from the others.
    PartitionLeader,
    /// Split the nodes into a majority and a minority.
    MajorityMinority,
    /// Two sides that only one node (the bridge) can reach both of.
    Bridge,
    /// SIGTERM (graceful drain) and restart each node in turn.
    RollingRestart,
}

impl FaultKind {
    /// The faults of the mixed schedule (rolling restart is its own schedule).
    pub const MIXED: [FaultKind; 7] = [
        FaultKind::Kill,
        FaultKind::KillLeader,
        FaultKind::Pause,
        FaultKind::PartitionOne,
        FaultKind::PartitionLeader,
        FaultKind::MajorityMinority,
        FaultKind::Bridge,
    ];

    /// Whether it needs iptables.
    pub fn needs_iptables(self) -> bool {
        matches!(
            self,
            FaultKind::PartitionOne
                | FaultKind::PartitionLeader
                | FaultKind::MajorityMinority
                | FaultKind::Bridge
        )
    }
}

/// How the schedule runs.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// The faults to draw from.
    pub kinds: Vec<FaultKind>,
    /// The seed of the draws.
    pub seed: u64,
    /// Quiet time between faults, drawn from this range (ms).
    pub quiet_ms: (u64, u64),
    /// How long a fault lasts, drawn from this range (ms).
    pub hold_ms: (u64, u64),
    /// No fault starts after this (the workload then runs healed for a while).
    pub until: Instant,
}

/// Shared between the nemesis thread and the rest of the run.
pub struct Nemesis {
    /// The cluster (locked while a fault is applied).
    pub cluster: Arc<Mutex<Cluster>>,
    /// The history.
    pub history: Arc<History>,
    /// Set to stop early (Ctrl-C).
    pub stop: Arc<AtomicBool>,
    /// Raft groups holding the test's chats.
    pub partitions: Vec<u64>,
}

/// What a fault did, to undo it.
enum Undo {
    Restart(usize),
    Resume(usize),
    Heal,
    Nothing,
}

/// Node ids that are up (not paused or down).
fn up_nodes(c: &Cluster) -> Vec<usize> {
    c.nodes
        .iter()
        .filter(|n| n.state() == NodeState::Up)
        .map(|n| n.id)
        .collect()
}

/// The leader of `group` as the admin API of any up node says.
fn leader_of(c: &Cluster, group: u64) -> Option<usize> {
    for n in &c.nodes {
        if n.state() != NodeState::Up {
            continue;
        }
        let Ok(v) = crate::http::get_json(&n.api(), "/v1/admin/cluster", &c.admin_token) else {
            continue;
        };
        let leader = v["partitions"].as_array().and_then(|ps| {
            ps.iter()
                .find(|p| p["group"].as_u64() == Some(group))
                .and_then(|p| p["leader"].as_u64())
        });
        if let Some(l) = leader {
            return usize::try_from(l).ok();
        }
    }
    None
}

impl Nemesis {
    fn record(&self, kind: Kind, fault: &str, error: Option<String>) {
        let mut op = Op::new("nemesis", kind, F::Fault);
        op.fault = Some(fault.to_string());
        op.error = error;
        self.history.record(op);
    }

    /// Sleeps up to `d`, waking early on stop; `false` if stopped.
    fn sleep(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        while Instant::now() < end {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
        }
        !self.stop.load(Ordering::Relaxed)
    }

    fn apply(&self, kind: FaultKind, rng: &mut StdRng) -> (String, Undo, Option<String>) {
        let mut c = self.cluster.lock();
        let n = c.nodes.len();
        let up = up_nodes(&c);
        let pick = |rng: &mut StdRng| up.choose(rng).copied();
        let leader = |rng: &mut StdRng, c: &Cluster| {
            let group = self.partitions.choose(rng).copied().unwrap_or(1);
            (group, leader_of(c, group))
        };
        let result = match kind {
            FaultKind::Kill => match pick(rng) {
                Some(id) => c
                    .kill(id)
                    .map(|()| (format!("kill -9 n{id}"), Undo::Restart(id))),
                None => Ok(("kill: no node up".into(), Undo::Nothing)),
            },
            FaultKind::KillLeader => match leader(rng, &c) {
                (g, Some(id)) => c
                    .kill(id)
                    .map(|()| (format!("kill -9 n{id} (leader of p{g})"), Undo::Restart(id))),
                (g, None) => Ok((format!("kill leader: p{g} has no leader"), Undo::Nothing)),
            },
            FaultKind::PauseLeader => match leader(rng, &c) {
                (g, Some(id)) => c
                    .pause(id)
                    .map(|()| (format!("pause n{id} (leader of p{g})"), Undo::Resume(id))),
                (g, None) => Ok((format!("pause leader: p{g} has no leader"), Undo::Nothing)),
            },
            FaultKind::Pause => match pick(rng) {
                Some(id) => c
                    .pause(id)
                    .map(|()| (format!("pause n{id}"), Undo::Resume(id))),
                None => Ok(("pause: no node up".into(), Undo::Nothing)),
            },
            FaultKind::PartitionOne | FaultKind::PartitionLeader => {
                let target = if kind == FaultKind::PartitionOne {
                    pick(rng).map(|id| (id, String::new()))
                } else {
                    match leader(rng, &c) {
                        (g, Some(id)) => Some((id, format!(" (leader of p{g})"))),
                        _ => None,
                    }
                };
                match target {
                    Some((id, why)) => {
                        let mut r = Ok(());
                        for other in (1..=n).filter(|o| *o != id) {
                            r = r.and_then(|()| c.cut(id, other));
                        }
                        r.map(|()| (format!("isolate n{id}{why}"), Undo::Heal))
                    }
                    None => Ok(("isolate: no target".into(), Undo::Nothing)),
                }
            }
            FaultKind::MajorityMinority => {
                let mut ids: Vec<usize> = (1..=n).collect();
                ids.shuffle(rng);
                let (minority, majority) = ids.split_at(n / 2);
                let mut r = Ok(());
                for a in minority {
                    for b in majority {
                        r = r.and_then(|()| c.cut(*a, *b));
                    }
                }
                r.map(|()| {
                    (
                        format!("partition minority {minority:?} | majority {majority:?}"),
                        Undo::Heal,
                    )
                })
            }
            FaultKind::Bridge => {
                let mut ids: Vec<usize> = (1..=n).collect();
                ids.shuffle(rng);
                let bridge = ids[0];
                let rest = &ids[1..];
                let (a, b) = rest.split_at(rest.len() / 2);
                let mut r = Ok(());
                for x in a {
                    for y in b {
                        r = r.and_then(|()| c.cut(*x, *y));
                    }
                }
                r.map(|()| {
                    (
                        format!("bridge n{bridge} between {a:?} and {b:?}"),
                        Undo::Heal,
                    )
                })
            }
            FaultKind::RollingRestart => Ok(("rolling restart".into(), Undo::Nothing)),
        };
        match result {
            Ok((name, undo)) => (name, undo, None),
            Err(e) => (format!("{kind:?}"), Undo::Heal, Some(e.to_string())),
        }
    }

    fn undo(&self, undo: Undo) -> Option<String> {
        let mut c = self.cluster.lock();
        let r = match undo {
            Undo::Restart(id) => c.start(id),
            Undo::Resume(id) => c.resume(id),
            Undo::Heal => c.heal(),
            Undo::Nothing => Ok(()),
        };
        r.err().map(|e| e.to_string())
    }

    /// SIGTERM, wait for the exit, restart and wait ready: node after node.
    fn rolling_restart(&self, pause_between: Duration) {
        let n = self.cluster.lock().nodes.len();
        for id in 1..=n {
            if !self.sleep(pause_between) {
                return;
            }
            let name = format!("drain+restart n{id}");
            self.record(Kind::Invoke, &name, None);
            let stopped = self.cluster.lock().stop(id, STOP_TIMEOUT);
            let mut error = match stopped {
                Ok((took, true)) => {
                    tracing_line(&format!(
                        "n{id} drained and exited 0 in {} ms",
                        took.as_millis()
                    ));
                    None
                }
                Ok((took, false)) => Some(format!(
                    "n{id} did not exit cleanly within {} ms of SIGTERM",
                    took.as_millis()
                )),
                Err(e) => Some(e.to_string()),
            };
            let started = self.cluster.lock().start(id);
            if let Err(e) = started {
                error.get_or_insert(e.to_string());
            }
            let ready = self.cluster.lock().wait_ready(id, READY_TIMEOUT);
            if let Err(e) = ready {
                error.get_or_insert(e.to_string());
            }
            self.record(Kind::Ok, &name, error);
        }
    }

    /// Runs the schedule until `schedule.until` (or stop), healing at the end.
    pub fn run(&self, schedule: &Schedule) {
        let mut rng = StdRng::seed_from_u64(schedule.seed);
        if schedule.kinds == [FaultKind::RollingRestart] {
            self.rolling_restart(Duration::from_millis(schedule.quiet_ms.0));
            return;
        }
        let draw = |rng: &mut StdRng, (lo, hi): (u64, u64)| {
            Duration::from_millis(if hi > lo { rng.gen_range(lo..=hi) } else { lo })
        };
        while Instant::now() < schedule.until {
            if !self.sleep(draw(&mut rng, schedule.quiet_ms)) || Instant::now() >= schedule.until {
                break;
            }
            let Some(kind) = schedule.kinds.choose(&mut rng).copied() else {
                break;
            };
            if kind == FaultKind::RollingRestart {
                self.rolling_restart(Duration::ZERO);
                continue;
            }
            let (name, undo, error) = self.apply(kind, &mut rng);
            self.record(Kind::Invoke, &name, error);
            tracing_line(&format!("fault: {name}"));
            let held = self.sleep(draw(&mut rng, schedule.hold_ms));
            let error = self.undo(undo);
            self.record(Kind::Ok, &name, error);
            tracing_line(&format!("healed: {name}"));
            if !held {
                break;
            }
        }
        // Whatever happens, leave the cluster whole.
        let mut c = self.cluster.lock();
        let _ = c.heal();
        for id in 1..=c.nodes.len() {
            match c.nodes[id - 1].state() {
                NodeState::Paused => {
                    let _ = c.resume(id);
                }
                NodeState::Down => {
                    let _ = c.start(id);
                }
                NodeState::Up => {}
            }
        }
    }
}

/// Progress on stderr (the node's tracing is in its own log files).
pub fn tracing_line(text: &str) {
    eprintln!("chatd-jepsen: {text}");
}
