//! Idempotency end to end: a `client_msg_id` is scoped to (chat, sender) whatever the
//! partitions of the chats, and its record answers retries only for the dedup window.

use std::time::Duration;

use crate::chat::{bounded, cluster3, create_user, partition, READY};
use crate::harness::Cluster;
use crate::ws::Ws;

/// Partitions the test clusters have (`--partitions 16` in the harness).
const PARTITIONS: u64 = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_the_same_client_msg_id_in_chats_on_different_partitions_is_two_messages() {
    bounded(async {
        let c = cluster3(&[]).await;
        let alice = create_user(&c, 1, "alice").await;
        // Direct chats with users until two of them live on different partitions, and
        // two on the same partition (the case that used to be refused).
        let mut chats: Vec<(String, u64)> = Vec::new();
        for i in 0..40 {
            let user = format!("peer{i}");
            create_user(&c, 1, &user).await;
            let chat = format!("d:alice:{user}");
            chats.push((chat.clone(), partition(&chat, PARTITIONS)));
        }
        let (first, p1) = chats[0].clone();
        let (other, p2) = chats
            .iter()
            .find(|(_, p)| *p != p1)
            .cloned()
            .expect("two partitions among 40 chats");
        let (same, _) = chats
            .iter()
            .skip(1)
            .find(|(_, p)| *p == p1)
            .cloned()
            .expect("two chats on one partition among 40");
        println!("chats {first} (p{p1}), {other} (p{p2}), {same} (p{p1})");

        let mut a = Ws::connect(c.node(2).api, "alice", &alice).await;
        for chat in [&first, &other, &same] {
            let peer = chat.trim_start_matches("d:alice:");
            assert_eq!(a.open_direct(peer).await, *chat);
        }
        let mut acks = Vec::new();
        for chat in [&first, &other, &same] {
            let ack = a.send_ok(chat, "one-key", &format!("to {chat}")).await;
            assert_eq!(ack["duplicate"], false, "{ack}");
            assert_eq!(ack["chat"], chat.as_str());
            acks.push(ack);
        }
        // Retries in each chat, from another node: the original answers.
        let mut again = Ws::connect(c.node(3).api, "alice", &alice).await;
        for (chat, ack) in [&first, &other, &same].into_iter().zip(&acks) {
            let retry = again.send_ok(chat, "one-key", "ignored").await;
            assert_eq!(retry["duplicate"], true, "{retry}");
            assert_eq!((&retry["seq"], &retry["ts"]), (&ack["seq"], &ack["ts"]));
            let history = again.full_history(chat).await;
            assert_eq!(history.len(), 1, "{chat}: {history:?}");
            assert_eq!(history[0]["text"], format!("to {chat}"));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_a_retry_after_the_window_is_a_new_message_and_inside_it_is_not() {
    bounded(async {
        let mut c = Cluster::init(3, &[]);
        // The shortest window a config may set, so the test can outlive it.
        c.set_everywhere("gateway", "dedup_window_ms", toml::Value::Integer(1_000));
        c.start_all();
        c.wait_ready(READY).await;
        let alice = create_user(&c, 1, "alice").await;
        create_user(&c, 1, "bob").await;
        let mut a = Ws::connect(c.node(1).api, "alice", &alice).await;
        let chat = a.open_direct("bob").await;
        let first = a.send_ok(&chat, "k", "hello").await;
        let retry = a.send_ok(&chat, "k", "hello").await;
        assert_eq!(retry["duplicate"], true, "inside the window: {retry}");
        assert_eq!(retry["seq"], first["seq"]);
        tokio::time::sleep(Duration::from_millis(1_300)).await;
        let late = a.send_ok(&chat, "k", "hello").await;
        assert_eq!(late["duplicate"], false, "after the window: {late}");
        assert_eq!(late["seq"].as_u64(), first["seq"].as_u64().map(|s| s + 1));
        let late_retry = a.send_ok(&chat, "k", "hello").await;
        assert_eq!(late_retry["duplicate"], true);
        assert_eq!(late_retry["seq"], late["seq"]);
        assert_eq!(a.full_history(&chat).await.len(), 2);
    })
    .await;
}

/// Applies are written without RocksDB's WAL (the Raft log is the durable record): a crash
/// of every node between apply and the next memtable flush loses the applied state, and
/// each node must rebuild it from its log exactly once. Messages acknowledged just before
/// kill -9 of all three nodes (far too few to fill a memtable, so nothing was flushed) are
/// all there after the restart, once each, with gapless seqs; a retry of each is answered
/// as a duplicate with its first seq; the next send continues the sequence; and the
/// replicas agree record for record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_applied_state_lost_in_a_crash_of_every_node_is_rebuilt_once_from_the_log() {
    const SENDS: u64 = 120;
    bounded(async {
        let mut c = cluster3(&["--send-rate-per-sec", "100000"]).await;
        let alice = create_user(&c, 1, "alice").await;
        create_user(&c, 1, "bob").await;
        let mut ws = Ws::connect(c.node(1).api, "alice", &alice).await;
        let chat = ws.open_direct("bob").await;
        let mut first = Vec::new();
        for i in 0..SENDS {
            let a = ws.send_ok(&chat, &format!("k{i}"), &format!("m{i}")).await;
            first.push(a["seq"].as_u64().expect("seq"));
        }
        drop(ws);
        let group = partition(&chat, PARTITIONS);
        for id in 1..=3 {
            c.kill(id);
        }
        c.start_all();
        c.wait_ready(READY).await;
        let mut ws = Ws::connect(c.node(2).api, "alice", &alice).await;
        for (i, seq) in first.iter().enumerate() {
            let a = ws.send(&chat, &format!("k{i}"), &format!("m{i}")).await;
            assert_eq!(a["type"], "ack", "retry of k{i}: {a}");
            assert_eq!(a["seq"].as_u64(), Some(*seq), "retry of k{i}: {a}");
            assert_eq!(a["duplicate"], true, "retry of k{i}: {a}");
        }
        let history = ws.full_history(&chat).await;
        let seqs: Vec<u64> = history.iter().filter_map(|m| m["seq"].as_u64()).collect();
        let expected: Vec<u64> = (1..=*first.last().expect("sends")).collect();
        assert_eq!(seqs, expected, "gapless, each once");
        let texts: Vec<&str> = history.iter().filter_map(|m| m["text"].as_str()).collect();
        for i in 0..SENDS {
            let t = format!("m{i}");
            assert_eq!(texts.iter().filter(|x| **x == t).count(), 1, "{t} once");
        }
        let next = ws.send_ok(&chat, "after", "after the crash").await;
        assert_eq!(next["seq"].as_u64(), Some(first.last().expect("sends") + 1));
        // Every replica rebuilt the same state.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let d: Vec<_> = [1, 2, 3]
                .iter()
                .map(|id| (*id, c.digest(*id, group)))
                .collect();
            let mut digests = Vec::new();
            for (_, d) in d {
                digests.push(d.await.ok());
            }
            if digests.iter().all(|d| d.is_some() && *d == digests[0]) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "replicas differ: {digests:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
}
