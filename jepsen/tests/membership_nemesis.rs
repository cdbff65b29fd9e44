//! Membership changes under continuous load, against real processes: the `membership`
//! nemesis alone on 3 nodes for 32 s of faults. With this seed its first change is a
//! removal at 3 nodes, so a node is added first (`chatd cluster add-node`, started, active)
//! and then a live node is removed (it drains, is tombstoned and exits 0 by itself) while
//! clients keep sending, reading and receiving, and move off the removed node. The checker
//! must find no anomaly; the changes and their durations are printed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

mod common;

use chatd_jepsen::nemesis::FaultKind;
use chatd_jepsen::run::{self, TestSpec};

#[test]
fn membership_changes_under_load_lose_nothing() {
    let dir = std::env::temp_dir().join(format!("chatd-jepsen-membership-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let spec = TestSpec {
        nodes: 3,
        // Faults in the first 80 %: 32 s; a removal still going on then is waited for
        // (bounded by the nemesis: 90 s per removal; ~34 s measured under this load).
        time_limit_s: 40,
        faults: vec![FaultKind::Membership],
        seed: 5,
        clients: 6,
        chats: 3,
        e2e_chats: 1,
        rate: 150.0,
        quiet_ms: (2_000, 3_000),
        hold_ms: (0, 0),
        chatd: common::chatd(),
        dir: dir.join("run"),
        base_port: 27_500,
        keep_data: false,
        partitions: 64,
        ack_before_sync: false,
    };
    let started = std::time::Instant::now();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let outcome = runtime
        .block_on(run::test(&spec, Arc::new(AtomicBool::new(false))))
        .expect("the run completes");
    let r = &outcome.results;
    eprintln!("{}", r.verdict());
    let m = &r.membership;
    eprintln!(
        "membership: {} adds, {} removes, {} replaces, {} failed; run took {:.0} s",
        m.adds,
        m.removes,
        m.replaces,
        m.failed,
        started.elapsed().as_secs_f64()
    );
    for c in &m.changes {
        eprintln!(
            "  {} from {:.1} s, took {:.1} s",
            c.fault, c.start_s, c.duration_s
        );
    }
    assert!(r.valid, "{:#?}", r);
    assert_eq!(r.anomalies(), 0);
    assert!(r.fault_errors.is_empty(), "{:?}", r.fault_errors);
    assert_eq!(m.failed, 0, "{:#?}", m.changes);
    assert!(m.adds >= 1, "no node was added: {:#?}", m.changes);
    assert!(m.removes >= 1, "no node was removed: {:#?}", m.changes);
    // Writes went on, and every chat was read back from every node left.
    assert!(r.messages_acked > 500, "{}", r.verdict());
    assert!(r.final_reads >= 9, "{}", r.verdict());
    std::fs::remove_dir_all(&dir).unwrap();
}
