//! Failover as clients see it: the leader of a test chat's partition is killed (-9),
//! paused (SIGSTOP) or cut off (iptables), on 3 nodes under continuous load. The checker
//! must find no anomaly; the longest write gap of any one chat is printed per fault kind
//! and bounded.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

mod common;

use chatd_jepsen::nemesis::FaultKind;
use chatd_jepsen::run::{self, TestSpec};

/// The bound asserted on the longest write gap of one chat (ms) when the leader is killed,
/// paused or cut off. The goal is 1 s; measured 0.60-0.73 s over 9 runs (3 seeds
/// of each fault, `chatd-jepsen test --nemesis kill-leader|pause-leader|partition-leader`,
/// jepsen/README.md). The bound leaves room for a loaded CI machine.
const CHAT_GAP_MS_MAX: f64 = 1_500.0;

fn run_one(kind: FaultKind, seed: u64, base_port: u16) -> (f64, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "chatd-jepsen-failover-{}-{seed}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let spec = TestSpec {
        nodes: 3,
        time_limit_s: 20,
        faults: vec![kind],
        seed,
        clients: 6,
        chats: 3,
        e2e_chats: 1,
        rate: 150.0,
        quiet_ms: (3_000, 3_000),
        hold_ms: (3_000, 3_000),
        chatd: common::chatd(),
        dir: dir.join("run"),
        base_port,
        keep_data: false,
        partitions: 64,
        ack_before_sync: false,
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let outcome = runtime
        .block_on(run::test(&spec, Arc::new(AtomicBool::new(false))))
        .expect("the run completes");
    let r = &outcome.results;
    eprintln!("{kind:?}: {}", r.verdict());
    eprintln!(
        "{kind:?}: longest write gap of one chat {:.0} ms ({} at {:.1} s); of all chats {:.0} ms",
        r.longest_chat_gap_ms,
        r.longest_chat_gap_chat,
        r.longest_chat_gap_at_s,
        r.longest_unavailable_ms
    );
    for w in &r.windows {
        eprintln!("  {} from {:.1} s to {:.1} s", w.fault, w.start_s, w.end_s);
    }
    assert!(r.valid, "{:#?}", r);
    assert_eq!(r.anomalies(), 0);
    assert!(!r.windows.is_empty(), "no fault was applied");
    assert!(r.fault_errors.is_empty(), "{:?}", r.fault_errors);
    assert!(r.messages_acked > 500, "{}", r.verdict());
    (r.longest_chat_gap_ms, dir)
}

#[test]
fn failover_of_a_killed_paused_or_isolated_leader_loses_nothing_and_is_quick() {
    let mut gaps = Vec::new();
    for (i, kind) in [
        FaultKind::KillLeader,
        FaultKind::PauseLeader,
        FaultKind::PartitionLeader,
    ]
    .into_iter()
    .enumerate()
    {
        let (gap, dir) = run_one(kind, 40 + i as u64, 27_400 + 40 * i as u16);
        gaps.push((kind, gap, dir));
    }
    eprintln!(
        "failover: longest write gap of one chat per fault: {:?}",
        gaps.iter().map(|(k, g, _)| (k, g)).collect::<Vec<_>>()
    );
    for (kind, gap, dir) in gaps {
        let bound = CHAT_GAP_MS_MAX;
        // A run over its bound keeps its logs and report for a look.
        assert!(
            gap <= bound,
            "{kind:?}: a chat had no write for {gap:.0} ms (bound {bound} ms); logs in {}",
            dir.display()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
