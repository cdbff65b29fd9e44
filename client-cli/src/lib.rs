//! `chat-cli`: the command-line client of a chatd cluster.
//!
//! The binary is thin glue: [`Cli`] is parsed with clap, [`execute`] runs the command and
//! returns the text to print, and [`exit_code`] maps an error to the exit status
//! (2: server unreachable, 1: any other failure). Rendering lives in [`render`] as pure
//! functions over the API types in [`model`].

pub mod client;
pub mod model;
pub mod render;

use std::time::Duration;

use clap::{Parser, Subcommand};

pub use client::{CliError, Client};
pub use model::ClusterView;

/// The chatd command-line client.
#[derive(Clone, Debug, Parser)]
#[command(name = "chat-cli", version, about)]
pub struct Cli {
    /// The node to talk to: a URL or host:port (http:// is assumed).
    #[arg(
        long,
        global = true,
        env = "CHATD_SERVER",
        default_value = "http://127.0.0.1:7000"
    )]
    pub server: String,
    /// Bearer token sent as `Authorization: Bearer <TOKEN>`.
    #[arg(long, global = true, env = "CHATD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Give up on a request after this many milliseconds.
    #[arg(
        long,
        global = true,
        default_value_t = 5000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub timeout_ms: u64,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Clone, Debug, Subcommand)]
pub enum Command {
    /// Cluster administration.
    Admin {
        /// What to administer.
        #[command(subcommand)]
        command: AdminCommand,
    },
}

/// `admin` commands.
#[derive(Clone, Debug, Subcommand)]
pub enum AdminCommand {
    /// The cluster: nodes and partitions.
    Cluster {
        /// What to do with the cluster.
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

/// `admin cluster` commands.
#[derive(Clone, Debug, Subcommand)]
pub enum ClusterCommand {
    /// Show nodes, partitions, leaders and replication lag (GET /v1/admin/cluster).
    Status,
}

/// The API path of the cluster view.
pub const CLUSTER_PATH: &str = "v1/admin/cluster";

/// Runs `cli` and returns what to print on stdout. `color` enables ANSI colours in
/// tables (the caller decides, from whether stdout is a terminal).
pub async fn execute(cli: &Cli, color: bool) -> Result<String, CliError> {
    let client = Client::new(
        &cli.server,
        cli.token.as_deref(),
        Duration::from_millis(cli.timeout_ms),
    )?;
    match &cli.command {
        Command::Admin {
            command:
                AdminCommand::Cluster {
                    command: ClusterCommand::Status,
                },
        } => {
            let raw = client.get_json(CLUSTER_PATH).await?;
            let view = parse_cluster_view(&raw).map_err(|cause| CliError::Malformed {
                url: client
                    .url(CLUSTER_PATH)
                    .map_or_else(|_| cli.server.clone(), |u| u.to_string()),
                cause,
            })?;
            if cli.json {
                let mut out = render::pretty_json(&raw);
                out.push('\n');
                Ok(out)
            } else {
                Ok(render::render_cluster_status(&view, color))
            }
        }
    }
}

/// Parses the body of `GET /v1/admin/cluster`; the error says which field is wrong.
pub fn parse_cluster_view(raw: &str) -> Result<ClusterView, String> {
    serde_json::from_str(raw).map_err(|e| format!("not a cluster view: {e}"))
}

/// The exit status for an error: [`CliError::exit_code`] when it is one, else 1.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    e.downcast_ref::<CliError>().map_or(1, CliError::exit_code)
}

#[cfg(test)]
mod tests;
