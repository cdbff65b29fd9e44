//! Moving a group's leadership to a chosen replica (drains, `admin partition transfer`,
//! preferred leaders): election holds on the others, the old leader's handover, the
//! target's bounded campaign, and a guard that undoes the holds when cut short.

use super::*;

/// How often a leadership transfer looks at its target's role.
const TRANSFER_POLL_MS: u64 = 20;
/// Longest wait for a transfer's target to win its campaign. A campaign takes one round
/// trip and a vote fsync; one that has not won by then will not (a replica the target
/// needs has a longer log, or its lease from a leader that is gone), and the replicas held
/// meanwhile must get their elections back rather than wait for their holds to lapse.
const TRANSFER_CAMPAIGN_MS_MAX: u64 = 1_000;
/// How long the replicas other than a transfer's target hold their elections: the
/// handover's catch-up wait and the campaign, with time to spare; lifted as soon as the
/// transfer ends either way, and on each held replica as soon as it hears a new leader.
const TRANSFER_ELECTION_HOLD_MS: u64 =
    chatd_raftlog::HANDOVER_CATCH_UP_MS_MAX + TRANSFER_CAMPAIGN_MS_MAX + 500;

impl Node {
    /// Moves leadership of `group` to `to`: `to` campaigns; with an up-to-date log it wins
    /// (openraft 0.9 has no transfer RPC). Waits, bounded, until a leader is known again.
    pub async fn transfer_leadership(&self, group: GroupId, to: NodeId) -> Result<NodeId, String> {
        let replicas = self
            .replicas_of(group)
            .ok_or_else(|| format!("partition {group} does not exist"))?;
        if !replicas.contains(&to) {
            return Err(format!("node {to} is not a replica of partition {group}"));
        }
        // Led elsewhere: the leader runs the transfer, because only it can hold proposals
        // back until the target has its whole log. A target one entry short loses its
        // campaign, and the leader it asked steps down anyway: the group would stay
        // leaderless until an election timer fires.
        if let Some(leader) = self
            .local_leader(group)
            .filter(|l| *l != self.id && *l != to)
        {
            if let Some(result) = self.transfer_on_leader(group, leader, to).await {
                return result;
            }
        }
        // The other replicas do not campaign meanwhile: the old leader steps down when the
        // target asks for its vote, and its (or a third replica's) election timer must not
        // start a newer term before the target's first heartbeats arrive.
        let others: Vec<NodeId> = replicas.iter().copied().filter(|r| *r != to).collect();
        self.hold_elections_on(group, &others, TRANSFER_ELECTION_HOLD_MS)
            .await;
        // Leading here: stop taking proposals and let the target catch up first, so that
        // no replica refuses its campaign for a shorter log.
        let leading_here = to != self.id && self.local_leader(group) == Some(self.id);
        // Cut short (a drain's attempt timed out, a client went away), this call still
        // lifts what it set: the holds would keep the group leaderless until they lapse.
        let mut guard = TransferGuard {
            node: self.weak_self(),
            group,
            others: others.clone(),
            leading_here,
            armed: true,
        };
        if leading_here && !self.registry.begin_handover(group, to).await {
            tracing::debug!(
                group,
                to,
                "handover target not caught up in time; trying anyway"
            );
        }
        let result = self.campaign_and_wait(group, to).await;
        guard.armed = false;
        if leading_here {
            self.registry.end_handover(group);
        }
        self.hold_elections_on(group, &others, 0).await;
        result
    }

    /// Asks `leader` to run the transfer of `group` to `to`. `None` if it could not be
    /// asked or no longer leads (the caller then coordinates the transfer itself).
    async fn transfer_on_leader(
        &self,
        group: GroupId,
        leader: NodeId,
        to: NodeId,
    ) -> Option<Result<NodeId, String>> {
        let peer = self.peer(leader)?;
        let within = Duration::from_millis(
            chatd_raftlog::HANDOVER_CATCH_UP_MS_MAX
                + TRANSFER_CAMPAIGN_MS_MAX
                + STATUS_CALL_TIMEOUT_MS,
        );
        match self
            .call(
                peer.cluster_addr,
                &NodeRequest::TransferLeadership { group, to },
                within,
            )
            .await
        {
            Ok(NodeReply::Proposed { response, .. }) => {
                let new_leader = <[u8; 8]>::try_from(response.as_slice())
                    .map(u64::from_le_bytes)
                    .map_err(|_| format!("node {leader} answered a malformed transfer"));
                if let Ok(l) = new_leader {
                    self.routing.update(group, Some(l));
                }
                Some(new_leader)
            }
            Ok(NodeReply::Failed(e)) => Some(Err(e)),
            Ok(other) => {
                tracing::debug!(group, leader, reply = ?other, "transfer not run by the leader");
                None
            }
            Err(e) => {
                tracing::debug!(group, leader, error = %e, "transfer not run by the leader");
                None
            }
        }
    }

    /// Asks each of `nodes` (this one included) to hold its elections in `group` for `ms`
    /// (0 lifts the hold), at once and best effort: a replica that cannot be reached
    /// cannot win an election either.
    pub(super) async fn hold_elections_on(&self, group: GroupId, nodes: &[NodeId], ms: u64) {
        let request = NodeRequest::HoldElections { group, ms };
        futures::future::join_all(nodes.iter().map(|&n| {
            let request = &request;
            async move {
                if n == self.id {
                    self.registry
                        .hold_elections(group, Duration::from_millis(ms));
                    return;
                }
                let Some(peer) = self.peer(n) else {
                    return;
                };
                if let Err(e) = self
                    .call(
                        peer.cluster_addr,
                        request,
                        Duration::from_millis(STATUS_CALL_TIMEOUT_MS),
                    )
                    .await
                {
                    tracing::debug!(group, node = n, error = %e, "election hold not delivered");
                }
            }
        }))
        .await;
    }

    /// Asks `to` to campaign for `group` and waits until it leads; fails as soon as its
    /// campaign is seen lost (it is a follower again in a newer term) or another node
    /// leads, so a caller can try the next candidate at once.
    pub(super) async fn campaign_and_wait(
        &self,
        group: GroupId,
        to: NodeId,
    ) -> Result<NodeId, String> {
        let term_before = self.registry.term(group);
        let reply = if to == self.id {
            self.serve(NodeRequest::Elect { group }).await
        } else {
            let peer = self.peer(to).ok_or_else(|| format!("unknown node {to}"))?;
            self.call(
                peer.cluster_addr,
                &NodeRequest::Elect { group },
                Duration::from_millis(STATUS_CALL_TIMEOUT_MS),
            )
            .await
            .map_err(|e| e.to_string())?
        };
        if let NodeReply::Failed(e) = reply {
            return Err(e);
        }
        let deadline = Instant::now()
            + self
                .propose_timeout
                .min(Duration::from_millis(TRANSFER_CAMPAIGN_MS_MAX));
        loop {
            // Someone other than the target leads in a newer term: the campaign was lost.
            let newer_leader = (self.registry.term(group) > term_before)
                .then(|| self.registry.leader(group))
                .flatten();
            if let Some(other) = newer_leader.filter(|l| *l != to) {
                return Err(format!(
                    "node {other} took over {group} instead of node {to}"
                ));
            }
            if let Ok(Some(g)) = self.peer_group_status(to, group).await {
                if g.is_leader() {
                    self.routing.update(group, Some(to));
                    return Ok(to);
                }
                if g.is_follower() && g.term > term_before && g.leader != Some(to) {
                    return Err(format!(
                        "node {to} lost its campaign for {group} (term {})",
                        g.term
                    ));
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "node {to} did not win its campaign for {group} within \
                     {TRANSFER_CAMPAIGN_MS_MAX} ms"
                ));
            }
            tokio::time::sleep(Duration::from_millis(TRANSFER_POLL_MS)).await;
        }
    }
}

/// Undoes a leadership transfer's handover and election holds if the transfer is dropped
/// before it ends (its own end undoes them otherwise).
struct TransferGuard {
    node: Weak<Node>,
    group: GroupId,
    others: Vec<NodeId>,
    leading_here: bool,
    armed: bool,
}

impl Drop for TransferGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Some(node) = self.node.upgrade() else {
            return;
        };
        if self.leading_here {
            node.registry.end_handover(self.group);
        }
        let (group, others) = (self.group, std::mem::take(&mut self.others));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { node.hold_elections_on(group, &others, 0).await });
        }
    }
}
