//! Building the rustls and quinn configurations from a [`TlsIdentity`] and [`TransportLimits`].

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::error::TransportError;
use crate::pki::{ParsedIdentity, TlsIdentity};
use crate::TransportLimits;

/// The one ALPN protocol spoken by chatd endpoints.
pub(crate) const ALPN: &[u8] = b"chatd/1";

/// Per-stream receive window: large enough for high throughput on one stream.
const STREAM_RECEIVE_WINDOW: u32 = 8 * 1024 * 1024;
/// Per-connection receive window (all streams together), also used as the send window.
const CONNECTION_RECEIVE_WINDOW: u32 = 32 * 1024 * 1024;

/// The QUIC configurations of an endpoint.
pub(crate) struct QuicConfigs {
    pub(crate) server: quinn::ServerConfig,
    pub(crate) client: quinn::ClientConfig,
    pub(crate) endpoint: quinn::EndpointConfig,
}

/// Length of the connection ids an endpoint issues.
const CID_BYTES: usize = 8;

/// Issues random connection ids and treats any id as possibly one of its own.
///
/// quinn's default signs its ids with a key that dies with the process, so a restarted
/// node silently drops the packets of connections its previous process had, and each peer
/// waits for its idle timeout before it reconnects. With this generator (and a reset key
/// that outlives the process, see [`endpoint_config`]) the restarted node answers such a
/// packet with a stateless reset that the peer accepts: the stale connection ends at once
/// and the peer's next call opens a new one.
struct RestartableCids;

impl quinn::ConnectionIdGenerator for RestartableCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut bytes = [0u8; CID_BYTES];
        // The system RNG does not fail on Linux; an all-zero id would still be valid.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
        quinn::ConnectionId::new(&bytes)
    }
    fn cid_len(&self) -> usize {
        CID_BYTES
    }
    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The endpoint configuration: a stateless-reset key derived from the node's private key,
/// so a restarted process of the same node produces the reset tokens its predecessor
/// issued, and connection ids any process of the node accepts as its own.
pub(crate) fn endpoint_config(private_key_der: &[u8]) -> quinn::EndpointConfig {
    let mut material = b"chatd stateless reset key v1\0".to_vec();
    material.extend_from_slice(private_key_der);
    let digest = ring::digest::digest(&ring::digest::SHA256, &material);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, digest.as_ref());
    let mut config = quinn::EndpointConfig::new(Arc::new(key));
    config.cid_generator(|| Box::new(RestartableCids));
    config
}

fn tls_error(context: &str, e: impl std::fmt::Display) -> TransportError {
    TransportError::TlsConfig {
        reason: format!("{context}: {e}"),
    }
}

/// Checks the limits and turns them into a quinn transport configuration. Only the dialling
/// side sends keep-alives (`keep_alive`): the accepting side's idle timer is reset by them
/// all the same, and an idle connection costs half the packets and wake-ups.
pub(crate) fn transport_config(
    limits: &TransportLimits,
    keep_alive: bool,
) -> Result<TransportConfig, TransportError> {
    fn invalid<T>(reason: &str) -> Result<T, TransportError> {
        Err(TransportError::InvalidLimits {
            reason: reason.to_owned(),
        })
    }
    if limits.frame_bytes_max == 0 {
        return invalid("frame_bytes_max must be at least 1");
    }
    if limits.connect_timeout_ms == 0 || limits.call_timeout_ms == 0 {
        return invalid("connect_timeout_ms and call_timeout_ms must be at least 1");
    }
    if limits.concurrent_streams_max == 0 {
        return invalid("concurrent_streams_max must be at least 1");
    }
    if limits.idle_timeout_ms < 3 {
        return invalid("idle_timeout_ms must be at least 3 (keep-alives go at a third of it)");
    }
    let idle = IdleTimeout::try_from(Duration::from_millis(limits.idle_timeout_ms))
        .or_else(|_| invalid("idle_timeout_ms is too large"))?;

    let mut transport = TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(limits.concurrent_streams_max))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .max_idle_timeout(Some(idle))
        .keep_alive_interval(keep_alive.then(|| Duration::from_millis(limits.idle_timeout_ms / 3)))
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
        .send_window(u64::from(CONNECTION_RECEIVE_WINDOW))
        .datagram_receive_buffer_size(Some(crate::DATAGRAM_BUFFER_BYTES_MAX))
        .datagram_send_buffer_size(crate::DATAGRAM_BUFFER_BYTES_MAX);
    Ok(transport)
}

/// Builds the server (client certificate required, verified against the cluster CA only) and
/// client (server verified against the cluster CA, own certificate presented) configurations.
pub(crate) fn quic_configs(
    identity: &TlsIdentity,
    limits: &TransportLimits,
) -> Result<QuicConfigs, TransportError> {
    let client_transport = Arc::new(transport_config(limits, true)?);
    let server_transport = Arc::new(transport_config(limits, false)?);
    let ParsedIdentity { roots, chain, key } = identity.parse()?;
    let endpoint = endpoint_config(key.secret_der());
    let provider: Arc<CryptoProvider> = Arc::new(rustls::crypto::ring::default_provider());

    let mut root_store = RootCertStore::empty();
    for root in roots {
        root_store
            .add(root)
            .map_err(|e| tls_error("unusable cluster CA certificate", e))?;
    }
    let root_store = Arc::new(root_store);

    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(root_store.clone(), provider.clone())
            .build()
            .map_err(|e| tls_error("cannot build the client certificate verifier", e))?;
    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_error("TLS 1.3 unsupported by the crypto provider", e))?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| tls_error("unusable certificate or private key", e))?;
    server_tls.alpn_protocols = vec![ALPN.to_vec()];
    let server_crypto = QuicServerConfig::try_from(server_tls)
        .map_err(|e| tls_error("TLS configuration unusable for QUIC", e))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server.transport_config(server_transport);

    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_error("TLS 1.3 unsupported by the crypto provider", e))?
        .with_root_certificates(root_store)
        .with_client_auth_cert(chain, key)
        .map_err(|e| tls_error("unusable certificate or private key", e))?;
    client_tls.alpn_protocols = vec![ALPN.to_vec()];
    let client_crypto = QuicClientConfig::try_from(client_tls)
        .map_err(|e| tls_error("TLS configuration unusable for QUIC", e))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
    client.transport_config(client_transport);

    Ok(QuicConfigs {
        server,
        client,
        endpoint,
    })
}
