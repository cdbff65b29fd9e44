//! `chat-cli admin …` against a real node, an unreachable port and a fake server.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::thread;
use std::time::{Duration, Instant};

use crate::harness::{chat_cli, chat_cli_cmd, text, Cluster};

#[test]
fn cluster_status_against_a_real_node() {
    let node = Cluster::start(1);
    let server = format!("127.0.0.1:{}", node.ports[0]);

    // Without the admin token: the server's unauthorized error, exit 1.
    let out = chat_cli(&["--server", &server, "admin", "cluster", "status"]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("unauthorized"),
        "{}",
        text(&out.stderr)
    );

    // --json: the server's JSON.
    let out = chat_cli(&[
        "--token",
        &node.token,
        "--server",
        &server,
        "--json",
        "admin",
        "cluster",
        "status",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}\nlog: {}",
        text(&out.stderr),
        node.logs()
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    let cluster_id = v["cluster_id"].as_str().expect("cluster_id is a string");
    assert!(!cluster_id.is_empty());
    assert_eq!(v["answered_by"], 1);
    assert_eq!(v["metadata_bootstrapped"], true);
    let nodes = v["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0]["id"], 1);
    assert_eq!(nodes[0]["reachable"], true);
    assert_eq!(nodes[0]["api_addr"], server.as_str());
    let partitions = v["partitions"].as_array().expect("partitions");
    assert_eq!(partitions.len(), 65);
    let groups: Vec<u64> = partitions
        .iter()
        .map(|p| p["group"].as_u64().expect("group"))
        .collect();
    assert_eq!(groups, (0..=64).collect::<Vec<u64>>());
    for p in partitions {
        assert_eq!(p["leader"], 1, "partition {p}");
    }
    // Pretty-printed, with the server's key order.
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("{\n  \"cluster_id\": "), "{stdout}");

    // Tables.
    let out = chat_cli(&[
        "--token",
        &node.token,
        "--server",
        &server,
        "admin",
        "cluster",
        "status",
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(!table.contains('\x1b'), "no colour into a pipe: {table}");
    let first = table.lines().next().unwrap_or_default();
    assert_eq!(
        first,
        format!("cluster {cluster_id}  answered by node 1  metadata bootstrapped: yes")
    );
    assert!(table.contains("\nNODES\n   ID  API  "), "{table}");
    assert!(table.contains(&format!(
        "\n    1  {server}  127.0.0.1:{}  yes        -\n",
        node.ports[0] + 1
    )));
    assert!(
        table.contains(
            "\nPARTITIONS\n   GROUP  LEADER  TERM  LAST  COMMITTED  APPLIED  LAG  REPLICAS  STATUS\n"
        ),
        "{table}"
    );
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.ends_with(" ok") || l.ends_with("UNHEALTHY"))
        .collect();
    assert_eq!(rows.len(), 65, "{table}");
    assert!(rows
        .iter()
        .all(|r| r.starts_with(' ') && r.contains("  1*  ")));
    assert!(
        table.contains("65 partitions, 0 unhealthy, 1/1 nodes reachable; leaders per node: 1=65"),
        "{table}"
    );

    // The server from the environment, as a URL with a trailing slash; and a token.
    let out = chat_cli_cmd(&["admin", "cluster", "status", "--json"])
        .env("CHATD_SERVER", format!("http://{server}/"))
        .env("CHATD_TOKEN", &node.token)
        .output()
        .expect("cannot run chat-cli");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));

    // A path the node does not serve: an HTTP error, exit 1.
    let out = chat_cli(&[
        "--token",
        &node.token,
        "--server",
        &format!("http://{server}/nope"),
        "admin",
        "cluster",
        "status",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("404"), "{}", text(&out.stderr));
}

#[test]
fn unreachable_server_exits_2_naming_the_address() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind")
        .port();
    let server = format!("127.0.0.1:{port}");
    let out = chat_cli(&["--server", &server, "admin", "cluster", "status"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains(&server), "{stderr}");
    assert!(stderr.contains("cannot reach"), "{stderr}");
    assert!(out.stdout.is_empty());
    // Same with --json.
    let out = chat_cli(&["--server", &server, "--json", "admin", "cluster", "status"]);
    assert_eq!(out.status.code(), Some(2));
}

/// A server that answers each of `responses` (status line, body) to one request, in turn.
fn fake_server(responses: Vec<(&'static str, &'static str)>) -> (u16, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let handle = thread::spawn(move || {
        for (status, body) in responses {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            // Read the request head.
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            if status.is_empty() {
                // Say nothing until the client gives up.
                let _ = s.read(&mut byte);
                continue;
            }
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.shutdown(Shutdown::Write);
        }
    });
    (port, handle)
}

#[test]
fn http_errors_and_malformed_answers_exit_1() {
    let (port, handle) = fake_server(vec![
        (
            "503 Service Unavailable",
            r#"{"code":"not_ready","message":"metadata not bootstrapped"}"#,
        ),
        ("200 OK", "<html>not json"),
        ("200 OK", r#"{"cluster_id":"c","answered_by":"one"}"#),
        ("", ""),
    ]);
    let server = format!("127.0.0.1:{port}");
    let run = || {
        chat_cli(&[
            "--server",
            &server,
            "--timeout-ms",
            "1000",
            "admin",
            "cluster",
            "status",
        ])
    };

    let out = run();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("503"), "{stderr}");
    assert!(
        stderr.contains("not_ready: metadata not bootstrapped"),
        "{stderr}"
    );

    let out = run();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("malformed response"), "{stderr}");
    assert!(stderr.contains("not JSON"), "{stderr}");

    let out = run();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not a cluster view"), "{stderr}");

    // No answer within --timeout-ms: unreachable, exit 2.
    let started = Instant::now();
    let out = run();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no answer within 1000 ms"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10));
    handle.join().expect("fake server");
}
