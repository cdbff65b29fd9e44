//! `admin` commands, over the node's HTTP admin API (admin token): cluster status, users,
//! chat inspection, partition leadership.

use clap::Subcommand;
use serde::Deserialize;

use crate::client::{CliError, Client};
use crate::format::{clean, format_time};
use crate::render::{pretty_json, render_cluster_status, Align, Table};
use crate::{parse_cluster_view, Cli, CLUSTER_PATH};

/// `admin users` commands.
#[derive(Clone, Debug, Subcommand)]
pub enum UsersCommand {
    /// Create a user and print its token (shown only this once).
    Add {
        /// The new user id: 1-32 of a-z 0-9 _ . -
        user: String,
    },
    /// List users.
    List,
    /// Disable a user for good (its token stops working for new connections).
    Disable {
        /// The user id.
        user: String,
    },
    /// Give a user a new token and print it (shown only this once); the old token stops
    /// working for new connections.
    RotateToken {
        /// The user id.
        user: String,
    },
}

/// `admin chat` commands.
#[derive(Clone, Debug, Subcommand)]
pub enum ChatCommand {
    /// Show a chat: kind, name, creator, last seq, and each member's span and cursors.
    Inspect {
        /// The chat id.
        chat: String,
    },
}

/// `admin partition` commands.
#[derive(Clone, Debug, Subcommand)]
pub enum PartitionCommand {
    /// Move a partition's leadership to another of its replicas.
    Transfer {
        /// The partition (Raft group) number.
        group: u64,
        /// The node to make leader.
        #[arg(long, value_name = "NODE")]
        to: u64,
    },
    /// Move a partition's replica from one node to another (an active node that holds no
    /// replica of it); group 0's leader copies it, swaps it in and deletes the old one.
    Move {
        /// The partition (Raft group) number.
        group: u64,
        /// The node that gives its replica up.
        #[arg(long, value_name = "NODE")]
        from: u64,
        /// The node that gets the replica.
        #[arg(long, value_name = "NODE")]
        to: u64,
    },
}

/// `admin node` commands.
#[derive(Clone, Debug, Subcommand)]
pub enum NodeCommand {
    /// List the cluster's nodes as group 0 holds them: id, state (joining, active,
    /// draining, removed), addresses, replicas held and partitions preferred to lead.
    List,
    /// Retire a node: its replicas move to the others (R is kept), it leaves group 0, its
    /// id is tombstoned (it never joins again), and a live node drains its sessions and
    /// exits. Refused if fewer than R active nodes would be left: add a node first.
    Remove {
        /// The node id.
        id: u64,
        /// The node is gone for good (dead machine, lost disk): its replicas are
        /// re-created on the others from the remaining copies.
        #[arg(long)]
        dead: bool,
    },
}

/// `admin rebalance` commands.
#[derive(Clone, Debug, Subcommand)]
pub enum RebalanceCommand {
    /// Show whether the rebalancer is paused, the moves in progress and the next planned
    /// steps.
    Status,
    /// Stop planning new moves and leadership changes (moves in progress finish); kept in
    /// group 0, so it holds across restarts and leader changes.
    Pause,
    /// Plan moves again.
    Resume,
}

/// An API path with `segments` percent-encoded (ids may hold `:`; anything outside
/// `A-Za-z0-9_.:-` is encoded).
pub fn api_path(prefix: &str, segments: &[&str]) -> String {
    let mut path = prefix.trim_end_matches('/').to_string();
    for s in segments {
        path.push('/');
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-') {
                path.push(char::from(b));
            } else {
                path.push_str(&format!("%{b:02X}"));
            }
        }
    }
    path
}

fn parse<T: for<'de> Deserialize<'de>>(
    client: &Client,
    path: &str,
    raw: &str,
) -> Result<T, CliError> {
    serde_json::from_str(raw).map_err(|e| CliError::Malformed {
        url: client
            .url(path)
            .map_or_else(|_| path.to_string(), |u| u.to_string()),
        cause: e.to_string(),
    })
}

fn pretty(raw: &str) -> String {
    let mut out = pretty_json(raw);
    out.push('\n');
    out
}

/// Pages of `GET /v1/admin/cluster` one `admin cluster status` reads at most (each holds
/// up to 4,097 groups, every group of the largest cluster allowed).
pub const CLUSTER_PAGES_MAX: usize = 64;

/// `admin cluster status`: every page of the cluster view, merged.
pub async fn cluster_status(cli: &Cli, client: &Client, color: bool) -> Result<String, CliError> {
    let malformed = |cause: String| CliError::Malformed {
        url: client
            .url(CLUSTER_PATH)
            .map_or_else(|_| cli.server.clone(), |u| u.to_string()),
        cause,
    };
    let raw = client.get_json(CLUSTER_PATH).await?;
    let mut view = parse_cluster_view(&raw).map_err(malformed)?;
    file_bytes(cli, &mut view).await;
    if view.next_after.is_none() && !cli.json {
        return Ok(render_cluster_status(&view, color));
    }
    let mut pages = 1;
    while let Some(after) = view.next_after {
        if pages >= CLUSTER_PAGES_MAX {
            return Err(malformed(format!(
                "more than {CLUSTER_PAGES_MAX} pages of partitions"
            )));
        }
        let page = parse_cluster_view(
            &client
                .get_json(&format!("{CLUSTER_PATH}?after={after}"))
                .await?,
        )
        .map_err(malformed)?;
        if page.next_after.is_some_and(|n| n <= after) {
            return Err(malformed(format!(
                "page after group {after} does not move forward"
            )));
        }
        view.partitions.extend(page.partitions);
        view.next_after = page.next_after;
        pages += 1;
    }
    if cli.json {
        serde_json::to_string_pretty(&view).map_err(|e| malformed(e.to_string()))
    } else {
        Ok(render_cluster_status(&view, color))
    }
}

/// Fills each reachable node's `file_bytes` from its own /metrics (in parallel, each
/// bounded by the command's timeout); a node whose metrics cannot be read keeps `None`.
async fn file_bytes(cli: &Cli, view: &mut crate::model::ClusterView) {
    let Ok(http) = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(cli.timeout_ms))
        .build()
    else {
        return;
    };
    let reads = view.nodes.iter().map(|n| {
        let (http, url) = (http.clone(), format!("http://{}/metrics", n.api_addr));
        async move {
            let text = http.get(url).send().await.ok()?.text().await.ok()?;
            text.lines()
                .find_map(|l| l.strip_prefix("chatd_file_bytes "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        }
    });
    let got = futures::future::join_all(reads).await;
    for (n, b) in view.nodes.iter_mut().zip(got) {
        n.file_bytes = b;
    }
}

#[derive(Deserialize)]
struct CreatedUser {
    user: String,
    token: String,
}

#[derive(Deserialize)]
struct UserRow {
    user: String,
    disabled: bool,
}

/// `admin users …`.
pub async fn users(
    cli: &Cli,
    client: &Client,
    command: &UsersCommand,
    color: bool,
) -> Result<String, CliError> {
    match command {
        UsersCommand::Add { user } => {
            let path = "v1/admin/users";
            let raw = client
                .post_json(path, Some(&serde_json::json!({ "user": user })))
                .await?;
            let created: CreatedUser = parse(client, path, &raw)?;
            if cli.json {
                return Ok(pretty(&raw));
            }
            eprintln!(
                "chat-cli: created user {}; its token (shown only this once) follows.\n\
                 chat-cli: in a browser: {}",
                clean(&created.user),
                sign_in_link(client.base(), &created.token)
            );
            Ok(format!("{}\n", created.token))
        }
        UsersCommand::List => {
            let path = "v1/admin/users";
            let raw = client.get_json(path).await?;
            let rows: Vec<UserRow> = parse(client, path, &raw)?;
            if cli.json {
                return Ok(pretty(&raw));
            }
            if rows.is_empty() {
                return Ok("no users\n".to_string());
            }
            let mut t = Table::new(&[("USER", Align::Left), ("STATUS", Align::Left)]);
            for r in &rows {
                t.row(
                    false,
                    vec![
                        r.user.clone(),
                        if r.disabled { "disabled" } else { "enabled" }.to_string(),
                    ],
                );
            }
            Ok(t.render(color))
        }
        UsersCommand::RotateToken { user } => {
            let path = api_path("v1/admin/users", &[user, "rotate-token"]);
            let raw = client
                .post_json(&path, None)
                .await
                .map_err(|e| rotate_refused(e, user))?;
            let rotated: CreatedUser = parse(client, &path, &raw)?;
            if cli.json {
                return Ok(pretty(&raw));
            }
            eprintln!(
                "chat-cli: new token for user {} (shown only this once; the old one no longer \
                 opens connections) follows",
                clean(&rotated.user)
            );
            Ok(format!("{}\n", rotated.token))
        }
        UsersCommand::Disable { user } => {
            let path = api_path("v1/admin/users", &[user, "disable"]);
            let raw = client.post_json(&path, None).await?;
            let row: UserRow = parse(client, &path, &raw)?;
            if cli.json {
                return Ok(pretty(&raw));
            }
            Ok(format!("user {} disabled\n", clean(&row.user)))
        }
    }
}

/// The web client's sign-in link for `token` at the node `base` (the token in the
/// fragment: it never reaches a server log; the page moves it to the tab's storage).
pub fn sign_in_link(base: &reqwest::Url, token: &str) -> String {
    let mut u = base.clone();
    u.set_path("/");
    u.set_query(None);
    u.set_fragment(Some(&format!("token={token}")));
    u.to_string()
}

/// The refusals of `rotate-token` in the CLI's terms (still exit 1).
fn rotate_refused(e: CliError, user: &str) -> CliError {
    match &e {
        CliError::Api { code, .. } if code == "unknown_user" => CliError::Failed(format!(
            "cannot rotate the token of {}: there is no such user (unknown_user)",
            clean(user)
        )),
        CliError::Api { code, .. } if code == "user_disabled" => CliError::Failed(format!(
            "cannot rotate the token of {}: the user is disabled (user_disabled)",
            clean(user)
        )),
        // No API error body: the route itself is missing.
        CliError::Http { url, status, .. } if status.starts_with("404") => CliError::Failed(
            format!("chatd at {url} cannot rotate tokens (404: a version without rotate-token?)"),
        ),
        _ => e,
    }
}

/// `GET /v1/admin/chats/{chat}`.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatInspection {
    /// The chat id.
    pub chat: String,
    /// Its partition.
    pub partition: u64,
    /// `direct` or `group`.
    pub kind: String,
    /// The group's name.
    #[serde(default)]
    pub name: String,
    /// Who created it.
    #[serde(default)]
    pub creator: String,
    /// When (ms since the epoch).
    #[serde(default)]
    pub created_ts: u64,
    /// Its last seq.
    pub last_seq: u64,
    /// Members, current and former.
    pub members: Vec<MemberSpan>,
}

/// One member of an inspected chat.
#[derive(Clone, Debug, Deserialize)]
pub struct MemberSpan {
    /// The user.
    pub user: String,
    /// The first seq the user may see.
    pub from_seq: u64,
    /// The last one, for a former member.
    #[serde(default)]
    pub to_seq: Option<u64>,
    /// Whether a current member.
    pub member: bool,
    /// Delivered cursor.
    pub delivered: u64,
    /// Read cursor.
    pub read: u64,
}

/// The `admin chat inspect` report: a header and the members table.
pub fn render_inspection(c: &ChatInspection, color: bool) -> String {
    let mut out = format!(
        "chat {}  kind {}  partition {}  last seq {}\n",
        clean(&c.chat),
        clean(&c.kind),
        c.partition,
        c.last_seq
    );
    if !c.name.is_empty() {
        out.push_str(&format!("name {}\n", clean(&c.name)));
    }
    if !c.creator.is_empty() || c.created_ts > 0 {
        out.push_str(&format!(
            "created by {} at {} UTC\n",
            if c.creator.is_empty() {
                "-".to_string()
            } else {
                clean(&c.creator)
            },
            format_time(c.created_ts)
        ));
    }
    out.push('\n');
    let mut t = Table::new(&[
        ("USER", Align::Left),
        ("STATUS", Align::Left),
        ("FROM", Align::Right),
        ("TO", Align::Right),
        ("DELIVERED", Align::Right),
        ("READ", Align::Right),
        ("BEHIND", Align::Right),
    ]);
    for m in &c.members {
        let end = m.to_seq.unwrap_or(c.last_seq);
        t.row(
            false,
            vec![
                m.user.clone(),
                if m.member { "member" } else { "left" }.to_string(),
                m.from_seq.to_string(),
                m.to_seq.map_or_else(|| "-".to_string(), |s| s.to_string()),
                m.delivered.to_string(),
                m.read.to_string(),
                end.saturating_sub(m.read).to_string(),
            ],
        );
    }
    if c.members.is_empty() {
        out.push_str("  (no members)\n");
    } else {
        out.push_str(&t.render(color));
    }
    out
}

/// `admin chat inspect`.
pub async fn chat(
    cli: &Cli,
    client: &Client,
    command: &ChatCommand,
    color: bool,
) -> Result<String, CliError> {
    match command {
        ChatCommand::Inspect { chat } => {
            let path = api_path("v1/admin/chats", &[chat]);
            let raw = client.get_json(&path).await?;
            let inspection: ChatInspection = parse(client, &path, &raw)?;
            if cli.json {
                return Ok(pretty(&raw));
            }
            Ok(render_inspection(&inspection, color))
        }
    }
}

#[derive(Deserialize)]
struct Transferred {
    group: u64,
    leader: u64,
}

/// `admin partition transfer`.
pub async fn partition(
    cli: &Cli,
    client: &Client,
    command: &PartitionCommand,
) -> Result<String, CliError> {
    match command {
        PartitionCommand::Transfer { group, to } => {
            let path = api_path("v1/admin/partitions", &[&group.to_string(), "transfer"]);
            let raw = client
                .post_json(&path, Some(&serde_json::json!({ "to": to })))
                .await?;
            let t: Transferred = parse(client, &path, &raw)?;
            if cli.json {
                return Ok(pretty(&raw));
            }
            Ok(format!(
                "partition {}: leader is now node {}\n",
                t.group, t.leader
            ))
        }
        PartitionCommand::Move { group, from, to } => {
            let path = api_path("v1/admin/partitions", &[&group.to_string(), "move"]);
            let raw = client
                .post_json(&path, Some(&serde_json::json!({ "from": from, "to": to })))
                .await?;
            if cli.json {
                return Ok(pretty(&raw));
            }
            Ok(format!(
                "partition {group}: moving its replica from node {from} to node {to}; follow \
                 with `chat-cli admin rebalance status`\n"
            ))
        }
    }
}

#[derive(Deserialize)]
struct NodeRow {
    id: u64,
    state: String,
    api_addr: String,
    cluster_addr: String,
    replicas: usize,
    preferred_leader_of: usize,
}

/// `admin node …`.
pub async fn node(
    cli: &Cli,
    client: &Client,
    command: &NodeCommand,
    color: bool,
) -> Result<String, CliError> {
    match command {
        NodeCommand::List => {
            let path = "v1/admin/nodes";
            let raw = client.get_json(path).await?;
            let rows: Vec<NodeRow> = parse(client, path, &raw)?;
            if cli.json {
                return Ok(pretty(&raw));
            }
            let mut t = Table::new(&[
                ("NODE", Align::Right),
                ("STATE", Align::Left),
                ("API", Align::Left),
                ("CLUSTER", Align::Left),
                ("REPLICAS", Align::Right),
                ("PREFERRED LEADER", Align::Right),
            ]);
            for r in &rows {
                t.row(
                    false,
                    vec![
                        r.id.to_string(),
                        clean(&r.state),
                        clean(&r.api_addr),
                        clean(&r.cluster_addr),
                        r.replicas.to_string(),
                        r.preferred_leader_of.to_string(),
                    ],
                );
            }
            Ok(t.render(color))
        }
        NodeCommand::Remove { id, dead } => {
            let path = api_path("v1/admin/nodes", &[&id.to_string(), "remove"]);
            let raw = client
                .post_json(&path, Some(&serde_json::json!({ "dead": dead })))
                .await?;
            if cli.json {
                return Ok(pretty(&raw));
            }
            Ok(format!(
                "node {id} is draining: its replicas move to the other nodes, then it is \
                 removed{}; follow with `chat-cli admin node list`\n",
                if *dead { "" } else { " and exits" }
            ))
        }
    }
}

#[derive(Deserialize)]
struct RebalanceView {
    paused: bool,
    moves: Vec<MoveRow>,
    planned: Vec<String>,
}

#[derive(Deserialize)]
struct MoveRow {
    group: u64,
    add: u64,
    remove: u64,
}

/// `admin rebalance …`.
pub async fn rebalance(
    cli: &Cli,
    client: &Client,
    command: &RebalanceCommand,
) -> Result<String, CliError> {
    let path = match command {
        RebalanceCommand::Status => "v1/admin/rebalance",
        RebalanceCommand::Pause => "v1/admin/rebalance/pause",
        RebalanceCommand::Resume => "v1/admin/rebalance/resume",
    };
    let raw = match command {
        RebalanceCommand::Status => client.get_json(path).await?,
        _ => client.post_json(path, None).await?,
    };
    if cli.json {
        return Ok(pretty(&raw));
    }
    match command {
        RebalanceCommand::Pause => Ok("rebalancer paused (moves in progress finish)\n".into()),
        RebalanceCommand::Resume => Ok("rebalancer resumed\n".into()),
        RebalanceCommand::Status => {
            let v: RebalanceView = parse(client, path, &raw)?;
            let mut out = format!(
                "rebalancer {}; {} move(s) in progress\n",
                if v.paused { "paused" } else { "running" },
                v.moves.len()
            );
            for m in &v.moves {
                out.push_str(&format!(
                    "  partition {}: node {} -> node {}\n",
                    m.group, m.remove, m.add
                ));
            }
            if v.planned.is_empty() {
                out.push_str("placement is balanced: nothing planned\n");
            } else {
                out.push_str("next planned steps:\n");
                for p in &v.planned {
                    out.push_str(&format!("  {}\n", clean(p)));
                }
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn sign_in_links_carry_the_token_in_the_fragment() {
        let base = reqwest::Url::parse("http://127.0.0.1:7000/x?y=1").unwrap();
        assert_eq!(
            sign_in_link(&base, "abc"),
            "http://127.0.0.1:7000/#token=abc"
        );
    }

    #[test]
    fn paths_are_encoded() {
        assert_eq!(
            api_path("v1/admin/chats", &["d:alice:bob"]),
            "v1/admin/chats/d:alice:bob"
        );
        assert_eq!(
            api_path("v1/admin/users/", &["a b/c", "disable"]),
            "v1/admin/users/a%20b%2Fc/disable"
        );
        assert_eq!(
            api_path("v1/admin/users", &["alice", "rotate-token"]),
            "v1/admin/users/alice/rotate-token"
        );
    }

    #[test]
    fn rotate_refusals_are_worded() {
        let api = |code: &str| CliError::Api {
            url: "u".into(),
            status: 404,
            code: code.into(),
            message: "m".into(),
        };
        let e = rotate_refused(api("unknown_user"), "zed");
        assert_eq!(e.exit_code(), 1);
        assert!(e.to_string().contains("no such user"), "{e}");
        let e = rotate_refused(api("user_disabled"), "zed");
        assert_eq!(e.exit_code(), 1);
        assert!(e.to_string().contains("disabled"), "{e}");
        let e = rotate_refused(api("no_leader"), "zed");
        assert!(matches!(e, CliError::Api { .. }));
        let e = rotate_refused(
            CliError::Http {
                url: "http://h:1/v1/admin/users/zed/rotate-token".into(),
                status: "404 Not Found".into(),
                body: "(empty body)".into(),
            },
            "zed",
        );
        assert!(e.to_string().contains("cannot rotate tokens"), "{e}");
    }

    #[test]
    fn inspection_renders() {
        let raw = r#"{"chat":"g:00","partition":7,"kind":"group","name":"Team","creator":"alice",
          "created_ts":1718000040000,"last_seq":5,"members":[
          {"user":"alice","from_seq":1,"to_seq":null,"member":true,"delivered":5,"read":4},
          {"user":"bob","from_seq":2,"to_seq":3,"member":false,"delivered":3,"read":3}]}"#;
        let c: ChatInspection = serde_json::from_str(raw).unwrap();
        let text = render_inspection(&c, false);
        assert!(text.starts_with("chat g:00  kind group  partition 7  last seq 5\nname Team\n"));
        assert!(
            text.contains("created by alice at 2024-06-10 06:14:00 UTC"),
            "{text}"
        );
        assert!(
            text.contains("   USER   STATUS  FROM  TO  DELIVERED  READ  BEHIND\n"),
            "{text}"
        );
        assert!(
            text.contains("   alice  member     1   -          5     4       1\n"),
            "{text}"
        );
        assert!(
            text.contains("   bob    left       2   3          3     3       0\n"),
            "{text}"
        );
    }
}
