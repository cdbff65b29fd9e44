//! The Raft groups a node hosts, and the entry point for their incoming RPCs.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use chatd_storage::Storage;
use chatd_transport::Endpoint;
use openraft::raft::AppendEntriesResponse;
use openraft::BasicNode;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::batcher::{Committed, Item, Proposal, ProposeError, PROPOSAL_QUEUE_MAX};
use crate::network::{NetworkFactory, RaftEnvelope, RaftReply, RaftRequest};
use crate::peers::{LinkCtx, LinkStats, Links, Liveness, PeerBatch, PeerBatchReply};

mod quiet;
mod startup;
use crate::{Applier, GroupId, LogStore, NodeId, Raft, RaftOptions, RaftlogError, StateMachine};
pub use quiet::QUIESCE_ROUND_GROUPS_MAX;
use startup::{campaign_at_start, hold_elections_until_heard};

/// Entries appended to the hosted groups' logs and not yet applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyBacklog {
    /// Summed over the groups.
    pub entries_total: u64,
    /// The group with the most (the lowest id among equals).
    pub worst_group: GroupId,
    /// How many it has.
    pub worst_entries: u64,
}

/// A group's replication state as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    /// The group.
    pub group: GroupId,
    /// This node's role: Leader, Follower, Candidate or Learner.
    pub role: String,
    /// The leader this node knows of.
    pub leader: Option<NodeId>,
    /// Current term.
    pub term: u64,
    /// Index of the last entry in this node's log.
    pub last_index: u64,
    /// Index of the last entry known committed.
    pub committed_index: u64,
    /// Index of the last entry applied to the state machine.
    pub applied_index: u64,
    /// Index up to which the log was purged after a snapshot.
    pub purged_index: Option<u64>,
    /// Index covered by the latest snapshot.
    pub snapshot_index: Option<u64>,
    /// Voters of the group.
    pub voters: Vec<NodeId>,
}

impl GroupStatus {
    /// True if this replica leads the group.
    pub fn is_leader(&self) -> bool {
        self.role == "Leader"
    }

    /// True if this replica follows a leader (or waits for one) as a voter.
    pub fn is_follower(&self) -> bool {
        self.role == "Follower"
    }
}

/// A group's leadership as one replica sees it, changing with each election.
pub struct LeadershipWatch {
    metrics: tokio::sync::watch::Receiver<openraft::RaftMetrics<NodeId, BasicNode>>,
}

impl LeadershipWatch {
    /// The current (term, leader).
    pub fn current(&mut self) -> (u64, Option<NodeId>) {
        let m = self.metrics.borrow_and_update();
        (m.current_term, m.current_leader)
    }

    /// Waits for the next change; `false` once the group stopped on this node.
    pub async fn changed(&mut self) -> bool {
        self.metrics.changed().await.is_ok()
    }
}

/// The groups hosted by one node.
pub struct Registry {
    node_id: NodeId,
    store: Storage,
    snapshot_root: PathBuf,
    config: Arc<openraft::Config>,
    groups: RwLock<HashMap<GroupId, Hosted>>,
    health: Arc<crate::peers::PeerHealth>,
    /// Set by [`Registry::stop_elections`] (a drain): no group campaigns again.
    elections_off: Arc<AtomicBool>,
    /// The per-peer links every group's RPCs go through.
    links: Arc<Links>,
    /// This process's incarnation, sent with every batch.
    incarnation: u64,
    options: RaftOptions,
    /// Groups quiesced here (as leader or follower).
    quiesced_groups: std::sync::atomic::AtomicUsize,
    /// Set at shutdown: the ticker stops.
    stopped: AtomicBool,
    /// What every group's log tail holds, against `LOG_TAIL_NODE_BYTES_MAX`.
    log_tails: Arc<crate::log_tail::TailBudget>,
}

#[derive(Clone)]
struct Hosted {
    raft: Raft,
    proposals: tokio::sync::mpsc::Sender<Item>,
    /// Set once this replica accepted an AppendEntries (or heartbeat) since it was opened:
    /// a leader reaches it.
    heard_from_leader: Arc<AtomicBool>,
    /// Set while this leader hands the group to another replica: new proposals are refused
    /// (not leader) so the target can catch up and win its election at once.
    handing_over: Arc<AtomicBool>,
    /// Whether this replica may campaign on its own timeouts.
    gate: Arc<ElectionGate>,
    /// Quiescence: activity seen as leader, and whether the group is quiet.
    quiet: Arc<quiet::QuietState>,
}

/// A new voter may lag the leader by at most this many entries when a move makes it one.
pub const MOVE_CATCH_UP_LAG_ENTRIES_MAX: u64 = 64;

/// Longest a leadership transfer may keep a replica from campaigning (per request; a
/// hold lapses by itself, so a coordinator that dies mid-transfer strands nothing).
pub const ELECTION_HOLD_MS_MAX: u64 = 5_000;

/// Who keeps a replica from campaigning on its timeouts: the start-up hold (until a leader
/// is heard), a leadership transfer to another replica (until a deadline), a drain (for
/// good). Elections run only when none holds them. Every change goes through [`Self::apply`]
/// under one lock, so two changes never race each other's outcome.
struct ElectionGate {
    startup_held: AtomicBool,
    held: parking_lot::Mutex<Option<TransferHold>>,
    /// The group is quiesced here: no ticks, no elections on timeouts (a dead leader is
    /// noticed by node liveness instead).
    quiesced: AtomicBool,
    /// Node liveness says most of the group's other voters are dead: a campaign from here
    /// cannot win and would only raise the term, unseating the majority's leader when the
    /// partition heals (openraft 0.9 has no pre-vote).
    in_minority: AtomicBool,
    /// This replica follows a leader that node liveness reports alive and whose
    /// AppendEntries arrived recently: its own election timer must not unseat it (leader
    /// stickiness; openraft 0.9 has no pre-vote). Kept by the registry's ticker, cleared at
    /// once when liveness finds the leader dead. Set before a pause, it keeps a process that
    /// resumes (SIGCONT) from campaigning on timers that all ran out while it was stopped.
    follows_live_leader: AtomicBool,
    /// The group's tick timer: paused while it is quiesced here ([`crate::clock`]).
    clock: Arc<crate::clock::GroupClock>,
}

/// A leadership transfer's hold on one replica: until `until`, or until a leader of a
/// term after `term` (the replica's term when the hold was placed) is heard — from then on
/// the new leader's heartbeats, not the hold, keep the replica from campaigning, and a
/// new leader that dies at once is replaced after one election timeout, not after the hold.
#[derive(Clone, Copy)]
struct TransferHold {
    until: tokio::time::Instant,
    term: u64,
}

impl ElectionGate {
    fn new(clock: Arc<crate::clock::GroupClock>) -> Self {
        Self {
            clock,
            startup_held: AtomicBool::new(true),
            held: parking_lot::Mutex::new(None),
            quiesced: AtomicBool::new(false),
            in_minority: AtomicBool::new(false),
            follows_live_leader: AtomicBool::new(false),
        }
    }

    /// Sets the raft's election and tick switches from the current holds (the transfer
    /// hold's lock is kept meanwhile, so a hold placed concurrently is not undone).
    fn apply(&self, raft: &Raft, elections_off: &AtomicBool) {
        let held = self.held.lock();
        let quiesced = self.quiesced.load(Ordering::Acquire);
        raft.runtime_config()
            .elect(!quiesced && self.open(&held, elections_off));
        raft.runtime_config().tick(!quiesced);
        self.clock.set_paused(quiesced);
    }

    /// True if nothing but quiescence holds this replica's elections: not draining, past
    /// its start-up hold, not held by a transfer, not cut off from most voters, not
    /// following a live leader.
    fn may_campaign(&self, elections_off: &AtomicBool) -> bool {
        self.open(&self.held.lock(), elections_off)
    }

    fn open(&self, held: &Option<TransferHold>, elections_off: &AtomicBool) -> bool {
        let transfer_held = held.is_some_and(|h| tokio::time::Instant::now() < h.until);
        !elections_off.load(Ordering::Acquire)
            && !self.startup_held.load(Ordering::Acquire)
            && !transfer_held
            && !self.in_minority.load(Ordering::Acquire)
            && !self.follows_live_leader.load(Ordering::Acquire)
    }
}

/// Longest wait for a handover target to hold every entry of the leader's log.
pub const HANDOVER_CATCH_UP_MS_MAX: u64 = 500;

impl Registry {
    /// A registry for node `node_id`, its store, and its QUIC endpoint.
    pub fn new(
        node_id: NodeId,
        store: Storage,
        endpoint: Endpoint,
        snapshot_root: PathBuf,
        options: &RaftOptions,
        cluster_name: &str,
    ) -> Result<Arc<Self>, RaftlogError> {
        std::fs::create_dir_all(&snapshot_root).map_err(|e| RaftlogError::SnapshotDir {
            path: snapshot_root.display().to_string(),
            cause: e.to_string(),
        })?;
        let health = Arc::new(crate::peers::PeerHealth::default());
        let incarnation = crate::peers::new_incarnation();
        let links = Arc::new(Links::new(LinkCtx {
            node_id,
            incarnation,
            endpoint: endpoint.clone(),
            health: health.clone(),
            liveness: Arc::new(Liveness::new(std::time::Duration::from_millis(
                options.liveness_timeout_ms,
            ))),
            stats: Arc::new(LinkStats::default()),
            ping_every: std::time::Duration::from_millis(options.liveness_ping_ms),
        }));
        let registry = Arc::new(Self {
            node_id,
            store,
            snapshot_root,
            config: Arc::new(options.to_config(cluster_name)?),
            groups: RwLock::new(HashMap::new()),
            health,
            elections_off: Arc::new(AtomicBool::new(false)),
            links,
            incarnation,
            options: options.clone(),
            quiesced_groups: std::sync::atomic::AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
            log_tails: crate::log_tail::TailBudget::new(crate::log_tail::LOG_TAIL_NODE_BYTES_MAX),
        });
        quiet::start_ticker(&registry)?;
        Ok(registry)
    }

    /// Bytes of log entries the groups' in-memory tails hold together (at most
    /// [`LOG_TAIL_NODE_BYTES_MAX`](crate::LOG_TAIL_NODE_BYTES_MAX)).
    pub fn log_tail_bytes(&self) -> usize {
        self.log_tails.used_bytes()
    }

    /// Which peers are alive, as this node's pings and batches tell.
    pub fn liveness(&self) -> &Liveness {
        &self.links.ctx().liveness
    }

    /// Counters of the per-peer links.
    pub fn link_stats(&self) -> &LinkStats {
        &self.links.ctx().stats
    }

    /// How many hosted groups are quiesced here.
    pub fn quiesced_groups(&self) -> usize {
        self.quiesced_groups.load(Ordering::Relaxed)
    }

    /// True if `group` is quiesced on this node.
    pub fn is_quiesced(&self, group: GroupId) -> Option<bool> {
        Some(self.hosted(group)?.gate.quiesced.load(Ordering::Acquire))
    }

    /// Which peers answer Raft RPCs, as every hosted group sees it.
    pub fn peer_health(&self) -> &crate::peers::PeerHealth {
        &self.health
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The node's store.
    pub fn store(&self) -> &Storage {
        &self.store
    }

    /// Starts `group` on this node (its log and state machine are recovered from the store),
    /// or returns it if already started.
    pub async fn open_group(
        &self,
        group: GroupId,
        applier: Arc<dyn Applier>,
    ) -> Result<Raft, RaftlogError> {
        if let Some(raft) = self.get(group) {
            return Ok(raft);
        }
        let start = |cause: String| RaftlogError::Start { group, cause };
        let mut sm = StateMachine::open(group, self.store.clone(), applier, &self.snapshot_root)
            .map_err(|e| start(e.to_string()))?;
        let tail = Arc::new(crate::log_tail::LogTail::new(self.log_tails.clone()));
        sm.trim_after_apply(tail.clone());
        let log = LogStore::new(group, self.store.clone(), sm.applied_mark(), tail);
        let network = NetworkFactory::new(group, self.links.clone());
        let clock = Arc::new(crate::clock::GroupClock::default());
        let raft = crate::clock::with_group_clock(
            clock.clone(),
            Raft::new(self.node_id, self.config.clone(), network, log, sm),
        )
        .await
        .map_err(|e| start(e.to_string()))?;
        // Whose vote this replica last gave: a replica that voted for itself (it led the
        // group, or was campaigning) before the restart campaigns at once instead of
        // waiting out the start-up hold. It no longer resumes leading by itself
        // (`LogStore::read_vote`), and after a whole-cluster restart no leader exists for
        // the hold to wait for; the election (a new term) is won only with a complete log.
        let voted_for_self =
            raft.metrics().borrow().vote.leader_id().voted_for() == Some(self.node_id);
        let heard_from_leader = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(ElectionGate::new(clock));
        raft.runtime_config().elect(false);
        if voted_for_self {
            tokio::spawn(campaign_at_start(
                raft.clone(),
                group,
                self.node_id,
                self.links.ctx().liveness.clone(),
                std::time::Duration::from_millis(
                    self.config.election_timeout_max.saturating_mul(2),
                ),
            ));
        }
        tokio::spawn(hold_elections_until_heard(
            raft.clone(),
            heard_from_leader.clone(),
            gate.clone(),
            self.elections_off.clone(),
            self.node_id,
            std::time::Duration::from_millis(self.config.election_timeout_max.saturating_mul(2)),
        ));
        let mut groups = self.groups.write();
        let hosted = groups.entry(group).or_insert_with(|| {
            let handing_over = Arc::new(AtomicBool::new(false));
            Hosted {
                proposals: crate::batcher::start(group, raft.clone(), handing_over.clone()),
                raft,
                heard_from_leader,
                handing_over,
                gate,
                quiet: Arc::new(quiet::QuietState::default()),
            }
        });
        Ok(hosted.raft.clone())
    }

    /// Proposes `command` to `group` if this node leads it, batched with the proposals made
    /// at the same time; returns once the entry is committed on a majority and applied.
    pub async fn propose(
        &self,
        group: GroupId,
        command: Vec<u8>,
    ) -> Result<Committed, ProposeError> {
        let hosted = {
            let groups = self.groups.read();
            groups.get(&group).cloned()
        };
        let Some(hosted) = hosted else {
            return Err(ProposeError::NotHosted(group));
        };
        // Refuse at once when another node leads: no need to queue behind a batch.
        let leader = hosted.raft.metrics().borrow().current_leader;
        if leader != Some(self.node_id) {
            return Err(ProposeError::NotLeader { leader });
        }
        if hosted.handing_over.load(Ordering::Acquire) {
            // The leadership is moving: the caller retries with the next leader.
            return Err(ProposeError::NotLeader { leader: None });
        }
        self.wake(&hosted, "proposal");
        let (reply, answer) = tokio::sync::oneshot::channel();
        hosted
            .proposals
            .try_send(Item::Proposal(Proposal { command, reply }))
            .map_err(|e| match e {
                tokio::sync::mpsc::error::TrySendError::Full(_) => ProposeError::Overloaded {
                    group,
                    max: PROPOSAL_QUEUE_MAX,
                },
                tokio::sync::mpsc::error::TrySendError::Closed(_) => {
                    ProposeError::Raft(format!("group {group} stopped"))
                }
            })?;
        answer
            .await
            .map_err(|_| ProposeError::Raft(format!("group {group} stopped")))?
    }

    /// Initializes `group` with `members` as voters if it has never been initialized.
    pub async fn initialize(
        &self,
        group: GroupId,
        members: BTreeMap<NodeId, String>,
    ) -> Result<(), RaftlogError> {
        let members: BTreeMap<NodeId, BasicNode> = members
            .into_iter()
            .map(|(id, addr)| (id, BasicNode::new(addr)))
            .collect();
        let raft = self.get(group).ok_or_else(|| RaftlogError::Start {
            group,
            cause: "group not opened".into(),
        })?;
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| RaftlogError::Start {
                group,
                cause: e.to_string(),
            })?;
        if initialized {
            return Ok(());
        }
        match raft.initialize(members).await {
            Ok(()) => Ok(()),
            // Another replica got there first: the group exists, which is all we wanted.
            Err(openraft::error::RaftError::APIError(
                openraft::error::InitializeError::NotAllowed(_),
            )) => Ok(()),
            Err(e) => Err(RaftlogError::Start {
                group,
                cause: e.to_string(),
            }),
        }
    }

    /// True if this node leads `group`, or its replica accepted an AppendEntries since it
    /// was opened (the leader reaches it): the replica has rejoined its group.
    pub fn rejoined(&self, group: GroupId) -> bool {
        let groups = self.groups.read();
        groups.get(&group).is_some_and(|h| {
            h.heard_from_leader.load(Ordering::Acquire)
                || h.raft.metrics().borrow().current_leader == Some(self.node_id)
        })
    }

    /// Prepares handing `group`, which this node leads, to `target`: refuses new proposals
    /// and waits (at most [`HANDOVER_CATCH_UP_MS_MAX`]) until `target` holds every entry of
    /// this leader's log, so its campaign is not refused for a shorter log. Returns whether
    /// it caught up. [`Self::end_handover`] undoes the refusal.
    pub async fn begin_handover(&self, group: GroupId, target: NodeId) -> bool {
        let Some(hosted) = self.hosted(group) else {
            return false;
        };
        hosted.handing_over.store(true, Ordering::Release);
        self.wake(&hosted, "handover");
        let mut metrics = hosted.raft.metrics();
        let caught_up = tokio::time::timeout(
            std::time::Duration::from_millis(HANDOVER_CATCH_UP_MS_MAX),
            async {
                // Proposals queued before the refusal may still be on their way into the
                // log: wait until the batcher handed on everything before this point, then
                // until Raft processed those appends (two calls through its core, which
                // publishes its metrics between loop rounds), and read the last index.
                let (passed, barrier) = tokio::sync::oneshot::channel();
                if hosted.proposals.send(Item::Barrier(passed)).await.is_err()
                    || barrier.await.is_err()
                {
                    return false;
                }
                for _ in 0..2 {
                    if hosted.raft.with_raft_state(|_| ()).await.is_err() {
                        return false;
                    }
                }
                let last = metrics.borrow_and_update().last_log_index;
                loop {
                    {
                        let m = metrics.borrow_and_update();
                        if m.current_leader != Some(self.node_id) {
                            return false;
                        }
                        let matched = m
                            .replication
                            .as_ref()
                            .and_then(|r| r.get(&target).cloned().flatten())
                            .map(|l| l.index);
                        let need = last.max(m.last_log_index);
                        if need.is_some() && matched >= need {
                            return true;
                        }
                    }
                    if metrics.changed().await.is_err() {
                        return false;
                    }
                }
            },
        )
        .await;
        caught_up.unwrap_or(false)
    }

    /// Accepts proposals of `group` again (a handover is over, whichever way it went).
    pub fn end_handover(&self, group: GroupId) {
        if let Some(hosted) = self.hosted(group) {
            hosted.handing_over.store(false, Ordering::Release);
        }
    }

    /// Keeps this replica of `group` from campaigning on its own timeouts for `hold`
    /// (at most [`ELECTION_HOLD_MS_MAX`]; a zero `hold` lifts an earlier one at once), while
    /// leadership moves to another replica: without it, a replica whose timer fires during
    /// the target's campaign (the old leader steps down on the target's vote request) can
    /// start a newer term and take the group instead. The hold ends early once this replica
    /// hears a leader of a term after the one it was in when the hold was placed (the
    /// handover is over: a new leader that fails at once is replaced after one election
    /// timeout, not after the hold). An explicit campaign ([`openraft::Raft::trigger`]) is
    /// not held. Returns false if the group is not hosted.
    pub fn hold_elections(&self, group: GroupId, hold: std::time::Duration) -> bool {
        let Some(hosted) = self.hosted(group) else {
            return false;
        };
        let hold = hold.min(std::time::Duration::from_millis(ELECTION_HOLD_MS_MAX));
        if hold.is_zero() {
            *hosted.gate.held.lock() = None;
            hosted.gate.apply(&hosted.raft, &self.elections_off);
            return true;
        }
        let until = tokio::time::Instant::now() + hold;
        let term = hosted.raft.metrics().borrow().current_term;
        {
            let mut held = hosted.gate.held.lock();
            *held = Some(match *held {
                Some(h) => TransferHold {
                    until: h.until.max(until),
                    term: h.term.max(term),
                },
                None => TransferHold { until, term },
            });
            hosted.raft.runtime_config().elect(false);
        }
        let elections_off = self.elections_off.clone();
        tokio::spawn(async move {
            let mut metrics = hosted.raft.metrics();
            let newer_leader_heard = async {
                loop {
                    {
                        let m = metrics.borrow_and_update();
                        if m.current_term > term && m.current_leader.is_some() {
                            return m.current_term;
                        }
                    }
                    if metrics.changed().await.is_err() {
                        // The group stopped: only the deadline is left.
                        std::future::pending::<()>().await;
                    }
                }
            };
            if let Ok(now_term) = tokio::time::timeout_at(until, newer_leader_heard).await {
                // Lift the hold unless a later transfer (placed in this term or after)
                // holds the replica again.
                let mut held = hosted.gate.held.lock();
                if held.is_some_and(|h| h.term < now_term) {
                    *held = None;
                }
            }
            hosted.gate.apply(&hosted.raft, &elections_off);
        });
        true
    }

    /// True if `group` is hosted here and may campaign on its own timeouts now.
    pub fn elections_enabled(&self, group: GroupId) -> Option<bool> {
        let hosted = self.hosted(group)?;
        let held = *hosted.gate.held.lock();
        Some(
            !self.elections_off.load(Ordering::Acquire)
                && !hosted.gate.startup_held.load(Ordering::Acquire)
                && held.is_none_or(|h| tokio::time::Instant::now() >= h.until),
        )
    }

    /// Adds `node` (reached at `addr`) to `group` as a learner, on the group's leader: the
    /// leader replicates the log (or a snapshot) to it from now on. Returns once the
    /// membership entry is committed, with its index; catching up happens after.
    /// Adding a learner that is one already changes nothing.
    pub async fn add_learner(
        &self,
        group: GroupId,
        node: NodeId,
        addr: String,
    ) -> Result<u64, ProposeError> {
        let Some(hosted) = self.hosted(group) else {
            return Err(ProposeError::NotHosted(group));
        };
        let leader = hosted.raft.metrics().borrow().current_leader;
        if leader != Some(self.node_id) {
            return Err(ProposeError::NotLeader { leader });
        }
        self.wake(&hosted, "membership change");
        match hosted
            .raft
            .add_learner(node, BasicNode::new(addr), false)
            .await
        {
            Ok(resp) => Ok(resp.log_id.index),
            Err(e) => Err(membership_error(e)),
        }
    }

    /// On `group`'s leader: makes `voters` the group's voters (openraft's joint consensus;
    /// voters left out stay as learners if `retain`, else leave) and removes the learners in
    /// `drop` (a move rolled back, a node retired), once each new voter holds the
    /// leader's log to within [`MOVE_CATCH_UP_LAG_ENTRIES_MAX`] entries (waiting at most
    /// `catch_up`, then refusing: a replica is never swapped for one that is far behind).
    /// Returns the index of the final membership entry. Asking for the voters it has
    /// changes nothing.
    pub async fn change_voters(
        &self,
        group: GroupId,
        voters: std::collections::BTreeSet<NodeId>,
        drop: std::collections::BTreeSet<NodeId>,
        retain: bool,
        catch_up: std::time::Duration,
    ) -> Result<u64, ProposeError> {
        let Some(hosted) = self.hosted(group) else {
            return Err(ProposeError::NotHosted(group));
        };
        self.wake(&hosted, "membership change");
        let mut metrics = hosted.raft.metrics();
        let deadline = tokio::time::Instant::now() + catch_up;
        loop {
            let lagging = {
                let m = metrics.borrow_and_update();
                if m.current_leader != Some(self.node_id) {
                    return Err(ProposeError::NotLeader {
                        leader: m.current_leader,
                    });
                }
                let current: std::collections::BTreeSet<NodeId> =
                    m.membership_config.membership().voter_ids().collect();
                let learners_left = m
                    .membership_config
                    .membership()
                    .learner_ids()
                    .any(|l| drop.contains(&l));
                if current == voters && !learners_left {
                    return Ok(m.last_log_index.unwrap_or(0));
                }
                let last = m.last_log_index.unwrap_or(0);
                let replication = m.replication.clone().unwrap_or_default();
                voters
                    .iter()
                    .filter(|v| **v != self.node_id && !current.contains(v))
                    .filter(|v| {
                        let matched = replication.get(v).cloned().flatten().map_or(0, |l| l.index);
                        last.saturating_sub(matched) > MOVE_CATCH_UP_LAG_ENTRIES_MAX
                    })
                    .copied()
                    .collect::<Vec<_>>()
            };
            if lagging.is_empty() {
                break;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(ProposeError::Raft(format!(
                    "group {group}: nodes {lagging:?} did not catch up within {} ms",
                    catch_up.as_millis()
                )));
            }
            // Replication progress shows in the metrics; wake on change or every 100 ms.
            let _ = tokio::time::timeout(
                left.min(std::time::Duration::from_millis(100)),
                metrics.changed(),
            )
            .await;
        }
        let (learners, same_voters): (std::collections::BTreeSet<NodeId>, bool) = {
            let m = hosted.raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            (
                membership
                    .learner_ids()
                    .filter(|l| !voters.contains(l) && drop.contains(l))
                    .collect(),
                membership
                    .voter_ids()
                    .collect::<std::collections::BTreeSet<_>>()
                    == voters,
            )
        };
        let changed = if same_voters {
            0
        } else {
            match hosted.raft.change_membership(voters, retain).await {
                Ok(resp) => resp.log_id.index,
                Err(e) => return Err(membership_error(e)),
            }
        };
        if learners.is_empty() {
            return Ok(changed);
        }
        // Learners left over (a move rolled back): the leader stops replicating to them.
        match hosted
            .raft
            .change_membership(openraft::ChangeMembers::RemoveNodes(learners), false)
            .await
        {
            Ok(resp) => Ok(resp.log_id.index),
            Err(e) => Err(membership_error(e)),
        }
    }

    /// On `group`'s leader: the index of the last entry `node` is known to hold, and the
    /// leader's last index.
    pub fn matched(&self, group: GroupId, node: NodeId) -> Option<(u64, u64)> {
        let hosted = self.hosted(group)?;
        let m = hosted.raft.metrics();
        let m = m.borrow();
        let matched = m
            .replication
            .as_ref()?
            .get(&node)
            .cloned()
            .flatten()
            .map_or(0, |l| l.index);
        Some((matched, m.last_log_index.unwrap_or(0)))
    }

    /// True if the store holds any Raft state of `group` (a vote, or applied entries),
    /// hosted or not: leftovers of a replica that moved away while the node was down.
    pub fn has_local_state(&self, group: GroupId) -> bool {
        use crate::keys::{meta_key, META_LAST_APPLIED, META_VOTE};
        let present = |cf, key: &[u8]| matches!(self.store.get(cf, key), Ok(Some(_)));
        present(chatd_storage::Cf::RaftMeta, &meta_key(group, META_VOTE))
            || present(
                chatd_storage::Cf::StateMeta,
                &meta_key(group, META_LAST_APPLIED),
            )
    }

    /// The voters and learners of `group` in this node's view of its membership.
    pub fn membership_of(
        &self,
        group: GroupId,
    ) -> Option<(
        std::collections::BTreeSet<NodeId>,
        std::collections::BTreeSet<NodeId>,
    )> {
        let hosted = self.hosted(group)?;
        let m = hosted.raft.metrics();
        let m = m.borrow();
        let membership = m.membership_config.membership();
        Some((
            membership.voter_ids().collect(),
            membership.learner_ids().collect(),
        ))
    }

    /// Stops `group` on this node and deletes its log, state and snapshots (its replica
    /// moved elsewhere); its file chunks stay for the file sweep. A group not hosted is
    /// only purged from the store.
    pub async fn remove_group(&self, group: GroupId) -> Result<(), RaftlogError> {
        let hosted = self.groups.write().remove(&group);
        if let Some(h) = hosted {
            if let Err(e) = h.raft.shutdown().await {
                tracing::warn!(group, error = %e, "raft group shutdown");
            }
        }
        let (store, dir) = (
            self.store.clone(),
            self.snapshot_root.join(format!("group-{group}")),
        );
        let purge = move || -> Result<(), String> {
            let (from, to) = crate::keys::group_range(group);
            let mut batch = chatd_storage::Batch::new();
            {
                let mut w = store.batch(&mut batch);
                // File chunks (`Blobs`) are not the log's: the node's file sweep deletes a
                // partition's chunks once it has not hosted it for a grace period, so the
                // new replicas can still fetch from here whatever they lack.
                for cf in chatd_storage::Cf::ALL {
                    if cf != chatd_storage::Cf::NodeMeta && cf != chatd_storage::Cf::Blobs {
                        w.delete_range(cf, &from, &to);
                    }
                }
            }
            store
                .write_synced_blocking(batch)
                .map_err(|e| e.to_string())?;
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(format!("{}: {e}", dir.display())),
            }
        };
        tokio::task::spawn_blocking(purge)
            .await
            .map_err(|e| RaftlogError::Start {
                group,
                cause: e.to_string(),
            })?
            .map_err(|cause| RaftlogError::Start { group, cause })
    }

    /// Turns elections off in every hosted group, for good (a drain): this node never
    /// campaigns again, including groups whose start-up hold ends later. It still votes.
    pub fn stop_elections(&self) {
        self.elections_off.store(true, Ordering::Release);
        let groups = self.groups.read();
        for h in groups.values() {
            h.raft.runtime_config().elect(false);
        }
    }

    fn hosted(&self, group: GroupId) -> Option<Hosted> {
        self.groups.read().get(&group).cloned()
    }

    /// The leader of `group` in this replica's view (`None`: not hosted, or no leader known).
    pub fn leader(&self, group: GroupId) -> Option<NodeId> {
        self.hosted(group)?.raft.metrics().borrow().current_leader
    }

    /// True if this node leads `group` in its own view.
    pub fn leads(&self, group: GroupId) -> bool {
        self.leader(group) == Some(self.node_id)
    }

    /// The current term of `group` here (0 if not hosted).
    pub fn term(&self, group: GroupId) -> u64 {
        self.hosted(group)
            .map_or(0, |h| h.raft.metrics().borrow().current_term)
    }

    /// Follows `group`'s leadership as this replica sees it.
    pub fn watch_leadership(&self, group: GroupId) -> Option<LeadershipWatch> {
        Some(LeadershipWatch {
            metrics: self.hosted(group)?.raft.metrics(),
        })
    }

    /// Asks this replica of `group` to campaign now (a leadership transfer); a leader
    /// ignores it.
    pub async fn campaign(&self, group: GroupId) -> Result<(), RaftlogError> {
        let hosted = self.hosted(group).ok_or(RaftlogError::Start {
            group,
            cause: "not hosted on this node".into(),
        })?;
        self.wake(&hosted, "campaign");
        hosted
            .raft
            .trigger()
            .elect()
            .await
            .map_err(|e| RaftlogError::Start {
                group,
                cause: e.to_string(),
            })
    }

    /// True if this node hosts `group`.
    pub fn hosts(&self, group: GroupId) -> bool {
        self.groups.read().contains_key(&group)
    }

    /// Confirms this node still leads `group` with a quorum (a heartbeat round) and waits
    /// until everything committed so far is applied here: a read after it sees every
    /// acknowledged write. At most `within`.
    pub async fn read_index(
        &self,
        group: GroupId,
        within: std::time::Duration,
    ) -> Result<(), String> {
        let hosted = self
            .hosted(group)
            .ok_or_else(|| format!("group {group} not hosted"))?;
        self.wake(&hosted, "read");
        match tokio::time::timeout(within, hosted.raft.ensure_linearizable()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no quorum answer within {} ms", within.as_millis())),
        }
    }

    /// The group's handle, if this node hosts it.
    pub fn get(&self, group: GroupId) -> Option<Raft> {
        let groups = self.groups.read();
        groups.get(&group).map(|h| h.raft.clone())
    }

    /// How many groups this node hosts.
    pub fn group_count(&self) -> usize {
        self.groups.read().len()
    }

    /// Entries appended but not yet applied, over every hosted group (from the groups'
    /// published metrics: no call into a Raft core).
    pub fn apply_backlog(&self) -> ApplyBacklog {
        let mut b = ApplyBacklog::default();
        for (g, h) in self.groups.read().iter() {
            let m = h.raft.metrics();
            let m = m.borrow();
            let lag = m
                .last_log_index
                .unwrap_or(0)
                .saturating_sub(m.last_applied.map_or(0, |l| l.index));
            b.entries_total += lag;
            if lag > b.worst_entries || (lag == b.worst_entries && *g < b.worst_group) {
                b.worst_group = *g;
                b.worst_entries = lag;
            }
        }
        b
    }

    /// Ids of the hosted groups, sorted.
    pub fn groups(&self) -> Vec<GroupId> {
        let groups = self.groups.read();
        let mut ids: Vec<_> = groups.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Status of one hosted group.
    pub async fn status(&self, group: GroupId) -> Option<GroupStatus> {
        let raft = self.get(group)?;
        let m = raft.metrics().borrow().clone();
        let committed = raft
            .with_raft_state(|st| st.committed.map(|l| l.index).unwrap_or(0))
            .await
            .unwrap_or(0);
        Some(GroupStatus {
            group,
            role: format!("{:?}", m.state),
            leader: m.current_leader,
            term: m.current_term,
            last_index: m.last_log_index.unwrap_or(0),
            committed_index: committed,
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            purged_index: m.purged.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            voters: m.membership_config.membership().voter_ids().collect(),
        })
    }

    /// Handles an incoming QUIC request of raftlog's services (`RAFT_SERVICE_TAG`: one RPC;
    /// `RAFT_BATCH_SERVICE_TAG`: a batch or a ping), tag included, and encodes the reply.
    /// `None` if the tag is not raftlog's.
    pub async fn handle_frame(&self, frame: &[u8]) -> Option<Bytes> {
        match frame.split_first() {
            Some((&crate::RAFT_SERVICE_TAG, body)) => Some(self.handle(body).await),
            Some((&crate::RAFT_BATCH_SERVICE_TAG, body)) => Some(self.handle_batch(body).await),
            _ => None,
        }
    }

    /// Handles a datagram of raftlog's (a liveness ping, or an earlier version's answer to
    /// one), tag included: the sender is heard from. Nothing is sent back: the pinger hears
    /// this node from its QUIC stack's acknowledgement of the ping (see `peers`). Returns
    /// `Option` for the transport's datagram handler, always `None`.
    pub fn handle_datagram(&self, datagram: &[u8]) -> Option<Bytes> {
        let (&crate::peers::LIVENESS_DATAGRAM_TAG, body) = datagram.split_first()? else {
            return None;
        };
        let ping: crate::peers::LivenessPing = match chatd_codec::decode(body) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "malformed liveness datagram; dropped");
                return None;
            }
        };
        self.liveness().heard_if_known(ping.from, ping.incarnation);
        None
    }

    /// Handles a batch of RPCs from one peer (all at once, each bounded by its sender's
    /// timeout) and encodes the replies in order.
    pub async fn handle_batch(&self, body: &[u8]) -> Bytes {
        let replies = match chatd_codec::decode::<PeerBatch>(body) {
            Err(e) => {
                tracing::warn!(error = %e, "malformed raft batch; answered with no replies");
                Vec::new()
            }
            Ok(batch) => {
                self.liveness()
                    .heard_if_known(batch.from, batch.incarnation);
                futures::future::join_all(batch.rpcs.iter().map(|rpc| async move {
                    let ttl = std::time::Duration::from_millis(u64::from(rpc.ttl_ms));
                    match tokio::time::timeout(ttl, self.handle(&rpc.frame)).await {
                        Ok(reply) => serde_bytes::ByteBuf::from(reply.to_vec()),
                        // Past the sender's timeout: it no longer waits (the RPC itself
                        // goes on in the group).
                        Err(_) => serde_bytes::ByteBuf::new(),
                    }
                }))
                .await
            }
        };
        let reply = PeerBatchReply {
            incarnation: self.incarnation,
            replies,
        };
        match chatd_codec::encode(&reply) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a raft batch reply");
                Bytes::new()
            }
        }
    }

    /// Handles an incoming Raft RPC frame (without its service tag) and encodes the reply.
    pub async fn handle(&self, frame: &[u8]) -> Bytes {
        let reply = match chatd_codec::decode::<RaftEnvelope>(frame) {
            Err(e) => RaftReply::Malformed(e.to_string()),
            Ok(env) => match self.hosted(env.group) {
                None => RaftReply::UnknownGroup(env.group),
                Some(hosted) => self.serve(env.group, &hosted, env.request).await,
            },
        };
        match chatd_codec::encode(&reply) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a raft reply");
                Bytes::new()
            }
        }
    }

    async fn serve(&self, group: GroupId, hosted: &Hosted, request: RaftRequest) -> RaftReply {
        let raft = &hosted.raft;
        match request {
            RaftRequest::Append(r) => {
                // A quiesced replica wakes at any message of its group but the heartbeats
                // of the leader it quiesced under (they may cross the quiesce request).
                let leader = r.vote.leader_id().voted_for();
                if !(r.entries.is_empty()
                    && hosted
                        .quiet
                        .quiet_under(leader, r.vote.leader_id().get_term()))
                {
                    self.wake(hosted, "append");
                }
                let reply = raft.append_entries(r).await;
                // Any answer but "your vote is stale" means a current leader's
                // message was taken here (a conflict is resolved in later rounds).
                if matches!(&reply, Ok(resp) if !matches!(resp, AppendEntriesResponse::HigherVote(_)))
                {
                    hosted.heard_from_leader.store(true, Ordering::Release);
                    hosted.quiet.appended();
                    // Following a live leader from this message on, not from the ticker's
                    // next pass: a process stopped in between would otherwise resume with
                    // its election timer on and run out.
                    // The liveness lock only while the flag is not set: not on every append.
                    if !hosted.gate.follows_live_leader.load(Ordering::Acquire)
                        && leader.is_some_and(|l| l != self.node_id && !self.liveness().is_dead(l))
                        && !hosted.gate.follows_live_leader.swap(true, Ordering::AcqRel)
                    {
                        hosted.gate.apply(raft, &self.elections_off);
                    }
                }
                RaftReply::Append(reply)
            }
            RaftRequest::Vote(r) => {
                self.wake(hosted, "vote");
                let candidate_log = r.last_log_id;
                let reply = raft.vote(r).await;
                if let Ok(resp) = &reply {
                    if !resp.vote_granted && resp.last_log_id > candidate_log {
                        self.campaign_with_newer_log(group, hosted);
                    }
                }
                RaftReply::Vote(reply)
            }
            RaftRequest::Snapshot(r) => {
                self.wake(hosted, "snapshot");
                RaftReply::Snapshot(raft.install_snapshot(r).await)
            }
            RaftRequest::Quiesce(q) => RaftReply::Quiesce(self.quiesce_follower(hosted, q)),
        }
    }

    /// This replica refused a candidate whose log is behind its own. If the leader it
    /// followed is dead (node liveness) and nothing holds its elections, it campaigns at
    /// once instead of after its election timeout: the candidate (the lowest-id live voter,
    /// which campaigns first when a leader dies) cannot win, and this replica can. Its id is
    /// above the candidate's, so its vote in the same term outranks the candidate's own.
    fn campaign_with_newer_log(&self, group: GroupId, hosted: &Hosted) {
        let leader = hosted.raft.metrics().borrow().current_leader;
        let leader_dead = leader.is_some_and(|l| l != self.node_id && self.liveness().is_dead(l));
        if !leader_dead || !hosted.gate.may_campaign(&self.elections_off) {
            return;
        }
        tracing::info!(group, dead_leader = ?leader, "campaigning: a candidate's log is behind this replica's");
        let raft = hosted.raft.clone();
        tokio::spawn(async move {
            let _ = raft.trigger().elect().await;
        });
    }

    /// Stops every group (their logs stay on disk).
    pub async fn shutdown(&self) {
        self.stopped.store(true, Ordering::Release);
        self.links.close();
        let all: Vec<Raft> = {
            let groups = self.groups.read();
            groups.values().map(|h| h.raft.clone()).collect()
        };
        for raft in all {
            if let Err(e) = raft.shutdown().await {
                tracing::warn!(error = %e, "raft group shutdown");
            }
        }
    }
}

/// A refused membership change in the registry's terms: "not leader" with the hint, or why.
fn membership_error(
    e: openraft::error::RaftError<NodeId, openraft::error::ClientWriteError<NodeId, BasicNode>>,
) -> ProposeError {
    match e {
        openraft::error::RaftError::APIError(
            openraft::error::ClientWriteError::ForwardToLeader(f),
        ) => ProposeError::NotLeader {
            leader: f.leader_id,
        },
        e => ProposeError::Raft(e.to_string()),
    }
}
