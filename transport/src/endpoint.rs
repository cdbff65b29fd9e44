//! The QUIC RPC endpoint: serves incoming calls and makes outgoing ones over one cached
//! connection per peer.
//!
//! Wire protocol: one call is one bidirectional QUIC stream. The caller writes the request and
//! finishes its send side; the server reads it (at most `frame_bytes_max` bytes), runs the
//! handler and writes the response, then finishes. Failures travel as stream reset/stop codes,
//! see [`code`].

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use parking_lot::Mutex;
use quinn::{Connection, ConnectionError, ReadError, ReadToEndError, VarInt, WriteError};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::config::quic_configs;
use crate::error::{Frame, TransportError};
use crate::pki::{TlsIdentity, NODE_SERVER_NAME};
use crate::{Handler, PeerInfo, TransportLimits};

/// Stream reset/stop and connection close codes.
mod code {
    /// The call was abandoned (caller timed out or went away); also a normal connection close.
    pub(super) const CANCELLED: u32 = 0;
    /// The server's handler panicked.
    pub(super) const HANDLER_FAILED: u32 = 1;
    /// The endpoint is closing.
    pub(super) const CLOSING: u32 = 2;
    /// The request exceeded the server's frame limit; the limit is added to this base.
    pub(super) const REQUEST_TOO_LARGE: u64 = 1 << 60;
    /// The response exceeded the server's frame limit; the limit is added to this base.
    pub(super) const RESPONSE_TOO_LARGE: u64 = 1 << 61;
    /// Largest limit that fits in the codes above.
    pub(super) const LIMIT_MAX: u64 = (1 << 60) - 1;
}

/// How long [`Endpoint::close`] waits for connections to drain.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Error code telling the peer that a frame exceeded `limit`.
fn frame_code(base: u64, limit: usize) -> VarInt {
    let limit = u64::try_from(limit)
        .unwrap_or(u64::MAX)
        .min(code::LIMIT_MAX);
    VarInt::from_u64(base + limit).unwrap_or(VarInt::from_u32(code::CANCELLED))
}

/// Turns a stream reset/stop code received from `peer` into an error.
fn error_from_code(peer: SocketAddr, code: VarInt) -> TransportError {
    let code = code.into_inner();
    let limit = |base: u64| usize::try_from(code - base).unwrap_or(usize::MAX);
    if (code::RESPONSE_TOO_LARGE..=code::RESPONSE_TOO_LARGE + code::LIMIT_MAX).contains(&code) {
        TransportError::FrameTooLarge {
            peer,
            frame: Frame::Response,
            bytes_max: limit(code::RESPONSE_TOO_LARGE),
        }
    } else if (code::REQUEST_TOO_LARGE..=code::REQUEST_TOO_LARGE + code::LIMIT_MAX).contains(&code)
    {
        TransportError::FrameTooLarge {
            peer,
            frame: Frame::Request,
            bytes_max: limit(code::REQUEST_TOO_LARGE),
        }
    } else {
        let reason = match u32::try_from(code) {
            Ok(code::HANDLER_FAILED) => "the peer's request handler failed".to_owned(),
            Ok(code::CLOSING) => "the peer is shutting down".to_owned(),
            _ => format!("the peer reset the stream with error code {code}"),
        };
        TransportError::StreamClosed { peer, reason }
    }
}

/// For the fuzzers: [`error_from_code`] of a code received from a peer.
#[cfg(feature = "fuzzing")]
pub(crate) fn reset_code_error(code: u64) -> Option<TransportError> {
    let code = VarInt::from_u64(code).ok()?;
    Some(error_from_code(SocketAddr::from(([127, 0, 0, 1], 0)), code))
}

/// A send stream that is reset (not finished) if dropped before [`ResetOnDrop::finish`], so a
/// cancelled write never delivers a truncated message that looks complete.
struct ResetOnDrop(Option<quinn::SendStream>);

impl ResetOnDrop {
    fn stream(&mut self) -> Option<&mut quinn::SendStream> {
        self.0.as_mut()
    }

    /// Finishes the stream: everything written will be delivered.
    fn finish(mut self) {
        if let Some(mut stream) = self.0.take() {
            // Fails only if the peer already stopped the stream; the reader learns why.
            let _ = stream.finish();
        }
    }

    /// Resets the stream with `code`.
    fn reset(mut self, code: VarInt) {
        if let Some(mut stream) = self.0.take() {
            let _ = stream.reset(code);
        }
    }
}

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if let Some(stream) = self.0.as_mut() {
            let _ = stream.reset(VarInt::from_u32(code::CANCELLED));
        }
    }
}

/// Outcome of the last failed dial, replayed to callers that queued behind it.
struct DialFailure {
    at: Instant,
    error: TransportError,
}

/// A copy of a dial error (dial errors carry no non-cloneable sources except `Bind`/`Io`).
fn duplicate_dial_error(peer: SocketAddr, e: &TransportError) -> TransportError {
    match e {
        TransportError::ConnectTimeout { peer, ms } => TransportError::ConnectTimeout {
            peer: *peer,
            ms: *ms,
        },
        TransportError::EndpointClosed => TransportError::EndpointClosed,
        other => TransportError::Connect {
            peer,
            reason: match other {
                TransportError::Connect { reason, .. } => reason.clone(),
                other => other.to_string(),
            },
        },
    }
}

/// What one open connection has received: see [`Endpoint::received_from`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// The connection (stable while it is open; another connection has another id).
    pub connection: usize,
    /// UDP datagrams received on it since it opened.
    pub packets: u64,
}

/// The cached connection to one peer address, and the lock serialising dials to it.
#[derive(Default)]
struct PeerSlot {
    connection: Mutex<Option<Connection>>,
    dial: tokio::sync::Mutex<Option<DialFailure>>,
}

impl PeerSlot {
    /// The cached connection if it is still open; a closed one is dropped from the cache.
    fn live(&self) -> Option<Connection> {
        let mut slot = self.connection.lock();
        match slot.as_ref() {
            Some(connection) if connection.close_reason().is_none() => Some(connection.clone()),
            Some(_) => {
                *slot = None;
                None
            }
            None => None,
        }
    }

    /// Drops `connection` from the cache (if it is still the cached one).
    fn forget(&self, connection: &Connection) {
        let mut slot = self.connection.lock();
        if slot.as_ref().map(Connection::stable_id) == Some(connection.stable_id()) {
            *slot = None;
        }
    }
}

struct Inner {
    /// The endpoint bound at construction: serves (if `bind`) and dials peers of its family.
    quinn: quinn::Endpoint,
    /// Lazily bound client endpoint for peers of the other address family.
    other_family: Mutex<Option<quinn::Endpoint>>,
    client_config: quinn::ClientConfig,
    limits: TransportLimits,
    peers: Mutex<HashMap<SocketAddr, Arc<PeerSlot>>>,
    closed: AtomicBool,
    accept_task: Mutex<Option<JoinHandle<()>>>,
    /// Answers datagrams on dialled connections too (accepted ones get it from the accept
    /// loop); `None` for a client-only endpoint, which ignores datagrams, and after
    /// [`Endpoint::close`] (a handler often holds what holds this endpoint: the cycle ends
    /// there).
    handler: Mutex<Option<Arc<dyn Handler>>>,
}

impl Inner {
    fn quinn_endpoints(&self) -> Vec<quinn::Endpoint> {
        let mut endpoints = vec![self.quinn.clone()];
        endpoints.extend(self.other_family.lock().clone());
        endpoints
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Stops the accept loop and releases the sockets once connections drain.
        for endpoint in self.quinn_endpoints() {
            endpoint.close(VarInt::from_u32(code::CLOSING), b"endpoint dropped");
        }
    }
}

/// A QUIC RPC endpoint. Cheap to clone; all clones share the same sockets and connections.
///
/// Outgoing calls to one peer address share a single cached connection, opened on first use
/// and re-dialled after it fails.
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("local_addr", &self.inner.quinn.local_addr().ok())
            .field("connections", &self.connection_count())
            .finish()
    }
}

impl Endpoint {
    /// Binds `listen` and starts serving calls with `handler`; the endpoint can also make calls.
    ///
    /// Must be called from within a Tokio runtime.
    pub fn bind(
        listen: SocketAddr,
        identity: &TlsIdentity,
        limits: TransportLimits,
        handler: Arc<dyn Handler>,
    ) -> Result<Self, TransportError> {
        let runtime = current_runtime()?;
        let configs = quic_configs(identity, &limits)?;
        let mut endpoint = quic_endpoint(configs.endpoint, Some(configs.server), listen)?;
        endpoint.set_default_client_config(configs.client.clone());
        let accept_task = runtime.spawn(accept_loop(endpoint.clone(), handler.clone(), limits));
        Ok(Self::new(
            endpoint,
            configs.client,
            limits,
            Some(accept_task),
            Some(handler),
        ))
    }

    /// Creates an endpoint that only makes calls (bound to `0.0.0.0:0`; IPv6 peers get their
    /// own lazily bound socket). It accepts no incoming connections.
    ///
    /// Must be called from within a Tokio runtime.
    pub fn client_only(
        identity: &TlsIdentity,
        limits: TransportLimits,
    ) -> Result<Self, TransportError> {
        current_runtime()?;
        let configs = quic_configs(identity, &limits)?;
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        let mut endpoint = quic_endpoint(configs.endpoint, None, addr)?;
        endpoint.set_default_client_config(configs.client.clone());
        Ok(Self::new(endpoint, configs.client, limits, None, None))
    }

    fn new(
        quinn: quinn::Endpoint,
        client_config: quinn::ClientConfig,
        limits: TransportLimits,
        accept_task: Option<JoinHandle<()>>,
        handler: Option<Arc<dyn Handler>>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                quinn,
                other_family: Mutex::new(None),
                client_config,
                limits,
                peers: Mutex::new(HashMap::new()),
                closed: AtomicBool::new(false),
                accept_task: Mutex::new(accept_task),
                handler: Mutex::new(handler),
            }),
        }
    }

    /// The local address of the endpoint's (main) socket.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        Ok(self.inner.quinn.local_addr()?)
    }

    /// The limits this endpoint was built with.
    pub fn limits(&self) -> &TransportLimits {
        &self.inner.limits
    }

    /// Number of open outgoing connections in the cache (at most one per peer address).
    pub fn connection_count(&self) -> usize {
        let slots: Vec<Arc<PeerSlot>> = self.inner.peers.lock().values().cloned().collect();
        slots.iter().filter(|slot| slot.live().is_some()).count()
    }

    /// Sends `request` to `peer` and returns its response, within the default call timeout
    /// ([`TransportLimits::call_timeout_ms`]).
    pub async fn call(&self, peer: SocketAddr, request: Bytes) -> Result<Bytes, TransportError> {
        let timeout = Duration::from_millis(self.inner.limits.call_timeout_ms);
        self.call_with_timeout(peer, request, timeout).await
    }

    /// Sends `request` to `peer` and returns its response, within `timeout` (which includes
    /// dialling the peer if no connection is open).
    pub async fn call_with_timeout(
        &self,
        peer: SocketAddr,
        request: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        if self.is_closed() {
            return Err(TransportError::EndpointClosed);
        }
        let bytes_max = self.inner.limits.frame_bytes_max;
        if request.len() > bytes_max {
            return Err(TransportError::FrameTooLarge {
                peer,
                frame: Frame::Request,
                bytes_max,
            });
        }
        match tokio::time::timeout(timeout, self.call_once(peer, request)).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Timeout {
                peer,
                ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }

    /// Sends `datagram` to `peer` on the open connection to it: unreliable (it may be lost,
    /// and nothing says whether it arrived), at most [`crate::DATAGRAM_BYTES_MAX`] bytes. It
    /// never dials: with no open connection (none yet, or it failed) it is not sent, and a
    /// [`Self::call`] opens one.
    pub fn send_datagram(&self, peer: SocketAddr, datagram: Bytes) -> Result<(), TransportError> {
        let not_sent = |reason: String| TransportError::DatagramNotSent { peer, reason };
        if self.is_closed() {
            return Err(TransportError::EndpointClosed);
        }
        if datagram.len() > crate::DATAGRAM_BYTES_MAX {
            return Err(not_sent(format!(
                "{} bytes, more than {}",
                datagram.len(),
                crate::DATAGRAM_BYTES_MAX
            )));
        }
        let slot = self.inner.peers.lock().get(&peer).cloned();
        let Some(connection) = slot.as_deref().and_then(PeerSlot::live) else {
            return Err(not_sent("no open connection".to_owned()));
        };
        connection
            .send_datagram(datagram)
            .map_err(|e| not_sent(e.to_string()))
    }

    /// What the open connection to `peer` has received so far, without dialling: `None`
    /// with no open connection. Every datagram sent is acknowledged by the peer's QUIC
    /// stack within its ACK delay, so a count that grows after a [`Self::send_datagram`]
    /// says the peer's process runs and reaches us, with no answer of its own (the caller
    /// compares counts of the same [`Received::connection`] only: a new connection, to a
    /// restarted peer perhaps, starts again from zero).
    pub fn received_from(&self, peer: SocketAddr) -> Option<Received> {
        let slot = self.inner.peers.lock().get(&peer).cloned()?;
        let connection = slot.live()?;
        Some(Received {
            connection: connection.stable_id(),
            packets: connection.stats().udp_rx.datagrams,
        })
    }

    /// Closes all connections and the endpoint (in-flight calls fail), then waits a bounded
    /// time for connections to drain. The socket is released once every clone is dropped.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.handler.lock().take();
        let slots: Vec<Arc<PeerSlot>> = self
            .inner
            .peers
            .lock()
            .drain()
            .map(|(_, slot)| slot)
            .collect();
        for slot in slots {
            if let Some(connection) = slot.connection.lock().take() {
                connection.close(VarInt::from_u32(code::CLOSING), b"endpoint closing");
            }
        }
        let endpoints = self.inner.quinn_endpoints();
        for endpoint in &endpoints {
            endpoint.close(VarInt::from_u32(code::CLOSING), b"endpoint closing");
        }
        let accept_task = self.inner.accept_task.lock().take();
        let drained = tokio::time::timeout(CLOSE_WAIT, async {
            for endpoint in &endpoints {
                endpoint.wait_idle().await;
            }
            if let Some(task) = accept_task {
                let _ = task.await;
            }
        })
        .await;
        if drained.is_err() {
            debug!("endpoint close: connections still draining after {CLOSE_WAIT:?}");
        }
    }

    fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// One call, without the overall timeout.
    async fn call_once(&self, peer: SocketAddr, request: Bytes) -> Result<Bytes, TransportError> {
        let slot = self.slot(peer);
        let mut connection = self.connection(peer, &slot).await?;
        let (send, mut recv) = match connection.open_bi().await {
            Ok(streams) => streams,
            Err(e) => {
                // Nothing was sent on the dead connection, so one re-dial is safe.
                debug!(%peer, error = %e, "cached connection is unusable; re-dialling");
                slot.forget(&connection);
                connection = self.connection(peer, &slot).await?;
                connection
                    .open_bi()
                    .await
                    .map_err(|e| connection_lost(peer, &slot, &connection, &e))?
            }
        };
        let mut send = ResetOnDrop(Some(send));
        if let Some(stream) = send.stream() {
            if let Err(e) = stream.write_chunk(request).await {
                return Err(match e {
                    WriteError::Stopped(code) => error_from_code(peer, code),
                    WriteError::ConnectionLost(e) => connection_lost(peer, &slot, &connection, &e),
                    other => TransportError::StreamClosed {
                        peer,
                        reason: format!("cannot send the request: {other}"),
                    },
                });
            }
        }
        send.finish();
        match recv.read_to_end(self.inner.limits.frame_bytes_max).await {
            Ok(response) => Ok(Bytes::from(response)),
            Err(ReadToEndError::TooLong) => Err(TransportError::FrameTooLarge {
                peer,
                frame: Frame::Response,
                bytes_max: self.inner.limits.frame_bytes_max,
            }),
            Err(ReadToEndError::Read(e)) => Err(match e {
                ReadError::Reset(code) => error_from_code(peer, code),
                ReadError::ConnectionLost(e) => connection_lost(peer, &slot, &connection, &e),
                other => TransportError::StreamClosed {
                    peer,
                    reason: format!("cannot read the response: {other}"),
                },
            }),
        }
    }

    /// The slot for `peer`, created on first use.
    fn slot(&self, peer: SocketAddr) -> Arc<PeerSlot> {
        self.inner.peers.lock().entry(peer).or_default().clone()
    }

    /// The open connection to `peer`, dialled if needed. Concurrent callers wait for a single
    /// dial; callers that queued behind a failed dial get its error instead of dialling again.
    async fn connection(
        &self,
        peer: SocketAddr,
        slot: &PeerSlot,
    ) -> Result<Connection, TransportError> {
        if let Some(connection) = slot.live() {
            return Ok(connection);
        }
        let queued_at = Instant::now();
        let mut last_failure = slot.dial.lock().await;
        if let Some(connection) = slot.live() {
            return Ok(connection);
        }
        if self.is_closed() {
            return Err(TransportError::EndpointClosed);
        }
        if let Some(failure) = last_failure.as_ref().filter(|f| f.at >= queued_at) {
            return Err(duplicate_dial_error(peer, &failure.error));
        }
        match self.dial(peer).await {
            Ok(connection) => {
                *slot.connection.lock() = Some(connection.clone());
                *last_failure = None;
                Ok(connection)
            }
            Err(error) => {
                *last_failure = Some(DialFailure {
                    at: Instant::now(),
                    error: duplicate_dial_error(peer, &error),
                });
                Err(error)
            }
        }
    }

    /// Opens a new connection to `peer`, bounded by the connect timeout.
    async fn dial(&self, peer: SocketAddr) -> Result<Connection, TransportError> {
        let endpoint = self.endpoint_for(peer)?;
        let connecting = endpoint
            .connect(peer, NODE_SERVER_NAME)
            .map_err(|e| match e {
                quinn::ConnectError::EndpointStopping => TransportError::EndpointClosed,
                other => TransportError::Connect {
                    peer,
                    reason: other.to_string(),
                },
            })?;
        let ms = self.inner.limits.connect_timeout_ms;
        match tokio::time::timeout(Duration::from_millis(ms), connecting).await {
            Ok(Ok(connection)) => {
                debug!(%peer, "connected");
                let handler = self.inner.handler.lock().clone();
                if let Some(handler) = handler {
                    tokio::spawn(read_datagrams(
                        connection.clone(),
                        handler,
                        PeerInfo { remote: peer },
                    ));
                }
                Ok(connection)
            }
            Ok(Err(e)) => Err(TransportError::Connect {
                peer,
                reason: describe_connection_error(&e),
            }),
            Err(_) => Err(TransportError::ConnectTimeout { peer, ms }),
        }
    }

    /// The quinn endpoint to dial `peer` from: the main one unless `peer` is of the other
    /// address family (a wildcard IPv6 socket is dual-stack and reaches IPv4 peers too).
    fn endpoint_for(&self, peer: SocketAddr) -> Result<quinn::Endpoint, TransportError> {
        let local = self.inner.quinn.local_addr()?;
        let dual_stack = local.is_ipv6() && local.ip().is_unspecified();
        if local.is_ipv4() == peer.is_ipv4() || dual_stack {
            return Ok(self.inner.quinn.clone());
        }
        let mut other = self.inner.other_family.lock();
        if let Some(endpoint) = other.as_ref() {
            return Ok(endpoint.clone());
        }
        let addr = if peer.is_ipv4() {
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
        } else {
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
        };
        let mut endpoint = quinn::Endpoint::client(addr)
            .map_err(|source| TransportError::Bind { addr, source })?;
        endpoint.set_default_client_config(self.inner.client_config.clone());
        *other = Some(endpoint.clone());
        Ok(endpoint)
    }
}

/// A quinn endpoint on a UDP socket bound to `addr`, with our endpoint configuration
/// (stateless resets that survive a restart: see `config::endpoint_config`).
fn quic_endpoint(
    config: quinn::EndpointConfig,
    server: Option<quinn::ServerConfig>,
    addr: SocketAddr,
) -> Result<quinn::Endpoint, TransportError> {
    let socket =
        std::net::UdpSocket::bind(addr).map_err(|source| TransportError::Bind { addr, source })?;
    let runtime = quinn::default_runtime().ok_or_else(|| {
        TransportError::Io(std::io::Error::other(
            "no async runtime for the QUIC endpoint",
        ))
    })?;
    quinn::Endpoint::new(config, server, socket, runtime)
        .map_err(|source| TransportError::Bind { addr, source })
}

/// The current Tokio runtime, or a clear error.
fn current_runtime() -> Result<tokio::runtime::Handle, TransportError> {
    tokio::runtime::Handle::try_current().map_err(|_| {
        TransportError::Io(std::io::Error::other(
            "the transport endpoint must be created from within a Tokio runtime",
        ))
    })
}

/// Whether a QUIC error code carries a TLS alert.
fn is_tls_failure(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

/// Renders a connection error, hinting at the usual cause of TLS failures.
fn describe_connection_error(e: &ConnectionError) -> String {
    match e {
        ConnectionError::TransportError(t) if is_tls_failure(t.code) => {
            format!("{e} (we refused the peer's TLS handshake: is its certificate from our cluster CA?)")
        }
        ConnectionError::ConnectionClosed(c) if is_tls_failure(c.error_code) => {
            format!(
                "{e} (the peer refused our TLS handshake: is our certificate from its cluster CA?)"
            )
        }
        _ => e.to_string(),
    }
}

/// Drops a failed connection from the cache and reports the loss.
fn connection_lost(
    peer: SocketAddr,
    slot: &PeerSlot,
    connection: &Connection,
    e: &ConnectionError,
) -> TransportError {
    slot.forget(connection);
    TransportError::ConnectionLost {
        peer,
        reason: describe_connection_error(e),
    }
}

/// Accepts connections until the endpoint closes; each is served by its own task.
async fn accept_loop(
    endpoint: quinn::Endpoint,
    handler: Arc<dyn Handler>,
    limits: TransportLimits,
) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(serve_connection(incoming, handler.clone(), limits));
    }
    debug!("accept loop stopped: endpoint closed");
}

/// Completes the handshake with one client, then serves each of its streams in its own task.
async fn serve_connection(
    incoming: quinn::Incoming,
    handler: Arc<dyn Handler>,
    limits: TransportLimits,
) {
    let remote = incoming.remote_address();
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(e) => {
            warn!(%remote, error = %describe_connection_error(&e), "refused incoming connection: QUIC/TLS handshake failed");
            return;
        }
    };
    let peer = PeerInfo { remote };
    debug!(%remote, "accepted connection");
    tokio::spawn(read_datagrams(
        connection.clone(),
        handler.clone(),
        peer.clone(),
    ));
    loop {
        match connection.accept_bi().await {
            Ok((send, recv)) => {
                tokio::spawn(serve_stream(
                    handler.clone(),
                    peer.clone(),
                    limits.frame_bytes_max,
                    send,
                    recv,
                ));
            }
            Err(
                e @ (ConnectionError::ApplicationClosed(_)
                | ConnectionError::LocallyClosed
                | ConnectionError::TimedOut
                | ConnectionError::Reset),
            ) => {
                debug!(%remote, reason = %e, "connection ended");
                return;
            }
            Err(e) => {
                warn!(%remote, error = %describe_connection_error(&e), "connection failed");
                return;
            }
        }
    }
}

/// Hands each datagram received on `connection` to the handler, and sends its answer back
/// on the same connection; ends with the connection. Oversized datagrams are dropped; a
/// handler that panics loses that datagram only.
async fn read_datagrams(connection: Connection, handler: Arc<dyn Handler>, peer: PeerInfo) {
    while let Ok(datagram) = connection.read_datagram().await {
        if datagram.len() > crate::DATAGRAM_BYTES_MAX {
            debug!(remote = %peer.remote, bytes = datagram.len(), "oversized datagram dropped");
            continue;
        }
        let answer =
            std::panic::catch_unwind(AssertUnwindSafe(|| handler.datagram(&peer, datagram)));
        match answer {
            Ok(Some(answer)) if answer.len() <= crate::DATAGRAM_BYTES_MAX => {
                // Unreliable by contract: a full send buffer or a closing connection drops it.
                let _ = connection.send_datagram(answer);
            }
            Ok(Some(answer)) => {
                warn!(remote = %peer.remote, bytes = answer.len(), "datagram answer too large; not sent");
            }
            Ok(None) => {}
            Err(_) => warn!(remote = %peer.remote, "datagram handler panicked; datagram dropped"),
        }
    }
}

/// Serves one call: read the request, run the handler, write the response.
async fn serve_stream(
    handler: Arc<dyn Handler>,
    peer: PeerInfo,
    frame_bytes_max: usize,
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let remote = peer.remote;
    let mut send = ResetOnDrop(Some(send));
    let request = match recv.read_to_end(frame_bytes_max).await {
        Ok(request) => Bytes::from(request),
        Err(ReadToEndError::TooLong) => {
            debug!(%remote, frame_bytes_max, "request exceeds the frame size limit; refusing it");
            let code = frame_code(code::REQUEST_TOO_LARGE, frame_bytes_max);
            let _ = recv.stop(code);
            send.reset(code);
            return;
        }
        Err(ReadToEndError::Read(e)) => {
            debug!(%remote, error = %e, "could not read request");
            return;
        }
    };
    drop(recv);
    let handled = AssertUnwindSafe(async move { handler.handle(peer, request).await })
        .catch_unwind()
        .await;
    let response = match handled {
        Ok(response) => response,
        Err(_) => {
            warn!(%remote, "request handler panicked; aborting the call");
            send.reset(VarInt::from_u32(code::HANDLER_FAILED));
            return;
        }
    };
    if response.len() > frame_bytes_max {
        warn!(%remote, bytes = response.len(), frame_bytes_max, "response exceeds the frame size limit; aborting the call");
        send.reset(frame_code(code::RESPONSE_TOO_LARGE, frame_bytes_max));
        return;
    }
    if let Some(stream) = send.stream() {
        if let Err(e) = stream.write_chunk(response).await {
            debug!(%remote, error = %e, "could not send response");
            return;
        }
    }
    send.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_codes_round_trip() {
        let peer = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
        let e = error_from_code(peer, frame_code(code::REQUEST_TOO_LARGE, 1024));
        assert!(matches!(
            e,
            TransportError::FrameTooLarge {
                frame: Frame::Request,
                bytes_max: 1024,
                ..
            }
        ));
        let e = error_from_code(peer, frame_code(code::RESPONSE_TOO_LARGE, usize::MAX));
        assert!(matches!(
            e,
            TransportError::FrameTooLarge {
                frame: Frame::Response,
                ..
            }
        ));
        let e = error_from_code(peer, VarInt::from_u32(code::HANDLER_FAILED));
        assert!(e.to_string().contains("handler failed"), "{e}");
    }
}
