//! Replication, failover, restart, snapshots and durability of acknowledged entries.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use crate::harness::Cluster;

const READY: Duration = Duration::from_secs(60);
const CONVERGE: Duration = Duration::from_secs(60);

/// Groups whose preferred leader (first replica) is `node`: with 3 nodes, group g's
/// replicas start at node ((g-1) % 3) + 1.
fn groups_preferring(node: u64, partitions: u64) -> Vec<u64> {
    (1..=partitions)
        .filter(|g| (g - 1) % 3 + 1 == node)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_to_many_partitions_commit_identically_on_every_replica() {
    let mut c = Cluster::init(3, &[]);
    c.start_all();
    c.wait_ready(READY).await;
    let mut expected: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut tasks = Vec::new();
    let c = std::sync::Arc::new(c);
    for group in 1..=16u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for i in 0..20 {
                // Through every node: followers forward to the leader over QUIC.
                let via = 1 + (group + i) % 3;
                let payload = format!("g{group}-e{i}");
                let a = c.append_retry(&[via], group, &payload).await;
                assert_eq!(a.group, group);
                assert!(a.index > 0 && (1..=3).contains(&a.leader), "{a:?}");
                assert_eq!(a.seq, i + 1, "seqs are gapless per partition");
                sent.push(payload);
            }
            (group, sent)
        }));
    }
    for t in tasks {
        let (g, sent) = t.await.unwrap();
        expected.insert(g, sent);
    }
    for (group, sent) in &expected {
        c.wait_converged(&[1, 2, 3], *group, sent.len() as u64, CONVERGE)
            .await;
        for id in 1..=3 {
            let got: Vec<String> = c
                .records(id, *group)
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.payload)
                .collect();
            assert_eq!(&got, sent, "node {id} group {group}");
        }
    }
    // The admin view sees every partition with a leader and three replicas.
    let status = c.status(2).await.unwrap();
    let parts = status["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 17, "group 0 and 16 partitions");
    for p in parts {
        assert!(p["leader"].as_u64().is_some(), "{p}");
        assert_eq!(p["replica_views"].as_array().unwrap().len(), 3, "{p}");
    }
    let leaders: HashSet<u64> = parts[1..]
        .iter()
        .map(|p| p["leader"].as_u64().unwrap())
        .collect();
    assert_eq!(leaders.len(), 3, "leadership is spread over all nodes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_leader_elects_another_loses_nothing_and_the_node_catches_up() {
    let mut c = Cluster::init(3, &[]);
    c.start_all();
    c.wait_ready(READY).await;
    let group = groups_preferring(1, 16)[0];
    let mut acked = Vec::new();
    for i in 0..50 {
        let p = format!("before-{i}");
        c.append_retry(&[2, 3], group, &p).await;
        acked.push(p);
    }
    let leader = c.leader(2, group).await.expect("a leader");
    let survivors: Vec<u64> = (1..=3).filter(|n| *n != leader).collect();
    c.kill(leader);
    let killed_at = Instant::now();
    let new_leader = loop {
        let mut found = None;
        for s in &survivors {
            if let Some(v) = c.local(*s, group).await {
                if v["role"] == "Leader" {
                    found = Some(*s);
                }
            }
        }
        if let Some(l) = found {
            break l;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(20),
            "no new leader"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let election = killed_at.elapsed();
    println!(
        "leader {leader} of partition {group} killed; node {new_leader} elected after {} ms",
        election.as_millis()
    );
    // Proposals resume. A proposal in flight to the dead leader has an unknown outcome: it
    // is not counted as acked, and may or may not appear below.
    let mut unknown = Vec::new();
    for i in 0..50 {
        let p = format!("after-{i}");
        match c.append_maybe(&survivors, group, &p).await {
            Some(_) => acked.push(p),
            None => unknown.push(p),
        }
    }
    assert!(unknown.len() <= 2, "too many unknown outcomes: {unknown:?}");
    c.start(leader);
    let deadline = Instant::now() + CONVERGE;
    loop {
        let got: Vec<String> = c
            .records(leader, group)
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.payload)
            .collect();
        // Every acked entry, in ack order, with only unknown-outcome entries in between.
        let acked_only: Vec<&String> = got.iter().filter(|p| !unknown.contains(p)).collect();
        if acked_only.len() == acked.len() {
            assert_eq!(acked_only, acked.iter().collect::<Vec<_>>());
            let d = c.digest(leader, group).await.unwrap();
            for s in &survivors {
                assert_eq!(c.digest(*s, group).await.unwrap(), d, "replicas identical");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "restarted node missing entries: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_cluster_restart_keeps_every_entry_and_applies_none_twice() {
    let mut c = Cluster::init(3, &[]);
    c.start_all();
    c.wait_ready(READY).await;
    let mut acked: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for group in 1..=16u64 {
        for i in 0..10 {
            let p = format!("g{group}-{i}");
            c.append_retry(&[1, 2, 3], group, &p).await;
            acked.entry(group).or_default().push(p);
        }
    }
    for id in 1..=3 {
        c.kill(id);
    }
    c.start_all();
    c.wait_ready(READY).await;
    for (group, sent) in &acked {
        c.wait_converged(&[1, 2, 3], *group, sent.len() as u64, CONVERGE)
            .await;
        for id in 1..=3 {
            let recs = c.records(id, *group).await.unwrap();
            let payloads: Vec<&str> = recs.iter().map(|r| r.payload.as_str()).collect();
            assert_eq!(payloads, *sent, "node {id} group {group}");
            let seqs: Vec<u64> = recs.iter().map(|r| r.seq).collect();
            assert_eq!(seqs, (1..=sent.len() as u64).collect::<Vec<_>>());
        }
    }
    // And the log keeps working after the restart.
    let a = c.append_retry(&[1], 1, "after-restart").await;
    assert_eq!(a.seq, 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_a_purge_catches_up_through_a_snapshot() {
    let mut c = Cluster::init(
        3,
        &[
            "--snapshot-logs-since-last",
            "50",
            "--snapshot-logs-to-keep",
            "5",
        ],
    );
    c.start_all();
    c.wait_ready(READY).await;
    let group = groups_preferring(1, 16)[0];
    c.kill(3);
    let mut acked = Vec::new();
    for i in 0..400 {
        let p = format!("s{i}");
        c.append_retry(&[1, 2], group, &p).await;
        acked.push(p);
    }
    // The leader built a snapshot and purged the log below it.
    let deadline = Instant::now() + CONVERGE;
    loop {
        let part = c.partition(1, group).await.unwrap();
        let purged = part["replica_views"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v["purged_index"].as_u64())
            .max()
            .unwrap_or(0);
        if purged > 100 {
            break;
        }
        assert!(Instant::now() < deadline, "no purge: {part}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.start(3);
    c.wait_converged(&[1, 2, 3], group, acked.len() as u64, CONVERGE)
        .await;
    let part = c.partition(3, group).await.unwrap();
    let mine = part["replica_views"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["node"] == 3)
        .cloned()
        .unwrap();
    assert!(
        mine["snapshot_index"].as_u64().unwrap_or(0) > 0,
        "node 3 caught up through a snapshot: {mine}"
    );
    let got: Vec<String> = c
        .records(3, group)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.payload)
        .collect();
    assert_eq!(got, acked);
}

/// A propose is acknowledged only after a majority fsynced it. Nodes run with the WAL kept in
/// RocksDB's buffer until a sync (the default), so kill -9 loses whatever was not synced,
/// as a power cut would. Right after the acks: kill every node, restart only the two
/// followers (the leader's disk is gone for good), and read every acked entry back from them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acked_entry_survives_the_loss_of_every_node_that_did_not_ack_it() {
    let mut c = Cluster::init(3, &[]);
    c.start_all();
    c.wait_ready(READY).await;
    let groups = groups_preferring(1, 16);
    // Make sure node 1 leads these groups (it initialised them).
    for g in &groups {
        assert_eq!(c.leader(1, *g).await, Some(1), "group {g}");
    }
    let c = std::sync::Arc::new(c);
    let mut tasks = Vec::new();
    for (w, g) in groups.iter().copied().enumerate() {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..40 {
                let p = format!("w{w}-{i}");
                if c.append(1, g, &p).await.is_ok() {
                    acked.push(p);
                }
            }
            (g, acked)
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.push(t.await.unwrap());
    }
    let mut c = std::sync::Arc::try_unwrap(c).ok().unwrap();
    // Right after the last ack: every node dies; unsynced WAL data dies with it.
    c.kill(2);
    c.kill(3);
    c.kill(1);
    // Only the followers come back; they are a majority of every group.
    c.start(2);
    c.start(3);
    for (g, sent) in &acked {
        assert!(!sent.is_empty());
        let deadline = Instant::now() + CONVERGE;
        loop {
            let mut done = false;
            for id in [2, 3] {
                if let Ok(recs) = c.records(id, *g).await {
                    let got: Vec<String> = recs.into_iter().map(|r| r.payload).collect();
                    if got.len() >= sent.len() {
                        assert_eq!(&got[..sent.len()], &sent[..], "node {id} group {g}");
                        done = true;
                    }
                }
            }
            if done {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "group {g}: acked entries missing"
            );
            // Followers apply once a new leader (one of them) commits in its term.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_moves_to_the_requested_replica_and_nothing_is_lost() {
    let mut c = Cluster::init(3, &[]);
    c.start_all();
    c.wait_ready(READY).await;
    let group = groups_preferring(1, 16)[0];
    for i in 0..20 {
        c.append_retry(&[1], group, &format!("t{i}")).await;
    }
    let before = c.leader(2, group).await.expect("a leader");
    let to = if before == 3 { 2 } else { 3 };
    let r = c
        .http
        .post(c.url(1, &format!("/v1/admin/partitions/{group}/transfer")))
        .json(&serde_json::json!({ "to": to }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let mut leader = None;
    for _ in 0..50 {
        leader = c.leader(1, group).await;
        if leader == Some(to) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(leader, Some(to), "leadership moved from {before} to {to}");
    let a = c.append_retry(&[1], group, "after-transfer").await;
    assert_eq!((a.leader, a.seq), (to, 21));
    c.wait_converged(&[1, 2, 3], group, 21, CONVERGE).await;
    // A node that is not a replica, or a partition that does not exist, is refused.
    let bad = c
        .http
        .post(c.url(1, "/v1/admin/partitions/999/transfer"))
        .json(&serde_json::json!({ "to": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 409);
}
