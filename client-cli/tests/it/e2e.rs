//! End-to-end encrypted chats (MLS) with `chat-cli e2e` against a real 3-node cluster:
//! people on different nodes read each other, the server's files and the WebSocket
//! traffic hold no plaintext, a removed member cannot decrypt what follows, concurrent
//! commits converge, and an offline device catches up across epochs.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;

use crate::harness::{chat_cli_cmd, text, Cluster};
use crate::messaging::add_user;

/// One device of a person: where it connects, its token and its state file.
struct Device {
    name: String,
    server: String,
    token: String,
    state: PathBuf,
    /// A passphrase for the state file (else chat-cli's key file beside it).
    passphrase: Option<String>,
}

impl Device {
    fn cmd(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Command {
        let mut all = vec!["--server", &self.server, "--token", &self.token];
        all.extend_from_slice(args);
        let mut cmd = chat_cli_cmd(&all);
        cmd.env_remove("CHAT_CLI_E2E_PASSPHRASE")
            .env_remove("CHAT_CLI_E2E_STATE")
            .env("XDG_DATA_HOME", self.state.parent().unwrap());
        if let Some(p) = &self.passphrase {
            cmd.env("CHAT_CLI_E2E_PASSPHRASE", p);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    fn e2e_args<'a>(&'a self, args: &[&'a str], json: bool) -> Vec<&'a str> {
        let mut all = Vec::new();
        if json {
            all.push("--json");
        }
        all.extend(["e2e", "--state", self.state.to_str().unwrap()]);
        all.extend_from_slice(args);
        all
    }

    /// `chat-cli e2e ARGS`, asserting exit 0; its stdout.
    fn e2e(&self, args: &[&str]) -> String {
        let out = self.cmd(&self.e2e_args(args, false), &[]).output().unwrap();
        ok(&self.name, args, &out)
    }

    fn e2e_json(&self, args: &[&str]) -> Value {
        let out = self.cmd(&self.e2e_args(args, true), &[]).output().unwrap();
        serde_json::from_str(&ok(&self.name, args, &out)).unwrap()
    }

    /// The texts this device holds of `chat`, after catching up.
    fn texts(&self, chat: &str) -> Vec<String> {
        self.e2e_json(&["read", chat])
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["text"].as_str().unwrap().to_string())
            .collect()
    }
}

/// The newest entry of `kind` in a whole-history answer.
fn newest(history: &Value, kind: &str) -> Value {
    history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|m| m["kind"] == kind)
        .unwrap()
        .clone()
}

/// Feeds a log entry (from `history --json`) to an opened device, as `sender`'s.
fn feed(
    dev: &mut chatd_e2e::Device,
    chat: &str,
    m: &Value,
    sender: &str,
    kind: chatd_e2e::Kind,
) -> chatd_e2e::Event {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(m["text"].as_str().unwrap())
        .unwrap();
    dev.process(chat, m["seq"].as_u64().unwrap(), sender, kind, &bytes, 0)
        .unwrap()
}

impl Device {
    /// This device's state, opened in the test's process with chat-cli's key file.
    fn open_state(&self) -> chatd_e2e::Device {
        let key: [u8; 32] = std::fs::read(format!("{}.key", self.state.display()))
            .unwrap()
            .try_into()
            .unwrap();
        chatd_e2e::Device::open(&self.state, &chatd_e2e::StoreKey::from_bytes(key)).unwrap()
    }
}

fn ok(who: &str, args: &[&str], out: &Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{who}: chat-cli e2e {args:?}\nstdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// A TCP relay to `target` that records every byte the server sends back: what a packet
/// capture of the (unencrypted, loopback) WebSocket and HTTP traffic would hold.
fn capturing_relay(target: String) -> (String, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let captured = Arc::new(Mutex::new(Vec::new()));
    let cap = captured.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(&target) else {
                continue;
            };
            let (mut c_read, mut s_write) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_read, &mut s_write);
                let _ = s_write.shutdown(std::net::Shutdown::Write);
            });
            let (mut s_read, mut c_write) = (server, client);
            let cap = cap.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 * 1024];
                loop {
                    match s_read.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            cap.lock().unwrap().extend_from_slice(&buf[..n]);
                            if c_write.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = c_write.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (addr, captured)
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Every file under `dir` that contains `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                if contains(&bytes, needle) {
                    found.push(p);
                }
            }
        }
    }
    found
}

fn wait_ok(who: &str, child: Child, args: &[&str]) -> Output {
    let out = child.wait_with_output().unwrap();
    ok(who, args, &out);
    out
}

fn members(d: &Device, chat: &str) -> (u64, Vec<String>) {
    let v = d.e2e_json(&["members", chat]);
    let mut m: Vec<String> = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            format!(
                "{}/{}",
                m["user"].as_str().unwrap(),
                m["device"].as_str().unwrap()
            )
        })
        .collect();
    m.sort();
    (v["epoch"].as_u64().unwrap(), m)
}

#[test]
fn e2e_group_across_three_nodes_keeps_plaintext_off_the_servers() {
    let cluster = Cluster::start(3);
    let admin = cluster.token.clone();
    let s: Vec<String> = cluster
        .ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let home = tempfile::tempdir().unwrap();
    // Bob's laptop talks to node 2 through a relay that records what it receives.
    let (relay, captured) = capturing_relay(s[1].clone());
    let device = |user: &str, name: &str, server: &str, token: &str, pass: Option<&str>| {
        let dir = home.path().join(format!("{user}-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        Device {
            name: format!("{user}/{name}"),
            server: server.to_string(),
            token: token.to_string(),
            state: dir.join("state.mls"),
            passphrase: pass.map(str::to_string),
        }
    };
    let tokens: Vec<String> = ["alice", "bob", "carol", "dave", "erin"]
        .iter()
        .map(|u| add_user(&s[0], &admin, u))
        .collect();
    let alice = device("alice", "laptop", &s[0], &tokens[0], Some("correct horse"));
    let bob = device("bob", "laptop", &relay, &tokens[1], None);
    let bob_phone = device("bob", "phone", &s[2], &tokens[1], None);
    let carol = device("carol", "phone", &s[2], &tokens[2], None);
    let dave = device("dave", "laptop", &s[0], &tokens[3], None);
    let erin = device("erin", "laptop", &s[1], &tokens[4], None);
    for d in [&alice, &bob, &bob_phone, &carol, &dave, &erin] {
        let dev = d.name.split('/').nth(1).unwrap();
        let out = d.e2e(&["init", "--device", dev]);
        assert!(
            out.contains("20 KeyPackages") || out.contains("21 KeyPackages"),
            "{out}"
        );
    }
    let listed = alice.e2e_json(&["devices", "bob"]);
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");

    // Alice makes the group with Bob (both his devices) and Carol.
    let chat = alice.e2e(&["create", "bob", "carol"]).trim().to_string();
    assert!(chat.starts_with("e:"), "{chat}");
    let tag = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let secret = |who: &str| format!("secret-{who}-{tag}");
    alice.e2e(&["send", &chat, &secret("alice")]);
    bob.e2e(&["send", &chat, &secret("bob")]);
    carol.e2e(&["send", &chat, &secret("carol")]);
    bob_phone.e2e(&["send", &chat, &secret("bobphone")]);
    for d in [&alice, &bob, &bob_phone, &carol] {
        let texts = d.texts(&chat);
        for who in ["alice", "bob", "carol", "bobphone"] {
            assert!(texts.contains(&secret(who)), "{}: {texts:?}", d.name);
        }
    }
    // Safety numbers: what Alice's group says of Bob's laptop is what Bob's laptop says.
    let bob_safety = bob.e2e(&["whoami"]);
    let alice_view = alice.e2e_json(&["members", &chat]);
    let bob_in_alice = alice_view["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["user"] == "bob" && m["device"] == "laptop")
        .unwrap()["safety_number"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        bob_safety.contains(&bob_in_alice),
        "{bob_safety} vs {bob_in_alice}"
    );

    // An encrypted attachment: Carol decrypts what Alice attached.
    let file_secret = format!("file-secret-{tag}");
    let plain_file = home.path().join("plans.txt");
    std::fs::write(&plain_file, file_secret.repeat(100)).unwrap();
    let sent = alice.e2e(&[
        "send",
        &chat,
        "the plans",
        "--file",
        plain_file.to_str().unwrap(),
    ]);
    let file_seq = sent.trim().rsplit('/').next().unwrap().to_string();
    let got = home.path().join("got.txt");
    carol.e2e(&["download", &chat, &file_seq, "-o", got.to_str().unwrap()]);
    assert_eq!(
        std::fs::read(&got).unwrap(),
        file_secret.repeat(100).into_bytes()
    );

    // Alice removes Carol; what Bob says next Carol cannot decrypt, even given the bytes.
    alice.e2e(&["remove", &chat, "carol"]);
    bob.e2e(&["send", &chat, &secret("after-removal")]);
    assert!(alice.texts(&chat).contains(&secret("after-removal")));
    assert!(!carol.texts(&chat).contains(&secret("after-removal")));
    let history = crate::messaging::json_ok(&[
        "--server", &s[0], "--token", &tokens[0], "--json", "history", &chat, "--all",
    ]);
    let last_app = newest(&history, "mls_application");
    let event = feed(
        &mut carol.open_state(),
        &chat,
        &last_app,
        "bob",
        chatd_e2e::Kind::Application,
    );
    assert!(
        !matches!(event, chatd_e2e::Event::Message { .. }),
        "a removed member decrypted a later message: {event:?}"
    );

    // Concurrent commits: Bob's laptop builds one (adding Dave) and waits 3 s before
    // sending it; meanwhile Alice's (adding Erin) wins the epoch. Bob's is refused, built
    // again on the new epoch and lands; everyone converges on one epoch and membership.
    let add_dave = ["add", chat.as_str(), "dave"];
    let bob_add = bob
        .cmd(
            &bob.e2e_args(&add_dave, false),
            &[("CHAT_CLI_E2E_TEST_COMMIT_DELAY_MS", "3000")],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let started = Instant::now();
    alice.e2e(&["add", &chat, "erin"]);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "Alice's commit was not first"
    );
    let out = wait_ok("bob/laptop", bob_add, &add_dave);
    assert!(
        text(&out.stderr).contains("another member's commit won epoch"),
        "Bob's commit did not lose its epoch: {}",
        text(&out.stderr)
    );
    let expected = vec![
        "alice/laptop".to_string(),
        "bob/laptop".into(),
        "bob/phone".into(),
        "dave/laptop".into(),
        "erin/laptop".into(),
    ];
    for d in [&alice, &bob, &dave, &erin] {
        d.e2e(&[
            "send",
            &chat,
            &secret(&format!("converged-{}", d.name.replace('/', "-"))),
        ]);
    }
    let mut epochs = Vec::new();
    for d in [&alice, &bob, &dave, &erin] {
        let (epoch, m) = members(d, &chat);
        assert_eq!(m, expected, "{}", d.name);
        epochs.push(epoch);
        let texts = d.texts(&chat);
        for w in [&alice, &bob, &dave, &erin] {
            let want = secret(&format!("converged-{}", w.name.replace('/', "-")));
            assert!(texts.contains(&want), "{} misses {want}: {texts:?}", d.name);
        }
    }
    assert!(epochs.windows(2).all(|w| w[0] == w[1]), "{epochs:?}");
    // create 1, remove carol 2, add erin 3, add dave 4 (epochs 0 → 4).
    assert_eq!(epochs[0], 4);

    // Bob's phone was offline since its first message, across three epochs: it catches
    // up and reads everything it is entitled to.
    let (epoch, m) = members(&bob_phone, &chat);
    assert_eq!((epoch, m), (4, expected.clone()));
    let texts = bob_phone.texts(&chat);
    assert!(texts.contains(&secret("after-removal")), "{texts:?}");
    for w in [&alice, &bob, &dave, &erin] {
        assert!(texts.contains(&secret(&format!("converged-{}", w.name.replace('/', "-")))));
    }

    // Dave leaves; Alice's next message first commits the removal of Dave's device, so
    // Dave's device cannot read it even given its bytes.
    dave.e2e(&["leave", &chat]);
    alice.e2e(&["send", &chat, &secret("after-dave-left")]);
    let (epoch, m) = members(&alice, &chat);
    assert_eq!(epoch, 5, "the removal was committed");
    assert!(!m.contains(&"dave/laptop".to_string()), "{m:?}");
    assert!(bob.texts(&chat).contains(&secret("after-dave-left")));
    let history = crate::messaging::json_ok(&[
        "--server", &s[0], "--token", &tokens[0], "--json", "history", &chat, "--all",
    ]);
    let last_app = newest(&history, "mls_application");
    let mut dave_dev = dave.open_state();
    // Even given the commit that removed it, first: it learns it was removed, no more.
    let removal = newest(&history, "mls_commit");
    let seen = feed(
        &mut dave_dev,
        &chat,
        &removal,
        "alice",
        chatd_e2e::Kind::Commit,
    );
    assert!(
        matches!(
            seen,
            chatd_e2e::Event::Epoch {
                removed_self: true,
                ..
            }
        ),
        "{seen:?}"
    );
    let event = feed(
        &mut dave_dev,
        &chat,
        &last_app,
        "alice",
        chatd_e2e::Kind::Application,
    );
    assert!(
        !matches!(event, chatd_e2e::Event::Message { .. }),
        "a member who left decrypted a later message: {event:?}"
    );

    // `chat-cli chat` on Bob's laptop: the E2E chat is marked, its messages decrypted with
    // this device's state, and what Bob types goes out encrypted.
    let typed = secret("typed-in-chat");
    let mut session = bob
        .cmd(
            &["chat", &chat, "--last", "5"],
            &[("CHAT_CLI_E2E_STATE", bob.state.to_str().unwrap())],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    session
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{typed}\n").as_bytes())
        .unwrap();
    let out = session.wait_with_output().unwrap();
    let shown = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{shown}\n{}", text(&out.stderr));
    assert!(shown.contains("🔒"), "the E2E chat is not marked: {shown}");
    let erin_said = secret("converged-erin-laptop");
    assert!(
        shown.contains(&erin_said),
        "not decrypted in the session: {shown}"
    );
    assert!(shown.contains(&format!("{typed} ✓")), "{shown}");
    assert!(alice.texts(&chat).contains(&typed));

    // A plaintext control: a plain group's message is found where E2E ones must not be.
    let plain_marker = format!("plain-control-{tag}");
    let group = crate::messaging::json_ok(&[
        "--server",
        &s[0],
        "--token",
        &tokens[0],
        "--json",
        "create-group",
        "plain",
        "bob",
    ])["chat"]
        .as_str()
        .unwrap()
        .to_string();
    crate::messaging::json_ok(&[
        "--server",
        &s[0],
        "--token",
        &tokens[0],
        "--json",
        "send",
        &group,
        &plain_marker,
    ]);
    crate::messaging::json_ok(&[
        "--server", &relay, "--token", &tokens[1], "--json", "history", &group,
    ]);
    let data = cluster.dir.path();
    assert!(
        !files_containing(data, &plain_marker).is_empty(),
        "the grep cannot see stored plaintext"
    );
    let capture = captured.lock().unwrap().clone();
    assert!(
        contains(&capture, &plain_marker),
        "the capture missed plaintext"
    );
    assert!(
        contains(&capture, "mls_application"),
        "the capture saw no E2E traffic"
    );
    let mut secrets: Vec<String> = ["alice", "bob", "carol", "bobphone", "after-removal"]
        .iter()
        .map(|w| secret(w))
        .collect();
    secrets.push(file_secret.clone());
    secrets.push(typed.clone());
    secrets.push(secret("after-dave-left"));
    secrets.push("the plans".into());
    for w in [&alice, &bob, &dave, &erin] {
        secrets.push(secret(&format!("converged-{}", w.name.replace('/', "-"))));
    }
    for x in &secrets {
        let found = files_containing(data, x);
        assert!(found.is_empty(), "{x:?} in the servers' files: {found:?}");
        assert!(!contains(&capture, x), "{x:?} in the WebSocket traffic");
    }
    // The devices' own state files hold it encrypted.
    for d in [&alice, &bob, &bob_phone, &carol] {
        let bytes = std::fs::read(&d.state).unwrap();
        assert!(
            !contains(&bytes, &secret("alice")),
            "{} state in the clear",
            d.name
        );
    }
}
