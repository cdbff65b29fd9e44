//! Live membership: nodes join a running cluster through group 0.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{create_user_via, Cluster};

const READY: Duration = Duration::from_secs(30);

async fn nodes_via(c: &Cluster, via: u64) -> Vec<Value> {
    let r = c
        .http
        .get(c.url(via, "/v1/admin/nodes"))
        .send()
        .await
        .expect("GET /v1/admin/nodes");
    assert_eq!(r.status(), 200);
    r.json().await.expect("node list")
}

fn state_of(nodes: &[Value], id: u64) -> Option<String> {
    nodes
        .iter()
        .find(|n| n["id"] == id)
        .and_then(|n| n["state"].as_str().map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_a_node_joins_a_running_cluster_and_serves_its_clients() {
    let mut c = Cluster::init(3, &[]);
    c.start_all();
    c.wait_ready(READY).await;
    // Group 0 holds something to catch up on.
    create_user_via(&c, 1, "alice").await;
    let before = nodes_via(&c, 2).await;
    assert_eq!(before.len(), 3);
    assert!((1..=3).all(|id| state_of(&before, id).as_deref() == Some("active")));

    c.add_node(4, &[]).expect("add-node");
    c.start(4);
    c.wait_ready(READY).await;
    // Every member, the new one included, lists it active.
    for via in 1..=4 {
        let deadline = std::time::Instant::now() + READY;
        loop {
            let nodes = nodes_via(&c, via).await;
            if state_of(&nodes, 4).as_deref() == Some("active") {
                assert_eq!(nodes.len(), 4, "via {via}: {nodes:?}");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node 4 not active via {via}: {nodes:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // It caught up group 0 (alice's account) and proposes through it.
    let users: Vec<Value> = c
        .http
        .get(c.url(4, "/v1/admin/users"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(users.iter().any(|u| u["user"] == "alice"), "{users:?}");
    create_user_via(&c, 4, "bob").await;
    let users: Vec<Value> = c
        .http
        .get(c.url(1, "/v1/admin/users"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(users.iter().any(|u| u["user"] == "bob"), "{users:?}");

    // A restart of the joined node rejoins as a member (no second admission).
    c.kill(4);
    c.start(4);
    c.wait_ready(READY).await;
    assert_eq!(
        state_of(&nodes_via(&c, 4).await, 4).as_deref(),
        Some("active")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_a_taken_id_is_refused_and_the_node_exits_with_the_reason() {
    let mut c = Cluster::init(3, &[]);
    c.start_all();
    c.wait_ready(READY).await;
    // add-node itself refuses an id of the seed config's peer list.
    let e = c.add_node(2, &[]).expect_err("id 2 is taken");
    assert!(e.contains("node id 2 is already in the peer list"), "{e}");

    c.add_node(4, &[]).expect("add-node 4");
    c.start(4);
    c.wait_ready(READY).await;
    // A second machine made with id 4 (another port): group 0 refuses it.
    let other = c.path().join("other-4");
    let out = std::process::Command::new(crate::harness::CHATD)
        .args(["cluster", "add-node", "--ca-dir"])
        .arg(c.path())
        .args(["--id", "4", "--api-port"])
        .arg(crate::harness::free_base_port(1).to_string())
        .arg("--out")
        .arg(&other)
        .output()
        .unwrap();
    assert!(out.status.success());
    let log = other.join("chatd.log");
    let status = std::process::Command::new(crate::harness::CHATD)
        .args(["run", "--config"])
        .arg(other.join("chatd.toml"))
        .stderr(std::fs::File::create(&log).unwrap())
        .status()
        .unwrap();
    assert!(!status.success(), "a second node 4 must not start");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("refused to admit node 4") && text.contains("taken by another node"),
        "{text}"
    );
    // Nothing changed: node 4 is still the first one.
    let nodes = nodes_via(&c, 1).await;
    assert_eq!(nodes.len(), 4);
    let four = nodes.iter().find(|n| n["id"] == 4).unwrap();
    assert_eq!(four["api_addr"], c.node(4).api.to_string());
}

/// What a steady writer saw: per partition the acknowledged (seq, payload) in ack order,
/// payloads whose outcome is unknown, and the longest time a partition took no write.
#[derive(Default)]
struct LoadSeen {
    acked: std::collections::BTreeMap<u64, Vec<(u64, String)>>,
    unknown: std::collections::BTreeSet<String>,
    longest_gap: Duration,
    longest_gap_group: u64,
}

/// Writes round-robin to partitions 1..=16 through the given nodes until `stop`; each write
/// retries (bounded) while it surely was not appended, until acknowledged or its outcome
/// is unknown.
async fn steady_load(
    http: reqwest::Client,
    apis: Vec<String>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> LoadSeen {
    let mut seen = LoadSeen::default();
    let mut last_ok: std::collections::BTreeMap<u64, std::time::Instant> = Default::default();
    let mut i: u64 = 0;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let group = 1 + i % 16;
        let payload = format!("w{i}");
        i += 1;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut via = i as usize;
        loop {
            let url = format!(
                "{}/v1/admin/partitions/{group}/records",
                apis[via % apis.len()]
            );
            via += 1;
            let r = http.post(&url).body(payload.clone()).send().await;
            let outcome = match r {
                Ok(r) => {
                    let ok = r.status().is_success();
                    let text = r.text().await.unwrap_or_default();
                    if ok {
                        let v: Value = serde_json::from_str(&text).expect("append answer");
                        Some(Ok(v["seq"].as_u64().expect("seq")))
                    } else if text.contains("outcome_unknown") {
                        Some(Err(()))
                    } else {
                        None
                    }
                }
                // Not connected: never sent, safe to retry. Any other failure (the node died
                // mid-request, a timeout) may have appended it: its outcome is unknown, and
                // retrying would store it twice (records have no idempotency key).
                Err(e) if e.is_connect() => None,
                Err(_) => Some(Err(())),
            };
            match outcome {
                Some(Ok(seq)) => {
                    let now = std::time::Instant::now();
                    if let Some(prev) = last_ok.insert(group, now) {
                        let gap = now - prev;
                        if gap > seen.longest_gap {
                            seen.longest_gap = gap;
                            seen.longest_gap_group = group;
                        }
                    }
                    seen.acked.entry(group).or_default().push((seq, payload));
                    break;
                }
                Some(Err(())) => {
                    seen.unknown.insert(payload);
                    break;
                }
                None => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "partition {group} took no write for 30 s"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
    seen
}

/// A steady writer through some nodes' APIs, running in the background.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<LoadSeen>,
}

impl Load {
    /// Starts writing through `nodes` and lets it run for a second.
    async fn start(c: &Cluster, nodes: std::ops::RangeInclusive<u64>) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let apis: Vec<String> = nodes.map(|id| c.url(id, "")).collect();
        let task = tokio::spawn(steady_load(c.http.clone(), apis, stop.clone()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        Load { stop, task }
    }

    /// Stops the writer; what it saw.
    async fn finish(self) -> LoadSeen {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.task.await.expect("the writer panicked")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_growing_three_to_five_under_load_spreads_replicas_and_loses_nothing() {
    let mut c = Cluster::init(3, &[]);
    c.start_all();
    c.wait_ready(READY).await;
    let load = Load::start(&c, 1..=3).await;

    let started = std::time::Instant::now();
    for id in [4, 5] {
        c.add_node(id, &[]).expect("add-node");
        c.start(id);
    }
    // Placement settles: replicas and preferred leaders within ±1 of an even share
    // (16 partitions × 3 replicas over 5 nodes: 9 or 10 each; 3 or 4 preferred).
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    let nodes = loop {
        let nodes = nodes_via(&c, 1).await;
        let active = nodes.iter().filter(|n| n["state"] == "active").count();
        let counts: Vec<u64> = nodes
            .iter()
            .map(|n| n["replicas"].as_u64().unwrap())
            .collect();
        let leads: Vec<u64> = nodes
            .iter()
            .map(|n| n["preferred_leader_of"].as_u64().unwrap())
            .collect();
        let spread = |v: &[u64]| v.iter().max().unwrap() - v.iter().min().unwrap();
        let moving = c
            .http
            .get(c.url(1, "/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .lines()
            .any(|l| l.starts_with("chatd_replica_moves_in_progress ") && !l.ends_with(" 0"));
        if active == 5 && spread(&counts) <= 1 && spread(&leads) <= 1 && !moving {
            assert_eq!(counts.iter().sum::<u64>(), 48, "R = 3 kept: {nodes:?}");
            break nodes;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "placement did not settle: {nodes:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let settled = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = load.finish().await;
    let writes: usize = seen.acked.values().map(Vec::len).sum();
    assert!(writes > 100, "the load ran: {writes} writes");

    // Actual leaders follow the preferred ones within ±1 (bounded wait).
    // (A partition led elsewhere goes back after LEADER_RESTORE_GRACE_MS, 10 s.)
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut leads = std::collections::BTreeMap::<u64, u64>::new();
        for g in 1..=16 {
            if let Some(l) = c.leader(1, g).await {
                *leads.entry(l).or_default() += 1;
            }
        }
        let (min, max) = (1..=5u64)
            .map(|n| leads.get(&n).copied().unwrap_or(0))
            .fold((u64::MAX, 0), |(lo, hi), v| (lo.min(v), hi.max(v)));
        if max - min <= 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "leaders not spread: {leads:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    verify_partitions(&c, &seen, &[1, 2, 3, 4, 5]).await;
    // The new replicas were filled from the log (far below the snapshot threshold): that
    // traffic is counted as catch-up, a part of all entry bytes sent.
    let (mut catch_up, mut entries) = (0, 0);
    for id in 1..=5 {
        catch_up +=
            crate::failover::metric(&c, id, "chatd_raft_catch_up_entry_bytes_sent_total").await;
        entries += crate::failover::metric(&c, id, "chatd_raft_entry_bytes_sent_total").await;
    }
    assert!(
        catch_up > 0 && catch_up < entries,
        "catch-up {catch_up} bytes of {entries} entry bytes sent"
    );
    println!("grow 3→5: {catch_up} bytes of catch-up from the log of {entries} entry bytes sent");
    println!(
        "grow 3→5: settled in {:.1} s; {writes} acknowledged writes ({} unknown); longest \
         write gap of a partition {} ms (partition {}); nodes {}",
        settled.as_secs_f64(),
        seen.unknown.len(),
        seen.longest_gap.as_millis(),
        seen.longest_gap_group,
        serde_json::to_string(&nodes).unwrap()
    );
}

/// Every replica of every partition holds exactly what was acknowledged, in order, once,
/// with gapless seqs; nodes of `all` that are not replicas host nothing of it.
async fn verify_partitions(c: &Cluster, seen: &LoadSeen, all: &[u64]) {
    let status = c.status(1).await.unwrap();
    for g in 1..=16u64 {
        let part = status["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["group"] == g)
            .unwrap_or_else(|| panic!("partition {g} in {status}"));
        let replicas: Vec<u64> = part["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_u64().unwrap())
            .collect();
        assert_eq!(replicas.len(), 3, "partition {g}: {part}");
        let acked = seen.acked.get(&g).cloned().unwrap_or_default();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut first: Option<Vec<crate::harness::Record>> = None;
        for &r in &replicas {
            let recs = loop {
                let recs = c.records(r, g).await.unwrap_or_default();
                let caught_up = acked.last().is_none_or(|(s, _)| recs.len() as u64 >= *s);
                if caught_up {
                    break recs;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "node {r} behind on {g}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            for (k, rec) in recs.iter().enumerate() {
                assert_eq!(
                    rec.seq,
                    k as u64 + 1,
                    "gapless seqs on node {r}, partition {g}"
                );
            }
            for (seq, payload) in &acked {
                let rec = &recs[(*seq - 1) as usize];
                assert_eq!(&rec.payload, payload, "node {r}, partition {g}, seq {seq}");
            }
            let mut payloads: Vec<&String> = recs.iter().map(|r| &r.payload).collect();
            payloads.sort();
            let before = payloads.len();
            payloads.dedup();
            assert_eq!(
                before,
                payloads.len(),
                "no duplicate on node {r}, partition {g}"
            );
            for p in &payloads {
                assert!(
                    acked.iter().any(|(_, a)| a == *p) || seen.unknown.contains(*p),
                    "node {r}, partition {g}: {p} was never sent as acked or unknown"
                );
            }
            match &first {
                None => first = Some(recs),
                Some(f) => assert_eq!(&f[..acked.len()], &recs[..acked.len()], "replicas agree"),
            }
        }
        for &n in all.iter().filter(|n| !replicas.contains(n)) {
            let r = c
                .http
                .get(c.url(n, &format!("/v1/admin/partitions/{g}/local")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 404, "node {n} still hosts partition {g}");
        }
    }
}

async fn remove(c: &Cluster, id: u64, dead: bool) -> (u16, Value) {
    let r = c
        .http
        .post(c.url(1, &format!("/v1/admin/nodes/{id}/remove")))
        .json(&serde_json::json!({ "dead": dead }))
        .send()
        .await
        .expect("POST remove");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Waits until node `via` lists `expect` as (node, state, replicas) for every node; a
/// negative replica count means any.
async fn wait_nodes(c: &Cluster, via: u64, expect: &[(u64, &str, i64)], timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let nodes = nodes_via(c, via).await;
        let ok = expect.iter().all(|(id, state, replicas)| {
            nodes.iter().any(|n| {
                n["id"] == *id
                    && n["state"] == *state
                    && (*replicas < 0 || n["replicas"].as_i64() == Some(*replicas))
            })
        });
        if ok {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nodes never became {expect:?}: {nodes:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_shrinking_five_to_three_under_load_retires_nodes_for_good() {
    let mut c = Cluster::init(5, &[]);
    c.start_all();
    c.wait_ready(READY).await;
    let load = Load::start(&c, 1..=3).await;

    // Bad input changes nothing.
    assert_eq!(remove(&c, 9, false).await.0, 404);
    let started = std::time::Instant::now();
    assert_eq!(remove(&c, 4, false).await.0, 202);
    assert_eq!(remove(&c, 5, false).await.0, 202);
    let (status, body) = remove(&c, 3, false).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("fewer than the replication factor 3"),
        "{body}"
    );

    // Both drain, leave and exit 0 by themselves; the three others hold every replica.
    for id in [4, 5] {
        let code = c.wait_exit(id, Duration::from_secs(180));
        assert_eq!(code, Some(0), "node {id} exits cleanly once removed");
    }
    let retired = started.elapsed();
    wait_nodes(
        &c,
        1,
        &[
            (1, "active", 16),
            (2, "active", 16),
            (3, "active", 16),
            (4, "removed", 0),
            (5, "removed", 0),
        ],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(remove(&c, 4, false).await.0, 409, "removed already");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = load.finish().await;
    verify_partitions(&c, &seen, &[1, 2, 3]).await;

    // A removed node never serves again, and says why.
    c.start(4);
    let code = c.wait_exit(4, Duration::from_secs(30));
    assert!(matches!(code, Some(c) if c != 0), "{code:?}");
    let log = c.log_text(4);
    assert!(log.contains("was removed from the cluster"), "{log}");
    let writes: usize = seen.acked.values().map(Vec::len).sum();
    println!(
        "shrink 5→3: nodes 4 and 5 removed and exited in {:.1} s; {writes} acknowledged \
         writes ({} unknown); longest write gap of a partition {} ms (partition {})",
        retired.as_secs_f64(),
        seen.unknown.len(),
        seen.longest_gap.as_millis(),
        seen.longest_gap_group
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_a_dead_node_with_a_wiped_disk_is_replaced_and_r_is_restored() {
    let mut c = Cluster::init(3, &[]);
    c.start_all();
    c.wait_ready(READY).await;
    let load = Load::start(&c, 1..=2).await;

    // The machine of node 3 dies and its disk is lost.
    c.kill(3);
    std::fs::remove_dir_all(c.data_dir(3)).unwrap();
    // With three nodes and R = 3, removing it first is refused: add the replacement first.
    let (status, body) = remove(&c, 3, true).await;
    assert_eq!(status, 409, "{body}");
    let started = std::time::Instant::now();
    c.add_node(4, &[]).expect("add-node");
    c.start(4);
    wait_nodes(&c, 1, &[(4, "active", -1)], READY).await;
    let (status, body) = remove(&c, 3, true).await;
    assert_eq!(status, 202, "{body}");
    wait_nodes(
        &c,
        1,
        &[
            (1, "active", 16),
            (2, "active", 16),
            (3, "removed", 0),
            (4, "active", 16),
        ],
        Duration::from_secs(180),
    )
    .await;
    let replaced = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = load.finish().await;
    verify_partitions(&c, &seen, &[1, 2, 4]).await;
    let writes: usize = seen.acked.values().map(Vec::len).sum();
    println!(
        "replace a dead node: R = 3 restored in {:.1} s; {writes} acknowledged writes ({} \
         unknown); longest write gap of a partition {} ms (partition {})",
        replaced.as_secs_f64(),
        seen.unknown.len(),
        seen.longest_gap.as_millis(),
        seen.longest_gap_group
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_kill_9_during_moves_of_the_rebalancer_target_and_source_loses_nothing() {
    let mut c = Cluster::init(3, &[]);
    c.start_all();
    c.wait_ready(READY).await;
    let load = Load::start(&c, 1..=3).await;
    for id in [4, 5] {
        c.add_node(id, &[]).expect("add-node");
        c.start(id);
    }
    // Kill -9 (and restart) the node in each role of a move in turn: group 0's leader (it
    // drives the moves), a move's target (the new replica), a move's source.
    let mut kills = Vec::new();
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let mut view = None;
        for via in 1..=5 {
            if let Ok(v) = c.status(via).await {
                view = Some(v);
                break;
            }
        }
        let Some(view) = view else { continue };
        let meta_leader = view["partitions"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["group"] == 0))
            .and_then(|p| p["leader"].as_u64());
        let first_move = view["moves"].as_array().and_then(|m| m.first().cloned());
        let (role, victim) = match (round % 3, &first_move) {
            (1, Some(m)) => ("move target", m["add"].as_u64()),
            (2, Some(m)) => ("move source", m["remove"].as_u64()),
            _ => ("group 0 leader", meta_leader),
        };
        let Some(victim) = victim else { continue };
        c.kill(victim);
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.start(victim);
        kills.push((role, victim, first_move.is_some()));
    }
    assert!(
        kills.iter().any(|(_, _, during_move)| *during_move),
        "no kill landed during a move: {kills:?}"
    );
    c.wait_ready(READY).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    loop {
        let nodes = nodes_via(&c, 1).await;
        let counts: Vec<u64> = nodes
            .iter()
            .map(|n| n["replicas"].as_u64().unwrap())
            .collect();
        let spread = counts.iter().max().unwrap() - counts.iter().min().unwrap();
        let view = c.status(1).await.unwrap();
        let moving = view["moves"].as_array().is_some_and(|m| !m.is_empty());
        if nodes.len() == 5 && spread <= 1 && !moving {
            assert_eq!(counts.iter().sum::<u64>(), 48, "R = 3 kept: {nodes:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "placement did not settle after the kills: {nodes:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let seen = load.finish().await;
    verify_partitions(&c, &seen, &[1, 2, 3, 4, 5]).await;
    let writes: usize = seen.acked.values().map(Vec::len).sum();
    println!(
        "kill -9 during moves: kills {kills:?}; {writes} acknowledged writes ({} unknown); \
         longest write gap of a partition {} ms",
        seen.unknown.len(),
        seen.longest_gap.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_a_node_with_another_clusters_certificate_is_not_admitted() {
    let mut c = Cluster::init(3, &[]);
    c.start_all();
    c.wait_ready(READY).await;
    // Its certificate and CA come from another cluster's `cluster init`; its seeds are
    // this cluster's nodes.
    let other = Cluster::init(1, &[]);
    let dir = c.path().join("intruder");
    let out = std::process::Command::new(crate::harness::CHATD)
        .args(["cluster", "add-node", "--ca-dir"])
        .arg(other.path())
        .arg("--seed-config")
        .arg(&c.node(1).config)
        .args(["--id", "4", "--api-port"])
        .arg(crate::harness::free_base_port(1).to_string())
        .arg("--out")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = dir.join("chatd.log");
    let mut child = std::process::Command::new(crate::harness::CHATD)
        .args(["run", "--config"])
        .arg(dir.join("chatd.toml"))
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // It keeps failing to reach any seed (mutual TLS refuses it both ways).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.matches("join attempt failed").count() >= 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no failed join attempts logged: {text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let nodes = nodes_via(&c, 1).await;
    assert_eq!(nodes.len(), 3, "nothing admitted: {nodes:?}");
    assert!(nodes.iter().all(|n| n["id"] != 4));
}
