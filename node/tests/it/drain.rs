//! Graceful drain on SIGTERM, and systemd's notify protocol, against real processes.
//!
//! A node of a 3-node cluster runs with `$NOTIFY_SOCKET` pointing at a datagram socket this
//! test binds: it must not say `READY=1` before it can serve, must ping the watchdog and
//! extend its start timeout meanwhile, and on SIGTERM must say `STOPPING=1`, refuse new
//! sessions, hand every partition it leads to another node before it exits, close its
//! clients with 1001, and exit 0 in bounded time without losing an acknowledged write.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::{create_user_via, Cluster};
use crate::ws::{self, Ws};

const READY: Duration = Duration::from_secs(60);
/// The drain's bound in the default config (`lifecycle.drain_timeout_ms`), plus the close
/// wait (1 s) and the shutdown bound (5 s) in `run.rs`, plus slack for a loaded machine.
const EXIT_BOUND: Duration = Duration::from_secs(10 + 1 + 5 + 4);
/// Hard bound of the whole test.
const TEST_LIMIT: Duration = Duration::from_secs(240);

/// Datagrams received on a notify socket, with when they arrived.
#[derive(Clone, Default)]
struct Notes(Arc<Mutex<Vec<(Instant, String)>>>);

impl Notes {
    /// Binds `path` and collects datagrams in a thread until the socket's owner drops.
    fn listen(path: &std::path::Path) -> Self {
        let socket = UnixDatagram::bind(path).expect("bind notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("read timeout");
        let notes = Notes::default();
        let sink = notes.0.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // The thread ends when the test process does (bounded by TEST_LIMIT).
            loop {
                if let Ok(n) = socket.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    sink.lock().unwrap().push((Instant::now(), text));
                }
            }
        });
        notes
    }

    fn all(&self) -> Vec<(Instant, String)> {
        self.0.lock().unwrap().clone()
    }

    /// When the first datagram with the line `line` arrived.
    fn first(&self, line: &str) -> Option<Instant> {
        self.all()
            .into_iter()
            .find(|(_, t)| t.lines().any(|l| l == line))
            .map(|(at, _)| at)
    }

    fn count_prefix(&self, prefix: &str) -> usize {
        self.all()
            .iter()
            .filter(|(_, t)| t.lines().any(|l| l.starts_with(prefix)))
            .count()
    }

    async fn wait_for(&self, line: &str, timeout: Duration) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(at) = self.first(line) {
                return at;
            }
            assert!(
                Instant::now() < deadline,
                "no {line} within {timeout:?}; got {:?}",
                self.all().iter().map(|(_, t)| t).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Starts node `id` as `chatd run` with systemd's variables set for it only.
fn start_notified(c: &mut Cluster, id: u64, socket: &std::path::Path, watchdog_usec: u64) {
    c.start_with_env(
        id,
        &[
            ("NOTIFY_SOCKET", socket.display().to_string()),
            ("WATCHDOG_USEC", watchdog_usec.to_string()),
        ],
    );
}

/// Node `id`'s own view of who leads `group` (`None`: no leader, or no answer).
async fn leader_seen_by(c: &Cluster, id: u64, group: u64) -> Option<u64> {
    c.local(id, group).await?["leader"].as_u64()
}

/// Connects as `user`, retrying the first 4001 (the node may not have applied the user
/// yet; docs/protocol.md says to retry it after a short delay).
async fn connect(c: &Cluster, id: u64, user: &str, token: &str) -> Ws {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stream = ws::open(c.node(id).api, Some(token)).await.unwrap();
        let mut w = Ws::from_stream(user, stream);
        let first = w.recv_frame(Duration::from_secs(10)).await;
        if first["type"] == "ready" {
            return w;
        }
        assert!(Instant::now() < deadline, "{user} never got ready: {first}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_a_leader_without_losing_an_acknowledged_write() {
    if tokio::time::timeout(TEST_LIMIT, drain_body())
        .await
        .is_err()
    {
        panic!("test did not finish within {TEST_LIMIT:?}");
    }
}

async fn drain_body() {
    let mut c = Cluster::init(3, &[]);
    let socket = c.path().join("notify.sock");
    let notes = Notes::listen(&socket);

    // Node 1 alone cannot be ready (no majority anywhere): no READY=1, but the watchdog
    // and the start timeout extensions run.
    start_notified(&mut c, 1, &socket, 1_000_000);
    notes
        .wait_for("EXTEND_TIMEOUT_USEC=30000000", Duration::from_secs(20))
        .await;
    notes.wait_for("WATCHDOG=1", Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(notes.first("READY=1").is_none(), "READY=1 before a quorum");
    assert!(!c.ready(1).await);
    assert!(
        notes.count_prefix("STATUS=recovering") >= 1,
        "{:?}",
        notes.all()
    );
    // Several watchdog pings at half of the 1 s WATCHDOG_USEC.
    assert!(notes.count_prefix("WATCHDOG=1") >= 3, "{:?}", notes.all());

    c.start(2);
    c.start(3);
    notes.wait_for("READY=1", READY).await;
    // READY=1 means /readyz answers 200.
    assert!(c.ready(1).await, "READY=1 sent but /readyz is not 200");
    c.wait_ready(READY).await;

    // Groups node 1 leads (group 0 and its preferred partitions, at least).
    let mut led = Vec::new();
    for g in 0..=16u64 {
        if leader_seen_by(&c, 1, g).await == Some(1) {
            led.push(g);
        }
    }
    assert!(!led.is_empty(), "node 1 leads nothing");
    let probe = *led
        .iter()
        .find(|g| **g != 0)
        .expect("node 1 leads a partition");

    // A client on node 1 with acknowledged messages.
    let alice_token = create_user_via(&c, 2, "alice").await;
    create_user_via(&c, 2, "bob").await;
    let mut alice = connect(&c, 1, "alice", &alice_token).await;
    let chat = alice.open_direct("bob").await;
    let mut acked_texts = Vec::new();
    for i in 0..20 {
        let text = format!("before-{i}");
        alice.send_ok(&chat, &format!("m{i}"), &text).await;
        acked_texts.push(text);
    }

    // Writers through nodes 2 and 3 keep appending to a partition node 1 leads, through
    // the drain; every acknowledged record must survive.
    let stop = Arc::new(AtomicBool::new(false));
    let acked_records = Arc::new(Mutex::new(Vec::<String>::new()));
    let writer = {
        let (stop, acked) = (stop.clone(), acked_records.clone());
        let urls: Vec<String> = [2u64, 3]
            .iter()
            .map(|id| c.url(*id, &format!("/v1/admin/partitions/{probe}/records")))
            .collect();
        let http = c.http.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let payload = format!("rec-{i}");
                let r = http
                    .post(&urls[(i % 2) as usize])
                    .body(payload.clone())
                    .send()
                    .await;
                if matches!(&r, Ok(r) if r.status().is_success()) {
                    acked.lock().unwrap().push(payload);
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // SIGTERM.
    let pid = c.node(1).child.as_ref().unwrap().id();
    let sent_at = Instant::now();
    let st = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());

    // While node 1 still runs: it refuses new sessions, and the other nodes see new
    // leaders for every group it led.
    let mut saw_draining = false;
    let mut refused_ws = false;
    let mut handed_over_while_running = false;
    let exit_status = loop {
        if let Some(status) = c.nodes[0].child.as_mut().unwrap().try_wait().unwrap() {
            break status;
        }
        assert!(
            sent_at.elapsed() < EXIT_BOUND,
            "node 1 still running {EXIT_BOUND:?} after SIGTERM"
        );
        if !saw_draining {
            if let Ok(r) = c.http.get(c.url(1, "/readyz")).send().await {
                if r.status() == 503 && r.text().await.unwrap_or_default().contains("draining") {
                    saw_draining = true;
                    refused_ws = match ws::open(c.node(1).api, Some(&alice_token)).await {
                        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                            resp.status() == 503
                        }
                        // Exited between the two requests: nothing to learn.
                        Err(_) => true,
                        Ok(_) => false,
                    };
                }
            }
        }
        if !handed_over_while_running {
            let mut all = true;
            for g in &led {
                let l2 = leader_seen_by(&c, 2, *g).await;
                let l3 = leader_seen_by(&c, 3, *g).await;
                let elsewhere = |l: Option<u64>| l.is_some_and(|l| l != 1);
                if !(elsewhere(l2) && elsewhere(l3)) {
                    all = false;
                    break;
                }
            }
            // Only counts if node 1 was still running after the check.
            if all
                && c.nodes[0]
                    .child
                    .as_mut()
                    .unwrap()
                    .try_wait()
                    .unwrap()
                    .is_none()
            {
                handed_over_while_running = true;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = sent_at.elapsed();
    c.nodes[0].child = None;
    let log = c.log_text(1);
    eprintln!("node 1 led {led:?}; exited {took:?} after SIGTERM");
    for l in log.lines().filter(|l| l.contains("drain:")) {
        eprintln!("  {l}");
    }
    assert!(
        exit_status.success(),
        "node 1 exited with {exit_status:?}\n{log}"
    );
    assert!(took < EXIT_BOUND, "drain took {took:?}");
    assert!(saw_draining, "/readyz never answered 503 draining\n{log}");
    assert!(refused_ws, "a new WebSocket was accepted while draining");
    assert!(
        handed_over_while_running,
        "groups {led:?} had no leader elsewhere before node 1 exited\n{log}"
    );
    for g in &led {
        assert!(
            log.contains(&format!("group={g} to=")),
            "no 'leadership moved' for {g}\n{log}"
        );
    }
    assert!(notes.first("STOPPING=1").is_some(), "{:?}", notes.all());

    // The client on node 1 was told to go elsewhere.
    let (_, code) = alice.expect_close(Duration::from_secs(5)).await;
    assert_eq!(code, Some(1001), "close code");

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();

    // Nothing acknowledged is lost: alice reconnects to node 2 and sees every message;
    // every acknowledged record is on nodes 2 and 3.
    let mut alice = connect(&c, 2, "alice", &alice_token).await;
    let texts: Vec<String> = alice
        .full_history(&chat)
        .await
        .iter()
        .filter_map(|m| m["text"].as_str().map(str::to_string))
        .collect();
    for t in &acked_texts {
        assert!(texts.contains(t), "acked message {t} missing: {texts:?}");
    }
    let acked = acked_records.lock().unwrap().clone();
    assert!(!acked.is_empty(), "no record was acknowledged");
    for id in [2u64, 3] {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let have: Vec<String> = c
                .records(id, probe)
                .await
                .unwrap_or_default()
                .into_iter()
                .map(|r| r.payload)
                .collect();
            let missing: Vec<&String> = acked.iter().filter(|p| !have.contains(p)).collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} misses acknowledged records {missing:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The partition still takes writes without node 1.
    let a = c.append_retry(&[2, 3], probe, "after-drain").await;
    assert_ne!(a.leader, 1);
}
