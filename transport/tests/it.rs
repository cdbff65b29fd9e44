//! Integration tests: real QUIC endpoints on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatd_transport::{
    ClusterCa, Endpoint, Frame, Handler, PeerInfo, TlsIdentity, TransportError, TransportLimits,
};
use futures::future::{join_all, BoxFuture};
use futures::FutureExt;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn loopback_any_port() -> SocketAddr {
    SocketAddr::new(LOCALHOST, 0)
}

fn node_identity(ca: &ClusterCa, node_id: u64) -> TlsIdentity {
    ca.identity(ca.issue_node(node_id, &[LOCALHOST]).unwrap())
}

/// Test handler. Requests:
/// - `remote`: the caller's address as the server saw it
/// - `size:N`: a response of N bytes
/// - `sleep:MS`: sleeps, then answers `slept`
/// - `panic`: panics
/// - anything else: `echo:` + request
fn test_handler() -> Arc<dyn Handler> {
    Arc::new(
        |peer: PeerInfo, request: Bytes| -> BoxFuture<'static, Bytes> {
            async move {
                let text = String::from_utf8_lossy(&request).into_owned();
                if text == "remote" {
                    Bytes::from(peer.remote.to_string())
                } else if let Some(n) = text.strip_prefix("size:") {
                    Bytes::from(vec![b'x'; n.parse().unwrap()])
                } else if let Some(ms) = text.strip_prefix("sleep:") {
                    tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
                    Bytes::from_static(b"slept")
                } else if text == "panic" {
                    panic!("test handler asked to panic");
                } else {
                    let mut response = b"echo:".to_vec();
                    response.extend_from_slice(&request);
                    Bytes::from(response)
                }
            }
            .boxed()
        },
    )
}

fn server(ca: &ClusterCa, limits: TransportLimits) -> (Endpoint, SocketAddr) {
    let endpoint = Endpoint::bind(
        loopback_any_port(),
        &node_identity(ca, 1),
        limits,
        test_handler(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    (endpoint, addr)
}

fn client(ca: &ClusterCa, limits: TransportLimits) -> Endpoint {
    Endpoint::client_only(&node_identity(ca, 2), limits).unwrap()
}

async fn assert_echo(client: &Endpoint, addr: SocketAddr) {
    let response = client
        .call(addr, Bytes::from_static(b"ping"))
        .await
        .unwrap();
    assert_eq!(&response[..], b"echo:ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_share_one_connection() {
    let ca = ClusterCa::generate("test").unwrap();
    let (_server, addr) = server(&ca, TransportLimits::default());
    let client = client(&ca, TransportLimits::default());

    let calls = (0..1000).map(|i| {
        let client = client.clone();
        async move {
            let request = format!("req-{i}");
            let response = client
                .call(addr, Bytes::from(request.clone()))
                .await
                .unwrap();
            assert_eq!(response, Bytes::from(format!("echo:{request}")));
        }
    });
    join_all(calls).await;
    assert_eq!(client.connection_count(), 1);

    // Empty requests and responses are fine.
    let response = client.call(addr, Bytes::new()).await.unwrap();
    assert_eq!(&response[..], b"echo:");
    let response = client
        .call(addr, Bytes::from_static(b"size:0"))
        .await
        .unwrap();
    assert!(response.is_empty());

    // A second wave reuses the cached connection.
    join_all((0..100).map(|_| assert_echo(&client, addr))).await;
    assert_eq!(client.connection_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_call_each_other_and_see_who_called() {
    let ca = ClusterCa::generate("test").unwrap();
    let limits = TransportLimits::default();
    let a = Endpoint::bind(
        loopback_any_port(),
        &node_identity(&ca, 1),
        limits,
        test_handler(),
    )
    .unwrap();
    let b = Endpoint::bind(
        loopback_any_port(),
        &node_identity(&ca, 2),
        limits,
        test_handler(),
    )
    .unwrap();
    let (a_addr, b_addr) = (a.local_addr().unwrap(), b.local_addr().unwrap());

    // A bound endpoint calls from its own socket: the callee sees the caller's address.
    let seen_by_b = a.call(b_addr, Bytes::from_static(b"remote")).await.unwrap();
    assert_eq!(&seen_by_b[..], a_addr.to_string().as_bytes());
    let seen_by_a = b.call(a_addr, Bytes::from_static(b"remote")).await.unwrap();
    assert_eq!(&seen_by_a[..], b_addr.to_string().as_bytes());

    // A client certificate of the same CA that is not a node's is accepted too.
    let tool = Endpoint::client_only(&ca.identity(ca.issue_client("bench-tool").unwrap()), limits)
        .unwrap();
    let seen = tool
        .call(a_addr, Bytes::from_static(b"remote"))
        .await
        .unwrap();
    let seen: SocketAddr = String::from_utf8(seen.to_vec()).unwrap().parse().unwrap();
    assert!(seen.ip().is_loopback(), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_from_another_ca_is_refused() {
    let ca = ClusterCa::generate("test").unwrap();
    let rogue_ca = ClusterCa::generate("rogue").unwrap();
    let (_server, addr) = server(&ca, TransportLimits::default());

    // Trusts the right CA, but presents a certificate from another one.
    let rogue_cert = rogue_ca.issue_node(9, &[LOCALHOST]).unwrap();
    let rogue_identity = TlsIdentity {
        ca_cert_pem: ca.cert_pem().to_owned(),
        cert_pem: rogue_cert.cert_pem,
        key_pem: rogue_cert.key_pem,
    };
    let rogue = Endpoint::client_only(&rogue_identity, TransportLimits::default()).unwrap();
    let err = rogue
        .call(addr, Bytes::from_static(b"ping"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Connect { .. } | TransportError::ConnectionLost { .. }
        ),
        "{err}"
    );
    eprintln!("expected error: {err}");

    // Entirely from another cluster: both sides refuse.
    let foreign =
        Endpoint::client_only(&node_identity(&rogue_ca, 9), TransportLimits::default()).unwrap();
    let err = foreign
        .call(addr, Bytes::from_static(b"ping"))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Connect { .. }), "{err}");
    eprintln!("expected error: {err}");

    // The server keeps serving good clients.
    assert_echo(&client(&ca, TransportLimits::default()), addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_from_another_ca_is_refused() {
    let ca = ClusterCa::generate("test").unwrap();
    let rogue_ca = ClusterCa::generate("rogue").unwrap();
    let (_rogue_server, addr) = server(&rogue_ca, TransportLimits::default());
    let client = client(&ca, TransportLimits::default());
    let err = client
        .call(addr, Bytes::from_static(b"ping"))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Connect { .. }), "{err}");
    eprintln!("expected error: {err}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    assert_eq!(client.connection_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_do_not_hurt_the_server() {
    let ca = ClusterCa::generate("test").unwrap();
    let (_server, addr) = server(&ca, TransportLimits::default());
    let client = client(&ca, TransportLimits::default());
    assert_echo(&client, addr).await;

    let socket = tokio::net::UdpSocket::bind(loopback_any_port())
        .await
        .unwrap();
    let mut fake_initial = vec![0xc3, 0, 0, 0, 1, 8];
    fake_initial.extend_from_slice(&[0x55; 1300]);
    let datagrams: Vec<Vec<u8>> = vec![
        Vec::new(),
        vec![0],
        b"hello, are you a QUIC server?".to_vec(),
        vec![0xff; 1500],
        fake_initial,
        (0..1200u32).map(|i| (i * 7919 % 251) as u8).collect(),
        vec![0x40; 64], // short header with an unknown connection id
    ];
    for _ in 0..20 {
        for datagram in &datagrams {
            socket.send_to(datagram, addr).await.unwrap();
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Existing connections and new clients still work.
    assert_echo(&client, addr).await;
    assert_echo(&self::client(&ca, TransportLimits::default()), addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_frames_are_refused_and_the_server_survives() {
    let ca = ClusterCa::generate("test").unwrap();
    let small = TransportLimits {
        frame_bytes_max: 1024,
        ..TransportLimits::default()
    };
    let (_server, addr) = server(&ca, small);
    let big_client = client(&ca, TransportLimits::default());
    let small_client = client(&ca, small);

    // Request larger than the server's limit: refused by the server.
    let err = big_client
        .call(addr, Bytes::from(vec![7u8; 4096]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::FrameTooLarge {
                frame: Frame::Request,
                bytes_max: 1024,
                ..
            }
        ),
        "{err}"
    );
    eprintln!("expected error: {err}");
    assert_echo(&big_client, addr).await;

    // Much larger (beyond the flow-control windows) too.
    let err = big_client
        .call(addr, Bytes::from(vec![7u8; 20 * 1024 * 1024]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::FrameTooLarge {
                frame: Frame::Request,
                ..
            }
        ),
        "{err}"
    );
    eprintln!("expected error: {err}");
    assert_echo(&big_client, addr).await;

    // Request larger than the caller's own limit: refused before sending.
    let err = small_client
        .call(addr, Bytes::from(vec![7u8; 2048]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::FrameTooLarge {
                frame: Frame::Request,
                bytes_max: 1024,
                ..
            }
        ),
        "{err}"
    );
    eprintln!("expected error: {err}");

    // Response larger than the server's limit: the server refuses to send it.
    let err = big_client
        .call(addr, Bytes::from_static(b"size:4096"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::FrameTooLarge {
                frame: Frame::Response,
                bytes_max: 1024,
                ..
            }
        ),
        "{err}"
    );
    eprintln!("expected error: {err}");
    assert_echo(&big_client, addr).await;
    assert_eq!(big_client.connection_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_response_is_refused_by_the_client() {
    let ca = ClusterCa::generate("test").unwrap();
    let (_server, addr) = server(&ca, TransportLimits::default());
    let small_client = client(
        &ca,
        TransportLimits {
            frame_bytes_max: 1024,
            ..TransportLimits::default()
        },
    );
    for size in [1025, 3 * 1024 * 1024] {
        let err = small_client
            .call(addr, Bytes::from(format!("size:{size}")))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::FrameTooLarge {
                    frame: Frame::Response,
                    bytes_max: 1024,
                    ..
                }
            ),
            "{err}"
        );
        eprintln!("expected error: {err}");
    }
    let ok = small_client
        .call(addr, Bytes::from_static(b"size:1024"))
        .await
        .unwrap();
    assert_eq!(ok.len(), 1024);
    assert_echo(&small_client, addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_panic_fails_only_that_call() {
    let ca = ClusterCa::generate("test").unwrap();
    let (_server, addr) = server(&ca, TransportLimits::default());
    let client = client(&ca, TransportLimits::default());
    let err = client
        .call(addr, Bytes::from_static(b"panic"))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::StreamClosed { .. }), "{err}");
    assert!(err.to_string().contains("handler failed"), "{err}");
    assert_echo(&client, addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_call_times_out() {
    let ca = ClusterCa::generate("test").unwrap();
    let (_server, addr) = server(&ca, TransportLimits::default());
    let client = client(&ca, TransportLimits::default());
    assert_echo(&client, addr).await;
    let started = Instant::now();
    let err = client
        .call_with_timeout(
            addr,
            Bytes::from_static(b"sleep:3000"),
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransportError::Timeout { ms: 200, .. }),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_echo(&client, addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calling_a_dead_port_fails_within_the_connect_timeout() {
    let ca = ClusterCa::generate("test").unwrap();
    let dead = {
        let socket = std::net::UdpSocket::bind(loopback_any_port()).unwrap();
        socket.local_addr().unwrap()
    };
    let limits = TransportLimits {
        connect_timeout_ms: 500,
        ..TransportLimits::default()
    };
    let client = client(&ca, limits);
    let started = Instant::now();
    // Concurrent callers share the single failed dial rather than dialling one after another.
    let results = join_all((0..20).map(|_| client.call(dead, Bytes::from_static(b"ping")))).await;
    let elapsed = started.elapsed();
    for result in results {
        let err = result.unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::ConnectTimeout { ms: 500, .. } | TransportError::Connect { .. }
            ),
            "{err}"
        );
        eprintln!("expected error: {err}");
    }
    assert!(elapsed < Duration::from_millis(1500), "took {elapsed:?}");
    assert_eq!(client.connection_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_restart_is_redialled() {
    let ca = ClusterCa::generate("test").unwrap();
    let (server, addr) = server(&ca, TransportLimits::default());
    let client = client(&ca, TransportLimits::default());
    assert_echo(&client, addr).await;

    server.close().await;
    drop(server);
    let err = client
        .call(addr, Bytes::from_static(b"ping"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Connect { .. }
                | TransportError::ConnectTimeout { .. }
                | TransportError::ConnectionLost { .. }
        ),
        "{err}"
    );
    eprintln!("expected error: {err}");

    // The old socket is released asynchronously; retry the bind briefly.
    let deadline = Instant::now() + Duration::from_secs(5);
    let _restarted = loop {
        match Endpoint::bind(
            addr,
            &node_identity(&ca, 1),
            TransportLimits::default(),
            test_handler(),
        ) {
            Ok(endpoint) => break endpoint,
            Err(e) if Instant::now() < deadline => {
                eprintln!("rebind not yet possible: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot rebind {addr}: {e}"),
        }
    };
    assert_echo(&client, addr).await;
    assert_eq!(client.connection_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_endpoint_refuses_calls() {
    let ca = ClusterCa::generate("test").unwrap();
    let (_server, addr) = server(&ca, TransportLimits::default());
    let client = client(&ca, TransportLimits::default());
    assert_echo(&client, addr).await;
    client.close().await;
    let err = client
        .call(addr, Bytes::from_static(b"ping"))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::EndpointClosed), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_peer_from_ipv4_client() {
    let ca = ClusterCa::generate("test").unwrap();
    let listen = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0);
    let Ok(server) = Endpoint::bind(
        listen,
        &node_identity(&ca, 1),
        TransportLimits::default(),
        test_handler(),
    ) else {
        eprintln!("no IPv6 loopback here; skipping");
        return;
    };
    let v6_addr = server.local_addr().unwrap();
    let client = client(&ca, TransportLimits::default());
    assert_echo(&client, v6_addr).await;
    // The IPv6 server can call IPv4 peers too.
    let (_v4_server, v4_addr) = self::server(&ca, TransportLimits::default());
    assert_echo(&server, v4_addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_reloaded_from_pem_issues_trusted_certs() {
    let ca = ClusterCa::generate("test").unwrap();
    let (_server, addr) = server(&ca, TransportLimits::default());
    let reloaded = ClusterCa::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
    let client = client(&reloaded, TransportLimits::default());
    assert_echo(&client, addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_identity_load_names_the_bad_file() {
    let ca = ClusterCa::generate("test").unwrap();
    let node = ca.issue_node(1, &[LOCALHOST]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    let cert_path = dir.path().join("node.pem");
    let key_path = dir.path().join("node.key");
    let junk_path = dir.path().join("junk.pem");
    let missing_path = dir.path().join("missing.pem");
    std::fs::write(&ca_path, ca.cert_pem()).unwrap();
    std::fs::write(&cert_path, &node.cert_pem).unwrap();
    std::fs::write(&key_path, &node.key_pem).unwrap();
    std::fs::write(&junk_path, "this is not PEM\n").unwrap();

    let identity = TlsIdentity::load(&ca_path, &cert_path, &key_path).unwrap();
    let server = Endpoint::bind(
        loopback_any_port(),
        &identity,
        TransportLimits::default(),
        test_handler(),
    )
    .unwrap();
    assert_echo(
        &client(&ca, TransportLimits::default()),
        server.local_addr().unwrap(),
    )
    .await;

    let path_of = |p: &std::path::Path| p.display().to_string();

    let err = TlsIdentity::load(&missing_path, &cert_path, &key_path).unwrap_err();
    assert!(matches!(err, TransportError::FileRead { .. }), "{err}");
    eprintln!("expected error: {err}");
    assert!(err.to_string().contains(&path_of(&missing_path)), "{err}");

    let err = TlsIdentity::load(&ca_path, &junk_path, &key_path).unwrap_err();
    assert!(matches!(err, TransportError::NotPem { .. }), "{err}");
    eprintln!("expected error: {err}");
    assert!(err.to_string().contains(&path_of(&junk_path)), "{err}");

    let err = TlsIdentity::load(&ca_path, &key_path, &key_path).unwrap_err();
    assert!(matches!(err, TransportError::NoCertificate { .. }), "{err}");
    assert!(err.to_string().contains(&path_of(&key_path)), "{err}");

    let err = TlsIdentity::load(&ca_path, &cert_path, &cert_path).unwrap_err();
    assert!(matches!(err, TransportError::NoPrivateKey { .. }), "{err}");
    eprintln!("expected error: {err}");
    assert!(err.to_string().contains(&path_of(&cert_path)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_limits_are_rejected() {
    let ca = ClusterCa::generate("test").unwrap();
    let limits = TransportLimits {
        concurrent_streams_max: 0,
        ..TransportLimits::default()
    };
    let err = Endpoint::client_only(&node_identity(&ca, 1), limits).unwrap_err();
    assert!(matches!(err, TransportError::InvalidLimits { .. }), "{err}");
}

/// Answers datagram `n` with `n + 1` (one byte), counts what it got, panics on 0xFF.
struct DatagramCounter {
    got: std::sync::Mutex<Vec<u8>>,
}

impl Handler for DatagramCounter {
    fn handle(&self, _peer: PeerInfo, request: Bytes) -> BoxFuture<'static, Bytes> {
        async move { request }.boxed()
    }

    fn datagram(&self, _peer: &PeerInfo, datagram: Bytes) -> Option<Bytes> {
        let first = *datagram.first()?;
        self.got.lock().unwrap().push(first);
        if first == 0xFF {
            panic!("asked to panic");
        }
        // An even byte is a request; the odd answer is only counted.
        (first % 2 == 0).then(|| Bytes::from(vec![first + 1]))
    }
}

/// Datagrams go only on an open connection, are answered on the same connection (the
/// dialling side's handler gets the answer), survive a panicking handler, and are bounded;
/// one not answered is still acknowledged (what the connection received grows) while the
/// peer runs, and not once it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_are_answered_on_their_connection_and_bounded() {
    let ca = ClusterCa::generate("test").unwrap();
    let limits = TransportLimits::default();
    let handler = |_: u64| {
        Arc::new(DatagramCounter {
            got: std::sync::Mutex::new(Vec::new()),
        })
    };
    let (a_handler, b_handler) = (handler(1), handler(2));
    let a = Endpoint::bind(
        loopback_any_port(),
        &node_identity(&ca, 1),
        limits,
        a_handler.clone(),
    )
    .unwrap();
    let b = Endpoint::bind(
        loopback_any_port(),
        &node_identity(&ca, 2),
        limits,
        b_handler.clone(),
    )
    .unwrap();
    let b_addr = b.local_addr().unwrap();
    // No connection yet: not sent, and no dial happens.
    let e = a
        .send_datagram(b_addr, Bytes::from_static(&[2]))
        .unwrap_err();
    assert!(matches!(e, TransportError::DatagramNotSent { .. }), "{e}");
    assert_eq!(a.connection_count(), 0);
    // A call opens the connection; then datagrams flow both ways on it.
    a.call(b_addr, Bytes::from_static(b"hi")).await.unwrap();
    let e = a
        .send_datagram(
            b_addr,
            Bytes::from(vec![4u8; chatd_transport::DATAGRAM_BYTES_MAX + 1]),
        )
        .unwrap_err();
    assert!(e.to_string().contains("more than 1024"), "{e}");
    a.send_datagram(b_addr, Bytes::from_static(&[0xFF]))
        .unwrap();
    a.send_datagram(b_addr, Bytes::from_static(&[2])).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // (Loopback may drop a datagram: send again until the answer came.)
        if a_handler.got.lock().unwrap().contains(&3) {
            break;
        }
        assert!(Instant::now() < deadline, "no answer to a datagram");
        tokio::time::sleep(Duration::from_millis(50)).await;
        a.send_datagram(b_addr, Bytes::from_static(&[2])).unwrap();
    }
    let got_b = b_handler.got.lock().unwrap().clone();
    assert!(got_b.contains(&0xFF), "{got_b:?}");
    assert!(
        got_b.contains(&2),
        "the reader outlived the panic: {got_b:?}"
    );
    assert!(
        a_handler.got.lock().unwrap().iter().all(|d| *d == 3),
        "only answers came back"
    );
    // A datagram that is not answered is still acknowledged by the peer's QUIC stack: what
    // the connection received grows, so the sender knows the peer runs without an answer.
    let before = a.received_from(b_addr).expect("an open connection");
    assert!(a.received_from(loopback_any_port()).is_none(), "no dial");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        a.send_datagram(b_addr, Bytes::from_static(&[7])).unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
        let now = a.received_from(b_addr).expect("still open");
        assert_eq!(now.connection, before.connection);
        if now.packets > before.packets {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no acknowledgement of a datagram"
        );
    }
    assert!(
        a_handler.got.lock().unwrap().iter().all(|d| *d == 3),
        "datagram 7 is not answered: only its QUIC acknowledgement came back"
    );
    // Once the peer is gone, nothing more arrives on the connection.
    b.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let gone = a.received_from(b_addr);
    let _ = a.send_datagram(b_addr, Bytes::from_static(&[7]));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = a.received_from(b_addr);
    assert!(
        after.is_none() || after == gone,
        "a closed peer acknowledged nothing: {gone:?} then {after:?}"
    );
    // A client-only endpoint ignores datagrams (none answered, nothing breaks).
    let a_addr = a.local_addr().unwrap();
    let c = client(&ca, limits);
    c.call(a_addr, Bytes::from_static(b"hi")).await.unwrap();
    c.send_datagram(a_addr, Bytes::from_static(&[6])).unwrap();
    let back = c.call(a_addr, Bytes::from_static(b"still")).await.unwrap();
    assert_eq!(&back[..], b"still");
    a.close().await;
    assert!(matches!(
        a.send_datagram(b_addr, Bytes::from_static(&[2])),
        Err(TransportError::EndpointClosed)
    ));
}
