//! End-to-end tests of the `chat-cli` binary: against a real single-node chatd, against
//! a port where nothing listens, and against a fake server for the error paths.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const CHAT_CLI: &str = env!("CARGO_BIN_EXE_chat-cli");
const READY_TIMEOUT: Duration = Duration::from_secs(90);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("client-cli lives in the workspace")
        .to_path_buf()
}

/// Where a `chatd` binary may be, best first: next to chat-cli (same target dir as this
/// test), `$CARGO_TARGET_DIR/debug`, `$HOME/.cache/chatd-target/debug`, `<workspace>/target/debug`.
fn chatd_candidates() -> Vec<PathBuf> {
    let mut c = Vec::new();
    if let Some(dir) = Path::new(CHAT_CLI).parent() {
        c.push(dir.join("chatd"));
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        let t = PathBuf::from(t);
        let t = if t.is_relative() {
            workspace_root().join(t)
        } else {
            t
        };
        c.push(t.join("debug").join("chatd"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        c.push(PathBuf::from(home).join(".cache/chatd-target/debug/chatd"));
    }
    c.push(workspace_root().join("target/debug/chatd"));
    c
}

/// The chatd binary; built with `cargo build -p chatd` when none is found.
fn chatd_binary() -> PathBuf {
    let candidates = chatd_candidates();
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return found.clone();
    }
    // Build into the target dir this test was built in, so it lands at candidates[0].
    let target_dir = Path::new(CHAT_CLI)
        .parent()
        .and_then(Path::parent)
        .expect("chat-cli is in <target>/debug")
        .to_path_buf();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("no chatd binary in {candidates:?}: running cargo build -p chatd");
    let status = Command::new(cargo)
        .args(["build", "-p", "chatd"])
        .current_dir(workspace_root())
        .env("CARGO_TARGET_DIR", &target_dir)
        .status()
        .expect("cannot run cargo");
    assert!(status.success(), "cargo build -p chatd failed: {status}");
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .expect("cargo build -p chatd produced no chatd binary")
}

/// A base port with the API port (TCP) and the cluster port (QUIC, UDP, base+1) free
/// on loopback. Candidates step by 10 from a per-process start so parallel runs differ.
fn free_base_port() -> u16 {
    let start = 20_000 + (std::process::id() % 3_000) * 10;
    for i in 0..3_000u32 {
        let base = 20_000 + ((start - 20_000 + i * 10) % 30_000);
        let Ok(base) = u16::try_from(base) else {
            continue;
        };
        let tcp = TcpListener::bind(("127.0.0.1", base));
        let udp = UdpSocket::bind(("127.0.0.1", base + 1));
        if tcp.is_ok() && udp.is_ok() {
            return base;
        }
    }
    panic!("no free loopback base port found");
}

/// A chatd node process; killed (by its pid) and reaped when dropped, even on panic.
struct ChatdNode {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    /// The admin token `chatd cluster init` wrote.
    token: String,
}

impl Drop for ChatdNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ChatdNode {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("chatd.log")).unwrap_or_default()
    }

    /// Inits and starts a one-node cluster on a free port and waits for `/readyz`.
    /// Retries on another port if the node dies (someone took the port meanwhile).
    fn start() -> ChatdNode {
        let chatd = chatd_binary();
        let mut last_log = String::new();
        for _attempt in 0..3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let port = free_base_port();
            let cluster = dir.path().join("cluster");
            let init = Command::new(&chatd)
                .args(["cluster", "init", "--nodes", "1", "--base-port"])
                .arg(port.to_string())
                .arg("--out")
                .arg(&cluster)
                .current_dir(dir.path())
                .output()
                .expect("cannot run chatd cluster init");
            assert!(
                init.status.success(),
                "chatd cluster init failed: {}",
                String::from_utf8_lossy(&init.stderr)
            );
            let log = File::create(dir.path().join("chatd.log")).expect("log file");
            let child = Command::new(&chatd)
                .arg("run")
                .arg("--config")
                .arg(cluster.join("node-1/chatd.toml"))
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log file"))
                .stderr(log)
                .spawn()
                .expect("cannot start chatd");
            let token = std::fs::read_to_string(cluster.join("admin.token")).expect("admin token");
            let mut node = ChatdNode {
                child,
                port,
                dir,
                token,
            };
            match node.wait_ready() {
                Ok(()) => return node,
                Err(why) => {
                    last_log = format!("{why}\n--- chatd log ---\n{}", node.log());
                    eprintln!("chatd on port {port} did not become ready: {last_log}");
                }
            }
        }
        panic!("chatd never became ready: {last_log}");
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("chatd exited: {status}"));
            }
            if http_status(self.port, "/readyz") == Some(200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("/readyz not 200 after {READY_TIMEOUT:?}"));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The status code of `GET path` on loopback, or None if there is no HTTP answer.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs chat-cli with `args`, with no chatd or proxy settings inherited.
fn chat_cli(args: &[&str]) -> Output {
    chat_cli_cmd(args).output().expect("cannot run chat-cli")
}

fn chat_cli_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(CHAT_CLI);
    cmd.args(args);
    for var in [
        "CHATD_SERVER",
        "CHATD_TOKEN",
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn cluster_status_against_a_real_node() {
    let node = ChatdNode::start();
    let server = format!("127.0.0.1:{}", node.port);

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
        node.log()
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
        node.port + 1
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
