//! Unit tests: rendering from fixed cluster views, JSON pretty-printing, argument parsing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clap::Parser;

use super::*;
use crate::render::{partition_lag, pretty_json, render_cluster_status, summary_line};

const HEALTHY: &str = r#"{"cluster_id":"chatd-a04824c4cd8216b9","answered_by":1,"metadata_bootstrapped":true,
 "nodes":[
  {"id":1,"api_addr":"127.0.0.1:7000","cluster_addr":"127.0.0.1:7001","reachable":true,"error":null,"file_bytes":1572864},
  {"id":2,"api_addr":"127.0.0.1:7010","cluster_addr":"127.0.0.1:7011","reachable":true,"error":null,"file_bytes":0},
  {"id":3,"api_addr":"127.0.0.1:7020","cluster_addr":"127.0.0.1:7021","reachable":true,"error":null}],
 "partitions":[
  {"group":0,"replicas":[1,2,3],"leader":1,"term":1,"last_index":2,"committed_index":2,"applied_index":2,"healthy":true,
   "replica_views":[
    {"node":1,"role":"Leader","term":1,"last_index":2,"committed_index":2,"applied_index":2,"purged_index":null,"snapshot_index":null},
    {"node":2,"role":"Follower","term":1,"last_index":2,"committed_index":2,"applied_index":2,"purged_index":null,"snapshot_index":null},
    {"node":3,"role":"Follower","term":1,"last_index":2,"committed_index":2,"applied_index":2,"purged_index":null,"snapshot_index":null}]},
  {"group":1,"replicas":[1,2,3],"leader":2,"term":3,"last_index":1205,"committed_index":1205,"applied_index":1205,"healthy":true,
   "replica_views":[
    {"node":1,"role":"Follower","term":3,"last_index":1205,"committed_index":1205,"applied_index":1200,"purged_index":null,"snapshot_index":null},
    {"node":2,"role":"Leader","term":3,"last_index":1205,"committed_index":1205,"applied_index":1205,"purged_index":1000,"snapshot_index":1100},
    {"node":3,"role":"Follower","term":3,"last_index":1205,"committed_index":1190,"applied_index":1180,"purged_index":null,"snapshot_index":null}]},
  {"group":2,"replicas":[2,3,1],"leader":3,"term":2,"last_index":17,"committed_index":17,"applied_index":17,"healthy":true,
   "replica_views":[
    {"node":1,"role":"Follower","term":2,"last_index":17,"committed_index":17,"applied_index":17,"purged_index":null,"snapshot_index":null},
    {"node":2,"role":"Follower","term":2,"last_index":17,"committed_index":17,"applied_index":17,"purged_index":null,"snapshot_index":null},
    {"node":3,"role":"Leader","term":2,"last_index":17,"committed_index":17,"applied_index":17,"purged_index":null,"snapshot_index":null}]}]}"#;

/// Node 3 is unreachable; group 1 misses a replica view, group 2 has no leader.
const UNHEALTHY: &str = r#"{"cluster_id":"chatd-0000000000000042","answered_by":2,"metadata_bootstrapped":true,
 "nodes":[
  {"id":1,"api_addr":"127.0.0.1:7000","cluster_addr":"127.0.0.1:7001","reachable":true,"error":null,"state":"active"},
  {"id":2,"api_addr":"127.0.0.1:7010","cluster_addr":"127.0.0.1:7011","reachable":true,"error":null,"state":"active"},
  {"id":3,"api_addr":"127.0.0.1:7020","cluster_addr":"127.0.0.1:7021","reachable":false,"error":"timed out\nafter 2s","state":"draining"}],
 "moves":[{"group":2,"add":4,"remove":3,"epoch":7}],"rebalance_paused":true,
 "partitions":[
  {"group":0,"replicas":[1,2,3],"leader":1,"term":4,"last_index":9,"committed_index":9,"applied_index":9,"healthy":true,
   "replica_views":[
    {"node":1,"role":"Leader","term":4,"last_index":9,"committed_index":9,"applied_index":9,"purged_index":null,"snapshot_index":null},
    {"node":2,"role":"Follower","term":4,"last_index":9,"committed_index":9,"applied_index":9,"purged_index":null,"snapshot_index":null}]},
  {"group":1,"replicas":[1,2,3],"leader":1,"term":5,"last_index":100,"committed_index":100,"applied_index":100,"healthy":false,
   "replica_views":[
    {"node":1,"role":"Leader","term":5,"last_index":100,"committed_index":100,"applied_index":100,"purged_index":null,"snapshot_index":null},
    {"node":2,"role":"Follower","term":5,"last_index":100,"committed_index":98,"applied_index":90,"purged_index":null,"snapshot_index":null}]},
  {"group":2,"replicas":[1,2,3],"leader":null,"term":0,"last_index":0,"committed_index":0,"applied_index":0,"healthy":false,
   "replica_views":[
    {"node":1,"role":"Candidate","term":7,"last_index":41,"committed_index":40,"applied_index":40,"purged_index":null,"snapshot_index":null},
    {"node":2,"role":"Follower","term":6,"last_index":41,"committed_index":38,"applied_index":35,"purged_index":null,"snapshot_index":null}]}]}"#;

fn view(raw: &str) -> ClusterView {
    parse_cluster_view(raw).unwrap()
}

#[test]
fn healthy_cluster_renders_aligned_tables() {
    let out = render_cluster_status(&view(HEALTHY), false);
    let expected = "\
cluster chatd-a04824c4cd8216b9  answered by node 1  metadata bootstrapped: yes

NODES
   ID  STATE  API             CLUSTER         REACHABLE    FILES  ERROR
    1  -      127.0.0.1:7000  127.0.0.1:7001  yes        1.5 MiB  -
    2  -      127.0.0.1:7010  127.0.0.1:7011  yes            0 B  -
    3  -      127.0.0.1:7020  127.0.0.1:7021  yes              -  -

PARTITIONS
   GROUP  LEADER  TERM  LAST  COMMITTED  APPLIED  LAG  REPLICAS  STATUS
       0       1     1     2          2        2    0  1*,2,3    ok
       1       2     3  1205       1205     1205   25  1,2*,3    ok
       2       3     2    17         17       17    0  2,3*,1    ok

3 partitions, 0 unhealthy, 3/3 nodes reachable; leaders per node: 1=1 2=1 3=1
";
    assert_eq!(out, expected, "\n{out}");
    assert!(!out.contains('!'));
    assert!(!out.contains('\x1b'));
}

#[test]
fn unhealthy_cluster_is_flagged() {
    let out = render_cluster_status(&view(UNHEALTHY), false);
    let expected = "\
cluster chatd-0000000000000042  answered by node 2  metadata bootstrapped: yes

NODES
   ID  STATE     API             CLUSTER         REACHABLE  FILES  ERROR
    1  active    127.0.0.1:7000  127.0.0.1:7001  yes            -  -
    2  active    127.0.0.1:7010  127.0.0.1:7011  yes            -  -
!   3  draining  127.0.0.1:7020  127.0.0.1:7021  NO             -  timed out after 2s

REPLICA MOVES (1 in progress; rebalancer paused)
  partition 2: node 3 -> node 4

PARTITIONS
   GROUP  LEADER  TERM  LAST  COMMITTED  APPLIED  LAG  REPLICAS  STATUS
       0       1     4     9          9        9    0  1*,2,3    ok
!      1       1     5   100        100      100   10  1*,2,3    UNHEALTHY
!      2       -     0     0          0        0    5  1,2,3     UNHEALTHY

3 partitions, 2 unhealthy, 2/3 nodes reachable; leaders per node: 1=2 2=0 3=0 none=1
";
    assert_eq!(out, expected, "\n{out}");
}

#[test]
fn columns_line_up_under_their_headers() {
    let out = render_cluster_status(&view(UNHEALTHY), false);
    let lines: Vec<&str> = out.lines().collect();
    let header = lines.iter().find(|l| l.contains("GROUP")).unwrap();
    let status_col = header.find("STATUS").unwrap();
    let lag_end = header.find("LAG").unwrap() + "LAG".len();
    for row in lines
        .iter()
        .filter(|l| l.contains("UNHEALTHY") || l.ends_with(" ok"))
    {
        assert!(row[status_col..].starts_with("ok") || row[status_col..].starts_with("UNHEALTHY"));
        // Numbers are right-aligned: the lag ends where its header ends.
        assert!(row[..lag_end].ends_with(|c: char| c.is_ascii_digit() || c == '-'));
    }
}

#[test]
fn colour_only_when_asked() {
    let plain = render_cluster_status(&view(UNHEALTHY), false);
    let coloured = render_cluster_status(&view(UNHEALTHY), true);
    assert!(!plain.contains('\x1b'));
    assert!(coloured.contains("\x1b[1;31m!      2       -"));
    assert!(coloured.contains("\x1b[1;31m!   3  draining  127.0.0.1:7020"));
    // Healthy rows are not coloured.
    assert!(coloured.contains("\n       0       1     4"));
    // Without the escapes it is the plain text.
    let stripped = coloured
        .replace("\x1b[1;31m", "")
        .replace("\x1b[1m", "")
        .replace("\x1b[0m", "");
    assert_eq!(stripped, plain);
}

#[test]
fn lag_is_committed_minus_slowest_applied() {
    let v = view(HEALTHY);
    assert_eq!(partition_lag(&v.partitions[0]), Some(0));
    assert_eq!(partition_lag(&v.partitions[1]), Some(25));
    let u = view(UNHEALTHY);
    assert_eq!(partition_lag(&u.partitions[1]), Some(10));
    // No leader: the highest commit any replica knows.
    assert_eq!(partition_lag(&u.partitions[2]), Some(5));
    let mut none = u.partitions[2].clone();
    none.replica_views.clear();
    assert_eq!(partition_lag(&none), None);
}

#[test]
fn summary_counts_leaders_per_node() {
    assert_eq!(
        summary_line(&view(HEALTHY)),
        "3 partitions, 0 unhealthy, 3/3 nodes reachable; leaders per node: 1=1 2=1 3=1"
    );
    assert_eq!(
        summary_line(&view(UNHEALTHY)),
        "3 partitions, 2 unhealthy, 2/3 nodes reachable; leaders per node: 1=2 2=0 3=0 none=1"
    );
}

#[test]
fn empty_cluster_renders() {
    let raw = r#"{"cluster_id":"c","answered_by":1,"metadata_bootstrapped":false,"nodes":[],"partitions":[]}"#;
    let out = render_cluster_status(&view(raw), false);
    assert!(out.contains("metadata bootstrapped: NO"));
    assert!(out.contains("NODES\n  (none)\n"));
    assert!(out.contains("0 partitions, 0 unhealthy, 0/0 nodes reachable; leaders per node: -"));
}

#[test]
fn parsing_names_the_bad_field_and_ignores_new_ones() {
    let err = parse_cluster_view(r#"{"cluster_id":"c"}"#).unwrap_err();
    assert!(err.contains("answered_by"), "{err}");
    let err = parse_cluster_view("[1,2]").unwrap_err();
    assert!(err.contains("not a cluster view"), "{err}");
    let extra = r#"{"cluster_id":"c","answered_by":1,"metadata_bootstrapped":true,"nodes":[],"partitions":[],"new_field":1}"#;
    assert!(parse_cluster_view(extra).is_ok());
}

#[test]
fn pretty_json_keeps_order_and_content() {
    let raw = r#"{"z":1,"a":[],"m":{},"s":"a \"quoted\" {[,:]} \\","n":[1,{"b":null,"a":-2.5e3}],"t":true}"#;
    let pretty = pretty_json(raw);
    let a: serde_json::Value = serde_json::from_str(raw).unwrap();
    let b: serde_json::Value = serde_json::from_str(&pretty).unwrap();
    assert_eq!(a, b);
    assert!(pretty.find("\"z\"").unwrap() < pretty.find("\"a\"").unwrap());
    // Same layout as serde_json's pretty printer.
    let sorted = serde_json::to_string(&view(HEALTHY)).unwrap();
    assert_eq!(
        pretty_json(&sorted),
        serde_json::to_string_pretty(&view(HEALTHY)).unwrap()
    );
    assert_eq!(
        pretty_json(HEALTHY),
        serde_json::to_string_pretty(&view(HEALTHY)).unwrap()
    );
}

#[test]
fn arguments() {
    let cli = Cli::try_parse_from([
        "chat-cli",
        "--server",
        "127.0.0.1:7100",
        "admin",
        "cluster",
        "status",
        "--json",
        "--timeout-ms",
        "250",
        "--token",
        "t0k",
    ])
    .unwrap();
    assert_eq!(cli.server, "127.0.0.1:7100");
    assert!(cli.json);
    assert_eq!(cli.timeout_ms, 250);
    assert_eq!(cli.token.as_deref(), Some("t0k"));
    assert!(Cli::try_parse_from([
        "chat-cli",
        "--timeout-ms",
        "0",
        "admin",
        "cluster",
        "status"
    ])
    .is_err());
    assert!(Cli::try_parse_from(["chat-cli", "admin", "cluster"]).is_err());
}

/// The text clap prints for `args` (`--help`).
fn help_of(args: &[&str]) -> String {
    let e = Cli::try_parse_from(args).expect_err("--help ends parsing");
    assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp);
    assert_eq!(usage_exit_code(&e), exit::OK);
    e.to_string()
}

/// The lines of the help section under `heading` (up to the next blank line).
fn section<'a>(help: &'a str, heading: &str) -> Vec<&'a str> {
    help.lines()
        .skip_while(|l| *l != format!("{heading}:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .collect()
}

#[test]
fn subcommand_help_shows_global_options_apart() {
    let help = help_of(&["chat-cli", "send", "--help"]);
    let own = section(&help, "Options");
    let global = section(&help, GLOBAL_OPTIONS);
    assert!(own.iter().any(|l| l.contains("--reply-to")), "{help}");
    assert!(own.iter().any(|l| l.contains("--client-msg-id")), "{help}");
    for flag in ["--server", "--token", "--config", "--json", "--timeout-ms"] {
        assert!(
            global.iter().any(|l| l.trim_start().starts_with(flag)),
            "{flag} not under {GLOBAL_OPTIONS}:\n{help}"
        );
        assert!(
            !own.iter().any(|l| l.trim_start().starts_with(flag)),
            "{flag} among send's own options:\n{help}"
        );
    }
    // The section comes after the command's own options.
    assert!(help.find("\nOptions:").unwrap() < help.find("\nGlobal options:").unwrap());
    // Same for a nested command.
    let help = help_of(&["chat-cli", "admin", "users", "rotate-token", "--help"]);
    assert!(
        section(&help, GLOBAL_OPTIONS)
            .iter()
            .any(|l| l.trim_start().starts_with("--token")),
        "{help}"
    );
}

#[test]
fn top_level_help_lists_the_exit_statuses() {
    let help = help_of(&["chat-cli", "--help"]);
    assert!(help.contains(EXIT_STATUS_HELP), "{help}");
    for (code, what) in [
        (exit::OK, "success"),
        (exit::FAILED, "refused"),
        (exit::USAGE, "usage"),
        (exit::UNREACHABLE, "cannot be reached"),
        (exit::TOKEN, "token"),
    ] {
        let line = format!("  {code}  ");
        let l = help
            .lines()
            .find(|l| l.starts_with(&line))
            .unwrap_or_else(|| panic!("no line for {code}:\n{help}"));
        assert!(l.contains(what), "{l}");
    }
}

#[test]
fn usage_errors_exit_2() {
    let e = Cli::try_parse_from(["chat-cli", "send", "d:a:b"]).unwrap_err();
    assert_eq!(usage_exit_code(&e), 2);
    let e = Cli::try_parse_from(["chat-cli", "--timeout-ms", "0", "sync"]).unwrap_err();
    assert_eq!(usage_exit_code(&e), 2);
    let e = Cli::try_parse_from(["chat-cli", "--version"]).unwrap_err();
    assert_eq!(usage_exit_code(&e), 0);
    let usage = anyhow::Error::new(CliError::Usage("u".into()));
    assert_eq!(exit_code(&usage), 2);
    assert_eq!(exit_code(&anyhow::anyhow!("other")), 1);
}

#[test]
fn rotate_token_parses() {
    let cli = Cli::try_parse_from(["chat-cli", "admin", "users", "rotate-token", "alice"]).unwrap();
    assert!(matches!(
        cli.command,
        Command::Admin {
            command: AdminCommand::Users {
                command: admin::UsersCommand::RotateToken { ref user }
            }
        } if user == "alice"
    ));
    assert!(Cli::try_parse_from(["chat-cli", "admin", "users", "rotate-token"]).is_err());
}
