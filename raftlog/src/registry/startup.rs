//! A just-opened replica's elections: held until a leader reaches it (a restarted
//! follower must not unseat a live leader), and one campaign at once for a replica that
//! last voted for itself (no leader resumes without an election).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::ElectionGate;
use crate::peers::Liveness;
use crate::{GroupId, NodeId, Raft};

/// How often an opened group checks whether to release its held-back elections.
const ELECTION_HOLD_POLL_MS: u64 = 10;

/// Keeps a just-opened replica from campaigning until a leader reached it, or for
/// `hold` at most (then it campaigns on timeouts as usual, e.g. when the whole cluster
/// restarted and there is no leader to hear from). A restarted follower otherwise times
/// out before its leaders' first heartbeats reach it, campaigns with a higher term and
/// unseats a leader that a quorum still follows (openraft 0.9 has no pre-vote). A group
/// with a single voter, or this node leading, releases at once. Elections stay off if the
/// node began draining meanwhile.
pub(super) async fn hold_elections_until_heard(
    raft: Raft,
    heard: Arc<AtomicBool>,
    gate: Arc<ElectionGate>,
    elections_off: Arc<AtomicBool>,
    node_id: NodeId,
    hold: std::time::Duration,
) {
    let deadline = tokio::time::Instant::now() + hold;
    loop {
        let (single_voter, leading) = {
            let m = raft.metrics();
            let m = m.borrow();
            (
                m.membership_config.membership().voter_ids().count() <= 1,
                m.current_leader == Some(node_id),
            )
        };
        if heard.load(Ordering::Acquire)
            || single_voter
            || leading
            || tokio::time::Instant::now() >= deadline
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(ELECTION_HOLD_POLL_MS)).await;
    }
    gate.startup_held.store(false, Ordering::Release);
    gate.apply(&raft, &elections_off);
}

/// Campaigns once, at start-up, a replica that last voted for itself: as soon as most of
/// the group's voters (itself included) are heard alive, so the campaign can be answered
/// (after a whole-cluster restart its peers start alongside it), within `hold`; then the
/// start-up hold and the usual timers take over. One campaign, in the term after its
/// vote's: it cannot unseat a leader elected meanwhile (that leader's term is at least
/// as high), so a restarted old leader never disrupts the group.
pub(super) async fn campaign_at_start(
    raft: Raft,
    group: GroupId,
    node_id: NodeId,
    liveness: Arc<Liveness>,
    hold: std::time::Duration,
) {
    let deadline = tokio::time::Instant::now() + hold;
    loop {
        let (voters, leader) = {
            let m = raft.metrics();
            let m = m.borrow();
            let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
            (voters, m.current_leader)
        };
        if leader.is_some() {
            return;
        }
        let alive = liveness.snapshot();
        let up = voters
            .iter()
            .filter(|v| **v == node_id || alive.get(v).is_some_and(|l| l.alive))
            .count();
        if up * 2 > voters.len() {
            if let Err(e) = raft.trigger().elect().await {
                tracing::debug!(group, error = %e, "campaign at start-up not started");
            }
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(ELECTION_HOLD_POLL_MS)).await;
    }
}
