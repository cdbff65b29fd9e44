//! Offline notifications to an `https://` webhook, against real chatd processes.
//!
//! The webhook is an axum server on loopback behind tokio-rustls, with a certificate for
//! 127.0.0.1 issued by a test CA (rcgen). The nodes trust that CA through
//! `notify.webhook_ca_file` (`chatd cluster init --webhook-ca-file`), besides the webpki
//! roots. A webhook whose certificate comes from another CA is refused: nothing is sent,
//! the notification is not retried, and it is counted and logged once.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde_json::Value;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::harness::{create_user_via, Cluster};
use crate::ws::Ws;

/// Hard bound of one test, cluster start included.
const TEST_LIMIT: Duration = Duration::from_secs(180);
/// Coalescing window of the clusters here.
const WINDOW_MS: u64 = 300;

/// A test CA: its certificate and key.
struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl TestCa {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("webhook test CA {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    /// A server certificate for 127.0.0.1 and its key.
    fn issue_server(&self) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (
            cert.der().clone(),
            PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
    }

    /// Writes the CA certificate as PEM into `dir`; returns the file.
    fn write_pem(&self, dir: &Path) -> std::path::PathBuf {
        let path = dir.join("webhook-ca.pem");
        std::fs::write(&path, self.cert.pem()).unwrap();
        path
    }
}

/// What the TLS webhook saw.
#[derive(Clone, Default)]
struct Seen {
    /// JSON bodies POSTed to /hook.
    bodies: Arc<Mutex<Vec<Value>>>,
    /// TLS handshakes that failed (the client refused the certificate).
    handshakes_failed: Arc<AtomicU64>,
}

/// TCP connections completed into TLS streams; failed handshakes are counted and skipped.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    failed: Arc<AtomicU64>,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let handshake = self.acceptor.accept(tcp);
            match tokio::time::timeout(Duration::from_secs(5), handshake).await {
                Ok(Ok(tls)) => return (tls, addr),
                _ => {
                    self.failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// Starts an HTTPS webhook on 127.0.0.1 presenting `cert`; `POST /hook` records its JSON
/// body and answers 204.
async fn tls_webhook(cert: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> (String, Seen) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/hook", tcp.local_addr().unwrap());
    let seen = Seen::default();
    let listener = TlsListener {
        tcp,
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        failed: seen.handshakes_failed.clone(),
    };
    let app = Router::new()
        .route(
            "/hook",
            post(
                |State(bodies): State<Arc<Mutex<Vec<Value>>>>, Json(body): Json<Value>| async move {
                    bodies.lock().unwrap().push(body);
                    StatusCode::NO_CONTENT
                },
            ),
        )
        .with_state(seen.bodies.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, seen)
}

/// A 3-node cluster notifying `url` and trusting `ca_file` for it, every node ready.
async fn cluster(url: &str, ca_file: &Path) -> Cluster {
    let window = WINDOW_MS.to_string();
    let ca_file = ca_file.display().to_string();
    let mut c = Cluster::init(
        3,
        &[
            "--webhook-url",
            url,
            "--webhook-ca-file",
            &ca_file,
            "--notify-window-ms",
            &window,
        ],
    );
    c.start_all();
    c.wait_ready(Duration::from_secs(60)).await;
    c
}

/// Creates `user` and waits until every node knows it (so a session opens anywhere).
async fn create_user(c: &Cluster, user: &str) -> String {
    let token = create_user_via(c, 1, user).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in &c.nodes {
        loop {
            let listed: Option<Value> =
                match c.http.get(c.url(n.id, "/v1/admin/users")).send().await {
                    Ok(r) if r.status().is_success() => r.json().await.ok(),
                    _ => None,
                };
            let known = listed
                .as_ref()
                .and_then(Value::as_array)
                .is_some_and(|l| l.iter().any(|u| u["user"] == user));
            if known {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {} never learnt of {user}",
                n.id
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    token
}

/// The sum over every node of the counter `name` in /metrics.
async fn counter(c: &Cluster, name: &str) -> u64 {
    let mut total = 0;
    for n in &c.nodes {
        let text = c
            .http
            .get(c.url(n.id, "/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        total += text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("node {} has no {name}", n.id));
    }
    total
}

/// Lines of every node's log that contain `needle`.
fn log_lines(c: &Cluster, needle: &str) -> Vec<String> {
    (1..=c.nodes.len() as u64)
        .flat_map(|id| {
            c.log_text(id)
                .lines()
                .filter(|l| l.contains(needle))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Alice (online on node 1) sends `text` to bob, who has no session anywhere.
async fn send_to_offline_bob(c: &Cluster, text: &str) -> String {
    let alice_token = create_user(c, "alice").await;
    create_user(c, "bob").await;
    let mut alice = Ws::connect(c.node(1).api, "alice", &alice_token).await;
    let chat = alice.open_direct("bob").await;
    alice.send_ok(&chat, "m1", text).await;
    chat
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_webhook_with_a_configured_ca_gets_the_offline_notification() {
    let body = async {
        let ca = TestCa::new("trusted");
        let (cert, key) = ca.issue_server();
        let (url, seen) = tls_webhook(cert, key).await;
        let files = tempfile::tempdir().unwrap();
        let c = cluster(&url, &ca.write_pem(files.path())).await;
        let chat = send_to_offline_bob(&c, "Hello over TLS!").await;

        let deadline = Instant::now() + Duration::from_secs(20);
        while seen.bodies.lock().unwrap().is_empty() {
            assert!(
                Instant::now() < deadline,
                "no notification over https (handshakes failed: {}; node logs: {:?})",
                seen.handshakes_failed.load(Ordering::SeqCst),
                log_lines(&c, "webhook")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let bodies = seen.bodies.lock().unwrap().clone();
        assert_eq!(bodies.len(), 1, "{bodies:?}");
        assert_eq!(bodies[0]["user"], "bob");
        assert_eq!(bodies[0]["text"], "alice: Hello over TLS!");
        assert_eq!(bodies[0]["count"], 1);
        assert_eq!(bodies[0]["chats"], serde_json::json!([chat]));
        assert_eq!(seen.handshakes_failed.load(Ordering::SeqCst), 0);
        // The node counts the call once the answer is back, just after the body arrived.
        while counter(&c, "chatd_notifications_sent_total").await == 0 {
            assert!(
                Instant::now() < deadline,
                "the accepted notification is not counted"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(counter(&c, "chatd_notifications_sent_total").await, 1);
        assert_eq!(counter(&c, "chatd_notifications_failed_total").await, 0);
    };
    tokio::time::timeout(TEST_LIMIT, body)
        .await
        .expect("test within its time limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_webhook_with_an_untrusted_certificate_is_refused_once_and_counted() {
    let body = async {
        // The nodes trust CA "trusted"; the webhook's certificate comes from CA "rogue".
        let trusted = TestCa::new("trusted");
        let rogue = TestCa::new("rogue");
        let (cert, key) = rogue.issue_server();
        let (url, seen) = tls_webhook(cert, key).await;
        let files = tempfile::tempdir().unwrap();
        let c = cluster(&url, &trusted.write_pem(files.path())).await;
        send_to_offline_bob(&c, "never delivered").await;

        let deadline = Instant::now() + Duration::from_secs(20);
        while counter(&c, "chatd_notifications_failed_total").await == 0 {
            assert!(
                Instant::now() < deadline,
                "the refused notification was never counted (handshakes failed: {})",
                seen.handshakes_failed.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Longer than every retry with backoff would take (200 + 400 + 800 ms) and
        // a few windows: nothing more happens.
        tokio::time::sleep(Duration::from_millis(2_000 + 3 * WINDOW_MS)).await;
        assert!(
            seen.bodies.lock().unwrap().is_empty(),
            "nothing reaches a webhook whose certificate is not trusted"
        );
        assert_eq!(
            seen.handshakes_failed.load(Ordering::SeqCst),
            1,
            "one handshake, not retried"
        );
        assert_eq!(counter(&c, "chatd_notifications_failed_total").await, 1);
        assert_eq!(counter(&c, "chatd_notifications_sent_total").await, 0);
        let refused = log_lines(&c, "webhook refused");
        assert_eq!(refused.len(), 1, "logged once: {refused:?}");
        assert!(
            refused[0].contains("UnknownIssuer") || refused[0].contains("certificate"),
            "the log says why: {}",
            refused[0]
        );
        assert!(
            log_lines(&c, "webhook call failed").is_empty(),
            "a TLS refusal is not retried: {:?}",
            log_lines(&c, "webhook call failed")
        );
    };
    tokio::time::timeout(TEST_LIMIT, body)
        .await
        .expect("test within its time limit");
}
