//! `chat-cli bench` against a real 3-node cluster, and its delivery verifier on
//! hand-made observations.

use chat_cli::bench::{
    parse_tag, plan_chats, progress_bar, tag, verify, AnomalyKind, ChatSpec, Entry, Missing,
    Observed, SendOutcome, SentMsg,
};

use crate::harness::{chat_cli_cmd, chat_cli_ok, f, Cluster};

#[test]
fn bench_against_a_three_node_cluster() {
    let cluster = Cluster::start(3);
    let server = format!("127.0.0.1:{}", cluster.ports[0]);
    let svg = cluster.dir.path().join("latency.svg");
    let svg_arg = svg.to_string_lossy().into_owned();
    let nodes = cluster.nodes_arg();
    let out = chat_cli_cmd(&[
        "--server",
        &server,
        "--token",
        &cluster.token,
        "bench",
        "--nodes",
        &nodes,
        "--connections",
        "8",
        "--chats",
        "4",
        "--group-size",
        "3",
        "--rate",
        "200",
        "--duration",
        "5",
        "--warmup",
        "1",
        "--svg",
        &svg_arg,
        "--json",
    ])
    .output()
    .expect("cannot run chat-cli");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}\n{}",
        cluster.logs()
    );
    let v: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {stdout}"));

    let acked = f(&v, "acked");
    let delivered = f(&v, "delivered");
    assert!(acked > 0.0, "{v:#}");
    // ~200 msg/s for 5 s: the open-loop rate is kept (loosely: the machine is shared).
    assert!(acked >= 500.0, "only {acked} acked at 200/s for 5 s: {v:#}");
    assert!(f(&v, "acked_per_sec") > 0.0);
    // Groups of 3: every message reaches the 3 member connections, the sender's included.
    assert_eq!(f(&v, "members_per_chat"), 3.0);
    assert!(delivered >= acked * 3.0, "{v:#}");
    assert!(f(&v, "delivered_per_sec") >= f(&v, "acked_per_sec") * 3.0 - 1e-6);

    let ver = &v["verification"];
    assert_eq!(ver["ok"], true, "{v:#}");
    assert_eq!(f(ver, "anomalies"), 0.0, "{v:#}");
    for k in [
        "lost",
        "recovered_via_history",
        "duplicated",
        "reordered",
        "gaps",
        "seq_conflicts",
        "unexpected",
    ] {
        assert_eq!(f(ver, k), 0.0, "{k}: {v:#}");
    }
    let total_acked = f(&v, "total.acked");
    assert!(total_acked >= acked);
    // Every acked message (warm-up included) and the joins reached every member.
    assert!(f(ver, "expected_deliveries") >= total_acked * 3.0);
    assert_eq!(
        f(ver, "delivered_once_in_order"),
        f(ver, "expected_deliveries")
    );

    for lat in ["ack_latency_ms", "deliver_latency_ms"] {
        let (p50, p90, p99, p999, max) = (
            f(&v, &format!("{lat}.p50")),
            f(&v, &format!("{lat}.p90")),
            f(&v, &format!("{lat}.p99")),
            f(&v, &format!("{lat}.p99_9")),
            f(&v, &format!("{lat}.max")),
        );
        assert!(p50 > 0.0, "{lat}: {v:#}");
        assert!(
            p50 <= p90 && p90 <= p99 && p99 <= p999 && p999 <= max,
            "{lat} not ordered: {v:#}"
        );
    }
    assert_eq!(f(&v, "ack_latency_ms.count"), acked);
    assert_eq!(f(&v, "deliver_latency_ms.count"), delivered);
    // Nothing was rate limited: the cluster's limit is raised.
    assert_eq!(f(&v, "rate_limited"), 0.0, "{v:#}");

    let plot = std::fs::read_to_string(&svg).expect("the SVG was written");
    assert!(plot.starts_with("<svg") && plot.contains("</svg>"));
    assert!(plot.contains("<polyline"), "{plot}");
    assert!(plot.contains("ack p99") && plot.contains("deliver p50"));

    // The table form, direct chats, as fast as 16 in flight allow.
    let out = chat_cli_cmd(&[
        "--server",
        &server,
        "--token",
        &cluster.token,
        "bench",
        "--nodes",
        &nodes,
        "--connections",
        "4",
        "--chats",
        "2",
        "--rate",
        "0",
        "--in-flight",
        "16",
        "--duration",
        "2",
        "--warmup",
        "0",
        "--size",
        "1024",
    ])
    .output()
    .expect("cannot run chat-cli");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains("send → ack"), "{stdout}");
    assert!(stdout.contains("send → deliver"), "{stdout}");
    assert!(stdout.contains("verification: OK"), "{stdout}");
    // Not a terminal: progress lines on stderr, none on stdout.
    assert!(stderr.contains("bench:"), "{stderr}");
}

#[test]
fn bench_needs_the_admin_token_and_enough_connections() {
    // No cluster needed: both are refused before anything is sent.
    let out = chat_cli_cmd(&["--server", "127.0.0.1:9", "bench"])
        .output()
        .expect("cannot run chat-cli");
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin token"));
    let out = chat_cli_cmd(&[
        "--server",
        "127.0.0.1:9",
        "--token",
        "t",
        "bench",
        "--connections",
        "2",
        "--group-size",
        "3",
    ])
    .output()
    .expect("cannot run chat-cli");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 3 connections"));
}

// ---------------------------------------------------------------------------------------
// The verifier on hand-made observations.
// ---------------------------------------------------------------------------------------

fn text(conn: usize, n: usize) -> Entry {
    Entry::Text { conn, n }
}

fn obs(chat: usize, seq: u64, entry: Entry) -> Observed {
    Observed { chat, seq, entry }
}

fn acked(chat: usize, seq: u64) -> SentMsg {
    SentMsg {
        chat,
        outcome: SendOutcome::Acked(seq),
    }
}

/// A group of connections 0, 1, 2 (3 joins) where connection 0 sent seqs 4, 5, 6 and
/// connection 1 sent seq 7; and a direct chat of connections 1 and 2 where 2 sent seq 1.
fn scenario() -> (Vec<ChatSpec>, Vec<Vec<SentMsg>>) {
    let chats = vec![
        ChatSpec {
            id: "g:0000000000000001".into(),
            members: vec![0, 1, 2],
            joins: 3,
            log_end: Some(7),
        },
        ChatSpec {
            id: "d:u1:u2".into(),
            members: vec![1, 2],
            joins: 0,
            log_end: Some(1),
        },
    ];
    let sends = vec![
        vec![acked(0, 4), acked(0, 5), acked(0, 6)],
        vec![acked(0, 7)],
        vec![acked(1, 1)],
    ];
    (chats, sends)
}

/// What each connection receives when all goes well.
fn perfect() -> Vec<Vec<Observed>> {
    let group = |first_join: u64| {
        let mut v: Vec<Observed> = (first_join..=3).map(|s| obs(0, s, Entry::Join)).collect();
        v.extend([
            obs(0, 4, text(0, 0)),
            obs(0, 5, text(0, 1)),
            obs(0, 6, text(0, 2)),
            obs(0, 7, text(1, 0)),
        ]);
        v
    };
    let mut c1 = group(2);
    c1.push(obs(1, 1, text(2, 0)));
    let mut c2 = vec![obs(1, 1, text(2, 0))];
    c2.extend(group(3));
    vec![group(1), c1, c2]
}

#[test]
fn verifier_accepts_a_perfect_run() {
    let (chats, sends) = scenario();
    let v = verify(&chats, &sends, &perfect());
    assert_eq!(v.anomalies(), 0, "{v:?}");
    // Group: conn 0 sees 3 joins + 4 texts, conn 1 2 + 4, conn 2 1 + 4; direct: 2 × 1.
    assert_eq!(v.expected, 7 + 6 + 5 + 2);
    assert_eq!(v.delivered, v.expected);
}

#[test]
fn verifier_detects_loss_duplicate_reorder_and_gap() {
    let (chats, mut sends) = scenario();
    let mut seen = perfect();

    // Loss: connection 2 never gets seq 6 of the group.
    seen[2].retain(|o| !(o.chat == 0 && o.seq == 6));
    // Duplicate: connection 1 gets seq 5 twice.
    let dup = seen[1]
        .iter()
        .position(|o| o.chat == 0 && o.seq == 5)
        .unwrap();
    seen[1].insert(dup + 1, obs(0, 5, text(0, 1)));
    // Reorder: connection 0 gets seq 7 before seq 6.
    let i6 = seen[0]
        .iter()
        .position(|o| o.chat == 0 && o.seq == 6)
        .unwrap();
    seen[0].swap(i6, i6 + 1);
    // Gap: the direct chat's second send was acknowledged with seq 3; nothing has seq 2.
    sends[2].push(acked(1, 3));
    for c in [1, 2] {
        seen[c].push(obs(1, 3, text(2, 1)));
    }

    let v = verify(&chats, &sends, &seen);
    assert_eq!(
        v.missing,
        vec![Missing {
            conn: 2,
            chat: 0,
            seq: 6,
            expect: text(0, 2)
        }],
        "{v:?}"
    );
    assert_eq!(v.count(AnomalyKind::Duplicated), 1, "{v:?}");
    assert_eq!(v.count(AnomalyKind::Reordered), 1, "{v:?}");
    assert_eq!(v.count(AnomalyKind::Gap), 1, "{v:?}");
    assert_eq!(v.count(AnomalyKind::SeqConflict), 0, "{v:?}");
    assert_eq!(v.count(AnomalyKind::Unexpected), 0, "{v:?}");
    assert_eq!(v.anomalies(), 4);
    let gap = v
        .examples
        .iter()
        .find(|a| a.kind == AnomalyKind::Gap)
        .unwrap();
    assert_eq!((gap.chat, gap.seq), (1, 2));
    let dup = v
        .examples
        .iter()
        .find(|a| a.kind == AnomalyKind::Duplicated)
        .unwrap();
    assert_eq!((dup.conn, dup.seq), (Some(1), 5));
    let re = v
        .examples
        .iter()
        .find(|a| a.kind == AnomalyKind::Reordered)
        .unwrap();
    assert_eq!((re.conn, re.seq), (Some(0), 6));
}

#[test]
fn verifier_detects_conflicts_and_unexpected_messages() {
    let (mut chats, mut sends) = scenario();
    let mut seen = perfect();
    // Two acks with one seq: connection 1's send also said seq 6.
    sends[1][0] = acked(0, 6);
    // The group's log was seen to end at 7, so seq 7 is now unaccounted for.
    chats[0].log_end = Some(7);
    // A message that was refused arrives anyway; a foreign chat; a non-member push.
    sends[0].push(SentMsg {
        chat: 0,
        outcome: SendOutcome::Refused,
    });
    seen[0].push(obs(0, 8, text(0, 3)));
    seen[0].push(obs(99, 1, text(5, 5)));
    seen[0].push(obs(1, 1, text(2, 0)));

    let v = verify(&chats, &sends, &seen);
    assert_eq!(v.count(AnomalyKind::SeqConflict), 1, "{v:?}");
    // Seq 7 (connection 1's text, acked as 6) at every member: wrong content ×3 … and the
    // refused send, the foreign chat and the non-member push.
    assert!(v.count(AnomalyKind::Unexpected) >= 3, "{v:?}");
    assert!(v.count(AnomalyKind::Gap) >= 1, "{v:?}");

    // A send without an answer that was delivered counts as committed, not unexpected.
    let (chats, mut sends) = scenario();
    sends[1][0].outcome = SendOutcome::Unknown;
    let v = verify(&chats, &sends, &perfect());
    assert_eq!(v.anomalies(), 0, "{v:?}");
    assert_eq!(v.unconfirmed_committed, 1);
}

#[test]
fn chat_plans_and_tags() {
    // Direct chats: distinct pairs of distinct connections, neighbours first.
    let p = plan_chats(4, 6, 1).unwrap();
    assert_eq!(p.len(), 6);
    let mut pairs: Vec<(usize, usize)> =
        p.iter().map(|m| (m[0].min(m[1]), m[0].max(m[1]))).collect();
    pairs.sort_unstable();
    pairs.dedup();
    assert_eq!(pairs.len(), 6);
    assert_eq!(p[0], vec![0, 1]);
    assert!(plan_chats(4, 7, 1).is_err());
    assert!(plan_chats(1, 1, 1).is_err());
    // Groups of 3 over 8 connections: consecutive connections, wrapping.
    let g = plan_chats(8, 4, 3).unwrap();
    assert_eq!(
        g,
        vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 0], vec![1, 2, 3]]
    );
    assert!(plan_chats(2, 1, 3).is_err());
    // Tags.
    assert_eq!(
        parse_tag(&format!("{} xxxx", tag(12, 345))),
        Some((12, 345))
    );
    assert_eq!(parse_tag(&tag(0, 0)), Some((0, 0)));
    assert_eq!(parse_tag("hello"), None);
}

#[test]
fn progress_bar_fills_with_time_and_stays_in_bounds() {
    assert_eq!(progress_bar(0.0, 4), "[....]   0%");
    assert_eq!(progress_bar(0.5, 4), "[##..]  50%");
    assert_eq!(progress_bar(1.0, 4), "[####] 100%");
    assert_eq!(progress_bar(7.0, 4), "[####] 100%", "past the end");
    assert_eq!(progress_bar(f64::NAN, 4), "[....]   0%");
}

#[test]
fn bench_idle_opens_the_sessions_and_reports_the_nodes_memory() {
    let cluster = Cluster::start(3);
    let server = format!("127.0.0.1:{}", cluster.ports[0]);
    let stdout = chat_cli_ok(&[
        "--server",
        &server,
        "--token",
        &cluster.token,
        "bench-idle",
        "--sessions",
        "20",
        "--hold",
        "0",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {stdout}"));
    // 20 sessions over 3 users (8 each at most: the server's bound was respected, or a
    // session would have been refused and the probe failed).
    assert_eq!(f(&v, "sessions"), 20.0, "{v:#}");
    let before = f(&v, "rss_before_bytes");
    assert!(
        before > 1_048_576.0,
        "a node's RSS is more than 1 MiB: {v:#}"
    );
    assert!(f(&v, "rss_end_bytes") > 0.0, "{v:#}");
    assert!(f(&v, "node_cpu_percent") >= 0.0, "{v:#}");

    // From several loopback source addresses (past one address's ephemeral ports), held
    // for a second: the node's CPU over that second is reported.
    let stdout = chat_cli_ok(&[
        "--server",
        &server,
        "--token",
        &cluster.token,
        "bench-idle",
        "--sessions",
        "12",
        "--hold",
        "1",
        "--source-addrs",
        "127.0.0.2,127.0.0.3",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {stdout}"));
    assert_eq!(f(&v, "sessions"), 12.0, "{v:#}");
    let cpu = f(&v, "node_cpu_percent");
    assert!((0.0..=400.0).contains(&cpu), "{v:#}");
    // A source address this host does not have: the sessions cannot be opened.
    let out = chat_cli_cmd(&[
        "--server",
        &server,
        "--token",
        &cluster.token,
        "bench-idle",
        "--sessions",
        "1",
        "--source-addrs",
        "192.0.2.1",
    ])
    .output()
    .expect("cannot run chat-cli");
    assert!(
        !out.status.success(),
        "binding 192.0.2.1 cannot succeed here"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("192.0.2.1")
            || String::from_utf8_lossy(&out.stderr).contains("address"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Without the admin token it refuses before doing anything.
    let out = chat_cli_cmd(&["--server", &server, "bench-idle", "--sessions", "1"])
        .output()
        .expect("cannot run chat-cli");
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
