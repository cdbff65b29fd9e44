//! Bad input: each gets a clear error naming the cause, no panic, nothing committed lost.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{Cluster, CHATD};

const READY: Duration = Duration::from_secs(60);

/// Runs `chatd run --config <path>` expecting it to exit with an error within the bound.
fn run_expect_failure(config: &std::path::Path) -> String {
    let mut child = Command::new(CHATD)
        .args(["run", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(!status.success(), "chatd should have failed: {err}");
            assert!(!err.contains("panicked"), "chatd panicked: {err}");
            return err;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chatd kept running with {}", config.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn missing_corrupt_and_unknown_key_configs_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let err = run_expect_failure(&missing);
    assert!(
        err.contains("does not exist") && err.contains("nope.toml"),
        "{err}"
    );

    let c = Cluster::init(1, &[]);
    let good = std::fs::read_to_string(&c.node(1).config).unwrap();
    let corrupt = dir.path().join("corrupt.toml");
    // Cut inside a table header, so the rest can never parse (half the file, as this once
    // did, may end at a line boundary and be valid TOML).
    let cut = good.find("[tls]").unwrap() + 3;
    std::fs::write(&corrupt, &good[..cut]).unwrap();
    let err = run_expect_failure(&corrupt);
    assert!(
        err.contains("invalid config file") && err.contains("corrupt.toml"),
        "{err}"
    );

    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, format!("colour = \"blue\"\n{good}")).unwrap();
    let err = run_expect_failure(&unknown);
    assert!(
        err.contains("colour") && err.contains("unknown.toml"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_clusters_or_nodes_data_directory_is_refused_and_left_intact() {
    let mut c = Cluster::init(2, &[]);
    c.start_all();
    c.wait_ready(READY).await;
    let a = c.append_retry(&[1], 1, "keep-me").await;
    assert_eq!(a.seq, 1);
    c.kill(1);
    c.kill(2);

    // Node 2's config pointed at node 1's data directory.
    let text = std::fs::read_to_string(&c.node(2).config).unwrap();
    let wrong_node = c.path().join("node-2/wrong-node.toml");
    std::fs::write(
        &wrong_node,
        text.replace(
            "data_dir = \"data\"",
            &format!("data_dir = {:?}", c.data_dir(1).display().to_string()),
        ),
    )
    .unwrap();
    let err = run_expect_failure(&wrong_node);
    assert!(err.contains("belongs to node 1"), "{err}");

    // Another cluster's config (new cluster id) on this cluster's data.
    let other = Cluster::init(2, &[]);
    let other_text = std::fs::read_to_string(&other.node(1).config).unwrap();
    let other_cfg = other.path().join("node-1/other.toml");
    std::fs::write(
        &other_cfg,
        other_text.replace(
            "data_dir = \"data\"",
            &format!("data_dir = {:?}", c.data_dir(1).display().to_string()),
        ),
    )
    .unwrap();
    let err = run_expect_failure(&other_cfg);
    assert!(
        err.contains("belongs to") && err.contains("cluster"),
        "{err}"
    );

    // Nothing was changed: the cluster restarts with its record.
    c.start_all();
    c.wait_ready(READY).await;
    c.wait_converged(&[1, 2], 1, 1, READY).await;
    let recs = c.records(1, 1).await.unwrap();
    assert_eq!(recs[0].payload, "keep-me");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_database_is_refused_and_the_data_is_intact_once_restored() {
    let mut c = Cluster::init(1, &[]);
    c.start(1);
    c.wait_ready(READY).await;
    for i in 0..5 {
        c.append_retry(&[1], 2, &format!("r{i}")).await;
    }
    c.kill(1);
    let db = c.data_dir(1).join("db");
    let current = std::fs::read(db.join("CURRENT")).unwrap();
    std::fs::remove_file(db.join("CURRENT")).unwrap();
    let err = run_expect_failure(&c.node(1).config);
    assert!(err.contains("cannot open the database"), "{err}");
    assert!(err.contains("CURRENT"), "{err}");
    std::fs::write(db.join("CURRENT"), current).unwrap();
    c.start(1);
    c.wait_ready(READY).await;
    c.wait_converged(&[1], 2, 5, READY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_quic_port_and_a_foreign_ca_are_refused_while_the_cluster_serves() {
    let mut c = Cluster::init(3, &[]);
    c.start(1);
    c.start(2);
    c.wait_ready(READY).await;

    // Garbage datagrams at every node's QUIC port.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for n in [1, 2] {
        for i in 0..200u32 {
            let junk: Vec<u8> = (0..(1 + i % 1200)).map(|b| (b * 31 + i) as u8).collect();
            sock.send_to(&junk, c.node(n).cluster).unwrap();
        }
    }

    // Node 3 starts with certificates from another cluster's CA.
    let other = Cluster::init(3, &[]);
    for f in ["ca.pem", "node.pem", "node.key"] {
        std::fs::copy(
            other.path().join(format!("node-3/{f}")),
            c.path().join(format!("node-3/{f}")),
        )
        .unwrap();
    }
    c.start(3);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !c.ready(3).await,
        "a node with a foreign certificate must not join"
    );

    // The cluster still commits (nodes 1 and 2 are a majority) and neither died.
    let a = c.append_retry(&[1, 2], 1, "still-works").await;
    assert!(a.seq >= 1);
    let status = c.status(1).await.unwrap();
    let node3 = &status["nodes"].as_array().unwrap()[2];
    assert_eq!(node3["reachable"], false, "{node3}");
    for n in [1, 2] {
        assert!(c.ready(n).await, "node {n} still serves");
    }
    let log1 = c.log_text(1);
    let log3 = c.log_text(3);
    assert!(!log1.contains("panicked") && !log3.contains("panicked"));
    let refused = |log: &str| {
        log.contains("UnknownIssuer") || log.contains("certificate") || log.contains("handshake")
    };
    assert!(
        refused(&log1) || refused(&log3),
        "a log names the certificate refusal:\n--- node 1\n{log1}\n--- node 3\n{log3}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_refuse_a_missing_or_wrong_token() {
    let mut c = Cluster::init(1, &[]);
    c.start(1);
    c.wait_ready(READY).await;
    let plain = reqwest::Client::new();
    let url = c.url(1, "/v1/admin/cluster");
    let none = plain.get(&url).send().await.unwrap();
    assert_eq!(none.status(), 401);
    let body = none.text().await.unwrap();
    assert!(body.contains("unauthorized"), "{body}");
    let wrong = plain
        .get(&url)
        .bearer_auth("0".repeat(64))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let right = plain
        .get(&url)
        .bearer_auth(&c.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);
    // Health and readiness stay open to probes.
    assert_eq!(
        plain
            .get(c.url(1, "/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}
