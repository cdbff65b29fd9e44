//! Cluster control: N chatd processes on loopback, each on its own address in
//! 127.0.0.0/8 (127.0.0.11, .12, …) so iptables can cut the network between two of them;
//! kill -9, SIGSTOP/SIGCONT, SIGTERM (the drain path) and restart; network partitions
//! with an iptables chain of this run; membership changes: nodes added with
//! `chatd cluster add-node` (node id i on 127.0.0.(10+i), ids never reused) and removed
//! through the admin API; with [`Cluster::enable_disks`], each node's data directory on a
//! [`LazyFs`] disk (power cuts, disk faults); with [`Cluster::enable_clocks`], each node
//! under libfaketime with a clock file the nemesis writes. Everything is undone on drop:
//! paused processes are continued, every process is killed by its pid and reaped, the
//! disks are unmounted, the chain is removed.

use std::fs::{File, OpenOptions};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::lazyfs::{CutReport, DiskOptions, DiskStats, Fault, LazyFs};

/// How long a node may take to answer `/readyz` 200 after a start.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a SIGTERMed node may take to drain and exit before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// The first node's address; node i has 127.0.0.(10+i).
pub const FIRST_HOST_OCTET: u8 = 11;
/// Most nodes of `cluster init` (addresses 127.0.0.11 to 127.0.0.19).
pub const NODES_MAX: usize = 9;
/// Highest node id a run may use, added nodes included (address 127.0.0.50): ids are never
/// reused, so this bounds the membership changes of one run.
pub const NODE_IDS_MAX: usize = 40;
/// Ports tried for an added node's API (from the base port, in steps of 2: QUIC takes
/// the port after the API's).
const PORT_TRIES_MAX: u16 = 50;
/// How long `GET /v1/admin/nodes` or a removal is retried over the members.
pub const ADMIN_RETRY_TIMEOUT: Duration = Duration::from_secs(15);

/// Errors of cluster control.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A command could not be run or failed.
    #[error("{what}: {cause}")]
    Command {
        /// What was run.
        what: String,
        /// Why it failed.
        cause: String,
    },
    /// A node did not become ready in time.
    #[error("node {node} not ready within {secs} s (log: {log})")]
    NotReady {
        /// The node.
        node: usize,
        /// The bound.
        secs: u64,
        /// Its log file.
        log: String,
    },
    /// Bad arguments.
    #[error("{0}")]
    Invalid(String),
}

fn command_error(what: impl Into<String>, cause: impl ToString) -> ClusterError {
    ClusterError::Command {
        what: what.into(),
        cause: cause.to_string(),
    }
}

/// Runs a command to completion; its stderr in the error.
pub fn run(program: &str, args: &[&str]) -> Result<String, ClusterError> {
    let shown = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| command_error(&shown, e))?;
    if !out.status.success() {
        return Err(command_error(
            &shown,
            format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The state of one node process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    /// Running.
    Up,
    /// Stopped with SIGSTOP.
    Paused,
    /// Not running.
    Down,
}

/// Where a node stands in the cluster's membership, as this run drives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// A member: clients use it, faults may hit it, it is restarted when down.
    Member,
    /// Its removal was asked (a live node draining): no new clients, no faults, never
    /// restarted; it exits by itself once the cluster tombstoned it.
    Leaving,
    /// Gone for good (removed, or killed to be replaced): never started again.
    Removed,
}

/// A node as `GET /v1/admin/nodes` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// Its id.
    pub id: usize,
    /// `joining`, `active`, `draining` or `removed`.
    pub state: String,
    /// Partitions it replicates.
    pub replicas: u64,
}

/// One node.
pub struct Node {
    /// 1-based id.
    pub id: usize,
    /// Its address.
    pub host: Ipv4Addr,
    /// Its HTTP/WebSocket port.
    pub api_port: u16,
    /// Its config file.
    pub config: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// One of the nodes `cluster init` made (the seed peers of every added node).
    pub seed: bool,
    child: Option<Child>,
    state: NodeState,
    standing: Standing,
    /// Its lazy disk, mounted at its data directory (when disks are enabled).
    disk: Option<LazyFs>,
    /// Its libfaketime clock file (when clocks are enabled).
    clock: Option<PathBuf>,
}

impl Node {
    /// `host:port` of the API.
    pub fn api(&self) -> String {
        format!("{}:{}", self.host, self.api_port)
    }

    /// Its state.
    pub fn state(&self) -> NodeState {
        self.state
    }

    /// Where it stands in the membership.
    pub fn standing(&self) -> Standing {
        self.standing
    }

    /// The pid, when running or paused.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its RocksDB directory (`data` beside its config, as `cluster init` writes it).
    pub fn data_dir(&self) -> Option<PathBuf> {
        self.config.parent().map(|d| d.join("data"))
    }

    /// The backing directory of its lazy disk (`disk` beside its config).
    pub fn disk_dir(&self) -> Option<PathBuf> {
        self.config.parent().map(|d| d.join("disk"))
    }
}

/// The cluster of a run.
pub struct Cluster {
    /// The chatd binary.
    pub chatd: PathBuf,
    /// Where configs, data and logs live.
    pub dir: PathBuf,
    /// The nodes, index = id - 1.
    pub nodes: Vec<Node>,
    /// The admin token.
    pub admin_token: String,
    /// The directory `cluster init` wrote (CA, node configs): `add-node --ca-dir`.
    ca_dir: PathBuf,
    /// The API port every node tries first.
    base_port: u16,
    /// The iptables chain of this run, once created.
    chain: Option<String>,
    /// Nodes get lazy disks (also nodes added later).
    disks: bool,
    /// libfaketime, preloaded into every node (clock faults).
    faketime: Option<PathBuf>,
}

/// The address of node `id` (1-based, at most [`NODE_IDS_MAX`]).
pub fn host_of(id: usize) -> Ipv4Addr {
    let offset = u8::try_from(id.clamp(1, NODE_IDS_MAX) - 1).unwrap_or(0);
    Ipv4Addr::new(127, 0, 0, FIRST_HOST_OCTET.saturating_add(offset))
}

/// Whether the API port (TCP) and the next one (UDP, QUIC) are free on `host`.
fn ports_free(host: Ipv4Addr, api: u16) -> bool {
    let Some(quic) = api.checked_add(1) else {
        return false;
    };
    let tcp = std::net::TcpListener::bind(SocketAddr::new(IpAddr::V4(host), api));
    let udp = std::net::UdpSocket::bind(SocketAddr::new(IpAddr::V4(host), quic));
    tcp.is_ok() && udp.is_ok()
}

/// A free API port on `host` (QUIC on the next one), trying `base` first.
fn free_port(host: Ipv4Addr, base: u16) -> Result<u16, ClusterError> {
    (0..PORT_TRIES_MAX)
        .filter_map(|i| base.checked_add(i * 2))
        .find(|p| ports_free(host, *p))
        .ok_or_else(|| {
            command_error(
                format!("find a free port on {host}"),
                format!("none of {PORT_TRIES_MAX} ports from {base} is free"),
            )
        })
}

/// The node list from `GET /v1/admin/nodes` at `api`.
pub fn fetch_node_list(api: &str, token: &str) -> Result<Vec<NodeInfo>, ClusterError> {
    let v = crate::http::get_json(api, "/v1/admin/nodes", token)
        .map_err(|e| command_error("GET /v1/admin/nodes", e))?;
    let list = v.as_array().ok_or_else(|| {
        command_error(
            format!("GET /v1/admin/nodes at {api}"),
            "the answer is not a list",
        )
    })?;
    Ok(list
        .iter()
        .filter_map(|n| {
            Some(NodeInfo {
                id: usize::try_from(n["id"].as_u64()?).ok()?,
                state: n["state"].as_str()?.to_string(),
                replicas: n["replicas"].as_u64().unwrap_or(0),
            })
        })
        .collect())
}

fn http_ready(addr: SocketAddr) -> bool {
    use std::io::{BufRead, BufReader, Write};
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(
        s,
        "GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    let mut line = String::new();
    if BufReader::new(s).read_line(&mut line).is_err() {
        return false;
    }
    line.split_whitespace().nth(1) == Some("200")
}

impl Cluster {
    /// `chatd cluster init` for `n` nodes on 127.0.0.11… with `base_port` and `partitions`,
    /// into `dir`.
    pub fn init(
        chatd: &Path,
        dir: &Path,
        n: usize,
        base_port: u16,
        partitions: u32,
    ) -> Result<Cluster, ClusterError> {
        if !(1..=NODES_MAX).contains(&n) {
            return Err(ClusterError::Invalid(format!(
                "{n} nodes: between 1 and {NODES_MAX}"
            )));
        }
        let out = dir.join("cluster");
        let mut args: Vec<String> = vec![
            "cluster".into(),
            "init".into(),
            "--nodes".into(),
            n.to_string(),
            "--base-port".into(),
            base_port.to_string(),
            "--send-rate-per-sec".into(),
            "100000".into(),
            "--partitions".into(),
            partitions.to_string(),
            "--out".into(),
            out.display().to_string(),
        ];
        for id in 1..=n {
            args.push("--host".into());
            args.push(host_of(id).to_string());
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&chatd.display().to_string(), &argv)?;
        let admin_token = std::fs::read_to_string(out.join("admin.token"))
            .map_err(|e| command_error("read admin.token", e))?
            .trim()
            .to_string();
        std::fs::create_dir_all(dir.join("logs")).map_err(|e| command_error("mkdir logs", e))?;
        let nodes = (1..=n)
            .map(|id| Node {
                id,
                host: host_of(id),
                api_port: base_port,
                config: out.join(format!("node-{id}")).join("chatd.toml"),
                log: dir.join("logs").join(format!("node-{id}.log")),
                seed: true,
                child: None,
                state: NodeState::Down,
                standing: Standing::Member,
                disk: None,
                clock: None,
            })
            .collect();
        Ok(Cluster {
            chatd: chatd.to_path_buf(),
            dir: dir.to_path_buf(),
            nodes,
            admin_token,
            ca_dir: out,
            base_port,
            chain: None,
            disks: false,
            faketime: None,
        })
    }

    /// Ids of the nodes standing as `standing`.
    pub fn ids(&self, standing: Standing) -> Vec<usize> {
        self.nodes
            .iter()
            .filter(|n| n.standing == standing)
            .map(|n| n.id)
            .collect()
    }

    /// Ids of the nodes not removed (members and leaving nodes): the ones partitions split.
    pub fn in_cluster(&self) -> Vec<usize> {
        self.nodes
            .iter()
            .filter(|n| n.standing != Standing::Removed)
            .map(|n| n.id)
            .collect()
    }

    /// `chatd cluster add-node` for a new node: the next id (never used before), its own
    /// address, a free port there; its config under the cluster directory, its log with
    /// the others. Not started. Returns its id.
    pub fn add_node(&mut self) -> Result<usize, ClusterError> {
        let id = self.nodes.len() + 1;
        if id > NODE_IDS_MAX {
            return Err(ClusterError::Invalid(format!(
                "node {id}: a run uses at most {NODE_IDS_MAX} node ids"
            )));
        }
        let host = host_of(id);
        let api_port = free_port(host, self.base_port)?;
        let out = self.ca_dir.join(format!("node-{id}"));
        let args: Vec<String> = vec![
            "cluster".into(),
            "add-node".into(),
            "--ca-dir".into(),
            self.ca_dir.display().to_string(),
            "--id".into(),
            id.to_string(),
            "--host".into(),
            host.to_string(),
            "--api-port".into(),
            api_port.to_string(),
            "--out".into(),
            out.display().to_string(),
        ];
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&self.chatd.display().to_string(), &argv)?;
        self.nodes.push(Node {
            id,
            host,
            api_port,
            config: out.join("chatd.toml"),
            log: self.dir.join("logs").join(format!("node-{id}.log")),
            seed: false,
            child: None,
            state: NodeState::Down,
            standing: Standing::Member,
            disk: None,
            clock: None,
        });
        if self.disks {
            self.mount_disk(id)?;
        }
        if self.faketime.is_some() {
            self.make_clock(id)?;
        }
        Ok(id)
    }

    /// Sets where node `id` stands.
    pub fn set_standing(&mut self, id: usize, standing: Standing) -> Result<(), ClusterError> {
        self.node(id)?.standing = standing;
        Ok(())
    }

    /// Removes node `id`'s data directory (it must not be running): a wiped disk.
    pub fn wipe(&mut self, id: usize) -> Result<(), ClusterError> {
        let node = self.node(id)?;
        if node.child.is_some() {
            return Err(ClusterError::Invalid(format!(
                "node {id} is running: kill it before wiping its disk"
            )));
        }
        if let Some(disk) = node.disk.as_mut() {
            return disk
                .wipe()
                .map_err(|e| command_error(format!("wipe node {id}'s disk"), e));
        }
        match node.data_dir() {
            Some(d) if d.exists() => std::fs::remove_dir_all(&d)
                .map_err(|e| command_error(format!("wipe {}", d.display()), e)),
            _ => Ok(()),
        }
    }

    /// If node `id`'s process ended, reaps it: its exit status (`Some(true)` for 0).
    pub fn reap(&mut self, id: usize) -> Result<Option<bool>, ClusterError> {
        let node = self.node(id)?;
        let Some(child) = node.child.as_mut() else {
            return Ok(None);
        };
        match child.try_wait() {
            Ok(Some(status)) => {
                node.child = None;
                node.state = NodeState::Down;
                Ok(Some(status.success()))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(command_error(format!("wait for node {id}"), e)),
        }
    }

    /// The node list as the first member that answers gives it (members that are up,
    /// `except` left out), retried over them for up to [`ADMIN_RETRY_TIMEOUT`].
    pub fn node_list(&self, except: usize) -> Result<Vec<NodeInfo>, ClusterError> {
        let deadline = Instant::now() + ADMIN_RETRY_TIMEOUT;
        let mut last = ClusterError::Invalid("no member is up to ask".into());
        while Instant::now() < deadline {
            for n in self.asked(except) {
                match fetch_node_list(&n, &self.admin_token) {
                    Ok(list) => return Ok(list),
                    Err(e) => last = e,
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(last)
    }

    /// API addresses of the up members but `except`.
    fn asked(&self, except: usize) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| {
                n.id != except && n.standing == Standing::Member && n.state == NodeState::Up
            })
            .map(Node::api)
            .collect()
    }

    /// `POST /v1/admin/nodes/{id}/remove` (`dead`: the node is gone for good) through an up
    /// member, retried while none answers (bounded). An answer of unknown outcome is
    /// settled by the node list: a node already draining or removed counts as done.
    pub fn remove_node(&self, id: usize, dead: bool) -> Result<(), ClusterError> {
        let path = format!("/v1/admin/nodes/{id}/remove");
        let body = serde_json::json!({ "dead": dead });
        let deadline = Instant::now() + ADMIN_RETRY_TIMEOUT;
        let mut last = ClusterError::Invalid("no member is up to ask".into());
        let mut unknown = false;
        while Instant::now() < deadline {
            for api in self.asked(id) {
                match crate::http::post_json(&api, &path, &self.admin_token, &body) {
                    Ok(_) => return Ok(()),
                    Err(crate::http::HttpError::Status { status, body, .. })
                        if status == 404 || (status == 409 && !unknown) =>
                    {
                        return Err(command_error(
                            format!("remove node {id}"),
                            format!("HTTP {status}: {body}"),
                        ));
                    }
                    Err(e) => {
                        // Timeouts, 503s (a proposal that may still commit), a 409 after
                        // one of those: the node list tells.
                        unknown = true;
                        last = command_error(format!("remove node {id}"), e);
                    }
                }
                if unknown {
                    let state = fetch_node_list(&api, &self.admin_token)
                        .ok()
                        .and_then(|l| l.into_iter().find(|n| n.id == id))
                        .map(|n| n.state);
                    if matches!(state.as_deref(), Some("draining" | "removed")) {
                        return Ok(());
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(last)
    }

    fn node(&mut self, id: usize) -> Result<&mut Node, ClusterError> {
        self.nodes
            .get_mut(id.wrapping_sub(1))
            .ok_or_else(|| ClusterError::Invalid(format!("no node {id}")))
    }

    /// Starts node `id` (appending to its log).
    pub fn start(&mut self, id: usize) -> Result<(), ClusterError> {
        let chatd = self.chatd.clone();
        let faketime = self.faketime.clone();
        let node = self.node(id)?;
        if let Some(child) = node.child.as_mut() {
            // Running: nothing to do. Exited by itself (a disk failure stops a node): reaped
            // and started again.
            if !matches!(child.try_wait(), Ok(Some(_))) {
                return Ok(());
            }
            node.child = None;
        }
        if node.standing != Standing::Member {
            return Err(ClusterError::Invalid(format!(
                "node {id} left the cluster: it is not started again"
            )));
        }
        let log: File = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(|e| command_error(format!("open {}", node.log.display()), e))?;
        let err = log.try_clone().map_err(|e| command_error("dup log", e))?;
        let mut cmd = Command::new(&chatd);
        cmd.arg("run")
            .arg("--config")
            .arg(&node.config)
            .env("RUST_LOG", "info");
        if let (Some(lib), Some(clock)) = (&faketime, &node.clock) {
            // The wall clock only (CLOCK_REALTIME): timers and timeouts run on the
            // monotonic clock, as a host's NTP step leaves them.
            cmd.env("LD_PRELOAD", lib)
                .env("FAKETIME_TIMESTAMP_FILE", clock)
                .env("FAKETIME_NO_CACHE", "1")
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| command_error(format!("start node {id}"), e))?;
        node.child = Some(child);
        node.state = NodeState::Up;
        Ok(())
    }

    /// Waits until node `id` answers `/readyz` with 200.
    pub fn wait_ready(&mut self, id: usize, timeout: Duration) -> Result<(), ClusterError> {
        let deadline = Instant::now() + timeout;
        loop {
            let node = self.node(id)?;
            let addr = SocketAddr::new(IpAddr::V4(node.host), node.api_port);
            if http_ready(addr) {
                return Ok(());
            }
            if let Some(child) = node.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    node.child = None;
                    node.state = NodeState::Down;
                    return Err(command_error(
                        format!("node {id}"),
                        format!(
                            "exited while starting: {status} (log: {})",
                            node.log.display()
                        ),
                    ));
                }
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::NotReady {
                    node: id,
                    secs: timeout.as_secs(),
                    log: node.log.display().to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts every node and waits for all to be ready.
    pub fn start_all(&mut self) -> Result<(), ClusterError> {
        let members = self.ids(Standing::Member);
        for id in &members {
            self.start(*id)?;
        }
        for id in members {
            self.wait_ready(id, READY_TIMEOUT)?;
        }
        Ok(())
    }

    fn signal(&mut self, id: usize, sig: &str) -> Result<(), ClusterError> {
        let node = self.node(id)?;
        let Some(pid) = node.pid() else {
            return Ok(());
        };
        run("kill", &[sig, &pid.to_string()]).map(|_| ())
    }

    /// kill -9 node `id` and reap it.
    pub fn kill(&mut self, id: usize) -> Result<(), ClusterError> {
        let node = self.node(id)?;
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        node.state = NodeState::Down;
        Ok(())
    }

    /// SIGSTOP node `id`.
    pub fn pause(&mut self, id: usize) -> Result<(), ClusterError> {
        self.signal(id, "-STOP")?;
        let node = self.node(id)?;
        if node.child.is_some() {
            node.state = NodeState::Paused;
        }
        Ok(())
    }

    /// SIGCONT node `id`.
    pub fn resume(&mut self, id: usize) -> Result<(), ClusterError> {
        self.signal(id, "-CONT")?;
        let node = self.node(id)?;
        if node.child.is_some() {
            node.state = NodeState::Up;
        }
        Ok(())
    }

    /// SIGTERM node `id` (the drain path) and wait for it to exit; killed after
    /// `timeout`. Returns how long it took and whether it exited by itself with 0.
    pub fn stop(&mut self, id: usize, timeout: Duration) -> Result<(Duration, bool), ClusterError> {
        let started = Instant::now();
        self.signal(id, "-TERM")?;
        let node = self.node(id)?;
        let Some(mut child) = node.child.take() else {
            return Ok((Duration::ZERO, true));
        };
        node.state = NodeState::Down;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok((started.elapsed(), status.success())),
                Ok(None) if started.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Ok((started.elapsed(), false));
                }
            }
        }
    }

    /// Creates this run's iptables chain and jumps to it from INPUT.
    pub fn enable_partitions(&mut self) -> Result<(), ClusterError> {
        if self.chain.is_some() {
            return Ok(());
        }
        let chain = format!("CHATD-J-{}", std::process::id());
        run("iptables", &["-w", "-N", &chain])?;
        if let Err(e) = run("iptables", &["-w", "-I", "INPUT", "-j", &chain]) {
            let _ = run("iptables", &["-w", "-X", &chain]);
            return Err(e);
        }
        self.chain = Some(chain);
        Ok(())
    }

    /// Whether partitions can be made (the chain exists).
    pub fn partitions_enabled(&self) -> bool {
        self.chain.is_some()
    }

    /// Drops traffic between `a` and `b`, both ways.
    pub fn cut(&mut self, a: usize, b: usize) -> Result<(), ClusterError> {
        let chain = self
            .chain
            .clone()
            .ok_or_else(|| ClusterError::Invalid("partitions are not enabled".into()))?;
        let (ha, hb) = (host_of(a).to_string(), host_of(b).to_string());
        for (s, d) in [(&ha, &hb), (&hb, &ha)] {
            run(
                "iptables",
                &["-w", "-A", &chain, "-s", s, "-d", d, "-j", "DROP"],
            )?;
        }
        Ok(())
    }

    /// Removes every cut.
    pub fn heal(&mut self) -> Result<(), ClusterError> {
        if let Some(chain) = &self.chain {
            run("iptables", &["-w", "-F", chain])?;
        }
        Ok(())
    }

    /// Removes the chain (idempotent).
    pub fn disable_partitions(&mut self) {
        if let Some(chain) = self.chain.take() {
            let _ = run("iptables", &["-w", "-D", "INPUT", "-j", &chain]);
            let _ = run("iptables", &["-w", "-F", &chain]);
            let _ = run("iptables", &["-w", "-X", &chain]);
        }
    }

    /// Continues paused nodes, kills every node, unmounts the disks, removes the chain.
    pub fn teardown(&mut self) {
        for id in 1..=self.nodes.len() {
            if self.nodes[id - 1].state == NodeState::Paused {
                let _ = self.resume(id);
            }
            let _ = self.kill(id);
        }
        for n in &mut self.nodes {
            drop(n.disk.take());
        }
        self.disable_partitions();
    }

    /// Puts every node's data directory (and every node added later) on a lazy disk.
    /// Before the nodes start.
    pub fn enable_disks(&mut self) -> Result<(), ClusterError> {
        self.disks = true;
        for id in 1..=self.nodes.len() {
            self.mount_disk(id)?;
        }
        Ok(())
    }

    fn mount_disk(&mut self, id: usize) -> Result<(), ClusterError> {
        let node = self.node(id)?;
        if node.disk.is_some() {
            return Ok(());
        }
        let (Some(backing), Some(data)) = (node.disk_dir(), node.data_dir()) else {
            return Err(ClusterError::Invalid(format!("node {id} has no directory")));
        };
        let disk = LazyFs::mount(&backing, &data, DiskOptions::default())
            .map_err(|e| command_error(format!("mount node {id}'s lazy disk"), e))?;
        node.disk = Some(disk);
        Ok(())
    }

    /// Power cut: kill -9 every node of `ids` (all first, then the disks), then each
    /// disk loses what was not synced (`tear`: the last written page may be torn).
    pub fn power_cut(
        &mut self,
        ids: &[usize],
        tear: bool,
        rng: &mut impl Rng,
    ) -> Result<Vec<(usize, CutReport)>, ClusterError> {
        for id in ids {
            self.kill(*id)?;
        }
        let mut out = Vec::new();
        for id in ids {
            let node = self.node(*id)?;
            let disk = node
                .disk
                .as_mut()
                .ok_or_else(|| ClusterError::Invalid(format!("node {id} has no lazy disk")))?;
            let r = disk
                .cut(tear, rng)
                .map_err(|e| command_error(format!("power cut of node {id}"), e))?;
            out.push((*id, r));
        }
        Ok(out)
    }

    /// Arms (or with the default, clears) a fault on node `id`'s disk.
    pub fn disk_fault(&mut self, id: usize, fault: Fault) -> Result<(), ClusterError> {
        let node = self.node(id)?;
        let disk = node
            .disk
            .as_ref()
            .ok_or_else(|| ClusterError::Invalid(format!("node {id} has no lazy disk")))?;
        disk.set_fault(fault);
        Ok(())
    }

    /// Node `id`'s disk counters.
    pub fn disk_stats(&mut self, id: usize) -> Option<DiskStats> {
        self.node(id).ok()?.disk.as_ref().map(LazyFs::stats)
    }

    /// Whether node `id`'s process is alive (not exited by itself).
    pub fn alive(&mut self, id: usize) -> bool {
        let Ok(node) = self.node(id) else {
            return false;
        };
        match node.child.as_mut() {
            None => false,
            Some(c) => matches!(c.try_wait(), Ok(None)),
        }
    }

    /// Starts every node (and every node added later) under libfaketime `lib`, each with
    /// its own clock file (`+0` at first). Before the nodes start.
    pub fn enable_clocks(&mut self, lib: &Path) -> Result<(), ClusterError> {
        self.faketime = Some(lib.to_path_buf());
        for id in 1..=self.nodes.len() {
            self.make_clock(id)?;
        }
        Ok(())
    }

    fn make_clock(&mut self, id: usize) -> Result<(), ClusterError> {
        let dir = self.dir.join("clocks");
        std::fs::create_dir_all(&dir).map_err(|e| command_error("mkdir clocks", e))?;
        self.node(id)?.clock = Some(dir.join(format!("node-{id}")));
        self.set_clock(id, 0)
    }

    /// Sets node `id`'s wall clock to real time + `offset_ms` (read by libfaketime on its
    /// next clock call; the file is replaced whole, never read half-written).
    pub fn set_clock(&mut self, id: usize, offset_ms: i64) -> Result<(), ClusterError> {
        let node = self.node(id)?;
        let Some(clock) = node.clock.clone() else {
            return Err(ClusterError::Invalid(format!(
                "node {id} has no clock file"
            )));
        };
        write_clock(&clock, offset_ms)
    }

    /// Node `id`'s clock file.
    pub fn clock_file(&mut self, id: usize) -> Option<PathBuf> {
        self.node(id).ok()?.clock.clone()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Writes a libfaketime offset (`+1.5s`, `-7200s`) to `clock`, atomically.
pub fn write_clock(clock: &Path, offset_ms: i64) -> Result<(), ClusterError> {
    let tmp = clock.with_extension("tmp");
    let sign = if offset_ms < 0 { '-' } else { '+' };
    let abs = offset_ms.unsigned_abs();
    let text = format!("{sign}{}.{:03}s\n", abs / 1000, abs % 1000);
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, clock))
        .map_err(|e| command_error(format!("write {}", clock.display()), e))
}

/// libfaketime's multi-threaded library, where Debian's `faketime` package puts it.
pub fn faketime_lib() -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

/// Whether iptables can be used here (installed, and we may change rules).
pub fn iptables_usable() -> bool {
    run("iptables", &["-w", "-L", "INPUT", "-n"]).is_ok()
}

/// Removes chains left by runs that died without cleaning up (their process is gone).
pub fn remove_stale_chains() {
    let Ok(list) = run("iptables", &["-w", "-S"]) else {
        return;
    };
    for line in list.lines() {
        let Some(chain) = line.strip_prefix("-N ") else {
            continue;
        };
        let Some(pid) = chain.strip_prefix("CHATD-J-") else {
            continue;
        };
        let alive = Path::new("/proc").join(pid).exists();
        if !alive {
            let _ = run("iptables", &["-w", "-D", "INPUT", "-j", chain]);
            let _ = run("iptables", &["-w", "-F", chain]);
            let _ = run("iptables", &["-w", "-X", chain]);
        }
    }
}
