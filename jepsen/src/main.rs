//! `chatd-jepsen`: runs a fault-injection test against real chatd processes and judges
//! its history, or re-checks a recorded history.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use chatd_jepsen::checker::{AnomalyKind, Results};
use chatd_jepsen::nemesis::FaultKind;
use chatd_jepsen::run::{self, TestSpec};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "chatd-jepsen", version, about, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a test: cluster, workload, faults, final reads, checker, report.
    Test(TestArgs),
    /// Check a recorded history (history.jsonl) again.
    Check {
        /// The history file.
        history: PathBuf,
    },
    /// Print one Markdown table row per run directory (RELIABILITY.md's table): nemesis,
    /// duration, ops, acked, anomalies, longest unavailability, verdict.
    Table {
        /// Run directories (each with results.json and history.jsonl).
        runs: Vec<PathBuf>,
    },
}

/// One RELIABILITY.md row for the run in `dir`.
fn table_row(dir: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(dir.join("results.json"))
        .with_context(|| format!("no results.json in {}", dir.display()))?;
    let doc: serde_json::Value = serde_json::from_str(&text)?;
    let (p, r) = (&doc["params"], &doc["results"]);
    let faults: Vec<String> = p["faults"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let ops = std::fs::read_to_string(dir.join("history.jsonl"))
        .map(|h| h.lines().count())
        .unwrap_or(0);
    let anomalies: u64 = r["counts"]
        .as_object()
        .map(|m| m.values().filter_map(serde_json::Value::as_u64).sum())
        .unwrap_or(0);
    let faults_run = r["windows"].as_array().map_or(0, Vec::len);
    let fault_errors = r["fault_errors"].as_array().map_or(0, Vec::len);
    let mut verdict = String::from(if r["valid"].as_bool() == Some(true) {
        "VALID"
    } else {
        "INVALID"
    });
    if fault_errors > 0 {
        verdict.push_str(&format!(" ({fault_errors} fault errors)"));
    }
    Ok(format!(
        "| {} | {} s, {} nodes, seed {} | {} faults | {ops} | {} of {} sends | {anomalies} | {:.0} ms | {} |",
        match faults.len() {
            0 => "none".to_string(),
            n if n == FaultKind::all().len() => "all".to_string(),
            _ => faults.join(", "),
        }
            + if p["ack_before_sync"].as_bool() == Some(true) {
                " (**broken build**: acks before the sync)"
            } else {
                ""
            },
        p["time_limit_s"],
        p["nodes"],
        p["seed"],
        faults_run,
        r["messages_acked"],
        r["sends_invoked"],
        r["longest_unavailable_ms"].as_f64().unwrap_or(0.0),
        verdict,
    ))
}

#[derive(clap::Args)]
struct TestArgs {
    /// Nodes (each on its own address 127.0.0.11, .12, …).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=9))]
    nodes: u16,
    /// Seconds of workload (faults start only in the first 80%).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(5..=86_400))]
    time_limit: u64,
    /// Faults, comma-separated; `mixed` = every process and network fault but
    /// rolling-restart (membership changes included); `all` = mixed + power-cut,
    /// power-cut-all, disk-error, clock; `none`.
    #[arg(long, default_value = "mixed", value_delimiter = ',')]
    nemesis: Vec<String>,
    /// Seed of the schedule and of the clients' choices [default: from the clock].
    #[arg(long)]
    seed: Option<u64>,
    /// Concurrent clients, each its own user, spread over the nodes.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u16).range(1..=200))]
    clients: u16,
    /// Group chats, every client a member of each.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=100))]
    chats: u16,
    /// End-to-end encrypted chats (MLS, opaque to the server), every client (up to 20) a
    /// member of each: application messages and, now and then, competing commits.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(0..=100))]
    e2e_chats: u16,
    /// Operations per second over all clients.
    #[arg(long, default_value_t = 120.0)]
    rate: f64,
    /// Quiet time between faults, ms: MIN,MAX.
    #[arg(long, default_value = "2000,5000", value_delimiter = ',')]
    quiet_ms: Vec<u64>,
    /// How long each fault lasts, ms: MIN,MAX.
    #[arg(long, default_value = "3000,8000", value_delimiter = ',')]
    hold_ms: Vec<u64>,
    /// Where run directories go.
    #[arg(long, default_value = "jepsen-runs")]
    out: PathBuf,
    /// The chatd binary [default: next to this binary].
    #[arg(long)]
    chatd: Option<PathBuf>,
    /// API port of every node (QUIC on the next port).
    #[arg(long, default_value_t = 27_100)]
    base_port: u16,
    /// Keep the nodes' RocksDB directories (by default only logs and the report stay).
    #[arg(long)]
    keep_data: bool,
    /// Partitions of the cluster (`cluster init --partitions`).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=16_384))]
    partitions: u32,
}

fn faults(names: &[String]) -> anyhow::Result<Vec<FaultKind>> {
    use clap::ValueEnum;
    let mut out = Vec::new();
    for n in names {
        match n.trim() {
            "none" => {}
            "mixed" => out.extend(FaultKind::MIXED),
            "all" => out.extend(FaultKind::all()),
            other => out.push(
                FaultKind::from_str(other, true)
                    .map_err(|_| anyhow::anyhow!("unknown fault {other:?}; known: mixed, all, none, kill, kill-leader, pause, pause-leader, partition-one, partition-leader, majority-minority, bridge, rolling-restart, membership, power-cut, power-cut-all, disk-error, clock"))?,
            ),
        }
    }
    out.dedup();
    Ok(out)
}

fn chatd_path(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let me = std::env::current_exe().context("cannot find this binary's path")?;
    let sibling = me.with_file_name("chatd");
    if sibling.is_file() {
        return Ok(sibling);
    }
    anyhow::bail!(
        "no chatd next to {} (build it with `cargo build -p chatd`, or give --chatd)",
        me.display()
    )
}

fn summary(r: &Results) -> String {
    let mut s = String::new();
    s.push_str("anomalies:\n");
    for k in AnomalyKind::ALL {
        let n = r.counts.get(&k).copied().unwrap_or(0);
        let name = serde_json::to_value(k)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        s.push_str(&format!("  {name:<18} {n}\n"));
    }
    for e in &r.examples {
        s.push_str(&format!(
            "  e.g. {:?} in {}: {} (ops {:?})\n",
            e.kind, e.chat, e.detail, e.ops
        ));
    }
    for f in &r.fault_errors {
        s.push_str(&format!("  fault error: {f}\n"));
    }
    for i in &r.incomplete {
        s.push_str(&format!("  incomplete: {i}\n"));
    }
    let m = &r.membership;
    if !m.changes.is_empty() {
        let shown = |kind: &str| {
            let d: Vec<String> = m
                .durations(kind)
                .iter()
                .map(|d| format!("{d:.1}"))
                .collect();
            if d.is_empty() {
                String::new()
            } else {
                format!(" ({} s)", d.join(", "))
            }
        };
        s.push_str(&format!(
            "membership: {} adds{}, {} removes{}, {} replaces{}, {} failed\n",
            m.adds,
            shown("add"),
            m.removes,
            shown("remove"),
            m.replaces,
            shown("replace"),
            m.failed
        ));
    }
    let e = &r.e2e;
    if e.sends + e.commits > 0 {
        s.push_str(&format!(
            "e2e: {} application messages acked ({} attempts), {} commits acked ({} attempts, \
             {} refused stale_epoch), highest epoch reached {}\n",
            e.messages_acked, e.sends, e.commits_acked, e.commits, e.commits_stale, e.epoch_max
        ));
    }
    s.push_str("availability (sends completed while each fault was active):\n");
    for (fault, a) in &r.availability {
        s.push_str(&format!(
            "  {:>6.1}% of {:>6}  {fault}\n",
            a.share_ok * 100.0,
            a.completed
        ));
    }
    s.push_str(&format!(
        "ack latency: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} acks)\n",
        r.ack_latency_ms.p50, r.ack_latency_ms.p99, r.ack_latency_ms.max, r.ack_latency_ms.count
    ));
    s.push_str(&format!(
        "longest time without an acknowledged write: {:.0} ms (from {:.1} s)\n",
        r.longest_unavailable_ms, r.longest_unavailable_at_s
    ));
    s.push_str(&format!(
        "longest write gap of one chat: {:.0} ms ({}, from {:.1} s)\n",
        r.longest_chat_gap_ms, r.longest_chat_gap_chat, r.longest_chat_gap_at_s
    ));
    let f = &r.files;
    s.push_str(&format!(
        "files: {} uploads ({} acknowledged, {} refused, {} unknown), {} attached, {} \
         downloads checked, {} final downloads (files x nodes)\n",
        f.uploads,
        f.uploads_ok,
        f.uploads_failed,
        f.uploads_info,
        f.attached,
        f.downloads_ok,
        f.final_downloads
    ));
    s
}

async fn test(args: TestArgs) -> anyhow::Result<bool> {
    let faults = faults(&args.nemesis)?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
    });
    for (name, v) in [("--quiet-ms", &args.quiet_ms), ("--hold-ms", &args.hold_ms)] {
        if v.len() != 2 {
            anyhow::bail!("{name} takes MIN,MAX (two numbers of milliseconds)");
        }
    }
    if !(args.rate.is_finite() && args.rate > 0.0 && args.rate <= 100_000.0) {
        anyhow::bail!("--rate must be in (0, 100000]");
    }
    let spec = TestSpec {
        nodes: usize::from(args.nodes),
        time_limit_s: args.time_limit,
        faults,
        seed,
        clients: usize::from(args.clients),
        chats: usize::from(args.chats),
        e2e_chats: usize::from(args.e2e_chats),
        rate: args.rate,
        quiet_ms: (args.quiet_ms[0], args.quiet_ms[1].max(args.quiet_ms[0])),
        hold_ms: (args.hold_ms[0], args.hold_ms[1].max(args.hold_ms[0])),
        chatd: chatd_path(args.chatd)?,
        dir: run::run_dir(&args.out, seed),
        base_port: args.base_port,
        keep_data: args.keep_data,
        partitions: args.partitions,
        ack_before_sync: std::env::var("CHATD_TEST_ACK_BEFORE_SYNC").as_deref() == Ok("1"),
    };
    eprintln!(
        "chatd-jepsen: {} nodes, {} s, faults {:?}, seed {seed}, run dir {}",
        spec.nodes,
        spec.time_limit_s,
        spec.faults,
        spec.dir.display()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
        eprintln!("chatd-jepsen: interrupted: stopping and cleaning up");
        flag.store(true, Ordering::Relaxed);
    });
    let outcome = run::test(&spec, stop).await?;
    print!("{}", summary(&outcome.results));
    println!("report: {}", outcome.dir.display());
    println!("{}", outcome.results.verdict());
    Ok(outcome.results.valid)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chatd-jepsen: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.cmd {
            Cmd::Test(args) => test(args).await,
            Cmd::Table { runs } => {
                println!("| nemesis | run | faults | ops | acked | anomalies | longest unavailability | verdict |");
                println!("|---|---|---|---|---|---|---|---|");
                for dir in runs {
                    println!("{}", table_row(&dir)?);
                }
                Ok(true)
            }
            Cmd::Check { history } => {
                let ops = chatd_jepsen::history::load(&history)?;
                let r = chatd_jepsen::checker::check(&ops);
                print!("{}", summary(&r));
                println!("{}", r.verdict());
                Ok(r.valid)
            }
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("chatd-jepsen: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
