//! Loopback RPC micro benchmark: one server, one client, N calls in flight.
//!
//! ```text
//! cargo run -p chatd-transport --example rpc_bench -- [--inflight N] [--seconds S] [--size BYTES]
//! ```
//! The same settings can be given as `RPC_BENCH_INFLIGHT`, `RPC_BENCH_SECONDS` and
//! `RPC_BENCH_SIZE`. The handler echoes the request; prints calls/s and latency percentiles.

use std::error::Error;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatd_transport::{ClusterCa, Endpoint, PeerInfo, TransportLimits};
use futures::future::BoxFuture;
use futures::FutureExt;

/// Benchmark settings.
struct Settings {
    inflight: usize,
    seconds: u64,
    size: usize,
}

/// Reads `--name VALUE` from the arguments, else `RPC_BENCH_<NAME>` from the environment.
fn setting<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> Result<T, String> {
    let flag = format!("--{name}");
    let text = match args.iter().position(|a| *a == flag) {
        Some(i) => args.get(i + 1).cloned(),
        None => std::env::var(format!("RPC_BENCH_{}", name.to_uppercase())).ok(),
    };
    match text {
        None => Ok(default),
        Some(text) => text
            .parse()
            .map_err(|_| format!("{flag}: {text:?} is not a valid number")),
    }
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    let settings = Settings {
        inflight: setting(&args, "inflight", 64)?.max(1),
        seconds: setting(&args, "seconds", 5)?.max(1),
        size: setting(&args, "size", 1024)?,
    };

    let ca = ClusterCa::generate("bench")?;
    let localhost = Ipv4Addr::LOCALHOST;
    let server_identity = ca.identity(ca.issue_node(1, &[localhost.into()])?);
    let client_identity = ca.identity(ca.issue_client("rpc-bench")?);
    let limits = TransportLimits::default();
    let echo = |_peer: PeerInfo, request: Bytes| -> BoxFuture<'static, Bytes> {
        async move { request }.boxed()
    };
    let server = Endpoint::bind(
        SocketAddr::from((localhost, 0)),
        &server_identity,
        limits,
        Arc::new(echo),
    )?;
    let addr = server.local_addr()?;
    let client = Endpoint::client_only(&client_identity, limits)?;
    let request = Bytes::from(vec![0xa5u8; settings.size]);

    // Warm up (connection set-up, congestion window) for one second.
    let warmup_end = Instant::now() + Duration::from_secs(1);
    while Instant::now() < warmup_end {
        client.call(addr, request.clone()).await?;
    }

    let started = Instant::now();
    let deadline = started + Duration::from_secs(settings.seconds);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..settings.inflight {
        let client = client.clone();
        let request = request.clone();
        workers.spawn(async move {
            let mut latencies_us: Vec<u32> = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let call_started = Instant::now();
                match client.call(addr, request.clone()).await {
                    Ok(_) => latencies_us.push(
                        u32::try_from(call_started.elapsed().as_micros()).unwrap_or(u32::MAX),
                    ),
                    Err(_) => errors += 1,
                }
            }
            (latencies_us, errors)
        });
    }
    let mut latencies_us = Vec::new();
    let mut errors = 0;
    while let Some(result) = workers.join_next().await {
        let (worker_latencies, worker_errors) = result?;
        latencies_us.extend(worker_latencies);
        errors += worker_errors;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies_us.sort_unstable();

    println!(
        "rpc_bench: {} B requests (echoed), {} in flight, {:.1} s, {} connection(s)",
        settings.size,
        settings.inflight,
        elapsed,
        client.connection_count()
    );
    println!(
        "calls: {} ok, {} failed; {:.0} calls/s",
        latencies_us.len(),
        errors,
        latencies_us.len() as f64 / elapsed
    );
    println!(
        "latency: p50 {} us, p99 {} us, p99.9 {} us, max {} us",
        percentile(&latencies_us, 0.50),
        percentile(&latencies_us, 0.99),
        percentile(&latencies_us, 0.999),
        latencies_us.last().copied().unwrap_or(0)
    );
    client.close().await;
    server.close().await;
    Ok(())
}
