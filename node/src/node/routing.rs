//! Routing proposals and queries to a group's leader: the local Raft view first, then the
//! routing table, then a replica that answers; forwarded calls end as soon as the leader
//! they went to is known to be gone.

use super::*;

/// Pause between routing attempts when no leader is known.
const PROPOSE_BACKOFF_MS: u64 = 50;
/// Longest wait for a leader to confirm its leadership (and catch up its state machine)
/// before serving a read; past it the read is retried on another node.
const READ_INDEX_TIMEOUT_MS: u64 = 2_000;

impl Node {
    pub(super) async fn propose_here(&self, group: GroupId, command: Vec<u8>) -> NodeReply {
        match self.registry.propose(group, command).await {
            Ok((index, response)) => NodeReply::Proposed { index, response },
            Err(RaftProposeError::NotLeader { leader }) => NodeReply::NotLeader { leader },
            Err(RaftProposeError::NotHosted(_)) => NodeReply::NotLeader { leader: None },
            // Not appended: the caller may retry elsewhere or later.
            Err(e @ RaftProposeError::Overloaded { .. }) => NodeReply::Overloaded(e.to_string()),
            Err(e @ RaftProposeError::Raft(_)) => NodeReply::Failed(e.to_string()),
        }
    }

    pub(super) fn leader_hint(&self, group: GroupId, avoid: &HashSet<NodeId>) -> Option<NodeId> {
        // A peer that node liveness reports dead (silent past the liveness timeout) is never
        // a good guess: a forwarded call would wait for its connection to time out, long
        // after the survivors elected a leader.
        let dead = |n: &NodeId| *n != self.id && self.registry.liveness().is_dead(*n);
        // A replica's own Raft view is fresher than any hint: it changes with each election.
        if let Some(l) = self.registry.leader(group) {
            if !avoid.contains(&l) && !dead(&l) {
                return Some(l);
            }
        }
        if let Some(l) = self
            .routing
            .leader(group)
            .filter(|l| !avoid.contains(l) && !dead(l))
        {
            return Some(l);
        }
        // No leader known: ask a replica that answers, one whose Raft RPCs succeed first.
        // A dead one (liveness) is never asked: a paused or cut-off node would hold the
        // request until its connection times out, long after the others elected a leader;
        // with no other replica left the caller waits and asks again.
        let replicas = self.replicas_of(group)?;
        let down = self.registry.peer_health().down();
        let candidates = replicas
            .into_iter()
            .filter(|r| !avoid.contains(r) && !dead(r));
        let (up, failing): (Vec<NodeId>, Vec<NodeId>) =
            candidates.partition(|r| *r == self.id || !down.contains(r));
        up.into_iter().chain(failing).next()
    }

    /// Proposes `command` to `group` on its leader, wherever it is, and waits until it is
    /// committed on a majority and applied. Retries only where the command surely was not
    /// appended (not leader, not connected), so a command is never appended twice by us.
    pub async fn propose(
        &self,
        group: GroupId,
        command: Vec<u8>,
    ) -> Result<Proposed, ProposeError> {
        let (target, reply) = self
            .call_leader(group, |_| NodeRequest::Propose {
                group,
                command: command.clone(),
            })
            .await?;
        match reply {
            NodeReply::Proposed { index, response } => Ok(Proposed {
                index,
                response,
                leader: target,
            }),
            other => Err(ProposeError::Unknown {
                group,
                cause: format!("unexpected reply {other:?}"),
            }),
        }
    }

    /// Confirms this node still leads `group` (a heartbeat round answered by a quorum)
    /// and waits until its state machine has applied everything committed before the
    /// read began: reads after it see every write acknowledged before it (linearizable).
    /// Bounded by [`READ_INDEX_TIMEOUT_MS`].
    pub(super) async fn read_index(&self, group: GroupId) -> Result<(), String> {
        self.registry
            .read_index(group, Duration::from_millis(READ_INDEX_TIMEOUT_MS))
            .await
    }

    /// Runs `query` on the leader of `group` (reads see every acknowledged write).
    pub async fn query(
        &self,
        group: GroupId,
        query: ChatQuery,
    ) -> Result<ChatQueryReply, ProposeError> {
        let (_, reply) = self
            .call_leader(group, |_| NodeRequest::Query {
                group,
                query: query.clone(),
            })
            .await?;
        match reply {
            NodeReply::QueryResult(r) => Ok(r),
            other => Err(ProposeError::Unknown {
                group,
                cause: format!("unexpected reply {other:?}"),
            }),
        }
    }

    /// Sends the request `make` builds to the leader of `group`, following "not leader"
    /// hints (bounded attempts and time). Answers `Proposed`/`QueryResult` replies; errors
    /// otherwise.
    pub(super) async fn call_leader(
        &self,
        group: GroupId,
        make: impl Fn(NodeId) -> NodeRequest,
    ) -> Result<(NodeId, NodeReply), ProposeError> {
        self.call_leader_within(group, self.propose_timeout, make)
            .await
    }

    /// [`Self::call_leader`] with its own time bound (membership steps wait for catch-up).
    pub(crate) async fn call_leader_within(
        &self,
        group: GroupId,
        within: Duration,
        make: impl Fn(NodeId) -> NodeRequest,
    ) -> Result<(NodeId, NodeReply), ProposeError> {
        if group != META_GROUP && self.partition_replicas(group).is_none() {
            return Err(ProposeError::UnknownGroup(group));
        }
        let deadline = Instant::now() + within;
        let mut avoid = HashSet::new();
        for attempt in 1..=PROPOSE_ATTEMPTS_MAX {
            if Instant::now() >= deadline {
                return Err(ProposeError::NoLeader {
                    group,
                    attempts: attempt - 1,
                });
            }
            if let Some(unreachable) = self.cut_off_from(group) {
                return Err(ProposeError::CutOff { group, unreachable });
            }
            let Some(target) = self.leader_hint(group, &avoid) else {
                avoid.clear();
                tokio::time::sleep(Duration::from_millis(PROPOSE_BACKOFF_MS)).await;
                continue;
            };
            let req = make(target);
            let reply = if target == self.id {
                self.serve(req).await
            } else {
                let Some(peer) = self.peer(target) else {
                    avoid.insert(target);
                    continue;
                };
                let remaining = deadline.saturating_duration_since(Instant::now());
                let call = self.call(peer.cluster_addr, &req, remaining);
                match self.unless_leader_changes(group, target, call).await {
                    Ok(r) => r,
                    Err(CallError::NotSent(cause)) => {
                        tracing::debug!(group, target, %cause, "leader unreachable");
                        self.routing.update(group, None);
                        avoid.insert(target);
                        tokio::time::sleep(Duration::from_millis(PROPOSE_BACKOFF_MS)).await;
                        continue;
                    }
                    Err(CallError::Failed(cause)) => {
                        self.routing.update(group, None);
                        return Err(ProposeError::Unknown { group, cause });
                    }
                }
            };
            match reply {
                r @ (NodeReply::Proposed { .. } | NodeReply::QueryResult(_)) => {
                    self.routing.update(group, Some(target));
                    return Ok((target, r));
                }
                NodeReply::NotLeader { leader } => {
                    avoid.insert(target);
                    let hint = leader.filter(|l| *l != target);
                    self.routing.update(group, hint);
                    match hint {
                        Some(h) => {
                            avoid.remove(&h);
                        }
                        None => tokio::time::sleep(Duration::from_millis(PROPOSE_BACKOFF_MS)).await,
                    }
                }
                NodeReply::Overloaded(cause) => {
                    return Err(ProposeError::Overloaded { group, cause });
                }
                NodeReply::Failed(cause) => {
                    self.routing.update(group, None);
                    return Err(ProposeError::Unknown { group, cause });
                }
                other => {
                    return Err(ProposeError::Unknown {
                        group,
                        cause: format!("unexpected reply {other:?}"),
                    })
                }
            }
        }
        Err(ProposeError::NoLeader {
            group,
            attempts: PROPOSE_ATTEMPTS_MAX,
        })
    }

    /// The unreachable replicas of `group` when this node hosts it, knows no leader for
    /// it, and reaches no majority of its replicas (itself included), as the Raft RPCs of
    /// all groups see the peers: asking around would only time out.
    pub(super) fn cut_off_from(&self, group: GroupId) -> Option<Vec<NodeId>> {
        if !self.registry.hosts(group) || self.registry.leader(group).is_some() {
            return None;
        }
        let replicas = self.replicas_of(group)?;
        let down = self.registry.peer_health().down();
        let liveness = self.registry.liveness();
        let unreachable: Vec<NodeId> = replicas
            .iter()
            .copied()
            .filter(|r| *r != self.id && (down.contains(r) || liveness.is_dead(*r)))
            .collect();
        let reachable = replicas.len() - unreachable.len();
        (reachable * 2 <= replicas.len()).then_some(unreachable)
    }

    /// Runs `call` (a request in flight to `target`, which led `group` when it was sent)
    /// until it answers, node liveness reports `target` dead, or this node's replica of
    /// `group` sees a newer term without `target` as leader, or another leader elected
    /// meanwhile. A leader that died or was cut off never answers, and the call would wait
    /// for the connection's idle timeout; its silence (liveness) or the survivors' election
    /// (a new term) shows here first, and the caller hears "outcome unknown" at once (the
    /// request may have been appended before the old leader failed) and can retry with the
    /// new leader.
    pub(super) async fn unless_leader_changes(
        &self,
        group: GroupId,
        target: NodeId,
        call: impl std::future::Future<Output = Result<NodeReply, CallError>>,
    ) -> Result<NodeReply, CallError> {
        let mut lives = self.registry.liveness().watch();
        let target_died = async move {
            loop {
                if self.registry.liveness().is_dead(target) {
                    return;
                }
                if lives.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        let Some(mut leadership) = self.registry.watch_leadership(group) else {
            return tokio::select! {
                reply = call => reply,
                () = target_died => Err(self.forward_cut(group, target, "fell silent")),
            };
        };
        let at_send = leadership.current();
        let moved_on = async move {
            loop {
                let (term, leader) = leadership.current();
                // A newer term without `target` as leader, or, in the term the request was
                // sent in, a leader other than `target` that became known since (it went
                // to `target` only because no leader was known yet: a candidate's term).
                if (term, leader) != at_send
                    && leader != Some(target)
                    && (term > at_send.0 || leader.is_some())
                {
                    return (term, leader);
                }
                if !leadership.changed().await {
                    // The group stopped here: only the call itself can end.
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            reply = call => reply,
            (term, leader) = moved_on => Err(self.forward_cut(
                group,
                target,
                &format!("lost the leadership (term {term}, leader {leader:?})"),
            )),
            () = target_died => Err(self.forward_cut(group, target, "fell silent")),
        }
    }

    /// A forwarded call given up because its target can no longer answer for `group`.
    fn forward_cut(&self, group: GroupId, target: NodeId, why: &str) -> CallError {
        self.gateway
            .metrics
            .forwards_cut
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        CallError::Failed(format!(
            "node {target} {why} while the request to group {group} was in flight"
        ))
    }
}
