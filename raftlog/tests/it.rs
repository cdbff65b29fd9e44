#![allow(clippy::unwrap_used, clippy::expect_used)]
//! raftlog on real RocksDB and a real QUIC endpoint: batching, its bounds, apply-once.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatd_raftlog::{
    Applier, ApplyTxn, GroupId, ProposeError, RaftOptions, Registry, BATCH_COMMANDS_MAX,
    PROPOSAL_QUEUE_MAX, RAFT_BATCH_SERVICE_TAG, RAFT_SERVICE_TAG,
};
use chatd_storage::{NodeIdentity, Storage, StorageOptions};
use chatd_transport::{ClusterCa, Endpoint, Handler, PeerInfo, TransportLimits};
use futures::future::BoxFuture;

/// Counts commands; answers each with its ordinal; blocks while the gate is closed.
#[derive(Default)]
struct Counter {
    gate: Arc<(Mutex<bool>, Condvar)>,
    applied_here: AtomicU64,
}

impl Counter {
    fn close(&self) {
        *self.gate.0.lock().unwrap() = true;
    }
    fn open(&self) {
        *self.gate.0.lock().unwrap() = false;
        self.gate.1.notify_all();
    }
}

impl Applier for Counter {
    fn apply(
        &self,
        _group: GroupId,
        index: u64,
        command: &[u8],
        txn: &mut ApplyTxn<'_>,
    ) -> Result<Vec<u8>, chatd_storage::StorageError> {
        let mut closed = self.gate.0.lock().unwrap();
        while *closed {
            closed = self.gate.1.wait(closed).unwrap();
        }
        drop(closed);
        let n = txn
            .get(b"n")?
            .map(|b| u64::from_be_bytes(b.try_into().unwrap()))
            .unwrap_or(0)
            + 1;
        txn.put(b"n", n.to_be_bytes().to_vec());
        let key = [b"c".as_slice(), &n.to_be_bytes()].concat();
        assert!(txn.get(&key)?.is_none(), "command {n} applied twice");
        txn.put(&key, [index.to_be_bytes().as_slice(), command].concat());
        self.applied_here.fetch_add(1, Ordering::SeqCst);
        Ok(n.to_be_bytes().to_vec())
    }
}

struct Single {
    registry: Arc<Registry>,
    endpoint: Endpoint,
    store: Storage,
}

async fn start_single(dir: &Path, ca: &ClusterCa, applier: Arc<Counter>) -> Single {
    let s = start_node(dir, ca, 1).await;
    let registry = &s.registry;
    registry.open_group(1, applier).await.unwrap();
    let addr = s.endpoint.local_addr().unwrap().to_string();
    let members = BTreeMap::from([(1, addr)]);
    registry.initialize(1, members).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while registry.get(1).unwrap().metrics().borrow().current_leader != Some(1) {
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s
}

/// Node `id`'s store, endpoint and registry, hosting no group yet.
async fn start_node(dir: &Path, ca: &ClusterCa, id: u64) -> Single {
    start_node_with(dir, ca, id, &RaftOptions::default()).await
}

/// The node's QUIC handler, as chatd's: Raft calls and liveness datagrams go to the registry.
struct RaftService(Arc<OnceLock<Arc<Registry>>>);

impl Handler for RaftService {
    fn handle(&self, _peer: PeerInfo, req: Bytes) -> BoxFuture<'static, Bytes> {
        let registry = self.0.get().cloned();
        Box::pin(async move {
            match (registry, req.first()) {
                (Some(r), Some(&RAFT_SERVICE_TAG | &RAFT_BATCH_SERVICE_TAG)) => {
                    r.handle_frame(&req).await.unwrap_or_default()
                }
                _ => Bytes::new(),
            }
        })
    }

    fn datagram(&self, _peer: &PeerInfo, datagram: Bytes) -> Option<Bytes> {
        self.0.get()?.handle_datagram(&datagram)
    }
}

/// [`start_node`] with these Raft options.
async fn start_node_with(dir: &Path, ca: &ClusterCa, id: u64, options: &RaftOptions) -> Single {
    let dir = dir.join(format!("n{id}"));
    let identity = ca.identity(ca.issue_node(id, &["127.0.0.1".parse().unwrap()]).unwrap());
    let store = Storage::open(
        &dir.join("db"),
        &NodeIdentity {
            cluster_id: "t".into(),
            node_id: id,
        },
        &StorageOptions::default(),
    )
    .unwrap();
    let slot: Arc<OnceLock<Arc<Registry>>> = Arc::new(OnceLock::new());
    let endpoint = Endpoint::bind(
        "127.0.0.1:0".parse().unwrap(),
        &identity,
        TransportLimits::default(),
        Arc::new(RaftService(slot.clone())),
    )
    .unwrap();
    let registry = Registry::new(
        id,
        store.clone(),
        endpoint.clone(),
        dir.join("snapshots"),
        options,
        "t",
    )
    .unwrap();
    let _ = slot.set(registry.clone());
    Single {
        registry,
        endpoint,
        store,
    }
}

/// Shuts the node down and waits until every handle to its database is gone (tasks of
/// the stopped groups and of the endpoint drop theirs asynchronously), so the directory
/// can be opened again.
async fn stop(s: Single) {
    s.registry.shutdown().await;
    s.endpoint.close().await;
    let Single {
        registry, store, ..
    } = s;
    drop(registry);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store.handles() > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} handles to the database still open 10 s after shutdown",
            store.handles()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    drop(store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_proposals_share_entries_and_each_gets_its_own_answer() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate("t").unwrap();
    let counter = Arc::new(Counter::default());
    let s = start_single(dir.path(), &ca, counter.clone()).await;
    let mut tasks = Vec::new();
    for i in 0..2000u32 {
        let r = s.registry.clone();
        tasks.push(tokio::spawn(async move {
            r.propose(1, i.to_be_bytes().to_vec()).await.unwrap()
        }));
    }
    let mut answers = HashSet::new();
    let mut indexes = HashSet::new();
    for t in tasks {
        let (index, answer) = t.await.unwrap();
        indexes.insert(index);
        assert!(answers.insert(answer), "two proposers got the same answer");
    }
    assert_eq!(answers.len(), 2000);
    assert!(
        indexes.len() < 2000,
        "proposals made together were batched into fewer entries ({} entries)",
        indexes.len()
    );
    assert_eq!(counter.applied_here.load(Ordering::SeqCst), 2000);
    stop(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_proposal_queue_answers_overloaded_and_loses_nothing_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate("t").unwrap();
    let counter = Arc::new(Counter::default());
    let s = start_single(dir.path(), &ca, counter.clone()).await;
    // Stall apply: the batch in flight never finishes, so the queue fills.
    counter.close();
    let total = PROPOSAL_QUEUE_MAX + 2 * BATCH_COMMANDS_MAX + 100;
    let mut tasks = Vec::new();
    for i in 0..total as u32 {
        let r = s.registry.clone();
        tasks.push(tokio::spawn(async move {
            r.propose(1, i.to_be_bytes().to_vec()).await
        }));
        if i % 1024 == 0 {
            tokio::task::yield_now().await;
        }
    }
    // Wait until every task has either queued or been refused, then let apply go.
    tokio::time::sleep(Duration::from_millis(500)).await;
    counter.open();
    let (mut ok, mut overloaded) = (0u64, 0u64);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(ProposeError::Overloaded { max, .. }) => {
                assert_eq!(max, PROPOSAL_QUEUE_MAX);
                overloaded += 1;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(overloaded > 0, "the bound was reached");
    assert_eq!(ok + overloaded, total as u64);
    assert_eq!(
        counter.applied_here.load(Ordering::SeqCst),
        ok,
        "every accepted proposal applied once"
    );
    stop(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_recovers_every_command_and_applies_none_twice() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate("t").unwrap();
    let counter = Arc::new(Counter::default());
    let s = start_single(dir.path(), &ca, counter.clone()).await;
    for i in 0..300u32 {
        s.registry
            .propose(1, i.to_be_bytes().to_vec())
            .await
            .unwrap();
    }
    stop(s).await;
    let again = Arc::new(Counter::default());
    let s = start_single(dir.path(), &ca, again.clone()).await;
    // One more: its ordinal continues the sequence, so nothing was lost or applied twice
    // (Counter's own assertion fails on a second apply of any command).
    let (_, answer) = s.registry.propose(1, vec![9]).await.unwrap();
    assert_eq!(u64::from_be_bytes(answer.try_into().unwrap()), 301);
    let records = chatd_raftlog::scan_records(&s.store, 1, b"c", b"d", 1000).unwrap();
    assert_eq!(records.len(), 301);
    stop(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proposing_to_a_group_not_hosted_or_not_led_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate("t").unwrap();
    let s = start_single(dir.path(), &ca, Arc::new(Counter::default())).await;
    match s.registry.propose(7, vec![1]).await {
        Err(ProposeError::NotHosted(7)) => {}
        other => panic!("expected NotHosted, got {other:?}"),
    }
    // A group that was opened but never initialized has no leader.
    s.registry
        .open_group(2, Arc::new(Counter::default()))
        .await
        .unwrap();
    match s.registry.propose(2, vec![1]).await {
        Err(ProposeError::NotLeader { leader: None }) => {}
        other => panic!("expected NotLeader, got {other:?}"),
    }
    stop(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_election_hold_lapses_by_itself_is_lifted_early_and_never_outlives_a_drain() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate("t").unwrap();
    let s = start_single(dir.path(), &ca, Arc::new(Counter::default())).await;
    let r = &s.registry;
    assert!(
        !r.hold_elections(9, Duration::from_millis(100)),
        "not hosted"
    );
    assert_eq!(r.elections_enabled(1), Some(true), "start-up hold released");

    // A hold lapses by itself.
    assert!(r.hold_elections(1, Duration::from_millis(200)));
    assert_eq!(r.elections_enabled(1), Some(false));
    let deadline = Instant::now() + Duration::from_secs(5);
    while r.elections_enabled(1) != Some(true) {
        assert!(Instant::now() < deadline, "the hold did not lapse");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A longer hold is not shortened by a shorter one; zero lifts it at once.
    assert!(r.hold_elections(1, Duration::from_secs(3_600)));
    assert!(r.hold_elections(1, Duration::from_millis(1)));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        r.elections_enabled(1),
        Some(false),
        "the longer hold still holds"
    );
    assert!(r.hold_elections(1, Duration::ZERO));
    assert_eq!(r.elections_enabled(1), Some(true));

    // At the bound: an hour is cut to ELECTION_HOLD_MS_MAX, never more.
    let started = Instant::now();
    assert!(r.hold_elections(1, Duration::from_secs(3_600)));
    while r.elections_enabled(1) != Some(true) {
        assert!(
            started.elapsed() < Duration::from_millis(chatd_raftlog::ELECTION_HOLD_MS_MAX + 2_000),
            "a hold outlived ELECTION_HOLD_MS_MAX"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(chatd_raftlog::ELECTION_HOLD_MS_MAX));

    // A drain turns elections off for good: a hold lapsing does not turn them back on.
    assert!(r.hold_elections(1, Duration::from_millis(50)));
    r.stop_elections();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(r.elections_enabled(1), Some(false));
    stop(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transfer_hold_ends_when_a_leader_of_a_newer_term_is_heard() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate("t").unwrap();
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(start_node(dir.path(), &ca, id).await);
    }
    let members: BTreeMap<u64, String> = nodes
        .iter()
        .zip(1..)
        .map(|(n, id)| (id, n.endpoint.local_addr().unwrap().to_string()))
        .collect();
    for n in &nodes {
        n.registry
            .open_group(1, Arc::new(Counter::default()))
            .await
            .unwrap();
    }
    nodes[0].registry.initialize(1, members).await.unwrap();
    let leader_everywhere = |want: Option<u64>| {
        nodes.iter().all(|n| {
            let m = n.registry.get(1).unwrap().metrics().borrow().clone();
            want.map_or(m.current_leader.is_some(), |w| m.current_leader == Some(w))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !leader_everywhere(None) {
        assert!(Instant::now() < deadline, "no leader heard everywhere");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let old = nodes[0]
        .registry
        .get(1)
        .unwrap()
        .metrics()
        .borrow()
        .current_leader
        .unwrap();
    let to = if old == 3 { 2 } else { 3 };
    // What a transfer to `to` does: every other replica holds its elections (at the
    // bound, 5 s), then `to` campaigns.
    for (n, id) in nodes.iter().zip(1u64..) {
        if id != to {
            assert!(n.registry.hold_elections(1, Duration::from_secs(3_600)));
            assert_eq!(n.registry.elections_enabled(1), Some(false));
        }
    }
    let started = Instant::now();
    nodes[to as usize - 1]
        .registry
        .get(1)
        .unwrap()
        .trigger()
        .elect()
        .await
        .unwrap();
    while !leader_everywhere(Some(to)) {
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{to} did not take over"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Every held replica heard the new leader: its hold is over long before the bound, so
    // if the new leader died now the group would elect another after one timeout.
    for (n, id) in nodes.iter().zip(1u64..) {
        while n.registry.elections_enabled(1) != Some(true) {
            assert!(
                started.elapsed() < Duration::from_millis(chatd_raftlog::ELECTION_HOLD_MS_MAX / 2),
                "node {id} still holds its elections after the new leader was heard"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    for n in nodes {
        stop(n).await;
    }
}

/// Three nodes with `groups` groups (1..=groups), each on all three, with these options;
/// returns once every group has a leader every replica knows.
async fn three_nodes_with_groups(dir: &Path, groups: u64, options: &RaftOptions) -> Vec<Single> {
    let ca = ClusterCa::generate("t").unwrap();
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(start_node_with(dir, &ca, id, options).await);
    }
    let members: BTreeMap<u64, String> = nodes
        .iter()
        .zip(1..)
        .map(|(n, id)| (id, n.endpoint.local_addr().unwrap().to_string()))
        .collect();
    for g in 1..=groups {
        for n in &nodes {
            n.registry
                .open_group(g, Arc::new(Counter::default()))
                .await
                .unwrap();
        }
        // Spread the first leaders: each group is initialized from a different node.
        let by = &nodes[(g % 3) as usize];
        by.registry.initialize(g, members.clone()).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all_led = (1..=groups).all(|g| {
            let leaders: HashSet<Option<u64>> =
                nodes.iter().map(|n| n.registry.leader(g)).collect();
            leaders.len() == 1 && !leaders.contains(&None)
        });
        if all_led {
            return nodes;
        }
        assert!(Instant::now() < deadline, "not every group has a leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn link_counts(nodes: &[Single]) -> (u64, u64, u64) {
    nodes.iter().fold((0, 0, 0), |(b, r, p), n| {
        let s = n.registry.link_stats();
        (
            b + s.batches_total.load(Ordering::Relaxed),
            r + s.rpcs_total.load(Ordering::Relaxed),
            p + s.pings_total.load(Ordering::Relaxed),
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_groups_heartbeats_to_a_peer_leave_together_in_a_few_batches() {
    let dir = tempfile::tempdir().unwrap();
    let options = RaftOptions {
        quiesce_idle_ms: 0,
        ..RaftOptions::default()
    };
    let groups = 48;
    let nodes = three_nodes_with_groups(dir.path(), groups, &options).await;
    let (b0, r0, p0) = link_counts(&nodes);
    let window = Duration::from_secs(2);
    tokio::time::sleep(window).await;
    let (b1, r1, p1) = link_counts(&nodes);
    let (batches, rpcs) = ((b1 - b0) - (p1 - p0), r1 - r0);
    // Each group's leader heartbeats its 2 followers every 100 ms: ~960 RPCs a second
    // across the cluster, one per group and peer pair if nothing coalesced them.
    let ticks = window.as_millis() as u64 / options.heartbeat_interval_ms;
    println!(
        "{groups} groups, {} ms: {rpcs} RPCs in {batches} batches ({:.1} per batch), {} pings",
        window.as_millis(),
        rpcs as f64 / batches.max(1) as f64,
        p1 - p0
    );
    assert!(
        rpcs >= groups * 2 * ticks / 2,
        "heartbeats are not being sent: {rpcs} RPCs in {} ms",
        window.as_millis()
    );
    assert!(
        rpcs >= 4 * batches,
        "heartbeats were not coalesced: {rpcs} RPCs in {batches} batches"
    );
    for n in nodes {
        stop(n).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_groups_quiesce_everywhere_and_wake_for_a_proposal_or_a_read() {
    let dir = tempfile::tempdir().unwrap();
    let options = RaftOptions {
        quiesce_idle_ms: 300,
        ..RaftOptions::default()
    };
    let groups = 16;
    let nodes = three_nodes_with_groups(dir.path(), groups, &options).await;
    let all_quiet = |nodes: &[Single]| {
        nodes
            .iter()
            .all(|n| n.registry.quiesced_groups() == groups as usize)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !all_quiet(&nodes) {
        assert!(
            Instant::now() < deadline,
            "groups did not quiesce: {:?}",
            nodes
                .iter()
                .map(|n| (1..=groups)
                    .filter(|g| n.registry.is_quiesced(*g) != Some(true))
                    .map(|g| (g, n.registry.leader(g)))
                    .collect::<Vec<_>>())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Quiet: no RPC at all, only the nodes' pings: datagrams, which the peer's QUIC stack
    // acknowledges (the pinger hears it from that, with no answer and no stream).
    let datagram_pings = |nodes: &[Single]| -> u64 {
        nodes
            .iter()
            .map(|n| {
                n.registry
                    .link_stats()
                    .datagram_pings_total
                    .load(Ordering::Relaxed)
            })
            .sum()
    };
    let (_, r0, p0) = link_counts(&nodes);
    let d0 = datagram_pings(&nodes);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, r1, p1) = link_counts(&nodes);
    let d1 = datagram_pings(&nodes);
    assert_eq!(r1 - r0, 0, "quiesced groups still sent RPCs");
    // 3 node pairs, one ping each per 100 ms: ~30 in the second.
    assert!(d1 - d0 >= 15, "{} datagram pings in 1 s", d1 - d0);
    assert!(
        p1 - p0 <= 3,
        "acknowledged datagram pings did not keep peers heard: {} empty batches in 1 s",
        p1 - p0
    );
    for n in &nodes {
        let lives = n.registry.liveness().snapshot();
        assert!(
            lives.len() == 2 && lives.values().all(|l| l.alive),
            "a peer not alive: {lives:?}"
        );
    }

    // A proposal wakes its group (everywhere) and commits.
    let g = 5;
    let leader = nodes[0].registry.leader(g).unwrap();
    let ln = &nodes[leader as usize - 1];
    ln.registry
        .propose(g, b"wake".to_vec())
        .await
        .expect("a proposal to a quiesced group commits");
    for n in &nodes {
        assert_eq!(
            n.registry.is_quiesced(g),
            Some(false),
            "a replica still quiet"
        );
    }
    // A read confirms leadership with a quorum, quiesced or not.
    let g2 = 6;
    let leader2 = nodes[0].registry.leader(g2).unwrap();
    nodes[leader2 as usize - 1]
        .registry
        .read_index(g2, Duration::from_secs(2))
        .await
        .expect("a linearizable read on a quiesced group");
    // Both quiesce again once idle, and no leader changed meanwhile.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !all_quiet(&nodes) {
        assert!(
            Instant::now() < deadline,
            "the woken groups did not quiesce again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(nodes[0].registry.leader(g), Some(leader));
    assert_eq!(nodes[0].registry.leader(g2), Some(leader2));
    for n in nodes {
        stop(n).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_groups_of_a_stopped_leader_elect_new_leaders_quiesced_or_not() {
    let dir = tempfile::tempdir().unwrap();
    let options = RaftOptions {
        quiesce_idle_ms: 300,
        ..RaftOptions::default()
    };
    let groups = 24;
    let mut nodes = three_nodes_with_groups(dir.path(), groups, &options).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while nodes
        .iter()
        .any(|n| n.registry.quiesced_groups() < groups as usize)
    {
        assert!(Instant::now() < deadline, "groups did not quiesce");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Wake a few groups so both kinds are led by the node that goes.
    let victim = 1
        + (0..3)
            .max_by_key(|i| {
                (1..=groups)
                    .filter(|g| nodes[0].registry.leader(*g) == Some(*i as u64 + 1))
                    .count()
            })
            .unwrap() as u64;
    let led: Vec<GroupId> = (1..=groups)
        .filter(|g| nodes[0].registry.leader(*g) == Some(victim))
        .collect();
    assert!(!led.is_empty());
    let woken = led.len().div_ceil(2);
    for g in &led[..woken] {
        nodes[victim as usize - 1]
            .registry
            .propose(*g, b"x".to_vec())
            .await
            .unwrap();
    }
    let gone = nodes.remove(victim as usize - 1);
    let started = Instant::now();
    stop(gone).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pending: Vec<GroupId> = led
            .iter()
            .copied()
            .filter(|g| {
                nodes.iter().any(|n| {
                    let l = n.registry.leader(*g);
                    l.is_none() || l == Some(victim)
                })
            })
            .collect();
        if pending.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "groups {pending:?} have no new leader 10 s after their leader stopped"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "{} groups ({woken} active, {} quiesced) re-led {} ms after their leader stopped",
        led.len(),
        led.len() - woken,
        started.elapsed().as_millis()
    );
    // Every one of them takes writes again.
    for g in &led {
        let l = nodes[0].registry.leader(*g).unwrap();
        let n = nodes.iter().find(|n| n.registry.node_id() == l).unwrap();
        n.registry.propose(*g, b"after".to_vec()).await.unwrap();
    }
    for n in nodes {
        stop(n).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_cut_off_from_most_voters_does_not_campaign_and_inflate_its_term() {
    let dir = tempfile::tempdir().unwrap();
    let groups = 4;
    let mut nodes = three_nodes_with_groups(dir.path(), groups, &RaftOptions::default()).await;
    let survivor = nodes.remove(0);
    let terms: Vec<u64> = (1..=groups).map(|g| survivor.registry.term(g)).collect();
    for n in nodes {
        stop(n).await;
    }
    // Several election timeouts (300-450 ms, plus the lease) pass with no one to vote:
    // without node liveness, every group here would campaign again and again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after: Vec<u64> = (1..=groups).map(|g| survivor.registry.term(g)).collect();
    for (g, (before, now)) in terms.iter().zip(&after).enumerate() {
        assert!(
            *now <= before + 1,
            "group {}: term went from {before} to {now} with most voters dead",
            g + 1
        );
    }
    stop(survivor).await;
}
