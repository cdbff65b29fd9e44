//! Live membership: the cluster's nodes with their states and each partition's replica set,
//! as group 0 holds them. Group 0 is the one source of truth; a node's config only seeds
//! bootstrap and joining.
//!
//! Stored in group 0 beside the bootstrap record ([`crate::ClusterMeta`], written once):
//! `node\0<id u64 BE>` → [`NodeRecord`], `part\0<group u64 BE>` → [`PartitionRecord`]. A
//! record that was never written is what the bootstrap record says (every bootstrapped node
//! active, every partition at epoch 0), so clusters bootstrapped before membership was live
//! read the same without a migration.

use std::collections::BTreeMap;

use chatd_raftlog::{GroupId, NodeId};
use serde::{Deserialize, Serialize};

use crate::{ClusterMeta, NodeInfo};

/// Where a node is in its life in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Admitted; catching up group 0. Gets no replicas yet.
    Joining,
    /// A full member: may hold replicas and lead.
    Active,
    /// Leaving: its replicas are being moved off; gets no new ones.
    Draining,
    /// Gone for good (a tombstone): its id can never join again.
    Removed,
}

impl NodeState {
    /// Its name in the HTTP APIs and chat-cli: `joining`, `active`, `draining`, `removed`.
    pub fn name(self) -> &'static str {
        match self {
            NodeState::Joining => "joining",
            NodeState::Active => "active",
            NodeState::Draining => "draining",
            NodeState::Removed => "removed",
        }
    }
}

/// A node as group 0 stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Id and addresses.
    pub info: NodeInfo,
    /// Its state.
    pub state: NodeState,
}

/// A replica move in progress: `add` joins the partition's Raft group (as a learner, then a
/// voter) and `remove` leaves it. Recorded before the first step, so whichever node leads
/// group 0 after a crash finishes or rolls it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaMove {
    /// The node that gets a replica.
    pub add: NodeId,
    /// The node that gives its replica up.
    pub remove: NodeId,
}

/// One partition's replica set as group 0 stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionRecord {
    /// The partition's group (1..=P).
    pub group: GroupId,
    /// Replica nodes; the first is the preferred leader.
    pub replicas: Vec<NodeId>,
    /// Bumped by every change of this record: a change names the epoch it was planned on,
    /// and one planned on an older epoch is refused.
    pub epoch: u64,
    /// The move in progress, if any (at most one per partition).
    pub moving: Option<ReplicaMove>,
}

impl PartitionRecord {
    /// The replica set once the move in progress (if any) is done.
    pub fn target_replicas(&self) -> Vec<NodeId> {
        match self.moving {
            None => self.replicas.clone(),
            Some(m) => self
                .replicas
                .iter()
                .map(|&r| if r == m.remove { m.add } else { r })
                .collect(),
        }
    }

    /// Nodes that host a replica of this partition now: its replicas and a move's target.
    pub fn hosts(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.replicas
            .iter()
            .copied()
            .chain(self.moving.map(|m| m.add))
    }
}

/// The cluster's membership, as the applied part of group 0 says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    /// The cluster's id.
    pub cluster_id: String,
    /// Number of partitions P (fixed at bootstrap: the chat → partition hash depends on it).
    pub partitions: u32,
    /// Replicas per partition R.
    pub replication: u32,
    /// Every node ever admitted, removed ones included (their ids stay taken).
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// One record per partition, in group order (group g at index g − 1).
    pub parts: Vec<PartitionRecord>,
    /// The rebalancer plans no new moves while set (moves in progress still finish).
    pub rebalance_paused: bool,
}

impl Membership {
    /// The membership a bootstrap record describes.
    pub fn from_bootstrap(meta: &ClusterMeta) -> Self {
        Self {
            cluster_id: meta.cluster_id.clone(),
            partitions: meta.table.partitions,
            replication: meta.table.replication,
            nodes: meta
                .nodes
                .values()
                .map(|info| {
                    (
                        info.id,
                        NodeRecord {
                            info: info.clone(),
                            state: NodeState::Active,
                        },
                    )
                })
                .collect(),
            parts: meta
                .table
                .assignments
                .iter()
                .map(|a| PartitionRecord {
                    group: a.group,
                    replicas: a.replicas.clone(),
                    epoch: 0,
                    moving: None,
                })
                .collect(),
            rebalance_paused: false,
        }
    }

    /// The record of partition `group`.
    pub fn part(&self, group: GroupId) -> Option<&PartitionRecord> {
        let i = usize::try_from(group.checked_sub(1)?).ok()?;
        self.parts.get(i)
    }

    fn part_mut(&mut self, group: GroupId) -> Option<&mut PartitionRecord> {
        let i = usize::try_from(group.checked_sub(1)?).ok()?;
        self.parts.get_mut(i)
    }

    /// The replicas of partition `group`.
    pub fn replicas(&self, group: GroupId) -> Option<&[NodeId]> {
        self.part(group).map(|p| p.replicas.as_slice())
    }

    /// The partitions `node` must host: those it replicates and those moving to it.
    pub fn hosted_by(&self, node: NodeId) -> Vec<GroupId> {
        self.parts
            .iter()
            .filter(|p| p.hosts().any(|h| h == node))
            .map(|p| p.group)
            .collect()
    }

    /// Nodes that are members (not removed), by id.
    pub fn live_nodes(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes
            .values()
            .filter(|n| n.state != NodeState::Removed)
    }

    /// The state of `node`, if it was ever admitted.
    pub fn state_of(&self, node: NodeId) -> Option<NodeState> {
        self.nodes.get(&node).map(|n| n.state)
    }

    /// Moves in progress.
    pub fn moves(&self) -> impl Iterator<Item = (GroupId, ReplicaMove, u64)> + '_ {
        self.parts
            .iter()
            .filter_map(|p| p.moving.map(|m| (p.group, m, p.epoch)))
    }

    /// Applies `cmd` to this view; the answer says what happened. Refusals change nothing.
    /// Returns the records to store (nodes and partitions that changed).
    pub fn apply(&mut self, cmd: &MemberCommand) -> (MemberReply, Changed) {
        let mut changed = Changed::default();
        let reply = match cmd {
            MemberCommand::AddNode { info } => self.add_node(info, &mut changed),
            MemberCommand::SetNodeState { id, state } => {
                self.set_node_state(*id, *state, &mut changed)
            }
            MemberCommand::BeginMove {
                group,
                epoch,
                add,
                remove,
            } => self.begin_move(*group, *epoch, *add, *remove, &mut changed),
            MemberCommand::EndMove { group, epoch, done } => {
                self.end_move(*group, *epoch, *done, &mut changed)
            }
            MemberCommand::SetPreferredLeader {
                group,
                epoch,
                leader,
            } => self.set_preferred_leader(*group, *epoch, *leader, &mut changed),
            MemberCommand::SetRebalancePaused { paused } => {
                if self.rebalance_paused != *paused {
                    self.rebalance_paused = *paused;
                    changed.rebalance = true;
                }
                MemberReply::Done { epoch: 0 }
            }
        };
        (reply, changed)
    }

    fn add_node(&mut self, info: &NodeInfo, changed: &mut Changed) -> MemberReply {
        if info.id == 0 {
            return MemberReply::Refused("node id 0 is reserved".into());
        }
        if let Some(existing) = self.nodes.get(&info.id) {
            return match existing.state {
                NodeState::Removed => MemberReply::Tombstoned(info.id),
                // A retried join of the same node is admitted again (idempotent).
                _ if existing.info == *info => MemberReply::AlreadyMember(existing.state),
                _ => MemberReply::IdTaken(info.id),
            };
        }
        if let Some(other) = self
            .live_nodes()
            .find(|n| n.info.cluster_addr == info.cluster_addr || n.info.api_addr == info.api_addr)
        {
            return MemberReply::AddressTaken(other.info.id);
        }
        let record = NodeRecord {
            info: info.clone(),
            state: NodeState::Joining,
        };
        self.nodes.insert(info.id, record);
        changed.nodes.push(info.id);
        MemberReply::Done { epoch: 0 }
    }

    fn set_node_state(
        &mut self,
        id: NodeId,
        state: NodeState,
        changed: &mut Changed,
    ) -> MemberReply {
        let Some(node) = self.nodes.get(&id) else {
            return MemberReply::UnknownNode(id);
        };
        let from = node.state;
        let allowed = matches!(
            (from, state),
            (NodeState::Joining, NodeState::Active)
                | (NodeState::Joining | NodeState::Active, NodeState::Draining)
                | (NodeState::Draining, NodeState::Active)
                | (_, NodeState::Removed)
        ) || from == state;
        if !allowed {
            return MemberReply::Refused(format!("node {id} cannot go from {from:?} to {state:?}"));
        }
        if state == NodeState::Draining && from != NodeState::Draining {
            // Never below R active nodes: the replicas could not all move.
            let active_after = self
                .nodes
                .values()
                .filter(|n| n.info.id != id && n.state == NodeState::Active)
                .count();
            if active_after < self.replication as usize {
                return MemberReply::Refused(format!(
                    "removing node {id} would leave {active_after} active nodes, fewer than \
                     the replication factor {}: add a node first",
                    self.replication
                ));
            }
        }
        if state == NodeState::Removed && from != NodeState::Removed {
            // A tombstone only once nothing is left on the node: its replicas moved first.
            if let Some(p) = self.parts.iter().find(|p| p.hosts().any(|h| h == id)) {
                return MemberReply::Refused(format!(
                    "node {id} still holds a replica of partition {}",
                    p.group
                ));
            }
        }
        if from != state {
            if let Some(node) = self.nodes.get_mut(&id) {
                node.state = state;
            }
            changed.nodes.push(id);
        }
        MemberReply::Done { epoch: 0 }
    }

    fn begin_move(
        &mut self,
        group: GroupId,
        epoch: u64,
        add: NodeId,
        remove: NodeId,
        changed: &mut Changed,
    ) -> MemberReply {
        if self.state_of(add) != Some(NodeState::Active) {
            return MemberReply::Refused(format!("node {add} is not an active member"));
        }
        let Some(part) = self.part_mut(group) else {
            return MemberReply::UnknownPartition(group);
        };
        if part.epoch != epoch {
            return MemberReply::StaleEpoch(part.epoch);
        }
        if part.moving.is_some() {
            return MemberReply::Refused(format!("partition {group} is already moving"));
        }
        if part.replicas.contains(&add) || !part.replicas.contains(&remove) {
            return MemberReply::Refused(format!(
                "partition {group}: cannot move from {remove} to {add} (replicas {:?})",
                part.replicas
            ));
        }
        part.moving = Some(ReplicaMove { add, remove });
        part.epoch += 1;
        changed.parts.push(group);
        MemberReply::Done { epoch: part.epoch }
    }

    fn end_move(
        &mut self,
        group: GroupId,
        epoch: u64,
        done: bool,
        changed: &mut Changed,
    ) -> MemberReply {
        let Some(part) = self.part_mut(group) else {
            return MemberReply::UnknownPartition(group);
        };
        if part.epoch != epoch {
            return MemberReply::StaleEpoch(part.epoch);
        }
        if part.moving.is_none() {
            return MemberReply::Refused(format!("partition {group} is not moving"));
        }
        if done {
            part.replicas = part.target_replicas();
        }
        part.moving = None;
        part.epoch += 1;
        changed.parts.push(group);
        MemberReply::Done { epoch: part.epoch }
    }

    fn set_preferred_leader(
        &mut self,
        group: GroupId,
        epoch: u64,
        leader: NodeId,
        changed: &mut Changed,
    ) -> MemberReply {
        let Some(part) = self.part_mut(group) else {
            return MemberReply::UnknownPartition(group);
        };
        if part.epoch != epoch {
            return MemberReply::StaleEpoch(part.epoch);
        }
        let Some(at) = part.replicas.iter().position(|r| *r == leader) else {
            return MemberReply::Refused(format!("node {leader} is not a replica of {group}"));
        };
        part.replicas.swap(0, at);
        part.epoch += 1;
        changed.parts.push(group);
        MemberReply::Done { epoch: part.epoch }
    }
}

/// What an applied command changed, to be stored.
#[derive(Debug, Default)]
pub struct Changed {
    /// Nodes whose record changed.
    pub nodes: Vec<NodeId>,
    /// Partitions whose record changed.
    pub parts: Vec<GroupId>,
    /// The rebalancer's pause switch changed.
    pub rebalance: bool,
}

impl Changed {
    /// True if nothing changed.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.parts.is_empty() && !self.rebalance
    }
}

/// Membership commands of group 0 (inside [`crate::MetaCommand::Member`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberCommand {
    /// Admits a node as `Joining`. Refused if its id is taken by another node or
    /// tombstoned, or its addresses are another live node's. Admitting the same node again
    /// answers [`MemberReply::AlreadyMember`].
    AddNode { info: NodeInfo },
    /// Moves a node to `state`: Joining → Active, Joining/Active → Draining, Draining →
    /// Active, any → Removed (only once it hosts no replica).
    SetNodeState { id: NodeId, state: NodeState },
    /// Records that `group`'s replica on `remove` moves to `add` (an active node), planned
    /// on `epoch`.
    BeginMove {
        group: GroupId,
        epoch: u64,
        add: NodeId,
        remove: NodeId,
    },
    /// Ends `group`'s move: `done` swaps the replica (the Raft group's voters changed),
    /// otherwise the move is rolled back and the replicas stay.
    EndMove {
        group: GroupId,
        epoch: u64,
        done: bool,
    },
    /// Makes `leader` (a replica) `group`'s preferred leader.
    SetPreferredLeader {
        group: GroupId,
        epoch: u64,
        leader: NodeId,
    },
    /// Pauses (or resumes) the rebalancer's planning, for every group 0 leader to come.
    SetRebalancePaused { paused: bool },
}

/// Answers of [`MemberCommand`]s.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberReply {
    /// Applied; `epoch` is the partition's new epoch (0 for node commands).
    Done { epoch: u64 },
    /// The node is a member already, in this state.
    AlreadyMember(NodeState),
    /// Another node has this id.
    IdTaken(NodeId),
    /// The id belonged to a removed node: it never joins again.
    Tombstoned(NodeId),
    /// This node's address belongs to another live node.
    AddressTaken(NodeId),
    /// No such node.
    UnknownNode(NodeId),
    /// No such partition.
    UnknownPartition(GroupId),
    /// Planned on an older epoch; the current one is given.
    StaleEpoch(u64),
    /// The cluster was not bootstrapped yet.
    NotBootstrapped,
    /// Refused, with the reason.
    Refused(String),
}

impl std::fmt::Display for MemberReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Done { epoch } => write!(f, "done (epoch {epoch})"),
            Self::AlreadyMember(s) => write!(f, "already a member ({s:?})"),
            Self::IdTaken(id) => write!(f, "node id {id} is taken by another node"),
            Self::Tombstoned(id) => {
                write!(
                    f,
                    "node id {id} belonged to a removed node and cannot join again"
                )
            }
            Self::AddressTaken(id) => write!(f, "the address is node {id}'s"),
            Self::UnknownNode(id) => write!(f, "no node {id}"),
            Self::UnknownPartition(g) => write!(f, "no partition {g}"),
            Self::StaleEpoch(e) => write!(f, "planned on an older epoch (now {e})"),
            Self::NotBootstrapped => write!(f, "the cluster is not bootstrapped yet"),
            Self::Refused(why) => write!(f, "{why}"),
        }
    }
}

pub(crate) fn node_key(id: NodeId) -> Vec<u8> {
    [b"node\0".as_slice(), &id.to_be_bytes()].concat()
}

pub(crate) fn part_key(group: GroupId) -> Vec<u8> {
    [b"part\0".as_slice(), &group.to_be_bytes()].concat()
}

/// Group 0's key of the rebalancer's pause switch (a codec-encoded bool).
pub(crate) const REBALANCE_KEY: &[u8] = b"rebalance";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::place;

    fn info(id: NodeId) -> NodeInfo {
        NodeInfo {
            id,
            cluster_addr: format!("127.0.0.1:{}", 7001 + 10 * id),
            api_addr: format!("127.0.0.1:{}", 7000 + 10 * id),
        }
    }

    fn three() -> Membership {
        let nodes = (1..=3).map(|i| (i, info(i))).collect();
        Membership::from_bootstrap(&ClusterMeta {
            cluster_id: "c".into(),
            nodes,
            table: place(&[1, 2, 3], 4, 2).unwrap(),
        })
    }

    #[test]
    fn a_node_joins_once_and_a_removed_id_never_again() {
        let mut m = three();
        let add = |i: NodeInfo| MemberCommand::AddNode { info: i };
        assert_eq!(m.apply(&add(info(4))).0, MemberReply::Done { epoch: 0 });
        assert_eq!(m.state_of(4), Some(NodeState::Joining));
        assert_eq!(
            m.apply(&add(info(4))).0,
            MemberReply::AlreadyMember(NodeState::Joining)
        );
        let mut other = info(4);
        other.cluster_addr = "10.0.0.9:1".into();
        assert_eq!(m.apply(&add(other)).0, MemberReply::IdTaken(4));
        let mut clash = info(5);
        clash.cluster_addr = info(2).cluster_addr;
        assert_eq!(m.apply(&add(clash)).0, MemberReply::AddressTaken(2));
        assert_eq!(
            m.apply(&MemberCommand::AddNode {
                info: NodeInfo { id: 0, ..info(9) }
            })
            .0,
            MemberReply::Refused("node id 0 is reserved".into())
        );
        let remove = MemberCommand::SetNodeState {
            id: 4,
            state: NodeState::Removed,
        };
        assert_eq!(m.apply(&remove).0, MemberReply::Done { epoch: 0 });
        assert_eq!(m.apply(&add(info(4))).0, MemberReply::Tombstoned(4));
        // Its address is free again for a new id.
        assert_eq!(
            m.apply(&add(NodeInfo { id: 6, ..info(4) })).0,
            MemberReply::Done { epoch: 0 }
        );
    }

    #[test]
    fn a_node_is_not_retired_below_r_active_nodes() {
        let mut m = three();
        assert_eq!(m.replication, 2);
        let drain = |id| MemberCommand::SetNodeState {
            id,
            state: NodeState::Draining,
        };
        assert_eq!(m.apply(&drain(3)).0, MemberReply::Done { epoch: 0 });
        let before = m.clone();
        let (reply, changed) = m.apply(&drain(2));
        assert!(
            matches!(&reply, MemberReply::Refused(why) if why.contains("fewer than the replication factor 2")),
            "{reply:?}"
        );
        assert!(changed.nodes.is_empty());
        assert_eq!(m, before);
    }

    #[test]
    fn a_node_holding_replicas_cannot_be_tombstoned() {
        let mut m = three();
        let before = m.clone();
        let (reply, changed) = m.apply(&MemberCommand::SetNodeState {
            id: 1,
            state: NodeState::Removed,
        });
        assert!(matches!(reply, MemberReply::Refused(_)), "{reply:?}");
        assert!(changed.nodes.is_empty());
        assert_eq!(m, before, "a refusal changes nothing");
    }

    #[test]
    fn a_move_goes_through_its_epochs_and_stale_plans_are_refused() {
        let mut m = three();
        m.apply(&MemberCommand::AddNode { info: info(4) });
        let begin = MemberCommand::BeginMove {
            group: 1,
            epoch: 0,
            add: 4,
            remove: 1,
        };
        // Only an active node gets replicas.
        assert!(matches!(m.apply(&begin).0, MemberReply::Refused(_)));
        m.apply(&MemberCommand::SetNodeState {
            id: 4,
            state: NodeState::Active,
        });
        assert_eq!(m.apply(&begin).0, MemberReply::Done { epoch: 1 });
        assert_eq!(m.hosted_by(4), vec![1]);
        assert_eq!(m.part(1).unwrap().target_replicas(), vec![4, 2]);
        assert_eq!(m.apply(&begin).0, MemberReply::StaleEpoch(1));
        let end = |epoch, done| MemberCommand::EndMove {
            group: 1,
            epoch,
            done,
        };
        assert_eq!(m.apply(&end(0, true)).0, MemberReply::StaleEpoch(1));
        assert_eq!(m.apply(&end(1, true)).0, MemberReply::Done { epoch: 2 });
        assert_eq!(m.replicas(1), Some(&[4, 2][..]));
        assert!(!m.hosted_by(1).contains(&1));
        // A rolled-back move keeps the replicas.
        let begin = MemberCommand::BeginMove {
            group: 1,
            epoch: 2,
            add: 3,
            remove: 2,
        };
        assert_eq!(m.apply(&begin).0, MemberReply::Done { epoch: 3 });
        assert_eq!(m.apply(&end(3, false)).0, MemberReply::Done { epoch: 4 });
        assert_eq!(m.replicas(1), Some(&[4, 2][..]));
        let lead = MemberCommand::SetPreferredLeader {
            group: 1,
            epoch: 4,
            leader: 2,
        };
        assert_eq!(m.apply(&lead).0, MemberReply::Done { epoch: 5 });
        assert_eq!(m.replicas(1), Some(&[2, 4][..]));
        // A move onto a node that already holds a replica is refused.
        let dup = MemberCommand::BeginMove {
            group: 1,
            epoch: 5,
            add: 4,
            remove: 2,
        };
        assert!(matches!(m.apply(&dup).0, MemberReply::Refused(_)));
    }
}

/// One step the rebalancer may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Move `group`'s replica from `remove` to `add`.
    Move {
        group: GroupId,
        epoch: u64,
        add: NodeId,
        remove: NodeId,
    },
    /// Make `leader` (already a replica) `group`'s preferred leader.
    PreferLeader {
        group: GroupId,
        epoch: u64,
        leader: NodeId,
    },
}

/// Plans at most `max` steps toward the target placement: no replica on a node that is not
/// active (draining or removed nodes are emptied first), replicas per active node within
/// ±1 of an even share, preferred leaders within ±1. Partitions already moving are left
/// alone, and no partition gets two steps. Deterministic: the same membership plans the
/// same steps (ties go to the lowest node id and group).
pub fn plan(m: &Membership, max: usize) -> Vec<Step> {
    let active: Vec<NodeId> = m
        .nodes
        .values()
        .filter(|n| n.state == NodeState::Active)
        .map(|n| n.info.id)
        .collect();
    let mut steps = Vec::new();
    if active.is_empty() || max == 0 {
        return steps;
    }
    // Load as it will be once the moves in progress are done.
    let mut load: BTreeMap<NodeId, usize> = active.iter().map(|n| (*n, 0)).collect();
    for p in &m.parts {
        for r in p.target_replicas() {
            if let Some(l) = load.get_mut(&r) {
                *l += 1;
            }
        }
    }
    let mut busy: std::collections::BTreeSet<GroupId> = m
        .parts
        .iter()
        .filter(|p| p.moving.is_some())
        .map(|p| p.group)
        .collect();
    let least_loaded = |load: &BTreeMap<NodeId, usize>, exclude: &[NodeId]| {
        load.iter()
            .filter(|(n, _)| !exclude.contains(n))
            .min_by_key(|(n, l)| (**l, **n))
            .map(|(n, _)| *n)
    };
    // 1. Replicas on nodes that are not active move to the least loaded active node.
    for p in &m.parts {
        if steps.len() >= max {
            return steps;
        }
        if busy.contains(&p.group) {
            continue;
        }
        let Some(&off) = p.replicas.iter().find(|r| !load.contains_key(r)) else {
            continue;
        };
        let Some(to) = least_loaded(&load, &p.replicas) else {
            continue;
        };
        steps.push(Step::Move {
            group: p.group,
            epoch: p.epoch,
            add: to,
            remove: off,
        });
        busy.insert(p.group);
        if let Some(l) = load.get_mut(&to) {
            *l += 1;
        }
    }
    // 2. Even replica counts: from the most loaded node to the least loaded one.
    while steps.len() < max {
        let Some((&hi, &hi_load)) = load
            .iter()
            .max_by_key(|(n, l)| (**l, std::cmp::Reverse(**n)))
        else {
            break;
        };
        let Some((&lo, &lo_load)) = load.iter().min_by_key(|(n, l)| (**l, **n)) else {
            break;
        };
        if hi_load <= lo_load + 1 {
            break;
        }
        // Prefer a partition `hi` does not lead by preference: its leadership stays put.
        let candidate = m
            .parts
            .iter()
            .filter(|p| {
                !busy.contains(&p.group) && p.replicas.contains(&hi) && !p.replicas.contains(&lo)
            })
            .min_by_key(|p| (p.replicas.first() == Some(&hi), p.group));
        let Some(p) = candidate else { break };
        steps.push(Step::Move {
            group: p.group,
            epoch: p.epoch,
            add: lo,
            remove: hi,
        });
        busy.insert(p.group);
        if let Some(l) = load.get_mut(&hi) {
            *l -= 1;
        }
        if let Some(l) = load.get_mut(&lo) {
            *l += 1;
        }
    }
    // 3. Even preferred leaders, among partitions that are not moving.
    let mut leads: BTreeMap<NodeId, usize> = active.iter().map(|n| (*n, 0)).collect();
    for p in &m.parts {
        if let Some(l) = p.target_replicas().first().and_then(|f| leads.get_mut(f)) {
            *l += 1;
        }
    }
    while steps.len() < max {
        let Some((&hi, &hi_n)) = leads
            .iter()
            .max_by_key(|(n, l)| (**l, std::cmp::Reverse(**n)))
        else {
            break;
        };
        // The least-leading node that can take one of hi's partitions.
        let mut best: Option<(usize, NodeId, &PartitionRecord)> = None;
        for p in m.parts.iter().filter(|p| {
            !busy.contains(&p.group) && p.moving.is_none() && p.replicas.first() == Some(&hi)
        }) {
            for r in p.replicas.iter().skip(1) {
                let Some(&n) = leads.get(r) else { continue };
                if n + 1 < hi_n && best.is_none_or(|(bn, br, _)| (n, *r) < (bn, br)) {
                    best = Some((n, *r, p));
                }
            }
        }
        let Some((_, lo, p)) = best else { break };
        steps.push(Step::PreferLeader {
            group: p.group,
            epoch: p.epoch,
            leader: lo,
        });
        busy.insert(p.group);
        if let Some(l) = leads.get_mut(&hi) {
            *l -= 1;
        }
        if let Some(l) = leads.get_mut(&lo) {
            *l += 1;
        }
    }
    steps
}

#[cfg(test)]
mod plan_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::place;

    fn cluster(nodes: u64, partitions: u32, r: u32) -> Membership {
        let ids: Vec<NodeId> = (1..=nodes).collect();
        let infos = ids
            .iter()
            .map(|&id| {
                (
                    id,
                    NodeInfo {
                        id,
                        cluster_addr: format!("c{id}"),
                        api_addr: format!("a{id}"),
                    },
                )
            })
            .collect();
        Membership::from_bootstrap(&ClusterMeta {
            cluster_id: "c".into(),
            nodes: infos,
            table: place(&ids, partitions, r).unwrap(),
        })
    }

    fn join(m: &mut Membership, id: NodeId) {
        let info = NodeInfo {
            id,
            cluster_addr: format!("c{id}"),
            api_addr: format!("a{id}"),
        };
        assert_eq!(
            m.apply(&MemberCommand::AddNode { info }).0,
            MemberReply::Done { epoch: 0 }
        );
        m.apply(&MemberCommand::SetNodeState {
            id,
            state: NodeState::Active,
        });
    }

    /// Runs the plan to completion the way the rebalancer does (each move begun and ended).
    fn settle(m: &mut Membership, per_round: usize) -> usize {
        let mut rounds = 0;
        loop {
            let steps = plan(m, per_round);
            if steps.is_empty() {
                return rounds;
            }
            rounds += 1;
            assert!(rounds < 10_000, "the plan does not converge");
            for s in steps {
                match s {
                    Step::Move {
                        group,
                        epoch,
                        add,
                        remove,
                    } => {
                        let (r, _) = m.apply(&MemberCommand::BeginMove {
                            group,
                            epoch,
                            add,
                            remove,
                        });
                        let MemberReply::Done { epoch } = r else {
                            panic!("{r:?}")
                        };
                        let (r, _) = m.apply(&MemberCommand::EndMove {
                            group,
                            epoch,
                            done: true,
                        });
                        assert!(matches!(r, MemberReply::Done { .. }), "{r:?}");
                    }
                    Step::PreferLeader {
                        group,
                        epoch,
                        leader,
                    } => {
                        let (r, _) = m.apply(&MemberCommand::SetPreferredLeader {
                            group,
                            epoch,
                            leader,
                        });
                        assert!(matches!(r, MemberReply::Done { .. }), "{r:?}");
                    }
                }
            }
        }
    }

    fn assert_even(m: &Membership) {
        let active: Vec<NodeId> = m
            .nodes
            .values()
            .filter(|n| n.state == NodeState::Active)
            .map(|n| n.info.id)
            .collect();
        let counts: Vec<usize> = active.iter().map(|n| m.hosted_by(*n).len()).collect();
        let leads: Vec<usize> = active
            .iter()
            .map(|n| {
                m.parts
                    .iter()
                    .filter(|p| p.replicas.first() == Some(n))
                    .count()
            })
            .collect();
        let spread = |v: &[usize]| v.iter().max().unwrap() - v.iter().min().unwrap();
        assert!(spread(&counts) <= 1, "replicas {counts:?}");
        assert!(spread(&leads) <= 1, "leaders {leads:?}");
        for p in &m.parts {
            let mut r = p.replicas.clone();
            r.sort_unstable();
            r.dedup();
            assert_eq!(r.len(), m.replication as usize, "R kept on {}", p.group);
            assert!(r.iter().all(|n| active.contains(n)), "{p:?}");
        }
    }

    #[test]
    fn growing_three_to_five_spreads_replicas_and_leaders_within_one() {
        let mut m = cluster(3, 64, 3);
        assert!(plan(&m, 8).is_empty(), "a balanced cluster plans nothing");
        join(&mut m, 4);
        join(&mut m, 5);
        settle(&mut m, 2);
        assert_even(&m);
        assert!(plan(&m, 8).is_empty());
    }

    #[test]
    fn draining_nodes_are_emptied_and_r_is_kept() {
        let mut m = cluster(5, 64, 3);
        for id in [4, 5] {
            m.apply(&MemberCommand::SetNodeState {
                id,
                state: NodeState::Draining,
            });
        }
        settle(&mut m, 3);
        assert!(m.hosted_by(4).is_empty() && m.hosted_by(5).is_empty());
        assert_even(&m);
    }

    #[test]
    fn the_plan_is_bounded_and_skips_moving_partitions() {
        let mut m = cluster(3, 16, 3);
        join(&mut m, 4);
        let steps = plan(&m, 2);
        assert_eq!(steps.len(), 2);
        let Step::Move {
            group,
            epoch,
            add,
            remove,
        } = steps[0]
        else {
            panic!("{steps:?}")
        };
        m.apply(&MemberCommand::BeginMove {
            group,
            epoch,
            add,
            remove,
        });
        assert!(plan(&m, 100).iter().all(|s| !matches!(
            s,
            Step::Move { group: g, .. } | Step::PreferLeader { group: g, .. } if *g == group
        )));
        assert!(plan(&m, 0).is_empty());
    }
}
