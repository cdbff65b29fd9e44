//! The chat service end to end: clients on WebSocket against a real 3-node cluster.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::time::{Duration, Instant};

use futures::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::chat_presence::presence;
use crate::harness::{create_user_via, Cluster};
use crate::ws::{self, Event, Ws};

pub(crate) const READY: Duration = Duration::from_secs(60);
/// Hard bound of one test, cluster start included (a liveness bound, not a target).
const TEST_LIMIT: Duration = Duration::from_secs(180);
/// How long live delivery may take to reach every member.
pub(crate) const DELIVERY: Duration = Duration::from_secs(20);

/// Runs a test body within `TEST_LIMIT`; the cluster it owns is killed when it is dropped.
pub(crate) async fn bounded(body: impl Future<Output = ()>) {
    if tokio::time::timeout(TEST_LIMIT, body).await.is_err() {
        panic!("test did not finish within {TEST_LIMIT:?}");
    }
}

/// A 3-node cluster (`extra` init flags), every node ready.
pub(crate) async fn cluster3(extra: &[&str]) -> Cluster {
    let mut c = Cluster::init(3, extra);
    c.start_all();
    c.wait_ready(READY).await;
    c
}

/// Creates `user` through node `via` and waits until every running node knows it.
///
/// Each node applies the creation to its own replica of the metadata group, a little later
/// than the leader that answered: until then it refuses the token (docs/protocol.md says to
/// retry a first 4001 after a short delay; `chat_fresh_token_...` tests exactly that). The
/// wait keeps that race out of tests about other things. It uses the admin user list (each
/// node's own view) and opens no session, which would disturb presence.
pub(crate) async fn create_user(c: &Cluster, via: u64, user: &str) -> String {
    let token = create_user_via(c, via, user).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in c.nodes.iter().filter(|n| n.child.is_some()) {
        loop {
            let r = c.http.get(c.url(n.id, "/v1/admin/users")).send().await;
            let listed: Option<Value> = match r {
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
                "node {} never learnt of user {user}",
                n.id
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    token
}

/// FNV-1a 64, the cluster's stable hash.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The partition group of a chat.
pub(crate) fn partition(chat: &str, partitions: u64) -> u64 {
    1 + fnv1a64(chat.as_bytes()) % partitions
}

/// The node that leads `group` among `among`, by the nodes' own views (highest term wins).
pub(crate) async fn leader_of(c: &Cluster, group: u64, among: &[u64]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut best: Option<(u64, u64)> = None;
        for id in among {
            if let Some(v) = c.local(*id, group).await {
                if v["role"] == "Leader" {
                    let term = v["term"].as_u64().unwrap_or(0);
                    if best.is_none_or(|(t, _)| term > t) {
                        best = Some((term, *id));
                    }
                }
            }
        }
        if let Some((_, id)) = best {
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "no leader of {group} among {among:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn seqs(messages: &[Value]) -> Vec<u64> {
    messages
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect()
}

pub(crate) fn is_error(frame: &Value, code: &str) -> bool {
    frame["type"] == "error" && frame["code"] == code
}

/// Asserts `frame` is an error with `code` (and the request id `id` when given).
pub(crate) fn assert_error(frame: &Value, code: &str, id: Option<&str>) {
    assert!(is_error(frame, code), "expected error {code}, got {frame}");
    assert!(
        frame["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{frame}"
    );
    if let Some(id) = id {
        assert_eq!(frame["id"], id, "{frame}");
    }
}

// 1 -----------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_order_ten_members_on_three_nodes_see_one_gapless_sequence() {
    bounded(async {
        let c = cluster3(&[]).await;
        const USERS: usize = 10;
        const PER_USER: usize = 20;
        let users: Vec<String> = (0..USERS).map(|i| format!("user{i}")).collect();
        let mut clients = Vec::new();
        for (i, u) in users.iter().enumerate() {
            let node = i as u64 % 3 + 1;
            let token = create_user(&c, node, u).await;
            clients.push(Ws::connect(c.node(node).api, u, &token).await);
        }
        // Everyone is connected before the group exists, so every live frame is seen.
        let others: Vec<&str> = users[1..].iter().map(String::as_str).collect();
        let (chat, last_join) = clients[0].create_group("everyone", &others).await;
        assert!(chat.starts_with("g:"), "{chat}");
        assert_eq!(last_join, USERS as u64, "one join entry per member");
        let last_seq = (USERS + USERS * PER_USER) as u64;

        let mut tasks = Vec::new();
        for (i, mut ws) in clients.into_iter().enumerate() {
            let chat = chat.clone();
            tasks.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                for j in 0..PER_USER {
                    let text = format!("{} says {j}", ws.user);
                    let a = ws.send_ok(&chat, &format!("m{i}-{j}"), &text).await;
                    assert_eq!(a["chat"], chat.as_str(), "{a}");
                    assert_eq!(a["duplicate"], false, "{a}");
                    let seq = a["seq"].as_u64().unwrap();
                    assert_eq!(a["msg_id"], format!("{chat}/{seq}"), "{a}");
                    acked.push((seq, text));
                }
                let is_msg = |f: &Value| f["type"] == "message" && f["message"]["chat"] == chat;
                let mut got: Vec<Value> = ws
                    .take_pending(is_msg)
                    .into_iter()
                    .map(|f| f["message"].clone())
                    .collect();
                let deadline = Instant::now() + DELIVERY;
                let user = ws.user.clone();
                let complete = |got: &[Value]| {
                    let join = got
                        .iter()
                        .find(|m| m["kind"] == "join" && m["text"] == user.as_str());
                    join.is_some_and(|j| {
                        got.len() as u64 == last_seq + 1 - j["seq"].as_u64().unwrap()
                    })
                };
                while !complete(&got) && Instant::now() < deadline {
                    if let Some(f) = ws.wait_for(Duration::from_millis(500), is_msg).await {
                        got.push(f["message"].clone());
                    }
                }
                (ws, acked, got)
            }));
        }
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }

        // The stored order: joins first, then every acked send at its acked seq.
        let reference = results[0].0.full_history(&chat).await;
        assert_eq!(
            seqs(&reference),
            (1..=last_seq).collect::<Vec<_>>(),
            "history is gapless"
        );
        let joined: BTreeSet<&str> = reference[..USERS]
            .iter()
            .map(|m| {
                assert_eq!(m["kind"], "join", "{m}");
                m["text"].as_str().unwrap()
            })
            .collect();
        assert_eq!(joined.len(), USERS);
        let by_seq: BTreeMap<u64, &Value> = reference
            .iter()
            .map(|m| (m["seq"].as_u64().unwrap(), m))
            .collect();
        for (ws, acked, _) in &results {
            let mut prev = 0;
            for (seq, text) in acked {
                assert!(*seq > prev, "{}'s acks go up: {acked:?}", ws.user);
                prev = *seq;
                let m = by_seq[seq];
                assert_eq!(m["kind"], "text", "{m}");
                assert_eq!(m["sender"], ws.user.as_str(), "{m}");
                assert_eq!(m["text"], text.as_str(), "{m}");
            }
        }
        let texts = reference.iter().filter(|m| m["kind"] == "text").count();
        assert_eq!(texts, USERS * PER_USER);

        // Live delivery: every member got exactly its visible suffix of the log, in order,
        // each frame equal to the stored message, so all members saw the same sequence.
        for (ws, _, got) in &results {
            let join = got
                .iter()
                .find(|m| m["kind"] == "join" && m["text"] == ws.user.as_str())
                .unwrap_or_else(|| panic!("{} never saw its own join entry", ws.user));
            let from = join["seq"].as_u64().unwrap();
            let received = seqs(got);
            let expected: Vec<u64> = (from..=last_seq).collect();
            if received != expected {
                let have: BTreeSet<u64> = received.iter().copied().collect();
                let missing: Vec<u64> = expected
                    .iter()
                    .copied()
                    .filter(|s| !have.contains(s))
                    .collect();
                panic!(
                    "{} (node {}) received {} of {} live messages; missing seqs {missing:?}; \
                     received order {received:?}",
                    ws.user,
                    users.iter().position(|u| *u == ws.user).unwrap() as u64 % 3 + 1,
                    received.len(),
                    expected.len()
                );
            }
            for m in got {
                assert_eq!(m, by_seq[&m["seq"].as_u64().unwrap()], "{}", ws.user);
            }
            let text_seqs: Vec<u64> = got
                .iter()
                .filter(|m| m["kind"] == "text")
                .map(|m| m["seq"].as_u64().unwrap())
                .collect();
            assert_eq!(text_seqs.len(), USERS * PER_USER, "{}", ws.user);
        }
    })
    .await;
}

// 2 -----------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_send_retried_across_a_leader_kill_is_stored_once() {
    bounded(async {
        // The hash the test uses is the cluster's (golden value of membership's tests).
        assert_eq!(partition("d:alice:bob", 64), 53);
        let mut c = cluster3(&[]).await;
        let alice_token = create_user(&c, 1, "alice").await;
        create_user(&c, 1, "bob").await;
        let chat = "d:alice:bob";
        let group = partition(chat, 16);
        let leader = leader_of(&c, group, &[1, 2, 3]).await;
        let mut alice_node = if leader == 1 { 2 } else { 1 };
        let mut alice = Ws::connect(c.node(alice_node).api, "alice", &alice_token).await;
        assert_eq!(alice.open_direct("bob").await, chat);
        let before = alice.send_ok(chat, "k0", "before").await;
        assert_eq!(before["seq"], 1);
        let first = alice.send_ok(chat, "k1", "exactly once").await;
        assert_eq!(first["seq"], 2);
        assert_eq!(first["duplicate"], false);

        let leader = leader_of(&c, group, &[1, 2, 3]).await;
        if leader == alice_node {
            // Leadership moved meanwhile: alice must survive the kill.
            alice.close().await;
            alice_node = [1, 2, 3].into_iter().find(|n| *n != leader).unwrap();
            alice = Ws::connect(c.node(alice_node).api, "alice", &alice_token).await;
        }
        c.kill(leader);
        let survivors: Vec<u64> = [1, 2, 3].into_iter().filter(|n| *n != leader).collect();

        // The client retries the same send (same client_msg_id and text) until acked.
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut errors = Vec::new();
        let retry = loop {
            let a = alice.send(chat, "k1", "exactly once").await;
            if a["type"] == "ack" {
                break a;
            }
            assert!(
                is_error(&a, "unavailable")
                    || is_error(&a, "outcome_unknown")
                    || is_error(&a, "rate_limited"),
                "a retry during failover may only fail as unavailable/outcome_unknown: {a}"
            );
            errors.push(a["code"].as_str().unwrap().to_string());
            assert!(
                Instant::now() < deadline,
                "the retry was never acked after killing node {leader}: {errors:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        eprintln!("killed node {leader}, leader of partition {group}; failed retries: {errors:?}");
        assert_eq!(
            retry["seq"], first["seq"],
            "same seq as the first ack: {retry}"
        );
        assert_eq!(retry["msg_id"], first["msg_id"], "{retry}");
        assert_eq!(retry["ts"], first["ts"], "{retry}");
        assert_eq!(retry["duplicate"], true, "{retry}");
        let new_leader = leader_of(&c, group, &survivors).await;
        assert_ne!(new_leader, leader);

        // The chat goes on gapless, and its history holds the message once.
        let after = alice.send_ok(chat, "k2", "after").await;
        assert_eq!(after["seq"], 3, "{after}");
        assert_eq!(after["duplicate"], false);
        let history = alice.full_history(chat).await;
        assert_eq!(seqs(&history), vec![1, 2, 3], "{history:?}");
        let texts: Vec<&str> = history
            .iter()
            .map(|m| m["text"].as_str().unwrap())
            .collect();
        assert_eq!(texts, vec!["before", "exactly once", "after"]);
        assert_eq!(
            history
                .iter()
                .filter(|m| m["text"] == "exactly once")
                .count(),
            1
        );
    })
    .await;
}

// 3 -----------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_offline_member_catches_up_on_1000_messages_by_sync_and_history() {
    bounded(async {
        let c = cluster3(&[]).await;
        let alice_token = create_user(&c, 1, "alice").await;
        let bob_token = create_user(&c, 1, "bob").await;
        let mut bob = Ws::connect(c.node(2).api, "bob", &bob_token).await;
        let chat = bob.open_direct("alice").await;
        assert_eq!(chat, "d:alice:bob");
        bob.close().await;

        let mut alice = Ws::connect(c.node(1).api, "alice", &alice_token).await;
        const N: usize = 1000;
        const IN_FLIGHT: usize = 32;
        // Pipelined sends. The default limit (burst 200, then 50/s) refuses some: those are
        // retried (same client_msg_id) after a pause, as a client would.
        let mut queue: VecDeque<usize> = (0..N).collect();
        let mut paused_until = Instant::now();
        let mut in_flight: HashMap<String, usize> = HashMap::new();
        let mut acked: BTreeMap<u64, usize> = BTreeMap::new();
        let mut rate_limited = 0;
        let deadline = Instant::now() + Duration::from_secs(90);
        while acked.len() < N {
            assert!(
                Instant::now() < deadline,
                "only {} of {N} sends acked",
                acked.len()
            );
            while in_flight.len() < IN_FLIGHT && Instant::now() >= paused_until {
                let Some(i) = queue.pop_front() else { break };
                let id = alice.id();
                alice
                    .send_json(&json!({
                        "type": "send", "id": id, "chat": chat,
                        "client_msg_id": format!("c{i}"), "text": format!("message {i:04}")
                    }))
                    .await;
                in_flight.insert(id, i);
            }
            let frame = match alice.recv(Duration::from_millis(50)).await {
                None => continue,
                Some(Event::Closed(code)) => panic!("alice's connection closed: {code:?}"),
                Some(Event::Frame(f)) => f,
            };
            let Some(i) = frame["id"].as_str().and_then(|id| in_flight.remove(id)) else {
                assert!(
                    matches!(frame["type"].as_str(), Some("message" | "receipt")),
                    "{frame}"
                );
                continue;
            };
            match frame["type"].as_str() {
                Some("ack") => {
                    assert_eq!(frame["duplicate"], false, "{frame}");
                    let seq = frame["seq"].as_u64().unwrap();
                    assert!(acked.insert(seq, i).is_none(), "seq {seq} acked twice");
                }
                _ if is_error(&frame, "rate_limited") => {
                    rate_limited += 1;
                    queue.push_front(i);
                    paused_until = Instant::now() + Duration::from_millis(500);
                }
                _ => panic!("send {i} failed: {frame}"),
            }
        }
        assert_eq!(
            acked.keys().copied().collect::<Vec<_>>(),
            (1..=N as u64).collect::<Vec<_>>(),
            "gapless seqs"
        );
        eprintln!("offline test: {rate_limited} sends were rate limited and retried");

        // Bob comes back on another node.
        let mut bob = Ws::connect(c.node(3).api, "bob", &bob_token).await;
        let state = bob.chat_state(&chat).await;
        assert_eq!(state["kind"], "direct", "{state}");
        assert_eq!(state["members"], json!(["alice", "bob"]), "{state}");
        assert_eq!(state["last_seq"], N as u64, "{state}");
        assert_eq!(state["unread"], N as u64, "{state}");
        assert_eq!(state["read"], 0, "{state}");
        let mut after = 0u64;
        let mut pages = 0;
        let mut texts = Vec::new();
        loop {
            let page = bob.history(&chat, None, Some(after), Some(100)).await;
            assert_eq!(page["type"], "history", "{page}");
            assert_eq!(page["chat"], chat.as_str());
            let msgs = page["messages"].as_array().unwrap();
            if after == N as u64 {
                assert!(msgs.is_empty(), "nothing after the last message: {page}");
                assert_eq!(page["more"], false);
                break;
            }
            pages += 1;
            assert_eq!(msgs.len(), 100, "page {pages}");
            assert_eq!(
                seqs(msgs),
                (after + 1..=after + 100).collect::<Vec<_>>(),
                "page {pages}"
            );
            assert_eq!(page["more"], after + 100 < N as u64, "page {pages}");
            for m in msgs {
                assert_eq!(m["sender"], "alice", "{m}");
                assert_eq!(m["kind"], "text", "{m}");
                texts.push(m["text"].as_str().unwrap().to_string());
            }
            after += 100;
        }
        assert_eq!(pages, 10);
        let expected: Vec<String> = acked.values().map(|i| format!("message {i:04}")).collect();
        assert_eq!(texts, expected, "each text at the seq its ack named");
        let distinct: BTreeSet<&String> = texts.iter().collect();
        assert_eq!(distinct.len(), N, "every message exactly once");
        // Offline (webhook) notifications are not covered here.
    })
    .await;
}

// 4 -----------------------------------------------------------------------------------------

/// Waits until `ws` gets a receipt frame of `user` in `chat` with these cursors; returns every
/// receipt frame of that user and chat seen until then (they must only move forward).
async fn wait_receipt(
    ws: &mut Ws,
    chat: &str,
    user: &str,
    delivered: u64,
    read: u64,
) -> Vec<Value> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let f = ws
            .wait_for(left, |f| {
                f["type"] == "receipt" && f["chat"] == chat && f["user"] == user
            })
            .await
            .unwrap_or_else(|| {
                panic!(
                    "{} got no receipt ({delivered}, {read}) of {user} in {chat}; saw {seen:?}",
                    ws.user
                )
            });
        if let Some(prev) = seen.last() {
            let prev: &Value = prev;
            assert!(
                f["delivered"].as_u64() >= prev["delivered"].as_u64()
                    && f["read"].as_u64() >= prev["read"].as_u64(),
                "cursors went back: {prev} then {f}"
            );
        }
        seen.push(f.clone());
        if f["delivered"] == delivered && f["read"] == read {
            return seen;
        }
    }
}

/// Asserts no receipt frame of `user` in `chat` reaches `ws` within `quiet`.
pub(crate) async fn assert_no_receipt(ws: &mut Ws, chat: &str, user: &str, quiet: Duration) {
    let f = ws
        .wait_for(quiet, |f| {
            f["type"] == "receipt" && f["chat"] == chat && f["user"] == user
        })
        .await;
    assert!(f.is_none(), "{}: unexpected receipt {f:?}", ws.user);
}

fn assert_cursors(state: &Value, last_seq: u64, delivered: u64, read: u64, unread: u64) {
    assert_eq!(state["last_seq"], last_seq, "{state}");
    assert_eq!(state["delivered"], delivered, "{state}");
    assert_eq!(state["read"], read, "{state}");
    assert_eq!(state["unread"], unread, "{state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_receipts_move_cursors_forward_only_and_edits_reach_members() {
    bounded(async {
        let c = cluster3(&[]).await;
        let mut tokens = HashMap::new();
        for u in ["alice", "bob", "carol"] {
            tokens.insert(u, create_user(&c, 2, u).await);
        }
        let mut alice = Ws::connect(c.node(1).api, "alice", &tokens["alice"]).await;
        let mut bob = Ws::connect(c.node(2).api, "bob", &tokens["bob"]).await;
        let mut carol = Ws::connect(c.node(3).api, "carol", &tokens["carol"]).await;

        // Direct chat.
        let chat = alice.open_direct("bob").await;
        for i in 1..=5u64 {
            let a = alice
                .send_ok(&chat, &format!("d{i}"), &format!("text {i}"))
                .await;
            assert_eq!(a["seq"], i);
        }
        for i in 1..=5u64 {
            bob.wait_for(DELIVERY, |f| {
                f["type"] == "message" && f["message"]["chat"] == chat && f["message"]["seq"] == i
            })
            .await
            .unwrap_or_else(|| panic!("bob never got message {i}"));
        }
        bob.send_json(&json!({"type": "receipt", "chat": chat, "delivered": 5, "read": 3}))
            .await;
        wait_receipt(&mut alice, &chat, "bob", 5, 3).await;
        assert_cursors(&bob.chat_state(&chat).await, 5, 5, 3, 2);
        // A receipt going backwards changes nothing and tells nobody.
        bob.send_json(&json!({"type": "receipt", "chat": chat, "delivered": 2, "read": 1}))
            .await;
        assert_no_receipt(&mut alice, &chat, "bob", Duration::from_millis(1500)).await;
        assert_cursors(&bob.chat_state(&chat).await, 5, 5, 3, 2);
        // Alice's own cursors were never touched.
        assert_cursors(&alice.chat_state(&chat).await, 5, 0, 0, 0);

        // Edit message 1, delete message 2: bob sees both changes live and in history.
        let e = alice
            .request(json!({"type": "edit", "chat": chat, "seq": 1, "text": "text 1, edited"}))
            .await;
        assert_eq!(e["type"], "done", "{e}");
        assert_eq!(e["seq"], 6, "the edit is entry 6 of the log: {e}");
        let d = alice
            .request(json!({"type": "delete", "chat": chat, "seq": 2}))
            .await;
        assert_eq!(d["type"], "done", "{d}");
        assert_eq!(d["seq"], 7, "{d}");
        let up1 = bob
            .wait_for(DELIVERY, |f| {
                f["type"] == "updated" && f["message"]["seq"] == 1
            })
            .await
            .expect("bob gets the edit");
        assert_eq!(up1["message"]["chat"], chat.as_str(), "{up1}");
        assert_eq!(up1["message"]["text"], "text 1, edited", "{up1}");
        assert_eq!(up1["message"]["kind"], "text", "{up1}");
        assert!(up1["message"]["edited_ts"].as_u64().is_some(), "{up1}");
        let up2 = bob
            .wait_for(DELIVERY, |f| {
                f["type"] == "updated" && f["message"]["seq"] == 2
            })
            .await
            .expect("bob gets the delete");
        assert_eq!(up2["message"]["kind"], "deleted", "{up2}");
        assert_eq!(up2["message"]["text"], "", "{up2}");
        for (seq, kind) in [(6, "edit"), (7, "delete")] {
            let m = bob
                .wait_for(DELIVERY, |f| {
                    f["type"] == "message"
                        && f["message"]["chat"] == chat
                        && f["message"]["seq"] == seq
                })
                .await
                .unwrap_or_else(|| panic!("bob gets the {kind} entry"));
            assert_eq!(m["message"]["kind"], kind, "{m}");
        }
        let history = bob.full_history(&chat).await;
        assert_eq!(seqs(&history), (1..=7).collect::<Vec<_>>());
        assert_eq!(history[0]["text"], "text 1, edited");
        assert_eq!(history[0]["kind"], "text");
        assert_eq!(history[1]["kind"], "deleted");
        assert_eq!(history[1]["text"], "");
        assert_eq!(history[2]["text"], "text 3");
        assert_eq!(history[5]["kind"], "edit");
        assert_eq!(history[6]["kind"], "delete");
        // Only the sender changes a message.
        let refused = bob
            .request(json!({"type": "edit", "chat": chat, "seq": 3, "text": "mine now"}))
            .await;
        assert_error(&refused, "forbidden", None);
        let refused = bob
            .request(json!({"type": "delete", "chat": chat, "seq": 3}))
            .await;
        assert_error(&refused, "forbidden", None);
        // Markers are not unread messages: bob still has 4 and 5 to read.
        assert_cursors(&bob.chat_state(&chat).await, 7, 5, 3, 2);

        // Group chat of three: joins are entries 1-3, messages 4-8.
        let (group, last_join) = alice.create_group("trio", &["bob", "carol"]).await;
        assert_eq!(last_join, 3);
        for i in 4..=8u64 {
            let a = alice
                .send_ok(&group, &format!("g{i}"), &format!("group {i}"))
                .await;
            assert_eq!(a["seq"], i);
        }
        for ws in [&mut bob, &mut carol] {
            ws.wait_for(DELIVERY, |f| {
                f["type"] == "message" && f["message"]["chat"] == group && f["message"]["seq"] == 8
            })
            .await
            .unwrap_or_else(|| panic!("{} never got message 8", ws.user));
        }
        bob.send_json(&json!({"type": "receipt", "chat": group, "delivered": 8, "read": 6}))
            .await;
        wait_receipt(&mut alice, &group, "bob", 8, 6).await;
        wait_receipt(&mut carol, &group, "bob", 8, 6).await;
        assert_cursors(&bob.chat_state(&group).await, 8, 8, 6, 2);
        assert_cursors(&carol.chat_state(&group).await, 8, 0, 0, 5);
        bob.send_json(&json!({"type": "receipt", "chat": group, "read": 2}))
            .await;
        assert_no_receipt(&mut carol, &group, "bob", Duration::from_millis(1500)).await;
        assert_cursors(&bob.chat_state(&group).await, 8, 8, 6, 2);
        // Reading moves delivered along; a cursor past the end stops at the end.
        carol
            .send_json(&json!({"type": "receipt", "chat": group, "read": 99}))
            .await;
        wait_receipt(&mut alice, &group, "carol", 8, 8).await;
        wait_receipt(&mut bob, &group, "carol", 8, 8).await;
        assert_cursors(&carol.chat_state(&group).await, 8, 8, 8, 0);
        // The direct chat's cursors were not touched by any of this.
        assert_cursors(&bob.chat_state(&chat).await, 7, 5, 3, 2);
    })
    .await;
}

// 5 -----------------------------------------------------------------------------------------

/// A request that makes a reply of about 10 KB: presence of 256 (unknown) users.
fn presence_request(i: usize) -> String {
    let users: Vec<String> = (0..256).map(|u| format!("nobody-{i:05}-{u:03}")).collect();
    json!({"type": "presence", "id": format!("p{i}"), "users": users}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_client_that_never_reads_is_closed_and_others_are_unaffected() {
    bounded(async {
        let c = cluster3(&[]).await;
        let mut t = HashMap::new();
        for u in ["alice", "bob", "sloth"] {
            t.insert(u, create_user(&c, 1, u).await);
        }
        let mut alice = Ws::connect(c.node(1).api, "alice", &t["alice"]).await;
        let mut bob = Ws::connect(c.node(2).api, "bob", &t["bob"]).await;
        let chat = alice.open_direct("bob").await;
        let sloth = Ws::connect(c.node(1).api, "sloth", &t["sloth"]).await;
        let p = presence(&mut alice, &["sloth"]).await;
        assert_eq!(p["sloth"]["online"], true, "{p:?}");

        // 10,000 pipelined requests, each answered with ~10 KB, and never a read: far more
        // than the socket buffers and the 4096-frame outbound queue hold.
        const FRAMES: usize = 10_000;
        let writer = tokio::spawn(async move {
            let mut sloth = sloth;
            let mut written = 0;
            for i in 0..FRAMES {
                if sloth
                    .stream
                    .feed(Message::text(presence_request(i)))
                    .await
                    .is_err()
                {
                    break;
                }
                written += 1;
                if i % 64 == 63 && sloth.stream.flush().await.is_err() {
                    break;
                }
            }
            let _ = sloth.stream.flush().await;
            (sloth, written)
        });

        // Meanwhile, and afterwards, others are served; the server ends sloth's session
        // (it goes offline) while sloth still reads nothing.
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut n = 0;
        loop {
            n += 1;
            let started = Instant::now();
            alice.ping().await;
            let a = alice.send_ok(&chat, &format!("s{n}"), "unaffected").await;
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "alice was slowed down: {:?}",
                started.elapsed()
            );
            bob.wait_for(DELIVERY, |f| {
                f["type"] == "message" && f["message"]["seq"] == a["seq"]
            })
            .await
            .expect("bob gets alice's message");
            let p = presence(&mut alice, &["sloth"]).await;
            if p["sloth"]["online"] == false {
                break;
            }
            if Instant::now() >= deadline {
                let metrics = c
                    .http
                    .get(c.url(1, "/metrics"))
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                let gauge: Vec<&str> = metrics
                    .lines()
                    .filter(|l| l.starts_with("chatd_connections"))
                    .collect();
                panic!(
                    "a client that never reads still has its session after 40 s \
                     (its writes finished: {}; node 1 {gauge:?})",
                    writer.is_finished()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let (mut sloth, written) = tokio::time::timeout(Duration::from_secs(20), writer)
            .await
            .expect("the slow client's writes end once the server closed it")
            .unwrap();
        // Now sloth reads: what was in flight, then the end of the connection.
        let (frames, code) = sloth.expect_close(Duration::from_secs(20)).await;
        eprintln!(
            "slow consumer: {written} frames written, {} read back, close {code:?}",
            frames.len()
        );
        assert!(
            code.is_none() || code == Some(4008),
            "slow consumer close code: {code:?}"
        );
        assert!(
            frames.len() < FRAMES,
            "the server dropped the session instead of answering everything"
        );
        alice.ping().await;
        bob.ping().await;
        alice.send_ok(&chat, "last", "still fine").await;
    })
    .await;
}

// Users and tokens --------------------------------------------------------------------------

/// A token is usable as soon as `POST /v1/admin/users` returned it, up to the documented
/// race: a node whose replica of the metadata group has not applied the creation yet refuses
/// it (unauthorized, 4001), and "a client should retry a first 4001 after a short delay"
/// (docs/protocol.md, create user). Fresh users are created through group 0's followers (where
/// the race is) and connected at once to the node that created them; a refused one must be
/// accepted on one retry 200 ms later.
///
/// Note: the refusal happens even on the node that answered 201 (api.rs `create_user` answers
/// once the leader applied the entry; gateway.rs `serve` checks `node.meta.user_by_token`
/// on the local replica). Documented, so not asserted against; see the report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_first_send_to_a_direct_chat_opens_it() {
    bounded(async {
        let c = cluster3(&[]).await;
        let mut t = HashMap::new();
        for u in ["alice", "bob"] {
            t.insert(u, create_user(&c, 1, u).await);
        }
        let mut alice = Ws::connect(c.node(1).api, "alice", &t["alice"]).await;
        let mut bob = Ws::connect(c.node(2).api, "bob", &t["bob"]).await;
        // No open_direct: the first send opens the chat and is its first message.
        let a = alice.send_ok("d:alice:bob", "first", "hi bob").await;
        assert_eq!(
            (a["seq"].as_u64(), a["duplicate"].as_bool()),
            (Some(1), Some(false)),
            "{a}"
        );
        // A retry is the same message, not a second chat or a second copy.
        let again = alice.send_ok("d:alice:bob", "first", "hi bob").await;
        assert_eq!(
            (again["seq"].as_u64(), again["duplicate"].as_bool()),
            (Some(1), Some(true))
        );
        // Bob has the chat in his list and reads the message; he can answer at once.
        let state = bob.chat_state("d:alice:bob").await;
        assert_eq!(state["last_seq"], 1, "{state}");
        let history = bob.full_history("d:alice:bob").await;
        assert_eq!(history.len(), 1);
        assert_eq!(history[0]["text"], "hi bob");
        let b = bob.send_ok("d:alice:bob", "reply", "hi alice").await;
        assert_eq!(b["seq"], 2, "{b}");
        // open_direct afterwards finds the same chat.
        assert_eq!(alice.open_direct("bob").await, "d:alice:bob");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chat_fresh_token_is_accepted_at_once_on_any_node() {
    bounded(async {
        let c = cluster3(&[]).await;
        let meta_leader = leader_of(&c, 0, &[1, 2, 3]).await;
        let followers: Vec<u64> = [1, 2, 3]
            .into_iter()
            .filter(|n| *n != meta_leader)
            .collect();
        let mut refused_first = 0;
        for i in 0..200 {
            let via = followers[i % followers.len()];
            let user = format!("fresh{i}");
            let token = create_user_via(&c, via, &user).await;
            let stream = ws::open(c.node(via).api, Some(&token)).await.unwrap();
            let mut s = Ws::from_stream(&user, stream);
            let first = s.recv_frame(Duration::from_secs(10)).await;
            if first["type"] == "ready" {
                assert_eq!(first["user"], user.as_str(), "{first}");
                s.close().await;
                continue;
            }
            // The documented refusal, exactly.
            assert_error(&first, "unauthorized", None);
            let (rest, code) = s.expect_close(Duration::from_secs(10)).await;
            assert!(rest.is_empty(), "{rest:?}");
            assert_eq!(code, Some(4001));
            refused_first += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut again = Ws::connect(c.node(via).api, &user, &token).await;
            again.ping().await;
            again.close().await;
        }
        // The node that issued a token applies the user before answering, and any node
        // waits for its own replica to catch up before refusing: never a refusal.
        assert_eq!(
            refused_first, 0,
            "fresh tokens refused at first: {refused_first} of 200"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_typing_reaches_other_members_rate_limited_and_is_never_stored() {
    bounded(async {
        let c = cluster3(&[]).await;
        let alice_token = create_user(&c, 1, "alice").await;
        let bob_token = create_user(&c, 1, "bob").await;
        let carol_token = create_user(&c, 1, "carol").await;
        let mut alice = Ws::connect(c.node(1).api, "alice", &alice_token).await;
        let mut bob = Ws::connect(c.node(2).api, "bob", &bob_token).await;
        let mut carol = Ws::connect(c.node(3).api, "carol", &carol_token).await;
        let chat = alice.open_direct("bob").await;
        alice.send_ok(&chat, "t1", "hi").await;
        let is_typing = |f: &Value| f["type"] == "typing";
        // Three typing frames in quick succession: one reaches bob (rate limit 1/s).
        for _ in 0..3 {
            alice
                .send_json(&json!({"type": "typing", "chat": chat}))
                .await;
        }
        let t = bob
            .wait_for(DELIVERY, is_typing)
            .await
            .expect("bob sees alice typing");
        assert_eq!(
            (t["chat"].as_str(), t["user"].as_str()),
            (Some(chat.as_str()), Some("alice"))
        );
        assert!(
            bob.wait_for(Duration::from_millis(700), is_typing)
                .await
                .is_none(),
            "the extra typing frames within the interval were dropped"
        );
        // After the interval, typing goes through again.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        alice
            .send_json(&json!({"type": "typing", "chat": chat}))
            .await;
        assert!(bob.wait_for(DELIVERY, is_typing).await.is_some());
        // Not a member: carol hears nothing and her own typing is refused.
        assert!(carol
            .wait_for(Duration::from_millis(500), is_typing)
            .await
            .is_none());
        carol
            .send_json(&json!({"type": "typing", "chat": chat}))
            .await;
        let e = carol
            .wait_for(DELIVERY, |f| f["type"] == "error")
            .await
            .expect("an error for a non-member");
        assert_eq!(e["code"], "not_member", "{e}");
        // Never stored: the chat's log holds only the one message.
        let history = bob.full_history(&chat).await;
        assert_eq!(seqs(&history), vec![1], "{history:?}");
        // The sender does not get its own typing indicator.
        assert!(alice
            .wait_for(Duration::from_millis(300), is_typing)
            .await
            .is_none());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_a_full_node_refuses_new_sessions_with_4013_and_admits_again_when_one_closes() {
    bounded(async {
        let c = cluster3(&[]).await;
        c.set_everywhere("gateway", "sessions_max", toml::Value::Integer(3));
        // The bound counts sockets, authenticated or not: restart node 2 with it.
        let mut c = c;
        c.kill(2);
        c.start(2);
        c.wait_ready(Duration::from_secs(60)).await;
        let token = create_user(&c, 1, "dora").await;
        create_user(&c, 1, "erin").await;
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(Ws::connect(c.node(2).api, "dora", &token).await);
        }
        // An unauthenticated socket takes the third slot.
        let idle = ws::open(c.node(2).api, None).await.expect("third socket");
        let stream = ws::open(c.node(2).api, Some(&token)).await.unwrap();
        let mut fourth = Ws::from_stream("dora", stream);
        let e = fourth.recv_frame(Duration::from_secs(10)).await;
        assert_error(&e, "server_full", None);
        let (_, code) = fourth.expect_close(Duration::from_secs(10)).await;
        assert_eq!(code, Some(4013));
        let metrics = reqwest::get(c.url(2, "/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(metrics.contains("chatd_sessions_max 3"), "{metrics}");
        assert!(metrics.contains("chatd_sessions_open 3"), "{metrics}");
        // Other nodes are not affected; on node 2 a closed socket frees its slot.
        let _other = Ws::connect(c.node(1).api, "dora", &token).await;
        drop(idle);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut again = loop {
            let stream = ws::open(c.node(2).api, Some(&token)).await.unwrap();
            let mut w = Ws::from_stream("dora", stream);
            match w.wait_for(Duration::from_secs(2), |_| true).await {
                Some(f) if f["type"] == "error" => {
                    assert_eq!(f["code"], "server_full", "{f}");
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the slot was not freed"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => break w,
            }
        };
        let chat = again.open_direct("erin").await;
        again.send_ok(&chat, "full-1", "admitted again").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_sessions_per_user_are_bounded_and_every_device_gets_each_message() {
    bounded(async {
        let c = cluster3(&[]).await;
        let alice_token = create_user(&c, 1, "alice").await;
        let bob_token = create_user(&c, 1, "bob").await;
        // Eight devices of bob on node 2: the default bound.
        let mut devices = Vec::new();
        for _ in 0..8 {
            devices.push(Ws::connect(c.node(2).api, "bob", &bob_token).await);
        }
        let stream = ws::open(c.node(2).api, Some(&bob_token)).await.unwrap();
        let mut ninth = Ws::from_stream("bob", stream);
        let e = ninth.recv_frame(Duration::from_secs(10)).await;
        assert_error(&e, "forbidden", None);
        let (_, code) = ninth.expect_close(Duration::from_secs(10)).await;
        assert_eq!(code, Some(4003));
        // Every device (and bob's devices only) gets alice's message once.
        let mut alice = Ws::connect(c.node(1).api, "alice", &alice_token).await;
        let chat = alice.open_direct("bob").await;
        let ack = alice.send_ok(&chat, "multi", "to every device").await;
        for d in devices.iter_mut() {
            let m = d
                .wait_for(DELIVERY, |f| {
                    f["type"] == "message" && f["message"]["kind"] == "text"
                })
                .await
                .expect("each device gets the message");
            assert_eq!(m["message"]["seq"], ack["seq"]);
            assert!(
                d.wait_for(Duration::from_millis(200), |f| f["type"] == "message")
                    .await
                    .is_none(),
                "exactly once per device"
            );
        }
        // A closed device frees its slot.
        let first = devices.remove(0);
        first.close().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut again = Ws::connect(c.node(2).api, "bob", &bob_token).await;
        again.ping().await;
    })
    .await;
}

/// A leader sends a delivery only to the nodes holding a recipient's session (once it knows
/// every node's roster), and a session that has just opened gets the very next message
/// live: its node announced it to every leader before serving it anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_deliveries_go_only_to_nodes_holding_a_recipients_session() {
    use crate::failover::metric;
    const RECEIVED: &str = "chatd_peer_deliveries_received_total";
    async fn elsewhere(c: &Cluster) -> u64 {
        metric(c, 2, RECEIVED).await + metric(c, 3, RECEIVED).await
    }
    bounded(async {
        let c = cluster3(&[]).await;
        let ta = create_user(&c, 1, "alice").await;
        let tb = create_user(&c, 1, "bob").await;
        let tc = create_user(&c, 1, "carol").await;
        // Both of the first chat's members on node 1: nodes 2 and 3 hold no recipient, and
        // whichever node leads the chat's partition, one of them is not it.
        let mut alice = Ws::connect(c.node(1).api, "alice", &ta).await;
        let mut bob = Ws::connect(c.node(1).api, "bob", &tb).await;
        let chat = alice.open_direct("bob").await;
        let with_carol = alice.open_direct("carol").await;
        // Rosters are exchanged at start and whenever a peer comes up; until every node
        // knows every other's, deliveries still go everywhere (a liveness bound).
        let deadline = Instant::now() + Duration::from_secs(30);
        for n in 0.. {
            let before = elsewhere(&c).await;
            alice.send_ok(&chat, &format!("w{n}"), "warm-up").await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            if elsewhere(&c).await == before {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "deliveries still go to every node"
            );
        }
        let before = elsewhere(&c).await;
        for i in 0..20 {
            alice
                .send_ok(&chat, &format!("m{i}"), &format!("hello {i}"))
                .await;
        }
        let mut got = Vec::new();
        while got.len() < 20 {
            let f = bob
                .wait_for(DELIVERY, |f| {
                    f["type"] == "message"
                        && f["message"]["chat"] == chat.as_str()
                        && f["message"]["text"]
                            .as_str()
                            .is_some_and(|t| t.starts_with("hello"))
                })
                .await
                .unwrap_or_else(|| panic!("bob got {} of 20 messages live", got.len()));
            got.push(
                f["message"]["text"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
        }
        let want: Vec<String> = (0..20).map(|i| format!("hello {i}")).collect();
        assert_eq!(got, want, "every message, once, in order");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            elsewhere(&c).await,
            before,
            "nodes 2 and 3 hold no recipient's session: no delivery went there"
        );
        // Carol's first session, on node 3: the next message reaches her live.
        let mut carol = Ws::connect(c.node(3).api, "carol", &tc).await;
        alice.send_ok(&with_carol, "c1", "for carol").await;
        let live = carol
            .wait_for(DELIVERY, |f| {
                f["type"] == "message" && f["message"]["text"] == "for carol"
            })
            .await;
        assert!(live.is_some(), "a session that just opened missed a push");
    })
    .await;
}

/// `requests_in_flight_max` bounds the requests of one connection served at once; a client
/// that pipelines far more is slowed, not refused: every request is answered once, none is
/// dropped or closed as a slow consumer (the answers' queue slots are reserved), and the
/// other member gets every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_requests_pipelined_past_the_in_flight_bound_wait_and_are_all_answered() {
    const IN_FLIGHT: i64 = 4;
    const SENDS: u64 = 300;
    bounded(async {
        let mut c = Cluster::init(3, &["--send-rate-per-sec", "100000"]);
        c.set_everywhere(
            "gateway",
            "requests_in_flight_max",
            toml::Value::Integer(IN_FLIGHT),
        );
        // Answers and the sender's own pushes together exceed this many times over.
        c.set_everywhere(
            "gateway",
            "outbound_queue_frames_max",
            toml::Value::Integer(64),
        );
        c.start_all();
        c.wait_ready(READY).await;
        let mut t = HashMap::new();
        for u in ["alice", "bob"] {
            t.insert(u, create_user(&c, 1, u).await);
        }
        let mut alice = Ws::connect(c.node(1).api, "alice", &t["alice"]).await;
        let mut bob = Ws::connect(c.node(2).api, "bob", &t["bob"]).await;
        let chat = alice.open_direct("bob").await;
        // All at once, without reading: 75 times the bound.
        for i in 0..SENDS {
            alice
                .send_text(
                    json!({"type": "send", "id": format!("p{i}"), "chat": chat,
                           "client_msg_id": format!("m{i}"), "text": format!("pipelined {i}")})
                    .to_string(),
                )
                .await;
        }
        let mut acked = BTreeMap::new();
        while (acked.len() as u64) < SENDS {
            let f = alice.recv_frame(Duration::from_secs(30)).await;
            match f["type"].as_str() {
                Some("ack") => {
                    let id = f["id"].as_str().unwrap_or_default().to_string();
                    let seq = f["seq"].as_u64().expect("ack seq");
                    assert!(
                        acked.insert(id, seq).is_none(),
                        "two answers to one request"
                    );
                }
                Some("message") => {}
                other => panic!("unexpected frame {other:?}: {f}"),
            }
        }
        let seqs: BTreeSet<u64> = acked.values().copied().collect();
        assert_eq!(seqs.len() as u64, SENDS, "each send stored once");
        let history = bob.full_history(&chat).await;
        let texts: BTreeSet<String> = history
            .iter()
            .filter_map(|m| m["text"].as_str().map(str::to_string))
            .collect();
        assert_eq!(texts.len() as u64, SENDS, "bob reads every message");
        // The connection is still open and serves the next request.
        alice.ping().await;
    })
    .await;
}
