//! The crate's error type.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Which half of a call a frame-size error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// The request sent by the caller.
    Request,
    /// The response sent back by the handler.
    Response,
}

impl fmt::Display for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Frame::Request => "request",
            Frame::Response => "response",
        })
    }
}

/// Everything that can go wrong in the transport: configuration, certificates, dialling and calls.
#[derive(thiserror::Error, Debug)]
pub enum TransportError {
    /// A local I/O operation failed.
    #[error("transport I/O error: {0}")]
    Io(#[from] std::io::Error),

    /// The UDP socket could not be bound.
    #[error("cannot bind the QUIC endpoint on {addr}: {source}")]
    Bind {
        /// The address we tried to bind.
        addr: SocketAddr,
        /// The operating system's error.
        source: std::io::Error,
    },

    /// The limits passed to the endpoint are unusable.
    #[error("invalid transport limits: {reason}")]
    InvalidLimits {
        /// What is wrong with them.
        reason: String,
    },

    /// The TLS (rustls/QUIC crypto) configuration could not be built.
    #[error("invalid TLS configuration: {reason}")]
    TlsConfig {
        /// The cause, as reported by rustls or quinn.
        reason: String,
    },

    /// A certificate or key could not be generated or signed.
    #[error("certificate generation failed: {reason}")]
    CertGeneration {
        /// The cause.
        reason: String,
    },

    /// In-memory PEM text (a certificate or key) is unusable.
    #[error("invalid {what}: {reason}")]
    InvalidPem {
        /// Which item was being parsed, e.g. "CA certificate PEM".
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// A PEM file could not be read (missing, unreadable).
    #[error("cannot read {}: {source}", path.display())]
    FileRead {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },

    /// A file that should hold PEM text does not.
    #[error("{} is not a PEM file: {reason}", path.display())]
    NotPem {
        /// The file.
        path: PathBuf,
        /// Why it is not PEM.
        reason: String,
    },

    /// A PEM file holds no `CERTIFICATE` section.
    #[error("{} contains no PEM CERTIFICATE section", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },

    /// A PEM file holds no private key section.
    #[error(
        "{} contains no PEM private key section (PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY)",
        path.display()
    )]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },

    /// Dialling a peer failed (unreachable, handshake refused, certificate rejected, ...).
    #[error("cannot connect to {peer}: {reason}")]
    Connect {
        /// The peer.
        peer: SocketAddr,
        /// The cause.
        reason: String,
    },

    /// The QUIC handshake with a peer did not finish within the connect timeout.
    #[error("connecting to {peer} timed out after {ms} ms (no QUIC handshake completed)")]
    ConnectTimeout {
        /// The peer.
        peer: SocketAddr,
        /// The connect timeout in milliseconds.
        ms: u64,
    },

    /// A call did not complete within its timeout.
    #[error("call to {peer} timed out after {ms} ms")]
    Timeout {
        /// The peer.
        peer: SocketAddr,
        /// The call timeout in milliseconds.
        ms: u64,
    },

    /// A request or response exceeded a frame size limit (ours, or the peer's for requests).
    #[error(
        "{} {peer} exceeds the frame size limit of {bytes_max} bytes",
        match frame { Frame::Request => "request to", Frame::Response => "response from" }
    )]
    FrameTooLarge {
        /// The peer.
        peer: SocketAddr,
        /// Which frame was too large.
        frame: Frame,
        /// The limit that was exceeded.
        bytes_max: usize,
    },

    /// The connection to the peer was lost while a call used it.
    #[error("connection to {peer} lost: {reason}")]
    ConnectionLost {
        /// The peer.
        peer: SocketAddr,
        /// The cause, as reported by QUIC.
        reason: String,
    },

    /// The call's stream was aborted by the peer (e.g. its handler failed or it is shutting down).
    #[error("call to {peer} aborted: {reason}")]
    StreamClosed {
        /// The peer.
        peer: SocketAddr,
        /// Why.
        reason: String,
    },

    /// The endpoint has been closed; no further calls are possible.
    #[error("the transport endpoint is closed")]
    EndpointClosed,

    /// A datagram could not be sent to `peer`: no connection is open to it (datagrams never
    /// dial), it is larger than [`crate::DATAGRAM_BYTES_MAX`] or the connection allows, or
    /// the peer does not take datagrams.
    #[error("datagram to {peer} not sent: {reason}")]
    DatagramNotSent {
        /// The peer.
        peer: SocketAddr,
        /// Why.
        reason: String,
    },
}
