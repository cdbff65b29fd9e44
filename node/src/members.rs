//! Live membership on a node: joining a running cluster, and following group 0's
//! membership (the live node list, the partitions this node hosts).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use chatd_membership::{MemberCommand, MemberReply, Membership, NodeInfo, NodeState, META_GROUP};
use chatd_raftlog::{GroupId, NodeId};
use tokio::time::Instant;

use crate::node::{peers_of, Node, NodeReply, NodeRequest};

/// Longest a joining node tries to be admitted (all seeds, in turn) before its start fails.
pub const JOIN_DEADLINE_MS: u64 = 60_000;
/// Longest one join call to a seed may take (admission and the learner's addition).
pub const JOIN_CALL_TIMEOUT_MS: u64 = 10_000;
/// Pause between rounds over the seeds while none admits this node.
const JOIN_RETRY_MS: u64 = 500;
/// Longest an admitted node waits for group 0 to reach it before it asks to be active.
pub const JOIN_CATCH_UP_MS_MAX: u64 = 120_000;
const JOIN_POLL_MS: u64 = 50;

/// Why a node could not join.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The cluster refused this node (its id is taken or tombstoned, its address is
    /// another node's, ...): starting again changes nothing.
    #[error("the cluster refused to admit node {id}: {reason}")]
    Refused { id: NodeId, reason: String },
    /// No seed admitted this node in time.
    #[error("no seed admitted node {id} within {ms} ms (last error: {last})")]
    Unreachable { id: NodeId, ms: u64, last: String },
    /// Admitted, but group 0 did not reach this node in time.
    #[error("node {id} was admitted but group 0 did not reach it within {ms} ms")]
    CatchUp { id: NodeId, ms: u64 },
}

/// This node's entry in group 0, from its config.
fn own_info(node: &Node) -> Option<NodeInfo> {
    let me = node.config.me()?;
    Some(NodeInfo {
        id: me.id,
        cluster_addr: me.cluster_addr.to_string(),
        api_addr: me.api_addr.to_string(),
    })
}

/// Joins a running cluster: asks the seeds of the config's peer list, in turn, to admit
/// this node (group 0 records it as joining and adds it as a learner of group 0), waits
/// until group 0's log reaches it, and then makes itself active. Bounded by
/// [`JOIN_DEADLINE_MS`] and [`JOIN_CATCH_UP_MS_MAX`].
pub async fn join(node: &Arc<Node>) -> Result<(), JoinError> {
    let id = node.id;
    let Some(info) = own_info(node) else {
        return Err(JoinError::Refused {
            id,
            reason: "this node is not in its own config's peer list".into(),
        });
    };
    let seeds: Vec<NodeId> = node
        .config
        .peers
        .iter()
        .map(|p| p.id)
        .filter(|p| *p != id)
        .collect();
    if seeds.is_empty() {
        return Err(JoinError::Refused {
            id,
            reason: "the config lists no seed peer to join through".into(),
        });
    }
    let deadline = Instant::now() + Duration::from_millis(JOIN_DEADLINE_MS);
    let mut last: String;
    'admission: loop {
        for seed in &seeds {
            match node
                .call_peer(
                    *seed,
                    &NodeRequest::Join { info: info.clone() },
                    Duration::from_millis(JOIN_CALL_TIMEOUT_MS),
                )
                .await
            {
                Ok(NodeReply::Proposed { .. }) => {
                    tracing::info!(seed, "admitted to the cluster; catching up group 0");
                    break 'admission;
                }
                Ok(NodeReply::Refused(reason)) => return Err(JoinError::Refused { id, reason }),
                Ok(other) => last = format!("node {seed}: {other:?}"),
                Err(e) => last = format!("node {seed}: {e}"),
            }
            tracing::warn!(seed, error = %last, "join attempt failed");
            if Instant::now() >= deadline {
                return Err(JoinError::Unreachable {
                    id,
                    ms: JOIN_DEADLINE_MS,
                    last,
                });
            }
        }
        tokio::time::sleep(Duration::from_millis(JOIN_RETRY_MS)).await;
    }
    // Group 0 reaches this learner: its membership names this node.
    let caught_up = Instant::now() + Duration::from_millis(JOIN_CATCH_UP_MS_MAX);
    while node
        .meta
        .membership()
        .is_none_or(|m| m.state_of(id).is_none())
    {
        if Instant::now() >= caught_up {
            return Err(JoinError::CatchUp {
                id,
                ms: JOIN_CATCH_UP_MS_MAX,
            });
        }
        tokio::time::sleep(Duration::from_millis(JOIN_POLL_MS)).await;
    }
    // `follow` makes it active (retrying until group 0 takes it).
    Ok(())
}

/// Pause between attempts to make this node active.
const ACTIVATE_RETRY_MS: u64 = 500;

/// Proposes this node's `Active` state until group 0 shows it active (or no longer
/// joining: an operator retired it meanwhile). Ends with the node.
async fn activate(node: Weak<Node>) {
    loop {
        let Some(n) = node.upgrade() else { return };
        let id = n.id;
        if n.meta.membership().and_then(|m| m.state_of(id)) != Some(NodeState::Joining) {
            return;
        }
        match n
            .propose_member(MemberCommand::SetNodeState {
                id,
                state: NodeState::Active,
            })
            .await
        {
            Ok(MemberReply::Done { .. }) => {
                tracing::info!("this node is an active member");
                return;
            }
            Ok(other) => {
                tracing::warn!(reply = %other, "group 0 refused to make this node active");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "could not mark this node active yet; retrying"),
        }
        drop(n);
        tokio::time::sleep(Duration::from_millis(ACTIVATE_RETRY_MS)).await;
    }
}

/// Serves a joining node's request on any member: records it (group 0 routes the proposal
/// to its leader) and adds it to group 0 as a learner.
pub async fn admit(node: &Node, info: NodeInfo) -> NodeReply {
    let (id, addr) = (info.id, info.cluster_addr.clone());
    match node.propose_member(MemberCommand::AddNode { info }).await {
        Ok(MemberReply::Done { .. })
        | Ok(MemberReply::AlreadyMember(NodeState::Joining | NodeState::Active)) => {}
        Ok(refused) => return NodeReply::Refused(refused.to_string()),
        Err(e) => return NodeReply::Failed(e.to_string()),
    }
    match node.add_learner(META_GROUP, id, addr).await {
        Ok(index) => NodeReply::Proposed {
            index,
            response: Vec::new(),
        },
        Err(e) => NodeReply::Failed(format!("node {id} recorded but not yet a learner: {e}")),
    }
}

/// Follows group 0's membership for the node's life: the live node list, and the
/// partitions placement gives this node (opened as they appear).
pub async fn follow(
    node: Weak<Node>,
    mut rx: tokio::sync::watch::Receiver<Option<Arc<Membership>>>,
) {
    let mut purged = false;
    let mut activating: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let current = rx.borrow_and_update().clone();
        {
            let Some(n) = node.upgrade() else { return };
            if let Some(m) = current {
                if !purged {
                    purged = true;
                    purge_leftovers(&n, &m).await;
                }
                // Admitted (now or before a restart) but not active yet: become active; a
                // group 0 without a leader right now (an election, a partition just
                // healed) must not leave this node joining for good.
                if m.state_of(n.id) == Some(NodeState::Joining)
                    && activating.as_ref().is_none_or(|t| t.is_finished())
                {
                    activating = Some(tokio::spawn(activate(node.clone())));
                }
                apply_membership(&n, &m).await;
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Deletes what is left of partitions placement no longer gives this node: a replica that
/// moved away while the node was down (the move ended without it) is not opened at start,
/// and its data would otherwise stay forever (and be stale if a move brings it back).
async fn purge_leftovers(node: &Arc<Node>, m: &Membership) {
    let wanted: BTreeSet<GroupId> = m.hosted_by(node.id).into_iter().collect();
    let hosted: BTreeSet<GroupId> = node.registry.groups().into_iter().collect();
    for group in
        (1..=GroupId::from(m.partitions)).filter(|g| !wanted.contains(g) && !hosted.contains(g))
    {
        if !node.registry.has_local_state(group) {
            continue;
        }
        match node.registry.remove_group(group).await {
            Ok(()) => tracing::info!(group, "purged the data of a replica that moved away"),
            Err(e) => tracing::error!(group, error = %e, "cannot purge a moved replica's data"),
        }
    }
}

async fn apply_membership(node: &Arc<Node>, m: &Membership) {
    if m.state_of(node.id) == Some(NodeState::Removed) {
        node.retire();
    }
    let peers = peers_of(m);
    let gone: Vec<NodeId> = node
        .peers()
        .keys()
        .copied()
        .filter(|id| !peers.contains_key(id))
        .collect();
    node.set_peers(peers);
    for id in gone {
        node.forget_peer(id);
    }
    let hosted: BTreeSet<GroupId> = node.registry.groups().into_iter().collect();
    let wanted: BTreeSet<GroupId> = m.hosted_by(node.id).into_iter().collect();
    // A replica that moved off this node: its group's voters no longer include it (the
    // move ended only after that change committed), so its data goes.
    for group in hosted.difference(&wanted).filter(|g| **g != META_GROUP) {
        match node.registry.remove_group(*group).await {
            Ok(()) => tracing::info!(group, "replica moved off this node; group removed"),
            Err(e) => tracing::error!(group, error = %e, "cannot remove a moved group"),
        }
    }
    for group in wanted {
        if hosted.contains(&group) {
            continue;
        }
        match node.registry.open_group(group, node.chat_applier()).await {
            Ok(_) => tracing::info!(group, "placement gave this node a replica; group opened"),
            Err(e) => tracing::error!(group, error = %e, "cannot open a placed group"),
        }
    }
}

/// A node list for the admin API: each node's state and addresses as group 0 holds them.
pub fn node_list(m: &Membership) -> BTreeMap<NodeId, (NodeState, NodeInfo)> {
    m.nodes
        .values()
        .map(|n| (n.info.id, (n.state, n.info.clone())))
        .collect()
}
