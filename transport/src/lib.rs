//! Node-to-node RPC over QUIC with mutual TLS under a cluster CA.
//!
//! The transport moves opaque request bytes to a peer and response bytes back; it knows nothing
//! about what they mean. Every endpoint presents a certificate signed by the cluster CA
//! ([`pki::ClusterCa`]) and accepts only peers whose certificate is signed by that CA.
//!
//! * [`Endpoint::bind`] serves calls with a [`Handler`] and can make calls;
//!   [`Endpoint::client_only`] only makes calls.
//! * All calls to one peer address share one cached QUIC connection; each call is one
//!   bidirectional stream carrying the request one way and the response back.
//! * Requests and responses are limited to [`TransportLimits::frame_bytes_max`] bytes.
//! * Datagrams ([`Endpoint::send_datagram`], [`Handler::datagram`]): unreliable, at most
//!   [`DATAGRAM_BYTES_MAX`] bytes, sent only on an open connection; a handler may answer one
//!   with one datagram on the same connection. For signals that are cheap to lose and must
//!   be cheap to send (liveness pings): no stream, no task per message.

use std::net::SocketAddr;

use bytes::Bytes;
use futures::future::BoxFuture;

mod config;
mod endpoint;
mod error;
pub mod pki;

pub use endpoint::{Endpoint, Received};
pub use error::{Frame, TransportError};
pub use pki::{ClusterCa, NodeCert, TlsIdentity};

/// Largest datagram sent or handled, in bytes; larger incoming ones are dropped unread.
pub const DATAGRAM_BYTES_MAX: usize = 1_024;

/// Bytes of datagrams a connection buffers, each way (received but not yet handled, or
/// queued to send); past it the oldest are dropped (they are unreliable by contract).
pub const DATAGRAM_BUFFER_BYTES_MAX: usize = 64 * 1024;

/// Sizes, timeouts and concurrency limits of an [`Endpoint`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransportLimits {
    /// Largest request or response, in bytes (default 64 MiB).
    pub frame_bytes_max: usize,
    /// How long dialling a peer (QUIC + TLS handshake) may take, in ms (default 2000).
    pub connect_timeout_ms: u64,
    /// Default timeout of [`Endpoint::call`], dial included, in ms (default 5000).
    pub call_timeout_ms: u64,
    /// Concurrent calls (streams) a peer may have open on one connection (default 1024);
    /// further calls wait for a free stream.
    pub concurrent_streams_max: u32,
    /// A connection with no traffic for this long is closed, in ms (default 10000);
    /// the dialling side sends keep-alives at a third of it.
    pub idle_timeout_ms: u64,
}

impl Default for TransportLimits {
    fn default() -> Self {
        Self {
            frame_bytes_max: 64 * 1024 * 1024,
            connect_timeout_ms: 2000,
            call_timeout_ms: 5000,
            concurrent_streams_max: 1024,
            idle_timeout_ms: 10_000,
        }
    }
}

/// Who made an incoming call (its certificate was verified against the cluster CA).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// The caller's UDP address.
    pub remote: SocketAddr,
}

/// Serves incoming calls: turns a request into a response.
///
/// Each call runs in its own task. A handler that panics aborts only its call (the caller gets
/// [`TransportError::StreamClosed`]). Closures of the right shape implement this trait.
pub trait Handler: Send + Sync + 'static {
    /// Handles one request from `peer`.
    fn handle(&self, peer: PeerInfo, request: Bytes) -> BoxFuture<'static, Bytes>;

    /// Handles one datagram from `peer` (at most [`DATAGRAM_BYTES_MAX`] bytes) on the
    /// connection's reader, so it must be quick and must not block; what it returns is sent
    /// back on the same connection as one datagram. By default datagrams are ignored.
    fn datagram(&self, peer: &PeerInfo, datagram: Bytes) -> Option<Bytes> {
        let _ = (peer, datagram);
        None
    }
}

impl<F> Handler for F
where
    F: Fn(PeerInfo, Bytes) -> BoxFuture<'static, Bytes> + Send + Sync + 'static,
{
    fn handle(&self, peer: PeerInfo, request: Bytes) -> BoxFuture<'static, Bytes> {
        self(peer, request)
    }
}

/// Entry points for the fuzzers (`fuzz/`) into the parsers of bytes a peer or a file
/// controls; not an API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    /// What the CA loader reads of a CA certificate (DER): its subject name, basic
    /// constraints, key usages and key identifier (rcgen over x509-parser). Always `Some`
    /// (the `Option` is kept for the fuzz target's signature).
    pub fn subject_name(cert_der: &[u8]) -> Option<Result<(), String>> {
        Some(crate::pki::parse_ca_cert(cert_der))
    }

    /// The error a stream reset or stop with `code` from a peer turns into (`None` if
    /// `code` is not a QUIC varint).
    pub fn reset_code_error(code: u64) -> Option<crate::TransportError> {
        crate::endpoint::reset_code_error(code)
    }
}
