//! Presence end to end (moved from chat.rs): online and offline across nodes, a killed
//! node's users going offline, subscribers told.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::chat::{bounded, cluster3, create_user};
use crate::harness::Cluster;
use crate::ws::Ws;

/// Presence announcements are valid for the TTL (default 60 s); a short one keeps the test
/// short. Clients must then send a frame (ping) at least once per TTL or be closed as idle.
const PRESENCE_TTL_MS: u64 = 5_000;

fn short_presence_ttl() -> [&'static str; 4] {
    [
        "--presence-ttl-ms",
        "5000",
        "--presence-heartbeat-ms",
        "1000",
    ]
}

pub(crate) async fn presence(ws: &mut Ws, users: &[&str]) -> BTreeMap<String, Value> {
    let a = ws
        .request(json!({"type": "presence", "users": users}))
        .await;
    assert_eq!(a["type"], "presence_list", "{a}");
    let list = a["users"].as_array().unwrap();
    assert_eq!(list.len(), users.len(), "{a}");
    list.iter()
        .map(|p| (p["user"].as_str().unwrap().to_string(), p.clone()))
        .collect()
}

/// alice on node 1, bob on node 2, carol on node 3; all seen online by alice.
async fn three_online(c: &Cluster) -> (Ws, Ws, Ws) {
    let mut t = HashMap::new();
    for u in ["alice", "bob", "carol"] {
        t.insert(u, create_user(c, 1, u).await);
    }
    let mut alice = Ws::connect(c.node(1).api, "alice", &t["alice"]).await;
    let mut bob = Ws::connect(c.node(2).api, "bob", &t["bob"]).await;
    let mut carol = Ws::connect(c.node(3).api, "carol", &t["carol"]).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        bob.ping().await;
        carol.ping().await;
        let p = presence(&mut alice, &["alice", "bob", "carol"]).await;
        if p.values().all(|v| v["online"] == true) {
            break;
        }
        assert!(Instant::now() < deadline, "not all online: {p:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    (alice, bob, carol)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_presence_user_of_a_killed_node_goes_offline_others_stay_online() {
    bounded(async {
        let mut c = cluster3(&short_presence_ttl()).await;
        let (mut alice, mut bob, _carol) = three_online(&c).await;
        let killed_at = now_ms();
        c.kill(3);
        let bound = Duration::from_millis(PRESENCE_TTL_MS) + Duration::from_secs(15);
        let deadline = Instant::now() + bound;
        loop {
            bob.ping().await;
            let p = presence(&mut alice, &["carol", "alice", "bob"]).await;
            assert_eq!(p["alice"]["online"], true, "{p:?}");
            assert_eq!(p["bob"]["online"], true, "bob's node is alive: {p:?}");
            if p["carol"]["online"] == false {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "carol still online {bound:?} after her node died: {p:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        eprintln!(
            "carol offline {} ms after the kill",
            now_ms().saturating_sub(killed_at)
        );
        // Both alive users stay online a while longer (nothing else expires).
        for _ in 0..4 {
            bob.ping().await;
            let p = presence(&mut alice, &["carol", "alice", "bob"]).await;
            assert_eq!(p["alice"]["online"], true, "{p:?}");
            assert_eq!(p["bob"]["online"], true, "{p:?}");
            assert_eq!(p["carol"]["online"], false, "{p:?}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
}

/// Beyond the query: a subscriber is told, and the offline user has a last-seen time.
/// (This failed before 96858ee "Fix presence expiry pushes": `Presence::expire` dropped
/// expired announcements without reporting a change.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_presence_subscribers_learn_that_a_killed_nodes_user_went_offline() {
    bounded(async {
        let mut c = cluster3(&short_presence_ttl()).await;
        let (mut alice, mut bob, _carol) = three_online(&c).await;
        let sub = alice
            .request(json!({"type": "subscribe", "users": ["carol"]}))
            .await;
        assert_eq!(sub["type"], "presence_list", "{sub}");
        assert_eq!(sub["users"][0]["online"], true, "{sub}");
        let killed_at = now_ms();
        c.kill(3);
        let bound = Duration::from_millis(PRESENCE_TTL_MS) + Duration::from_secs(15);
        let deadline = Instant::now() + bound;
        let pushed = loop {
            bob.ping().await;
            alice.ping().await;
            let got = alice.take_pending(|f| f["type"] == "presence");
            if let Some(p) = got.into_iter().find(|f| f["presence"]["user"] == "carol") {
                break p;
            }
            if Instant::now() >= deadline {
                let p = presence(&mut alice, &["carol"]).await;
                panic!(
                    "alice subscribed to carol but was not told she went offline within \
                     {bound:?} (a query says {p:?})"
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        assert_eq!(pushed["presence"]["online"], false, "{pushed}");
        let seen = pushed["presence"]["last_seen"].as_u64();
        assert!(
            seen.is_some_and(|s| s + 2_000 >= killed_at - PRESENCE_TTL_MS && s <= now_ms()),
            "last_seen of a user who was online is a recent time: {pushed}"
        );
        let p = presence(&mut alice, &["carol"]).await;
        assert_eq!(p["carol"]["online"], false, "{p:?}");
        assert!(p["carol"]["last_seen"].as_u64().is_some(), "{p:?}");
    })
    .await;
}
