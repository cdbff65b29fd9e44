//! The client gateway: WebSocket sessions, request handling, local delivery.
//!
//! Every node is a gateway: it authenticates clients, turns their frames into proposals and
//! queries on the partitions' leaders, and pushes applied events to its own sessions. A
//! partition leader sends each applied batch of events to every other node once (one batch
//! per destination node); each node fans it out to its local sessions. Live push is best
//! effort: a session that cannot keep up is closed (`SLOW_CONSUMER`) and catches up by sync.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use chatd_chat::{ChatCommand, ChatEvent, ChatReply, MessageRecord, ReceiptUpdate};
use chatd_proto::{close, code, ClientFrame, MessageView, PresenceView, ServerFrame};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::limits::{ChatMembers, SendBuckets, TypingLimiter};
use crate::node::{Node, ProposeError};
use crate::queries::{ChatQuery, ChatQueryReply};
use crate::receipts::{ReceiptQueue, RECEIPT_QUEUE_MAX};
use chatd_raftlog::NodeId;

mod e2e;
mod handlers;
use handlers::handle;

/// Limits of the gateway, each with its unit (defined with the rest of the configuration
/// in `chatd-config`).
pub use chatd_config::GatewayConfig;

/// Close reason of sessions whose user was disabled or whose token was rotated.
pub const REVOKED_REASON: &str = "token revoked: the user was disabled or its token rotated";
/// How long closing a connection may wait for the client to take the close frame.
const CLOSE_WRITE_TIMEOUT_MS: u64 = 1_000;
/// Applied event batches waiting for delivery, at most (more are dropped: clients sync).
pub const DELIVERY_QUEUE_BATCHES_MAX: usize = 4096;
/// Most queued frames a session's writer puts into one flush.
pub const WRITE_BATCH_FRAMES_MAX: usize = 64;

/// Ephemeral items (never stored) sent between gateways.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Ephemeral {
    Typing {
        chat: String,
        user: String,
        recipients: Vec<String>,
    },
    /// `user`'s first session opened (online) or last closed on `node`.
    Presence {
        node: u64,
        user: String,
        online: bool,
        at_ms: u64,
    },
    /// Users with a session on `node` (sent by earlier versions; rosters replaced it).
    Online { node: u64, users: Vec<String> },
    /// Part `part` (of `parts`) of round `round` of `node`'s roster: every user with a
    /// session there, re-sent each heartbeat and whenever a peer comes back. A node that
    /// holds a whole recent round sends `node` only the deliveries with a recipient there.
    Roster {
        node: u64,
        round: u64,
        part: u32,
        parts: u32,
        users: Vec<String>,
    },
}

/// How long a new session waits for every peer to take the announcement that its user is
/// online here before it serves anything (so a leader that skips this node for deliveries
/// without a recipient here already knows). Past it the session goes on, and a roster is
/// sent at once.
pub const SESSION_ANNOUNCE_TIMEOUT_MS: u64 = 1_000;

/// How long a request waits for its answer's place in a full outbound queue before the
/// session is closed as a slow consumer (`4008`): the client has read nothing for that long.
pub const ANSWER_SLOT_WAIT_MS: u64 = 5_000;

enum Outbound {
    /// Shared by every session a push goes to; a pointer keeps the session queue's slots
    /// small (tokio allocates them 32 at a time per channel: ~8 KB per idle session when a
    /// slot held a whole frame).
    Frame(Arc<OutFrame>),
}

/// A frame on its way to one or more sessions. Its JSON text is made once, by the first
/// writer that sends it, and shared by every other session it goes to (a fanout to many
/// sessions encodes once, not once per recipient).
struct OutFrame {
    frame: ServerFrame,
    text: std::sync::OnceLock<Utf8Bytes>,
}

impl OutFrame {
    fn new(frame: ServerFrame) -> Arc<Self> {
        Arc::new(Self {
            frame,
            text: std::sync::OnceLock::new(),
        })
    }

    /// The frame as JSON text (encoded on the first call; a cheap clone after).
    fn text(&self) -> Utf8Bytes {
        self.text
            .get_or_init(|| frame_text(&self.frame).into())
            .clone()
    }
}

struct SessionHandle {
    id: u64,
    tx: mpsc::Sender<Outbound>,
    closer: watch::Sender<Option<(u16, String)>>,
}

/// Sessions on this node, and the gateway's shared state.
pub struct Gateway {
    pub config: GatewayConfig,
    sessions: crate::sessions::SessionMap<SessionHandle>,
    /// Per-user send token buckets (bounded, idle ones dropped).
    buckets: SendBuckets,
    next_session: AtomicU64,
    /// Receipts accepted and not yet written (bounded per node and per session).
    receipts: ReceiptQueue,
    receipts_rx: Mutex<Option<mpsc::Receiver<crate::receipts::Queued>>>,
    /// Current members of chats for typing frames (bounded, short TTL).
    typing_members: ChatMembers,
    /// Receipt cursors pushed to this node's sessions (never pushed backwards).
    receipts_pushed: crate::limits::ReceiptsPushed,
    /// Asks the presence task to send this node's roster now (an announcement failed).
    roster_now: Arc<tokio::sync::Notify>,
    pub presence: crate::presence::Presence,
    pub notifier: std::sync::OnceLock<crate::notify::Notifier>,
    pub metrics: crate::metrics::Metrics,
    /// WebSocket sessions open on this node, at most `sessions_max`.
    pub slots: crate::sessions::SessionSlots,
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn view(m: &MessageRecord) -> MessageView {
    // E2E entries keep their MLS epoch in `target` (chatd_chat::e2e).
    let e2e = m.kind.starts_with("mls_");
    MessageView {
        chat: m.chat.clone(),
        seq: m.seq,
        msg_id: m.msg_id(),
        sender: m.sender.clone(),
        kind: m.kind.clone(),
        text: m.text.clone(),
        ts: m.ts,
        reply_to: if e2e {
            m.reply_to
        } else {
            m.reply_to.or(m.target)
        },
        epoch: if e2e { m.target } else { None },
        edited_ts: m.edited_ts,
        files: m
            .files
            .iter()
            .map(|f| chatd_proto::FileView {
                file_id: f.file_id.clone(),
                name: f.name.clone(),
                mime: f.mime.clone(),
                size: f.size,
            })
            .collect(),
    }
}

fn err(id: Option<String>, code: &str, message: impl Into<String>) -> ServerFrame {
    ServerFrame::Error {
        id,
        code: code.to_string(),
        message: message.into(),
    }
}

/// Ids: 1–N of `[A-Za-z0-9_.:-]`.
fn valid_id(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// The partition group of a chat.
pub fn chat_group(node: &Node, chat: &str) -> u64 {
    chatd_membership::partition_of(chat.as_bytes(), node.partitions())
}

/// The partition group holding a user's chat index.
pub fn user_group(node: &Node, user: &str) -> u64 {
    chatd_membership::partition_of(format!("u:{user}").as_bytes(), node.partitions())
}

/// The direct chat id of two users.
pub fn direct_chat_id(a: &str, b: &str) -> String {
    let (x, y) = if a <= b { (a, b) } else { (b, a) };
    format!("d:{x}:{y}")
}

impl Gateway {
    /// A gateway with `config`.
    pub fn new(config: GatewayConfig, delivery_dropped: Arc<AtomicU64>) -> Self {
        let (receipts, rx) = ReceiptQueue::new(RECEIPT_QUEUE_MAX);
        Self {
            config: config.clone(),
            sessions: Default::default(),
            buckets: SendBuckets::new(config.send_burst, config.send_rate_per_sec),
            next_session: AtomicU64::new(1),
            receipts,
            receipts_rx: Mutex::new(Some(rx)),
            typing_members: ChatMembers::default(),
            receipts_pushed: Default::default(),
            roster_now: Arc::new(tokio::sync::Notify::new()),
            presence: crate::presence::Presence::new(Duration::from_millis(config.presence_ttl_ms)),
            notifier: std::sync::OnceLock::new(),
            metrics: crate::metrics::Metrics {
                delivery_dropped,
                ..Default::default()
            },
            slots: crate::sessions::SessionSlots::new(config.sessions_max),
        }
    }

    /// Users with at least one session here.
    pub fn online_users(&self) -> Vec<String> {
        self.sessions.users()
    }

    /// Asks every session to close with `code` (shutdown: reconnect elsewhere).
    pub fn close_all(&self, code: u16, reason: &str) {
        self.sessions.for_each(|s| {
            let _ = s.closer.send(Some((code, reason.to_string())));
        });
    }

    /// Asks every session of `user` on this node to close with `code`. Never blocks (the
    /// metadata apply path calls it when a token stops working).
    pub fn close_user(&self, user: &str, code: u16, reason: &str) -> usize {
        self.sessions.with_user(user, |list| {
            let list = list.unwrap_or_default();
            for s in list {
                let _ = s.closer.send(Some((code, reason.to_string())));
            }
            list.len()
        })
    }

    /// True if this node has a session of `user`.
    pub fn has_session(&self, user: &str) -> bool {
        self.sessions.contains(user)
    }

    /// Presence of `users` cluster-wide, as this node knows it.
    pub fn presence_of(&self, users: &[String]) -> Vec<PresenceView> {
        self.presence.query(users, |u| self.has_session(u))
    }

    fn push_changes(&self, changes: impl IntoIterator<Item = crate::presence::Change>) {
        for c in changes {
            let frame = OutFrame::new(ServerFrame::Presence { presence: c.view });
            for s in &c.subscribers {
                self.push(s, &frame);
            }
        }
    }

    /// Drops silent nodes' announcements and pushes the resulting changes.
    pub fn expire_presence(&self) {
        let changes = self.presence.expire(|u| self.has_session(u), now_ms());
        self.push_changes(changes);
    }

    /// Pushes `frame` to every local session of `user`; closes those that cannot keep up.
    fn push(&self, user: &str, frame: &Arc<OutFrame>) {
        self.sessions
            .with_user(user, |list| self.push_to(list.unwrap_or_default(), frame));
    }

    fn push_to(&self, list: &[SessionHandle], frame: &Arc<OutFrame>) {
        for s in list {
            match s.tx.try_send(Outbound::Frame(Arc::clone(frame))) {
                Ok(()) => self.metrics.frames_out.fetch_add(1, Ordering::Relaxed),
                Err(_) => {
                    let _ = s.closer.send(Some((
                        close::SLOW_CONSUMER,
                        "outbound queue full: reconnect and sync".into(),
                    )));
                    0
                }
            };
        }
    }

    /// Delivers applied chat events to this node's sessions.
    pub fn deliver_local(&self, events: &[ChatEvent]) {
        let now = now_ms();
        for e in events {
            match e {
                ChatEvent::Message {
                    message,
                    recipients,
                } => {
                    if message.kind == "join" || message.kind == "leave" {
                        // The typing path's cached members are stale now.
                        self.typing_members.invalidate(&message.chat);
                    }
                    let frame = OutFrame::new(ServerFrame::Message {
                        message: view(message),
                    });
                    self.metrics
                        .deliver_latency
                        .record(now.saturating_sub(message.ts));
                    for r in recipients {
                        self.push(r, &frame);
                    }
                }
                ChatEvent::Updated {
                    message,
                    recipients,
                } => {
                    let frame = OutFrame::new(ServerFrame::Updated {
                        message: view(message),
                    });
                    for r in recipients {
                        self.push(r, &frame);
                    }
                }
                ChatEvent::Receipt {
                    chat,
                    user,
                    cursor,
                    recipients,
                } => {
                    if !self
                        .receipts_pushed
                        .advance(chat, user, cursor.delivered, cursor.read)
                    {
                        continue;
                    }
                    let frame = OutFrame::new(ServerFrame::Receipt {
                        chat: chat.clone(),
                        user: user.clone(),
                        delivered: cursor.delivered,
                        read: cursor.read,
                    });
                    for r in recipients {
                        self.push(r, &frame);
                    }
                }
            }
        }
    }

    /// Delivers ephemeral items to this node's sessions.
    pub fn ephemeral_local(&self, items: &[Ephemeral]) {
        for i in items {
            match i {
                Ephemeral::Typing {
                    chat,
                    user,
                    recipients,
                } => {
                    let frame = OutFrame::new(ServerFrame::Typing {
                        chat: chat.clone(),
                        user: user.clone(),
                    });
                    for r in recipients.iter().filter(|r| *r != user) {
                        self.push(r, &frame);
                    }
                }
                Ephemeral::Presence {
                    node,
                    user,
                    online,
                    at_ms,
                } => {
                    let local = self.has_session(user);
                    let change = self.presence.announce(*node, user, *online, *at_ms, local);
                    self.push_changes(change);
                }
                Ephemeral::Online { node, users } => self.announce_online(*node, users),
                Ephemeral::Roster {
                    node,
                    round,
                    part,
                    parts,
                    users,
                } => {
                    self.announce_online(*node, users);
                    self.presence.roster_part(*node, *round, *part, *parts);
                }
            }
        }
    }

    /// `users` have a session on `node` (an announcement or a roster part).
    fn announce_online(&self, node: NodeId, users: &[String]) {
        for u in users {
            let local = self.has_session(u);
            let change = self.presence.announce(node, u, true, 0, local);
            self.push_changes(change);
        }
    }

    /// Takes a send token of `user`; false when the bucket is empty.
    fn take_send_token(&self, user: &str) -> bool {
        self.buckets.take(user)
    }
}

/// Applied events of the local replicas → delivery. Only a group's leader sends a batch to
/// the other nodes and delivers it here; followers drop theirs (the leader's copy reaches
/// them), so each batch is delivered once per node.
pub async fn run_delivery(node: Weak<Node>, mut rx: mpsc::Receiver<(u64, Vec<ChatEvent>)>) {
    while let Some((group, events)) = rx.recv().await {
        let Some(n) = node.upgrade() else { return };
        let leads = n.registry.leads(group);
        if !leads {
            continue;
        }
        n.gateway.deliver_local(&events);
        if let Some(notifier) = n.gateway.notifier.get() {
            for e in &events {
                let ChatEvent::Message {
                    message,
                    recipients,
                } = e
                else {
                    continue;
                };
                // An E2E message's text is ciphertext: its notification says who, not what.
                let e2e = message.kind == chatd_chat::e2e::MlsKind::Application.entry_kind();
                if message.kind != "text" && !e2e {
                    continue;
                }
                for r in recipients.iter().filter(|r| **r != message.sender) {
                    if !n.is_online(r) {
                        notifier.enqueue(crate::notify::Offline {
                            user: r.clone(),
                            sender: message.sender.clone(),
                            chat: message.chat.clone(),
                            text: if e2e {
                                "(encrypted message)".into()
                            } else {
                                message.text.clone()
                            },
                        });
                    }
                }
            }
        }
        let peers = n.peers_except_self();
        let skip = n.gateway.skippable_peers(&events, &peers);
        if skip.is_empty() {
            n.broadcast(crate::node::NodeRequest::Deliver { events });
        } else {
            n.gateway
                .metrics
                .deliveries_skipped
                .fetch_add(skip.len() as u64, Ordering::Relaxed);
            let to = peers.difference(&skip).copied().collect();
            n.broadcast_to(crate::node::NodeRequest::Deliver { events }, &to);
        }
    }
}

impl Gateway {
    /// The peers a delivery batch need not go to: this node knows their whole roster and
    /// none of the batch's recipients has a session there. A join or leave goes everywhere
    /// (every node's cached chat members for typing must see it).
    fn skippable_peers(&self, events: &[ChatEvent], peers: &HashSet<NodeId>) -> HashSet<NodeId> {
        let membership_change = events.iter().any(|e| {
            matches!(e, ChatEvent::Message { message, .. }
                if message.kind == "join" || message.kind == "leave")
        });
        if membership_change {
            return HashSet::new();
        }
        let known: HashSet<NodeId> = peers
            .iter()
            .copied()
            .filter(|p| self.presence.knows_roster_of(*p))
            .collect();
        if known.is_empty() {
            return known;
        }
        let recipients: HashSet<&str> = events
            .iter()
            .flat_map(|e| match e {
                ChatEvent::Message { recipients, .. }
                | ChatEvent::Updated { recipients, .. }
                | ChatEvent::Receipt { recipients, .. } => recipients.iter(),
            })
            .map(String::as_str)
            .collect();
        let holders = self.presence.holders(recipients);
        known.into_iter().filter(|p| !holders.contains(p)).collect()
    }
}

/// Sends this node's roster (every user with a session here, in parts) every heartbeat,
/// when a peer comes back or restarts, and when an announcement failed; forgets the roster
/// of a peer found dead or restarted (deliveries go to it until its next whole round);
/// expires silent nodes' users.
pub async fn run_presence(node: Weak<Node>) {
    let (interval, mut lives, roster_now) = {
        let Some(n) = node.upgrade() else { return };
        (
            Duration::from_millis(n.gateway.config.heartbeat_interval_ms.max(10)),
            n.registry.liveness().watch(),
            n.gateway.roster_now.clone(),
        )
    };
    let mut tick = tokio::time::interval(interval);
    let mut round: u64 = 0;
    let mut last: HashMap<NodeId, chatd_raftlog::PeerLife> = HashMap::new();
    // A round some live peer did not take is sent again after this.
    let mut retry: Option<tokio::time::Instant> = None;
    loop {
        // (heartbeat, asked for a roster now)
        let (heartbeat, asked) = tokio::select! {
            _ = tick.tick() => (true, false),
            () = async {
                match retry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => (false, true),
            changed = lives.changed() => {
                if changed.is_err() {
                    return;
                }
                (false, false)
            }
            () = roster_now.notified() => (false, true),
        };
        let Some(n) = node.upgrade() else { return };
        let now = n.registry.liveness().snapshot();
        let mut send = heartbeat || asked;
        for (peer, life) in &now {
            let before = last.get(peer);
            let restarted = before
                .and_then(|b| b.incarnation)
                .is_some_and(|i| life.incarnation.is_some_and(|n| n != i));
            if (before.is_some_and(|b| b.alive) && !life.alive) || restarted {
                n.gateway.presence.forget_roster_of(*peer);
            }
            if life.alive && (!before.is_some_and(|b| b.alive) || restarted) {
                send = true;
            }
        }
        last = now;
        if send {
            round += 1;
            let users = n.gateway.online_users();
            let parts: Vec<&[String]> = if users.is_empty() {
                vec![&[]]
            } else {
                users.chunks(PRESENCE_ANNOUNCE_USERS_MAX).collect()
            };
            let count = parts.len() as u32;
            let mut taken = true;
            for (i, chunk) in parts.into_iter().enumerate() {
                let part = crate::node::NodeRequest::Ephemeral {
                    items: vec![Ephemeral::Roster {
                        node: n.id,
                        round,
                        part: i as u32,
                        parts: count,
                        users: chunk.to_vec(),
                    }],
                };
                taken &= n
                    .broadcast_confirmed(part, Duration::from_millis(SESSION_ANNOUNCE_TIMEOUT_MS))
                    .await;
            }
            retry = (!taken)
                .then(|| tokio::time::Instant::now() + Duration::from_millis(ROSTER_RETRY_MS));
        }
        if heartbeat {
            n.gateway.expire_presence();
        }
    }
}

/// A roster round that some live peer did not take is sent again this much later.
pub const ROSTER_RETRY_MS: u64 = 1_000;

/// Users in one presence announcement.
pub const PRESENCE_ANNOUNCE_USERS_MAX: usize = 4096;

/// Batches receipts and proposes them per partition (bounds: `crate::receipts`).
pub async fn run_receipts(node: Weak<Node>) {
    let (rx, partitions) = {
        let Some(n) = node.upgrade() else { return };
        let taken = n
            .gateway
            .receipts_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        (taken, n.partitions())
    };
    let Some(rx) = rx else { return };
    crate::receipts::run_batcher(
        rx,
        move |chat| chatd_membership::partition_of(chat.as_bytes(), partitions),
        move |group, updates| {
            let node = node.clone();
            async move {
                let Some(n) = node.upgrade() else { return };
                let cmd = match chatd_codec::encode(&ChatCommand::Receipts(updates)) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot encode receipts");
                        return;
                    }
                };
                if let Err(e) = n.propose(group, cmd).await {
                    tracing::debug!(group, error = %e, "receipts not written");
                }
            }
        },
    )
    .await;
}

/// Tells a connection refused because the node is full why (an `error` frame and close
/// 4013), then drops it.
pub async fn refuse_full(socket: WebSocket, max: usize) {
    let (mut sink, _stream) = socket.split();
    let frame = err(
        None,
        code::SERVER_FULL,
        format!("this node holds its maximum of {max} sessions: connect to another node"),
    );
    if let Ok(text) = serde_json::to_string(&frame) {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = sink.send(Message::Text(text.into())).await;
            let _ = close_with(&mut sink, close::SERVER_FULL, "server full").await;
        })
        .await;
    }
}

/// Serves one WebSocket connection; `header_token` came in the Authorization header.
pub async fn serve(node: Arc<Node>, socket: WebSocket, header_token: Option<String>) {
    let (mut sink, mut stream) = socket.split();
    let gw = &node.gateway;
    let cfg = gw.config.clone();
    // Authenticate: header, or the first frame.
    let token = match header_token {
        Some(t) => Some(t),
        None => {
            let first =
                tokio::time::timeout(Duration::from_millis(cfg.auth_timeout_ms), stream.next())
                    .await;
            match first {
                Err(_) => {
                    let _ =
                        close_with(&mut sink, close::AUTH_TIMEOUT, "no auth frame in time").await;
                    return;
                }
                Ok(Some(Ok(Message::Text(t)))) => match chatd_proto::parse_client_frame(&t) {
                    Ok(ClientFrame::Auth { token }) => Some(token),
                    _ => None,
                },
                _ => None,
            }
        }
    };
    let token_sha256 = token.as_deref().map(crate::auth::sha256_hex);
    let user = match token_sha256.as_deref() {
        Some(t) => node.user_by_token_caught_up(t).await,
        None => None,
    };
    let Some(user) = user else {
        let _ = send_frame(
            &mut sink,
            &err(None, code::UNAUTHORIZED, "unknown or disabled token"),
        )
        .await;
        let _ = close_with(&mut sink, close::UNAUTHORIZED, "unauthorized").await;
        return;
    };
    // Register the session (bounded per user).
    let (tx, mut rx) = mpsc::channel::<Outbound>(cfg.outbound_queue_frames_max.max(1));
    let (closer, mut closed) = watch::channel::<Option<(u16, String)>>(None);
    let session_id = gw.next_session.fetch_add(1, Ordering::Relaxed);
    // `ready` is queued before the session can receive any push, so it is always first.
    let _ = tx.try_send(Outbound::Frame(OutFrame::new(ServerFrame::Ready {
        user: user.clone(),
        session: format!("{}-{session_id}", node.id),
    })));
    let (registered, first_here) = match gw.sessions.insert_bounded(
        &user,
        cfg.sessions_per_user_max,
        SessionHandle {
            id: session_id,
            tx: tx.clone(),
            closer: closer.clone(),
        },
    ) {
        Ok(first) => (true, first),
        Err(_) => (false, false),
    };
    {
        if !registered {
            let _ = send_frame(
                &mut sink,
                &err(
                    None,
                    code::FORBIDDEN,
                    format!("{user} already has {} sessions", cfg.sessions_per_user_max),
                ),
            )
            .await;
            let _ = close_with(&mut sink, close::TOO_MANY_SESSIONS, "too many sessions").await;
            return;
        }
    }
    // A revocation applied between the token lookup and the registration found no session
    // to close: look again now that the session is registered (the hook runs after the
    // in-memory view changes, so one of the two sees it).
    if !token_sha256
        .as_deref()
        .is_some_and(|t| node.meta.token_valid(&user, t))
    {
        let _ = closer.send(Some((close::REVOKED, REVOKED_REASON.into())));
    }
    gw.metrics.connections.fetch_add(1, Ordering::Relaxed);
    if first_here {
        let change = gw.presence.local_change(&user, false, true, now_ms());
        gw.push_changes(change);
        // Every peer takes it (in order after anything queued before, such as this user's
        // going offline a moment ago) before the session serves its first sync: a leader
        // that sends deliveries only where recipients have sessions then includes this node.
        let announced = node
            .broadcast_confirmed(
                crate::node::NodeRequest::Ephemeral {
                    items: vec![Ephemeral::Presence {
                        node: node.id,
                        user: user.clone(),
                        online: true,
                        at_ms: now_ms(),
                    }],
                },
                Duration::from_millis(SESSION_ANNOUNCE_TIMEOUT_MS),
            )
            .await;
        if !announced {
            gw.roster_now.notify_one();
        }
    }
    // Writer: frames in queue order; closes on request. A write never outlives a close
    // request: a client that stopped reading cannot hold the writer.
    let mut closed_for_reader = closer.subscribe();
    let writer = tokio::spawn(async move {
        let mut last_seq: HashMap<String, u64> = HashMap::new();
        loop {
            tokio::select! {
                biased;
                _ = closed.changed() => {
                    close_as_asked(&mut sink, &closed).await;
                    return;
                }
                next = rx.recv() => {
                    let Some(Outbound::Frame(frame)) = next else {
                        let _ = sink.close().await;
                        return;
                    };
                    // Whatever else is queued goes out in the same write (one syscall and
                    // one TCP segment for many small frames under load).
                    let mut batch = vec![frame];
                    while batch.len() < WRITE_BATCH_FRAMES_MAX {
                        match rx.try_recv() {
                            Ok(Outbound::Frame(f)) => batch.push(f),
                            Err(_) => break,
                        }
                    }
                    // Per connection, a chat's messages go out once each, in seq order.
                    batch.retain(|frame| {
                        let ServerFrame::Message { message } = &frame.frame else {
                            return true;
                        };
                        let last = last_seq.entry(message.chat.clone()).or_insert(0);
                        if message.seq <= *last {
                            return false;
                        }
                        *last = message.seq;
                        true
                    });
                    if batch.is_empty() {
                        continue;
                    }
                    tokio::select! {
                        r = send_frames(&mut sink, &batch) => {
                            if r.is_err() {
                                return;
                            }
                        }
                        _ = closed.changed() => {
                            close_as_asked(&mut sink, &closed).await;
                            return;
                        }
                    }
                }
            }
        }
    });

    // Reader: parse, bound, dispatch.
    let in_flight = Arc::new(Semaphore::new(cfg.requests_in_flight_max.max(1)));
    let idle = Duration::from_millis(cfg.presence_ttl_ms);
    // Owned by this reader: typing frames over the rate are dropped here, before any work.
    let mut typing = TypingLimiter::new(Duration::from_millis(cfg.typing_interval_ms));
    let receipt_budget = ReceiptQueue::session_budget();
    loop {
        let next = tokio::select! {
            _ = closed_for_reader.changed() => break,
            next = tokio::time::timeout(idle, stream.next()) => next,
        };
        let msg = match next {
            Err(_) => {
                let _ = closer.send(Some((close::IDLE, "no heartbeat within the TTL".into())));
                break;
            }
            Ok(None) | Ok(Some(Err(_))) => {
                // Includes invalid UTF-8 and oversized frames rejected by the codec.
                let _ = closer.send(Some((close::BAD_FRAME, "unreadable frame".into())));
                break;
            }
            Ok(Some(Ok(m))) => m,
        };
        let text = match msg {
            Message::Text(t) => t,
            Message::Binary(_) => {
                let _ = closer.send(Some((
                    close::BAD_FRAME,
                    "binary frames are not accepted".into(),
                )));
                break;
            }
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        gw.metrics.frames_in.fetch_add(1, Ordering::Relaxed);
        if text.len() > chatd_proto::FRAME_BYTES_MAX {
            // Refused, nothing read from it; the connection stays usable. (Frames over twice
            // the bound are refused by the WebSocket codec and close the connection: 4009.)
            if tx
                .try_send(Outbound::Frame(OutFrame::new(err(
                    None,
                    code::TOO_LARGE,
                    format!(
                        "frame of {} bytes exceeds {}",
                        text.len(),
                        chatd_proto::FRAME_BYTES_MAX
                    ),
                ))))
                .is_err()
            {
                let _ = closer.send(Some((close::SLOW_CONSUMER, "outbound queue full".into())));
                break;
            }
            continue;
        }
        let frame = match chatd_proto::parse_client_frame(&text) {
            Ok(f) => f,
            Err((c, m)) => {
                if tx
                    .try_send(Outbound::Frame(OutFrame::new(err(
                        chatd_proto::request_id_of(&text),
                        c,
                        m,
                    ))))
                    .is_err()
                {
                    let _ = closer.send(Some((close::SLOW_CONSUMER, "outbound queue full".into())));
                    break;
                }
                continue;
            }
        };
        if let ClientFrame::Typing { chat } = &frame {
            // Invalid chat ids go on to be refused with an error.
            if valid_id(chat, chatd_proto::CHAT_ID_BYTES_MAX) && !typing.allow(chat, Instant::now())
            {
                continue;
            }
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        // The answer's slot in the outbound queue is taken before the request is served, so
        // an answer always fits: a client that pipelines many requests is slowed (reading
        // waits), never closed for its own answers; only pushes can overflow the queue.
        let slot = tokio::select! {
            _ = closed_for_reader.changed() => break,
            r = tokio::time::timeout(
                Duration::from_millis(ANSWER_SLOT_WAIT_MS),
                tx.clone().reserve_owned(),
            ) => match r {
                Ok(Ok(slot)) => slot,
                Ok(Err(_)) => break,
                Err(_) => {
                    // Nothing was read off the queue for that long: not a slow reader, one
                    // that stopped reading.
                    let _ = closer.send(Some((
                        close::SLOW_CONSUMER,
                        "outbound queue full: reconnect and sync".into(),
                    )));
                    break;
                }
            },
        };
        let (node, user, receipts) = (node.clone(), user.clone(), receipt_budget.clone());
        tokio::spawn(async move {
            if let Some(reply) = handle(&node, &user, frame, &receipts).await {
                slot.send(Outbound::Frame(OutFrame::new(reply)));
            }
            drop(permit);
        });
    }
    // Unregister.
    let still_here = gw.sessions.remove(&user, |s| s.id == session_id);
    if !still_here {
        let now = now_ms();
        gw.presence.unsubscribe_all(&user);
        let change = gw.presence.local_change(&user, true, false, now);
        gw.push_changes(change);
        node.broadcast_ephemeral(vec![Ephemeral::Presence {
            node: node.id,
            user: user.clone(),
            online: false,
            at_ms: now,
        }]);
    }
    gw.metrics.connections.fetch_sub(1, Ordering::Relaxed);
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}

fn frame_text(frame: &ServerFrame) -> String {
    serde_json::to_string(frame).unwrap_or_else(|e| {
        format!(r#"{{"type":"error","code":"internal","message":"encode: {e}"}}"#)
    })
}

async fn send_frame(
    sink: &mut futures::stream::SplitSink<WebSocket, Message>,
    frame: &ServerFrame,
) -> Result<(), axum::Error> {
    sink.send(Message::Text(frame_text(frame).into())).await
}

/// Writes `frames` and flushes once.
async fn send_frames(
    sink: &mut futures::stream::SplitSink<WebSocket, Message>,
    frames: &[Arc<OutFrame>],
) -> Result<(), axum::Error> {
    for frame in frames {
        sink.feed(Message::Text(frame.text())).await?;
    }
    sink.flush().await
}

/// Sends the close frame the session was asked to close with, if any (bounded wait).
async fn close_as_asked(
    sink: &mut futures::stream::SplitSink<WebSocket, Message>,
    closed: &watch::Receiver<Option<(u16, String)>>,
) {
    let reason = closed.borrow().clone();
    if let Some((c, why)) = reason {
        let _ = tokio::time::timeout(
            Duration::from_millis(CLOSE_WRITE_TIMEOUT_MS),
            close_with(sink, c, &why),
        )
        .await;
    }
}

async fn close_with(
    sink: &mut futures::stream::SplitSink<WebSocket, Message>,
    code: u16,
    reason: &str,
) -> Result<(), axum::Error> {
    sink.send(Message::Close(Some(CloseFrame {
        code,
        reason: reason.to_string().into(),
    })))
    .await
}
