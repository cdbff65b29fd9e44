//! The `chatd` binary: thin glue over the chatd library.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use chatd::config::RaftSection;
use chatd::init::{init_cluster, InitSpec};
use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc for the node's Rust allocations: many small,
/// short-lived buffers cross threads (frames, entries, events); glibc spent ~10 % of the
/// node's CPU in malloc/free under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// chatd: a self-contained live chat cluster node.
///
/// With no arguments it runs a single-node cluster with its data in ./chatd-data,
/// creating it on first start.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
// Parsed once at start: the size of the largest variant (`cluster init`) does not matter.
#[allow(clippy::large_enum_variant)]
enum Cmd {
    /// Run a node.
    Run {
        /// The node's config file [default: ./chatd-data/node-1/chatd.toml, created if absent]
        #[arg(long, env = "CHATD_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Cluster administration.
    Cluster {
        #[command(subcommand)]
        command: ClusterCmd,
    },
    /// Start a local cluster of child processes on loopback and write DIR/demo.json.
    Demo {
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        #[arg(long, default_value = "chatd-demo")]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 7000)]
        base_port: u16,
        #[arg(long, default_value_t = 64)]
        partitions: u32,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: BenchCmd,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Generate the cluster CA, node certificates and node configs.
    Init {
        /// Number of nodes.
        #[arg(long)]
        nodes: u32,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Host address(es): one for all nodes (ports differ), or one per node.
        #[arg(long = "host", default_value = "127.0.0.1")]
        hosts: Vec<IpAddr>,
        /// Node i listens for clients on base-port + 10·(i−1) and for nodes on that +1.
        #[arg(long, default_value_t = 7000)]
        base_port: u16,
        /// Number of partitions.
        #[arg(long, default_value_t = 64)]
        partitions: u32,
        /// Leader heartbeat interval (ms).
        #[arg(long)]
        heartbeat_interval_ms: Option<u64>,
        /// Election timeout lower bound (ms); the upper bound is 1.5 times it.
        #[arg(long)]
        election_timeout_ms: Option<u64>,
        /// Snapshot after this many entries.
        #[arg(long)]
        snapshot_logs_since_last: Option<u64>,
        /// Entries kept below a snapshot.
        #[arg(long)]
        snapshot_logs_to_keep: Option<u64>,
        /// Presence TTL: a session silent this long is closed; a dead node's users go
        /// offline after it.
        #[arg(long)]
        presence_ttl_ms: Option<u64>,
        /// How often nodes re-announce their online users.
        #[arg(long)]
        presence_heartbeat_ms: Option<u64>,
        /// Sustained sends per second per user.
        #[arg(long)]
        send_rate_per_sec: Option<f64>,
        /// Webhook for offline notifications (http:// or https://).
        #[arg(long)]
        webhook_url: Option<String>,
        /// PEM file of CA certificates trusted for an https:// webhook besides the webpki
        /// roots; written into every config as an absolute path.
        #[arg(long, value_name = "FILE")]
        webhook_ca_file: Option<PathBuf>,
        /// Coalescing window of offline notifications.
        #[arg(long)]
        notify_window_ms: Option<u64>,
        /// Write `data_dir = "<DIR>/node-<id>"` (absolute) instead of `data` beside the
        /// config: the installed layout, e.g. /var/lib/chatd for the systemd unit.
        #[arg(long, value_name = "DIR")]
        data_dir_root: Option<PathBuf>,
    },
    /// Make a new node's certificate and config to join a running cluster: its id must
    /// never have been used in the cluster. Start it with `chatd run --config OUT/chatd.toml`
    /// (or its systemd unit); it asks the seed peers to admit it.
    AddNode {
        /// The directory `cluster init --out` wrote (ca.pem, ca.key, node-*/chatd.toml).
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        /// The new node's id.
        #[arg(long)]
        id: u64,
        /// The new node's host address.
        #[arg(long, default_value = "127.0.0.1")]
        host: IpAddr,
        /// Its client API port (QUIC uses the next one) [default: 7000 + 10·(id−1)].
        #[arg(long)]
        api_port: Option<u16>,
        /// Output directory for chatd.toml, node.pem, node.key, ca.pem.
        #[arg(long)]
        out: PathBuf,
        /// A member's config to copy the cluster's settings and seed peers from
        /// [default: the first node-*/chatd.toml under --ca-dir].
        #[arg(long, value_name = "FILE")]
        seed_config: Option<PathBuf>,
        /// Write `data_dir = "<DIR>/node-<id>"` (absolute), as `cluster init` does.
        #[arg(long, value_name = "DIR")]
        data_dir_root: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Replicated appends on an in-process cluster (real RocksDB with fsync, real QUIC).
    Log {
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        #[arg(long, default_value_t = 64)]
        partitions: u32,
        #[arg(long, default_value_t = 256)]
        in_flight: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 1024)]
        entry_bytes: usize,
        #[arg(long, default_value_t = 17000)]
        base_port: u16,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The time to move one replica of a partition holding RECORDS records to a new node,
    /// and one writer's append latency on that partition before and while it moves
    /// (in-process 3 + 1 nodes, real RocksDB with fsync, real QUIC).
    Move {
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
        #[arg(long, default_value_t = 200)]
        record_bytes: usize,
        #[arg(long, default_value_t = 1024)]
        fill_in_flight: usize,
        #[arg(long, default_value_t = 17100)]
        base_port: u16,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Cmd::Run { config: None }) {
        Cmd::Run { config } => {
            let path = match config {
                Some(p) => p,
                None => default_single_node()?,
            };
            chatd::run::run(&path).await
        }
        Cmd::Cluster {
            command:
                ClusterCmd::AddNode {
                    ca_dir,
                    id,
                    host,
                    api_port,
                    out,
                    seed_config,
                    data_dir_root,
                },
        } => {
            let api_port = match api_port {
                Some(p) => p,
                None => u16::try_from(id.saturating_sub(1).saturating_mul(10))
                    .ok()
                    .and_then(|o| o.checked_add(7000))
                    .context("--id too large for the default port; pass --api-port")?,
            };
            let files = chatd::init::add_node(&chatd::init::AddNodeSpec {
                ca_dir,
                id,
                host,
                api_port,
                out,
                seed_config,
                data_dir_root,
            })?;
            eprintln!(
                "chatd: node {} (api {}, cluster {}): start it with\n  chatd run --config {}",
                files.id,
                files.peer.api_addr,
                files.peer.cluster_addr,
                files.config.display()
            );
            Ok(())
        }
        Cmd::Cluster {
            command:
                ClusterCmd::Init {
                    nodes,
                    out,
                    hosts,
                    base_port,
                    partitions,
                    heartbeat_interval_ms,
                    election_timeout_ms,
                    snapshot_logs_since_last,
                    snapshot_logs_to_keep,
                    presence_ttl_ms,
                    presence_heartbeat_ms,
                    send_rate_per_sec,
                    webhook_url,
                    webhook_ca_file,
                    notify_window_ms,
                    data_dir_root,
                },
        } => {
            let mut gateway = chatd::gateway::GatewayConfig::default();
            if let Some(v) = presence_ttl_ms {
                gateway.presence_ttl_ms = v;
            }
            if let Some(v) = presence_heartbeat_ms {
                gateway.heartbeat_interval_ms = v;
            }
            if let Some(v) = send_rate_per_sec {
                gateway.send_rate_per_sec = v;
            }
            let webhook_ca_file = match webhook_ca_file {
                Some(p) => Some(
                    std::path::absolute(&p)
                        .map_err(|e| anyhow::anyhow!("--webhook-ca-file {}: {e}", p.display()))?,
                ),
                None => None,
            };
            let mut notify = chatd::config::NotifySection {
                webhook_url,
                webhook_ca_file,
                ..Default::default()
            };
            if let Some(v) = notify_window_ms {
                notify.coalesce_window_ms = v;
            }
            let mut raft = RaftSection::default();
            if let Some(v) = heartbeat_interval_ms {
                raft.heartbeat_interval_ms = v;
            }
            if let Some(v) = election_timeout_ms {
                raft.election_timeout_min_ms = v;
                raft.election_timeout_max_ms = v + v / 2;
            }
            if let Some(v) = snapshot_logs_since_last {
                raft.snapshot_logs_since_last = v;
            }
            if let Some(v) = snapshot_logs_to_keep {
                raft.snapshot_logs_to_keep = v;
            }
            let files = init_cluster(&InitSpec {
                nodes,
                out: out.clone(),
                hosts,
                base_port,
                partitions,
                raft,
                gateway,
                notify,
                data_dir_root,
            })?;
            println!("cluster initialised in {}", out.display());
            for f in files {
                println!(
                    "  node {}: config {}  api {}  cluster {}",
                    f.id,
                    f.config.display(),
                    f.peer.api_addr,
                    f.peer.cluster_addr
                );
            }
            Ok(())
        }
        Cmd::Demo {
            nodes,
            data_dir,
            base_port,
            partitions,
        } => chatd::demo::demo(nodes, &data_dir, base_port, partitions).await,
        Cmd::Bench {
            command:
                BenchCmd::Log {
                    nodes,
                    partitions,
                    in_flight,
                    seconds,
                    entry_bytes,
                    base_port,
                    json,
                },
        } => {
            let r = chatd::bench::bench_log(&chatd::bench::BenchSpec {
                nodes,
                partitions,
                in_flight,
                seconds,
                entry_bytes,
                base_port,
            })
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "nodes={} partitions={} in_flight={} entry_bytes={} seconds={:.1}",
                    r.nodes, r.partitions, r.in_flight, r.entry_bytes, r.seconds
                );
                println!(
                    "entries={} errors={} entries/s={:.0}  commit latency ms: p50={:.2} p99={:.2} p99.9={:.2} max={:.2}",
                    r.entries, r.errors, r.entries_per_sec, r.p50_ms, r.p99_ms, r.p999_ms, r.max_ms
                );
                println!("fdatasyncs per node: {:?}", r.fsyncs_per_node);
            }
            Ok(())
        }
        Cmd::Bench {
            command:
                BenchCmd::Move {
                    records,
                    record_bytes,
                    fill_in_flight,
                    base_port,
                    json,
                },
        } => {
            // Logs only when asked (RUST_LOG), to stderr: the figures go to stdout.
            if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
                tracing_subscriber::fmt()
                    .with_env_filter(filter)
                    .with_writer(std::io::stderr)
                    .init();
            }
            let r = chatd::bench_move::bench_move(&chatd::bench_move::MoveSpec {
                records,
                record_bytes,
                fill_in_flight,
                base_port,
            })
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "records={} record_bytes={} filled in {:.1} s; replica moved in {:.2} s",
                    r.records, r.record_bytes, r.fill_seconds, r.move_seconds
                );
                for (when, l) in [
                    ("before the move", &r.before_move),
                    ("during the move", &r.during_move),
                ] {
                    println!(
                        "{when}: appends={} errors={} latency ms p50={:.2} p99={:.2} max={:.2}",
                        l.appends, l.errors, l.p50_ms, l.p99_ms, l.max_ms
                    );
                }
            }
            Ok(())
        }
    }
}

/// The embedded default: a single-node cluster in ./chatd-data, created on first start.
fn default_single_node() -> anyhow::Result<PathBuf> {
    let dir = Path::new("chatd-data");
    let config = dir.join("node-1").join("chatd.toml");
    if !config.exists() {
        init_cluster(&InitSpec {
            nodes: 1,
            out: dir.to_path_buf(),
            hosts: vec![IpAddr::from([127, 0, 0, 1])],
            base_port: 7000,
            partitions: 64,
            raft: RaftSection::default(),
            gateway: Default::default(),
            notify: Default::default(),
            data_dir_root: None,
        })
        .context("cannot create the single-node cluster in ./chatd-data")?;
        chatd::first_steps::print(
            "chatd: created a single-node cluster in ./chatd-data (API on http://127.0.0.1:7000).",
            &dir.join("admin.token"),
            chatd::first_steps::DEFAULT_SERVER,
        );
    }
    Ok(config)
}
