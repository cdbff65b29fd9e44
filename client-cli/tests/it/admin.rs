//! `chat-cli admin …` against a real node, an unreachable port and a fake server.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::thread;
use std::time::{Duration, Instant};

use crate::harness::{chat_cli, chat_cli_cmd, text, Cluster};
use crate::messaging::add_user;

#[test]
fn cluster_status_against_a_real_node() {
    let node = Cluster::start(1);
    let server = format!("127.0.0.1:{}", node.ports[0]);

    // Without the admin token, or with another one: said in the CLI's terms, exit 4.
    let out = chat_cli(&["--server", &server, "admin", "cluster", "status"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "stderr: {stderr}");
    assert!(
        stderr.contains("needs the admin token; pass --token or set CHATD_TOKEN"),
        "{stderr}"
    );
    let out = chat_cli(&[
        "--server", &server, "--token", "wrong", "admin", "users", "list",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "stderr: {stderr}");
    assert_eq!(
        stderr.trim_end(),
        "chat-cli: error: the admin token was refused; pass --token or set CHATD_TOKEN"
    );
    assert!(
        !stderr.contains("HTTP") && !stderr.contains("401"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());

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
    assert!(table.contains("\nNODES\n   ID  STATE   API  "), "{table}");
    // FILES: the node's chatd_file_bytes, read from its /metrics (nothing stored yet).
    assert!(
        table.contains(&format!(
            "\n    1  active  {server}  127.0.0.1:{}  yes          0 B  -\n",
            node.ports[0] + 1
        )),
        "{table}"
    );
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
fn unreachable_server_exits_3_naming_the_address() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind")
        .port();
    let server = format!("127.0.0.1:{port}");
    let out = chat_cli(&["--server", &server, "admin", "cluster", "status"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "stderr: {stderr}");
    assert!(stderr.contains(&server), "{stderr}");
    assert!(stderr.contains("cannot reach"), "{stderr}");
    assert!(out.stdout.is_empty());
    // Same with --json, and for messaging commands.
    let out = chat_cli(&["--server", &server, "--json", "admin", "cluster", "status"]);
    assert_eq!(out.status.code(), Some(3));
    let out = chat_cli(&["--server", &server, "--token", "t", "sync"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
}

/// Each kind of failure has its own exit status (no server needed for these).
#[test]
fn exit_statuses_are_distinct() {
    // 0: help, which lists the statuses.
    let out = chat_cli(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    assert!(help.contains("Exit status:"), "{help}");
    assert!(help.contains("  3  the server cannot be reached"), "{help}");
    // 2: usage errors (clap's convention).
    for args in [
        &["send", "d:a:b"][..],
        &["--timeout-ms", "0", "sync"],
        &["no-such-command"],
        &["admin", "users", "rotate-token"],
    ] {
        let out = chat_cli(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(out.stdout.is_empty());
    }
    // 3: an unusable address.
    for server in ["ftp://127.0.0.1:9", "http://", "host:notaport"] {
        let out = chat_cli(&["--server", server, "--token", "t", "sync"]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{server}: {stderr}");
        assert!(stderr.contains("invalid server address"), "{stderr}");
        let out = chat_cli(&["--server", server, "admin", "users", "list"]);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{server}: {}",
            text(&out.stderr)
        );
    }
    // 4: no token, or one that cannot be sent.
    let out = chat_cli(&["--server", "127.0.0.1:9", "sync"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("no token: pass --token"), "{stderr}");
    let out = chat_cli(&["--server", "127.0.0.1:9", "--token", "a\u{7f}b", "sync"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
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
fn http_errors_malformed_answers_refused_tokens_and_timeouts() {
    let (port, handle) = fake_server(vec![
        (
            "503 Service Unavailable",
            r#"{"code":"not_ready","message":"metadata not bootstrapped"}"#,
        ),
        ("200 OK", "<html>not json"),
        ("200 OK", r#"{"cluster_id":"c","answered_by":"one"}"#),
        (
            "401 Unauthorized",
            r#"{"code":"unauthorized","message":"admin endpoints need Authorization: Bearer <admin token>"}"#,
        ),
        (
            "401 Unauthorized",
            r#"{"code":"unauthorized","message":"admin endpoints need Authorization: Bearer <admin token>"}"#,
        ),
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

    // 401: the token is named, in the CLI's terms, exit 4.
    let out = run();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("this command needs the admin token; pass --token or set CHATD_TOKEN"),
        "{stderr}"
    );
    let out = chat_cli(&[
        "--server", &server, "--token", "nope", "admin", "cluster", "status",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("the admin token was refused; pass --token or set CHATD_TOKEN"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("HTTP") && !stderr.contains("401"),
        "{stderr}"
    );

    // No answer within --timeout-ms: unreachable, exit 3.
    let started = Instant::now();
    let out = run();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("no answer within 1000 ms"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10));
    handle.join().expect("fake server");
}

/// `admin users rotate-token`: the new token is printed once; the old one is refused
/// (exit 4) and the new one works. Needs the node's `POST
/// /v1/admin/users/{user}/rotate-token`.
#[test]
fn admin_users_rotate_token_replaces_the_token() {
    let node = Cluster::start(1);
    let server = format!("127.0.0.1:{}", node.ports[0]);
    let admin = node.token.as_str();
    let old = add_user(&server, admin, "alice");
    add_user(&server, admin, "bob");
    let send = |token: &str, msg: &str| {
        chat_cli(&[
            "--server",
            &server,
            "--token",
            token,
            "send",
            "d:alice:bob",
            msg,
        ])
    };
    let out = chat_cli(&["--server", &server, "--token", &old, "open-direct", "bob"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = send(&old, "before rotation");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    // Rotate: only the new token on stdout, the note on stderr.
    let out = chat_cli(&[
        "--server",
        &server,
        "--token",
        admin,
        "admin",
        "users",
        "rotate-token",
        "alice",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stderr}\nlogs: {}",
        node.logs()
    );
    assert!(stderr.contains("shown only this once"), "{stderr}");
    let stdout = text(&out.stdout);
    assert_eq!(
        stdout.lines().count(),
        1,
        "only the token on stdout: {stdout}"
    );
    let new = stdout.trim().to_string();
    assert_eq!(new.len(), old.len(), "{new}");
    assert_ne!(new, old);

    // The old token is refused (exit 4) once the rotation reached the node; the new one
    // works.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = send(&old, "with the old token");
        if out.status.code() == Some(4) {
            assert!(
                text(&out.stderr).contains("the token was refused"),
                "{}",
                text(&out.stderr)
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the old token still works: exit {:?}: {}",
            out.status.code(),
            text(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = send(&new, "with the new token");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = chat_cli(&[
        "--server",
        &server,
        "--token",
        &new,
        "--json",
        "history",
        "d:alice:bob",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let texts: Vec<&str> = v["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter(|m| m["kind"] == "text")
        .map(|m| m["text"].as_str().expect("text"))
        .collect();
    assert_eq!(texts, vec!["before rotation", "with the new token"]);

    // --json: the server's answer.
    let out = chat_cli(&[
        "--server",
        &server,
        "--token",
        admin,
        "--json",
        "admin",
        "users",
        "rotate-token",
        "alice",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["user"], "alice");
    let newer = v["token"].as_str().expect("token");
    assert_ne!(newer, new);

    // Refusals: an unknown user, a disabled user (exit 1); a wrong admin token (exit 4).
    let rotate = |token: &str, user: &str| {
        chat_cli(&[
            "--server",
            &server,
            "--token",
            token,
            "admin",
            "users",
            "rotate-token",
            user,
        ])
    };
    let out = rotate(admin, "nobody");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no such user"), "{stderr}");
    assert!(out.stdout.is_empty());
    let out = chat_cli(&[
        "--server", &server, "--token", admin, "admin", "users", "disable", "bob",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = rotate(admin, "bob");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the user is disabled"), "{stderr}");
    assert!(out.stdout.is_empty());
    let out = rotate(&new, "alice");
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("the admin token was refused"));
}
