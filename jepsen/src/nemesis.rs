//! Nemeses: the faults, and a schedule of them drawn from a seed. Each fault is recorded
//! in the history as `invoke` (it starts) and `ok` (it is healed), with a description.
//!
//! Membership changes (`membership`) are recorded the same way, named
//! `membership add nX`, `membership remove nX` and `membership replace nX by nY`: an add
//! ends when the new node is active and ready (its replicas arrive in the background); a
//! removal or replacement ends when the cluster tombstoned the old node (and a live one
//! exited by itself). One change at a time. Alone, changes follow one another; composed
//! with other faults (`mixed`), a change takes a turn whenever none is in progress and
//! another fault came since the last, and the schedule goes on while a removal's replicas
//! move, so moves run under kills, pauses and partitions.
//!
//! Disk and clock faults: `power-cut` (one node) and `power-cut-all` (every member at
//! once) kill -9 and then make each disk lose what was not synced ([`crate::lazyfs`]);
//! `disk-error` arms EIO or ENOSPC on one node's disk, which must then stop (fail-stop)
//! rather than run on; `clock` jumps one node's wall clock (libfaketime) forwards or
//! backwards by 1 s to 6 h, or strobes it, and sets it right when healed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::cluster::{
    write_clock, Cluster, NodeState, Standing, NODE_IDS_MAX, READY_TIMEOUT, STOP_TIMEOUT,
};
use crate::history::{History, Kind, Op, F};
use crate::lazyfs::{CutReport, Fault};
use crate::workload::NodeDirectory;

/// Most nodes in the cluster at any time: members, a leaving node, and a dead node not
/// yet removed all count.
pub const MEMBERSHIP_NODES_MAX: usize = 6;
/// Fewest active members (the replication factor): a removal at this size adds a node
/// first.
pub const MEMBERSHIP_ACTIVE_MIN: usize = 3;
/// Nodes of `cluster init` (the seed peers of every added node) kept as members, so a
/// new node always finds a seed to admit it.
pub const SEEDS_KEPT_MIN: usize = 2;
/// How long an added node may take to be listed active once it is ready.
pub const ACTIVE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a removal may take, from its request to the node's tombstone: its replicas
/// move off two at a time (64 partitions: ~25 s measured on an idle machine).
pub const REMOVE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a tombstoned live node may take to drain and exit by itself before it is
/// killed (it learns of its removal within chatd's 30 s grace).
pub const REMOVED_EXIT_TIMEOUT: Duration = Duration::from_secs(45);
/// How long a node whose disk returned errors may take to stop once the fault is healed
/// before it counts as having run on.
pub const DISK_FAILURE_STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest clock jump of the `clock` nemesis (6 h); the smallest is 1 s.
pub const CLOCK_JUMP_MS_MAX: u64 = 6 * 3600 * 1000;
/// Smallest clock jump of the `clock` nemesis.
pub const CLOCK_JUMP_MS_MIN: u64 = 1000;
/// How often a strobed clock flips between real time and the offset (ms, range).
const STROBE_FLIP_MS: (u64, u64) = (20, 200);
/// How often a removal in progress is checked.
const PENDING_POLL_EVERY: Duration = Duration::from_millis(500);

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
    /// A membership change: add a node; remove a live node (adding one first at 3 nodes);
    /// or replace one (kill -9, wipe its disk, add a fresh node, remove the old one dead).
    Membership,
    /// kill -9 one node and drop what its disk had not synced; restart when healed.
    PowerCut,
    /// kill -9 every member at once and drop what each disk had not synced.
    PowerCutAll,
    /// EIO on write, EIO on fsync, or ENOSPC on one node's disk; the node must stop.
    DiskError,
    /// Jump one node's wall clock forwards or backwards (1 s to 6 h), or strobe it.
    Clock,
}

impl FaultKind {
    /// The faults of the mixed schedule (rolling restart is its own schedule).
    pub const MIXED: [FaultKind; 8] = [
        FaultKind::Kill,
        FaultKind::KillLeader,
        FaultKind::Pause,
        FaultKind::PartitionOne,
        FaultKind::PartitionLeader,
        FaultKind::MajorityMinority,
        FaultKind::Bridge,
        FaultKind::Membership,
    ];

    /// The disk and clock faults (with the mixed ones: `all`).
    pub const DISK_AND_CLOCK: [FaultKind; 4] = [
        FaultKind::PowerCut,
        FaultKind::PowerCutAll,
        FaultKind::DiskError,
        FaultKind::Clock,
    ];

    /// Every fault but the rolling restart: the mixed ones, power cuts, disk errors and
    /// clocks.
    pub fn all() -> Vec<FaultKind> {
        Self::MIXED
            .iter()
            .chain(Self::DISK_AND_CLOCK.iter())
            .copied()
            .collect()
    }

    /// Whether it needs lazy disks (FUSE, root).
    pub fn needs_disks(self) -> bool {
        matches!(
            self,
            FaultKind::PowerCut | FaultKind::PowerCutAll | FaultKind::DiskError
        )
    }

    /// Whether it needs libfaketime.
    pub fn needs_clock(self) -> bool {
        self == FaultKind::Clock
    }

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
    /// The nodes clients use: a node joins it once active, leaves it when its removal
    /// begins.
    nodes: NodeDirectory,
    /// The removal in progress (one membership change at a time).
    pending: Mutex<Option<Pending>>,
}

/// A removal in progress: asked, not yet tombstoned (or, live, not yet exited).
struct Pending {
    /// The name of its fault window.
    name: String,
    /// The node removed.
    node: usize,
    /// A live node that must drain and exit by itself (not a dead one).
    live: bool,
    /// When the change began.
    started: Instant,
    /// When it is given up.
    deadline: Instant,
    /// When the cluster listed the node removed.
    removed_at: Option<Instant>,
    /// When to check next.
    next_poll: Instant,
    /// What already went wrong in this change.
    error: Option<String>,
}

/// What a membership change will do.
enum Plan {
    Add,
    Remove { victim: usize, add_first: bool },
    Replace { victim: usize },
    Nothing(String),
}

/// What a fault did, to undo it.
enum Undo {
    Restart(usize),
    RestartAll(Vec<usize>),
    Resume(usize),
    Heal,
    /// Clear node `id`'s disk fault; `before`: its injected errors when armed.
    ClearDisk {
        id: usize,
        before: u64,
    },
    /// Set node `id`'s clock right (stopping its strobe first).
    Clock {
        id: usize,
        strobe: Option<Strobe>,
    },
    Nothing,
}

/// A thread flipping a node's clock file between real time and an offset.
struct Strobe {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Strobe {
    fn start(clock: std::path::PathBuf, offset_ms: i64, flip: Duration) -> Strobe {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut on = true;
            while !flag.load(Ordering::Relaxed) {
                let _ = write_clock(&clock, if on { offset_ms } else { 0 });
                on = !on;
                std::thread::sleep(flip);
            }
        });
        Strobe { stop, thread }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

/// ` (lost 12 pages, 3 namespace changes undone, torn 1536 B)`.
fn describe_cut(reports: &[(usize, CutReport)]) -> String {
    let pages: usize = reports.iter().map(|(_, r)| r.pages_lost).sum();
    let ops: usize = reports.iter().map(|(_, r)| r.ops_undone).sum();
    let torn: usize = reports.iter().map(|(_, r)| r.torn_bytes).sum();
    let mut s = format!(" (lost {pages} unsynced pages, {ops} namespace changes undone");
    if torn > 0 {
        s.push_str(&format!(", torn {torn} B"));
    }
    s.push(')');
    s
}

/// `1h02m`, `45.2s`.
fn human_ms(ms: u64) -> String {
    if ms >= 3_600_000 {
        format!("{}h{:02}m", ms / 3_600_000, (ms % 3_600_000) / 60_000)
    } else if ms >= 60_000 {
        format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000)
    } else {
        format!("{:.1}s", ms as f64 / 1000.0)
    }
}

/// Ids of the members that are up (not paused or down, not leaving or removed).
fn up_nodes(c: &Cluster) -> Vec<usize> {
    c.nodes
        .iter()
        .filter(|n| n.state() == NodeState::Up && n.standing() == Standing::Member)
        .map(|n| n.id)
        .collect()
}

/// The leader of `group` as the admin API of any up member says.
fn leader_of(c: &Cluster, group: u64) -> Option<usize> {
    for n in &c.nodes {
        if n.state() != NodeState::Up || n.standing() != Standing::Member {
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
    /// A nemesis for `cluster`, recording into `history`, changing `nodes` as nodes join
    /// and leave.
    pub fn new(
        cluster: Arc<Mutex<Cluster>>,
        history: Arc<History>,
        stop: Arc<AtomicBool>,
        partitions: Vec<u64>,
        nodes: NodeDirectory,
    ) -> Nemesis {
        Nemesis {
            cluster,
            history,
            stop,
            partitions,
            nodes,
            pending: Mutex::new(None),
        }
    }

    fn record(&self, kind: Kind, fault: &str, error: Option<String>) {
        let mut op = Op::new("nemesis", kind, F::Fault);
        op.fault = Some(fault.to_string());
        op.error = error;
        self.history.record(op);
    }

    /// Sleeps up to `d`, waking early on stop; `false` if stopped. A removal in progress
    /// is checked meanwhile.
    fn sleep(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        while Instant::now() < end {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            self.poll_pending();
            std::thread::sleep(
                Duration::from_millis(50).min(end.saturating_duration_since(Instant::now())),
            );
        }
        !self.stop.load(Ordering::Relaxed)
    }

    fn apply(&self, kind: FaultKind, rng: &mut StdRng) -> (String, Undo, Option<String>) {
        let mut c = self.cluster.lock();
        // Partitions split the nodes in the cluster (a leaving node too).
        let ids = c.in_cluster();
        let up = up_nodes(&c);
        let pick = |rng: &mut StdRng| up.choose(rng).copied();
        // The leader of a test partition, if it is a member (a leaving node is no target
        // of other faults); else why not.
        let leader = |rng: &mut StdRng, c: &Cluster| {
            let group = self.partitions.choose(rng).copied().unwrap_or(1);
            let target = match leader_of(c, group) {
                None => Err(format!("p{group} has no leader")),
                Some(id) if c.ids(Standing::Member).contains(&id) => Ok(id),
                Some(id) => Err(format!("p{group} is led by n{id}, which is leaving")),
            };
            (group, target)
        };
        let result = match kind {
            FaultKind::Kill => match pick(rng) {
                Some(id) => c
                    .kill(id)
                    .map(|()| (format!("kill -9 n{id}"), Undo::Restart(id))),
                None => Ok(("kill: no node up".into(), Undo::Nothing)),
            },
            FaultKind::KillLeader => match leader(rng, &c) {
                (g, Ok(id)) => c
                    .kill(id)
                    .map(|()| (format!("kill -9 n{id} (leader of p{g})"), Undo::Restart(id))),
                (_, Err(why)) => Ok((format!("kill leader: {why}"), Undo::Nothing)),
            },
            FaultKind::PauseLeader => match leader(rng, &c) {
                (g, Ok(id)) => c
                    .pause(id)
                    .map(|()| (format!("pause n{id} (leader of p{g})"), Undo::Resume(id))),
                (_, Err(why)) => Ok((format!("pause leader: {why}"), Undo::Nothing)),
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
                        (g, Ok(id)) => Some((id, format!(" (leader of p{g})"))),
                        _ => None,
                    }
                };
                match target {
                    Some((id, why)) => {
                        let mut r = Ok(());
                        for other in ids.iter().filter(|o| **o != id) {
                            r = r.and_then(|()| c.cut(id, *other));
                        }
                        r.map(|()| (format!("isolate n{id}{why}"), Undo::Heal))
                    }
                    None => Ok(("isolate: no target".into(), Undo::Nothing)),
                }
            }
            FaultKind::MajorityMinority => {
                let mut ids = ids;
                ids.shuffle(rng);
                let (minority, majority) = ids.split_at(ids.len() / 2);
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
                let mut ids = ids;
                ids.shuffle(rng);
                let Some((bridge, rest)) = ids.split_first() else {
                    return ("bridge: no node".into(), Undo::Nothing, None);
                };
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
            FaultKind::PowerCut => match pick(rng) {
                Some(id) => {
                    let tear = rng.gen_bool(0.5);
                    c.power_cut(&[id], tear, rng).map(|r| {
                        (
                            format!("power cut n{id}{}", describe_cut(&r)),
                            Undo::Restart(id),
                        )
                    })
                }
                None => Ok(("power cut: no node up".into(), Undo::Nothing)),
            },
            FaultKind::PowerCutAll => {
                // Every member, paused or not (leaving nodes are no target).
                let ids = c.ids(Standing::Member);
                let tear = rng.gen_bool(0.5);
                c.power_cut(&ids, tear, rng).map(|r| {
                    (
                        format!("power cut of every node {ids:?}{}", describe_cut(&r)),
                        Undo::RestartAll(ids.clone()),
                    )
                })
            }
            FaultKind::DiskError => match pick(rng) {
                Some(id) => {
                    let (fault, what) = match rng.gen_range(0..3) {
                        0 => (
                            Fault {
                                write: Some(libc::EIO),
                                sync: None,
                            },
                            "EIO on every write",
                        ),
                        1 => (
                            Fault {
                                write: Some(libc::ENOSPC),
                                sync: None,
                            },
                            "ENOSPC on every write",
                        ),
                        _ => (
                            Fault {
                                write: None,
                                sync: Some(libc::EIO),
                            },
                            "EIO on every fsync",
                        ),
                    };
                    let before = c.disk_stats(id).map_or(0, |s| s.injected_errors);
                    c.disk_fault(id, fault).map(|()| {
                        (
                            format!("disk error n{id}: {what}"),
                            Undo::ClearDisk { id, before },
                        )
                    })
                }
                None => Ok(("disk error: no node up".into(), Undo::Nothing)),
            },
            FaultKind::Clock => match pick(rng) {
                Some(id) => {
                    // Log-uniform between 1 s and 6 h: seconds as often as hours.
                    let (lo, hi) = (
                        (CLOCK_JUMP_MS_MIN as f64).ln(),
                        (CLOCK_JUMP_MS_MAX as f64).ln(),
                    );
                    let magnitude = rng.gen_range(lo..hi).exp() as u64;
                    let signed = i64::try_from(magnitude).unwrap_or(i64::MAX);
                    match rng.gen_range(0..3) {
                        0 => c.set_clock(id, signed).map(|()| {
                            (
                                format!("clock n{id} +{}", human_ms(magnitude)),
                                Undo::Clock { id, strobe: None },
                            )
                        }),
                        1 => c.set_clock(id, -signed).map(|()| {
                            (
                                format!("clock n{id} -{}", human_ms(magnitude)),
                                Undo::Clock { id, strobe: None },
                            )
                        }),
                        _ => {
                            let offset = if rng.gen_bool(0.5) { signed } else { -signed };
                            let flip = Duration::from_millis(
                                rng.gen_range(STROBE_FLIP_MS.0..=STROBE_FLIP_MS.1),
                            );
                            match c.clock_file(id) {
                                Some(file) => Ok((
                                    format!(
                                        "clock n{id} strobe 0 <-> {}{} every {} ms",
                                        if offset < 0 { "-" } else { "+" },
                                        human_ms(magnitude),
                                        flip.as_millis()
                                    ),
                                    Undo::Clock {
                                        id,
                                        strobe: Some(Strobe::start(file, offset, flip)),
                                    },
                                )),
                                None => Ok(("clock: no clock file".into(), Undo::Nothing)),
                            }
                        }
                    }
                }
                None => Ok(("clock: no node up".into(), Undo::Nothing)),
            },
            FaultKind::RollingRestart => Ok(("rolling restart".into(), Undo::Nothing)),
            FaultKind::Membership => Ok(("membership".into(), Undo::Nothing)),
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
            Undo::RestartAll(ids) => ids.iter().try_for_each(|id| c.start(*id)),
            Undo::Resume(id) => c.resume(id),
            Undo::Heal => c.heal(),
            Undo::ClearDisk { id, before } => return self.clear_disk(&mut c, id, before),
            Undo::Clock { id, strobe } => {
                if let Some(s) = strobe {
                    s.stop();
                }
                c.set_clock(id, 0)
            }
            Undo::Nothing => Ok(()),
        };
        r.err().map(|e| e.to_string())
    }

    /// Clears node `id`'s disk fault. A node its disk failed must have stopped (within
    /// [`DISK_FAILURE_STOP_TIMEOUT`]); it is started again. An error if it ran on.
    fn clear_disk(&self, c: &mut Cluster, id: usize, before: u64) -> Option<String> {
        if let Err(e) = c.disk_fault(id, Fault::default()) {
            return Some(e.to_string());
        }
        let errors = c
            .disk_stats(id)
            .map_or(0, |s| s.injected_errors.saturating_sub(before));
        let deadline = Instant::now() + DISK_FAILURE_STOP_TIMEOUT;
        while errors > 0 && c.alive(id) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let ran_on = errors > 0 && c.alive(id);
        tracing_line(&format!(
            "n{id}: {errors} injected disk errors; {}",
            if ran_on {
                "it RAN ON"
            } else if errors > 0 {
                "it stopped (fail-stop)"
            } else {
                "it wrote nothing meanwhile"
            }
        ));
        let restarted = c.start(id).err().map(|e| e.to_string());
        if ran_on {
            return Some(format!(
                "n{id} ran on after {errors} injected disk errors (it must stop)"
            ));
        }
        restarted
    }

    /// SIGTERM, wait for the exit, restart and wait ready: node after node.
    fn rolling_restart(&self, pause_between: Duration) {
        let members = self.cluster.lock().ids(Standing::Member);
        for id in members {
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
        // Composed with other faults, membership changes take their own turns: whenever
        // none is in progress and another fault came since the last one. A removal's
        // replica moves then run under the faults that follow it.
        let composed = schedule.kinds.contains(&FaultKind::Membership)
            && schedule.kinds.iter().any(|k| *k != FaultKind::Membership);
        let others: Vec<FaultKind> = if composed {
            schedule
                .kinds
                .iter()
                .copied()
                .filter(|k| *k != FaultKind::Membership)
                .collect()
        } else {
            schedule.kinds.clone()
        };
        let mut faults_since_change = 0u32;
        while Instant::now() < schedule.until {
            if !self.sleep(draw(&mut rng, schedule.quiet_ms)) || Instant::now() >= schedule.until {
                break;
            }
            if composed && faults_since_change > 0 && self.pending.lock().is_none() {
                faults_since_change = 0;
                self.membership(&mut rng, schedule.until);
                continue;
            }
            let Some(kind) = others.choose(&mut rng).copied() else {
                break;
            };
            faults_since_change = faults_since_change.saturating_add(1);
            if kind == FaultKind::RollingRestart {
                self.rolling_restart(Duration::ZERO);
                continue;
            }
            if kind == FaultKind::Membership {
                self.membership(&mut rng, schedule.until);
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
        {
            let mut c = self.cluster.lock();
            let _ = c.heal();
            for id in c.in_cluster() {
                let _ = c.disk_fault(id, Fault::default());
                let _ = c.set_clock(id, 0);
            }
            for id in c.ids(Standing::Member) {
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
        // A removal in progress ends (bounded by its deadlines) before the final reads.
        while self.pending.lock().is_some() {
            if !self.sleep(Duration::from_millis(200)) {
                break;
            }
        }
    }

    /// One membership change, drawn from what the cluster allows now. Waits first for the
    /// previous change to end and for every member to be ready.
    fn membership(&self, rng: &mut StdRng, until: Instant) {
        while self.pending.lock().is_some() {
            if !self.sleep(Duration::from_millis(200)) {
                return;
            }
        }
        if Instant::now() >= until {
            return;
        }
        let members = self.cluster.lock().ids(Standing::Member);
        for id in members {
            let ready = self.cluster.lock().wait_ready(id, READY_TIMEOUT);
            if let Err(e) = ready {
                tracing_line(&format!("membership: skipped, n{id} is not ready: {e}"));
                return;
            }
        }
        let plan = self.plan(&self.cluster.lock(), rng);
        match plan {
            Plan::Add => {
                self.add();
            }
            Plan::Remove { victim, add_first } => {
                if add_first && self.add().is_none() {
                    return;
                }
                self.remove(victim);
            }
            Plan::Replace { victim } => self.replace(victim),
            Plan::Nothing(why) => tracing_line(&format!("membership: nothing to do: {why}")),
        }
    }

    /// What the cluster allows: an add while fewer than [`MEMBERSHIP_NODES_MAX`] nodes
    /// are in it; a removal of an up member that is not one of the last
    /// [`SEEDS_KEPT_MIN`] seeds (adding a node first at [`MEMBERSHIP_ACTIVE_MIN`]); a
    /// replacement when both are allowed.
    fn plan(&self, c: &Cluster, rng: &mut StdRng) -> Plan {
        let members = c.ids(Standing::Member);
        if members.len() < MEMBERSHIP_ACTIVE_MIN {
            return Plan::Nothing(format!(
                "{} members, fewer than the replication factor {MEMBERSHIP_ACTIVE_MIN}",
                members.len()
            ));
        }
        let is_seed = |id: &usize| c.nodes.get(id - 1).is_some_and(|n| n.seed);
        let seeds = members.iter().filter(|id| is_seed(id)).count();
        let can_add = c.in_cluster().len() < MEMBERSHIP_NODES_MAX && c.nodes.len() < NODE_IDS_MAX;
        let removable: Vec<usize> = up_nodes(c)
            .into_iter()
            .filter(|id| !is_seed(id) || seeds > SEEDS_KEPT_MIN)
            .collect();
        let add_first = members.len() <= MEMBERSHIP_ACTIVE_MIN;
        let mut options = Vec::new();
        if can_add {
            options.push(0);
        }
        if !removable.is_empty() && (can_add || !add_first) {
            options.push(1);
        }
        if !removable.is_empty() && can_add {
            options.push(2);
        }
        let victim = removable.choose(rng).copied();
        match (options.choose(rng), victim) {
            (Some(0), _) => Plan::Add,
            (Some(1), Some(victim)) => Plan::Remove { victim, add_first },
            (Some(2), Some(victim)) => Plan::Replace { victim },
            _ => Plan::Nothing(format!(
                "{} members, {} nodes in the cluster, ids up to {}",
                members.len(),
                c.in_cluster().len(),
                c.nodes.len()
            )),
        }
    }

    /// Adds a node: `cluster add-node`, start, ready, active; then clients may use it.
    /// Recorded as its own window. The new node's id, or `None` if it did not join.
    fn add(&self) -> Option<usize> {
        let predicted = self.cluster.lock().nodes.len() + 1;
        let name = format!("membership add n{predicted}");
        self.record(Kind::Invoke, &name, None);
        tracing_line(&format!("fault: {name}"));
        let started = Instant::now();
        match self.join_new_node() {
            Ok(id) => {
                self.record(Kind::Ok, &name, None);
                tracing_line(&format!(
                    "n{id} joined: active and ready in {:.1} s (its replicas arrive now)",
                    started.elapsed().as_secs_f64()
                ));
                Some(id)
            }
            Err(e) => {
                tracing_line(&format!("{name} failed: {e}"));
                self.record(Kind::Ok, &name, Some(e));
                None
            }
        }
    }

    /// Makes, starts and waits for a new node (bounded: ready within [`READY_TIMEOUT`],
    /// active within [`ACTIVE_TIMEOUT`]); lists it for the clients. A node that does not
    /// join is killed and asked out of the cluster; its id is not used again.
    fn join_new_node(&self) -> Result<usize, String> {
        let id = {
            let mut c = self.cluster.lock();
            let id = c.add_node().map_err(|e| e.to_string())?;
            if let Err(e) = c.start(id) {
                let _ = c.set_standing(id, Standing::Removed);
                return Err(e.to_string());
            }
            id
        };
        // (The cluster is not locked while waiting for it to be active: the wait polls.)
        let ready = self.cluster.lock().wait_ready(id, READY_TIMEOUT);
        let joined = ready
            .map_err(|e| e.to_string())
            .and_then(|()| self.wait_active(id));
        let mut c = self.cluster.lock();
        match joined {
            Ok(()) => {
                let api = c.nodes[id - 1].api();
                drop(c);
                self.nodes.insert(id, api);
                Ok(id)
            }
            Err(e) => {
                let _ = c.kill(id);
                let _ = c.set_standing(id, Standing::Removed);
                let _ = c.remove_node(id, true);
                Err(e)
            }
        }
    }

    /// Waits (bounded by [`ACTIVE_TIMEOUT`]) until the members list node `id` active.
    fn wait_active(&self, id: usize) -> Result<(), String> {
        let deadline = Instant::now() + ACTIVE_TIMEOUT;
        let mut last = String::from("not listed");
        while Instant::now() < deadline {
            let list = self.cluster.lock().node_list(0);
            match list.map(|l| l.into_iter().find(|n| n.id == id)) {
                Ok(Some(n)) if n.state == "active" => return Ok(()),
                Ok(Some(n)) => last = n.state,
                Ok(None) => last = "not listed".into(),
                Err(e) => last = e.to_string(),
            }
            if !self.sleep(Duration::from_millis(200)) {
                return Err("stopped".into());
            }
        }
        Err(format!(
            "n{id} not active within {} s (last: {last})",
            ACTIVE_TIMEOUT.as_secs()
        ))
    }

    /// Removes the live node `victim`: no new clients, the removal asked; it then drains
    /// and exits by itself once tombstoned (followed by [`Self::poll_pending`]).
    fn remove(&self, victim: usize) {
        let name = format!("membership remove n{victim}");
        self.record(Kind::Invoke, &name, None);
        tracing_line(&format!("fault: {name}"));
        self.nodes.remove(victim);
        let asked = {
            let mut c = self.cluster.lock();
            let _ = c.set_standing(victim, Standing::Leaving);
            c.remove_node(victim, false)
        };
        match asked {
            Ok(()) => self.expect_removal(name, victim, true, None),
            Err(e) => {
                // Refused: it stays a member.
                let mut c = self.cluster.lock();
                let _ = c.set_standing(victim, Standing::Member);
                let api = c.nodes[victim - 1].api();
                drop(c);
                self.nodes.insert(victim, api);
                tracing_line(&format!("{name} failed: {e}"));
                self.record(Kind::Ok, &name, Some(e.to_string()));
            }
        }
    }

    /// Replaces `victim` as after a lost machine: kill -9, wipe its disk, add a fresh node
    /// (a new id), then remove the old one as dead.
    fn replace(&self, victim: usize) {
        let predicted = self.cluster.lock().nodes.len() + 1;
        let name = format!("membership replace n{victim} by n{predicted}");
        self.record(Kind::Invoke, &name, None);
        tracing_line(&format!("fault: {name}"));
        self.nodes.remove(victim);
        let wiped = {
            let mut c = self.cluster.lock();
            let _ = c.set_standing(victim, Standing::Removed);
            c.kill(victim).and_then(|()| c.wipe(victim))
        };
        if let Err(e) = wiped {
            self.record(Kind::Ok, &name, Some(e.to_string()));
            return;
        }
        tracing_line(&format!("n{victim} killed -9 and its disk wiped"));
        let added = self.join_new_node();
        if let Ok(id) = added {
            tracing_line(&format!("n{id} joined in place of n{victim}"));
        }
        let asked = self.cluster.lock().remove_node(victim, true);
        match (added, asked) {
            (Ok(_), Ok(())) => self.expect_removal(name, victim, false, None),
            (Err(e), Ok(())) => {
                // The old node goes anyway (as asked): follow its removal, report the add.
                let error = format!("no replacement joined: {e}");
                self.expect_removal(name, victim, false, Some(error));
            }
            (added, Err(e)) => {
                let mut error = format!("removing the dead n{victim}: {e}");
                if let Err(a) = added {
                    error = format!("no replacement joined: {a}; {error}");
                }
                tracing_line(&format!("{name} failed: {error}"));
                self.record(Kind::Ok, &name, Some(error));
            }
        }
    }

    /// Follows the removal of `node` from now on, under the window `name`; `error`: what
    /// already went wrong in the change (reported at its end).
    fn expect_removal(&self, name: String, node: usize, live: bool, error: Option<String>) {
        let now = Instant::now();
        tracing_line(&format!(
            "n{node}: removal accepted; its replicas move off (bounded by {} s)",
            REMOVE_TIMEOUT.as_secs()
        ));
        *self.pending.lock() = Some(Pending {
            name,
            node,
            live,
            started: now,
            deadline: now + REMOVE_TIMEOUT,
            removed_at: None,
            next_poll: now,
            error,
        });
    }

    /// Checks the removal in progress (at most every [`PENDING_POLL_EVERY`]); records its
    /// end.
    fn poll_pending(&self) {
        let mut guard = self.pending.lock();
        let Some(p) = guard.as_mut() else {
            return;
        };
        let now = Instant::now();
        if now < p.next_poll {
            return;
        }
        p.next_poll = now + PENDING_POLL_EVERY;
        let Some(error) = self.check_pending(p) else {
            return;
        };
        let took = p.started.elapsed().as_secs_f64();
        let name = p.name.clone();
        let error = match (p.error.take(), error) {
            (Some(a), Some(b)) => Some(format!("{a}; {b}")),
            (a, b) => a.or(b),
        };
        *guard = None;
        drop(guard);
        match &error {
            None => tracing_line(&format!("{name}: done in {took:.1} s")),
            Some(e) => tracing_line(&format!("{name}: failed after {took:.1} s: {e}")),
        }
        self.record(Kind::Ok, &name, error);
    }

    /// `None` while the removal goes on; `Some(error)` once it ended.
    fn check_pending(&self, p: &mut Pending) -> Option<Option<String>> {
        let id = p.node;
        if p.removed_at.is_none() {
            let (apis, token) = {
                let c = self.cluster.lock();
                let apis: Vec<String> = up_nodes(&c)
                    .into_iter()
                    .filter(|n| *n != id)
                    .filter_map(|n| c.nodes.get(n - 1).map(crate::cluster::Node::api))
                    .collect();
                (apis, c.admin_token.clone())
            };
            let removed = apis.iter().any(|api| {
                crate::cluster::fetch_node_list(api, &token)
                    .is_ok_and(|l| l.iter().any(|n| n.id == id && n.state == "removed"))
            });
            if removed {
                p.removed_at = Some(Instant::now());
                tracing_line(&format!(
                    "n{id} tombstoned after {:.1} s",
                    p.started.elapsed().as_secs_f64()
                ));
            } else if Instant::now() >= p.deadline {
                return Some(Some(format!(
                    "n{id} not removed within {} s",
                    REMOVE_TIMEOUT.as_secs()
                )));
            } else {
                return None;
            }
        }
        if !p.live {
            return Some(None);
        }
        let mut c = self.cluster.lock();
        let removed_at = p.removed_at.unwrap_or(p.started);
        let outcome = match c.reap(id) {
            Ok(Some(true)) => Some(None),
            Ok(Some(false)) => Some(Some(format!(
                "n{id} exited with a failure status after its removal"
            ))),
            Ok(None) if removed_at.elapsed() >= REMOVED_EXIT_TIMEOUT => {
                let _ = c.kill(id);
                Some(Some(format!(
                    "n{id} did not exit within {} s of its removal: killed",
                    REMOVED_EXIT_TIMEOUT.as_secs()
                )))
            }
            Ok(None) => None,
            Err(e) => {
                let _ = c.kill(id);
                Some(Some(e.to_string()))
            }
        };
        if outcome.is_some() {
            let _ = c.set_standing(id, Standing::Removed);
        }
        outcome
    }
}

/// Progress on stderr (the node's tracing is in its own log files).
pub fn tracing_line(text: &str) {
    eprintln!("chatd-jepsen: {text}");
}
