//! The test harness: real chatd node processes (killed by pid and their temp dirs removed
//! on drop, even on panic) and the chat-cli binary run with a clean environment.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub const CHAT_CLI: &str = env!("CARGO_BIN_EXE_chat-cli");
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("client-cli lives in the workspace")
        .to_path_buf()
}

/// The chatd binary: next to chat-cli, in `$CARGO_TARGET_DIR/debug`, in
/// `$HOME/.cache/chatd-target/debug` or `<workspace>/target/debug`; built if none is there.
pub fn chatd_binary() -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(dir) = Path::new(CHAT_CLI).parent() {
        candidates.push(dir.join("chatd"));
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        let t = PathBuf::from(t);
        let t = if t.is_relative() {
            workspace_root().join(t)
        } else {
            t
        };
        candidates.push(t.join("debug/chatd"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cache/chatd-target/debug/chatd"));
    }
    candidates.push(workspace_root().join("target/debug/chatd"));
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return found.clone();
    }
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

/// A base port such that node i's API port (TCP, base + 10·i) and cluster port (UDP,
/// base + 10·i + 1) are free for i = 0..nodes.
pub fn free_base_port(nodes: u16) -> u16 {
    // Tests of this process run in parallel: each call starts from its own candidate, so
    // two clusters never pick the same free ports (one would then find the other's nodes
    // answering /readyz on them).
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let start = 20_000 + (std::process::id() % 2_000) * 10 + 7 + call * 400;
    for i in 0..3_000u32 {
        let base = 20_000 + ((start - 20_000 + i * 40) % 30_000);
        let Ok(base) = u16::try_from(base) else {
            continue;
        };
        let free = (0..nodes).all(|n| {
            let p = base + 10 * n;
            TcpListener::bind(("127.0.0.1", p)).is_ok()
                && UdpSocket::bind(("127.0.0.1", p + 1)).is_ok()
        });
        if free {
            return base;
        }
    }
    panic!("no free loopback base port found");
}

/// The status code of `GET path` on loopback, or None if there is no HTTP answer.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
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

/// A chatd cluster of node processes; each killed by its pid and reaped on drop.
pub struct Cluster {
    pub children: Vec<Child>,
    pub ports: Vec<u16>,
    pub dir: tempfile::TempDir,
    pub token: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Cluster {
    pub fn logs(&self) -> String {
        (1..=self.ports.len())
            .map(|n| {
                let log = std::fs::read_to_string(self.dir.path().join(format!("node-{n}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- node {n} (last lines) ---\n{}\n", tail.join("\n"))
            })
            .collect()
    }

    /// `chatd cluster init --nodes N --send-rate-per-sec 100000`, `chatd run` × N, and
    /// waits for `/readyz` on every node. Retries on other ports if a node dies.
    pub fn start(nodes: u16) -> Cluster {
        let chatd = chatd_binary();
        let mut last = String::new();
        for _attempt in 0..3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let base = free_base_port(nodes);
            let out = dir.path().join("cluster");
            let init = Command::new(&chatd)
                .args(["cluster", "init", "--nodes"])
                .arg(nodes.to_string())
                .arg("--base-port")
                .arg(base.to_string())
                .args(["--send-rate-per-sec", "100000", "--out"])
                .arg(&out)
                .current_dir(dir.path())
                .output()
                .expect("cannot run chatd cluster init");
            assert!(
                init.status.success(),
                "chatd cluster init failed: {}",
                String::from_utf8_lossy(&init.stderr)
            );
            let token = std::fs::read_to_string(out.join("admin.token")).expect("admin token");
            let mut cluster = Cluster {
                children: Vec::new(),
                ports: (0..nodes).map(|i| base + 10 * i).collect(),
                dir,
                token: token.trim().to_string(),
            };
            for n in 1..=nodes {
                let log = File::create(cluster.dir.path().join(format!("node-{n}.log")))
                    .expect("log file");
                let child = Command::new(&chatd)
                    .arg("run")
                    .arg("--config")
                    .arg(out.join(format!("node-{n}/chatd.toml")))
                    .current_dir(cluster.dir.path())
                    .stdin(Stdio::null())
                    .stdout(log.try_clone().expect("log file"))
                    .stderr(log)
                    .spawn()
                    .expect("cannot start chatd");
                cluster.children.push(child);
            }
            match cluster.wait_ready() {
                Ok(()) => return cluster,
                Err(why) => {
                    last = format!("{why}\n{}", cluster.logs());
                    eprintln!("cluster on base port {base} did not become ready: {last}");
                }
            }
        }
        panic!("the cluster never became ready: {last}");
    }

    pub fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            for (i, c) in self.children.iter_mut().enumerate() {
                if let Ok(Some(status)) = c.try_wait() {
                    return Err(format!("node {} exited: {status}", i + 1));
                }
            }
            if self
                .ports
                .iter()
                .all(|&p| http_status(p, "/readyz") == Some(200))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "/readyz not 200 on all nodes after {READY_TIMEOUT:?}"
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn nodes_arg(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

pub fn chat_cli_cmd(args: &[&str]) -> Command {
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

/// Runs chat-cli with `args`; its stdout, after asserting it exited 0.
pub fn chat_cli_ok(args: &[&str]) -> String {
    let out = chat_cli_cmd(args).output().expect("cannot run chat-cli");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    stdout
}

pub fn f(v: &serde_json::Value, path: &str) -> f64 {
    let mut cur = v;
    for key in path.split('.') {
        cur = &cur[key];
    }
    cur.as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number in {v:#}"))
}

/// Runs chat-cli with `args`, with no chatd or proxy settings inherited.
pub fn chat_cli(args: &[&str]) -> Output {
    chat_cli_cmd(args).output().expect("cannot run chat-cli")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
