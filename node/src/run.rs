//! Running a node until SIGTERM or Ctrl-C.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::node::Node;

/// Sets up tracing from the config (RUST_LOG overrides its filter).
pub fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = if config.log.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Loads the config at `path`, runs the node, and stops it gracefully on a signal.
pub async fn run(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    init_tracing(&config);
    let node = Node::start(config)
        .await
        .with_context(|| format!("node with config {} could not start", path.display()))?;
    let server = serve_api(node.clone()).await?;
    wait_for_signal().await;
    tracing::info!("signal received, shutting down");
    // Tell clients to reconnect elsewhere (1001), give the close frames a moment.
    node.gateway
        .close_all(chatd_proto::close::GOING_AWAY, "node shutting down");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    server.abort();
    node.shutdown().await;
    Ok(())
}

/// Binds the node's API address and serves the HTTP API in a task.
pub async fn serve_api(node: Arc<Node>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let addr = node
        .api_addr()
        .context("this node has no API address in the peer list")?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on the API address {addr}"))?;
    tracing::info!(%addr, "API listening");
    let app = crate::api::router(node);
    // Small frames (acks, pushes) must not wait for Nagle's algorithm: with delayed ACKs
    // on the peer that costs ~40 ms per exchange.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "API server failed");
        }
    }))
}

/// Resolves on SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {},
                _ = i.recv() => {},
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
