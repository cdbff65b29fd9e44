//! `chatd demo`: a local cluster of child processes on loopback.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::config::{Config, RaftSection};
use crate::init::{init_cluster, InitSpec};

/// One node of the demo, as written to demo.json.
#[derive(Serialize)]
pub struct DemoNode {
    pub id: u64,
    pub client_url: String,
    pub ws_url: String,
    pub cluster_addr: String,
    pub pid: u32,
    pub config: PathBuf,
    pub log: PathBuf,
}

/// demo.json.
#[derive(Serialize)]
pub struct DemoFile {
    pub cluster_id: String,
    /// The admin bearer token (also in DIR/admin.token).
    pub admin_token: String,
    pub nodes: Vec<DemoNode>,
}

/// Initializes `dir` if needed, starts the nodes, writes `dir/demo.json`, and stops the
/// nodes on SIGTERM or Ctrl-C.
pub async fn demo(nodes: u32, dir: &Path, base_port: u16, partitions: u32) -> anyhow::Result<()> {
    let created = !dir.join("ca.pem").exists();
    if created {
        init_cluster(&InitSpec {
            nodes,
            out: dir.to_path_buf(),
            hosts: vec![std::net::IpAddr::from([127, 0, 0, 1])],
            base_port,
            partitions,
            raft: RaftSection::default(),
            gateway: Default::default(),
            notify: Default::default(),
            data_dir_root: None,
        })?;
    }
    let exe = std::env::current_exe().context("cannot find the chatd executable")?;
    let mut children: Vec<(u64, Child)> = Vec::new();
    let mut out = Vec::new();
    let mut cluster_id = String::new();
    for id in 1..=nodes as u64 {
        let node_dir = dir.join(format!("node-{id}"));
        let config_path = node_dir.join("chatd.toml");
        let config = Config::load(&config_path)?;
        cluster_id = config.cluster_id.clone();
        let me = config
            .me()
            .context("node missing from its own peer list")?
            .clone();
        let log_path = node_dir.join("chatd.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let child = Command::new(&exe)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start node {id}"))?;
        out.push(DemoNode {
            id,
            client_url: format!("http://{}", me.api_addr),
            ws_url: format!("ws://{}/v1/ws", me.api_addr),
            cluster_addr: me.cluster_addr.to_string(),
            pid: child.id(),
            config: config_path,
            log: log_path,
        });
        children.push((id, child));
    }
    let admin_token = std::fs::read_to_string(dir.join("admin.token"))
        .with_context(|| format!("cannot read {}", dir.join("admin.token").display()))?
        .trim()
        .to_string();
    let file = DemoFile {
        cluster_id,
        admin_token,
        nodes: out,
    };
    let json = serde_json::to_string_pretty(&file)?;
    std::fs::write(dir.join("demo.json"), &json)
        .with_context(|| format!("cannot write {}", dir.join("demo.json").display()))?;
    println!("chatd demo cluster {} ({} nodes)", file.cluster_id, nodes);
    for n in &file.nodes {
        println!(
            "  node {}  {}  pid {}  log {}",
            n.id,
            n.client_url,
            n.pid,
            n.log.display()
        );
    }
    println!(
        "details in {}; Ctrl-C stops the cluster",
        dir.join("demo.json").display()
    );
    if created {
        crate::first_steps::print(
            &format!(
                "chatd demo: created a {nodes}-node cluster in {}.",
                dir.display()
            ),
            &dir.join("admin.token"),
            &format!("127.0.0.1:{base_port}"),
        );
    }
    crate::run::wait_for_signal().await;
    stop_children(&mut children);
    Ok(())
}

/// How long the demo waits for its nodes to drain and exit after SIGTERM before killing
/// them: a node's worst-case drain (the default `lifecycle.drain_timeout_ms`, the wait
/// for sessions to close, the shutdown of groups and QUIC) plus a margin.
pub const DEMO_STOP_TIMEOUT_MS: u64 = crate::config::LifecycleSection::DEFAULT_DRAIN_TIMEOUT_MS
    + crate::run::SESSIONS_CLOSE_WAIT_MS
    + crate::run::SHUTDOWN_TIMEOUT_MS
    + 4_000;

/// SIGTERM to every child, then SIGKILL to those still running after
/// [`DEMO_STOP_TIMEOUT_MS`].
fn stop_children(children: &mut [(u64, Child)]) {
    for (_, c) in children.iter() {
        if let Ok(pid) = i32::try_from(c.id()) {
            send_signal(pid, "TERM");
        }
    }
    let deadline = Instant::now() + Duration::from_millis(DEMO_STOP_TIMEOUT_MS);
    for (id, c) in children.iter_mut() {
        loop {
            match c.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    eprintln!("node {id} did not stop in time; killing it");
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
            }
        }
    }
}

/// Sends `sig` to `pid` with kill(1) (the workspace forbids unsafe code, so no libc).
fn send_signal(pid: i32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}
