//! Raft traffic per node pair, not per group: every group's RPCs to one peer queue on that
//! peer's [`Link`] and leave together, one batch (one QUIC stream) per round; and a
//! node-level liveness signal ([`Liveness`]) tells when a peer is gone or has restarted, so
//! groups need no heartbeats of their own to notice a dead leader (see `quiet`).
//!
//! A batch is `[RAFT_BATCH_SERVICE_TAG][codec(PeerBatch)]`; its answer a `PeerBatchReply`
//! with one reply per RPC, in order. Each RPC inside is an encoded `RaftEnvelope`, as on
//! the single-RPC path (`RAFT_SERVICE_TAG`), which snapshots and frames too large for a
//! batch still take. An empty batch is a ping.
//!
//! Liveness pings go as QUIC datagrams (`[LIVENESS_DATAGRAM_TAG][codec(LivenessPing)]`):
//! no stream, no task, no answer. The receiver hears the pinger from the ping; the pinger
//! hears the peer from its QUIC stack's acknowledgement (what the connection received since
//! the last tick), two packets per exchange. A peer not heard for two intervals (no
//! connection yet, datagrams lost, a peer that does not take them) gets an empty batch as
//! well, which dials, names the peer's process (its incarnation) and always works.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatd_transport::Endpoint;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::NodeId;

/// First byte of a QUIC request that carries a batch of Raft RPCs (or a ping).
pub const RAFT_BATCH_SERVICE_TAG: u8 = 0x03;

/// First byte of a liveness datagram (a ping or its answer).
pub const LIVENESS_DATAGRAM_TAG: u8 = 0x04;

/// A liveness datagram: a ping (or, from a node of an earlier version, an answer to one).
/// Either tells its receiver that the sender (process `incarnation`) is alive.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct LivenessPing {
    /// The sending node.
    pub from: NodeId,
    /// The sending process's incarnation.
    pub incarnation: u64,
    /// True for an answer; pings are no longer answered (the QUIC acknowledgement is the
    /// answer) but an earlier version's answers are still heard.
    pub answer: bool,
}

impl LivenessPing {
    /// The datagram: tag, then the encoded ping.
    pub(crate) fn datagram(&self) -> Option<Bytes> {
        let mut d = vec![LIVENESS_DATAGRAM_TAG];
        chatd_codec::encode_into(self, &mut d).ok()?;
        Some(Bytes::from(d))
    }
}

/// RPCs waiting for their batch on one peer's link; a full queue refuses more (the group
/// backs off as from an unreachable peer).
pub const LINK_QUEUE_RPCS_MAX: usize = 4_096;

/// RPCs in one batch.
pub const BATCH_RPCS_MAX: usize = 512;

/// Bytes of RPC frames in one batch. An RPC frame above it goes on its own (single-RPC path).
pub const PEER_BATCH_BYTES_MAX: usize = 4 << 20;

/// Batches to one peer waiting for their answer at once; RPCs queued meanwhile are
/// coalesced into the next batch.
pub const BATCHES_IN_FLIGHT_PER_PEER_MAX: usize = 8;

/// How many times the link's sender yields to let other groups' RPCs of the same round
/// (a heartbeat tick, one fsync's worth of appends) join a batch before it leaves.
const COALESCE_YIELDS_MAX: usize = 2;

/// One RPC in a batch: its encoded `RaftEnvelope` and how long its sender waits for it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct BatchedRpc {
    /// The sender's timeout; the receiver answers "no reply" (empty) past it.
    pub ttl_ms: u32,
    /// Encoded `RaftEnvelope`.
    pub frame: ByteBuf,
}

/// A batch of RPCs from one node to another; empty, a ping.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct PeerBatch {
    /// The sending node.
    pub from: NodeId,
    /// The sending process's incarnation (changes at each start).
    pub incarnation: u64,
    /// The RPCs, answered in order.
    pub rpcs: Vec<BatchedRpc>,
}

/// The answer to a [`PeerBatch`].
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct PeerBatchReply {
    /// The answering process's incarnation.
    pub incarnation: u64,
    /// One encoded `RaftReply` per RPC, in order; empty: no answer in time.
    pub replies: Vec<ByteBuf>,
}

/// Why an RPC sent through a link got no answer.
#[derive(Clone, Debug, thiserror::Error)]
pub enum LinkError {
    /// The batch could not be exchanged (peer unreachable, connection lost, timeout).
    #[error("node {peer}: {cause}")]
    Transport { peer: NodeId, cause: String },
    /// The link's queue holds [`LINK_QUEUE_RPCS_MAX`] RPCs already.
    #[error("node {peer}: {max} RPCs already queued")]
    QueueFull { peer: NodeId, max: usize },
    /// No answer within the RPC's timeout.
    #[error("node {peer}: no answer within {ms} ms")]
    Timeout { peer: NodeId, ms: u64 },
    /// The peer answered a batch with a malformed reply.
    #[error("node {peer}: malformed batch reply: {cause}")]
    Malformed { peer: NodeId, cause: String },
    /// The link was closed (the peer left every group here, or the node stops).
    #[error("node {peer}: link closed")]
    Closed { peer: NodeId },
}

/// What one node knows of its peers' liveness, from pings and batches both ways.
pub struct Liveness {
    timeout: Duration,
    peers: parking_lot::Mutex<HashMap<NodeId, PeerLife>>,
    /// Woken at every change (a peer found dead, back, or restarted).
    changed: tokio::sync::Notify,
    /// Counts the changes, for any number of watchers (a forwarded call that must end when
    /// its target dies); [`Self::changed`] is the ticker's alone.
    generation: tokio::sync::watch::Sender<u64>,
    /// When a check last ran: a gap past the timeout means this process was not running
    /// (SIGSTOP, a VM pause, starvation), and its peers' silence says nothing about them.
    checked: parking_lot::Mutex<Option<Instant>>,
}

/// One peer's liveness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerLife {
    /// Heard from within the liveness timeout (false until first heard).
    pub alive: bool,
    /// The peer process's incarnation last heard.
    pub incarnation: Option<u64>,
    last_heard: Option<Instant>,
}

impl Liveness {
    pub(crate) fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            peers: parking_lot::Mutex::new(HashMap::new()),
            changed: tokio::sync::Notify::new(),
            generation: tokio::sync::watch::Sender::new(0),
            checked: parking_lot::Mutex::new(None),
        }
    }

    /// Wakes the ticker and every watcher: a peer's liveness changed.
    fn announce(&self) {
        self.changed.notify_one();
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Follows liveness changes: the receiver sees a new value at each one.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Records that `peer` (process `incarnation`) was heard from now.
    pub(crate) fn heard(&self, peer: NodeId, incarnation: u64) {
        let mut peers = self.peers.lock();
        let life = peers.entry(peer).or_insert(PeerLife {
            alive: false,
            incarnation: None,
            last_heard: None,
        });
        let changed = !life.alive || life.incarnation != Some(incarnation);
        life.alive = true;
        life.incarnation = Some(incarnation);
        life.last_heard = Some(Instant::now());
        drop(peers);
        if changed {
            self.announce();
        }
    }

    /// Records that `peer`'s process, the one last heard, ran after `at`: its QUIC stack
    /// acknowledged a ping sent on the connection to it (see `run_pinger`). A peer with no
    /// incarnation known yet is not credited: an answer that names its process comes first.
    pub(crate) fn heard_again(&self, peer: NodeId, at: Instant) {
        let mut peers = self.peers.lock();
        let Some(life) = peers.get_mut(&peer).filter(|l| l.incarnation.is_some()) else {
            return;
        };
        let changed = !life.alive;
        life.alive = true;
        life.last_heard = Some(life.last_heard.map_or(at, |t| t.max(at)));
        drop(peers);
        if changed {
            self.announce();
        }
    }

    /// Records that `peer` was heard from, if it is one this node follows (has a link to).
    pub(crate) fn heard_if_known(&self, peer: NodeId, incarnation: u64) {
        if self.peers.lock().contains_key(&peer) {
            self.heard(peer, incarnation);
        }
    }

    /// Starts following `peer` (not alive until heard from).
    fn register(&self, peer: NodeId) {
        self.peers.lock().entry(peer).or_insert(PeerLife {
            alive: false,
            incarnation: None,
            last_heard: None,
        });
    }

    /// Marks `peer` dead if it was not heard from within the timeout; returns whether it
    /// is alive.
    ///
    /// The first check after this process stalled for longer than the timeout (no check
    /// ran meanwhile) declares nobody dead: every live peer gets a whole timeout from now
    /// to be heard again (the pings and batches it sent meanwhile may still be queued).
    /// Judging them on a silence that was ours would make a resumed node campaign against
    /// leaders that are alive.
    pub(crate) fn check(&self, peer: NodeId) -> bool {
        let now = Instant::now();
        let mut peers = self.peers.lock();
        let stalled = {
            let mut checked = self.checked.lock();
            let stalled = checked
                .map(|t| now.saturating_duration_since(t))
                .filter(|gap| *gap > self.timeout);
            *checked = Some(now);
            stalled
        };
        if let Some(gap) = stalled {
            for life in peers.values_mut().filter(|l| l.alive) {
                life.last_heard = Some(now);
            }
            tracing::info!(
                stalled_ms = gap.as_millis() as u64,
                "liveness checks resumed after a stall of this process: live peers get a \
                 whole timeout to be heard again"
            );
        }
        let Some(life) = peers.get_mut(&peer) else {
            return false;
        };
        if life.alive && life.last_heard.is_none_or(|t| t.elapsed() > self.timeout) {
            life.alive = false;
            drop(peers);
            tracing::warn!(
                peer,
                timeout_ms = self.timeout.as_millis() as u64,
                "peer silent past the liveness timeout"
            );
            self.announce();
            return false;
        }
        life.alive
    }

    /// [`Self::check`] for every followed peer (the ticker's first step each round).
    pub(crate) fn check_all(&self) {
        let peers: Vec<NodeId> = self.peers.lock().keys().copied().collect();
        for peer in peers {
            self.check(peer);
        }
    }

    /// True if `peer` was heard from within `within`.
    fn heard_within(&self, peer: NodeId, within: Duration) -> bool {
        self.peers
            .lock()
            .get(&peer)
            .and_then(|l| l.last_heard)
            .is_some_and(|t| t.elapsed() < within)
    }

    /// Every peer's liveness.
    pub fn snapshot(&self) -> HashMap<NodeId, PeerLife> {
        self.peers.lock().clone()
    }

    /// True if `peer` was heard from and then fell silent past the timeout.
    pub fn is_dead(&self, peer: NodeId) -> bool {
        self.peers
            .lock()
            .get(&peer)
            .is_some_and(|l| !l.alive && l.incarnation.is_some())
    }

    /// Waits for the next change.
    pub(crate) async fn changed(&self) {
        self.changed.notified().await
    }

    fn forget(&self, peer: NodeId) {
        self.peers.lock().remove(&peer);
    }
}

/// Whether each peer answers Raft RPCs, as all groups together see it. Every group's RPC
/// outcome is recorded here, and only a change is logged: a peer's loss once (WARN) and its
/// return once (INFO), with counters, instead of one error per group and retry.
///
/// Calls to one peer overlap (several batches in flight, single RPCs beside them) and end
/// out of order: a call started while the peer was down may time out after a later one
/// was answered. The state follows the outcome of the latest *started* call seen so far;
/// an outcome of a call started before the one that set the state is stale and ignored,
/// so a peer's return is not followed by a false loss and a second return.
#[derive(Default)]
pub struct PeerHealth {
    peers: parking_lot::Mutex<std::collections::HashMap<NodeId, PeerState>>,
    lost_total: std::sync::atomic::AtomicU64,
    recovered_total: std::sync::atomic::AtomicU64,
}

#[derive(Clone, Copy)]
struct PeerState {
    /// Down since then; `None`: up.
    down_since: Option<Instant>,
    /// When the call whose outcome set this state was started.
    decided_by: Instant,
}

impl PeerHealth {
    /// Records the outcome of one call to `peer`, started at `started`.
    pub fn record(
        &self,
        peer: NodeId,
        started: Instant,
        outcome: Result<(), &dyn std::fmt::Display>,
    ) {
        let mut peers = self.peers.lock();
        let before = peers.get(&peer).copied();
        if before.is_some_and(|b| started < b.decided_by) {
            return;
        }
        let was_down = before.and_then(|b| b.down_since);
        let down_since = match (was_down, &outcome) {
            (_, Ok(())) => None,
            (Some(since), Err(_)) => Some(since),
            (None, Err(_)) => Some(Instant::now()),
        };
        peers.insert(
            peer,
            PeerState {
                down_since,
                decided_by: started,
            },
        );
        match (was_down, outcome) {
            (Some(since), Ok(())) => {
                self.recovered_total
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(
                    peer,
                    down_ms = since.elapsed().as_millis() as u64,
                    "peer reachable again"
                );
            }
            (None, Err(cause)) => {
                self.lost_total
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(peer, %cause, "peer unreachable for Raft RPCs");
            }
            _ => {}
        }
    }

    /// Peers whose last RPC failed.
    pub fn down(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self
            .peers
            .lock()
            .iter()
            .filter(|(_, s)| s.down_since.is_some())
            .map(|(p, _)| *p)
            .collect();
        v.sort_unstable();
        v
    }

    /// Times a peer became unreachable, and times one came back.
    pub fn transitions(&self) -> (u64, u64) {
        (
            self.lost_total.load(std::sync::atomic::Ordering::Relaxed),
            self.recovered_total
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }
}

/// Counters of the links, for `/metrics` and tests.
#[derive(Default)]
pub struct LinkStats {
    /// Batches sent (pings included).
    pub batches_total: AtomicU64,
    /// Liveness pings sent as datagrams (not counted in `pings_total`).
    pub datagram_pings_total: AtomicU64,
    /// RPCs sent in batches.
    pub rpcs_total: AtomicU64,
    /// Pings sent.
    pub pings_total: AtomicU64,
    /// Bytes of AppendEntries frames that carried entries (not heartbeats).
    pub entry_bytes_total: AtomicU64,
    /// The part of `entry_bytes_total` that carried entries already committed when sent:
    /// a new replica's (a learner's) or a lagging one's catch-up from the log, not the
    /// replication of new entries (see `network::catch_up_bytes`).
    pub catch_up_entry_bytes_total: AtomicU64,
    /// Bytes of InstallSnapshot frames (snapshot chunks).
    pub snapshot_bytes_total: AtomicU64,
}

struct Pending {
    frame: Bytes,
    ttl: Duration,
    reply: oneshot::Sender<Result<Bytes, LinkError>>,
}

/// What every link of a node shares.
pub(crate) struct LinkCtx {
    pub node_id: NodeId,
    pub incarnation: u64,
    pub endpoint: Endpoint,
    pub health: Arc<PeerHealth>,
    pub liveness: Arc<Liveness>,
    pub stats: Arc<LinkStats>,
    pub ping_every: Duration,
}

/// The node's links, one per peer it shares a group with.
pub(crate) struct Links {
    ctx: Arc<LinkCtx>,
    links: parking_lot::Mutex<HashMap<NodeId, Arc<Link>>>,
}

impl Links {
    pub fn new(ctx: LinkCtx) -> Self {
        Self {
            ctx: Arc::new(ctx),
            links: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    pub fn ctx(&self) -> &LinkCtx {
        &self.ctx
    }

    /// The link to `peer` at `addr`, opened if needed (replaced if the address changed).
    pub fn link(&self, peer: NodeId, addr: SocketAddr) -> Arc<Link> {
        let mut links = self.links.lock();
        if let Some(l) = links.get(&peer) {
            if l.addr == addr {
                return l.clone();
            }
        }
        let link = Arc::new(Link::open(self.ctx.clone(), peer, addr));
        links.insert(peer, link.clone());
        link
    }

    /// Closes the links to peers not in `keep` (they left every group hosted here).
    pub fn retain(&self, keep: &std::collections::HashSet<NodeId>) {
        let mut links = self.links.lock();
        let gone: Vec<NodeId> = links
            .keys()
            .filter(|p| !keep.contains(p))
            .copied()
            .collect();
        for peer in gone {
            links.remove(&peer);
            self.ctx.liveness.forget(peer);
        }
    }

    /// Closes every link.
    pub fn close(&self) {
        self.links.lock().clear();
    }
}

/// One peer's link: a bounded queue of RPCs, a sender task that batches them, and a pinger.
pub(crate) struct Link {
    peer: NodeId,
    addr: SocketAddr,
    queue: mpsc::Sender<Pending>,
    tasks: [tokio::task::AbortHandle; 2],
}

impl Drop for Link {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Link {
    fn open(ctx: Arc<LinkCtx>, peer: NodeId, addr: SocketAddr) -> Self {
        ctx.liveness.register(peer);
        let (queue, rx) = mpsc::channel(LINK_QUEUE_RPCS_MAX);
        let sender = tokio::spawn(run_sender(ctx.clone(), peer, addr, rx)).abort_handle();
        let pinger = tokio::spawn(run_pinger(ctx, peer, addr)).abort_handle();
        Self {
            peer,
            addr,
            queue,
            tasks: [sender, pinger],
        }
    }

    /// Sends one encoded `RaftEnvelope` in the next batch to the peer and waits (at most
    /// `ttl`) for its encoded reply.
    pub async fn call(&self, frame: Bytes, ttl: Duration) -> Result<Bytes, LinkError> {
        let peer = self.peer;
        let (reply, answer) = oneshot::channel();
        self.queue
            .try_send(Pending { frame, ttl, reply })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => LinkError::QueueFull {
                    peer,
                    max: LINK_QUEUE_RPCS_MAX,
                },
                mpsc::error::TrySendError::Closed(_) => LinkError::Closed { peer },
            })?;
        match tokio::time::timeout(ttl, answer).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(LinkError::Closed { peer }),
            Err(_) => Err(LinkError::Timeout {
                peer,
                ms: ttl.as_millis() as u64,
            }),
        }
    }
}

/// Takes the RPCs queued for `peer` and sends them in batches: a batch leaves as soon as a
/// slot of [`BATCHES_IN_FLIGHT_PER_PEER_MAX`] is free, with everything queued by then (up
/// to [`BATCH_RPCS_MAX`] and [`PEER_BATCH_BYTES_MAX`]).
async fn run_sender(
    ctx: Arc<LinkCtx>,
    peer: NodeId,
    addr: SocketAddr,
    mut rx: mpsc::Receiver<Pending>,
) {
    let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT_PER_PEER_MAX));
    let mut carry: Option<Pending> = None;
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = next_batch(&mut rx, first, &mut carry).await;
        // Senders that gave up meanwhile need no answer.
        batch.retain(|p| !p.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _slot = slot;
            exchange(&ctx, peer, addr, batch).await;
        });
    }
}

/// Gathers a batch: `first`, then whatever is queued (yielding a few times so the rest of
/// a round can join), up to [`BATCH_RPCS_MAX`] RPCs and [`PEER_BATCH_BYTES_MAX`] bytes; an
/// RPC that does not fit is left in `carry` for the next batch.
async fn next_batch(
    rx: &mut mpsc::Receiver<Pending>,
    first: Pending,
    carry: &mut Option<Pending>,
) -> Vec<Pending> {
    let mut bytes = first.frame.len();
    let mut batch = vec![first];
    for round in 0..=COALESCE_YIELDS_MAX {
        while batch.len() < BATCH_RPCS_MAX {
            match rx.try_recv() {
                Ok(p) if bytes + p.frame.len() > PEER_BATCH_BYTES_MAX => {
                    *carry = Some(p);
                    return batch;
                }
                Ok(p) => {
                    bytes += p.frame.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        if batch.len() >= BATCH_RPCS_MAX || round == COALESCE_YIELDS_MAX {
            break;
        }
        tokio::task::yield_now().await;
    }
    batch
}

/// Sends one batch and hands each RPC its reply.
async fn exchange(ctx: &LinkCtx, peer: NodeId, addr: SocketAddr, batch: Vec<Pending>) {
    let ttl = batch
        .iter()
        .map(|p| p.ttl)
        .max()
        .unwrap_or(Duration::from_millis(100));
    let rpcs = batch
        .iter()
        .map(|p| BatchedRpc {
            ttl_ms: u32::try_from(p.ttl.as_millis()).unwrap_or(u32::MAX),
            frame: ByteBuf::from(p.frame.to_vec()),
        })
        .collect();
    ctx.stats
        .rpcs_total
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    let result = call_batch(ctx, peer, addr, rpcs, ttl).await;
    match result {
        Ok(replies) => {
            for (p, r) in batch.into_iter().zip(replies) {
                let r = if r.is_empty() {
                    Err(LinkError::Timeout {
                        peer,
                        ms: p.ttl.as_millis() as u64,
                    })
                } else {
                    Ok(Bytes::from(r.into_vec()))
                };
                let _ = p.reply.send(r);
            }
        }
        Err(e) => {
            for p in batch {
                let _ = p.reply.send(Err(e.clone()));
            }
        }
    }
}

/// One batch exchange: the replies, one per RPC, or why there are none. Records the peer's
/// liveness and health.
async fn call_batch(
    ctx: &LinkCtx,
    peer: NodeId,
    addr: SocketAddr,
    rpcs: Vec<BatchedRpc>,
    ttl: Duration,
) -> Result<Vec<ByteBuf>, LinkError> {
    let sent = rpcs.len();
    let batch = PeerBatch {
        from: ctx.node_id,
        incarnation: ctx.incarnation,
        rpcs,
    };
    let mut frame = Vec::with_capacity(64);
    frame.push(RAFT_BATCH_SERVICE_TAG);
    chatd_codec::encode_into(&batch, &mut frame).map_err(|e| LinkError::Malformed {
        peer,
        cause: e.to_string(),
    })?;
    ctx.stats.batches_total.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let reply = ctx
        .endpoint
        .call_with_timeout(addr, Bytes::from(frame), ttl)
        .await;
    ctx.health.record(
        peer,
        started,
        reply
            .as_ref()
            .map(|_| ())
            .map_err(|e| e as &dyn std::fmt::Display),
    );
    let reply = reply.map_err(|e| LinkError::Transport {
        peer,
        cause: e.to_string(),
    })?;
    let reply: PeerBatchReply = chatd_codec::decode(&reply).map_err(|e| LinkError::Malformed {
        peer,
        cause: e.to_string(),
    })?;
    ctx.liveness.heard(peer, reply.incarnation);
    if reply.replies.len() != sent {
        return Err(LinkError::Malformed {
            peer,
            cause: format!("{} replies to {sent} RPCs", reply.replies.len()),
        });
    }
    Ok(reply.replies)
}

/// Pings `peer` every `ping_every` (each ping waits at most the liveness timeout, several
/// may be under way) and marks it dead once it was silent past the timeout. Of two nodes,
/// the one with the lower id pings; the other hears the pings and pings only when it has
/// heard nothing for two intervals (so one ping per interval serves both, and either side
/// still notices the other's death).
///
/// A datagram ping is not answered: the peer's QUIC stack acknowledges it within its ACK
/// delay, and what the connection received since the last tick says the peer ran after
/// then (two packets per exchange, not three, and no wake-up for an answer on either
/// side). The process behind the connection is the one last named by a batch's answer or
/// the peer's own ping: a restarted peer resets the old connection, and the empty batch
/// sent on a new one learns its new incarnation.
async fn run_pinger(ctx: Arc<LinkCtx>, peer: NodeId, addr: SocketAddr) {
    // On the node's grid: every peer's pinger (and the registry's ticker, when its period
    // is the same) wakes at once.
    let mut every = crate::clock::grid_interval(ctx.ping_every);
    let timeout = ctx.liveness.timeout;
    // Pings under way: at most one per interval of the timeout (a bound, not a queue).
    let pings = Arc::new(Semaphore::new(
        (timeout.as_millis() / ctx.ping_every.as_millis().max(1)).clamp(1, 64) as usize,
    ));
    let datagram = LivenessPing {
        from: ctx.node_id,
        incarnation: ctx.incarnation,
        answer: false,
    }
    .datagram();
    // What the connection to the peer had received at the last tick, and when we looked.
    let mut received: Option<(chatd_transport::Received, Instant)> = None;
    loop {
        every.tick().await;
        let looked = ctx.endpoint.received_from(addr);
        if let (Some((before, at)), Some(now)) = (received, looked) {
            if now.connection == before.connection && now.packets > before.packets {
                ctx.liveness.heard_again(peer, at);
            }
        }
        received = looked.map(|r| (r, Instant::now()));
        ctx.liveness.check(peer);
        let heard_lately = ctx.liveness.heard_within(peer, 2 * ctx.ping_every);
        if ctx.node_id > peer && heard_lately {
            continue;
        }
        // Heard lately: a datagram (acknowledged, not answered) is enough.
        if heard_lately {
            if let Some(d) = datagram.clone() {
                if ctx.endpoint.send_datagram(addr, d).is_ok() {
                    ctx.stats
                        .datagram_pings_total
                        .fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
        }
        let Ok(slot) = pings.clone().try_acquire_owned() else {
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _slot = slot;
            ctx.stats.pings_total.fetch_add(1, Ordering::Relaxed);
            let _ = call_batch(&ctx, peer, addr, Vec::new(), timeout).await;
        });
    }
}

/// A new incarnation number for this process: differs from the last start's.
pub(crate) fn new_incarnation() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ u64::from(std::process::id()).rotate_left(40)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn pending(bytes: usize) -> (Pending, oneshot::Receiver<Result<Bytes, LinkError>>) {
        let (reply, rx) = oneshot::channel();
        (
            Pending {
                frame: Bytes::from(vec![0u8; bytes]),
                ttl: Duration::from_secs(1),
                reply,
            },
            rx,
        )
    }

    #[test]
    fn a_stale_outcome_of_an_overlapping_call_changes_no_peer_health() {
        let h = PeerHealth::default();
        let err: &dyn std::fmt::Display = &"timed out";
        let t0 = Instant::now();
        let t = |ms| t0 + Duration::from_millis(ms);
        h.record(2, t(0), Ok(()));
        h.record(2, t(10), Err(err));
        assert_eq!(h.down(), vec![2]);
        // A call started while the peer was down is answered after it came back...
        h.record(2, t(30), Ok(()));
        assert_eq!(h.transitions(), (1, 1));
        // ...and one started earlier times out only now: stale, no second loss.
        h.record(2, t(20), Err(err));
        assert!(h.down().is_empty());
        // An old success after a fresh failure does not bring it back either.
        h.record(2, t(40), Err(err));
        h.record(2, t(35), Ok(()));
        assert_eq!(h.down(), vec![2]);
        assert_eq!(h.transitions(), (2, 1));
        // A failure while down only moves the mark; the next fresh success is one return.
        h.record(2, t(50), Err(err));
        h.record(2, t(60), Ok(()));
        assert_eq!(h.transitions(), (2, 2));
    }

    #[test]
    fn a_stall_of_this_process_declares_no_peer_dead_but_real_silence_does() {
        let timeout = Duration::from_millis(60);
        let live = Liveness::new(timeout);
        live.register(2);
        live.heard(2, 7);
        assert!(live.check(2));
        // Nothing ran here for twice the timeout (a SIGSTOP): the first check forgives.
        std::thread::sleep(2 * timeout);
        assert!(live.check(2), "our own stall is not the peer's death");
        assert!(!live.is_dead(2));
        // Checked all along, the peer stays silent: dead after one timeout.
        let start = Instant::now();
        while live.check(2) {
            assert!(start.elapsed() < 10 * timeout, "never found dead");
            std::thread::sleep(timeout / 6);
        }
        assert!(live.is_dead(2));
        assert!(start.elapsed() >= timeout - timeout / 6);
    }

    #[tokio::test]
    async fn a_batch_stops_at_its_rpc_and_byte_bounds_and_carries_the_rest() {
        let (tx, mut rx) = mpsc::channel(LINK_QUEUE_RPCS_MAX);
        let mut answers = Vec::new();
        for _ in 0..BATCH_RPCS_MAX + 88 {
            let (p, a) = pending(10);
            tx.try_send(p).map_err(|_| ()).unwrap();
            answers.push(a);
        }
        let mut carry = None;
        let first = rx.recv().await.unwrap();
        let batch = next_batch(&mut rx, first, &mut carry).await;
        assert_eq!(batch.len(), BATCH_RPCS_MAX, "at the RPC bound");
        assert!(carry.is_none());
        let first = rx.recv().await.unwrap();
        assert_eq!(next_batch(&mut rx, first, &mut carry).await.len(), 88);

        // Byte bound: four frames of a MiB fill a batch; the fifth waits for the next.
        let mib = PEER_BATCH_BYTES_MAX / 4;
        for _ in 0..6 {
            let (p, a) = pending(mib);
            tx.try_send(p).map_err(|_| ()).unwrap();
            answers.push(a);
        }
        let first = rx.recv().await.unwrap();
        let batch = next_batch(&mut rx, first, &mut carry).await;
        assert_eq!(batch.len(), 4, "at the byte bound");
        assert_eq!(
            batch.iter().map(|p| p.frame.len()).sum::<usize>(),
            PEER_BATCH_BYTES_MAX
        );
        let carried = carry.take().expect("the fifth is carried");
        let batch = next_batch(&mut rx, carried, &mut carry).await;
        assert_eq!(batch.len(), 2);
    }

    #[tokio::test]
    async fn a_full_link_queue_refuses_at_once_and_keeps_what_it_holds() {
        // A link whose sender is not running: the queue alone holds RPCs.
        let (queue, mut rx) = mpsc::channel(LINK_QUEUE_RPCS_MAX);
        let link = Link {
            peer: 9,
            addr: "127.0.0.1:9".parse().unwrap(),
            queue,
            tasks: [
                tokio::spawn(async {}).abort_handle(),
                tokio::spawn(async {}).abort_handle(),
            ],
        };
        let link = Arc::new(link);
        let mut waiting = Vec::new();
        for _ in 0..LINK_QUEUE_RPCS_MAX {
            let l = link.clone();
            waiting.push(tokio::spawn(async move {
                l.call(Bytes::from_static(b"x"), Duration::from_secs(30))
                    .await
            }));
        }
        while rx.len() < LINK_QUEUE_RPCS_MAX {
            tokio::task::yield_now().await;
        }
        let refused = link
            .call(Bytes::from_static(b"y"), Duration::from_secs(30))
            .await;
        assert!(
            matches!(
                refused,
                Err(LinkError::QueueFull {
                    peer: 9,
                    max: LINK_QUEUE_RPCS_MAX
                })
            ),
            "{refused:?}"
        );
        // Everything queued is still there, in order, and each gets its own answer.
        let first = rx.recv().await.unwrap();
        assert_eq!(&first.frame[..], b"x");
        let _ = first.reply.send(Ok(Bytes::from_static(b"answer")));
        let answered = futures::future::select_all(waiting).await.0.unwrap();
        assert_eq!(answered.unwrap(), Bytes::from_static(b"answer"));
    }

    #[test]
    fn liveness_reports_first_contact_silence_and_restart() {
        let l = Liveness::new(Duration::from_millis(50));
        assert!(!l.check(7), "never heard: not alive");
        assert!(!l.is_dead(7), "never heard: not dead either");
        l.heard(7, 1);
        assert!(l.check(7));
        // Checked every 10 ms (as the pinger does), silent for 60 ms.
        for _ in 0..6 {
            std::thread::sleep(Duration::from_millis(10));
            l.check(7);
        }
        std::thread::sleep(Duration::from_millis(10));
        assert!(!l.check(7), "silent past the timeout");
        assert!(l.is_dead(7));
        l.heard(7, 2);
        let s = l.snapshot();
        assert_eq!(s[&7].incarnation, Some(2));
        assert!(s[&7].alive);
        l.forget(7);
        assert!(l.snapshot().is_empty());
    }
}
