//! The node's configuration: a TOML file, every key known, every path resolved.
//!
//! Types, defaults, parsing and validation, with nothing that links RocksDB or opens a
//! socket, so the parser can be fuzzed (`fuzz/`, target `config`). `chatd` re-exports this
//! crate as `chatd::config` and converts the sections to the options of `chatd-storage` and
//! `chatd-raftlog`; its tests check that the defaults here equal theirs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why a configuration could not be used. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file does not exist.
    #[error("config file {0} does not exist")]
    Missing(PathBuf),
    /// The file could not be read.
    #[error("cannot read config file {path}: {cause}")]
    Read { path: PathBuf, cause: String },
    /// The file is not valid TOML for this schema (an unknown key, a wrong type, ...).
    #[error("invalid config file {path}: {cause}")]
    Parse { path: PathBuf, cause: String },
    /// The values are inconsistent.
    #[error("invalid config file {path}: {cause}")]
    Invalid { path: PathBuf, cause: String },
}

/// A peer in the static peer list (this node included).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// Node id.
    pub id: u64,
    /// QUIC address for node-to-node traffic.
    pub cluster_addr: SocketAddr,
    /// Client API address (HTTP, WebSocket).
    pub api_addr: SocketAddr,
}

/// TLS files for the QUIC endpoint; relative paths are relative to the config file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    /// The cluster CA certificate.
    pub ca_cert: PathBuf,
    /// This node's certificate, issued by the cluster CA.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

/// Cluster shape.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// Number of partitions P.
    pub partitions: u32,
    /// Replicas per partition R; default min(3, nodes).
    pub replication: Option<u32>,
    /// This node joins a running cluster (written by `chatd cluster add-node`): it asks the
    /// `[[peers]]` (seeds) to admit it instead of bootstrapping a cluster from them, and
    /// hosts only what group 0's placement gives it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub join: bool,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            partitions: 64,
            replication: None,
            join: false,
        }
    }
}

/// Raft tunables.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftSection {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub snapshot_logs_since_last: u64,
    pub snapshot_logs_to_keep: u64,
    pub snapshot_chunk_bytes_max: u64,
    pub append_entries_max: u64,
    /// How long a proposal may take, forwarding and retries included.
    pub propose_timeout_ms: u64,
    /// An idle group stops heartbeating after this long (0: never).
    pub quiesce_idle_ms: u64,
    /// How often the node pings each peer it shares a group with.
    pub liveness_ping_ms: u64,
    /// A peer silent this long is taken for dead (its groups elect new leaders).
    pub liveness_timeout_ms: u64,
}

impl Default for RaftSection {
    /// `chatd_raftlog::RaftOptions::default()` (checked by chatd's tests), and a 5 s
    /// proposal timeout.
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 450,
            snapshot_logs_since_last: 50_000,
            snapshot_logs_to_keep: 5_000,
            snapshot_chunk_bytes_max: 1 << 20,
            append_entries_max: 512,
            propose_timeout_ms: 5_000,
            quiesce_idle_ms: 2_000,
            liveness_ping_ms: 200,
            liveness_timeout_ms: 500,
        }
    }
}

/// RocksDB tunables.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSection {
    pub block_cache_bytes: usize,
    pub write_buffer_bytes: usize,
    pub max_open_files: i32,
    pub background_jobs: i32,
    pub wal_buffered: bool,
    pub sync_queue_writes_max: usize,
    /// Blob garbage collection of file chunks (docs/files.md, "Space").
    pub blob_gc: bool,
}

impl Default for StorageSection {
    /// `chatd_storage::StorageOptions::default()` (checked by chatd's tests).
    fn default() -> Self {
        Self {
            block_cache_bytes: 256 << 20,
            write_buffer_bytes: 64 << 20,
            max_open_files: 4096,
            background_jobs: 2,
            wal_buffered: true,
            sync_queue_writes_max: 65_536,
            blob_gc: false,
        }
    }
}

/// Logging.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// A tracing filter, e.g. "info" or "chatd=debug,openraft=warn".
    pub filter: String,
    /// "text" or "json".
    pub format: String,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            filter: "info,openraft=warn".into(),
            format: "text".into(),
        }
    }
}

/// Start-up and graceful stop (SIGTERM), with systemd in mind.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleSection {
    /// Bound on a graceful drain after SIGTERM: moving partition leadership away and
    /// closing client sessions. Keep it well below the unit's `TimeoutStopSec`.
    pub drain_timeout_ms: u64,
    /// Bound on moving the leadership of one partition during a drain.
    pub drain_partition_timeout_ms: u64,
    /// How long start-up (opening storage, replaying logs, waiting until every hosted
    /// partition has a leader) may extend systemd's start timeout (`EXTEND_TIMEOUT_USEC`).
    pub startup_extend_max_ms: u64,
}

impl LifecycleSection {
    /// The default `drain_timeout_ms`.
    pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 10_000;
}

impl Default for LifecycleSection {
    fn default() -> Self {
        Self {
            drain_timeout_ms: Self::DEFAULT_DRAIN_TIMEOUT_MS,
            drain_partition_timeout_ms: 3_000,
            startup_extend_max_ms: 600_000,
        }
    }
}

/// Limits of the gateway, each with its unit.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Frames queued for one session before it is closed as a slow consumer. A client that
    /// pipelines `requests_in_flight_max` sends gets two frames back per send (the answer,
    /// and the message pushed to its chat): 4096 leaves it eight rounds of delay to absorb.
    /// Frames are shared between sessions, and an idle queue costs nothing per slot.
    pub outbound_queue_frames_max: usize,
    /// Concurrent sessions of one user.
    pub sessions_per_user_max: usize,
    /// WebSocket sessions this node holds at once (authenticated or not); a new one past
    /// it is refused (docs/protocol.md §11: close 4013, or HTTP 503 `server_full`). Each
    /// takes a file descriptor: keep it below the process's `LimitNOFILE`.
    pub sessions_max: usize,
    /// Largest message text in bytes.
    pub text_bytes_max: usize,
    /// Largest group.
    pub group_members_max: usize,
    /// Sustained sends per second per user (token bucket rate).
    pub send_rate_per_sec: f64,
    /// Burst of sends per user (token bucket size).
    pub send_burst: f64,
    /// Requests of one session being handled at once; more wait (TCP backpressure).
    pub requests_in_flight_max: usize,
    /// Time a client has to authenticate.
    pub auth_timeout_ms: u64,
    /// A session with no frame for this long is closed (presence TTL).
    pub presence_ttl_ms: u64,
    /// Interval at which clients should ping (advertised in docs; presence refresh).
    pub heartbeat_interval_ms: u64,
    /// Typing indicators per chat per session: at most one per this interval.
    pub typing_interval_ms: u64,
    /// How long a send's idempotency record answers retries with the original seq
    /// (docs/protocol.md §5); a retry after it is stored as a new message. Written into
    /// each send's log entry, so replicas agree whatever their own configuration.
    pub dedup_window_ms: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            outbound_queue_frames_max: 4096,
            sessions_per_user_max: 8,
            sessions_max: 100_000,
            text_bytes_max: chatd_proto::TEXT_BYTES_MAX,
            group_members_max: GROUP_MEMBERS_MAX_DEFAULT,
            send_rate_per_sec: 50.0,
            send_burst: 200.0,
            requests_in_flight_max: 256,
            auth_timeout_ms: 5_000,
            presence_ttl_ms: 60_000,
            heartbeat_interval_ms: 30_000,
            typing_interval_ms: 1_000,
            dedup_window_ms: DEDUP_WINDOW_MS_DEFAULT,
        }
    }
}

/// A node's whole configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The cluster's id; the data directory is bound to it.
    pub cluster_id: String,
    /// This node's id; must be in `peers`.
    pub node_id: u64,
    /// Where RocksDB and snapshots live; relative to the config file.
    pub data_dir: PathBuf,
    /// TLS files.
    pub tls: TlsPaths,
    /// Every node of the cluster, this one included.
    pub peers: Vec<Peer>,
    /// Cluster shape.
    #[serde(default)]
    pub cluster: ClusterSection,
    /// Raft tunables.
    #[serde(default)]
    pub raft: RaftSection,
    /// RocksDB tunables.
    #[serde(default)]
    pub storage: StorageSection,
    /// Logging.
    #[serde(default)]
    pub log: LogSection,
    /// Client gateway limits.
    #[serde(default)]
    pub gateway: GatewayConfig,
    /// SHA-256 (hex) of the admin bearer token; admin endpoints need it when set.
    #[serde(default)]
    pub admin_token_sha256: Option<String>,
    /// Offline notifications.
    #[serde(default)]
    pub notify: NotifySection,
    /// Start-up and graceful stop.
    #[serde(default)]
    pub lifecycle: LifecycleSection,
    /// File uploads and downloads (docs/files.md).
    #[serde(default)]
    pub files: FilesSection,
}

/// Files: sizes and chunking (docs/files.md).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilesSection {
    /// Largest file a user may upload, in bytes (an upload announcing more is refused with
    /// 413 before its body is read).
    pub max_bytes: u64,
    /// Bytes of files one user may hold at once (uploads under way count their declared
    /// size; every file counts in full, deduplicated or not). An upload that would pass it
    /// is refused with 413 `quota_exceeded` before its body is read.
    pub user_quota_bytes: u64,
    /// Bytes per chunk: the unit stored on each replica, synced and acknowledged.
    pub chunk_bytes: u32,
    /// Chunks of one upload sent to the replicas and not yet on a majority, at most.
    pub chunks_in_flight: usize,
    /// An upload's resume point is committed through Raft every this many acknowledged
    /// chunks (and at its end): an interrupted upload resends at most this many chunks.
    pub progress_chunks: u32,
    /// Upload requests (`POST`/`PATCH` with a body) this node serves at once, at most; one
    /// more is answered 503 with `Retry-After`.
    pub uploads_max: usize,
    /// Each node checks, this often, that it holds every acknowledged chunk of the files
    /// of the partitions it hosts, and fetches the missing ones from another replica.
    pub repair_interval_ms: u64,
    /// An upload not complete this long after it began is dropped (its chunks follow).
    pub upload_ttl_ms: u64,
    /// A complete file attached to no message this long after its upload began is
    /// dropped.
    pub unattached_ttl_ms: u64,
    /// An attach older than this whose chat no longer carries the file (its messages were
    /// deleted) is forgotten; a file attached nowhere then is dropped.
    pub detach_grace_ms: u64,
    /// Each node looks this often for chunks it should not keep: of files that no longer
    /// exist (dropped, collected, a failed upload's) and of partitions it no longer hosts;
    /// and sums the bytes it holds (`chatd_file_bytes`).
    pub sweep_interval_ms: u64,
    /// Chunks without a record are deleted once their newest is this old (an upload's
    /// first chunks can reach a replica before its record does).
    pub orphan_grace_ms: u64,
    /// Chunks of a partition this node stopped hosting are deleted after this long.
    pub unhosted_grace_ms: u64,
}

/// The largest `files.chunk_bytes` (a chunk is one node-to-node frame).
pub const FILE_CHUNK_BYTES_MAX: u32 = 4 << 20;

impl Default for FilesSection {
    fn default() -> Self {
        Self {
            max_bytes: 100 << 20,
            user_quota_bytes: 10 << 30,
            chunk_bytes: 1 << 20,
            chunks_in_flight: 4,
            progress_chunks: 8,
            uploads_max: 64,
            repair_interval_ms: 5_000,
            upload_ttl_ms: 24 * 3_600_000,
            unattached_ttl_ms: 24 * 3_600_000,
            detach_grace_ms: 3_600_000,
            sweep_interval_ms: 60_000,
            orphan_grace_ms: 3_600_000,
            unhosted_grace_ms: 600_000,
        }
    }
}

/// Offline notifications through a webhook.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifySection {
    /// URL (`http://` or `https://`) that receives a JSON POST per notification; none
    /// disables notifications.
    pub webhook_url: Option<String>,
    /// PEM file of CA certificates trusted for an `https://` webhook, besides the webpki
    /// roots (relative paths are relative to the config file).
    pub webhook_ca_file: Option<PathBuf>,
    /// At most one notification per user per this window.
    pub coalesce_window_ms: u64,
}

impl Default for NotifySection {
    fn default() -> Self {
        Self {
            webhook_url: None,
            webhook_ca_file: None,
            coalesce_window_ms: 10_000,
        }
    }
}

/// Longest run of one quote character (`'` or `"`) in a string [`Config::to_toml`] writes:
/// the TOML writer (toml_write 0.1, toml_writer 1.2) counts such runs in a `u8`, which
/// overflows at 256 (a panic where overflow checks are on; found by fuzzing the config).
pub const TOML_QUOTE_RUN_MAX: usize = 255;

/// The longest run of one quote character in any string of `v`.
fn longest_quote_run(v: &toml::Value) -> usize {
    match v {
        toml::Value::String(s) => {
            let (mut longest, mut run, mut last) = (0, 0, 0u8);
            for b in s.bytes() {
                run = if (b == b'\'' || b == b'"') && b == last {
                    run + 1
                } else {
                    usize::from(b == b'\'' || b == b'"')
                };
                last = b;
                longest = longest.max(run);
            }
            longest
        }
        toml::Value::Array(items) => items.iter().map(longest_quote_run).max().unwrap_or(0),
        toml::Value::Table(t) => t.values().map(longest_quote_run).max().unwrap_or(0),
        _ => 0,
    }
}

impl Config {
    /// The config as TOML text (what `chatd cluster init` and `add-node` write for `path`).
    /// Refuses, with a typed error, a value the TOML writer cannot write
    /// ([`TOML_QUOTE_RUN_MAX`], integers above `i64::MAX`).
    pub fn to_toml(&self, path: &Path) -> Result<String, ConfigError> {
        let invalid = |cause: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            cause,
        };
        let value = toml::Value::try_from(self).map_err(|e| invalid(e.to_string()))?;
        if longest_quote_run(&value) > TOML_QUOTE_RUN_MAX {
            return Err(invalid(format!(
                "a value has more than {TOML_QUOTE_RUN_MAX} quote characters in a row"
            )));
        }
        toml::to_string_pretty(self).map_err(|e| invalid(e.to_string()))
    }

    /// Reads, parses, resolves and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        if !path.exists() {
            return Err(ConfigError::Missing(path.to_path_buf()));
        }
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            cause: e.to_string(),
        })?;
        Self::parse(&text, path)
    }

    /// Parses, resolves and validates `text`, the contents of the file at `path` (relative
    /// paths in it are resolved against `path`'s directory; errors name `path`). Reads no
    /// file: this is what the fuzzer runs.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            cause: e.to_string().trim_end().to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.validate().map_err(|cause| ConfigError::Invalid {
            path: path.to_path_buf(),
            cause,
        })?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        for p in [
            &mut self.data_dir,
            &mut self.tls.ca_cert,
            &mut self.tls.cert,
            &mut self.tls.key,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(p) = &mut self.notify.webhook_ca_file {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Checks what parsing cannot: ids, addresses, bounds.
    pub fn validate(&self) -> Result<(), String> {
        if self.cluster_id.trim().is_empty() {
            return Err("cluster_id is empty".into());
        }
        let me = self
            .me()
            .ok_or_else(|| format!("node_id {} is not in the peers list", self.node_id))?;
        let _ = me;
        let mut ids: Vec<u64> = self.peers.iter().map(|p| p.id).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err("peers lists a node id twice".into());
        }
        if ids.contains(&0) {
            return Err("node id 0 is reserved".into());
        }
        let n = self.peers.len() as u32;
        let r = self.replication();
        if r == 0 || r > n {
            return Err(format!(
                "cluster.replication {r} must be between 1 and the number of peers {n}"
            ));
        }
        if self.cluster.partitions == 0 || self.cluster.partitions > PARTITIONS_MAX {
            return Err(format!(
                "cluster.partitions {} must be between 1 and {PARTITIONS_MAX}",
                self.cluster.partitions
            ));
        }
        if self.raft.election_timeout_min_ms <= self.raft.heartbeat_interval_ms
            || self.raft.election_timeout_max_ms <= self.raft.election_timeout_min_ms
        {
            return Err(
                "raft timeouts must satisfy heartbeat < election_min < election_max".into(),
            );
        }
        if self.gateway.sessions_max == 0 {
            return Err("gateway.sessions_max must be at least 1".into());
        }
        if self.raft.liveness_ping_ms == 0
            || self.raft.liveness_timeout_ms < 2 * self.raft.liveness_ping_ms
        {
            return Err(format!(
                "raft.liveness_timeout_ms ({}) must be at least twice raft.liveness_ping_ms ({}), \
                 which must not be 0",
                self.raft.liveness_timeout_ms, self.raft.liveness_ping_ms
            ));
        }
        let f = &self.files;
        if f.chunk_bytes == 0
            || f.chunk_bytes > FILE_CHUNK_BYTES_MAX
            || f.chunks_in_flight == 0
            || f.progress_chunks == 0
            || f.uploads_max == 0
            || f.repair_interval_ms == 0
            || f.sweep_interval_ms == 0
        {
            return Err(format!(
                "files.chunk_bytes ({}) must be between 1 and {FILE_CHUNK_BYTES_MAX}, and \
                 files.chunks_in_flight ({}), files.progress_chunks ({}) and \
                 files.uploads_max ({}), files.repair_interval_ms ({}) and \
                 files.sweep_interval_ms ({}) at least 1",
                f.chunk_bytes,
                f.chunks_in_flight,
                f.progress_chunks,
                f.uploads_max,
                f.repair_interval_ms,
                f.sweep_interval_ms
            ));
        }
        let l = &self.lifecycle;
        if l.drain_timeout_ms == 0
            || l.drain_partition_timeout_ms == 0
            || l.drain_partition_timeout_ms > l.drain_timeout_ms
        {
            return Err(format!(
                "lifecycle timeouts must satisfy 0 < drain_partition_timeout_ms ({}) <= \
                 drain_timeout_ms ({})",
                l.drain_partition_timeout_ms, l.drain_timeout_ms
            ));
        }
        if self.gateway.dedup_window_ms < DEDUP_WINDOW_MS_MIN {
            return Err(format!(
                "gateway.dedup_window_ms {} must be at least {DEDUP_WINDOW_MS_MIN}",
                self.gateway.dedup_window_ms
            ));
        }
        if let Some(url) = &self.notify.webhook_url {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                return Err(format!(
                    "notify.webhook_url must start with http:// or https://, got {url:?}"
                ));
            }
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(format!(
                "log.format must be \"text\" or \"json\", got {:?}",
                self.log.format
            ));
        }
        Ok(())
    }

    /// This node's peer entry.
    pub fn me(&self) -> Option<&Peer> {
        self.peers.iter().find(|p| p.id == self.node_id)
    }

    /// The replication factor in effect.
    pub fn replication(&self) -> u32 {
        self.cluster
            .replication
            .unwrap_or_else(|| default_replication(self.peers.len()))
    }
}

/// The shortest dedup window a config may set (1 s; the default is 24 h).
pub const DEDUP_WINDOW_MS_MIN: u64 = 1_000;

/// Default (and upper) bound of a group's members: `chatd_chat::GROUP_MEMBERS_MAX`
/// (checked by chatd's tests).
pub const GROUP_MEMBERS_MAX_DEFAULT: usize = 256;
/// Default dedup window: `chatd_chat::DEDUP_WINDOW_MS_DEFAULT` (checked by chatd's tests).
pub const DEDUP_WINDOW_MS_DEFAULT: u64 = 24 * 60 * 60 * 1000;
/// Upper bound on `cluster.partitions` (the placement table of group 0 bounds it too:
/// `chatd_membership::PARTITIONS_MAX`, the same value).
pub const PARTITIONS_MAX: u32 = 16_384;

/// The replication factor of a cluster of `nodes` nodes when the config sets none:
/// `chatd_membership::default_replication` (checked by chatd's tests).
pub fn default_replication(nodes: usize) -> u32 {
    u32::try_from(nodes.min(3)).unwrap_or(3)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const GOOD: &str = r#"
cluster_id = "c1"
node_id = 1
data_dir = "data"
[tls]
ca_cert = "ca.pem"
cert = "node.pem"
key = "node.key"
[[peers]]
id = 1
cluster_addr = "127.0.0.1:7001"
api_addr = "127.0.0.1:7000"
"#;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("chatd.toml");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn to_toml_writes_what_parses_back_and_refuses_runs_of_quotes_at_the_bound() {
        let path = Path::new("/etc/chatd/chatd.toml");
        let with_ca = |ca: &str| {
            let text = GOOD.replace("\"ca.pem\"", &format!("'''{ca}'''"));
            Config::parse(&text, path).unwrap()
        };
        // At the bound: written, and parsed back to the same config.
        let c = with_ca(&format!("ca{}x", "\"".repeat(TOML_QUOTE_RUN_MAX)));
        let again = Config::parse(&c.to_toml(path).unwrap(), path).unwrap();
        assert_eq!(format!("{again:?}"), format!("{c:?}"));
        // One past it (the fuzzer's input had hundreds of '): a typed error, no panic.
        let c = with_ca(&format!("ca{}x", "\"".repeat(TOML_QUOTE_RUN_MAX + 1)));
        match c.to_toml(path) {
            Err(ConfigError::Invalid { cause, .. }) => assert!(cause.contains("quote"), "{cause}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_good_file_loads_with_paths_resolved() {
        let (dir, p) = write(GOOD);
        let c = Config::load(&p).unwrap();
        assert_eq!(c.data_dir, dir.path().join("data"));
        assert_eq!(c.replication(), 1);
        assert_eq!(c.cluster.partitions, 64);
    }

    #[test]
    fn webhook_url_scheme_and_ca_file_path() {
        let (dir, p) = write(&format!(
            "{GOOD}\n[notify]\nwebhook_url = \"https://hooks.example/n\"\nwebhook_ca_file = \"hook-ca.pem\"\n"
        ));
        let c = Config::load(&p).unwrap();
        assert_eq!(
            c.notify.webhook_ca_file,
            Some(dir.path().join("hook-ca.pem"))
        );
        let (_d, p) = write(&format!(
            "{GOOD}\n[notify]\nwebhook_url = \"ftp://hooks.example/n\"\n"
        ));
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("notify.webhook_url"), "{e}");
    }

    #[test]
    fn an_unknown_key_is_named_with_the_file() {
        let (_d, p) = write(&format!("{GOOD}\n[raft]\nheartbeat_ms = 5\n"));
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("heartbeat_ms") && e.contains("chatd.toml"),
            "{e}"
        );
    }

    #[test]
    fn parse_reads_no_file_and_names_the_path() {
        let p = Path::new("/etc/chatd/chatd.toml");
        let c = Config::parse(GOOD, p).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/etc/chatd/data"));
        let e = Config::parse("node_id = \"x\"", p).unwrap_err().to_string();
        assert!(e.contains("/etc/chatd/chatd.toml"), "{e}");
    }

    #[test]
    fn missing_corrupt_and_inconsistent_files_are_typed_errors() {
        let e = Config::load(Path::new("/nonexistent/chatd.toml")).unwrap_err();
        assert!(matches!(e, ConfigError::Missing(_)), "{e}");
        let (_d, p) = write("cluster_id = \n\u{0}garbage[[");
        assert!(matches!(
            Config::load(&p).unwrap_err(),
            ConfigError::Parse { .. }
        ));
        let (_d, p) = write(&GOOD.replace("node_id = 1", "node_id = 9"));
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("node_id 9 is not in the peers"), "{e}");
        let (_d, p) = write(&format!("{GOOD}\n[cluster]\nreplication = 3\n"));
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("replication 3"), "{e}");
    }

    #[test]
    fn lifecycle_defaults_and_bounds() {
        let (_d, p) = write(GOOD);
        let c = Config::load(&p).unwrap();
        assert_eq!(c.lifecycle.drain_timeout_ms, 10_000);
        assert_eq!(c.lifecycle.drain_partition_timeout_ms, 3_000);
        // At the bound: a partition may take the whole drain.
        let (_d, p) = write(&format!(
            "{GOOD}\n[lifecycle]\ndrain_timeout_ms = 500\ndrain_partition_timeout_ms = 500\n"
        ));
        assert_eq!(Config::load(&p).unwrap().lifecycle.drain_timeout_ms, 500);
        // Past it, and zero, are refused with the key named.
        let (_d, p) = write(&format!(
            "{GOOD}\n[lifecycle]\ndrain_timeout_ms = 500\ndrain_partition_timeout_ms = 501\n"
        ));
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("drain_partition_timeout_ms (501)"), "{e}");
        let (_d, p) = write(&format!("{GOOD}\n[lifecycle]\ndrain_timeout_ms = 0\n"));
        assert!(Config::load(&p).is_err());
    }

    #[test]
    fn the_deploy_examples_are_valid_and_match_the_unit_layout() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
        for id in 1..=3u64 {
            let p = root.join(format!("node-{id}/chatd.toml"));
            let c = Config::load(&p).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(c.node_id, id);
            assert_eq!(c.peers.len(), 3);
            assert_eq!(
                c.data_dir,
                PathBuf::from(format!("/var/lib/chatd/node-{id}"))
            );
            assert_eq!(
                c.me().unwrap().api_addr.to_string(),
                format!("10.0.0.{id}:7000")
            );
        }
    }

    #[test]
    fn absolute_paths_are_kept_relative_ones_follow_the_file() {
        let text = GOOD
            .replace(
                "data_dir = \"data\"",
                "data_dir = \"/var/lib/chatd/node-1\"",
            )
            .replace("ca_cert = \"ca.pem\"", "ca_cert = \"/etc/chatd/ca.pem\"");
        let (dir, p) = write(&text);
        let c = Config::load(&p).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/chatd/node-1"));
        assert_eq!(c.tls.ca_cert, PathBuf::from("/etc/chatd/ca.pem"));
        assert_eq!(c.tls.cert, dir.path().join("node.pem"));
    }
}
