//! A rolling restart under continuous load: each of 3 nodes in turn is stopped with
//! SIGTERM (the graceful drain: sessions closed with 1001, leadership moved away, storage
//! synced, exit 0) and started again, while clients keep sending, reading and receiving.
//! The jepsen checker must find no lost, duplicated or reordered message; the longest
//! time writes were unavailable is printed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

mod common;

use chatd_jepsen::nemesis::FaultKind;
use chatd_jepsen::run::{self, TestSpec};

#[test]
fn rolling_restart_under_load_loses_nothing() {
    let out = tempfile_dir();
    let spec = TestSpec {
        nodes: 3,
        time_limit_s: 25,
        faults: vec![FaultKind::RollingRestart],
        seed: 11,
        clients: 6,
        chats: 3,
        e2e_chats: 1,
        rate: 150.0,
        // Between restarts: 3 s of steady load.
        quiet_ms: (3_000, 3_000),
        hold_ms: (0, 0),
        chatd: common::chatd(),
        dir: out.join("run"),
        base_port: 27_300,
        keep_data: false,
        partitions: 64,
        ack_before_sync: false,
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let outcome = runtime
        .block_on(run::test(&spec, Arc::new(AtomicBool::new(false))))
        .expect("the run completes");
    let r = &outcome.results;
    eprintln!("{}", r.verdict());
    eprintln!(
        "rolling restart: longest time without an acknowledged write: {:.0} ms (at {:.1} s)",
        r.longest_unavailable_ms, r.longest_unavailable_at_s
    );
    eprintln!(
        "rolling restart: longest write gap of one chat: {:.0} ms ({} at {:.1} s)",
        r.longest_chat_gap_ms, r.longest_chat_gap_chat, r.longest_chat_gap_at_s
    );
    for w in &r.windows {
        eprintln!("  {} from {:.1} s to {:.1} s", w.fault, w.start_s, w.end_s);
    }
    assert!(r.valid, "{:#?}", r);
    assert_eq!(r.anomalies(), 0);
    // Each node was drained and restarted, and each exited 0 by itself within the bound.
    assert_eq!(r.windows.len(), 3, "{:#?}", r.windows);
    assert!(r.fault_errors.is_empty(), "{:?}", r.fault_errors);
    // Writes went on: thousands acknowledged, each read back from every node.
    assert!(r.messages_acked > 1_000, "{}", r.verdict());
    // 3 group chats and 1 E2E chat, read whole from each of the 3 nodes.
    assert_eq!(r.final_reads, 12);
    // A drain moves leadership away before the node stops: writes never stop for long.
    assert!(
        r.longest_unavailable_ms < 10_000.0,
        "writes unavailable for {} ms",
        r.longest_unavailable_ms
    );
    std::fs::remove_dir_all(&out).unwrap();
}

/// A fresh directory under the system temp dir, removed by the test at the end.
fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("chatd-jepsen-rolling-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
