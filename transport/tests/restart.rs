//! A node that dies without closing its connections (kill -9) and restarts on the same
//! address with the same identity: its peers' stale connections must end at the first
//! packet (a stateless reset the restarted process can make), not after the idle timeout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatd_transport::{ClusterCa, Endpoint, Handler, PeerInfo, TlsIdentity, TransportLimits};
use futures::future::BoxFuture;
use futures::FutureExt;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn echo() -> Arc<dyn Handler> {
    Arc::new(|_: PeerInfo, request: Bytes| -> BoxFuture<'static, Bytes> {
        async move { request }.boxed()
    })
}

/// A server endpoint on its own runtime, so dropping the runtime kills it the way kill -9
/// does: no close frame, no goodbye.
struct Process {
    runtime: tokio::runtime::Runtime,
    endpoint: Endpoint,
}

fn start(identity: &TlsIdentity, addr: SocketAddr, limits: TransportLimits) -> Process {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let endpoint = runtime
        .block_on(async { Endpoint::bind(addr, identity, limits, echo()) })
        .unwrap();
    Process { runtime, endpoint }
}

fn restart(identity: &TlsIdentity, addr: SocketAddr, limits: TransportLimits) -> Process {
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        match runtime.block_on(async { Endpoint::bind(addr, identity, limits, echo()) }) {
            Ok(endpoint) => return Process { runtime, endpoint },
            Err(e) => {
                assert!(Instant::now() < deadline, "port never freed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

fn kill(p: Process) {
    // The driver tasks die with the runtime first, so nothing is sent; then the socket goes.
    p.runtime.shutdown_background();
    drop(p.endpoint);
}

#[test]
fn a_restarted_peer_resets_stale_connections_at_once() {
    // The server's runtimes are made and dropped outside the client's, as separate
    // processes would be.
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ca = ClusterCa::generate("restart-test").unwrap();
    let server_id = ca.identity(ca.issue_node(1, &[LOCALHOST]).unwrap());
    let client_id = ca.identity(ca.issue_node(2, &[LOCALHOST]).unwrap());
    // An idle timeout far above the bound below: only a reset can end the stale
    // connection in time.
    let limits = TransportLimits {
        idle_timeout_ms: 30_000,
        call_timeout_ms: 500,
        ..TransportLimits::default()
    };
    let first = start(&server_id, SocketAddr::new(LOCALHOST, 0), limits);
    let addr = first.endpoint.local_addr().unwrap();
    let client = client_rt
        .block_on(async { Endpoint::client_only(&client_id, limits) })
        .unwrap();
    let r = client_rt
        .block_on(client.call(addr, Bytes::from_static(b"one")))
        .unwrap();
    assert_eq!(&r[..], b"one");

    kill(first);
    // The killed runtime's threads may still hold the socket for a moment (a process's
    // port is free once it exited): bind again until the port is free, bounded.
    let second = restart(&server_id, addr, limits);
    let restarted = Instant::now();
    let mut failures = 0;
    loop {
        match client_rt.block_on(client.call_with_timeout(
            addr,
            Bytes::from_static(b"two"),
            Duration::from_millis(500),
        )) {
            Ok(r) => {
                assert_eq!(&r[..], b"two");
                break;
            }
            Err(e) => {
                failures += 1;
                assert!(
                    restarted.elapsed() < Duration::from_secs(3),
                    "still failing {:?} after the restart ({failures} failures, last: {e})",
                    restarted.elapsed()
                );
            }
        }
    }
    println!(
        "first successful call {:?} after the restart ({failures} failed calls before it)",
        restarted.elapsed()
    );
    kill(second);
}
