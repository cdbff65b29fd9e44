//! Receipts: accepted from sessions, merged, batched per partition and proposed, with every
//! stage bounded.
//!
//! * A receipt holds two permits from the moment it is accepted until its proposal ends:
//!   one of the node's [`RECEIPT_QUEUE_MAX`] and one of its session's
//!   [`RECEIPTS_PENDING_PER_SESSION_MAX`]. So one user (at most `sessions_per_user_max`
//!   sessions per node) can hold only a small share of the node's queue; past either bound
//!   the receipt is refused (`rate_limited`).
//! * Receipts of the same (chat, user) waiting for the same proposal are merged with max
//!   (cursors only move forward), so repeating a receipt costs no extra slot.
//! * Each partition has at most one receipt proposal in flight, and the node at most
//!   [`RECEIPT_PROPOSALS_IN_FLIGHT_MAX`] (a semaphore); a partition that is slow to answer
//!   holds one of them, not all. Receipts of a busy partition wait (merging) for the next
//!   one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chatd_chat::ReceiptUpdate;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Receipts accepted on this node and not yet written (queued, merging, or in a
/// proposal), at most; more are refused with `rate_limited`.
pub const RECEIPT_QUEUE_MAX: usize = 65_536;
/// Receipts of one session accepted and not yet written, at most (distinct (chat, user)
/// pairs: a repeated receipt merges into the waiting one once it is batched). A user has at
/// most `sessions_per_user_max` (8) sessions per node, so at most 8 × 256 = 2048 of the
/// node's 65 536.
pub const RECEIPTS_PENDING_PER_SESSION_MAX: usize = 256;
/// Receipt proposals in flight on this node at once (and one per partition at most).
pub const RECEIPT_PROPOSALS_IN_FLIGHT_MAX: usize = 32;
/// Receipts in one proposal, at most.
pub const RECEIPT_BATCH_MAX: usize = 1024;
/// How long the first receipt of a batch waits for others, in milliseconds.
pub const RECEIPT_FLUSH_MS: u64 = 10;

/// A receipt with the permits that count it against the node's and its session's bounds.
pub struct Queued {
    update: ReceiptUpdate,
    permits: [OwnedSemaphorePermit; 2],
}

/// Why a receipt was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The session has [`RECEIPTS_PENDING_PER_SESSION_MAX`] receipts waiting.
    Session,
    /// The node has [`RECEIPT_QUEUE_MAX`] receipts waiting.
    Node,
}

/// The accepting side of the node's receipt queue.
pub struct ReceiptQueue {
    tx: mpsc::Sender<Queued>,
    capacity: Arc<Semaphore>,
}

impl ReceiptQueue {
    /// A queue of `capacity` receipts, and its receiving end for [`run_batcher`].
    pub fn new(capacity: usize) -> (Self, mpsc::Receiver<Queued>) {
        // The channel never refuses: every queued receipt holds one of `capacity` permits.
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            Self {
                tx,
                capacity: Arc::new(Semaphore::new(capacity)),
            },
            rx,
        )
    }

    /// The budget of one session: [`RECEIPTS_PENDING_PER_SESSION_MAX`] receipts.
    pub fn session_budget() -> Arc<Semaphore> {
        Arc::new(Semaphore::new(RECEIPTS_PENDING_PER_SESSION_MAX))
    }

    /// Accepts `update` against `session`'s budget and the node's; never waits.
    pub fn offer(&self, session: &Arc<Semaphore>, update: ReceiptUpdate) -> Result<(), Refused> {
        let mine = session
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::Session)?;
        let node = self
            .capacity
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::Node)?;
        self.tx
            .try_send(Queued {
                update,
                permits: [mine, node],
            })
            .map_err(|_| Refused::Node)
    }
}

fn max_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// Merges queued receipts per partition, and proposes each partition's batch with
/// `propose` (at most one in flight per partition, [`RECEIPT_PROPOSALS_IN_FLIGHT_MAX`] in
/// all). `group_of` maps a chat to its partition. Ends when every sender is gone.
pub async fn run_batcher<G, P, F>(mut rx: mpsc::Receiver<Queued>, group_of: G, propose: P)
where
    G: Fn(&str) -> u64,
    P: Fn(u64, Vec<ReceiptUpdate>) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let in_flight = Arc::new(Semaphore::new(RECEIPT_PROPOSALS_IN_FLIGHT_MAX));
    let mut pending: BTreeMap<u64, BTreeMap<(String, String), Queued>> = BTreeMap::new();
    let mut busy: HashSet<u64> = HashSet::new();
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut task_group: HashMap<tokio::task::Id, u64> = HashMap::new();
    let mut flush_at: Option<Instant> = None;
    // Where the next flush starts, so low partition numbers do not starve the others.
    let mut start = 0u64;
    loop {
        tokio::select! {
            next = rx.recv() => {
                let Some(q) = next else { break };
                let key = (q.update.chat.clone(), q.update.user.clone());
                let group = group_of(&q.update.chat);
                let waiting = pending.entry(group).or_default();
                match waiting.get_mut(&key) {
                    Some(w) => {
                        // Merged: `q`'s permits are released, it takes no slot of its own.
                        w.update.delivered = max_opt(w.update.delivered, q.update.delivered);
                        w.update.read = max_opt(w.update.read, q.update.read);
                    }
                    None => {
                        waiting.insert(key, q);
                    }
                }
                flush_at.get_or_insert_with(|| {
                    Instant::now() + Duration::from_millis(RECEIPT_FLUSH_MS)
                });
            }
            Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                let id = match &done {
                    Ok((id, ())) => *id,
                    Err(e) => e.id(),
                };
                if let Some(g) = task_group.remove(&id) {
                    busy.remove(&g);
                }
                if !pending.is_empty() {
                    flush_at.get_or_insert_with(Instant::now);
                }
            }
            _ = tokio::time::sleep_until(flush_at.unwrap_or_else(Instant::now)), if flush_at.is_some() => {
                flush_at = None;
                let groups: Vec<u64> = pending
                    .range(start..)
                    .chain(pending.range(..start))
                    .map(|(g, _)| *g)
                    .filter(|g| !busy.contains(g))
                    .collect();
                for group in groups {
                    let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                        break;
                    };
                    let Some(waiting) = pending.get_mut(&group) else { continue };
                    let mut updates = Vec::new();
                    let mut held = Vec::new();
                    while updates.len() < RECEIPT_BATCH_MAX {
                        let Some((_, q)) = waiting.pop_first() else { break };
                        updates.push(q.update);
                        held.push(q.permits);
                    }
                    if waiting.is_empty() {
                        pending.remove(&group);
                    }
                    busy.insert(group);
                    start = group.wrapping_add(1);
                    let work = propose(group, updates);
                    let handle = tasks.spawn(async move {
                        work.await;
                        // The receipts stop counting against the bounds once written (or
                        // dropped: receipts are best effort).
                        drop(held);
                        drop(permit);
                    });
                    task_group.insert(handle.id(), group);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    fn update(chat: &str, user: &str, delivered: Option<u64>, read: Option<u64>) -> ReceiptUpdate {
        ReceiptUpdate {
            chat: chat.into(),
            user: user.into(),
            delivered,
            read,
        }
    }

    #[test]
    fn one_session_cannot_take_more_than_its_share_of_the_node_queue() {
        let (q, _rx) = ReceiptQueue::new(RECEIPT_QUEUE_MAX);
        let greedy = ReceiptQueue::session_budget();
        for i in 0..RECEIPTS_PENDING_PER_SESSION_MAX {
            q.offer(&greedy, update(&format!("g:{i}"), "mallory", Some(1), None))
                .unwrap();
        }
        assert_eq!(
            q.offer(&greedy, update("g:x", "mallory", Some(1), None)),
            Err(Refused::Session),
            "the session's bound is {RECEIPTS_PENDING_PER_SESSION_MAX}"
        );
        // Everyone else still gets in.
        let other = ReceiptQueue::session_budget();
        q.offer(&other, update("g:1", "alice", Some(1), None))
            .unwrap();
    }

    #[test]
    fn the_node_queue_holds_exactly_its_bound() {
        let (q, _rx) = ReceiptQueue::new(RECEIPT_QUEUE_MAX);
        let sessions = RECEIPT_QUEUE_MAX / RECEIPTS_PENDING_PER_SESSION_MAX;
        for s in 0..sessions {
            let budget = ReceiptQueue::session_budget();
            for i in 0..RECEIPTS_PENDING_PER_SESSION_MAX {
                q.offer(
                    &budget,
                    update(&format!("g:{i}"), &format!("u{s}"), Some(1), None),
                )
                .unwrap();
            }
        }
        assert_eq!(
            q.offer(
                &ReceiptQueue::session_budget(),
                update("g:1", "late", None, Some(1))
            ),
            Err(Refused::Node),
            "the node's bound is {RECEIPT_QUEUE_MAX}"
        );
    }

    /// Proposals block until released; records what was proposed and the concurrency.
    #[derive(Default)]
    struct Recorder {
        proposed: Mutex<Vec<(u64, Vec<ReceiptUpdate>)>>,
        now: AtomicUsize,
        max: AtomicUsize,
        per_group_max: Mutex<HashMap<u64, usize>>,
        per_group_now: Mutex<HashMap<u64, usize>>,
    }

    #[tokio::test]
    async fn proposals_in_flight_are_bounded_per_node_and_per_partition() {
        let (q, rx) = ReceiptQueue::new(RECEIPT_QUEUE_MAX);
        let rec = Arc::new(Recorder::default());
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let (r, gate) = (rec.clone(), release.clone());
        let batcher = tokio::spawn(run_batcher(
            rx,
            // chat "g:<n>:…" is in partition n
            |chat: &str| chat.split(':').nth(1).unwrap().parse().unwrap(),
            move |group, updates| {
                let (r, gate) = (r.clone(), gate.clone());
                async move {
                    {
                        let mut now = r.per_group_now.lock().unwrap();
                        let n = now.entry(group).or_default();
                        *n += 1;
                        let mut max = r.per_group_max.lock().unwrap();
                        let m = max.entry(group).or_default();
                        *m = (*m).max(*n);
                    }
                    let n = r.now.fetch_add(1, Ordering::SeqCst) + 1;
                    r.max.fetch_max(n, Ordering::SeqCst);
                    r.proposed.lock().unwrap().push((group, updates));
                    gate.acquire().await.unwrap().forget();
                    r.now.fetch_sub(1, Ordering::SeqCst);
                    *r.per_group_now.lock().unwrap().entry(group).or_default() -= 1;
                }
            },
        ));
        // Twice as many partitions as proposals may be in flight, two rounds each.
        let groups = 2 * RECEIPT_PROPOSALS_IN_FLIGHT_MAX as u64;
        let budget = ReceiptQueue::session_budget();
        for round in 0..2 {
            for g in 0..groups {
                q.offer(
                    &budget,
                    update(&format!("g:{g}:{round}"), "u", Some(1), None),
                )
                .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(5 * RECEIPT_FLUSH_MS)).await;
        }
        assert_eq!(
            rec.now.load(Ordering::SeqCst),
            RECEIPT_PROPOSALS_IN_FLIGHT_MAX,
            "exactly the bound is in flight while proposals hang"
        );
        // Release everything, one at a time, until all receipts are proposed.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let n: usize = rec
                .proposed
                .lock()
                .unwrap()
                .iter()
                .map(|(_, u)| u.len())
                .sum();
            if n == 2 * groups as usize && rec.now.load(Ordering::SeqCst) == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{n} receipts proposed"
            );
            release.add_permits(1);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(
            rec.max.load(Ordering::SeqCst),
            RECEIPT_PROPOSALS_IN_FLIGHT_MAX
        );
        assert!(
            rec.per_group_max.lock().unwrap().values().all(|m| *m == 1),
            "one proposal per partition at a time"
        );
        // Every receipt's permits came back.
        assert_eq!(budget.available_permits(), RECEIPTS_PENDING_PER_SESSION_MAX);
        drop(q);
        release.add_permits(1000);
        batcher.await.unwrap();
    }

    #[tokio::test]
    async fn receipts_of_one_chat_and_user_merge_with_max_and_batches_are_bounded() {
        let (q, rx) = ReceiptQueue::new(RECEIPT_QUEUE_MAX);
        let proposed: Arc<Mutex<Vec<Vec<ReceiptUpdate>>>> = Arc::default();
        let p = proposed.clone();
        let batcher = tokio::spawn(run_batcher(
            rx,
            |_: &str| 1,
            move |_, updates| {
                p.lock().unwrap().push(updates);
                async {}
            },
        ));
        let budget = ReceiptQueue::session_budget();
        q.offer(&budget, update("g:a", "u", Some(3), None)).unwrap();
        q.offer(&budget, update("g:a", "u", Some(2), Some(2)))
            .unwrap();
        q.offer(&budget, update("g:a", "v", None, Some(7))).unwrap();
        tokio::time::sleep(Duration::from_millis(10 * RECEIPT_FLUSH_MS)).await;
        {
            let got = proposed.lock().unwrap();
            assert_eq!(got.len(), 1, "{got:?}");
            assert_eq!(
                got[0],
                vec![
                    update("g:a", "u", Some(3), Some(2)),
                    update("g:a", "v", None, Some(7))
                ]
            );
        }
        assert_eq!(budget.available_permits(), RECEIPTS_PENDING_PER_SESSION_MAX);
        // More than a batch at once: split at RECEIPT_BATCH_MAX.
        proposed.lock().unwrap().clear();
        let n = RECEIPT_BATCH_MAX + 1;
        let budgets: Vec<_> = (0..n.div_ceil(RECEIPTS_PENDING_PER_SESSION_MAX))
            .map(|_| ReceiptQueue::session_budget())
            .collect();
        for i in 0..n {
            let b = &budgets[i / RECEIPTS_PENDING_PER_SESSION_MAX];
            q.offer(b, update(&format!("g:{i}"), "u", Some(1), None))
                .unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while proposed.lock().unwrap().iter().map(Vec::len).sum::<usize>() < n {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let sizes: Vec<usize> = proposed.lock().unwrap().iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![RECEIPT_BATCH_MAX, 1]);
        drop(q);
        batcher.await.unwrap();
    }
}
