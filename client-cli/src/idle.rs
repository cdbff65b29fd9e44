//! `chat-cli bench-idle`: what idle sessions cost a node. Creates users (admin token),
//! opens N authenticated WebSocket sessions to one node and leaves them idle, and reads the
//! node's resident memory (`chatd_process_resident_memory_bytes` in `/metrics`) before and
//! after: the difference per session is the figure (BENCHMARKS.md).

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;

use crate::bench::{admin_token, create_user, unique_prefix};
use crate::client::{server_url, CliError};
use crate::ws::Connection;
use crate::Cli;

/// Sessions one probe opens at most (each holds an open file here and on the node).
pub const IDLE_SESSIONS_MAX: u32 = 100_000;
/// Sessions per created user: the server's default `sessions_per_user_max`.
const SESSIONS_PER_USER: u32 = 8;
/// Sessions being opened at once.
const OPENING_AT_ONCE: usize = 64;
/// Users being created at once.
const CREATING_AT_ONCE: usize = 16;
/// Wait after the last session opened before memory is read again, so the node settled.
const SETTLE_MS: u64 = 2_000;
/// Sessions opened between two progress lines (on stderr; one line rewritten on a tty).
const PROGRESS_EVERY_SESSIONS: u32 = 1_000;

/// The progress line while sessions open: a fresh line each time, or one rewritten in
/// place on a terminal.
fn say_progress(tty: bool, opened: u32, total: u32, started: Instant) {
    let line = format!(
        "bench-idle: {opened} of {total} sessions open ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    if tty {
        eprint!("\r\x1b[K{line}");
        if opened == total {
            eprintln!();
        }
    } else {
        eprintln!("{line}");
    }
}

/// `bench-idle` options.
#[derive(clap::Args, Debug, Clone)]
pub struct IdleArgs {
    /// Sessions to open and hold (8 per created user).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=IDLE_SESSIONS_MAX as i64))]
    pub sessions: u32,
    /// Seconds to hold the sessions idle after they are open (memory is read at the start
    /// and at the end of it).
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    pub hold: f64,
    /// Local addresses to open the sessions from, round-robin (e.g.
    /// 127.0.0.2,127.0.0.3): one address has ~28,000 ephemeral ports towards one server.
    #[arg(long, value_delimiter = ',', value_name = "IP,...")]
    pub source_addrs: Vec<std::net::IpAddr>,
}

/// Each held session pings this often (the server's presence TTL is 60 s by default), so
/// the sessions are what an idle but connected client keeps: authenticated, heartbeating.
pub const IDLE_PING_EVERY_MS: u64 = 20_000;

/// The probe's result.
#[derive(serde::Serialize, Debug)]
pub struct IdleReport {
    pub sessions: u32,
    pub open_seconds: f64,
    pub rss_before_bytes: u64,
    pub rss_open_bytes: u64,
    pub rss_end_bytes: u64,
    pub bytes_per_session: f64,
    /// The node's CPU while the sessions were held, in percent of one core.
    pub node_cpu_percent: f64,
}

async fn node_rss(http: &reqwest::Client, base: &reqwest::Url) -> Result<u64, CliError> {
    let v = node_metric(http, base, "chatd_process_resident_memory_bytes").await?;
    Ok(v as u64)
}

async fn node_metric(
    http: &reqwest::Client,
    base: &reqwest::Url,
    name: &str,
) -> Result<f64, CliError> {
    let url = base
        .join("metrics")
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let text = http
        .get(url.clone())
        .send()
        .await
        .map_err(|e| CliError::Unreachable {
            url: url.to_string(),
            cause: e.to_string(),
        })?
        .text()
        .await
        .map_err(|e| CliError::Failed(e.to_string()))?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| CliError::Failed(format!("{url} has no {name} (an older node?)")))
}

/// Runs the probe; the report as text or JSON.
pub async fn run(cli: &Cli, args: &IdleArgs) -> Result<String, CliError> {
    let admin = admin_token(cli, "bench-idle")?;
    if !(args.hold.is_finite() && args.hold >= 0.0) {
        return Err(CliError::Usage(
            "--hold must be a number of seconds ≥ 0".into(),
        ));
    }
    let base = server_url(&cli.server)?;
    let timeout = Duration::from_millis(cli.timeout_ms);
    let http = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| CliError::Failed(format!("cannot set up the HTTP client: {e}")))?;
    let prefix = unique_prefix();
    let users = args.sessions.div_ceil(SESSIONS_PER_USER);
    let tokens: Vec<String> = futures::stream::iter(0..users)
        .map(|i| {
            let (http, base, admin, user) = (&http, &base, &admin, format!("{prefix}-{i}"));
            async move { create_user(http, base, admin, &user).await }
        })
        .buffered(CREATING_AT_ONCE)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let rss_before = node_rss(&http, &base).await?;
    let started = Instant::now();
    let server = cli.server.clone();
    let sources = args.source_addrs.clone();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut opened = 0u32;
    let sessions: Vec<Connection> = futures::stream::iter(0..args.sessions)
        .map(|i| {
            let token = tokens[(i / SESSIONS_PER_USER) as usize].clone();
            let server = server.clone();
            let source = (!sources.is_empty()).then(|| sources[i as usize % sources.len()]);
            async move { Connection::connect_from(&server, Some(&token), timeout, source).await }
        })
        .buffer_unordered(OPENING_AT_ONCE)
        .inspect(|_| {
            opened += 1;
            if opened.is_multiple_of(PROGRESS_EVERY_SESSIONS) || opened == args.sessions {
                say_progress(tty, opened, args.sessions, started);
            }
        })
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let open_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(SETTLE_MS)).await;
    let rss_open = node_rss(&http, &base).await?;
    let cpu_before = node_metric(&http, &base, "chatd_process_cpu_seconds_total").await?;
    let held = Instant::now();
    let mut sessions = sessions;
    let hold = Duration::from_secs_f64(args.hold);
    while held.elapsed() < hold {
        let left = hold.saturating_sub(held.elapsed());
        tokio::time::sleep(left.min(Duration::from_millis(IDLE_PING_EVERY_MS))).await;
        if held.elapsed() < hold {
            // Heartbeats, as a connected client sends them (answers are not awaited).
            for s in sessions.iter_mut() {
                s.send(&chatd_proto::ClientFrame::Ping { id: None }).await?;
            }
        }
    }
    let cpu_after = node_metric(&http, &base, "chatd_process_cpu_seconds_total").await?;
    let held_seconds = held.elapsed().as_secs_f64();
    let rss_end = node_rss(&http, &base).await?;
    drop(sessions);
    let report = IdleReport {
        sessions: args.sessions,
        open_seconds,
        rss_before_bytes: rss_before,
        rss_open_bytes: rss_open,
        rss_end_bytes: rss_end,
        bytes_per_session: rss_end.saturating_sub(rss_before) as f64 / f64::from(args.sessions),
        node_cpu_percent: 100.0 * (cpu_after - cpu_before) / held_seconds.max(0.001),
    };
    if cli.json {
        return serde_json::to_string_pretty(&json!(report))
            .map_err(|e| CliError::Failed(e.to_string()));
    }
    Ok(format!(
        "{} idle sessions opened in {:.1} s; node RSS {:.1} MiB before, {:.1} MiB open, {:.1} MiB after {:.0} s idle: {:.0} bytes per session; node CPU while idle {:.1} % of a core\n",
        report.sessions,
        report.open_seconds,
        rss_before as f64 / 1048576.0,
        rss_open as f64 / 1048576.0,
        rss_end as f64 / 1048576.0,
        args.hold,
        report.bytes_per_session,
        report.node_cpu_percent
    ))
}
