//! The per-peer outbox: requests a node sends to every other node (deliveries, ephemeral
//! items, rosters) in the background, in order, merged per call; and the confirmed form
//! that waits until every live peer served a request.

use std::sync::Weak;
use std::time::Duration;

use bytes::Bytes;
use chatd_raftlog::NodeId;
use chatd_transport::Endpoint;

use super::{Node, NodeReply, NodeRequest, NODE_SERVICE_TAG};

/// Timeout of a broadcast call to a peer.
const BROADCAST_TIMEOUT_MS: u64 = 2_000;
/// Requests queued for one peer by [`Node::broadcast`]; beyond it they are dropped.
pub const BROADCAST_QUEUE_REQUESTS_MAX: usize = 4096;
/// Most queued requests merged into one call to a peer.
pub const BROADCAST_MERGE_REQUESTS_MAX: usize = 256;

impl Node {
    /// Sends `req` to every other node, in the background, best effort but **in order**:
    /// one task per peer drains a bounded queue and makes one call at a time, merging
    /// queued deliveries (and typing events) into one request. A full queue or a failed
    /// call drops requests (counted in `chatd_peer_broadcasts_dropped_total`); clients
    /// notice the gap in seqs and fill it with `history`.
    pub fn broadcast(&self, req: NodeRequest) {
        self.broadcast_where(req, |_| true, |_| None);
    }

    /// The ids of the membership's other nodes.
    pub fn peers_except_self(&self) -> std::collections::HashSet<NodeId> {
        self.peers()
            .keys()
            .copied()
            .filter(|id| *id != self.id)
            .collect()
    }

    /// [`Self::broadcast`] to the peers in `to` only.
    pub fn broadcast_to(&self, req: NodeRequest, to: &std::collections::HashSet<NodeId>) {
        self.broadcast_where(req, |id| to.contains(&id), |_| None);
    }

    /// [`Self::broadcast`], then waits (at most `timeout`) until every live peer has taken
    /// `req` — and, the queue being in order, everything queued for it before. True if every
    /// live peer did; one that is slow, fails the call or whose queue is full makes it
    /// false. A peer that liveness reports dead, when `req` is queued or while it is
    /// awaited, gets `req` queued but is not waited for (it forgets this node's roster
    /// meanwhile and takes the next one): a peer killed a moment ago, whose call can only
    /// time out, holds the caller (a session's first sync) only until it is found dead.
    pub async fn broadcast_confirmed(&self, req: NodeRequest, timeout: Duration) -> bool {
        use futures::StreamExt;
        let mut waits = futures::stream::FuturesUnordered::new();
        let liveness = self.registry.liveness();
        let mut lives = liveness.watch();
        let mut awaited = std::collections::HashSet::new();
        let queued = self.broadcast_where(
            req,
            |_| true,
            |id| {
                if liveness.is_dead(id) {
                    return None;
                }
                let (tx, rx) = tokio::sync::oneshot::channel();
                waits.push(async move { (id, rx.await) });
                awaited.insert(id);
                Some(tx)
            },
        );
        let mut lives_open = true;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut all_taken = queued;
        while !awaited.is_empty() {
            tokio::select! {
                answer = waits.next() => match answer {
                    Some((id, taken)) => {
                        if awaited.remove(&id) && !matches!(taken, Ok(true)) {
                            all_taken = false;
                        }
                    }
                    None => break,
                },
                changed = lives.changed(), if lives_open => {
                    // Closed: liveness is gone with the node; only the answers can end it.
                    lives_open = changed.is_ok();
                    awaited.retain(|id| !liveness.is_dead(*id));
                }
                () = tokio::time::sleep_until(deadline) => return false,
            }
        }
        all_taken
    }

    /// Queues `req` for every peer `to` accepts, each with the confirmation `confirm`
    /// makes for it; false if a queue was full.
    fn broadcast_where(
        &self,
        req: NodeRequest,
        to: impl Fn(NodeId) -> bool,
        mut confirm: impl FnMut(NodeId) -> Option<tokio::sync::oneshot::Sender<bool>>,
    ) -> bool {
        let mut all_queued = true;
        let mut outboxes = self
            .outboxes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for p in self
            .peers()
            .values()
            .filter(|p| p.id != self.id && to(p.id))
        {
            let tx = outboxes.entry(p.id).or_insert_with(|| {
                let (tx, rx) = tokio::sync::mpsc::channel(BROADCAST_QUEUE_REQUESTS_MAX);
                tokio::spawn(run_outbox(
                    self.endpoint.clone(),
                    p.cluster_addr,
                    rx,
                    self.weak_self(),
                ));
                tx
            });
            let item = Outgoing {
                req: req.clone(),
                taken: confirm(p.id),
            };
            if tx.try_send(item).is_err() {
                all_queued = false;
                self.gateway
                    .metrics
                    .broadcast_dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        all_queued
    }

    /// Sends ephemeral items to every other node's sessions.
    pub fn broadcast_ephemeral(&self, items: Vec<crate::gateway::Ephemeral>) {
        self.broadcast(NodeRequest::Ephemeral { items });
    }
}

/// A request queued for one peer, and who waits to learn that the peer took it.
pub(super) struct Outgoing {
    req: NodeRequest,
    taken: Option<tokio::sync::oneshot::Sender<bool>>,
}

/// Sends one peer's broadcast requests in order, one call at a time, merging what is
/// queued: consecutive deliveries into one `Deliver`, typing events into one `Ephemeral`
/// (at most [`BROADCAST_MERGE_REQUESTS_MAX`] requests per call). Ends when the node is
/// dropped.
async fn run_outbox(
    endpoint: Endpoint,
    addr: std::net::SocketAddr,
    mut rx: tokio::sync::mpsc::Receiver<Outgoing>,
    node: Weak<Node>,
) {
    let dropped = |n: u64| {
        if let Some(node) = node.upgrade() {
            node.gateway
                .metrics
                .broadcast_dropped
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
    };
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < BROADCAST_MERGE_REQUESTS_MAX {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let mut waiting = Vec::new();
        let requests: Vec<NodeRequest> = batch
            .into_iter()
            .map(|o| {
                waiting.extend(o.taken);
                o.req
            })
            .collect();
        let mut all_taken = true;
        for req in merge_broadcasts(requests) {
            let mut frame = vec![NODE_SERVICE_TAG];
            if let Err(e) = chatd_codec::encode_into(&req, &mut frame) {
                tracing::error!(error = %e, "cannot encode a broadcast");
                dropped(1);
                all_taken = false;
                continue;
            }
            let sent = endpoint
                .call_with_timeout(
                    addr,
                    Bytes::from(frame),
                    Duration::from_millis(BROADCAST_TIMEOUT_MS),
                )
                .await;
            // Taken means served: a node still starting answers `Failed` and drops it.
            let served = match sent {
                Ok(reply) => match chatd_codec::decode::<NodeReply>(&reply) {
                    Ok(NodeReply::Delivered) => Ok(()),
                    Ok(other) => Err(format!("{other:?}")),
                    Err(e) => Err(e.to_string()),
                },
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = served {
                tracing::debug!(%addr, error = %e, "broadcast to a peer failed");
                dropped(1);
                all_taken = false;
            }
        }
        for w in waiting {
            let _ = w.send(all_taken);
        }
    }
}

/// Merges runs of consecutive `Deliver` (and of `Ephemeral`) requests, keeping order.
fn merge_broadcasts(batch: Vec<NodeRequest>) -> Vec<NodeRequest> {
    let mut out: Vec<NodeRequest> = Vec::with_capacity(batch.len());
    for req in batch {
        match (out.last_mut(), req) {
            (Some(NodeRequest::Deliver { events }), NodeRequest::Deliver { events: more }) => {
                events.extend(more);
            }
            (Some(NodeRequest::Ephemeral { items }), NodeRequest::Ephemeral { items: more }) => {
                items.extend(more);
            }
            (_, req) => out.push(req),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::gateway::Ephemeral;

    fn typing(user: &str) -> NodeRequest {
        NodeRequest::Ephemeral {
            items: vec![Ephemeral::Typing {
                chat: "g:1".into(),
                user: user.into(),
                recipients: vec!["x".into()],
            }],
        }
    }

    #[test]
    fn broadcasts_merge_runs_and_keep_order() {
        let merged = merge_broadcasts(vec![
            NodeRequest::Deliver { events: vec![] },
            NodeRequest::Deliver { events: vec![] },
            typing("a"),
            typing("b"),
            NodeRequest::Status,
            typing("c"),
        ]);
        assert_eq!(merged.len(), 4, "{merged:?}");
        assert!(matches!(merged[0], NodeRequest::Deliver { .. }));
        let NodeRequest::Ephemeral { items } = &merged[1] else {
            panic!("{merged:?}")
        };
        let users: Vec<&str> = items
            .iter()
            .map(|i| match i {
                Ephemeral::Typing { user, .. } => user.as_str(),
                _ => "?",
            })
            .collect();
        assert_eq!(users, vec!["a", "b"], "merged in order");
        assert!(matches!(merged[2], NodeRequest::Status));
        assert!(matches!(merged[3], NodeRequest::Ephemeral { .. }));
    }
}
