//! `chat-cli`: the command-line client of a chatd cluster.
//!
//! The binary is thin glue: [`Cli`] is parsed with clap, [`execute`] runs the command and
//! returns the text to print, and [`exit_code`] maps an error to the exit status (see
//! [`client::exit`]: 1 refused or failed, 2 usage, 3 unreachable, 4 token). Rendering
//! lives in [`render`] as pure functions over the API types in [`model`].
//!
//! Commands: `admin …` over the HTTP admin API (admin token); messaging (`send`,
//! `history`, `tail`, `sync`, `presence`, `open-direct`, `create-group`, the interactive
//! `chat`) over the WebSocket API (user token); `bench`, a load generator that verifies
//! what it measured.

pub mod admin;
pub mod bench;
pub mod client;
pub mod config;
pub mod e2e;
pub mod editor;
pub mod files;
pub mod format;
pub mod idle;
pub mod messaging;
pub mod model;
pub mod render;
pub mod session;
pub mod svg;
pub mod ws;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

pub use client::{exit, CliError, Client};
pub use model::ClusterView;

/// The heading of the options every command takes, shown apart from a command's own.
pub const GLOBAL_OPTIONS: &str = "Global options";

/// The exit statuses, as `chat-cli --help` lists them (after the options).
pub const EXIT_STATUS_HELP: &str = "\
Exit status:
  0  success
  1  the server refused the request (unknown chat, not a member, …) or another failure
  2  usage error: bad arguments, or input the command cannot act on (nothing was sent)
  3  the server cannot be reached, or the --server address is unusable
  4  no token, an unusable one, or the server refused it";

/// The chatd command-line client.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "chat-cli",
    version,
    about,
    max_term_width = 100,
    after_help = EXIT_STATUS_HELP
)]
pub struct Cli {
    /// The node to talk to: a URL or host:port (http:// is assumed)
    /// [default: the config file's `server`, else http://127.0.0.1:7000].
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL_OPTIONS,
        env = "CHATD_SERVER",
        default_value = "",
        hide_default_value = true
    )]
    pub server: String,
    /// The token: a user token for messaging, the admin token for `admin` and `bench`
    /// [default: from the config file].
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL_OPTIONS,
        env = "CHATD_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// A config file with `server`, `token` and `admin_token` [default:
    /// ~/.config/chat-cli/config.toml, if present].
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL_OPTIONS,
        env = "CHAT_CLI_CONFIG",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true, help_heading = GLOBAL_OPTIONS)]
    pub json: bool,
    /// Give up on a request after this many milliseconds.
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL_OPTIONS,
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
    /// Cluster administration (admin token).
    Admin {
        /// What to administer.
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Send one message and wait for its ack (retried with the same idempotency key).
    Send(messaging::SendArgs),
    /// Print a chat's history, a page at a time (or all of it).
    History(messaging::HistoryArgs),
    /// Follow a chat live: new messages, receipts and typing, until Ctrl-C.
    Tail(messaging::TailArgs),
    /// List your chats with last seq, cursors and unread counts.
    Sync,
    /// Who of these users is online, and when they were last seen.
    Presence {
        /// User ids (at most 256).
        #[arg(required = true, num_args = 1..=256)]
        users: Vec<String>,
    },
    /// Open (or create) the direct chat with a user and print its id.
    OpenDirect {
        /// The other user.
        user: String,
    },
    /// End-to-end encrypted chats (MLS): this device, its chats and messages.
    E2e(e2e::E2eArgs),
    /// Create a group with you and the given members and print its id.
    CreateGroup {
        /// The group's name.
        name: String,
        /// Its other members.
        members: Vec<String>,
    },
    /// Upload a file (streamed, with progress) and print its id and SHA-256.
    Upload(files::UploadArgs),
    /// Upload a file and send it to a chat, with an optional text.
    SendFile(messaging::SendFileArgs),
    /// Download a file (streamed, with progress), checked against its SHA-256.
    Download(files::DownloadArgs),
    /// Show the bytes your files take against your quota.
    Quota,
    /// An interactive chat session in the terminal.
    Chat(session::ChatArgs),
    /// Load-generate over real WebSockets and verify every delivery (admin token).
    Bench(bench::BenchArgs),
    /// Open many idle sessions to one node and print what each costs it in memory
    /// (admin token; reads the node's /metrics).
    BenchIdle(idle::IdleArgs),
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
    /// Users: add, list, disable, rotate a token.
    Users {
        /// What to do with users.
        #[command(subcommand)]
        command: admin::UsersCommand,
    },
    /// Chats: inspect one.
    Chat {
        /// What to do with a chat.
        #[command(subcommand)]
        command: admin::ChatCommand,
    },
    /// Partitions: move leadership or a replica.
    Partition {
        /// What to do with a partition.
        #[command(subcommand)]
        command: admin::PartitionCommand,
    },
    /// Nodes: list them with their membership state, remove one.
    Node {
        /// What to do with nodes.
        #[command(subcommand)]
        command: admin::NodeCommand,
    },
    /// The rebalancer: moves in progress and planned; pause or resume it.
    Rebalance {
        /// What to do with the rebalancer.
        #[command(subcommand)]
        command: admin::RebalanceCommand,
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

impl Cli {
    /// Whether the command uses the admin token.
    fn wants_admin_token(&self) -> bool {
        matches!(
            self.command,
            Command::Admin { .. } | Command::Bench(_) | Command::BenchIdle(_)
        )
    }

    /// The server and token after the config file is taken into account: flag, then
    /// environment (both merged by clap), then the file, then the default server.
    pub fn resolved(&self) -> Result<Cli, CliError> {
        let file = config::load(self.config.as_deref())?;
        let mut cli = self.clone();
        cli.server = config::pick_server(&self.server, &file);
        cli.token = config::pick_token(self.token.as_deref(), &file, self.wants_admin_token());
        Ok(cli)
    }
}

/// Runs `cli` and returns what to print on stdout. `color` enables ANSI colours in
/// tables (the caller decides, from whether stdout is a terminal). Long-running commands
/// (`tail`, `chat`) write as they go and return an empty string.
pub async fn execute(cli: &Cli, color: bool) -> Result<String, CliError> {
    let cli = &cli.resolved()?;
    let http = || {
        Client::new(
            &cli.server,
            cli.token.as_deref(),
            Duration::from_millis(cli.timeout_ms),
        )
    };
    match &cli.command {
        Command::Admin { command } => match command {
            AdminCommand::Cluster {
                command: ClusterCommand::Status,
            } => admin::cluster_status(cli, &http()?, color).await,
            AdminCommand::Users { command } => admin::users(cli, &http()?, command, color).await,
            AdminCommand::Chat { command } => admin::chat(cli, &http()?, command, color).await,
            AdminCommand::Partition { command } => admin::partition(cli, &http()?, command).await,
            AdminCommand::Node { command } => admin::node(cli, &http()?, command, color).await,
            AdminCommand::Rebalance { command } => admin::rebalance(cli, &http()?, command).await,
        },
        Command::Send(args) => messaging::send(cli, args).await,
        Command::History(args) => messaging::history(cli, args, color).await,
        Command::Tail(args) => messaging::tail(cli, args).await,
        Command::Sync => messaging::sync(cli, color).await,
        Command::Presence { users } => messaging::presence(cli, users, color).await,
        Command::OpenDirect { user } => messaging::open_direct(cli, user).await,
        Command::CreateGroup { name, members } => messaging::create_group(cli, name, members).await,
        Command::E2e(args) => e2e::run(cli, args).await,
        Command::Upload(args) => files::upload(cli, args).await,
        Command::SendFile(args) => messaging::send_file(cli, args).await,
        Command::Download(args) => files::download(cli, args).await,
        Command::Quota => files::quota(cli).await,
        Command::Chat(args) => session::run(cli, args).await,
        Command::Bench(args) => bench::run(cli, args).await,
        Command::BenchIdle(args) => idle::run(cli, args).await,
    }
}

/// Parses the body of `GET /v1/admin/cluster`; the error says which field is wrong.
pub fn parse_cluster_view(raw: &str) -> Result<ClusterView, String> {
    serde_json::from_str(raw).map_err(|e| format!("not a cluster view: {e}"))
}

/// The exit status for an error: [`CliError::exit_code`] when it is one, else
/// [`exit::FAILED`].
pub fn exit_code(e: &anyhow::Error) -> u8 {
    e.downcast_ref::<CliError>()
        .map_or(exit::FAILED, CliError::exit_code)
}

/// The exit status for a command line clap could not parse: [`exit::USAGE`], or
/// [`exit::OK`] for `--help` and `--version` (which clap reports as errors too).
pub fn usage_exit_code(e: &clap::Error) -> u8 {
    if e.use_stderr() {
        exit::USAGE
    } else {
        exit::OK
    }
}

#[cfg(test)]
mod tests;
