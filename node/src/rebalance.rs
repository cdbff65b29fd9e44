//! The rebalancer: on group 0's leader, moves replicas one step at a time until placement
//! matches the target ([`chatd_membership::plan`]): no replica on a node that is not active,
//! replicas and preferred leaders within ±1 per active node.
//!
//! A move is recorded in group 0 before its first step (`BeginMove`), so whichever node
//! leads group 0 next (after a crash) drives it again from the start; every step is
//! idempotent: add the new replica as a learner, let it catch up, make the new replica
//! set the group's voters (joint consensus), record the end (`EndMove`), hand leadership
//! to the preferred leader. A move whose target stops being active is rolled back.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use chatd_membership::{MemberCommand, MemberReply, NodeState, ReplicaMove, Step, META_GROUP};
use chatd_raftlog::{GroupId, NodeId};
use tokio::time::Instant;

use crate::node::{Node, NodeReply, NodeRequest};

/// Moves driven at the same time (each copies a partition to a new node).
pub const REBALANCE_MOVES_IN_FLIGHT_MAX: usize = 2;
/// How often group 0's leader compares placement with the target.
pub const REBALANCE_TICK_MS: u64 = 500;
/// Longest a new replica may take to catch up before a move step gives up (and retries).
pub const MOVE_CATCH_UP_MS_MAX: u64 = 120_000;
/// Attempts of one move before it is rolled back.
pub const MOVE_ATTEMPTS_MAX: u32 = 5;
/// How often group 0's leader hands partitions back to their preferred leaders.
pub const LEADER_BALANCE_EVERY_MS: u64 = 2_000;
/// A partition goes back to its preferred leader only after another node led it this
/// long: a node that just restarted (or the next one in a rolling restart) is not handed
/// leadership it may give up again in seconds, and a failover is not undone at once.
pub const LEADER_RESTORE_GRACE_MS: u64 = 10_000;
/// Longest a removed node stays in group 0 waiting to learn of its removal.
pub const REMOVED_LEAVE_GRACE_MS: u64 = 30_000;
/// Leadership transfers per such round.
pub const LEADER_TRANSFERS_PER_ROUND_MAX: usize = 4;
/// Pause between attempts of a move step.
const MOVE_RETRY_MS: u64 = 500;

/// The rebalancer's state on one node (it acts only while the node leads group 0).
#[derive(Default)]
pub struct Rebalancer {
    driving: parking_lot::Mutex<HashSet<GroupId>>,
    /// Removed nodes still in group 0: the leader's last index when first seen, and when.
    removed_seen: parking_lot::Mutex<std::collections::HashMap<NodeId, (u64, Instant)>>,
    /// Partitions seen led by a node other than their preferred leader, since when.
    not_preferred_since: parking_lot::Mutex<std::collections::HashMap<GroupId, Instant>>,
    /// Moves begun by this node.
    pub moves_started: AtomicU64,
    /// Moves this node drove to their end.
    pub moves_done: AtomicU64,
    /// Moves this node rolled back.
    pub moves_rolled_back: AtomicU64,
    /// Time spent in moves that ended, in ms.
    pub move_ms_total: AtomicU64,
    /// Preferred-leader changes this node made.
    pub leaders_preferred: AtomicU64,
}

impl Rebalancer {
    /// The rebalancer's counters on this node (it acts only while leading group 0) and the
    /// `in_progress` moves group 0 records (Prometheus text).
    pub fn render_metrics(&self, in_progress: u64, out: &mut String) {
        use std::sync::atomic::Ordering::Relaxed;
        crate::metrics::metric(
            out,
            "chatd_replica_moves_in_progress",
            "Replica moves group 0 records as in progress.",
            "gauge",
            in_progress,
        );
        for (name, help, counter) in [
            (
                "chatd_replica_moves_started_total",
                "Replica moves this node began as group 0's leader.",
                &self.moves_started,
            ),
            (
                "chatd_replica_moves_done_total",
                "Replica moves this node drove to their end.",
                &self.moves_done,
            ),
            (
                "chatd_replica_moves_rolled_back_total",
                "Replica moves this node rolled back.",
                &self.moves_rolled_back,
            ),
            (
                "chatd_preferred_leader_changes_total",
                "Preferred-leader changes this node made to even out leadership.",
                &self.leaders_preferred,
            ),
        ] {
            crate::metrics::metric(out, name, help, "counter", counter.load(Relaxed));
        }
        crate::metrics::metric(
            out,
            "chatd_replica_move_seconds_total",
            "Time spent in replica moves that ended here (divide by moves done: time per move).",
            "counter",
            format!("{:.3}", self.move_ms_total.load(Relaxed) as f64 / 1000.0),
        );
    }

    /// Partitions whose move this node drives now.
    pub fn driving(&self) -> Vec<GroupId> {
        let mut v: Vec<GroupId> = self.driving.lock().iter().copied().collect();
        v.sort_unstable();
        v
    }
}

/// Runs the rebalancer loop for the node's life.
pub async fn run(node: Weak<Node>) {
    let mut last_leader_round = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(REBALANCE_TICK_MS)).await;
        let Some(n) = node.upgrade() else { return };
        if n.draining() || n.local_leader(META_GROUP) != Some(n.id) {
            continue;
        }
        let Some(m) = n.meta.membership() else {
            continue;
        };
        // Moves recorded in group 0 (begun here or by an earlier leader) are driven here.
        for (group, mv, epoch) in m.moves() {
            if n.rebalancer.driving.lock().insert(group) {
                let node = n.clone();
                tokio::spawn(async move {
                    let started = Instant::now();
                    let done = drive(&node, group, mv, epoch).await;
                    let r = &node.rebalancer;
                    match done {
                        Some(true) => {
                            r.moves_done.fetch_add(1, Ordering::Relaxed);
                            r.move_ms_total
                                .fetch_add(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                        }
                        Some(false) => {
                            r.moves_rolled_back.fetch_add(1, Ordering::Relaxed);
                        }
                        None => {}
                    }
                    r.driving.lock().remove(&group);
                });
            }
        }
        // Group 0's own voters follow the membership, and drained nodes are retired:
        // neither moves data, so a pause does not hold them.
        meta_voters(&n, &m).await;
        retire_drained(&n, &m).await;
        // Paused in group 0 (`SetRebalancePaused`): no new moves, no leadership moves.
        if m.rebalance_paused {
            continue;
        }
        if m.moves().count() == 0
            && last_leader_round.elapsed() >= Duration::from_millis(LEADER_BALANCE_EVERY_MS)
        {
            last_leader_round = Instant::now();
            prefer_leaders(&n, &m).await;
        }
        let free = REBALANCE_MOVES_IN_FLIGHT_MAX.saturating_sub(m.moves().count());
        for step in chatd_membership::plan(&m, free) {
            let (cmd, is_move) = match step {
                Step::Move {
                    group,
                    epoch,
                    add,
                    remove,
                } => (
                    MemberCommand::BeginMove {
                        group,
                        epoch,
                        add,
                        remove,
                    },
                    true,
                ),
                Step::PreferLeader {
                    group,
                    epoch,
                    leader,
                } => (
                    MemberCommand::SetPreferredLeader {
                        group,
                        epoch,
                        leader,
                    },
                    false,
                ),
            };
            match n.propose_member(cmd.clone()).await {
                Ok(MemberReply::Done { .. }) => {
                    tracing::info!(?step, "rebalance: step recorded");
                    if is_move {
                        n.rebalancer.moves_started.fetch_add(1, Ordering::Relaxed);
                    } else {
                        n.rebalancer
                            .leaders_preferred
                            .fetch_add(1, Ordering::Relaxed);
                        if let Step::PreferLeader { group, leader, .. } = step {
                            let node = n.clone();
                            tokio::spawn(async move {
                                if let Err(e) = node.transfer_leadership(group, leader).await {
                                    tracing::debug!(group, leader, error = %e, "rebalance: leadership not moved");
                                }
                            });
                        }
                    }
                }
                Ok(other) => tracing::debug!(?step, reply = %other, "rebalance: step refused"),
                Err(e) => tracing::debug!(?step, error = %e, "rebalance: step not recorded"),
            }
        }
    }
}

/// How many voters group 0 should have with `active` active nodes: 5 from five nodes on,
/// else 3 from three on, else every active node.
fn meta_voter_target(active: usize) -> usize {
    match active {
        a if a >= 5 => 5,
        a if a >= 3 => 3,
        a => a,
    }
}

/// Makes group 0's voters follow the membership: voters that are not active leave (their
/// replacements are active nodes, lowest id first, which are learners already), the count
/// follows [`meta_voter_target`], and removed nodes are dropped from group 0 entirely. If
/// this leader itself must stop being a voter it hands group 0 to a voter that stays.
async fn meta_voters(node: &Arc<Node>, m: &chatd_membership::Membership) {
    let Some((voters, learners)) = node.registry.membership_of(META_GROUP) else {
        return;
    };
    let active: Vec<NodeId> = m
        .nodes
        .values()
        .filter(|n| n.state == NodeState::Active)
        .map(|n| n.info.id)
        .collect();
    let target = meta_voter_target(active.len());
    if target == 0 {
        return;
    }
    // Keep the active voters (this leader first), then add active learners.
    let mut desired: Vec<NodeId> = voters
        .iter()
        .copied()
        .filter(|v| active.contains(v))
        .collect();
    desired.sort_by_key(|v| (*v != node.id, *v));
    desired.truncate(target);
    for a in &active {
        if desired.len() >= target {
            break;
        }
        if !desired.contains(a) && learners.contains(a) {
            desired.push(*a);
        }
    }
    let desired: std::collections::BTreeSet<NodeId> = desired.into_iter().collect();
    // A removed node leaves group 0 once it holds the entry that removed it (it then
    // exits on its own), or after REMOVED_LEAVE_GRACE_MS if it never gets it (it is dead).
    let drop: std::collections::BTreeSet<NodeId> = {
        let mut seen = node.rebalancer.removed_seen.lock();
        voters
            .iter()
            .chain(learners.iter())
            .copied()
            .filter(|id| !desired.contains(id))
            .filter(|id| m.state_of(*id).is_none_or(|s| s == NodeState::Removed))
            .filter(|id| {
                let Some((matched, last)) = node.registry.matched(META_GROUP, *id) else {
                    return true;
                };
                let (since_index, since) = *seen.entry(*id).or_insert((last, Instant::now()));
                matched >= since_index
                    || since.elapsed() >= Duration::from_millis(REMOVED_LEAVE_GRACE_MS)
            })
            .collect()
    };
    let learners_to_drop = learners.iter().any(|l| drop.contains(l));
    if desired == voters && !learners_to_drop {
        return;
    }
    if !desired.contains(&node.id) {
        if let Some(&to) = desired.iter().next() {
            if let Err(e) = node.transfer_leadership(META_GROUP, to).await {
                tracing::debug!(to, error = %e, "rebalance: group 0 leadership not handed over");
            }
        }
        return;
    }
    match node
        .registry
        .change_voters(
            META_GROUP,
            desired.clone(),
            drop,
            // A voter that leaves stays a learner: it keeps following group 0 (and learns
            // of its own removal).
            true,
            Duration::from_millis(MOVE_CATCH_UP_MS_MAX),
        )
        .await
    {
        Ok(_) => tracing::info!(?voters, ?desired, "rebalance: group 0 voters changed"),
        Err(e) => tracing::warn!(?desired, error = %e, "rebalance: group 0 voters not changed"),
    }
}

/// Tombstones draining nodes that hold nothing any more (no replica, not a voter of group
/// 0): they exit, and their ids never join again.
async fn retire_drained(node: &Arc<Node>, m: &chatd_membership::Membership) {
    let Some((voters, _)) = node.registry.membership_of(META_GROUP) else {
        return;
    };
    for n in m.nodes.values().filter(|n| n.state == NodeState::Draining) {
        let id = n.info.id;
        if !m.hosted_by(id).is_empty() || voters.contains(&id) {
            continue;
        }
        match node
            .propose_member(MemberCommand::SetNodeState {
                id,
                state: NodeState::Removed,
            })
            .await
        {
            Ok(MemberReply::Done { .. }) => tracing::info!(node = id, "rebalance: node removed"),
            Ok(other) => tracing::debug!(node = id, reply = %other, "rebalance: removal refused"),
            Err(e) => tracing::debug!(node = id, error = %e, "rebalance: removal not recorded"),
        }
    }
}

/// Hands partitions whose leader is not their preferred one (the first replica) back to
/// it, at most [`LEADER_TRANSFERS_PER_ROUND_MAX`] per round: leadership follows placement
/// after moves, restarts and failovers, so it stays spread evenly.
async fn prefer_leaders(node: &Arc<Node>, m: &chatd_membership::Membership) {
    let ids: Vec<NodeId> = node.peers().keys().copied().collect();
    let statuses = futures::future::join_all(ids.iter().map(|id| node.peer_status(*id))).await;
    let mut leaders: std::collections::BTreeMap<GroupId, (u64, NodeId)> = Default::default();
    let mut reachable = HashSet::new();
    for (id, status) in ids.iter().zip(statuses) {
        let Ok(status) = status else { continue };
        reachable.insert(*id);
        for g in status.groups.iter().filter(|g| g.is_leader()) {
            let e = leaders.entry(g.group).or_insert((g.term, *id));
            if g.term >= e.0 {
                *e = (g.term, *id);
            }
        }
    }
    let now = Instant::now();
    let due: Vec<(GroupId, NodeId, NodeId)> = {
        let mut since = node.rebalancer.not_preferred_since.lock();
        let mut due = Vec::new();
        for p in &m.parts {
            let Some(&preferred) = p.replicas.first() else {
                continue;
            };
            let Some(&(_, leader)) = leaders.get(&p.group) else {
                continue;
            };
            if leader == preferred {
                since.remove(&p.group);
                continue;
            }
            let first_seen = *since.entry(p.group).or_insert(now);
            if now.duration_since(first_seen) < Duration::from_millis(LEADER_RESTORE_GRACE_MS)
                || p.moving.is_some()
                || !reachable.contains(&preferred)
                || m.state_of(preferred) != Some(NodeState::Active)
            {
                continue;
            }
            due.push((p.group, leader, preferred));
        }
        due
    };
    for (group, leader, preferred) in due.into_iter().take(LEADER_TRANSFERS_PER_ROUND_MAX) {
        match node.transfer_leadership(group, preferred).await {
            Ok(_) => tracing::info!(
                group,
                from = leader,
                to = preferred,
                "rebalance: preferred leader restored"
            ),
            Err(e) => {
                tracing::debug!(group, to = preferred, error = %e, "rebalance: preferred leader not restored")
            }
        }
    }
}

/// Drives one recorded move to its end. `Some(true)`: done; `Some(false)`: rolled back;
/// `None`: no longer this node's to drive (group 0's leadership moved, or the move ended
/// elsewhere).
async fn drive(node: &Arc<Node>, group: GroupId, mv: ReplicaMove, epoch: u64) -> Option<bool> {
    let mut attempt = 0;
    loop {
        if node.local_leader(META_GROUP) != Some(node.id) {
            return None;
        }
        let m = node.meta.membership()?;
        let part = m.part(group)?;
        if part.epoch != epoch || part.moving != Some(mv) {
            return None;
        }
        if m.state_of(mv.add) != Some(NodeState::Active) {
            tracing::warn!(
                group,
                ?mv,
                "rebalance: the move's target is not active; rolling back"
            );
            return roll_back(node, group, mv, epoch, &part.replicas).await;
        }
        let target = part.target_replicas();
        match step(node, group, mv, &target).await {
            Ok(()) => {}
            Err(e) => {
                attempt += 1;
                tracing::warn!(group, ?mv, attempt, error = %e, "rebalance: move step failed");
                if attempt >= MOVE_ATTEMPTS_MAX {
                    return roll_back(node, group, mv, epoch, &part.replicas).await;
                }
                tokio::time::sleep(Duration::from_millis(MOVE_RETRY_MS)).await;
                continue;
            }
        }
        match node
            .propose_member(MemberCommand::EndMove {
                group,
                epoch,
                done: true,
            })
            .await
        {
            Ok(MemberReply::Done { .. }) => {}
            Ok(other) => {
                tracing::debug!(group, reply = %other, "rebalance: end of move refused");
                return None;
            }
            Err(e) => {
                tracing::debug!(group, error = %e, "rebalance: end of move not recorded; retrying");
                tokio::time::sleep(Duration::from_millis(MOVE_RETRY_MS)).await;
                continue;
            }
        }
        tracing::info!(
            group,
            add = mv.add,
            remove = mv.remove,
            "rebalance: replica moved"
        );
        if let Some(&preferred) = target.first() {
            if node.leader_of(group).await != Some(preferred) {
                if let Err(e) = node.transfer_leadership(group, preferred).await {
                    tracing::debug!(group, preferred, error = %e, "rebalance: preferred leader not restored");
                }
            }
        }
        return Some(true);
    }
}

/// The steps of a move on the partition's Raft group: learner, leadership off the replica
/// that leaves, new voters. Each is idempotent.
async fn step(
    node: &Arc<Node>,
    group: GroupId,
    mv: ReplicaMove,
    target: &[NodeId],
) -> Result<(), String> {
    let started = Instant::now();
    let addr = node
        .peer(mv.add)
        .ok_or_else(|| format!("node {} has no address", mv.add))?
        .cluster_addr
        .to_string();
    node.add_learner(group, mv.add, addr)
        .await
        .map_err(|e| format!("add learner: {e}"))?;
    tracing::info!(
        group,
        add = mv.add,
        ms = started.elapsed().as_millis() as u64,
        "rebalance: learner added"
    );
    // File chunks are not in the log: the new replica fetches the ones it lacks before
    // the leaving one stops being a voter (a chunk acknowledged by a majority of the old
    // set is then on the new replica, or on a replica that stays).
    files_caught_up(node, group, mv.add).await?;
    tracing::info!(
        group,
        add = mv.add,
        ms = started.elapsed().as_millis() as u64,
        "rebalance: file chunks caught up"
    );
    // The replica that leaves hands its leadership over first: clients see a handover,
    // not an election.
    if node.leader_of(group).await == Some(mv.remove) {
        let to = target
            .iter()
            .copied()
            .find(|r| *r != mv.remove && *r != mv.add)
            .ok_or_else(|| "no replica to take over".to_string())?;
        node.transfer_leadership(group, to)
            .await
            .map_err(|e| format!("leadership off node {}: {e}", mv.remove))?;
    }
    change_voters(node, group, target, &[]).await?;
    tracing::info!(
        group,
        ms = started.elapsed().as_millis() as u64,
        "rebalance: voters changed"
    );
    Ok(())
}

/// Asks `to` (a new replica of `group`) to fetch the file chunks it lacks until it lacks
/// none, within [`MOVE_CATCH_UP_MS_MAX`].
async fn files_caught_up(node: &Node, group: GroupId, to: NodeId) -> Result<(), String> {
    let addr = node
        .peer(to)
        .ok_or_else(|| format!("node {to} has no address"))?
        .cluster_addr;
    let started = Instant::now();
    loop {
        let reply = node
            .call(
                addr,
                &NodeRequest::RepairFiles { group },
                Duration::from_millis(MOVE_CATCH_UP_MS_MAX),
            )
            .await;
        let left = match reply {
            Ok(NodeReply::FilesMissing(0)) => return Ok(()),
            Ok(NodeReply::FilesMissing(n)) => format!("{n} chunks missing"),
            Ok(other) => format!("{other:?}"),
            Err(e) => e.to_string(),
        };
        if started.elapsed() >= Duration::from_millis(MOVE_CATCH_UP_MS_MAX) {
            return Err(format!("file chunks on node {to} not caught up: {left}"));
        }
        tokio::time::sleep(Duration::from_millis(MOVE_FILES_RETRY_MS)).await;
    }
}

/// The wait between two `RepairFiles` calls of a move.
pub const MOVE_FILES_RETRY_MS: u64 = 300;

/// On `group`'s leader, wherever it is: makes `voters` the voters once the new ones caught
/// up, and removes the learners in `drop`.
async fn change_voters(
    node: &Node,
    group: GroupId,
    voters: &[NodeId],
    drop: &[NodeId],
) -> Result<(), String> {
    let (_, reply) = node
        .call_leader_within(
            group,
            Duration::from_millis(MOVE_CATCH_UP_MS_MAX + 5_000),
            |_| NodeRequest::ChangeVoters {
                group,
                voters: voters.to_vec(),
                drop: drop.to_vec(),
                catch_up_ms: MOVE_CATCH_UP_MS_MAX,
            },
        )
        .await
        .map_err(|e| format!("change voters: {e}"))?;
    match reply {
        NodeReply::Proposed { .. } => Ok(()),
        other => Err(format!("change voters: unexpected reply {other:?}")),
    }
}

/// Restores the replica set the move started from and records that it ended undone.
async fn roll_back(
    node: &Arc<Node>,
    group: GroupId,
    mv: ReplicaMove,
    epoch: u64,
    replicas: &[NodeId],
) -> Option<bool> {
    for _ in 0..MOVE_ATTEMPTS_MAX {
        let restored = change_voters(node, group, replicas, &[mv.add]).await;
        if let Err(e) = restored {
            tracing::warn!(group, ?mv, error = %e, "rebalance: roll back not applied yet");
            tokio::time::sleep(Duration::from_millis(MOVE_RETRY_MS)).await;
            continue;
        }
        return match node
            .propose_member(MemberCommand::EndMove {
                group,
                epoch,
                done: false,
            })
            .await
        {
            Ok(MemberReply::Done { .. }) => {
                tracing::warn!(group, ?mv, "rebalance: move rolled back");
                Some(false)
            }
            _ => None,
        };
    }
    None
}
