//! Offline notifications: for a member with no session anywhere, one JSON POST to the
//! configured webhook per coalescing window ("alice: Hello!" for one message, "You have 47
//! new messages" for many). Bounded everywhere; failures are retried with backoff a bounded
//! number of times and never block messaging.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};

use crate::node::Node;

/// Messages waiting to be coalesced, at most (more are dropped and counted).
pub const NOTIFY_QUEUE_MAX: usize = 65_536;
/// Users with a window open, at most.
pub const NOTIFY_PENDING_USERS_MAX: usize = 100_000;
/// Webhook calls in flight, at most.
pub const NOTIFY_IN_FLIGHT_MAX: usize = 16;
/// Attempts per notification (the first and its retries).
pub const NOTIFY_ATTEMPTS_MAX: u32 = 4;
/// First retry delay; doubled for each further retry.
const NOTIFY_BACKOFF_MS: u64 = 200;
/// Timeout of one webhook call.
const NOTIFY_CALL_TIMEOUT_MS: u64 = 5_000;
/// Largest webhook answer read (only its status line matters).
const NOTIFY_RESPONSE_BYTES_MAX: usize = 16 * 1024;

/// One message for a user who was offline when it was delivered.
pub struct Offline {
    pub user: String,
    pub sender: String,
    pub chat: String,
    pub text: String,
}

/// The webhook's JSON body.
#[derive(Debug, Serialize)]
pub struct Notification {
    pub user: String,
    pub text: String,
    pub count: u64,
    pub chats: Vec<String>,
}

struct Window {
    due: Instant,
    count: u64,
    first: (String, String),
    chats: Vec<String>,
}

/// The handle the delivery path uses.
pub struct Notifier {
    tx: mpsc::Sender<Offline>,
}

impl Notifier {
    /// Starts the notifier posting to `url` with `window` coalescing.
    pub fn start(node: Weak<Node>, url: String, window: Duration) -> Self {
        let (tx, rx) = mpsc::channel(NOTIFY_QUEUE_MAX);
        tokio::spawn(run(node, rx, url, window));
        Self { tx }
    }

    /// Queues a message for an offline user; false if the queue is full (dropped).
    pub fn enqueue(&self, item: Offline) -> bool {
        self.tx.try_send(item).is_ok()
    }
}

async fn run(node: Weak<Node>, mut rx: mpsc::Receiver<Offline>, url: String, window: Duration) {
    let mut pending: HashMap<String, Window> = HashMap::new();
    let mut last_sent: HashMap<String, Instant> = HashMap::new();
    let in_flight = Arc::new(Semaphore::new(NOTIFY_IN_FLIGHT_MAX));
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            item = rx.recv() => {
                let Some(item) = item else { return };
                if let Some(w) = pending.get_mut(&item.user) {
                    w.count += 1;
                    if !w.chats.contains(&item.chat) && w.chats.len() < 16 {
                        w.chats.push(item.chat);
                    }
                    continue;
                }
                if pending.len() >= NOTIFY_PENDING_USERS_MAX {
                    continue;
                }
                // At most one notification per window: a window opens no earlier than one
                // window after the last notification.
                let now = Instant::now();
                let earliest = last_sent.get(&item.user).map(|t| *t + window).unwrap_or(now);
                pending.insert(item.user.clone(), Window {
                    due: earliest.max(now) + window,
                    count: 1,
                    first: (item.sender, item.text),
                    chats: vec![item.chat],
                });
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let due: Vec<String> = pending
                    .iter()
                    .filter(|(_, w)| w.due <= now)
                    .map(|(u, _)| u.clone())
                    .collect();
                let Some(n) = node.upgrade() else { return };
                for user in due {
                    let Some(w) = pending.remove(&user) else { continue };
                    // Nothing is sent to a user who came online meanwhile.
                    if n.is_online(&user) {
                        continue;
                    }
                    last_sent.insert(user.clone(), now);
                    let text = if w.count == 1 {
                        let mut preview: String = w.first.1.chars().take(100).collect();
                        if w.first.1.chars().count() > 100 {
                            preview.push('…');
                        }
                        format!("{}: {}", w.first.0, preview)
                    } else {
                        format!("You have {} new messages", w.count)
                    };
                    let body = Notification { user, text, count: w.count, chats: w.chats };
                    let (url, permits) = (url.clone(), in_flight.clone());
                    tokio::spawn(async move {
                        let Ok(_permit) = permits.acquire_owned().await else { return };
                        post_with_retry(&url, &body).await;
                    });
                }
                last_sent.retain(|_, t| now.duration_since(*t) < window * 2);
            }
        }
    }
}

async fn post_with_retry(url: &str, body: &Notification) {
    let Ok(json) = serde_json::to_vec(body) else {
        return;
    };
    for attempt in 0..NOTIFY_ATTEMPTS_MAX {
        match post_json(url, &json).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(user = %body.user, attempt, error = %e, "webhook call failed");
                tokio::time::sleep(Duration::from_millis(NOTIFY_BACKOFF_MS << attempt)).await;
            }
        }
    }
    tracing::error!(user = %body.user, "notification dropped after {NOTIFY_ATTEMPTS_MAX} attempts");
}

/// POSTs `json` to an `http://host:port/path` URL; Ok on a 2xx answer.
pub async fn post_json(url: &str, json: &[u8]) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("only http:// webhooks are supported, got {url}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let call = async {
        let mut s = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|e| format!("connect {authority}: {e}"))?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            json.len()
        );
        s.write_all(head.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(json).await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; NOTIFY_RESPONSE_BYTES_MAX];
        let mut got = 0;
        while got < 12 {
            let n = s.read(&mut buf[got..]).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            got += n;
        }
        let status = String::from_utf8_lossy(&buf[..got]);
        let code = status.split_whitespace().nth(1).unwrap_or("");
        if code.starts_with('2') {
            Ok(())
        } else {
            Err(format!(
                "webhook answered {:?}",
                status.lines().next().unwrap_or("")
            ))
        }
    };
    tokio::time::timeout(Duration::from_millis(NOTIFY_CALL_TIMEOUT_MS), call)
        .await
        .map_err(|_| format!("no answer within {NOTIFY_CALL_TIMEOUT_MS} ms"))?
}
