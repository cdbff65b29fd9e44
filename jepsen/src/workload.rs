//! The workload: concurrent clients, each its own user connected to one node, sending to
//! group chats every client belongs to with idempotency keys, retrying on timeouts and
//! disconnects (with the same key, reconnecting to the next node), reading through live
//! delivery, history and sync, and sending receipts. Every operation goes to the history.
//! The nodes clients use are a [`NodeDirectory`] the nemesis changes as nodes join and
//! leave. At the end, a final read of every chat from every node.
//!
//! End-to-end encrypted chats (ids `e:…`) take `e2e_send` instead of `send`: opaque
//! "ciphertext" (16 random bytes and the message id, base64) of kind `application` in the
//! epoch the client believes current, and now and then a `commit` naming that epoch, which
//! the server stores only if no other commit took the epoch first (`stale_epoch`
//! otherwise). A client's epoch of a chat is what it observed: one more than the largest
//! `mls_commit` epoch it read or was delivered (or its own acknowledged commit), or the
//! epoch of a welcome, from the setup's commit on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use chat_cli::ws::Connection;
use chat_cli::CliError;
use chatd_proto::{ClientFrame, MessageView, ServerFrame};
use parking_lot::RwLock;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::history::{Cursor, Entry, History, Kind, Op, F};

/// Longest wait for one operation's answer before it is recorded `info` and the
/// connection is given up.
pub const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts of one message (same client_msg_id) before the client moves on.
pub const SEND_ATTEMPTS_MAX: u32 = 20;
/// Longest wait to connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Final reads: attempts per chat and node.
pub const FINAL_READ_ATTEMPTS_MAX: u32 = 30;
/// Entries per history page.
const PAGE: u32 = chatd_proto::HISTORY_PAGE_MAX;
/// Longest wait for one upload or download (a few MiB over loopback, under faults).
pub const FILE_OP_TIMEOUT: Duration = Duration::from_secs(10);
/// Sizes of the workload's files, in bytes: from a fraction of a chunk to a few chunks
/// (chunks are 1 MiB), so short last chunks and multi-chunk files both occur.
pub const FILE_BYTES_MIN: usize = 16 << 10;
/// See [`FILE_BYTES_MIN`].
pub const FILE_BYTES_MAX: usize = (5 << 20) / 2;

/// Contents that every client uploads now and then, besides its own: the cluster stores
/// each once (dedup), so downloads of most of them read another upload's chunks, under
/// the same faults.
pub const SHARED_CONTENTS: u64 = 4;

/// The seed and length of an upload's bytes: one of the [`SHARED_CONTENTS`] half the time,
/// else bytes of its own.
pub fn upload_content(rng: &mut StdRng) -> (u64, usize) {
    if rng.gen_bool(0.5) {
        let s = rng.gen_range(0..SHARED_CONTENTS);
        let span = (FILE_BYTES_MAX - FILE_BYTES_MIN) as u64;
        (s, FILE_BYTES_MIN + ((s * 7_919 * 1_021) % span) as usize)
    } else {
        (
            rng.gen_range(SHARED_CONTENTS..u64::MAX),
            rng.gen_range(FILE_BYTES_MIN..=FILE_BYTES_MAX),
        )
    }
}

/// Deterministic bytes of a workload file (`seed`, `len`), different in every chunk.
pub fn file_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// SHA-256 in lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The nodes clients may connect to, `(node id, API host:port)` by id: a node is listed
/// once it is an active member and unlisted when its removal begins (clients already
/// connected to it stay until their connection ends, as with a killed node, and then move
/// to the next listed node). When a node is listed, clients spread again round-robin over
/// the listed nodes, so new nodes serve clients too. Shared by the clients, the nemesis
/// and the final reads.
#[derive(Clone, Debug, Default)]
pub struct NodeDirectory(Arc<RwLock<Listed>>);

#[derive(Debug, Default)]
struct Listed {
    /// Bumped whenever a node is listed.
    generation: u64,
    nodes: Vec<(usize, String)>,
}

impl NodeDirectory {
    /// A directory of `nodes`.
    pub fn new(nodes: Vec<(usize, String)>) -> NodeDirectory {
        let d = NodeDirectory::default();
        for (id, api) in nodes {
            d.insert(id, api);
        }
        d
    }

    /// Lists node `id` at `api` (replacing an entry of the same id).
    pub fn insert(&self, id: usize, api: String) {
        let mut l = self.0.write();
        l.nodes.retain(|(i, _)| *i != id);
        l.nodes.push((id, api));
        l.nodes.sort();
        l.generation += 1;
    }

    /// Unlists node `id`.
    pub fn remove(&self, id: usize) {
        self.0.write().nodes.retain(|(i, _)| *i != id);
    }

    /// The listed nodes, by id.
    pub fn list(&self) -> Vec<(usize, String)> {
        self.0.read().nodes.clone()
    }

    /// Changes whenever a node is listed.
    pub fn generation(&self) -> u64 {
        self.0.read().generation
    }

    /// The API address of node `id`, if listed.
    pub fn get(&self, id: usize) -> Option<String> {
        self.0
            .read()
            .nodes
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, a)| a.clone())
    }

    /// The listed node after `id` (wrapping around), whether or not `id` is listed.
    pub fn next_after(&self, id: usize) -> Option<usize> {
        let l = self.0.read();
        l.nodes
            .iter()
            .map(|(i, _)| *i)
            .find(|i| *i > id)
            .or_else(|| l.nodes.first().map(|(i, _)| *i))
    }

    /// Where client `k` goes after giving up its connection to `from` for the `moves`-th
    /// time: a listed node other than `from` (if there is one), so that the clients of one
    /// node spread over all the others.
    pub fn move_from(&self, from: usize, k: usize, moves: usize) -> Option<usize> {
        let l = self.0.read();
        let others: Vec<usize> = l
            .nodes
            .iter()
            .map(|(i, _)| *i)
            .filter(|i| *i != from)
            .collect();
        (!others.is_empty()).then(|| others[k.wrapping_add(moves) % others.len()])
    }

    /// The `k`-th listed node (wrapping around).
    pub fn nth(&self, k: usize) -> Option<usize> {
        let l = self.0.read();
        (!l.nodes.is_empty()).then(|| l.nodes[k % l.nodes.len()].0)
    }
}

/// What the clients need to know.
#[derive(Clone, Debug)]
pub struct Setup {
    /// The nodes clients may use now.
    pub nodes: NodeDirectory,
    /// (user, token) per client.
    pub users: Vec<(String, String)>,
    /// The chats: the groups (every user is a member of each), then the E2E chats (ids
    /// `e:…`; the first [`Setup::e2e_members`] users are members of each).
    pub chats: Vec<String>,
    /// Users (the first ones, by client number) in every E2E chat: all of them, up to
    /// an E2E chat's bound (`e2e::GROUP_MEMBERS_MAX`).
    pub e2e_members: usize,
    /// The epoch of every E2E chat after the setup's commit (the one its welcome joins
    /// at): where the clients' knowledge of each chat's epoch starts.
    pub e2e_epoch: u64,
}

/// Whether `chat` is an end-to-end encrypted chat.
pub fn is_e2e(chat: &str) -> bool {
    chat.starts_with("e:")
}

/// MLS kind of an E2E application message.
pub const MLS_APPLICATION: &str = "application";
/// MLS kind of an E2E commit.
pub const MLS_COMMIT: &str = "commit";
/// Share of an E2E chat's sends that are commits (besides the answers below).
pub const E2E_COMMIT_SHARE: f64 = 0.03;
/// Chance that a client delivered another member's commit builds a commit of its own on
/// the new epoch at once (as clients do to update their keys after a change), sent at
/// its next turn: the members delivered one commit race for the next epoch, and all but
/// the first are refused `stale_epoch`. (With 6 clients, fewer than one commit in two
/// stored answers another, so the chains end.)
pub const E2E_COMMIT_ANSWER: f64 = 0.15;

/// Opaque "ciphertext" of an E2E message: 16 random bytes, then the message id; standard
/// base64 with padding, as the server takes and stores it.
pub fn ciphertext(rng: &mut StdRng, id: &str) -> String {
    let mut bytes: Vec<u8> = (0..16).map(|_| rng.gen()).collect();
    bytes.extend_from_slice(id.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// One client's parameters.
pub struct ClientSpec {
    /// Client number (1-based).
    pub k: usize,
    /// Operations per second of this client.
    pub rate: f64,
    /// Seed of its choices.
    pub seed: u64,
    /// When to stop.
    pub until: Instant,
}

fn is_definite_refusal(code: &str) -> bool {
    use chatd_proto::code;
    matches!(
        code,
        code::RATE_LIMITED
            | code::INVALID_FIELD
            | code::NOT_MEMBER
            | code::UNKNOWN_CHAT
            | code::TOO_LARGE
            | code::FORBIDDEN
            | code::MALFORMED
            | code::STALE_EPOCH
    ) || code == "unknown_file"
}

fn entry(m: &MessageView) -> Entry {
    Entry {
        seq: m.seq,
        kind: m.kind.clone(),
        sender: m.sender.clone(),
        text: m.text.clone(),
        epoch: m.epoch,
    }
}

/// A message being sent (and retried with the same id).
struct Outgoing {
    chat: String,
    /// The client_msg_id (`c<k>-<n>`).
    id: String,
    /// What the entry's text will be: the id for a plain send, the base64 ciphertext for
    /// an E2E one.
    text: String,
    /// Attempts so far.
    attempts: u32,
    /// An acknowledged upload it attaches.
    file: Option<String>,
    /// E2E: the MLS kind and the epoch named (fixed at the first attempt).
    mls: Option<(&'static str, u64)>,
}

/// How waiting for an answer ended.
enum Answer {
    Frame(ServerFrame),
    Timeout,
    Lost(String),
}

struct Client {
    name: String,
    k: usize,
    setup: Arc<Setup>,
    history: Arc<History>,
    conn: Option<Connection>,
    /// The node id this client uses (or will connect to next).
    node: usize,
    /// Connections given up so far: each move goes to another listed node, the clients of
    /// one node spreading over the others by client number and count.
    moves: usize,
    session: u64,
    /// Highest seq delivered per chat on this session (for receipts).
    seen: HashMap<String, u64>,
    /// For uploads and downloads.
    http: reqwest::Client,
    /// This client's acknowledged uploads: (file id, SHA-256).
    files: Vec<(String, String)>,
    /// Per E2E chat, the epoch this client believes current: one more than the largest
    /// `mls_commit` epoch it has observed, or a welcome's epoch (knowledge, kept across
    /// connections).
    epochs: HashMap<String, u64>,
    /// A commit built (chat, epoch named) on being delivered another member's commit,
    /// sent at the client's next turn; and the coin deciding to build one.
    built: Option<(String, u64)>,
    coin: StdRng,
}

impl Client {
    fn op(&self, kind: Kind, f: F) -> Op {
        let mut op = Op::new(&self.name, kind, f);
        op.node = Some(self.node as u64);
        op.session = Some(self.session);
        op
    }

    /// Gives the connection up and picks the node to connect to next: one of the other
    /// listed nodes, chosen by client number and moves so far. (Every client moving to "the
    /// next" node would pile them all on one node, and a fault of that node would then
    /// stop every client at once: the history would show the workload's unavailability,
    /// not the cluster's.)
    fn drop_conn(&mut self) {
        self.conn = None;
        self.moves += 1;
        if let Some(next) = self.setup.nodes.move_from(self.node, self.k, self.moves) {
            self.node = next;
        }
    }

    async fn ensure_connected(&mut self) -> bool {
        if self.conn.is_some() {
            return true;
        }
        let token = self.setup.users[self.k - 1].1.clone();
        // A node that left the directory (being removed) is not connected to again.
        let listed = self.setup.nodes.get(self.node).or_else(|| {
            let next = self.setup.nodes.next_after(self.node)?;
            self.node = next;
            self.setup.nodes.get(next)
        });
        let Some(addr) = listed else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            return false;
        };
        match Connection::connect(&addr, Some(&token), CONNECT_TIMEOUT).await {
            Ok(c) => {
                self.conn = Some(c);
                self.session += 1;
                self.seen.clear();
                true
            }
            Err(_) => {
                self.drop_conn();
                tokio::time::sleep(Duration::from_millis(100)).await;
                false
            }
        }
    }

    /// A new message `id` to `chat`: a plain send, or in an E2E chat an application
    /// message in the epoch this client believes current or, now and then (never with a
    /// file), a commit naming that epoch.
    fn outgoing(
        &self,
        rng: &mut StdRng,
        chat: String,
        id: String,
        file: Option<String>,
    ) -> Outgoing {
        if !is_e2e(&chat) {
            return Outgoing {
                chat,
                text: id.clone(),
                id,
                attempts: 0,
                file,
                mls: None,
            };
        }
        let epoch = self
            .epochs
            .get(&chat)
            .copied()
            .unwrap_or(0)
            .max(self.setup.e2e_epoch);
        let kind = if file.is_none() && rng.gen_bool(E2E_COMMIT_SHARE) {
            MLS_COMMIT
        } else {
            MLS_APPLICATION
        };
        Outgoing {
            text: ciphertext(rng, &id),
            chat,
            id,
            attempts: 0,
            file,
            mls: Some((kind, epoch)),
        }
    }

    /// The commit built on `epoch` of `chat`, as message `id`.
    fn built_commit(&self, rng: &mut StdRng, chat: String, id: String, epoch: u64) -> Outgoing {
        Outgoing {
            text: ciphertext(rng, &id),
            chat,
            id,
            attempts: 0,
            file: None,
            mls: Some((MLS_COMMIT, epoch)),
        }
    }

    /// Learns a chat's epoch from an entry read or delivered.
    fn learn_epoch(&mut self, chat: &str, e: &Entry) {
        let at = match (e.kind.as_str(), e.epoch) {
            ("mls_commit", Some(epoch)) => epoch + 1,
            ("mls_welcome", Some(epoch)) => epoch,
            _ => return,
        };
        let known = self.epochs.entry(chat.to_string()).or_insert(0);
        *known = (*known).max(at);
    }

    /// Records a push; `false` if it was not one.
    fn observe(&mut self, frame: &ServerFrame) -> bool {
        match frame {
            ServerFrame::Message { message } => {
                let before = self.epochs.get(&message.chat).copied();
                self.learn_epoch(&message.chat, &entry(message));
                let after = self.epochs.get(&message.chat).copied();
                if message.kind == "mls_commit"
                    && message.sender != self.setup.users[self.k - 1].0
                    && after > before
                    && self.built.is_none()
                    && self.coin.gen_bool(E2E_COMMIT_ANSWER)
                {
                    if let Some(epoch) = after {
                        self.built = Some((message.chat.clone(), epoch));
                    }
                }
                let mut op = self.op(Kind::Ok, F::Deliver);
                op.chat = Some(message.chat.clone());
                op.seq = Some(message.seq);
                op.msg = Some(message.text.clone());
                op.entries = Some(vec![entry(message)]);
                self.history.record(op);
                let high = self.seen.entry(message.chat.clone()).or_insert(0);
                *high = (*high).max(message.seq);
                true
            }
            ServerFrame::Receipt {
                chat,
                user,
                delivered,
                read,
            } => {
                let mut op = self.op(Kind::Ok, F::ReceiptSeen);
                op.chat = Some(chat.clone());
                op.user = Some(user.clone());
                op.delivered = Some(*delivered);
                op.read = Some(*read);
                self.history.record(op);
                true
            }
            _ => false,
        }
    }

    /// Waits for the answer to request `id` until `deadline`, recording pushes.
    async fn answer(&mut self, id: &str, deadline: Instant) -> Answer {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Answer::Lost("not connected".into());
            };
            let next = tokio::time::timeout_at(deadline, conn.recv()).await;
            let incoming = match next {
                Err(_) => return Answer::Timeout,
                Ok(Err(e)) => return Answer::Lost(e.to_string()),
                Ok(Ok(f)) => f,
            };
            let Some(frame) = incoming.frame else {
                continue;
            };
            if incoming.value.get("id").and_then(|v| v.as_str()) == Some(id) {
                return Answer::Frame(frame);
            }
            self.observe(&frame);
        }
    }

    /// Reads pushes until `until`.
    async fn idle(&mut self, until: Instant) {
        while Instant::now() < until {
            let Some(conn) = self.conn.as_mut() else {
                tokio::time::sleep_until(until).await;
                return;
            };
            match tokio::time::timeout_at(until, conn.recv()).await {
                Err(_) => return,
                Ok(Err(_)) => {
                    self.drop_conn();
                    return;
                }
                Ok(Ok(incoming)) => {
                    if let Some(frame) = incoming.frame {
                        self.observe(&frame);
                    }
                }
            }
        }
    }

    async fn send_frame(&mut self, frame: &ClientFrame) -> Result<(), String> {
        match self.conn.as_mut() {
            Some(c) => c.send(frame).await.map_err(|e: CliError| e.to_string()),
            None => Err("not connected".into()),
        }
    }

    /// One attempt of sending `out`. `true` when settled (acked or refused).
    async fn send(&mut self, out: &Outgoing, n: u64) -> bool {
        let mut inv = self.op(Kind::Invoke, F::Send);
        inv.chat = Some(out.chat.clone());
        inv.msg = Some(out.text.clone());
        inv.file = out.file.clone();
        inv.mls = out.mls.map(|(k, _)| k.to_string());
        inv.epoch = out.mls.map(|(_, e)| e);
        if !self.history.record(inv) {
            return true;
        }
        let id = format!("s{n}");
        let files: Vec<chatd_proto::FileRef> = out
            .file
            .as_ref()
            .map(|f| chatd_proto::FileRef {
                file_id: f.to_string(),
                name: None,
                mime: None,
                size: None,
            })
            .into_iter()
            .collect();
        let frame = match out.mls {
            None => ClientFrame::Send {
                id: id.clone(),
                chat: out.chat.clone(),
                client_msg_id: out.id.clone(),
                text: out.text.clone(),
                reply_to: None,
                files,
            },
            Some((kind, epoch)) => ClientFrame::E2eSend {
                id: id.clone(),
                chat: out.chat.clone(),
                client_msg_id: out.id.clone(),
                kind: kind.to_string(),
                epoch,
                data: out.text.clone(),
                welcome: None,
                add: Vec::new(),
                remove: Vec::new(),
                files,
            },
        };
        if let Err(e) = self.send_frame(&frame).await {
            let mut op = self.op(Kind::Info, F::Send);
            op.error = Some(e);
            self.history.record(op);
            self.drop_conn();
            return false;
        }
        let answer = self.answer(&id, Instant::now() + OP_TIMEOUT).await;
        let (kind, seq, error, settled) = match answer {
            Answer::Frame(ServerFrame::Ack { seq, .. }) => (Kind::Ok, Some(seq), None, true),
            Answer::Frame(ServerFrame::Error { code, message, .. }) => {
                if is_definite_refusal(&code) {
                    (Kind::Fail, None, Some(format!("{code}: {message}")), true)
                } else {
                    if code == chatd_proto::code::UNAVAILABLE {
                        // The node reaches no leader (cut off, or no majority where it
                        // looks): as a client would, try another node.
                        self.drop_conn();
                    }
                    (Kind::Info, None, Some(format!("{code}: {message}")), false)
                }
            }
            Answer::Frame(other) => (
                Kind::Info,
                None,
                Some(format!("unexpected {other:?}")),
                false,
            ),
            Answer::Timeout => {
                self.drop_conn();
                (Kind::Info, None, Some("timeout".into()), false)
            }
            Answer::Lost(e) => {
                self.drop_conn();
                (Kind::Info, None, Some(e), false)
            }
        };
        let mut op = self.op(kind, F::Send);
        op.seq = seq;
        op.error = error;
        op.file = out.file.clone();
        op.mls = out.mls.map(|(k, _)| k.to_string());
        op.epoch = out.mls.map(|(_, e)| e);
        self.history.record(op);
        if let (Some(_), Some((MLS_COMMIT, epoch))) = (seq, out.mls) {
            // Its own commit is in the log: the chat moved past its epoch.
            let known = self.epochs.entry(out.chat.clone()).or_insert(0);
            *known = (*known).max(epoch + 1);
        }
        settled
    }

    /// The HTTP base of the node this client uses.
    fn http_base(&self) -> Option<String> {
        self.setup
            .nodes
            .get(self.node)
            .map(|a| format!("http://{a}"))
    }

    /// Uploads a file of this client's; its id and SHA-256 when acknowledged.
    async fn upload(&mut self, rng: &mut StdRng) -> Option<(String, String)> {
        let (seed, len) = upload_content(rng);
        let bytes = file_bytes(seed, len);
        let sha = sha256_hex(&bytes);
        let mut inv = self.op(Kind::Invoke, F::Upload);
        inv.sha256 = Some(sha.clone());
        inv.size = Some(len as u64);
        if !self.history.record(inv) {
            return None;
        }
        let base = self.http_base()?;
        let token = self.setup.users[self.k - 1].1.clone();
        let sent = self
            .http
            .post(format!("{base}/v1/files"))
            .bearer_auth(token)
            .header("content-type", "application/octet-stream")
            .header("x-file-name", format!("{}.bin", self.name))
            .body(bytes)
            .timeout(FILE_OP_TIMEOUT)
            .send()
            .await;
        let mut acked = None;
        let op = match sent {
            Ok(r) if r.status().as_u16() == 201 => match r.json::<serde_json::Value>().await {
                Ok(v) => {
                    let id = v["file_id"].as_str().unwrap_or_default().to_string();
                    let got = v["sha256"].as_str().unwrap_or_default().to_string();
                    let mut op = self.op(Kind::Ok, F::Upload);
                    op.file = Some(id.clone());
                    op.sha256 = Some(got.clone());
                    acked = Some((id, got));
                    op
                }
                Err(e) => {
                    let mut op = self.op(Kind::Info, F::Upload);
                    op.error = Some(format!("answer not read: {e}"));
                    op
                }
            },
            Ok(r) => {
                let status = r.status().as_u16();
                let body = r.text().await.unwrap_or_default();
                // 5xx: not stored on a majority, or not known; anything else: refused.
                let kind = if status >= 500 {
                    Kind::Info
                } else {
                    Kind::Fail
                };
                if status >= 500 {
                    self.drop_conn();
                }
                let mut op = self.op(kind, F::Upload);
                op.error = Some(format!("{status} {body}"));
                op
            }
            Err(e) => {
                self.drop_conn();
                let mut op = self.op(Kind::Info, F::Upload);
                op.error = Some(e.to_string());
                op
            }
        };
        self.history.record(op);
        if let Some(a) = &acked {
            self.files.push(a.clone());
        }
        acked
    }

    /// Downloads one of this client's acknowledged files and records the hash read.
    async fn download(&mut self, rng: &mut StdRng) {
        if self.files.is_empty() {
            return;
        }
        let (file, _) = self.files[rng.gen_range(0..self.files.len())].clone();
        let mut inv = self.op(Kind::Invoke, F::Download);
        inv.file = Some(file.clone());
        if !self.history.record(inv) {
            return;
        }
        let Some(base) = self.http_base() else {
            return;
        };
        let token = self.setup.users[self.k - 1].1.clone();
        let (kind, sha, error) = fetch_file(&self.http, &base, &token, &file).await;
        if kind == Kind::Info {
            self.drop_conn();
        }
        let mut op = self.op(kind, F::Download);
        op.file = Some(file);
        op.sha256 = sha;
        op.error = error;
        self.history.record(op);
    }

    async fn read(&mut self, chat: &str, n: u64) {
        let mut inv = self.op(Kind::Invoke, F::Read);
        inv.chat = Some(chat.to_string());
        if !self.history.record(inv) {
            return;
        }
        let id = format!("r{n}");
        let frame = ClientFrame::History {
            id: id.clone(),
            chat: chat.to_string(),
            before: None,
            after: None,
            limit: Some(PAGE),
        };
        let answer = match self.send_frame(&frame).await {
            Err(e) => Answer::Lost(e),
            Ok(()) => self.answer(&id, Instant::now() + OP_TIMEOUT).await,
        };
        let mut op = match answer {
            Answer::Frame(ServerFrame::History { messages, .. }) => {
                let entries: Vec<Entry> = messages.iter().map(entry).collect();
                for e in &entries {
                    self.learn_epoch(chat, e);
                }
                let mut op = self.op(Kind::Ok, F::Read);
                op.entries = Some(entries);
                op.complete = Some(false);
                op
            }
            Answer::Frame(ServerFrame::Error { code, message, .. }) => {
                let mut op = self.op(Kind::Fail, F::Read);
                op.error = Some(format!("{code}: {message}"));
                op
            }
            Answer::Frame(other) => {
                let mut op = self.op(Kind::Info, F::Read);
                op.error = Some(format!("unexpected {other:?}"));
                op
            }
            Answer::Timeout | Answer::Lost(_) => {
                self.drop_conn();
                let mut op = self.op(Kind::Info, F::Read);
                op.error = Some("no answer".into());
                op
            }
        };
        op.chat = Some(chat.to_string());
        self.history.record(op);
    }

    async fn sync(&mut self, n: u64) {
        if !self.history.record(self.op(Kind::Invoke, F::Sync)) {
            return;
        }
        // Every page, each from the previous one's `next`; the op completes with all of
        // them (each page is a linearizable read within the op's invoke..complete window).
        let mut cursors = Vec::new();
        let mut after: Option<String> = None;
        let mut page = 0u32;
        let op = loop {
            let id = format!("y{n}-{page}");
            page += 1;
            let frame = ClientFrame::Sync {
                id: id.clone(),
                after: after.clone(),
                limit: None,
            };
            let answer = match self.send_frame(&frame).await {
                Err(e) => Answer::Lost(e),
                Ok(()) => self.answer(&id, Instant::now() + OP_TIMEOUT).await,
            };
            match answer {
                Answer::Frame(ServerFrame::Chats { chats, next, .. }) => {
                    cursors.extend(chats.iter().map(|c| Cursor {
                        chat: c.chat.clone(),
                        last_seq: c.last_seq,
                        read: c.read,
                    }));
                    match next {
                        Some(next) if after.as_ref().is_none_or(|a| *a < next) => {
                            after = Some(next);
                        }
                        _ => {
                            let mut op = self.op(Kind::Ok, F::Sync);
                            op.cursors = Some(std::mem::take(&mut cursors));
                            break op;
                        }
                    }
                }
                Answer::Frame(ServerFrame::Error { code, message, .. }) => {
                    let mut op = self.op(Kind::Fail, F::Sync);
                    op.error = Some(format!("{code}: {message}"));
                    break op;
                }
                _ => {
                    self.drop_conn();
                    let mut op = self.op(Kind::Info, F::Sync);
                    op.error = Some("no answer".into());
                    break op;
                }
            }
        };
        self.history.record(op);
    }

    async fn receipt(&mut self, chat: &str) {
        let Some(high) = self.seen.get(chat).copied() else {
            return;
        };
        let frame = ClientFrame::Receipt {
            chat: chat.to_string(),
            delivered: Some(high),
            read: Some(high),
        };
        if self.send_frame(&frame).await.is_ok() {
            let mut op = self.op(Kind::Ok, F::Receipt);
            op.chat = Some(chat.to_string());
            op.seq = Some(high);
            self.history.record(op);
        } else {
            self.drop_conn();
        }
    }
}

/// Runs one client until `spec.until`, `stop`, or the history is full.
pub async fn run_client(
    spec: ClientSpec,
    setup: Arc<Setup>,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut generation = setup.nodes.generation();
    let mut c = Client {
        name: format!("c{}", spec.k),
        k: spec.k,
        node: setup.nodes.nth(spec.k - 1).unwrap_or(1),
        moves: 0,
        setup: setup.clone(),
        history,
        conn: None,
        session: 0,
        seen: HashMap::new(),
        http: reqwest::Client::new(),
        files: Vec::new(),
        epochs: HashMap::new(),
        built: None,
        coin: StdRng::seed_from_u64(spec.seed ^ 0xc0),
    };
    let period = Duration::from_secs_f64(1.0 / spec.rate.max(0.01));
    let mut next_at = Instant::now();
    let mut counter: u64 = 0;
    let mut msg_n: u64 = 0;
    // The message being sent (retried while its outcome is unknown).
    let mut retry: Option<Outgoing> = None;
    // The other chats, for a client that is no member of the E2E chats.
    let groups: Vec<String> = setup.chats.iter().filter(|c| !is_e2e(c)).cloned().collect();
    let e2e_member = spec.k <= setup.e2e_members;
    while Instant::now() < spec.until && !stop.load(Ordering::Relaxed) && !c.history.full() {
        c.idle(next_at).await;
        next_at = (next_at + period).max(Instant::now() - period * 4);
        // A node joined: spread over the listed nodes again (a new connection, as after
        // a lost one; a send being retried goes on there).
        if setup.nodes.generation() != generation {
            generation = setup.nodes.generation();
            if let Some(target) = setup.nodes.nth(spec.k - 1) {
                if target != c.node {
                    if let Some(conn) = c.conn.take() {
                        conn.close().await;
                    }
                    c.node = target;
                }
            }
        }
        if !c.ensure_connected().await {
            continue;
        }
        counter += 1;
        // A commit built when another member's commit was delivered goes out now, on the
        // epoch it was built on (another member's may have taken it meanwhile).
        if retry.is_none() {
            if let Some((chat, epoch)) = c.built.take() {
                msg_n += 1;
                let out = c.built_commit(&mut rng, chat, format!("c{}-{msg_n}", spec.k), epoch);
                retry = Some(out);
            }
        }
        let mut chat = setup.chats[rng.gen_range(0..setup.chats.len())].clone();
        if is_e2e(&chat) && !e2e_member && !groups.is_empty() {
            chat = groups[rng.gen_range(0..groups.len())].clone();
        }
        let roll: f64 = rng.gen();
        if retry.is_some() || roll < 0.75 {
            let mut out = match retry.take() {
                Some(out) => out,
                None => {
                    msg_n += 1;
                    c.outgoing(&mut rng, chat, format!("c{}-{msg_n}", spec.k), None)
                }
            };
            let settled = c.send(&out, counter).await;
            out.attempts += 1;
            if !settled && out.attempts < SEND_ATTEMPTS_MAX {
                retry = Some(out);
            }
        } else if roll < 0.87 {
            c.read(&chat, counter).await;
        } else if roll < 0.93 {
            c.sync(counter).await;
        } else if roll < 0.95 {
            // A file, then (next) a message that attaches it.
            if let Some((file, _)) = c.upload(&mut rng).await {
                msg_n += 1;
                let id = format!("c{}-{msg_n}", spec.k);
                retry = Some(c.outgoing(&mut rng, chat, id, Some(file)));
            }
        } else if roll < 0.97 {
            c.download(&mut rng).await;
        } else {
            c.receipt(&chat).await;
        }
    }
    if let Some(conn) = c.conn.take() {
        conn.close().await;
    }
}

/// Reads every chat from every node of the directory, whole, as user 1; each read recorded
/// as a `final_read` of process `final-<node id>`. Retries (bounded) while a node recovers.
pub async fn final_reads(setup: &Setup, history: &History) {
    let (_, token) = &setup.users[0];
    for (id, addr) in setup.nodes.list() {
        let node = id as u64;
        let addr = &addr;
        let process = format!("final-{node}");
        for chat in &setup.chats {
            let mut inv = Op::new(&process, Kind::Invoke, F::FinalRead);
            inv.chat = Some(chat.clone());
            inv.node = Some(node);
            history.record(inv);
            let mut last_error = String::new();
            let mut done = None;
            for _ in 0..FINAL_READ_ATTEMPTS_MAX {
                match read_whole(addr, token, chat).await {
                    Ok(entries) => {
                        done = Some(entries);
                        break;
                    }
                    Err(e) => {
                        last_error = e;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            let op = match done {
                Some(entries) => {
                    let mut op = Op::new(&process, Kind::Ok, F::FinalRead);
                    op.entries = Some(entries);
                    op.complete = Some(true);
                    op
                }
                None => {
                    let mut op = Op::new(&process, Kind::Fail, F::FinalRead);
                    op.error = Some(last_error);
                    op
                }
            };
            let mut op = op;
            op.chat = Some(chat.clone());
            op.node = Some(node);
            history.record(op);
        }
    }
}

/// Downloads `file` from `base` as the holder of `token`: (ok with the SHA-256 read, fail
/// with the status for a definite answer, info when no answer came).
async fn fetch_file(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    file: &str,
) -> (Kind, Option<String>, Option<String>) {
    let got = http
        .get(format!("{base}/v1/files/{file}"))
        .bearer_auth(token)
        .timeout(FILE_OP_TIMEOUT)
        .send()
        .await;
    match got {
        Ok(r) if r.status().as_u16() == 200 => match r.bytes().await {
            Ok(b) => (Kind::Ok, Some(sha256_hex(&b)), None),
            Err(e) => (Kind::Info, None, Some(format!("body: {e}"))),
        },
        Ok(r) => {
            let status = r.status().as_u16();
            let body = r.text().await.unwrap_or_default();
            let kind = if status >= 500 {
                Kind::Info
            } else {
                Kind::Fail
            };
            (kind, None, Some(format!("{status} {body}")))
        }
        Err(e) => (Kind::Info, None, Some(e.to_string())),
    }
}

/// Downloads every acknowledged upload from every node of the directory as its uploader
/// (each a `final_download` of process `final-<node id>`). Retries (bounded) while a node
/// recovers; a 404 is final.
pub async fn final_downloads(setup: &Setup, history: &History) {
    let http = reqwest::Client::new();
    let acked: Vec<(usize, String)> = history
        .snapshot()
        .iter()
        .filter(|o| o.is(Kind::Ok, F::Upload))
        .filter_map(|o| {
            let k: usize = o.process.strip_prefix('c')?.parse().ok()?;
            Some((k, o.file.clone()?))
        })
        .collect();
    for (id, addr) in setup.nodes.list() {
        let process = format!("final-{id}");
        let base = format!("http://{addr}");
        for (k, file) in &acked {
            let Some((_, token)) = setup.users.get(k - 1) else {
                continue;
            };
            let mut inv = Op::new(&process, Kind::Invoke, F::FinalDownload);
            inv.file = Some(file.clone());
            inv.node = Some(id as u64);
            history.record(inv);
            let mut last = (Kind::Info, None, None);
            for _ in 0..FINAL_READ_ATTEMPTS_MAX {
                last = fetch_file(&http, &base, token, file).await;
                if last.0 != Kind::Info {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let (kind, sha, error) = last;
            let mut op = Op::new(
                &process,
                if kind == Kind::Ok {
                    Kind::Ok
                } else {
                    Kind::Fail
                },
                F::FinalDownload,
            );
            op.file = Some(file.clone());
            op.node = Some(id as u64);
            op.sha256 = sha;
            op.error = error;
            history.record(op);
        }
    }
}

/// The whole chat, page by page from seq 1.
async fn read_whole(addr: &str, token: &str, chat: &str) -> Result<Vec<Entry>, String> {
    let mut conn = Connection::connect(addr, Some(token), OP_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    let read = chat_cli::messaging::read_history(&mut conn, chat, None, Some(0), None).await;
    conn.close().await;
    let (messages, _) = read.map_err(|e| e.to_string())?;
    Ok(messages.iter().map(entry).collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_clients_of_a_node_that_fails_spread_over_every_other_node() {
        let nodes = NodeDirectory::new((1..=3).map(|i| (i, format!("n{i}"))).collect());
        let mut on = HashMap::new();
        for k in 1..=6 {
            let next = nodes.move_from(1, k, 1).unwrap();
            assert_ne!(next, 1);
            *on.entry(next).or_insert(0) += 1;
        }
        assert_eq!(on, HashMap::from([(2, 3), (3, 3)]));
        // One client moving again and again visits every other node, never the one it left.
        let visits: Vec<usize> = (1..=4).map(|m| nodes.move_from(2, 1, m).unwrap()).collect();
        assert_eq!(visits, [1, 3, 1, 3]);
        // A lone node: nowhere else to go.
        let one = NodeDirectory::new(vec![(1, "n1".into())]);
        assert_eq!(one.move_from(1, 1, 1), None);
        assert_eq!(one.move_from(2, 1, 1), Some(1));
    }
}
