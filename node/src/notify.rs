//! Offline notifications: for a member with no session anywhere, one JSON POST to the
//! configured webhook per coalescing window ("alice: Hello!" for one message, "You have 47
//! new messages" for many). Bounded everywhere; failures are retried with backoff a bounded
//! number of times and never block messaging.
//!
//! The webhook is `http://` or `https://` (reqwest over rustls with ring). An `https://`
//! webhook's certificate must chain to a webpki root or to a CA of `notify.webhook_ca_file`;
//! a certificate that does not is a refusal, not a transient failure: the notification is
//! dropped at once (never sent in clear, never retried), counted and logged once.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};

use crate::config::NotifySection;
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
/// Timeout of one webhook call, connection and TLS handshake included.
const NOTIFY_CALL_TIMEOUT_MS: u64 = 5_000;
/// Timeout of connecting (TCP and TLS) to the webhook.
const NOTIFY_CONNECT_TIMEOUT_MS: u64 = 2_000;

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

/// Where notifications go: the webhook's URL and the HTTP client that calls it.
#[derive(Clone)]
pub struct Webhook {
    url: reqwest::Url,
    client: reqwest::Client,
}

impl Webhook {
    /// The webhook of a `[notify]` section, `None` without `webhook_url`. Its client trusts
    /// the webpki roots and the certificates of `webhook_ca_file`; errors name what is wrong
    /// (an unusable URL, an unreadable CA file, a file without certificates).
    pub fn from_config(notify: &NotifySection) -> Result<Option<Self>, String> {
        let Some(url) = notify.webhook_url.as_deref() else {
            return Ok(None);
        };
        let url = reqwest::Url::parse(url)
            .map_err(|e| format!("notify.webhook_url {url:?} is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || !url.has_host() {
            return Err(format!(
                "notify.webhook_url {url} must be an http:// or https:// URL with a host"
            ));
        }
        let mut client = reqwest::Client::builder()
            .timeout(Duration::from_millis(NOTIFY_CALL_TIMEOUT_MS))
            .connect_timeout(Duration::from_millis(NOTIFY_CONNECT_TIMEOUT_MS))
            // A webhook that redirects is misconfigured: a 3xx is a failure, not a new target.
            .redirect(reqwest::redirect::Policy::none())
            // Straight to the webhook, as configured: no proxy from the environment.
            .no_proxy()
            .user_agent(concat!("chatd/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &notify.webhook_ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                format!(
                    "notify.webhook_ca_file {}: cannot read: {e}",
                    path.display()
                )
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                format!(
                    "notify.webhook_ca_file {}: not PEM certificates: {e}",
                    path.display()
                )
            })?;
            if certs.is_empty() {
                return Err(format!(
                    "notify.webhook_ca_file {}: no CERTIFICATE section",
                    path.display()
                ));
            }
            for cert in certs {
                client = client.add_root_certificate(cert);
            }
        }
        let client = client
            .build()
            .map_err(|e| format!("webhook client: {}", chain(&e)))?;
        Ok(Some(Self { url, client }))
    }
}

impl Notifier {
    /// Starts the notifier posting to `webhook` with `window` coalescing.
    pub fn start(node: Weak<Node>, webhook: Webhook, window: Duration) -> Self {
        let (tx, rx) = mpsc::channel(NOTIFY_QUEUE_MAX);
        tokio::spawn(run(node, rx, webhook, window));
        Self { tx }
    }

    /// Queues a message for an offline user; false if the queue is full (dropped).
    pub fn enqueue(&self, item: Offline) -> bool {
        self.tx.try_send(item).is_ok()
    }
}

async fn run(
    node: Weak<Node>,
    mut rx: mpsc::Receiver<Offline>,
    webhook: Webhook,
    window: Duration,
) {
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
                    let (webhook, permits) = (webhook.clone(), in_flight.clone());
                    let node = node.clone();
                    tokio::spawn(async move {
                        let Ok(_permit) = permits.acquire_owned().await else { return };
                        let sent = post_with_retry(&webhook, &body).await;
                        if let Some(n) = node.upgrade() {
                            let counter = if sent {
                                &n.gateway.metrics.notifications_sent
                            } else {
                                &n.gateway.metrics.notifications_failed
                            };
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
                last_sent.retain(|_, t| now.duration_since(*t) < window * 2);
            }
        }
    }
}

/// Posts `body` to the webhook, retrying transient failures; true once it was accepted.
async fn post_with_retry(webhook: &Webhook, body: &Notification) -> bool {
    for attempt in 0..NOTIFY_ATTEMPTS_MAX {
        match post_once(webhook, body).await {
            Ok(()) => return true,
            Err(Failure::Refused(e)) => {
                tracing::error!(
                    user = %body.user, url = %webhook.url, error = %e,
                    "webhook refused: notification dropped, not retried"
                );
                return false;
            }
            Err(Failure::Transient(e)) => {
                tracing::warn!(user = %body.user, attempt, error = %e, "webhook call failed");
                tokio::time::sleep(Duration::from_millis(NOTIFY_BACKOFF_MS << attempt)).await;
            }
        }
    }
    tracing::error!(user = %body.user, "notification dropped after {NOTIFY_ATTEMPTS_MAX} attempts");
    false
}

/// Why one webhook call failed.
#[derive(Debug)]
enum Failure {
    /// Worth another attempt: no connection, a timeout, a non-2xx answer.
    Transient(String),
    /// Never worth another attempt: the TLS handshake failed (the certificate does not chain
    /// to a trusted CA, names another host, has expired...).
    Refused(String),
}

/// One JSON POST to the webhook; Ok on a 2xx answer (its body is not read).
async fn post_once(webhook: &Webhook, body: &Notification) -> Result<(), Failure> {
    match webhook
        .client
        .post(webhook.url.clone())
        .json(body)
        .send()
        .await
    {
        Ok(answer) if answer.status().is_success() => Ok(()),
        Ok(answer) => Err(Failure::Transient(format!(
            "webhook answered {}",
            answer.status()
        ))),
        Err(e) if from_rustls(&e) => Err(Failure::Refused(chain(&e))),
        Err(e) => Err(Failure::Transient(chain(&e))),
    }
}

/// True if `e` or one of its causes is a `rustls::Error` (the TLS handshake with the webhook
/// failed), looking inside `io::Error`s too: their `source()` skips the error they wrap.
fn from_rustls(e: &(dyn std::error::Error + 'static)) -> bool {
    if e.is::<rustls::Error>() {
        return true;
    }
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        return from_rustls(inner);
    }
    e.source().is_some_and(from_rustls)
}

/// `e` with its causes, e.g. "error sending request for url (...): client error (Connect):
/// invalid peer certificate: UnknownIssuer".
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let next = c.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn section(url: &str, ca: Option<&std::path::Path>) -> NotifySection {
        NotifySection {
            webhook_url: Some(url.to_string()),
            webhook_ca_file: ca.map(std::path::Path::to_path_buf),
            ..NotifySection::default()
        }
    }

    #[test]
    fn webhook_config_errors_name_what_is_wrong() {
        assert!(Webhook::from_config(&NotifySection::default())
            .unwrap()
            .is_none());
        assert!(Webhook::from_config(&section("http://127.0.0.1:9/h", None))
            .unwrap()
            .is_some());
        let e = Webhook::from_config(&section("ftp://127.0.0.1/h", None)).err();
        assert!(e.unwrap().contains("http:// or https://"));
        let e = Webhook::from_config(&section("not a url", None)).err();
        assert!(e.unwrap().contains("not a URL"));

        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = Webhook::from_config(&section("https://h/", Some(&missing))).err();
        assert!(e.unwrap().contains("missing.pem"));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no pem here\n").unwrap();
        let e = Webhook::from_config(&section("https://h/", Some(&empty))).err();
        assert!(e.unwrap().contains("no CERTIFICATE"));
        let ca = chatd_transport::ClusterCa::generate("hooks").unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, ca.cert_pem()).unwrap();
        assert!(Webhook::from_config(&section("https://h/", Some(&good)))
            .unwrap()
            .is_some());
    }

    /// Answers every connection with `answer` and closes it.
    async fn answering(answer: &'static [u8]) -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_failed_handshake_is_refused_and_other_failures_are_transient() {
        let body = Notification {
            user: "bob".into(),
            text: "hi".into(),
            count: 1,
            chats: vec![],
        };
        let body = &body;
        let post = |url: String| async move {
            let webhook = Webhook::from_config(&section(&url, None)).unwrap().unwrap();
            post_once(&webhook, body).await
        };
        let ok = answering(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n").await;
        assert!(post(format!("http://{ok}/h")).await.is_ok());
        let failing = answering(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n").await;
        let e = post(format!("http://{failing}/h")).await.unwrap_err();
        assert!(
            matches!(&e, Failure::Transient(m) if m.contains("500")),
            "{e:?}"
        );
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let e = post(format!("http://{closed}/h")).await.unwrap_err();
        assert!(matches!(e, Failure::Transient(_)), "{e:?}");
        // Plain HTTP where TLS was expected: the handshake fails, which no retry mends.
        let e = post(format!("https://{ok}/h")).await.unwrap_err();
        assert!(matches!(e, Failure::Refused(_)), "{e:?}");
    }
}
