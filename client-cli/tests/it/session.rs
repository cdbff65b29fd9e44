//! The interactive `chat-cli chat`, driven through pseudo-terminals: two people chat,
//! one receives while typing (the half-typed line is redrawn under the message), typing
//! indicators, read marks, slash commands, and quitting.

use std::process::Command;

use rexpect::process::WaitStatus;
use rexpect::session::{spawn_command, PtySession};

use crate::harness::{chat_cli, text, Cluster, CHAT_CLI};
use crate::messaging::add_user;

/// Generous: the machine is shared with other tests.
const EXPECT_TIMEOUT_MS: u64 = 30_000;

fn session(server: &str, token: &str, chat: &str) -> PtySession {
    let mut cmd = Command::new(CHAT_CLI);
    cmd.args(["--server", server, "--token", token, "chat", chat])
        .env("TERM", "xterm")
        .env_remove("CHATD_SERVER")
        .env_remove("CHATD_TOKEN")
        .env_remove("CHAT_CLI_CONFIG");
    spawn_command(cmd, Some(EXPECT_TIMEOUT_MS)).expect("spawn chat-cli chat in a pty")
}

/// Types `keys` into the session's terminal.
fn type_in(s: &mut PtySession, keys: &str) {
    s.send(keys).expect("write to the pty");
    s.flush().expect("flush the pty");
}

/// Waits for `needle` in the output. rexpect reads the terminal byte by byte as chars,
/// so the needle is matched by its UTF-8 bytes the same way.
fn expect(s: &mut PtySession, who: &str, needle: &str) -> String {
    let as_read: String = needle.bytes().map(char::from).collect();
    s.exp_string(&as_read)
        .unwrap_or_else(|e| panic!("{who}: {needle:?} did not appear: {e}"))
}

#[test]
fn interactive_chat_through_a_pty() {
    let cluster = Cluster::start(1);
    let server = format!("127.0.0.1:{}", cluster.ports[0]);
    let alice = add_user(&server, &cluster.token, "alice");
    let bob = add_user(&server, &cluster.token, "bob");
    let out = chat_cli(&["--server", &server, "--token", &alice, "open-direct", "bob"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let chat = "d:alice:bob";
    let out = chat_cli(&[
        "--server",
        &server,
        "--token",
        &bob,
        "send",
        chat,
        "before you came",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    // Both open the chat: the history is shown, then the prompt.
    let mut a = session(&server, &alice, chat);
    expect(&mut a, "alice", "bob: before you came");
    expect(&mut a, "alice", "[with bob] > ");
    let mut b = session(&server, &bob, chat);
    expect(&mut b, "bob", "[with alice] > ");

    // Alice types half a line.
    type_in(&mut a, "hel");
    expect(&mut a, "alice", "[with bob] > hel");

    // Bob types: alice's prompt says so; bob sends: alice gets the message above her
    // prompt, and her half-typed line is redrawn after it.
    type_in(&mut b, "are you there?");
    expect(&mut a, "alice", "(bob typing…) > hel");
    type_in(&mut b, "\r");
    expect(&mut a, "alice", "bob: are you there?");
    expect(&mut a, "alice", "[with bob] > hel");
    expect(&mut b, "bob", "bob: are you there? ✓");

    // Alice finishes her line: bob gets it, and since he reads it, alice sees it read.
    type_in(&mut a, "lo\r");
    expect(&mut a, "alice", "alice: hello ✓");
    expect(&mut b, "bob", "alice: hello");
    expect(&mut a, "alice", "✓✓ read by bob");

    // Slash commands: the chat list, older history, an unknown command, a bad chat.
    type_in(&mut a, "/chats\r");
    expect(&mut a, "alice", "1. d:alice:bob  with bob");
    type_in(&mut a, "/history 5\r");
    expect(&mut a, "alice", "start of the chat");
    type_in(&mut a, "/nope\r");
    expect(&mut a, "alice", "unknown command /nope");
    type_in(&mut a, "/open d:alice:nobody\r");
    expect(&mut a, "alice", "✗ ");
    expect(&mut a, "alice", "> ");

    // /quit and Ctrl-D both end the session with exit 0.
    type_in(&mut a, "/quit\r");
    match a.process().wait().expect("wait alice") {
        WaitStatus::Exited(_, 0) => {}
        other => panic!("alice's session ended with {other:?}"),
    }
    b.send_control('d').expect("ctrl-d");
    match b.process().wait().expect("wait bob") {
        WaitStatus::Exited(_, 0) => {}
        other => panic!("bob's session ended with {other:?}"),
    }

    // What was said is stored once each, in order.
    let out = chat_cli(&[
        "--server", &server, "--token", &bob, "--json", "history", chat,
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
    assert_eq!(texts, vec!["before you came", "are you there?", "hello"]);
}

#[test]
fn scripted_chat_from_a_pipe_waits_for_its_acks() {
    let cluster = Cluster::start(1);
    let server = format!("127.0.0.1:{}", cluster.ports[0]);
    let alice = add_user(&server, &cluster.token, "alice");
    add_user(&server, &cluster.token, "bob");
    let mut child = Command::new(CHAT_CLI)
        .args(["--server", &server, "--token", &alice, "chat"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    std::io::Write::write_all(
        child.stdin.as_mut().expect("stdin"),
        b"/dm bob\none\ntwo\nthree\n",
    )
    .expect("write");
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("wait");
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    assert!(
        !stdout.contains('\x1b'),
        "no escapes into a pipe: {stdout:?}"
    );
    assert!(!stdout.contains("no ack"), "{stdout}");
    let out = chat_cli(&[
        "--server",
        &server,
        "--token",
        &alice,
        "--json",
        "history",
        "d:alice:bob",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let texts: Vec<&str> = v["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter(|m| m["kind"] == "text")
        .map(|m| m["text"].as_str().expect("text"))
        .collect();
    assert_eq!(texts, vec!["one", "two", "three"]);
}

/// Runs `chat-cli chat [CHAT]` as `token` with `input` piped on stdin.
fn piped(server: &str, token: &str, chat: Option<&str>, input: &str) -> std::process::Output {
    let mut args = vec!["--server", server, "--token", token, "chat"];
    args.extend(chat);
    let mut child = crate::harness::chat_cli_cmd(&args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // A session that refuses its input may be gone before all of it is written.
    let _ = std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), input.as_bytes());
    drop(child.stdin.take());
    child.wait_with_output().expect("wait")
}

/// The texts of a chat's messages, in order.
fn stored_texts(server: &str, token: &str, chat: &str) -> Vec<String> {
    let out = chat_cli(&[
        "--server", server, "--token", token, "--json", "history", chat,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    v["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter(|m| m["kind"] == "text")
        .map(|m| m["text"].as_str().expect("text").to_string())
        .collect()
}

#[test]
fn piped_chat_without_a_chosen_chat_is_refused_and_sends_nothing() {
    let cluster = Cluster::start(1);
    let server = format!("127.0.0.1:{}", cluster.ports[0]);
    let alice = add_user(&server, &cluster.token, "alice");
    add_user(&server, &cluster.token, "bob");
    // Alice has a chat with a message in it: the one a terminal session would open.
    let out = chat_cli(&["--server", &server, "--token", &alice, "open-direct", "bob"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = chat_cli(&[
        "--server",
        &server,
        "--token",
        &alice,
        "send",
        "d:alice:bob",
        "earlier",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = piped(&server, &alice, None, "text\nmore text\n");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("no chat chosen for piped input"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was sent"), "{stderr}");
    assert_eq!(
        stored_texts(&server, &alice, "d:alice:bob"),
        vec!["earlier"]
    );
    // Slash commands before the first message are fine; naming the chat works.
    let out = piped(&server, &alice, None, "/chats\n/open d:alice:bob\nhello\n");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = piped(&server, &alice, Some("d:alice:bob"), "again\n");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        stored_texts(&server, &alice, "d:alice:bob"),
        vec!["earlier", "hello", "again"]
    );
}

/// The lines of a session's output that show one of `texts` as stored (`✓`), without
/// their clock and seq.
fn shown_stored(stdout: &str, texts: &[&str]) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|l| l.split_once(" alice: ").map(|(_, rest)| rest.to_string()))
        .filter(|rest| texts.iter().any(|t| rest.strip_suffix(" ✓") == Some(*t)))
        .collect()
}

/// A node of `cluster` that does not lead `chat`'s partition: a session there gets its
/// acks straight from the leader but its own messages through the delivery queue, so the
/// ack usually comes first.
fn away_from_the_leader(cluster: &Cluster, chat: &str) -> String {
    let admin = cluster.token.as_str();
    let any = format!("127.0.0.1:{}", cluster.ports[0]);
    let json = |args: &[&str]| -> serde_json::Value {
        let out = chat_cli(args);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("JSON")
    };
    let inspect = json(&[
        "--server", &any, "--token", admin, "--json", "admin", "chat", "inspect", chat,
    ]);
    let partition = inspect["partition"].as_u64().expect("partition");
    let status = json(&[
        "--server", &any, "--token", admin, "--json", "admin", "cluster", "status",
    ]);
    let leader = status["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .find(|p| p["group"].as_u64() == Some(partition))
        .and_then(|p| p["leader"].as_u64())
        .expect("the chat's partition has a leader");
    status["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["id"].as_u64() != Some(leader))
        .and_then(|n| n["api_addr"].as_str())
        .expect("another node")
        .to_string()
}

#[test]
fn piped_quit_waits_for_acks_and_shows_them_like_end_of_input() {
    let cluster = Cluster::start(3);
    let first = format!("127.0.0.1:{}", cluster.ports[0]);
    let alice = add_user(&first, &cluster.token, "alice");
    add_user(&first, &cluster.token, "bob");
    let chat = "d:alice:bob";
    let out = chat_cli(&["--server", &first, "--token", &alice, "open-direct", "bob"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let server = away_from_the_leader(&cluster, chat);

    let by_eof: Vec<String> = (1..=8).map(|i| format!("eof {i}")).collect();
    let by_quit: Vec<String> = (1..=8).map(|i| format!("quit {i}")).collect();
    for (batch, ending) in [(&by_eof, ""), (&by_quit, "/quit\nafter quit\n")] {
        let input = format!("{}\n{ending}", batch.join("\n"));
        let out = piped(&server, &alice, Some(chat), &input);
        let stdout = text(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{stdout}\n{}",
            text(&out.stderr)
        );
        assert!(!stdout.contains("no ack"), "{stdout}");
        let texts: Vec<&str> = batch.iter().map(String::as_str).collect();
        let want: Vec<String> = batch.iter().map(|t| format!("{t} ✓")).collect();
        assert_eq!(
            shown_stored(&stdout, &texts),
            want,
            "each message shown once, stored, in order:\n{stdout}"
        );
    }
    let mut want = by_eof.clone();
    want.extend(by_quit.iter().cloned());
    assert_eq!(
        stored_texts(&server, &alice, chat),
        want,
        "nothing after /quit is sent"
    );
}

#[test]
fn dm_to_the_open_chat_does_not_print_it_again() {
    let cluster = Cluster::start(1);
    let server = format!("127.0.0.1:{}", cluster.ports[0]);
    let alice = add_user(&server, &cluster.token, "alice");
    add_user(&server, &cluster.token, "bob");
    let out = piped(
        &server,
        &alice,
        None,
        "/dm bob\none\n/dm bob\n/open d:alice:bob\ntwo\n",
    );
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    let header = "── with bob (d:alice:bob) · members: ";
    assert_eq!(stdout.matches(header).count(), 1, "{stdout}");
    assert_eq!(
        stdout
            .matches("(already in with bob (d:alice:bob))")
            .count(),
        2,
        "{stdout}"
    );
    assert_eq!(stdout.matches("alice: one ✓").count(), 1, "{stdout}");
    assert_eq!(stdout.matches("alice: two ✓").count(), 1, "{stdout}");
    assert_eq!(
        stored_texts(&server, &alice, "d:alice:bob"),
        vec!["one", "two"]
    );
}
