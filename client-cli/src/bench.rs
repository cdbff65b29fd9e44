//! `chat-cli bench`: a load generator for a chatd cluster that also checks delivery.
//!
//! The bench creates its own users (one per WebSocket connection, ids under a prefix unique
//! to the run), spreads the connections round-robin over the nodes, makes the chats (direct
//! chats between two connections, or groups whose members sit on different connections),
//! then sends text messages open-loop at `--rate` (or as fast as `--in-flight` allows) and
//! measures, on the client's clock:
//!
//! * send → ack: from writing the `send` frame to reading its `ack`;
//! * send → deliver: from writing the `send` frame to reading the `message` push at each
//!   member connection (the sender's own connection included). Every text carries a tag
//!   `b<connection>.<n>` that names its send, so the bench finds the send time.
//!
//! After the load it waits (up to `--drain` seconds) for outstanding acks and deliveries,
//! then [`verify`]s everything it saw: each acknowledged entry reached every member
//! connection exactly once, in increasing seq order per chat and connection; the seqs of a
//! chat are gapless across acks (no seq acknowledged twice); nothing unexpected arrived.
//! Entries a connection did not receive live are looked up with `history`: found there,
//! they are reported as "recovered via history" (still a live-delivery miss); not found,
//! as lost. Any anomaly makes the command fail (exit 1) after printing the report.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use reqwest::Url;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

mod report;
mod verify;

pub use verify::{
    parse_tag, plan_chats, tag, verify, Anomaly, AnomalyKind, ChatSpec, Entry, Missing, Observed,
    SendOutcome, SentMsg, Verdict,
};

use report::{latency_svg, summarize, Report};
use verify::describe;

use crate::client::{server_url, CliError};
use crate::Cli;

/// Largest text the server accepts by default (`text_bytes_max`).
const TEXT_BYTES_MAX: usize = 16 * 1024;
/// How often a connection sends a JSON `ping` (the server closes after 60 s of silence).
const PING_EVERY: Duration = Duration::from_secs(20);
/// Most `history` requests made to classify live-delivery misses.
const HISTORY_BUDGET: usize = 10_000;
/// After the load, with every send answered, how long without a new delivery ends the
/// wait for missing ones.
const DRAIN_QUIET: Duration = Duration::from_secs(3);

/// Options of `chat-cli bench`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// Nodes to spread the connections over, comma-separated host:port or URLs
    /// [default: --server].
    #[arg(long, value_delimiter = ',', value_name = "HOST:PORT,...")]
    pub nodes: Vec<String>,
    /// WebSocket connections, each as its own user created by the bench.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub connections: u32,
    /// Chats to send to (messages go round-robin over them).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub chats: u32,
    /// Members per chat: 1 = direct chats between two connections; G ≥ 2 = groups of G
    /// connections.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub group_size: u32,
    /// Members of each chat that send, in join order (the creator first); 0 = every member.
    /// `--connections 2 --chats 1 --senders 1` puts all the load on one connection.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=256))]
    pub senders: u32,
    /// Messages per second over all chats, open loop; 0 = as fast as --in-flight allows.
    #[arg(long, default_value_t = 100.0, value_parser = non_negative)]
    pub rate: f64,
    /// Most sends awaiting their ack at any time, over all connections.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub in_flight: u32,
    /// Bytes of text per message (at least the bench's tag, ~10 bytes; at most 16384).
    #[arg(long, default_value_t = 256, value_name = "BYTES")]
    pub size: usize,
    /// Seconds of measured load.
    #[arg(long, default_value_t = 10.0, value_name = "SECS", value_parser = positive)]
    pub duration: f64,
    /// Seconds of load before measuring starts (sent, verified, not measured).
    #[arg(long, default_value_t = 1.0, value_name = "SECS", value_parser = non_negative)]
    pub warmup: f64,
    /// Longest wait after the load for outstanding acks and deliveries, in seconds.
    #[arg(long, default_value_t = 10.0, value_name = "SECS", value_parser = non_negative)]
    pub drain: f64,
    /// Write a plot of p50/p99 send→ack and send→deliver latency per second (SVG).
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
}

fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number ≥ 0")),
    }
}

fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number > 0")),
    }
}

fn failed(msg: impl Into<String>) -> CliError {
    CliError::Failed(msg.into())
}

/// An error with its causes: "a: b: c" (a cause already contained in the text is skipped).
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let part = c.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cur = c.source();
    }
    text
}

// ---------------------------------------------------------------------------------------
// Run-time state.
// ---------------------------------------------------------------------------------------

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Clone, Copy, Debug)]
enum SendState {
    Pending,
    Acked(u64),
    Refused,
    Unknown,
}

#[derive(Clone, Copy, Debug)]
struct SendRec {
    chat: u32,
    sent: Instant,
    /// Seconds since the start of measurement; `None` during warm-up.
    second: Option<u32>,
    state: SendState,
}

#[derive(Debug)]
struct Obs {
    /// Interned chat index.
    chat: u32,
    seq: u64,
    entry: Entry,
}

#[derive(Default)]
struct ConnData {
    /// Records pushes for verification (false for the temporary connections of `history`).
    record: bool,
    sends: Vec<SendRec>,
    observed: Vec<Obs>,
    waiters: HashMap<String, oneshot::Sender<Value>>,
    next_req: u64,
    closed: Option<String>,
}

struct Hists {
    ack: Histogram<u64>,
    deliver: Histogram<u64>,
}

impl Hists {
    /// Microsecond histograms (1 µs to 1 h; fixed bounds, since `saturating_record` does
    /// not grow an auto-resizing histogram) with `sigfig` (2 or 3) significant figures.
    #[allow(clippy::expect_used)]
    fn new(sigfig: u8) -> Hists {
        let h = || {
            Histogram::new_with_bounds(1, 3_600_000_000, sigfig)
                .expect("1 µs to 1 h with 2 or 3 significant figures is valid")
        };
        Hists {
            ack: h(),
            deliver: h(),
        }
    }
}

#[derive(Default)]
struct Stats {
    sent: u64,
    acked: u64,
    answered: u64,
    delivered: u64,
    expected_deliveries: u64,
    errors: BTreeMap<String, u64>,
    measured_sent: u64,
    measured_acked: u64,
    measured_delivered: u64,
    duplicate_acks: u64,
    updated_pushes: u64,
}

struct Shared {
    conns: Vec<ConnData>,
    /// Chat id → interned index (every chat seen, ours or not).
    interned: HashMap<String, u32>,
    /// Interned index → chat index of the plan, for the bench's chats.
    plan_of: HashMap<u32, usize>,
    /// Members per planned chat.
    members: Vec<u32>,
    stats: Stats,
    total: Hists,
    per_second: Vec<Hists>,
    /// Set when the results are taken: later closes are not errors.
    finished: bool,
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

impl Shared {
    fn intern(&mut self, chat: &str) -> u32 {
        if let Some(&i) = self.interned.get(chat) {
            return i;
        }
        let i = u32::try_from(self.interned.len()).unwrap_or(u32::MAX);
        self.interned.insert(chat.to_string(), i);
        i
    }

    fn error(&mut self, code: &str) {
        *self.stats.errors.entry(code.to_string()).or_insert(0) += 1;
    }

    fn second(&mut self, s: u32) -> &mut Hists {
        let s = s as usize;
        while self.per_second.len() <= s {
            self.per_second.push(Hists::new(2));
        }
        &mut self.per_second[s]
    }

    fn on_ack(
        &mut self,
        conn: usize,
        n: usize,
        seq: u64,
        duplicate: bool,
        now: Instant,
        sem: &Semaphore,
    ) {
        let Some(rec) = self.conns[conn].sends.get_mut(n) else {
            self.error("unmatched_ack");
            return;
        };
        if !matches!(rec.state, SendState::Pending) {
            self.error("late_answer");
            return;
        }
        rec.state = SendState::Acked(seq);
        let rec = *rec;
        sem.add_permits(1);
        self.stats.acked += 1;
        self.stats.answered += 1;
        self.stats.expected_deliveries +=
            u64::from(self.members.get(rec.chat as usize).copied().unwrap_or(0));
        if duplicate {
            self.stats.duplicate_acks += 1;
        }
        if let Some(s) = rec.second {
            let us = micros(now - rec.sent);
            self.stats.measured_acked += 1;
            self.total.ack.saturating_record(us);
            self.second(s).ack.saturating_record(us);
        }
    }

    fn on_send_error(&mut self, conn: usize, n: usize, code: &str, sem: &Semaphore) {
        self.error(code);
        let Some(rec) = self.conns[conn].sends.get_mut(n) else {
            return;
        };
        if !matches!(rec.state, SendState::Pending) {
            return;
        }
        // Codes after which the server may have written the message.
        rec.state = if matches!(code, "outcome_unknown" | "internal") {
            SendState::Unknown
        } else {
            SendState::Refused
        };
        sem.add_permits(1);
        self.stats.answered += 1;
    }

    fn on_message(&mut self, conn: usize, m: MsgView, now: Instant) {
        let chat = self.intern(&m.chat);
        let entry = match m.kind.as_str() {
            "text" => match parse_tag(&m.text) {
                Some((c, n)) => Entry::Text { conn: c, n },
                None => Entry::Other("a text without the bench's tag".into()),
            },
            "join" => Entry::Join,
            k => Entry::Other(format!("a {k} entry")),
        };
        if let Entry::Text { conn: c, n } = entry {
            let rec = self.conns.get(c).and_then(|d| d.sends.get(n)).copied();
            if let Some(rec) = rec {
                self.stats.delivered += 1;
                if let Some(s) = rec.second {
                    let us = micros(now - rec.sent);
                    self.stats.measured_delivered += 1;
                    self.total.deliver.saturating_record(us);
                    self.second(s).deliver.saturating_record(us);
                }
            }
        }
        let data = &mut self.conns[conn];
        if data.record {
            data.observed.push(Obs {
                chat,
                seq: m.seq,
                entry,
            });
        }
    }

    fn on_closed(&mut self, conn: usize, why: String, sem: &Semaphore) {
        let finished = self.finished;
        let data = &mut self.conns[conn];
        data.waiters.clear();
        let mut released = 0usize;
        for rec in &mut data.sends {
            if matches!(rec.state, SendState::Pending) {
                rec.state = SendState::Unknown;
                released += 1;
            }
        }
        let record = data.record;
        data.closed = Some(why);
        sem.add_permits(released);
        self.stats.answered += released as u64;
        if !finished && record {
            self.error("connection_closed");
        }
    }
}

#[derive(Deserialize)]
struct MsgView {
    chat: String,
    seq: u64,
    kind: String,
    #[serde(default)]
    text: String,
}

#[derive(Deserialize)]
struct MsgFrame {
    message: MsgView,
}

#[derive(Deserialize)]
struct AckFrame {
    id: String,
    seq: u64,
    #[serde(default)]
    duplicate: bool,
}

enum In {
    Message(MsgView),
    Ack(AckFrame),
    Other(Value),
}

/// Parses a server frame; the frequent `message` and `ack` frames without building a
/// `Value` (the server writes `type` first).
fn parse_in(text: &str) -> Option<In> {
    if text.starts_with(r#"{"type":"message""#) {
        if let Ok(f) = serde_json::from_str::<MsgFrame>(text) {
            return Some(In::Message(f.message));
        }
    } else if text.starts_with(r#"{"type":"ack""#) {
        if let Ok(f) = serde_json::from_str::<AckFrame>(text) {
            return Some(In::Ack(f));
        }
    }
    let v: Value = serde_json::from_str(text).ok()?;
    match v.get("type").and_then(Value::as_str) {
        Some("message") => serde_json::from_value(v.get("message")?.clone())
            .ok()
            .map(In::Message),
        Some("ack") => serde_json::from_value(v).ok().map(In::Ack),
        _ => Some(In::Other(v)),
    }
}

/// The send number of a send's request id `s<n>`.
fn send_number(id: &str) -> Option<usize> {
    id.strip_prefix('s')?.parse().ok()
}

fn handle_text(shared: &Mutex<Shared>, conn: usize, sem: &Semaphore, text: &str) {
    let now = Instant::now();
    let Some(frame) = parse_in(text) else {
        lock(shared).error("malformed_frame");
        return;
    };
    let mut s = lock(shared);
    match frame {
        In::Message(m) => s.on_message(conn, m, now),
        In::Ack(a) => match send_number(&a.id) {
            Some(n) => s.on_ack(conn, n, a.seq, a.duplicate, now, sem),
            None => s.error("unmatched_ack"),
        },
        In::Other(v) => {
            let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
            let id = v.get("id").and_then(Value::as_str).map(str::to_owned);
            if kind == "error" {
                let code = v
                    .get("code")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string();
                if let Some(n) = id.as_deref().and_then(send_number) {
                    s.on_send_error(conn, n, &code, sem);
                    return;
                }
            }
            if let Some(waiter) = id.and_then(|id| s.conns[conn].waiters.remove(&id)) {
                let _ = waiter.send(v);
                return;
            }
            match kind {
                "error" => {
                    let code = v.get("code").and_then(Value::as_str).unwrap_or("?");
                    s.error(code);
                }
                "updated" if s.conns[conn].record => s.stats.updated_pushes += 1,
                _ => {} // pong, receipt, presence, typing, ready
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Connections.
// ---------------------------------------------------------------------------------------

struct Conn {
    idx: usize,
    tx: mpsc::UnboundedSender<Message>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// `ws://…/v1/ws` for a node's base URL.
fn ws_url(base: &Url) -> Result<Url, CliError> {
    let mut url = base.join("v1/ws").map_err(|e| CliError::BadServer {
        given: base.to_string(),
        reason: e.to_string(),
    })?;
    let scheme = if base.scheme() == "https" {
        "wss"
    } else {
        "ws"
    };
    url.set_scheme(scheme).map_err(|()| CliError::BadServer {
        given: base.to_string(),
        reason: "cannot make a WebSocket URL of it".into(),
    })?;
    Ok(url)
}

/// Opens a WebSocket with the user's token and waits for `ready`.
async fn open_ws(url: &Url, token: &str, timeout: Duration) -> Result<Ws, CliError> {
    let unreachable = |cause: String| CliError::Unreachable {
        url: url.to_string(),
        cause,
    };
    let mut req = url
        .as_str()
        .into_client_request()
        .map_err(|e| unreachable(e.to_string()))?;
    let auth = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| failed("a user token is not a valid header value"))?;
    req.headers_mut().insert("authorization", auth);
    let (mut ws, _) = tokio::time::timeout(
        timeout,
        tokio_tungstenite::connect_async_with_config(req, None, true),
    )
    .await
    .map_err(|_| unreachable(format!("no WebSocket within {} ms", timeout.as_millis())))?
    .map_err(|e| unreachable(causes(&e)))?;
    let first = tokio::time::timeout(timeout, ws.next())
        .await
        .map_err(|_| {
            failed(format!(
                "{url}: no ready frame within {} ms",
                timeout.as_millis()
            ))
        })?;
    match first {
        Some(Ok(Message::Text(t))) => {
            let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
            if v.get("type").and_then(Value::as_str) == Some("ready") {
                Ok(ws)
            } else {
                Err(failed(format!(
                    "{url}: expected a ready frame, got {}",
                    t.as_str()
                )))
            }
        }
        other => Err(failed(format!(
            "{url}: expected a ready frame, got {other:?}"
        ))),
    }
}

async fn write_loop(mut sink: SplitSink<Ws, Message>, mut rx: mpsc::UnboundedReceiver<Message>) {
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            m = rx.recv() => {
                let Some(m) = m else { break };
                let mut close = matches!(m, Message::Close(_));
                if sink.feed(m).await.is_err() {
                    break;
                }
                let mut batch = 0;
                while batch < 256 && !close {
                    let Ok(m) = rx.try_recv() else { break };
                    close = matches!(m, Message::Close(_));
                    if sink.feed(m).await.is_err() {
                        return;
                    }
                    batch += 1;
                }
                if sink.flush().await.is_err() || close {
                    break;
                }
            }
            _ = ping.tick() => {
                if sink.send(Message::text(r#"{"type":"ping","id":"p"}"#)).await.is_err() {
                    break;
                }
            }
        }
    }
}

async fn read_loop(
    mut stream: SplitStream<Ws>,
    shared: Arc<Mutex<Shared>>,
    conn: usize,
    sem: Arc<Semaphore>,
) {
    let why = loop {
        match stream.next().await {
            Some(Ok(Message::Text(t))) => handle_text(&shared, conn, &sem, t.as_str()),
            Some(Ok(Message::Close(f))) => {
                break match f {
                    Some(f) => format!(
                        "closed by the server ({} {})",
                        u16::from(f.code),
                        f.reason.as_str()
                    ),
                    None => "closed by the server".to_string(),
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => break format!("connection error: {e}"),
            None => break "connection ended".to_string(),
        }
    };
    lock(&shared).on_closed(conn, why, &sem);
}

/// Starts the reader and writer of an open WebSocket as connection slot `idx`.
fn start_conn(ws: Ws, idx: usize, shared: &Arc<Mutex<Shared>>, sem: &Arc<Semaphore>) -> Conn {
    let (sink, stream) = ws.split();
    // Unbounded in type, bounded in use: a send is queued only with a permit of the
    // in-flight semaphore (--in-flight over all connections), setup requests one at a
    // time, and one close at the end.
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_loop(sink, rx));
    let reader = tokio::spawn(read_loop(stream, shared.clone(), idx, sem.clone()));
    Conn {
        idx,
        tx,
        tasks: vec![reader, writer],
    }
}

/// Sends a request on a connection and waits for the answer with its id. An `error`
/// answer is an `Err` with its code and message.
async fn request(
    shared: &Mutex<Shared>,
    conn: &Conn,
    mut frame: Value,
    timeout: Duration,
) -> Result<Value, String> {
    let (tx, rx) = oneshot::channel();
    let id = {
        let mut s = lock(shared);
        let data = &mut s.conns[conn.idx];
        if let Some(why) = &data.closed {
            return Err(why.clone());
        }
        data.next_req += 1;
        let id = format!("r{}", data.next_req);
        data.waiters.insert(id.clone(), tx);
        id
    };
    frame["id"] = Value::String(id.clone());
    if conn.tx.send(Message::text(frame.to_string())).is_err() {
        return Err("connection closed".into());
    }
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(v)) => {
            if v.get("type").and_then(Value::as_str) == Some("error") {
                let code = v.get("code").and_then(Value::as_str).unwrap_or("?");
                let msg = v.get("message").and_then(Value::as_str).unwrap_or("");
                Err(format!("{code}: {msg}"))
            } else {
                Ok(v)
            }
        }
        Ok(Err(_)) => Err("connection closed".into()),
        Err(_) => {
            lock(shared).conns[conn.idx].waiters.remove(&id);
            Err(format!("no answer within {} ms", timeout.as_millis()))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Users.
// ---------------------------------------------------------------------------------------

/// A user id prefix unique to this run: `b` + time in ms (hex) + process id (hex).
pub(crate) fn unique_prefix() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!(
        "b{:x}{:x}",
        ms & 0xff_ffff_ffff,
        std::process::id() & 0xffff
    )
}

pub(crate) async fn create_user(
    http: &reqwest::Client,
    base: &Url,
    admin: &str,
    user: &str,
) -> Result<String, CliError> {
    let url = base
        .join("v1/admin/users")
        .map_err(|e| CliError::BadServer {
            given: base.to_string(),
            reason: e.to_string(),
        })?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let resp = http
            .post(url.clone())
            .bearer_auth(admin)
            .json(&json!({ "user": user }))
            .send()
            .await
            .map_err(|e| CliError::Unreachable {
                url: url.to_string(),
                cause: if e.is_timeout() {
                    "no answer in time".to_string()
                } else {
                    causes(&e)
                },
            })?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        if status.as_u16() == 201 {
            return v
                .get("token")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| failed(format!("{url}: no token in the answer: {body}")));
        }
        if status.as_u16() == 503 && attempt < 10 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        }
        let what = match (
            v.get("code").and_then(Value::as_str),
            v.get("message").and_then(Value::as_str),
        ) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            _ => body.trim().chars().take(200).collect(),
        };
        if status.as_u16() == 401 {
            return Err(CliError::TokenRefused(format!(
                "{} (the bench creates its users: --token must be the cluster's admin token)",
                crate::client::ADMIN_TOKEN_REFUSED
            )));
        }
        return Err(failed(format!(
            "cannot create bench user {user} at {url}: HTTP {status}: {what}"
        )));
    }
}

// ---------------------------------------------------------------------------------------
// The run.
// ---------------------------------------------------------------------------------------

struct Progress {
    tty: bool,
}

impl Progress {
    fn say(&self, text: &str) {
        if self.tty {
            eprint!("\r\x1b[K");
        }
        eprintln!("bench: {text}");
    }
}

/// Runs `chat-cli bench` and returns the report to print. When the verification finds
/// anomalies (or nothing was acknowledged), the report is printed on stdout here and the
/// error returned (exit 1).
/// The admin token a command that creates its own users (`who`) needs.
pub(crate) fn admin_token(cli: &Cli, who: &str) -> Result<String, CliError> {
    cli.token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| {
            CliError::NoToken(format!(
                "{who} creates its own users: give the admin token with --token (or CHATD_TOKEN)"
            ))
        })
}

pub async fn run(cli: &Cli, args: &BenchArgs) -> Result<String, CliError> {
    let timeout = Duration::from_millis(cli.timeout_ms);
    let admin = admin_token(cli, "the bench")?;
    let node_names: Vec<String> = if args.nodes.is_empty() {
        vec![cli.server.clone()]
    } else {
        args.nodes
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    if node_names.is_empty() {
        return Err(CliError::Usage("--nodes lists no node".to_string()));
    }
    let bases = node_names
        .iter()
        .map(|n| server_url(n))
        .collect::<Result<Vec<_>, _>>()?;
    let ws_urls = bases.iter().map(ws_url).collect::<Result<Vec<_>, _>>()?;
    let n_conns = args.connections as usize;
    let group = args.group_size as usize;
    let plan = plan_chats(n_conns, args.chats as usize, group).map_err(CliError::Usage)?;
    if args.size > TEXT_BYTES_MAX {
        return Err(CliError::Usage(format!(
            "--size is at most {TEXT_BYTES_MAX} bytes (the server's text limit)"
        )));
    }
    let progress = Progress {
        tty: std::io::stderr().is_terminal(),
    };
    let prefix = unique_prefix();

    // Users.
    progress.say(&format!(
        "creating {n_conns} users {prefix}-0…{} on {} node(s)",
        n_conns - 1,
        bases.len()
    ));
    let http = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .build()
        .map_err(|e| failed(format!("cannot set up the HTTP client: {e}")))?;
    let users: Vec<String> = (0..n_conns).map(|i| format!("{prefix}-{i}")).collect();
    let tokens: Vec<String> = futures::stream::iter(users.iter().enumerate())
        .map(|(i, u)| {
            let http = &http;
            let base = &bases[i % bases.len()];
            let admin = &admin;
            async move { create_user(http, base, admin, u).await }
        })
        .buffered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;

    // Connections.
    progress.say(&format!("opening {n_conns} WebSocket connections"));
    let sem = Arc::new(Semaphore::new(args.in_flight as usize));
    let shared = Arc::new(Mutex::new(Shared {
        conns: (0..n_conns)
            .map(|_| ConnData {
                record: true,
                ..ConnData::default()
            })
            .collect(),
        interned: HashMap::new(),
        plan_of: HashMap::new(),
        members: plan.iter().map(|m| m.len() as u32).collect(),
        stats: Stats::default(),
        total: Hists::new(3),
        per_second: Vec::new(),
        finished: false,
    }));
    let streams: Vec<Ws> = futures::stream::iter(0..n_conns)
        .map(|i| {
            let url = &ws_urls[i % ws_urls.len()];
            let token = &tokens[i];
            async move { open_ws(url, token, timeout).await }
        })
        .buffered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let conns: Vec<Conn> = streams
        .into_iter()
        .enumerate()
        .map(|(i, ws)| start_conn(ws, i, &shared, &sem))
        .collect();

    // Chats.
    progress.say(&format!(
        "creating {} {}",
        plan.len(),
        if group <= 1 {
            "direct chats".to_string()
        } else {
            format!("groups of {group}")
        }
    ));
    let created: Vec<(String, u64)> = futures::stream::iter(plan.iter().enumerate())
        .map(|(i, members)| {
            let frame = if group <= 1 {
                json!({"type": "open_direct", "user": users[members[1]]})
            } else {
                let others: Vec<&String> = members[1..].iter().map(|&m| &users[m]).collect();
                json!({"type": "create_group", "name": format!("{prefix} bench {i}"), "members": others})
            };
            let conn = &conns[members[0]];
            let shared = &shared;
            async move {
                let v = request(shared, conn, frame, timeout)
                    .await
                    .map_err(|e| failed(format!("cannot create bench chat {i}: {e}")))?;
                let chat = v.get("chat").and_then(Value::as_str).unwrap_or("").to_string();
                let seq = v.get("seq").and_then(Value::as_u64).unwrap_or(0);
                Ok::<_, CliError>((chat, seq))
            }
        })
        .buffered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let mut specs: Vec<ChatSpec> = Vec::with_capacity(plan.len());
    {
        let mut s = lock(&shared);
        for (i, (id, seq)) in created.iter().enumerate() {
            let interned = s.intern(id);
            s.plan_of.insert(interned, i);
            specs.push(ChatSpec {
                id: id.clone(),
                members: plan[i].clone(),
                joins: if group <= 1 { 0 } else { *seq },
                log_end: None,
            });
        }
    }
    let chat_ids: Vec<String> = specs.iter().map(|c| c.id.clone()).collect();

    // Load.
    let t0 = Instant::now();
    let warmup = Duration::from_secs_f64(args.warmup);
    let measure_start = t0 + warmup;
    let end = measure_start + Duration::from_secs_f64(args.duration);
    progress.say(&format!(
        "sending for {}s{} ({})",
        args.duration,
        if args.warmup > 0.0 {
            format!(" after {}s of warm-up", args.warmup)
        } else {
            String::new()
        },
        if args.rate > 0.0 {
            format!("{} msg/s, at most {} in flight", args.rate, args.in_flight)
        } else {
            format!("as fast as {} in flight allow", args.in_flight)
        }
    ));
    let ticker = tokio::spawn(report_progress(
        shared.clone(),
        progress.tty,
        t0,
        measure_start,
        end,
    ));
    let padding = "x".repeat(args.size);
    let mut driver = Driver {
        shared: &shared,
        conns: &conns,
        plan: &plan,
        chat_ids: &chat_ids,
        next_chat: 0,
        next_member: vec![0; plan.len()],
        senders: args.senders as usize,
        padding: &padding,
        size: args.size,
        measure_start,
    };
    let mut issued: u64 = 0;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if args.rate > 0.0 {
            let due = ((now - t0).as_secs_f64() * args.rate) as u64 + 1;
            if issued >= due {
                let next = t0 + Duration::from_secs_f64(issued as f64 / args.rate);
                tokio::time::sleep_until(next.min(end).into()).await;
                continue;
            }
        }
        match tokio::time::timeout_at(end.into(), sem.acquire()).await {
            Ok(Ok(permit)) => permit.forget(),
            _ => break,
        }
        if driver.issue(&sem) {
            issued += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if issued.is_multiple_of(64) {
            tokio::task::yield_now().await;
        }
    }

    // Drain: until every send is answered and every delivery arrived, the deadline, or
    // (all sends answered) nothing more arriving for a while: a missed push does not come.
    let drain_deadline = Instant::now() + Duration::from_secs_f64(args.drain);
    let mut last_delivered = u64::MAX;
    let mut last_change = Instant::now();
    loop {
        let (answered, delivered, complete) = {
            let s = lock(&shared);
            let st = &s.stats;
            let answered = st.answered >= st.sent;
            (
                answered,
                st.delivered,
                answered && st.delivered >= st.expected_deliveries,
            )
        };
        let now = Instant::now();
        if delivered != last_delivered {
            last_delivered = delivered;
            last_change = now;
        }
        if complete || now >= drain_deadline || (answered && now - last_change >= DRAIN_QUIET) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ticker.abort();
    if progress.tty {
        eprint!("\r\x1b[K");
    }

    // Take the results.
    let (sends, observed, stats, total, per_second, closed) = {
        let mut s = lock(&shared);
        s.finished = true;
        let plan_of = s.plan_of.clone();
        let mut sends: Vec<Vec<SentMsg>> = Vec::with_capacity(n_conns);
        let mut observed: Vec<Vec<Observed>> = Vec::with_capacity(n_conns);
        let mut unanswered = 0u64;
        let mut closed = Vec::new();
        for (i, data) in s.conns.iter_mut().take(n_conns).enumerate() {
            sends.push(
                data.sends
                    .iter()
                    .map(|r| SentMsg {
                        chat: r.chat as usize,
                        outcome: match r.state {
                            SendState::Acked(seq) => SendOutcome::Acked(seq),
                            SendState::Refused => SendOutcome::Refused,
                            SendState::Unknown => SendOutcome::Unknown,
                            SendState::Pending => {
                                unanswered += 1;
                                SendOutcome::Unknown
                            }
                        },
                    })
                    .collect(),
            );
            observed.push(
                std::mem::take(&mut data.observed)
                    .into_iter()
                    .map(|o| Observed {
                        chat: plan_of.get(&o.chat).copied().unwrap_or(usize::MAX),
                        seq: o.seq,
                        entry: o.entry,
                    })
                    .collect(),
            );
            if let Some(why) = &data.closed {
                closed.push(format!("connection {i} ({}): {why}", users[i]));
            }
        }
        if unanswered > 0 {
            *s.stats.errors.entry("no_answer".into()).or_insert(0) += unanswered;
        }
        let stats = std::mem::take(&mut s.stats);
        let total = std::mem::replace(&mut s.total, Hists::new(2));
        let per_second = std::mem::take(&mut s.per_second);
        (sends, observed, stats, total, per_second, closed)
    };

    // Verify.
    progress.say("verifying deliveries");
    let mut helpers: HashMap<usize, Conn> = HashMap::new();
    let mut ctx = HistoryCtx {
        shared: &shared,
        conns: &conns,
        helpers: &mut helpers,
        ws_urls: &ws_urls,
        tokens: &tokens,
        sem: &sem,
        timeout,
        budget: HISTORY_BUDGET,
    };
    for (ci, spec) in specs.iter_mut().enumerate() {
        let creator = plan[ci][0];
        let page = ctx
            .history(creator, &spec.id, json!({"limit": 1}))
            .await
            .map_err(|e| failed(format!("cannot read the end of {}: {e}", spec.id)))?;
        spec.log_end = Some(page.iter().map(|m| m.0).max().unwrap_or(0));
    }
    let mut verdict = verify(&specs, &sends, &observed);
    for _ in 0..stats.updated_pushes {
        let detail = "an updated push (the bench never edits or deletes)".to_string();
        verdict.add(AnomalyKind::Unexpected, usize::MAX, None, 0, detail);
    }
    for _ in 0..stats.duplicate_acks {
        let detail = "an ack marked duplicate for a send made once".to_string();
        verdict.add(AnomalyKind::Unexpected, usize::MAX, None, 0, detail);
    }
    let missing = std::mem::take(&mut verdict.missing);
    let mut misses_by_node: BTreeMap<String, u64> = BTreeMap::new();
    for m in &missing {
        *misses_by_node
            .entry(node_names[m.conn % node_names.len()].clone())
            .or_insert(0) += 1;
    }
    let mut history_requests = 0usize;
    if !missing.is_empty() {
        progress.say(&format!(
            "{} deliveries missed live: looking them up with history",
            missing.len()
        ));
        classify_missing(&mut ctx, &specs, missing, &mut verdict).await;
        history_requests = HISTORY_BUDGET - ctx.budget;
    }

    // Close.
    for c in conns.iter().chain(helpers.values()) {
        let _ = c.tx.send(Message::Close(None));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(helpers);
    drop(conns);

    // Report.
    let ack = summarize(&total.ack);
    let deliver = summarize(&total.deliver);
    let secs = args.duration;
    let report = Report {
        nodes: &node_names,
        args,
        prefix: &prefix,
        members: if group <= 1 { 2 } else { group },
        stats: &stats,
        ack: &ack,
        deliver: &deliver,
        acked_per_sec: stats.measured_acked as f64 / secs,
        delivered_per_sec: stats.measured_delivered as f64 / secs,
        verdict: &verdict,
        specs: &specs,
        closed: &closed,
        history_requests,
        misses_by_node: &misses_by_node,
    };
    if let Some(path) = &args.svg {
        let svg = latency_svg(&per_second, &report);
        std::fs::write(path, svg)
            .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))?;
    }
    let text = if cli.json {
        let mut s = serde_json::to_string_pretty(&report.json()).unwrap_or_default();
        s.push('\n');
        s
    } else {
        report.table()
    };
    let anomalies = verdict.anomalies();
    if anomalies > 0 {
        print!("{text}");
        return Err(failed(format!(
            "verification failed: {anomalies} anomal{} ({})",
            if anomalies == 1 { "y" } else { "ies" },
            report.anomaly_summary()
        )));
    }
    if stats.measured_acked == 0 {
        print!("{text}");
        return Err(failed("no message was acknowledged during the measurement"));
    }
    Ok(text)
}

struct Driver<'a> {
    shared: &'a Mutex<Shared>,
    conns: &'a [Conn],
    plan: &'a [Vec<usize>],
    chat_ids: &'a [String],
    next_chat: usize,
    next_member: Vec<usize>,
    /// Members of each chat that send (`--senders`; 0 = all).
    senders: usize,
    padding: &'a str,
    size: usize,
    measure_start: Instant,
}

impl Driver<'_> {
    /// Sends the next message (the caller holds a permit, released here on failure).
    /// False if the sender's connection is closed.
    fn issue(&mut self, sem: &Semaphore) -> bool {
        let chat = self.next_chat;
        self.next_chat = (self.next_chat + 1) % self.plan.len();
        let members = &self.plan[chat];
        let senders = match self.senders {
            0 => members.len(),
            k => k.min(members.len()),
        };
        let sender = members[self.next_member[chat] % senders];
        self.next_member[chat] += 1;
        let now = Instant::now();
        let n = {
            let mut s = lock(self.shared);
            if s.conns[sender].closed.is_some() {
                drop(s);
                sem.add_permits(1);
                return false;
            }
            let second = now
                .checked_duration_since(self.measure_start)
                .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX));
            let data = &mut s.conns[sender];
            let n = data.sends.len();
            data.sends.push(SendRec {
                chat: chat as u32,
                sent: now,
                second,
                state: SendState::Pending,
            });
            s.stats.sent += 1;
            if second.is_some() {
                s.stats.measured_sent += 1;
            }
            n
        };
        let mut text = tag(sender, n);
        text.push(' ');
        if self.size > text.len() {
            let fill = self.size - text.len();
            text.push_str(&self.padding[..fill]);
        }
        let frame = format!(
            r#"{{"type":"send","id":"s{n}","chat":"{}","client_msg_id":"m{n}","text":"{text}"}}"#,
            self.chat_ids[chat]
        );
        // If the writer is gone, the reader marks the send unknown when it sees the close.
        let _ = self.conns[sender].tx.send(Message::text(frame));
        true
    }
}

/// Width of the progress bar, in cells.
const PROGRESS_BAR_CELLS: usize = 24;

/// `[#######.........]  42%` for `done` in 0..=1.
pub fn progress_bar(done: f64, cells: usize) -> String {
    let done = if done.is_finite() {
        done.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let full = ((done * cells as f64).round() as usize).min(cells);
    format!(
        "[{}{}] {:3.0}%",
        "#".repeat(full),
        ".".repeat(cells - full),
        done * 100.0
    )
}

async fn report_progress(
    shared: Arc<Mutex<Shared>>,
    tty: bool,
    t0: Instant,
    measure_start: Instant,
    end: Instant,
) {
    let every = if tty {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(5)
    };
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    let mut last_acked = 0u64;
    let mut last_at = Instant::now();
    loop {
        tick.tick().await;
        let now = Instant::now();
        let (sent, acked, delivered, errors, rate_limited, in_flight) = {
            let s = lock(&shared);
            let st = &s.stats;
            (
                st.sent,
                st.acked,
                st.delivered,
                st.errors.values().sum::<u64>(),
                st.errors.get("rate_limited").copied().unwrap_or(0),
                st.sent.saturating_sub(st.answered),
            )
        };
        let rate = (acked - last_acked) as f64 / (now - last_at).as_secs_f64().max(1e-3);
        last_acked = acked;
        last_at = now;
        let phase = if now < measure_start {
            "warm-up"
        } else if now < end {
            "measuring"
        } else {
            "draining"
        };
        let done = ((now - t0).as_secs_f64() / (end - t0).as_secs_f64().max(1e-3)).min(1.0);
        let bar = progress_bar(done, PROGRESS_BAR_CELLS);
        let line = format!(
            "{bar} {:5.1}s {phase:9} sent {sent}  acked {acked}  delivered {delivered}  errors {errors} (rate_limited {rate_limited})  {rate:.0} acks/s  in flight {in_flight}",
            (now - t0).as_secs_f64()
        );
        if tty {
            eprint!("\r\x1b[K{line}");
        } else {
            eprintln!("bench: {line}");
        }
    }
}

struct HistoryCtx<'a> {
    shared: &'a Arc<Mutex<Shared>>,
    conns: &'a [Conn],
    helpers: &'a mut HashMap<usize, Conn>,
    ws_urls: &'a [Url],
    tokens: &'a [String],
    sem: &'a Arc<Semaphore>,
    timeout: Duration,
    budget: usize,
}

impl HistoryCtx<'_> {
    /// A `history` page of `chat` as connection `conn`'s user sees it: (seq, entry) pairs.
    /// Uses the live connection, or a new one if it closed.
    async fn history(
        &mut self,
        conn: usize,
        chat: &str,
        params: Value,
    ) -> Result<Vec<(u64, Entry)>, String> {
        let mut frame = json!({"type": "history", "chat": chat});
        if let (Some(f), Some(p)) = (frame.as_object_mut(), params.as_object()) {
            for (k, v) in p {
                f.insert(k.clone(), v.clone());
            }
        }
        let alive = lock(self.shared).conns[conn].closed.is_none();
        let answer = if alive {
            request(self.shared, &self.conns[conn], frame, self.timeout).await?
        } else {
            if !self.helpers.contains_key(&conn) {
                let ws = open_ws(
                    &self.ws_urls[conn % self.ws_urls.len()],
                    &self.tokens[conn],
                    self.timeout,
                )
                .await
                .map_err(|e| e.to_string())?;
                let idx = {
                    let mut s = lock(self.shared);
                    s.conns.push(ConnData::default());
                    s.conns.len() - 1
                };
                self.helpers
                    .insert(conn, start_conn(ws, idx, self.shared, self.sem));
            }
            let helper = self
                .helpers
                .get(&conn)
                .ok_or_else(|| "no helper connection".to_string())?;
            request(self.shared, helper, frame, self.timeout).await?
        };
        let messages = answer
            .get("messages")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        Ok(messages
            .into_iter()
            .filter_map(|m| {
                let m: MsgView = serde_json::from_value(m).ok()?;
                let entry = match m.kind.as_str() {
                    "text" => parse_tag(&m.text).map_or(Entry::Other("text".into()), |(c, n)| {
                        Entry::Text { conn: c, n }
                    }),
                    "join" => Entry::Join,
                    k => Entry::Other(k.to_string()),
                };
                Some((m.seq, entry))
            })
            .collect())
    }
}

/// Looks up each live-delivery miss with `history` on the member's connection: found with
/// the right content → recovered via history; otherwise lost.
async fn classify_missing(
    ctx: &mut HistoryCtx<'_>,
    specs: &[ChatSpec],
    missing: Vec<Missing>,
    v: &mut Verdict,
) {
    let mut by_pair: BTreeMap<(usize, usize), Vec<Missing>> = BTreeMap::new();
    for m in missing {
        by_pair.entry((m.conn, m.chat)).or_default().push(m);
    }
    for ((conn, chat), mut list) in by_pair {
        list.sort_by_key(|m| m.seq);
        let chat_id = &specs[chat].id;
        let mut i = 0;
        while i < list.len() {
            let after = list[i].seq - 1;
            let page = if ctx.budget > 0 {
                ctx.budget -= 1;
                ctx.history(conn, chat_id, json!({"after": after, "limit": 100}))
                    .await
                    .map_err(Some)
            } else {
                Err(None)
            };
            let found: HashMap<u64, Entry> = match &page {
                Ok(p) => p.iter().cloned().collect(),
                Err(_) => HashMap::new(),
            };
            while i < list.len() && list[i].seq <= after + 100 {
                let m = &list[i];
                match (&page, found.get(&m.seq)) {
                    (Ok(_), Some(e)) if *e == m.expect => v.add(
                        AnomalyKind::RecoveredViaHistory,
                        chat,
                        Some(conn),
                        m.seq,
                        format!(
                            "seq {} of {chat_id} ({}) not pushed live to connection {conn}; history has it",
                            m.seq,
                            describe(&m.expect)
                        ),
                    ),
                    (Ok(_), other) => v.add(
                        AnomalyKind::Lost,
                        chat,
                        Some(conn),
                        m.seq,
                        format!(
                            "seq {} of {chat_id} ({}) not pushed live to connection {conn}; history has {}",
                            m.seq,
                            describe(&m.expect),
                            other.map_or("nothing there".to_string(), describe)
                        ),
                    ),
                    (Err(e), _) => v.add(
                        AnomalyKind::MissedUnchecked,
                        chat,
                        Some(conn),
                        m.seq,
                        format!(
                            "seq {} of {chat_id} ({}) not pushed live to connection {conn}; history not checked ({})",
                            m.seq,
                            describe(&m.expect),
                            e.as_deref().unwrap_or("history request budget used up")
                        ),
                    ),
                }
                i += 1;
            }
        }
    }
}
