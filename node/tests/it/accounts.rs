//! Accounts end to end: disabling a user and rotating its token end its sessions on every
//! node; admin endpoints of a node without an admin token refuse to run.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::chat::{assert_error, bounded, cluster3, create_user, READY};
use crate::harness::Cluster;
use crate::ws::{self, Event, Ws};

/// The bound this issue states for ending a revoked user's sessions everywhere.
const REVOKE_BOUND: Duration = Duration::from_secs(1);

/// One session of `user` on each of nodes 1–3, each past `ready` and a ping.
async fn one_session_per_node(c: &Cluster, user: &str, token: &str) -> Vec<Ws> {
    let mut out = Vec::new();
    for id in 1..=3 {
        let mut s = Ws::connect(c.node(id).api, user, token).await;
        s.ping().await;
        out.push(s);
    }
    out
}

/// Waits for each session to be closed; returns the close codes and the slowest wait
/// measured from `since`.
async fn closes(sessions: &mut [Ws], since: Instant) -> (Vec<Option<u16>>, Duration) {
    let mut codes = Vec::new();
    let mut slowest = Duration::ZERO;
    for s in sessions.iter_mut() {
        let (_, code) = s.expect_close(Duration::from_secs(10)).await;
        slowest = slowest.max(since.elapsed());
        codes.push(code);
    }
    (codes, slowest)
}

/// A fresh connection with `token` to node `id` is refused: `unauthorized`, then 4001.
async fn refused_everywhere(c: &Cluster, user: &str, token: &str) {
    for id in 1..=3 {
        let stream = ws::open(c.node(id).api, Some(token)).await.unwrap();
        let mut s = Ws::from_stream(user, stream);
        let first = s.recv_frame(Duration::from_secs(10)).await;
        assert_error(&first, "unauthorized", None);
        let (_, code) = s.expect_close(Duration::from_secs(10)).await;
        assert_eq!(code, Some(4001), "node {id}");
    }
}

async fn admin_post(c: &Cluster, via: u64, path: &str) -> (u16, Value) {
    let r = c.http.post(c.url(via, path)).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_disabling_a_user_ends_its_sessions_on_every_node_within_a_second() {
    bounded(async {
        let c = cluster3(&[]).await;
        let token = create_user(&c, 1, "mallory").await;
        let other = create_user(&c, 1, "olivia").await;
        let mut sessions = one_session_per_node(&c, "mallory", &token).await;
        let mut bystander = Ws::connect(c.node(2).api, "olivia", &other).await;
        bystander.ping().await;

        let started = Instant::now();
        let (status, body) = admin_post(&c, 3, "/v1/admin/users/mallory/disable").await;
        assert_eq!(
            (status, &body["disabled"]),
            (200, &Value::Bool(true)),
            "{body}"
        );
        let (codes, slowest) = closes(&mut sessions, started).await;
        println!("disable: every session of the user closed {slowest:?} after the request");
        assert_eq!(codes, vec![Some(4004); 3]);
        assert!(
            slowest <= REVOKE_BOUND,
            "sessions closed {slowest:?} after the disable (bound {REVOKE_BOUND:?})"
        );
        refused_everywhere(&c, "mallory", &token).await;
        // Nobody else is touched.
        bystander.ping().await;
        assert!(
            !matches!(
                bystander.recv_wire(Duration::from_millis(200)).await,
                Some(Event::Closed(_))
            ),
            "another user's session was closed"
        );
        // Rotating a disabled user's token is refused and opens nothing.
        let (status, body) = admin_post(&c, 1, "/v1/admin/users/mallory/rotate-token").await;
        assert_eq!(
            (status, &body["code"]),
            (409, &Value::from("user_disabled")),
            "{body}"
        );
        let (status, body) = admin_post(&c, 1, "/v1/admin/users/nobody/rotate-token").await;
        assert_eq!(
            (status, &body["code"]),
            (404, &Value::from("unknown_user")),
            "{body}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_rotating_a_token_ends_old_sessions_everywhere_and_the_new_token_works() {
    bounded(async {
        let c = cluster3(&[]).await;
        let old = create_user(&c, 1, "rita").await;
        let bob = create_user(&c, 1, "bob").await;
        let mut sessions = one_session_per_node(&c, "rita", &old).await;

        let started = Instant::now();
        let (status, body) = admin_post(&c, 2, "/v1/admin/users/rita/rotate-token").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["user"], "rita");
        let new = body["token"].as_str().unwrap().to_string();
        assert_eq!(new.len(), 64);
        assert_ne!(new, old);
        let (codes, slowest) = closes(&mut sessions, started).await;
        println!("rotate-token: every old session closed {slowest:?} after the request");
        assert_eq!(codes, vec![Some(4004); 3]);
        assert!(slowest <= REVOKE_BOUND, "closed after {slowest:?}");
        refused_everywhere(&c, "rita", &old).await;

        // The new token opens sessions on every node and sends.
        let mut b = Ws::connect(c.node(3).api, "bob", &bob).await;
        for id in 1..=3 {
            let mut s = Ws::connect(c.node(id).api, "rita", &new).await;
            let chat = s.open_direct("bob").await;
            let ack = s.send_ok(&chat, &format!("after-rotate-{id}"), "hi").await;
            assert_eq!(ack["duplicate"], false, "{ack}");
            s.close().await;
        }
        let chat = b.open_direct("rita").await;
        let history = b.full_history(&chat).await;
        assert_eq!(history.len(), 3, "{history:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_a_node_without_an_admin_token_refuses_admin_calls() {
    bounded(async {
        let mut c = Cluster::init(3, &[]);
        c.edit_config(3, |t| {
            t.remove("admin_token_sha256");
        });
        c.start_all();
        c.wait_ready(READY).await;
        let plain = reqwest::Client::new();
        for path in ["/v1/admin/cluster", "/v1/admin/users"] {
            // With the cluster's admin token, and with none: both refused, clearly.
            for with_token in [true, false] {
                let r = if with_token {
                    c.http.get(c.url(3, path)).send().await.unwrap()
                } else {
                    plain.get(c.url(3, path)).send().await.unwrap()
                };
                assert_eq!(r.status().as_u16(), 403, "{path}");
                let body: Value = r.json().await.unwrap();
                assert_eq!(body["code"], "admin_disabled", "{body}");
                assert!(body["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("admin_token_sha256")));
            }
        }
        let r = plain
            .post(c.url(3, "/v1/admin/users"))
            .json(&serde_json::json!({"user": "eve"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403);
        // Nothing was created, and the nodes with a token still serve admin calls.
        let users: Value = c
            .http
            .get(c.url(1, "/v1/admin/users"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(users, serde_json::json!([]), "{users}");
        let r = plain.get(c.url(1, "/v1/admin/users")).send().await.unwrap();
        assert_eq!(
            r.status().as_u16(),
            401,
            "a wrong or missing token is still 401"
        );
    })
    .await;
}
