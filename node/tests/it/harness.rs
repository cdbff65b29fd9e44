//! Real chatd processes on loopback, driven over their HTTP API.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;

pub const CHATD: &str = env!("CARGO_BIN_EXE_chatd");

static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// A base port whose 10-port blocks for `nodes` nodes are free right now.
pub fn free_base_port(nodes: u16) -> u16 {
    if NEXT_PORT.load(Ordering::SeqCst) == 0 {
        let seed = 20_000 + (std::process::id() % 200) as u16 * 100;
        let _ = NEXT_PORT.compare_exchange(0, seed, Ordering::SeqCst, Ordering::SeqCst);
    }
    loop {
        let base = NEXT_PORT.fetch_add(nodes * 10 + 10, Ordering::SeqCst);
        assert!(base < 60_000, "ran out of test ports");
        let free = (0..nodes).all(|i| {
            let api = base + i * 10;
            TcpListener::bind(("127.0.0.1", api)).is_ok()
                && UdpSocket::bind(("127.0.0.1", api + 1)).is_ok()
        });
        if free {
            return base;
        }
    }
}

pub struct NodeProc {
    pub id: u64,
    pub config: PathBuf,
    pub api: SocketAddr,
    pub cluster: SocketAddr,
    pub child: Option<Child>,
    pub log: PathBuf,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub admin_token: String,
    pub nodes: Vec<NodeProc>,
    pub http: reqwest::Client,
}

#[derive(Debug, Deserialize, Clone)]
pub struct Appended {
    pub group: u64,
    pub index: u64,
    pub seq: u64,
    pub leader: u64,
}

#[derive(Debug, Deserialize, Clone, PartialEq)]
pub struct Record {
    pub seq: u64,
    pub index: u64,
    pub payload: String,
}

#[derive(Debug, Deserialize)]
pub struct Records {
    pub records: Vec<Record>,
}

#[derive(Debug, Deserialize, PartialEq, Clone)]
pub struct Digest {
    pub count: u64,
    pub digest: String,
}

impl Cluster {
    /// `chatd cluster init` for `n` nodes with extra init flags; nothing started yet.
    pub fn init(n: u16, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = free_base_port(n);
        let out = Command::new(CHATD)
            .args(["cluster", "init", "--nodes", &n.to_string(), "--out"])
            .arg(dir.path())
            .args(["--base-port", &base.to_string(), "--partitions", "16"])
            .args([
                "--heartbeat-interval-ms",
                "100",
                "--election-timeout-ms",
                "300",
            ])
            .args(extra)
            .output()
            .expect("run chatd cluster init");
        assert!(
            out.status.success(),
            "cluster init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let nodes = (1..=n as u64)
            .map(|id| {
                let api = base + (id as u16 - 1) * 10;
                NodeProc {
                    id,
                    config: dir.path().join(format!("node-{id}/chatd.toml")),
                    api: SocketAddr::from(([127, 0, 0, 1], api)),
                    cluster: SocketAddr::from(([127, 0, 0, 1], api + 1)),
                    child: None,
                    log: dir.path().join(format!("node-{id}/chatd.log")),
                }
            })
            .collect();
        let token = std::fs::read_to_string(dir.path().join("admin.token")).expect("admin token");
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}").parse().expect("header"),
        );
        Cluster {
            dir,
            nodes,
            admin_token: token,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .default_headers(headers)
                .build()
                .expect("http client"),
        }
    }

    /// `chatd cluster add-node` for node `id` on a free port, seeded from node 1's config;
    /// not started. Returns chatd's exit status and stderr when it refuses.
    pub fn add_node(&mut self, id: u64, extra: &[&str]) -> Result<(), String> {
        let api = free_base_port(1);
        let out_dir = self.dir.path().join(format!("node-{id}"));
        let out = Command::new(CHATD)
            .args(["cluster", "add-node", "--ca-dir"])
            .arg(self.dir.path())
            .args(["--id", &id.to_string(), "--api-port", &api.to_string()])
            .arg("--out")
            .arg(&out_dir)
            .args(extra)
            .output()
            .expect("run chatd cluster add-node");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).to_string());
        }
        assert_eq!(id as usize, self.nodes.len() + 1, "add nodes in id order");
        self.nodes.push(NodeProc {
            id,
            config: out_dir.join("chatd.toml"),
            api: SocketAddr::from(([127, 0, 0, 1], api)),
            cluster: SocketAddr::from(([127, 0, 0, 1], api + 1)),
            child: None,
            log: out_dir.join("chatd.log"),
        });
        Ok(())
    }

    /// Waits (bounded) for node `id`'s process to exit on its own; its exit code.
    pub fn wait_exit(&mut self, id: u64, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let child = self.nodes[(id - 1) as usize].child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.nodes[(id - 1) as usize].child = None;
                return status.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Changes node `id`'s config file (before it starts).
    pub fn edit_config(&self, id: u64, f: impl FnOnce(&mut toml::Table)) {
        let path = &self.node(id).config;
        let text = std::fs::read_to_string(path).expect("read config");
        let mut table: toml::Table = text.parse().expect("parse config");
        f(&mut table);
        std::fs::write(path, toml::to_string(&table).expect("write config")).expect("write");
    }

    /// Sets `[section] key = value` in every node's config (before they start).
    pub fn set_everywhere(&self, section: &str, key: &str, value: toml::Value) {
        for id in 1..=self.nodes.len() as u64 {
            self.edit_config(id, |t| {
                let s = t
                    .entry(section.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if let toml::Value::Table(s) = s {
                    s.insert(key.to_string(), value.clone());
                }
            });
        }
    }

    pub fn node(&self, id: u64) -> &NodeProc {
        &self.nodes[(id - 1) as usize]
    }

    /// Sets `key = value` in section `[section]` of every node's configuration file
    /// (before the nodes start, or before a restart). The key must be there already
    /// (`cluster init` writes every key).
    pub fn set_config(&self, section: &str, key: &str, value: &str) {
        for n in &self.nodes {
            let text = std::fs::read_to_string(&n.config).expect("read config");
            let mut current = String::new();
            let mut found = false;
            let out: Vec<String> = text
                .lines()
                .map(|l| {
                    let t = l.trim();
                    if t.starts_with('[') {
                        current = t.trim_matches(['[', ']']).to_string();
                    } else if current == section && t.split('=').next().map(str::trim) == Some(key)
                    {
                        found = true;
                        return format!("{key} = {value}");
                    }
                    l.to_string()
                })
                .collect();
            assert!(found, "no {key} in [{section}] of {}", n.config.display());
            std::fs::write(&n.config, out.join("\n") + "\n").expect("write config");
        }
    }

    pub fn start(&mut self, id: u64) {
        self.start_with_env(id, &[]);
    }

    /// Starts node `id` with extra environment variables (for it only).
    pub fn start_with_env(&mut self, id: u64, env: &[(&str, String)]) {
        let n = &mut self.nodes[(id - 1) as usize];
        assert!(n.child.is_none(), "node {id} already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .expect("log file");
        let child = Command::new(CHATD)
            .args(["run", "--config"])
            .arg(&n.config)
            .env("RUST_LOG", "info,openraft=warn")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn chatd");
        n.child = Some(child);
    }

    pub fn start_all(&mut self) {
        for id in 1..=self.nodes.len() as u64 {
            self.start(id);
        }
    }

    /// kill -9.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.nodes[(id - 1) as usize].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` (`STOP`, `CONT`) to node `id`'s process.
    pub fn signal(&self, id: u64, signal: &str) {
        let pid = self.node(id).child.as_ref().expect("node running").id();
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    pub fn log_text(&self, id: u64) -> String {
        std::fs::read_to_string(&self.node(id).log).unwrap_or_default()
    }

    pub fn url(&self, id: u64, path: &str) -> String {
        format!("http://{}{}", self.node(id).api, path)
    }

    pub async fn ready(&self, id: u64) -> bool {
        matches!(
            self.http.get(self.url(id, "/readyz")).send().await,
            Ok(r) if r.status().is_success()
        )
    }

    /// Waits until every running node is ready.
    pub async fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let mut all = true;
            for n in &self.nodes {
                if n.child.is_some() && !self.ready(n.id).await {
                    all = false;
                }
            }
            if all {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster not ready within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn append(&self, via: u64, group: u64, payload: &str) -> Result<Appended, String> {
        let r = self
            .http
            .post(self.url(via, &format!("/v1/admin/partitions/{group}/records")))
            .body(payload.to_string())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status();
        let text = r.text().await.map_err(|e| e.to_string())?;
        if status.is_success() {
            serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))
        } else {
            Err(format!("{status}: {text}"))
        }
    }

    /// Appends, retrying on errors that mean "not committed" (no leader yet).
    pub async fn append_retry(&self, via: &[u64], group: u64, payload: &str) -> Appended {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut i = 0;
        loop {
            let node = via[i % via.len()];
            i += 1;
            match self.append(node, group, payload).await {
                Ok(a) => return a,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "append to {group} never succeeded: {e}"
                    );
                    assert!(
                        !e.contains("outcome_unknown"),
                        "test payload {payload} got an unknown outcome: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Like `append_retry`, but an unknown outcome (a leader died mid-request) is returned as
    /// `None` instead of failing: the entry may or may not be committed.
    pub async fn append_maybe(&self, via: &[u64], group: u64, payload: &str) -> Option<Appended> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut i = 0;
        loop {
            let node = via[i % via.len()];
            i += 1;
            match self.append(node, group, payload).await {
                Ok(a) => return Some(a),
                Err(e) if e.contains("outcome_unknown") => return None,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "append to {group} never succeeded: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Node `id`'s own view of `group` (role, leader, term, indexes).
    pub async fn local(&self, id: u64, group: u64) -> Option<Value> {
        let r = self
            .http
            .get(self.url(id, &format!("/v1/admin/partitions/{group}/local")))
            .timeout(Duration::from_millis(500))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    pub async fn records(&self, id: u64, group: u64) -> Result<Vec<Record>, String> {
        let mut out = Vec::new();
        let mut from = 1;
        loop {
            let r = self
                .http
                .get(self.url(
                    id,
                    &format!("/v1/admin/partitions/{group}/records?from={from}&limit=1000"),
                ))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if !r.status().is_success() {
                return Err(format!("{}", r.status()));
            }
            let page: Records = r.json().await.map_err(|e| e.to_string())?;
            let Some(last) = page.records.last().map(|r| r.seq) else {
                return Ok(out);
            };
            out.extend(page.records);
            from = last + 1;
        }
    }

    pub async fn digest(&self, id: u64, group: u64) -> Result<Digest, String> {
        let r = self
            .http
            .get(self.url(id, &format!("/v1/admin/partitions/{group}/digest")))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        r.json().await.map_err(|e| e.to_string())
    }

    pub async fn status(&self, via: u64) -> Result<Value, String> {
        let r = self
            .http
            .get(self.url(via, "/v1/admin/cluster"))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        r.json().await.map_err(|e| e.to_string())
    }

    /// The leader of `group` as reported by node `via`.
    pub async fn leader(&self, via: u64, group: u64) -> Option<u64> {
        let s = self.status(via).await.ok()?;
        s["partitions"]
            .as_array()?
            .iter()
            .find(|p| p["group"] == group)?["leader"]
            .as_u64()
    }

    /// One partition's view from node `via`.
    pub async fn partition(&self, via: u64, group: u64) -> Option<Value> {
        let s = self.status(via).await.ok()?;
        s["partitions"]
            .as_array()?
            .iter()
            .find(|p| p["group"] == group)
            .cloned()
    }

    /// Waits until `ids` all hold the same records of `group`, `count` of them.
    pub async fn wait_converged(&self, ids: &[u64], group: u64, count: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let mut digests = Vec::new();
            for id in ids {
                digests.push(self.digest(*id, group).await);
            }
            let first = digests[0].clone();
            if let Ok(d) = &first {
                if d.count == count && digests.iter().all(|x| x.as_ref().ok() == Some(d)) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "group {group} did not converge on {ids:?} to {count} records: {digests:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node-{id}/data"))
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Lines of each node's log shown when a test fails (its temp dir goes with it).
const FAILED_TEST_LOG_LINES_MAX: usize = 60;

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // A failing test's nodes explain it: show the end of each log before it is deleted.
        if std::thread::panicking() {
            for n in &self.nodes {
                let text = std::fs::read_to_string(&n.log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(FAILED_TEST_LOG_LINES_MAX)..];
                eprintln!("---- node {} log (last {} lines) ----", n.id, tail.len());
                for l in tail {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// Creates `user` through node `via` (`POST /v1/admin/users`), retrying (bounded) until
/// the metadata group can take it; returns its token.
pub async fn create_user_via(c: &Cluster, via: u64, user: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c
            .http
            .post(c.url(via, "/v1/admin/users"))
            .json(&serde_json::json!({ "user": user }))
            .send()
            .await;
        let last = match r {
            Ok(r) if r.status() == 201 => {
                let body: Value = r.json().await.unwrap();
                assert_eq!(body["user"], user, "{body}");
                return body["token"].as_str().unwrap().to_string();
            }
            Ok(r) => format!("{}: {}", r.status(), r.text().await.unwrap_or_default()),
            Err(e) => e.to_string(),
        };
        assert!(Instant::now() < deadline, "user {user} not created: {last}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
