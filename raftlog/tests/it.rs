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
    PROPOSAL_QUEUE_MAX, RAFT_SERVICE_TAG,
};
use chatd_storage::{NodeIdentity, Storage, StorageOptions};
use chatd_transport::{ClusterCa, Endpoint, PeerInfo, TransportLimits};
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
    let s = slot.clone();
    let handler = move |_p: PeerInfo, req: Bytes| -> BoxFuture<'static, Bytes> {
        let s = s.clone();
        Box::pin(async move {
            match (s.get(), req.first()) {
                (Some(r), Some(&RAFT_SERVICE_TAG)) => r.handle(&req[1..]).await,
                _ => Bytes::new(),
            }
        })
    };
    let endpoint = Endpoint::bind(
        "127.0.0.1:0".parse().unwrap(),
        &identity,
        TransportLimits::default(),
        Arc::new(handler),
    )
    .unwrap();
    let registry = Registry::new(
        id,
        store.clone(),
        endpoint.clone(),
        dir.join("snapshots"),
        &RaftOptions::default(),
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
