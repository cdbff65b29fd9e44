//! Messaging and admin commands against a real 3-node cluster, asserting on `--json`,
//! including the error paths.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{chat_cli, chat_cli_cmd, text, Cluster};

/// Runs chat-cli and parses its stdout as JSON, asserting exit 0.
pub(crate) fn json_ok(args: &[&str]) -> Value {
    let out = chat_cli(args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "chat-cli {args:?}\nstdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout of {args:?} is not JSON ({e}): {}",
            text(&out.stdout)
        )
    })
}

/// Asserts a failure with `code` whose stderr contains `needle`; stdout stays empty.
fn fails(out: &Output, code: i32, needle: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    assert!(out.stdout.is_empty(), "stdout: {}", text(&out.stdout));
}

/// Creates `user` with the admin token; returns its token.
pub fn add_user(server: &str, admin: &str, user: &str) -> String {
    let v = json_ok(&[
        "--server", server, "--token", admin, "--json", "admin", "users", "add", user,
    ]);
    assert_eq!(v["user"], user);
    let token = v["token"].as_str().expect("token").to_string();
    assert!(token.len() >= 32, "{v}");
    token
}

#[test]
fn messaging_commands_against_a_three_node_cluster() {
    let cluster = Cluster::start(3);
    let admin = cluster.token.clone();
    let s: Vec<String> = cluster
        .ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let (n1, n2, n3) = (s[0].as_str(), s[1].as_str(), s[2].as_str());

    // Users: add (the token shown once, as text or JSON), list, errors.
    let alice = add_user(n1, &admin, "alice");
    let bob = add_user(n2, &admin, "bob");
    let carol = add_user(n3, &admin, "carol");
    let out = chat_cli(&[
        "--server", n1, "--token", &admin, "admin", "users", "add", "dave",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim().len(),
        alice.len(),
        "only the token on stdout"
    );
    assert!(text(&out.stderr).contains("shown only this once"));
    let out = chat_cli(&[
        "--server", n1, "--token", &admin, "admin", "users", "add", "dave",
    ]);
    fails(&out, 1, "exists");
    let out = chat_cli(&[
        "--server", n1, "--token", &admin, "admin", "users", "add", "Bad User",
    ]);
    fails(&out, 1, "invalid_field");
    let out = chat_cli(&["--server", n1, "--token", &alice, "admin", "users", "list"]);
    fails(&out, 4, "the admin token was refused");
    let users = json_ok(&[
        "--server", n2, "--token", &admin, "--json", "admin", "users", "list",
    ]);
    let names: Vec<&str> = users
        .as_array()
        .expect("array")
        .iter()
        .map(|u| u["user"].as_str().expect("user"))
        .collect();
    for u in ["alice", "bob", "carol", "dave"] {
        assert!(names.contains(&u), "{users}");
    }

    // A direct chat, opened from either side, is the same chat.
    let d = json_ok(&[
        "--server",
        n1,
        "--token",
        &alice,
        "--json",
        "open-direct",
        "bob",
    ]);
    let direct = d["chat"].as_str().expect("chat").to_string();
    assert_eq!(direct, "d:alice:bob");
    let d2 = json_ok(&[
        "--server",
        n2,
        "--token",
        &bob,
        "--json",
        "open-direct",
        "alice",
    ]);
    assert_eq!(d2["chat"], direct.as_str());

    // send: acks with a seq; the same --client-msg-id again is a duplicate with the same seq.
    let a1 = json_ok(&[
        "--server",
        n1,
        "--token",
        &alice,
        "--json",
        "send",
        &direct,
        "hello bob",
        "--client-msg-id",
        "m-1",
    ]);
    assert_eq!(a1["type"], "ack");
    assert_eq!(a1["duplicate"], false);
    let seq1 = a1["seq"].as_u64().expect("seq");
    let again = json_ok(&[
        "--server",
        n3,
        "--token",
        &alice,
        "--json",
        "send",
        &direct,
        "hello bob",
        "--client-msg-id",
        "m-1",
    ]);
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["seq"].as_u64(), Some(seq1));
    // Text from stdin, table output.
    let mut cmd = chat_cli_cmd(&["--server", n2, "--token", &bob, "send", &direct, "-"]);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), b"hi alice\n").expect("write");
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with(&format!("seq {} ", seq1 + 1)),
        "{}",
        text(&out.stdout)
    );

    // history from another node: both messages, once each, in order; paging.
    let h = json_ok(&[
        "--server", n3, "--token", &bob, "--json", "history", &direct,
    ]);
    assert_eq!(h["chat"], direct.as_str());
    let texts: Vec<(&str, &str)> = h["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter(|m| m["kind"] == "text")
        .map(|m| (m["sender"].as_str().unwrap(), m["text"].as_str().unwrap()))
        .collect();
    assert_eq!(texts, vec![("alice", "hello bob"), ("bob", "hi alice")]);
    let seqs: Vec<u64> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "gapless: {seqs:?}"
    );
    let page = json_ok(&[
        "--server", n1, "--token", &alice, "--json", "history", &direct, "--limit", "1",
    ]);
    assert_eq!(page["messages"].as_array().unwrap().len(), 1);
    assert_eq!(page["messages"][0]["text"], "hi alice");
    assert_eq!(page["more"], true);
    let table = chat_cli(&["--server", n1, "--token", &alice, "history", &direct]);
    assert!(
        text(&table.stdout).contains("hello bob"),
        "{}",
        text(&table.stdout)
    );

    // A group; inspect it as the admin; sync shows both chats with cursors.
    let g = json_ok(&[
        "--server",
        n2,
        "--token",
        &bob,
        "--json",
        "create-group",
        "team",
        "alice",
        "carol",
    ]);
    let group = g["chat"].as_str().expect("chat").to_string();
    assert!(group.starts_with("g:"), "{g}");
    let sent = json_ok(&[
        "--server", n3, "--token", &carol, "--json", "send", &group, "hi team",
    ]);
    let gseq = sent["seq"].as_u64().unwrap();
    let inspect = json_ok(&[
        "--server", n1, "--token", &admin, "--json", "admin", "chat", "inspect", &group,
    ]);
    assert_eq!(inspect["kind"], "group");
    assert_eq!(inspect["name"], "team");
    assert_eq!(inspect["creator"], "bob");
    assert_eq!(inspect["last_seq"].as_u64(), Some(gseq));
    let mut members: Vec<&str> = inspect["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user"].as_str().unwrap())
        .collect();
    members.sort_unstable();
    assert_eq!(members, vec!["alice", "bob", "carol"]);
    let table = chat_cli(&[
        "--server", n1, "--token", &admin, "admin", "chat", "inspect", &group,
    ]);
    assert!(
        text(&table.stdout).contains("team"),
        "{}",
        text(&table.stdout)
    );
    let sync = json_ok(&["--server", n1, "--token", &alice, "--json", "sync"]);
    let chats = sync.as_array().expect("chats");
    let g_state = chats
        .iter()
        .find(|c| c["chat"] == group.as_str())
        .expect("group in sync");
    assert_eq!(g_state["last_seq"].as_u64(), Some(gseq));
    assert!(g_state["unread"].as_u64().unwrap() >= 1, "{g_state}");
    assert!(chats.iter().any(|c| c["chat"] == direct.as_str()));

    // presence: nobody holds a session now.
    let p = json_ok(&[
        "--server", n2, "--token", &bob, "--json", "presence", "alice", "carol",
    ]);
    let p = p.as_array().expect("array");
    assert_eq!(p.len(), 2);
    assert!(p.iter().all(|u| u["online"] == false), "{p:?}");

    // tail follows the chat live (JSON lines) while messages are sent on another node;
    // presence sees the tailing user online meanwhile.
    let mut tail = chat_cli_cmd(&["--server", n3, "--token", &bob, "--json", "tail", &direct])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tail");
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = tail.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut online = false;
    while !online && Instant::now() < deadline {
        let p = json_ok(&[
            "--server", n1, "--token", &alice, "--json", "presence", "bob",
        ]);
        online = p[0]["online"] == true;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(online, "bob (tailing) never showed online");
    let mut want: Vec<String> = (0..5).map(|i| format!("live {i}")).collect();
    for t in &want {
        json_ok(&[
            "--server", n1, "--token", &alice, "--json", "send", &direct, t,
        ]);
    }
    let mut got: Vec<(u64, String)> = Vec::new();
    while got.len() < want.len() {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("tail printed only {got:?}"));
        let v: Value = serde_json::from_str(&line).expect("tail prints JSON lines");
        if v["type"] == "message" {
            got.push((
                v["message"]["seq"].as_u64().unwrap(),
                v["message"]["text"].as_str().unwrap().to_string(),
            ));
        }
    }
    let _ = tail.kill();
    let _ = tail.wait();
    let _ = reader.join();
    let texts: Vec<String> = got.iter().map(|(_, t)| t.clone()).collect();
    assert_eq!(texts, std::mem::take(&mut want), "each once, in order");
    assert!(
        got.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "gapless: {got:?}"
    );

    // Error paths: wrong token, unknown chat, not a member, oversized text, unreachable.
    let out = chat_cli(&[
        "--server", n1, "--token", "wrong", "--json", "send", &direct, "x",
    ]);
    fails(&out, 4, "the token was refused");
    let out = chat_cli(&[
        "--server",
        n1,
        "--token",
        &alice,
        "--json",
        "send",
        "g:0000000000000000",
        "x",
    ]);
    fails(&out, 1, "unknown_chat");
    let out = chat_cli(&[
        "--server", n1, "--token", &carol, "--json", "send", &direct, "x",
    ]);
    fails(&out, 1, "not_member");
    let out = chat_cli(&[
        "--server", n1, "--token", &carol, "--json", "history", &direct,
    ]);
    fails(&out, 1, "not_member");
    let big = "x".repeat(chatd_proto::TEXT_BYTES_MAX + 1);
    let out = chat_cli(&[
        "--server", n1, "--token", &alice, "--json", "send", &direct, &big,
    ]);
    fails(&out, 1, "too_large");
    let out = chat_cli(&["--server", n1, "--json", "sync"]);
    fails(&out, 4, "no token");
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = chat_cli(&[
        "--server",
        &dead.to_string(),
        "--token",
        &alice,
        "--json",
        "sync",
    ]);
    fails(&out, 3, "cannot reach");
    // Nothing of that was stored.
    let h = json_ok(&[
        "--server", n2, "--token", &alice, "--json", "history", &direct,
    ]);
    assert!(h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["text"] != "x"));

    // The token from a config file (--config), with the flag taking precedence.
    let cfg = cluster.dir.path().join("cli.toml");
    std::fs::write(
        &cfg,
        format!("server = \"{n2}\"\ntoken = \"{carol}\"\nadmin_token = \"{admin}\"\n"),
    )
    .unwrap();
    let cfg_s = cfg.to_string_lossy().into_owned();
    let sync = json_ok(&["--config", &cfg_s, "--json", "sync"]);
    assert!(sync
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["chat"] == group.as_str()));
    let users = json_ok(&["--config", &cfg_s, "--json", "admin", "users", "list"]);
    assert!(users.as_array().is_some());
    let out = chat_cli(&["--config", &cfg_s, "--token", "wrong", "sync"]);
    fails(&out, 4, "the token was refused");
    let out = chat_cli(&["--config", "/nonexistent/cli.toml", "sync"]);
    fails(&out, 1, "cannot read config file");

    // Disabling a user: its token stops working for new connections, and a session it has
    // open (a running `tail`) is ended by the server with 4004: chat-cli says so and exits 4.
    let mut carol_tail =
        chat_cli_cmd(&["--server", n2, "--token", &carol, "--json", "tail", &group])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tail");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = json_ok(&[
            "--server", n1, "--token", &alice, "--json", "presence", "carol",
        ]);
        if p[0]["online"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "carol (tailing) never showed online"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let v = json_ok(&[
        "--server", n3, "--token", &admin, "--json", "admin", "users", "disable", "carol",
    ]);
    assert_eq!(v["disabled"], true);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = carol_tail.try_wait().expect("tail status") {
            break status;
        }
        assert!(Instant::now() < deadline, "carol's tail still runs");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut carol_tail.stderr.take().expect("stderr"), &mut err)
        .unwrap();
    assert_eq!(status.code(), Some(4), "{err}");
    assert!(err.contains("revoked"), "{err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = chat_cli(&["--server", n1, "--token", &carol, "--json", "sync"]);
        if out.status.code() == Some(4) && text(&out.stderr).contains("the token was refused") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "carol still accepted: {}",
            text(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Partition leadership transfer: the chat's partition moves to another replica.
    let status = json_ok(&[
        "--server", n1, "--token", &admin, "--json", "admin", "cluster", "status",
    ]);
    let part = inspect["partition"].as_u64().unwrap();
    let row = status["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["group"].as_u64() == Some(part))
        .expect("partition row")
        .clone();
    let leader = row["leader"].as_u64().expect("leader");
    let target = row["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_u64().or_else(|| r["id"].as_u64()).expect("replica id"))
        .find(|r| *r != leader)
        .expect("another replica");
    let t = json_ok(&[
        "--server",
        n2,
        "--token",
        &admin,
        "--json",
        "admin",
        "partition",
        "transfer",
        &part.to_string(),
        "--to",
        &target.to_string(),
    ]);
    assert_eq!(t["leader"].as_u64(), Some(target), "{t}");
    let out = chat_cli(&[
        "--server",
        n2,
        "--token",
        &admin,
        "--json",
        "admin",
        "partition",
        "transfer",
        "9999",
        "--to",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    // The chat still works after the move, and its history is intact.
    let after = json_ok(&[
        "--server",
        n3,
        "--token",
        &bob,
        "--json",
        "send",
        &group,
        "after move",
    ]);
    assert_eq!(after["seq"].as_u64(), Some(gseq + 1));
}
