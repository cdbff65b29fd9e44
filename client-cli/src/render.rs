//! Human-readable rendering: pure functions from the API's types to text.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::model::{ClusterView, NodeId, NodeView, PartitionView};

/// The marker in front of rows that need attention.
pub const FLAG: &str = "!";
const RED: &str = "\x1b[1;31m";
const BOLD: &str = "\x1b[1m";
const RESET: &str = "\x1b[0m";

/// How a column's cells are aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    /// Text: padded on the right.
    Left,
    /// Numbers: padded on the left.
    Right,
}

/// A plain-text table whose rows can be flagged: flagged rows start with [`FLAG`] (and
/// are red when colour is on), others with a space, so columns stay aligned either way.
#[derive(Clone, Debug)]
pub struct Table {
    columns: Vec<(&'static str, Align)>,
    rows: Vec<(bool, Vec<String>)>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(columns: &[(&'static str, Align)]) -> Self {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; `flagged` rows are highlighted. Control characters in cells become
    /// spaces so a cell cannot break the layout; missing cells are empty.
    pub fn row(&mut self, flagged: bool, cells: Vec<String>) {
        let mut cells: Vec<String> = cells.iter().map(|c| sanitize(c)).collect();
        cells.resize(self.columns.len(), String::new());
        self.rows.push((flagged, cells));
    }

    /// The table's lines, each ending in a newline, without trailing spaces.
    pub fn render(&self, color: bool) -> String {
        let mut widths: Vec<usize> = self.columns.iter().map(|(h, _)| h.len()).collect();
        for (_, cells) in &self.rows {
            for (w, c) in widths.iter_mut().zip(cells) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |flagged: bool, cells: &mut dyn Iterator<Item = &str>| -> String {
            let mut s = String::from(if flagged { FLAG } else { " " });
            for (((_, align), w), c) in self.columns.iter().zip(&widths).zip(cells) {
                s.push_str("  ");
                let pad = w.saturating_sub(c.chars().count());
                match align {
                    Align::Left => {
                        s.push_str(c);
                        s.extend(std::iter::repeat_n(' ', pad));
                    }
                    Align::Right => {
                        s.extend(std::iter::repeat_n(' ', pad));
                        s.push_str(c);
                    }
                }
            }
            s.truncate(s.trim_end().len());
            s
        };
        let mut out = String::new();
        let header = line(false, &mut self.columns.iter().map(|(h, _)| *h));
        push_line(&mut out, &header, color.then_some(BOLD));
        for (flagged, cells) in &self.rows {
            let text = line(*flagged, &mut cells.iter().map(String::as_str));
            push_line(&mut out, &text, (color && *flagged).then_some(RED));
        }
        out
    }
}

fn push_line(out: &mut String, text: &str, style: Option<&str>) {
    match style {
        Some(style) => {
            out.push_str(style);
            out.push_str(text);
            out.push_str(RESET);
        }
        None => out.push_str(text),
    }
    out.push('\n');
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// How far the slowest replica's state machine is behind the commit: the committed
/// index minus the lowest applied index among the replicas that answered. The committed
/// index is the leader's, or without a leader the highest any replica knows. `None` when
/// no replica answered.
pub fn partition_lag(p: &PartitionView) -> Option<u64> {
    let min_applied = p.replica_views.iter().map(|v| v.applied_index).min()?;
    let committed = match p.leader {
        Some(_) => p.committed_index,
        None => p
            .replica_views
            .iter()
            .map(|v| v.committed_index)
            .max()
            .unwrap_or(p.committed_index),
    };
    Some(committed.saturating_sub(min_applied))
}

/// The replica list with the leader starred, e.g. `1*,2,3`.
pub fn replicas_cell(p: &PartitionView) -> String {
    p.replicas
        .iter()
        .map(|r| {
            if Some(*r) == p.leader {
                format!("{r}*")
            } else {
                r.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "NO"
    }
}

/// The nodes table: ID, API, CLUSTER, REACHABLE, ERROR; unreachable nodes are flagged.
pub fn nodes_table(nodes: &[NodeView]) -> Table {
    let mut t = Table::new(&[
        ("ID", Align::Right),
        ("STATE", Align::Left),
        ("API", Align::Left),
        ("CLUSTER", Align::Left),
        ("REACHABLE", Align::Left),
        ("FILES", Align::Right),
        ("ERROR", Align::Left),
    ]);
    for n in nodes {
        t.row(
            !n.reachable,
            vec![
                n.id.to_string(),
                n.state.as_deref().map_or_else(|| "-".to_string(), sanitize),
                n.api_addr.clone(),
                n.cluster_addr.clone(),
                yes_no(n.reachable).to_string(),
                n.file_bytes
                    .map_or_else(|| "-".to_string(), crate::format::human_bytes),
                n.error.clone().unwrap_or_else(|| "-".to_string()),
            ],
        );
    }
    t
}

/// The partitions table: GROUP, LEADER, TERM, LAST, COMMITTED, APPLIED, LAG, REPLICAS,
/// STATUS; unhealthy partitions are flagged.
pub fn partitions_table(partitions: &[PartitionView]) -> Table {
    let mut t = Table::new(&[
        ("GROUP", Align::Right),
        ("LEADER", Align::Right),
        ("TERM", Align::Right),
        ("LAST", Align::Right),
        ("COMMITTED", Align::Right),
        ("APPLIED", Align::Right),
        ("LAG", Align::Right),
        ("REPLICAS", Align::Left),
        ("STATUS", Align::Left),
    ]);
    for p in partitions {
        t.row(
            !p.healthy,
            vec![
                p.group.to_string(),
                p.leader.map_or_else(|| "-".to_string(), |l| l.to_string()),
                p.term.to_string(),
                p.last_index.to_string(),
                p.committed_index.to_string(),
                p.applied_index.to_string(),
                partition_lag(p).map_or_else(|| "-".to_string(), |l| l.to_string()),
                replicas_cell(p),
                if p.healthy { "ok" } else { "UNHEALTHY" }.to_string(),
            ],
        );
    }
    t
}

/// The closing line: partition and unhealthy counts, reachable nodes, and how many
/// leaders each node holds (every known node is listed, with `none=` for leaderless
/// groups), e.g. `65 partitions, 0 unhealthy, 1/1 nodes reachable; leaders per node: 1=65`.
pub fn summary_line(view: &ClusterView) -> String {
    let unhealthy = view.partitions.iter().filter(|p| !p.healthy).count();
    let reachable = view.nodes.iter().filter(|n| n.reachable).count();
    let mut leaders: BTreeMap<NodeId, usize> = view.nodes.iter().map(|n| (n.id, 0)).collect();
    let mut leaderless = 0usize;
    for p in &view.partitions {
        match p.leader {
            Some(l) => *leaders.entry(l).or_default() += 1,
            None => leaderless += 1,
        }
    }
    let mut per_node: Vec<String> = leaders.iter().map(|(n, c)| format!("{n}={c}")).collect();
    if leaderless > 0 {
        per_node.push(format!("none={leaderless}"));
    }
    let per_node = if per_node.is_empty() {
        "-".to_string()
    } else {
        per_node.join(" ")
    };
    format!(
        "{} partitions, {unhealthy} unhealthy, {reachable}/{} nodes reachable; leaders per node: {per_node}",
        view.partitions.len(),
        view.nodes.len(),
    )
}

/// The whole `admin cluster status` report: a header line, the NODES and PARTITIONS
/// tables and the summary. `color` adds ANSI colours (for terminals only).
pub fn render_cluster_status(view: &ClusterView, color: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "cluster {}  answered by node {}  metadata bootstrapped: {}",
        sanitize(&view.cluster_id),
        view.answered_by,
        yes_no(view.metadata_bootstrapped),
    );
    out.push_str("\nNODES\n");
    if view.nodes.is_empty() {
        out.push_str("  (none)\n");
    } else {
        out.push_str(&nodes_table(&view.nodes).render(color));
    }
    if !view.moves.is_empty() || view.rebalance_paused {
        let _ = writeln!(
            out,
            "\nREPLICA MOVES ({} in progress{})",
            view.moves.len(),
            if view.rebalance_paused {
                "; rebalancer paused"
            } else {
                ""
            }
        );
        for m in &view.moves {
            let _ = writeln!(
                out,
                "  partition {}: node {} -> node {}",
                m.group, m.remove, m.add
            );
        }
    }
    out.push_str("\nPARTITIONS\n");
    if view.partitions.is_empty() {
        out.push_str("  (none)\n");
    } else {
        out.push_str(&partitions_table(&view.partitions).render(color));
    }
    out.push('\n');
    let summary = summary_line(view);
    let attention = view.partitions.iter().any(|p| !p.healthy)
        || view.nodes.iter().any(|n| !n.reachable)
        || !view.metadata_bootstrapped;
    push_line(&mut out, &summary, (color && attention).then_some(RED));
    out
}

/// Pretty-prints JSON text that is known to be valid, keeping its key order and number
/// spelling (serde_json's `Value` would sort keys), in serde_json's pretty style.
pub fn pretty_json(raw: &str) -> String {
    fn newline(out: &mut String, indent: usize) {
        out.push('\n');
        out.extend(std::iter::repeat_n("  ", indent));
    }
    let mut out = String::with_capacity(raw.len() * 2);
    let mut indent = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                while chars.next_if(|c| c.is_ascii_whitespace()).is_some() {}
                if let Some(close) = chars.next_if(|c| *c == '}' || *c == ']') {
                    out.push(close);
                } else {
                    indent += 1;
                    newline(&mut out, indent);
                }
            }
            '}' | ']' => {
                indent = indent.saturating_sub(1);
                newline(&mut out, indent);
                out.push(c);
            }
            ',' => {
                out.push(',');
                newline(&mut out, indent);
            }
            ':' => out.push_str(": "),
            c if c.is_ascii_whitespace() => {}
            c => out.push(c),
        }
    }
    out
}
