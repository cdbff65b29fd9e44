//! The registry's ticker: every group's heartbeats leave together once per interval (so each
//! peer gets them in one batch), idle groups quiesce, and node liveness stands in for the
//! heartbeats of quiesced groups.
//!
//! A leader quiesces its group when nothing was proposed, read or changed for
//! `quiesce_idle_ms` and every replica it can reach holds and has applied its whole log:
//! it asks each replica to quiesce (`RaftRequest::Quiesce`, accepted only by a replica
//! following that leader in that term with exactly that log), and stops heartbeating only
//! when all said yes. A quiesced replica neither ticks nor campaigns on timeouts. Any
//! proposal, read, membership change or transfer wakes the leader; any AppendEntries, vote
//! or snapshot wakes a replica. When a peer is found dead (silent past the liveness
//! timeout) or restarted (a new incarnation), the groups it led here elect a new leader: the
//! lowest-id live voter campaigns at once if the group was quiesced (no lease holds its
//! votes), else as soon as the dead leader's lease has expired; the other voters hold their
//! own timeouts back for one election timeout so they do not split the vote. When a peer
//! comes back, the groups it is in that are quiesced under a leader here wake, so its
//! replicas hear their leader.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;

use super::{Hosted, Registry};
use crate::network::{encode_envelope, QuiesceRequest, RaftEnvelope, RaftReply, RaftRequest};
use crate::peers::PeerLife;
use crate::{GroupId, NodeId, RaftlogError};

/// Groups a leader asks to quiesce in one tick (each costs one RPC per replica; the rest
/// wait for the next tick).
pub const QUIESCE_ROUND_GROUPS_MAX: usize = 256;

/// The links follow the groups' memberships, refreshed every this many ticks.
const LINK_REFRESH_TICKS: u64 = 10;
/// The registry ticker finding this many periods since its last pass takes it for a stall
/// of the process (SIGSTOP, a VM pause), not of the leaders.
const STALL_TICKS: u32 = 5;

/// A group's activity as its leader sees it, and when its leader's AppendEntries last
/// arrived here.
#[derive(Default)]
pub(super) struct QuietState {
    inner: parking_lot::Mutex<Activity>,
}

#[derive(Default)]
struct Activity {
    /// Bumped by every wake (proposal, read, change, message): a quiesce decided before a
    /// wake is void.
    epoch: u64,
    /// What the last tick saw, and since when it has not changed.
    seen: Option<(u64, Seen)>,
    idle_since: Option<Instant>,
    last_append: Option<Instant>,
    /// The (leader, term) this replica quiesced under (as a follower).
    quiesced_under: Option<(NodeId, u64)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Seen {
    term: u64,
    last: u64,
    applied: u64,
}

impl QuietState {
    /// Records what a tick saw; returns how long the group has been idle, and the epoch.
    fn observe(&self, seen: Seen, now: Instant) -> (Duration, u64) {
        let mut a = self.inner.lock();
        let key = (a.epoch, seen);
        if a.seen != Some(key) {
            a.seen = Some(key);
            a.idle_since = Some(now);
        }
        let idle = a
            .idle_since
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        (idle, a.epoch)
    }

    /// The leader's AppendEntries was taken here.
    pub(super) fn appended(&self) {
        self.inner.lock().last_append = Some(Instant::now());
    }

    fn last_append(&self) -> Option<Instant> {
        self.inner.lock().last_append
    }

    /// True if this replica quiesced under `leader` in `term`: that leader's heartbeats
    /// (AppendEntries without entries) leave it quiet.
    pub(super) fn quiet_under(&self, leader: Option<NodeId>, term: u64) -> bool {
        leader.is_some_and(|l| self.inner.lock().quiesced_under == Some((l, term)))
    }
}

/// A group ready to quiesce.
struct Candidate {
    group: GroupId,
    term: u64,
    index: u64,
    epoch: u64,
    replicas: Vec<(NodeId, String)>,
}

/// Starts the registry's ticker (needs a tokio runtime); it ends with the registry.
pub(super) fn start_ticker(registry: &Arc<Registry>) -> Result<(), RaftlogError> {
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|e| RaftlogError::Config(format!("the registry needs a tokio runtime: {e}")))?;
    let weak = Arc::downgrade(registry);
    let every = Duration::from_millis(registry.options.heartbeat_interval_ms.max(1));
    let liveness = registry.links.ctx().liveness.clone();
    handle.spawn(async move {
        // On the node's grid: the pingers of the same period wake with it.
        let mut interval = crate::clock::grid_interval(every);
        let mut lives: HashMap<NodeId, PeerLife> = HashMap::new();
        let mut round: u64 = 0;
        let mut last_pass = Instant::now();
        let mut resumed_at: Option<Instant> = None;
        loop {
            let tick = tokio::select! {
                _ = interval.tick() => true,
                () = liveness.changed() => false,
            };
            let Some(registry) = weak.upgrade() else {
                return;
            };
            if registry.stopped.load(Ordering::Acquire) {
                return;
            }
            // After a stop (SIGSTOP, a VM pause) every peer has been silent for as long;
            // liveness gives them a fresh timeout rather than finding them dead.
            let now = Instant::now();
            if now.duration_since(last_pass) > every.saturating_mul(STALL_TICKS) {
                // So were the leaders' AppendEntries: a leader that is still alive is given
                // as long as after any AppendEntries to be heard again (it wakes the groups
                // it quiesced without us when it hears from us) before we may campaign.
                resumed_at = Some(now);
                tracing::info!(
                    stalled_ms = now.duration_since(last_pass).as_millis() as u64,
                    "registry ticker resumed after a stall"
                );
            }
            last_pass = now;
            liveness.check_all();
            let now_lives = liveness.snapshot();
            registry.on_liveness(&lives, &now_lives);
            lives = now_lives;
            if tick {
                if round.is_multiple_of(LINK_REFRESH_TICKS) {
                    registry.refresh_links();
                    registry.hold_minorities();
                }
                round += 1;
                registry.tick_groups(resumed_at).await;
            }
        }
    });
    Ok(())
}

impl Registry {
    /// Activity on `hosted`: a quiesce under way is void, and a quiesced group wakes (a
    /// leader heartbeats at once).
    pub(super) fn wake(&self, hosted: &Hosted, why: &'static str) {
        if self.unquiesce(hosted) {
            tracing::debug!(why, "quiesced group woke");
            hosted.gate.apply(&hosted.raft, &self.elections_off);
            if hosted.raft.metrics().borrow().current_leader == Some(self.node_id) {
                let raft = hosted.raft.clone();
                tokio::spawn(async move {
                    let _ = raft.trigger().heartbeat().await;
                });
            }
        }
    }

    /// Every hosted group with its handle (a snapshot: no lock held while it is used).
    fn hosted_all(&self) -> Vec<(GroupId, Hosted)> {
        self.groups
            .read()
            .iter()
            .map(|(g, h)| (*g, h.clone()))
            .collect()
    }

    /// Marks activity on `hosted` (a quiesce under way is void) and ends its quiescence;
    /// returns whether it was quiesced. The caller re-applies the election gate.
    fn unquiesce(&self, hosted: &Hosted) -> bool {
        let was_quiesced = {
            let mut a = hosted.quiet.inner.lock();
            a.epoch += 1;
            a.quiesced_under = None;
            hosted.gate.quiesced.swap(false, Ordering::AcqRel)
        };
        if was_quiesced {
            self.quiesced_groups.fetch_sub(1, Ordering::Relaxed);
        }
        was_quiesced
    }

    /// A leader asks this replica to quiesce: yes only if it follows that leader in that
    /// term and holds and applied exactly its log.
    pub(super) fn quiesce_follower(&self, hosted: &Hosted, q: QuiesceRequest) -> bool {
        let ok = q.leader != self.node_id && hosted.heard_from_leader.load(Ordering::Acquire) && {
            let m = hosted.raft.metrics();
            let m = m.borrow();
            m.current_leader == Some(q.leader)
                && m.current_term == q.term
                && m.last_log_index.unwrap_or(0) == q.index
                && m.last_applied.map_or(0, |l| l.index) == q.index
                && matches!(m.state, ServerState::Follower | ServerState::Learner)
        };
        if ok {
            let newly = {
                let mut a = hosted.quiet.inner.lock();
                a.quiesced_under = Some((q.leader, q.term));
                !hosted.gate.quiesced.swap(true, Ordering::AcqRel)
            };
            if newly {
                self.quiesced_groups.fetch_add(1, Ordering::Relaxed);
            }
            hosted.gate.apply(&hosted.raft, &self.elections_off);
        }
        ok
    }

    /// One tick: heartbeats of every active group led here, and quiesce rounds. A follower's
    /// leader stays "live" (no campaign on timers) while liveness reports it alive and its
    /// last AppendEntries, or this process's resume from a stall (`resumed_at`), is recent.
    async fn tick_groups(&self, resumed_at: Option<Instant>) {
        let now = Instant::now();
        let idle_for = Duration::from_millis(self.options.quiesce_idle_ms);
        // Quiesced groups have nothing to do here: only the active ones are copied out (a
        // node idles with thousands of quiesced groups; copying them all every tick was
        // most of its CPU).
        let hosted: Vec<(GroupId, Hosted)> = self
            .groups
            .read()
            .iter()
            .filter(|(_, h)| !h.gate.quiesced.load(Ordering::Acquire))
            .map(|(g, h)| (*g, h.clone()))
            .collect();
        let stale_after = Duration::from_millis(
            2 * (self.config.election_timeout_max + self.options.heartbeat_interval_ms),
        );
        let mut beats = Vec::new();
        let mut ready = Vec::new();
        for (group, h) in hosted {
            let candidate = {
                let m = h.raft.metrics();
                let m = m.borrow();
                if m.current_leader != Some(self.node_id) || m.state != ServerState::Leader {
                    let follows = m.current_leader.is_some_and(|l| {
                        l != self.node_id
                            && !self.liveness().is_dead(l)
                            && h.quiet.last_append().is_some_and(|t| {
                                resumed_at.map_or(t, |r| r.max(t)).elapsed() < stale_after
                            })
                    });
                    drop(m);
                    if h.gate.follows_live_leader.swap(follows, Ordering::AcqRel) != follows {
                        h.gate.apply(&h.raft, &self.elections_off);
                    }
                    continue;
                }
                let last = m.last_log_index.unwrap_or(0);
                let seen = Seen {
                    term: m.current_term,
                    last,
                    applied: m.last_applied.map_or(0, |l| l.index),
                };
                let (idle, epoch) = h.quiet.observe(seen, now);
                let membership = m.membership_config.membership();
                let all_hold_it = m.replication.as_ref().is_some_and(|r| {
                    membership
                        .nodes()
                        .filter(|(id, _)| **id != self.node_id)
                        .all(|(id, _)| {
                            self.liveness().is_dead(*id)
                                || r.get(id).cloned().flatten().map(|l| l.index) == Some(last)
                        })
                });
                let ready = self.options.quiesce_idle_ms > 0
                    && idle >= idle_for
                    && seen.applied == last
                    && all_hold_it
                    && membership.get_joint_config().len() == 1
                    && !h.handing_over.load(Ordering::Acquire);
                ready.then(|| Candidate {
                    group,
                    term: m.current_term,
                    index: last,
                    epoch,
                    replicas: membership
                        .nodes()
                        .filter(|(id, _)| **id != self.node_id)
                        .map(|(id, n)| (*id, n.addr.clone()))
                        .collect(),
                })
            };
            match candidate {
                // No heartbeat this tick: the group is asked to quiesce instead.
                Some(c) if ready.len() < QUIESCE_ROUND_GROUPS_MAX => ready.push((h, c)),
                _ => beats.push(h.raft.clone()),
            }
        }
        for raft in &beats {
            let _ = raft.trigger().heartbeat().await;
        }
        if !ready.is_empty() {
            futures::future::join_all(ready.into_iter().map(|(h, c)| self.try_quiesce(h, c))).await;
        }
    }

    /// Asks every live replica of a candidate group to quiesce; quiesces the leader if all
    /// agreed and nothing happened meanwhile.
    async fn try_quiesce(&self, hosted: Hosted, c: Candidate) {
        let Ok(frame) = encode_envelope(&RaftEnvelope {
            group: c.group,
            request: RaftRequest::Quiesce(QuiesceRequest {
                leader: self.node_id,
                term: c.term,
                index: c.index,
            }),
        }) else {
            return;
        };
        let ttl = Duration::from_millis(self.options.heartbeat_interval_ms.saturating_mul(2));
        let asks = c
            .replicas
            .iter()
            .filter(|(id, _)| !self.liveness().is_dead(*id))
            .map(|(id, addr)| {
                let link = addr.parse().ok().map(|a| self.links.link(*id, a));
                let frame = frame.clone();
                async move {
                    let Some(link) = link else {
                        return false;
                    };
                    match link.call(frame, ttl).await {
                        Ok(b) => matches!(
                            chatd_codec::decode::<RaftReply>(&b),
                            Ok(RaftReply::Quiesce(true))
                        ),
                        Err(_) => false,
                    }
                }
            });
        if !futures::future::join_all(asks)
            .await
            .into_iter()
            .all(|ok| ok)
        {
            return;
        }
        let newly = {
            let a = hosted.quiet.inner.lock();
            if a.epoch != c.epoch {
                return;
            }
            {
                let m = hosted.raft.metrics();
                let m = m.borrow();
                if m.current_leader != Some(self.node_id)
                    || m.current_term != c.term
                    || m.last_log_index.unwrap_or(0) != c.index
                {
                    return;
                }
            }
            !hosted.gate.quiesced.swap(true, Ordering::AcqRel)
        };
        if newly {
            self.quiesced_groups.fetch_add(1, Ordering::Relaxed);
        }
        hosted.gate.apply(&hosted.raft, &self.elections_off);
        tracing::debug!(group = c.group, term = c.term, index = c.index, "quiesced");
    }

    /// Holds the elections of every group in which node liveness says this replica is in a
    /// minority (most other voters dead), and releases the others. Runs at every liveness
    /// change and every link refresh; costs one pass over the groups.
    ///
    /// A replica that gets its majority back (a partition healed) has heard no leader for
    /// as long as it was cut off, so its election timer has long run out, and the leaders
    /// of quiesced groups sent it nothing: campaigning at once would unseat a leader that a
    /// quorum follows (openraft 0.9 has no pre-vote, and a quiesced leader's lease is long
    /// gone). Its elections stay held for one lease and heartbeat instead, while the
    /// leaders, told by liveness that it is back, wake their groups and reach it.
    fn hold_minorities(&self) {
        let liveness = self.liveness();
        let rejoin_hold = Duration::from_millis(
            self.config.election_timeout_max + self.options.heartbeat_interval_ms,
        );
        // One pass under the read lock with one liveness snapshot (this runs every second
        // over every group); only the groups whose verdict flips are acted on.
        let lives = liveness.snapshot();
        let dead = |v: &NodeId| {
            lives
                .get(v)
                .is_some_and(|l| !l.alive && l.incarnation.is_some())
        };
        let flipped: Vec<(GroupId, Hosted, bool)> = self
            .groups
            .read()
            .iter()
            .filter_map(|(group, h)| {
                let minority = {
                    let m = h.raft.metrics();
                    let m = m.borrow();
                    let (mut voters, mut reachable) = (0usize, 0usize);
                    for v in m.membership_config.membership().voter_ids() {
                        voters += 1;
                        if v == self.node_id || !dead(&v) {
                            reachable += 1;
                        }
                    }
                    voters > 1 && reachable * 2 <= voters
                };
                (h.gate.in_minority.load(Ordering::Acquire) != minority)
                    .then(|| (*group, h.clone(), minority))
            })
            .collect();
        for (group, h, minority) in flipped {
            if h.gate.in_minority.swap(minority, Ordering::AcqRel) != minority {
                if minority {
                    tracing::debug!(
                        group,
                        "most voters of a group unreachable: its elections held"
                    );
                } else {
                    tracing::debug!(group, "majority reachable again: elections held one lease");
                    self.hold_elections(group, rejoin_hold);
                }
                h.gate.apply(&h.raft, &self.elections_off);
            }
        }
    }

    /// Reacts to liveness changes between two snapshots.
    fn on_liveness(&self, before: &HashMap<NodeId, PeerLife>, now: &HashMap<NodeId, PeerLife>) {
        let changed = before.len() != now.len()
            || now.iter().any(|(p, l)| {
                before
                    .get(p)
                    .is_none_or(|b| (b.alive, b.incarnation) != (l.alive, l.incarnation))
            });
        if changed {
            self.hold_minorities();
        }
        for (peer, life) in now {
            let was = before.get(peer);
            let was_alive = was.is_some_and(|b| b.alive);
            let restarted = was
                .and_then(|b| b.incarnation)
                .is_some_and(|i| life.incarnation.is_some_and(|n| n != i));
            if (was_alive && !life.alive) || restarted {
                self.leader_lost(*peer, was.and_then(|b| b.incarnation));
            }
            if life.alive && (!was_alive || restarted) {
                self.peer_back(*peer);
            }
        }
    }

    /// `peer` died or restarted: elect new leaders for the groups it led here.
    fn leader_lost(&self, peer: NodeId, incarnation: Option<u64>) {
        let lease = Duration::from_millis(self.config.election_timeout_max);
        let beat = Duration::from_millis(self.options.heartbeat_interval_ms);
        let hosted = self.hosted_all();
        let mut campaigns = 0usize;
        for (group, h) in hosted {
            let voters: Vec<NodeId> = {
                let m = h.raft.metrics();
                let m = m.borrow();
                if m.current_leader != Some(peer) {
                    continue;
                }
                m.membership_config.membership().voter_ids().collect()
            };
            let was_quiesced = self.unquiesce(&h);
            h.gate.follows_live_leader.store(false, Ordering::Release);
            let designated = voters
                .iter()
                .filter(|v| **v != peer && !self.liveness().is_dead(**v))
                .min()
                .copied();
            let minority = h.gate.in_minority.load(Ordering::Acquire);
            if designated == Some(self.node_id) && !minority {
                campaigns += 1;
                let now = tokio::time::Instant::now();
                // An active group's replicas refuse votes while the dead leader's lease
                // lasts (from its last AppendEntries); a quiesced one's expired long ago.
                let at = if was_quiesced {
                    now
                } else {
                    h.quiet
                        .last_append()
                        .map_or(now, |t| tokio::time::Instant::from_std(t + lease + beat))
                };
                let (raft, liveness, me) = (
                    h.raft.clone(),
                    self.links.ctx().liveness.clone(),
                    self.node_id,
                );
                tokio::spawn(async move {
                    tokio::time::sleep_until(at).await;
                    let leader = raft.metrics().borrow().current_leader;
                    let back = liveness
                        .snapshot()
                        .get(&peer)
                        .is_some_and(|l| l.alive && l.incarnation == incarnation);
                    if (leader == Some(peer) || leader.is_none()) && leader != Some(me) && !back {
                        tracing::info!(group, dead_leader = peer, "campaigning: leader lost");
                        let _ = raft.trigger().elect().await;
                    }
                });
            } else if was_quiesced && voters.contains(&self.node_id) && !minority {
                // Let the designated replica's vote request come first.
                let _ = self.hold_elections(group, lease);
            }
            h.gate.apply(&h.raft, &self.elections_off);
        }
        if campaigns > 0 {
            tracing::info!(
                peer,
                groups = campaigns,
                "peer lost: campaigning for the groups it led"
            );
        }
    }

    /// `peer` is back (or new): quiesced groups led here that it is in wake up, so its
    /// replicas hear their leader.
    fn peer_back(&self, peer: NodeId) {
        let hosted: Vec<Hosted> = self.groups.read().values().cloned().collect();
        for h in hosted {
            if !h.gate.quiesced.load(Ordering::Acquire) {
                continue;
            }
            let member = {
                let m = h.raft.metrics();
                let m = m.borrow();
                m.current_leader == Some(self.node_id)
                    && m.membership_config.membership().get_node(&peer).is_some()
            };
            if member {
                self.wake(&h, "peer back");
            }
        }
    }

    /// Opens links to every peer of a hosted group, and closes the others.
    fn refresh_links(&self) {
        let mut peers: HashMap<NodeId, String> = HashMap::new();
        for h in self.groups.read().values() {
            let m = h.raft.metrics();
            let m = m.borrow();
            for (id, node) in m.membership_config.membership().nodes() {
                if *id != self.node_id {
                    peers.entry(*id).or_insert_with(|| node.addr.clone());
                }
            }
        }
        let keep: HashSet<NodeId> = peers.keys().copied().collect();
        for (peer, addr) in peers {
            if let Ok(a) = addr.parse() {
                self.links.link(peer, a);
            }
        }
        self.links.retain(&keep);
    }
}
