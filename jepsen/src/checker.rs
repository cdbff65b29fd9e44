//! The checker: judges a history without trusting chatd's logic. It only knows what the
//! clients did and saw: which sends were invoked and acknowledged (with a seq), what
//! each read, sync and live delivery returned, and the final read of every chat from
//! every node after the faults were healed.
//!
//! Anomalies, per chat:
//! * **lost**: acknowledged, but absent from a final read;
//! * **duplicate**: one client_msg_id at two seqs, or one seq delivered twice to one
//!   connection;
//! * **inconsistent**: two different entries at one seq (across nodes, reads, acks or
//!   deliveries), or final reads of different lengths on different nodes;
//! * **gap**: a final read whose seqs are not exactly 1..=last;
//! * **non_monotonic**: a connection got a chat's messages with a seq below one it had;
//! * **unexpected**: a message text nobody sent;
//! * **stale_read**: a read or sync that began after an ack and does not reflect it;
//! * **receipt_backwards**: a pushed receipt (or a sync's read cursor) went down;
//! * **epoch_order**: in an end-to-end encrypted chat, the `mls_commit` entries of a final
//!   read (or of the part of the chat a read page shows) do not name the epochs 0, 1, 2, …
//!   in seq order (two commits for one epoch, or a skipped epoch), a welcome or an
//!   application message names an epoch the chat is not at (a welcome: the epoch its
//!   commit moved to; an application message: not past it), or an acknowledged E2E
//!   message is stored with another epoch than its send named.
//!
//! E2E messages (`e2e_send`, entry kinds `mls_application` and `mls_commit`) are held to
//! the rules of text messages, identified by their ciphertext (the entry's text).
//!
//! Also: availability (share of completed sends that succeeded) per fault, ack latency,
//! the longest time without any acknowledged write, and the membership changes (faults
//! named `membership add|remove|replace …`) with their durations.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::history::{Entry, Kind, Op, F};

/// Examples kept per anomaly kind (the counts are complete).
pub const EXAMPLES_PER_KIND_MAX: usize = 10;

/// The kinds of anomaly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    /// Acknowledged, missing from a final read.
    Lost,
    /// One message stored twice, or delivered twice to one connection.
    Duplicate,
    /// Two different entries at one seq.
    Inconsistent,
    /// A hole in a chat's seqs.
    Gap,
    /// Delivery to a connection went back in seq.
    NonMonotonic,
    /// A message nobody sent.
    Unexpected,
    /// A read that missed an earlier ack.
    StaleRead,
    /// A receipt cursor went down.
    ReceiptBackwards,
    /// An acknowledged upload answered as unknown (404, `unknown_file`) or missing from a
    /// final download.
    FileLost,
    /// A file whose bytes differ from what was sent: an acknowledged hash unlike the
    /// upload's, or a download hashing to something else.
    FileCorrupt,
    /// An E2E chat's commits not one per epoch in log order (0, 1, 2, … with no repeat
    /// and no gap, in every final read and in what each read page shows), a welcome or
    /// application message at an epoch the chat is not at, or an acknowledged E2E message
    /// stored with another epoch than the one its send named.
    EpochOrder,
}

impl AnomalyKind {
    /// Every kind, in report order.
    pub const ALL: [AnomalyKind; 11] = [
        AnomalyKind::Lost,
        AnomalyKind::Duplicate,
        AnomalyKind::Inconsistent,
        AnomalyKind::Gap,
        AnomalyKind::NonMonotonic,
        AnomalyKind::Unexpected,
        AnomalyKind::StaleRead,
        AnomalyKind::ReceiptBackwards,
        AnomalyKind::FileLost,
        AnomalyKind::FileCorrupt,
        AnomalyKind::EpochOrder,
    ];
}

/// One anomaly.
#[derive(Clone, Debug, Serialize)]
pub struct Anomaly {
    /// What kind.
    pub kind: AnomalyKind,
    /// In which chat.
    pub chat: String,
    /// What exactly.
    pub detail: String,
    /// Indexes of the operations that show it.
    pub ops: Vec<u64>,
}

/// Sends completed while one fault (or none) was active.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Availability {
    /// Sends that completed (ok, fail or info).
    pub completed: u64,
    /// Of which acknowledged.
    pub ok: u64,
    /// `ok / completed` (1 when nothing completed).
    pub share_ok: f64,
}

/// Latency figures in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

/// A fault as recorded: from its start to its heal.
#[derive(Clone, Debug, Serialize)]
pub struct Window {
    /// Its description.
    pub fault: String,
    /// Start, seconds since the run began.
    pub start_s: f64,
    /// End (heal), seconds since the run began (the run's end if never healed).
    pub end_s: f64,
}

/// One membership change, from its fault window.
#[derive(Clone, Debug, Serialize)]
pub struct MembershipChange {
    /// `add`, `remove` or `replace`.
    pub kind: String,
    /// The fault's description (`membership replace n2 by n5`).
    pub fault: String,
    /// Start, seconds since the run began.
    pub start_s: f64,
    /// From the request to its end: an added node active and ready; a removed node
    /// tombstoned (and, live, exited); a replaced node's replacement active and the old
    /// node tombstoned.
    pub duration_s: f64,
    /// Ended as asked (no error recorded, not cut off by the end of the run).
    pub ok: bool,
}

/// The membership changes of a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MembershipReport {
    /// Nodes added (on their own or before a removal at 3 nodes).
    pub adds: u64,
    /// Live nodes removed.
    pub removes: u64,
    /// Nodes replaced (killed, disk wiped, a new node added, the old one removed dead).
    pub replaces: u64,
    /// Changes that failed or did not end (their errors are in `fault_errors`).
    pub failed: u64,
    /// Every change, in order.
    pub changes: Vec<MembershipChange>,
}

impl MembershipReport {
    fn push(&mut self, fault: &str, start_s: f64, end_s: f64, ok: bool) {
        let kind = fault
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        if ok {
            match kind.as_str() {
                "add" => self.adds += 1,
                "remove" => self.removes += 1,
                "replace" => self.replaces += 1,
                _ => {}
            }
        } else {
            self.failed += 1;
        }
        self.changes.push(MembershipChange {
            kind,
            fault: fault.to_string(),
            start_s,
            duration_s: end_s - start_s,
            ok,
        });
    }

    /// Durations (s) of the changes of `kind` that ended as asked.
    pub fn durations(&self, kind: &str) -> Vec<f64> {
        self.changes
            .iter()
            .filter(|c| c.ok && c.kind == kind)
            .map(|c| c.duration_s)
            .collect()
    }
}

/// The checker's verdict and figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Results {
    /// No anomaly and every chat read back from every node.
    pub valid: bool,
    /// Anomalies per kind.
    pub counts: BTreeMap<AnomalyKind, u64>,
    /// Up to [`EXAMPLES_PER_KIND_MAX`] examples per kind.
    pub examples: Vec<Anomaly>,
    /// Why the history cannot be fully judged (a final read that failed, …).
    pub incomplete: Vec<String>,
    /// Send attempts invoked.
    pub sends_invoked: u64,
    /// Attempts acknowledged.
    pub sends_ok: u64,
    /// Attempts refused.
    pub sends_failed: u64,
    /// Attempts with unknown outcome.
    pub sends_info: u64,
    /// Distinct messages acknowledged.
    pub messages_acked: u64,
    /// Live deliveries observed.
    pub deliveries: u64,
    /// Reads and syncs that completed.
    pub reads_ok: u64,
    /// Chats × nodes read back at the end.
    pub final_reads: u64,
    /// Availability per fault ("none": no fault active).
    pub availability: BTreeMap<String, Availability>,
    /// Send → ack latency of acknowledged attempts.
    pub ack_latency_ms: Latency,
    /// The longest time with no send acknowledged, while sends were being made.
    pub longest_unavailable_ms: f64,
    /// When that began, seconds since the run began.
    pub longest_unavailable_at_s: f64,
    /// The longest time one chat had no send acknowledged while sends to it were being
    /// made: what a person in that chat sees when its partition's leader fails.
    pub longest_chat_gap_ms: f64,
    /// The chat of that gap.
    pub longest_chat_gap_chat: String,
    /// When that gap began, seconds since the run began.
    pub longest_chat_gap_at_s: f64,
    /// The faults.
    pub windows: Vec<Window>,
    /// Faults that could not be applied or healed as asked (e.g. a node that did not
    /// exit cleanly after SIGTERM); not anomalies of chatd's guarantees, but reported.
    pub fault_errors: Vec<String>,
    /// Membership changes: counts and durations.
    pub membership: MembershipReport,
    /// The file workload.
    pub files: FileStats,
    /// The end-to-end encrypted chats.
    pub e2e: E2eStats,
}

/// What the E2E workload did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct E2eStats {
    /// Application messages: send attempts, distinct messages acknowledged.
    pub sends: u64,
    pub messages_acked: u64,
    /// Commits: attempts (the setup's included), distinct commits acknowledged, attempts
    /// refused `stale_epoch` (another commit took the epoch first).
    pub commits: u64,
    pub commits_acked: u64,
    pub commits_stale: u64,
    /// The highest epoch an E2E chat reached in its final reads (commits stored).
    pub epoch_max: u64,
}

/// What the file workload did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FileStats {
    /// Uploads invoked, acknowledged, refused, of unknown outcome.
    pub uploads: u64,
    pub uploads_ok: u64,
    pub uploads_failed: u64,
    pub uploads_info: u64,
    /// Messages acknowledged that attach a file.
    pub attached: u64,
    /// Downloads during the run that completed, and final downloads (files × nodes).
    pub downloads_ok: u64,
    pub final_downloads: u64,
}

impl Results {
    /// Anomalies in total.
    pub fn anomalies(&self) -> u64 {
        self.counts.values().sum()
    }

    /// One line for people.
    pub fn verdict(&self) -> String {
        let mut s = if self.valid {
            "VALID: no anomaly".to_string()
        } else if self.anomalies() > 0 {
            let kinds: Vec<String> = self
                .counts
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(k, n)| {
                    format!(
                        "{n} {}",
                        serde_json::to_value(k).map_or_else(
                            |_| format!("{k:?}"),
                            |v| v.as_str().unwrap_or_default().to_string()
                        )
                    )
                })
                .collect();
            format!("INVALID: {}", kinds.join(", "))
        } else {
            format!("UNKNOWN: {}", self.incomplete.join("; "))
        };
        s.push_str(&format!(
            " · {} messages acked of {} send attempts ({} unknown, {} failed), {} deliveries, {} final reads · ack p99 {:.1} ms · longest write unavailability {:.0} ms",
            self.messages_acked,
            self.sends_invoked,
            self.sends_info,
            self.sends_failed,
            self.deliveries,
            self.final_reads,
            self.ack_latency_ms.p99,
            self.longest_unavailable_ms
        ));
        if !self.longest_chat_gap_chat.is_empty() {
            s.push_str(&format!(
                " · longest write gap of one chat {:.0} ms ({} at {:.1} s)",
                self.longest_chat_gap_ms, self.longest_chat_gap_chat, self.longest_chat_gap_at_s
            ));
        }
        s
    }
}

struct Report {
    counts: BTreeMap<AnomalyKind, u64>,
    examples: Vec<Anomaly>,
}

impl Report {
    fn add(&mut self, kind: AnomalyKind, chat: &str, detail: String, ops: Vec<u64>) {
        let n = self.counts.entry(kind).or_insert(0);
        *n += 1;
        if self.examples.iter().filter(|a| a.kind == kind).count() < EXAMPLES_PER_KIND_MAX {
            self.examples.push(Anomaly {
                kind,
                chat: chat.to_string(),
                detail,
                ops,
            });
        }
    }
}

/// An acknowledged send.
struct Ack {
    msg: String,
    seq: u64,
    at_us: u64,
    op: u64,
    /// The entry kind it must be stored as: `text`, or `mls_application` / `mls_commit`.
    kind: String,
    /// E2E: the epoch its send named.
    epoch: Option<u64>,
}

/// The log entry kind of a send with MLS kind `mls` (none: a text message).
fn entry_kind(mls: Option<&str>) -> String {
    match mls {
        None => "text".to_string(),
        Some(k) => format!("mls_{k}"),
    }
}

/// Entry kinds of messages the workload sends: each must have been sent, once.
fn is_sent_kind(kind: &str) -> bool {
    matches!(
        kind,
        "text" | "mls_application" | "mls_commit" | "mls_proposal"
    )
}

/// The epoch violations of `entries` (a contiguous part of an E2E chat's log, in seq
/// order): commits must name 0, 1, 2, … from the chat's start, each the epoch the one
/// before it moved to; a welcome names the epoch its commit moved to; an application
/// message or proposal names none past the chat's. When `entries` does not begin at seq 1,
/// the epoch is known from the first commit shown on. (After a wrong commit the check goes
/// on from the later of the two epochs, so one wrong commit is one violation.)
fn epoch_violations(entries: &[Entry]) -> Vec<String> {
    let mut out = Vec::new();
    let mut at: Option<u64> = (entries.first().map(|e| e.seq) == Some(1)).then_some(0);
    for e in entries {
        let Some(epoch) = e.epoch else {
            if e.kind.starts_with("mls_") {
                out.push(format!("{} at seq {} has no epoch", e.kind, e.seq));
            }
            continue;
        };
        match e.kind.as_str() {
            "mls_commit" => {
                if let Some(now) = at.filter(|now| *now != epoch) {
                    out.push(format!(
                        "the commit at seq {} names epoch {epoch}, the chat is at epoch {now} \
                         ({})",
                        e.seq,
                        if epoch < now {
                            "a second commit for one epoch"
                        } else {
                            "an epoch skipped"
                        }
                    ));
                }
                // A repeat leaves the epoch past both; a skip moves it past the one named.
                at = Some(at.map_or(epoch, |now| now.max(epoch)) + 1);
            }
            "mls_welcome" => {
                if let Some(now) = at.filter(|now| *now != epoch) {
                    out.push(format!(
                        "the welcome at seq {} names epoch {epoch}, the chat is at epoch {now}",
                        e.seq
                    ));
                }
            }
            "mls_application" | "mls_proposal" => {
                if let Some(now) = at.filter(|now| epoch > *now) {
                    out.push(format!(
                        "the {} at seq {} names epoch {epoch}, ahead of the chat's {now}",
                        e.kind, e.seq
                    ));
                }
            }
            _ => {}
        }
    }
    out
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

/// Judges a history.
pub fn check(ops: &[Op]) -> Results {
    let mut r = Report {
        counts: AnomalyKind::ALL.iter().map(|k| (*k, 0)).collect(),
        examples: Vec::new(),
    };
    let mut res = Results::default();
    let end_us = ops.last().map_or(0, |o| o.time_us);

    // Fault windows (and whether each went as asked).
    let mut open: HashMap<String, (u64, bool)> = HashMap::new();
    for op in ops.iter().filter(|o| o.f == Some(F::Fault)) {
        let name = op.fault.clone().unwrap_or_default();
        if let Some(e) = &op.error {
            res.fault_errors.push(format!("{name}: {e}"));
        }
        match op.kind {
            Some(Kind::Invoke) => {
                open.insert(name, (op.time_us, op.error.is_none()));
            }
            Some(_) => {
                if let Some((start, ok)) = open.remove(&name) {
                    if name.starts_with("membership ") {
                        res.membership.push(
                            &name,
                            secs(start),
                            secs(op.time_us),
                            ok && op.error.is_none(),
                        );
                    }
                    res.windows.push(Window {
                        fault: name,
                        start_s: secs(start),
                        end_s: secs(op.time_us),
                    });
                }
            }
            None => {}
        }
    }
    for (name, (start, _)) in open {
        if name.starts_with("membership ") {
            res.membership.push(&name, secs(start), secs(end_us), false);
        }
        res.windows.push(Window {
            fault: name,
            start_s: secs(start),
            end_s: secs(end_us),
        });
    }
    res.windows.sort_by(|a, b| a.start_s.total_cmp(&b.start_s));
    res.membership
        .changes
        .sort_by(|a, b| a.start_s.total_cmp(&b.start_s));
    // The fault begun last of those active at `t_us` (a fault during a membership change
    // that is still going on counts as that fault).
    let fault_at = |t_us: u64| -> String {
        let t = secs(t_us);
        res.windows
            .iter()
            .filter(|w| w.start_s <= t && t <= w.end_s)
            .map(|w| w.fault.clone())
            .next_back()
            .unwrap_or_else(|| "none".to_string())
    };

    // Pair each completion with its process's invoke.
    let mut pending: HashMap<&str, &Op> = HashMap::new();
    let mut invoked_msgs: HashSet<&str> = HashSet::new();
    let mut acks: BTreeMap<String, Vec<Ack>> = BTreeMap::new();
    let mut latencies: Vec<f64> = Vec::new();
    let mut ack_times: Vec<u64> = Vec::new();
    let mut send_times: Vec<u64> = Vec::new();
    // Per chat: the first send, and each ack's time.
    let mut chat_first_send: HashMap<String, u64> = HashMap::new();
    let mut chat_acks: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut availability: BTreeMap<String, Availability> = BTreeMap::new();
    // (read op, its invoke time)
    let mut reads: Vec<(&Op, u64)> = Vec::new();
    let mut syncs: Vec<(&Op, u64)> = Vec::new();
    let mut finals: BTreeMap<String, Vec<(&Op, Option<u64>)>> = BTreeMap::new();
    let mut final_failures: Vec<String> = Vec::new();
    for op in ops {
        let (Some(kind), Some(f)) = (op.kind, op.f) else {
            continue;
        };
        if !matches!(f, F::Send | F::Read | F::Sync | F::FinalRead) {
            continue;
        }
        if kind == Kind::Invoke {
            if f == F::Send {
                res.sends_invoked += 1;
                send_times.push(op.time_us);
                if let Some(chat) = &op.chat {
                    chat_first_send.entry(chat.clone()).or_insert(op.time_us);
                }
                if let Some(m) = &op.msg {
                    invoked_msgs.insert(m);
                }
                match op.mls.as_deref() {
                    Some("commit") => res.e2e.commits += 1,
                    Some(_) => res.e2e.sends += 1,
                    None => {}
                }
            }
            pending.insert(&op.process, op);
            continue;
        }
        let Some(inv) = pending.remove(op.process.as_str()) else {
            continue;
        };
        if inv.f != Some(f) {
            continue;
        }
        match f {
            F::Send => {
                let a = availability.entry(fault_at(op.time_us)).or_default();
                a.completed += 1;
                match kind {
                    Kind::Ok => {
                        a.ok += 1;
                        res.sends_ok += 1;
                        latencies.push((op.time_us.saturating_sub(inv.time_us)) as f64 / 1000.0);
                        ack_times.push(op.time_us);
                        if let Some(chat) = &inv.chat {
                            chat_acks.entry(chat.clone()).or_default().push(op.time_us);
                        }
                        if let (Some(chat), Some(msg), Some(seq)) = (&inv.chat, &inv.msg, op.seq) {
                            acks.entry(chat.clone()).or_default().push(Ack {
                                msg: msg.clone(),
                                seq,
                                at_us: op.time_us,
                                op: op.index,
                                kind: entry_kind(inv.mls.as_deref()),
                                epoch: inv.epoch,
                            });
                        }
                    }
                    Kind::Fail => {
                        res.sends_failed += 1;
                        if inv.mls.as_deref() == Some("commit")
                            && op
                                .error
                                .as_deref()
                                .is_some_and(|e| e.starts_with("stale_epoch"))
                        {
                            res.e2e.commits_stale += 1;
                        }
                    }
                    _ => res.sends_info += 1,
                }
            }
            F::Read if kind == Kind::Ok => {
                res.reads_ok += 1;
                reads.push((op, inv.time_us));
            }
            F::Sync if kind == Kind::Ok => {
                res.reads_ok += 1;
                syncs.push((op, inv.time_us));
            }
            F::FinalRead => {
                let chat = inv.chat.clone().unwrap_or_default();
                if kind == Kind::Ok {
                    res.final_reads += 1;
                    finals.entry(chat).or_default().push((op, inv.node));
                } else {
                    final_failures.push(format!(
                        "final read of {chat} from node {} failed: {}",
                        inv.node.unwrap_or(0),
                        op.error.clone().unwrap_or_default()
                    ));
                }
            }
            _ => {}
        }
    }
    for a in availability.values_mut() {
        a.share_ok = if a.completed == 0 {
            1.0
        } else {
            a.ok as f64 / a.completed as f64
        };
    }
    res.availability = availability;
    latencies.sort_by(f64::total_cmp);
    res.ack_latency_ms = Latency {
        count: latencies.len() as u64,
        p50: percentile(&latencies, 50.0),
        p99: percentile(&latencies, 99.0),
        max: latencies.last().copied().unwrap_or(0.0),
    };
    // The longest stretch without an ack, from the first send to the last ack.
    if let (Some(first), Some(_)) = (send_times.iter().min(), ack_times.last()) {
        let mut prev = *first;
        for t in &ack_times {
            let gap = t.saturating_sub(prev);
            if gap as f64 / 1000.0 > res.longest_unavailable_ms {
                res.longest_unavailable_ms = gap as f64 / 1000.0;
                res.longest_unavailable_at_s = secs(prev);
            }
            prev = prev.max(*t);
        }
    }

    // The same per chat: from its first send, the longest stretch between acks.
    for (chat, times) in &mut chat_acks {
        times.sort_unstable();
        let Some(mut prev) = chat_first_send.get(chat).copied() else {
            continue;
        };
        for t in times.iter() {
            let gap = t.saturating_sub(prev) as f64 / 1000.0;
            if gap > res.longest_chat_gap_ms {
                res.longest_chat_gap_ms = gap;
                res.longest_chat_gap_chat = chat.clone();
                res.longest_chat_gap_at_s = secs(prev);
            }
            prev = prev.max(*t);
        }
    }

    // Every observation of (chat, seq) → entry, and (chat, msg) → seq.
    let mut at_seq: HashMap<(String, u64), (String, String, u64)> = HashMap::new();
    let mut msg_seq: HashMap<(String, String), (u64, u64)> = HashMap::new();
    let mut reported_seq: HashSet<(String, u64)> = HashSet::new();
    let mut reported_msg: HashSet<(String, String)> = HashSet::new();
    let mut unexpected: HashSet<(String, String)> = HashSet::new();
    let mut observe = |r: &mut Report, chat: &str, seq: u64, kind: &str, text: &str, op: u64| {
        let key = (chat.to_string(), seq);
        match at_seq.get(&key) {
            None => {
                at_seq.insert(key, (kind.to_string(), text.to_string(), op));
            }
            Some((k, t, first)) if k != kind || t != text => {
                if reported_seq.insert((chat.to_string(), seq)) {
                    r.add(
                        AnomalyKind::Inconsistent,
                        chat,
                        format!(
                            "seq {seq} holds {k} {t:?} (op {first}) and {kind} {text:?} (op {op})"
                        ),
                        vec![*first, op],
                    );
                }
            }
            Some(_) => {}
        }
        if !is_sent_kind(kind) {
            return;
        }
        if !invoked_msgs.contains(text) {
            if unexpected.insert((chat.to_string(), text.to_string())) {
                r.add(
                    AnomalyKind::Unexpected,
                    chat,
                    format!("{text:?} at seq {seq} was never sent"),
                    vec![op],
                );
            }
            return;
        }
        let mkey = (chat.to_string(), text.to_string());
        match msg_seq.get(&mkey) {
            None => {
                msg_seq.insert(mkey, (seq, op));
            }
            Some((s, first)) if *s != seq => {
                if reported_msg.insert(mkey) {
                    r.add(
                        AnomalyKind::Duplicate,
                        chat,
                        format!(
                            "{text:?} is stored at seq {s} (op {first}) and seq {seq} (op {op})"
                        ),
                        vec![*first, op],
                    );
                }
            }
            Some(_) => {}
        }
    };
    for (chat, list) in &acks {
        for a in list {
            observe(&mut r, chat, a.seq, &a.kind, &a.msg, a.op);
        }
    }
    let entries_of = |op: &Op| -> Vec<Entry> { op.entries.clone().unwrap_or_default() };
    for (op, _) in &reads {
        let chat = op.chat.clone().unwrap_or_default();
        for e in entries_of(op) {
            observe(&mut r, &chat, e.seq, &e.kind, &e.text, op.index);
        }
    }
    for (chat, list) in &finals {
        for (op, _) in list {
            for e in entries_of(op) {
                observe(&mut r, chat, e.seq, &e.kind, &e.text, op.index);
            }
        }
    }

    // Live delivery, per connection and chat: strictly increasing seqs, each once.
    let mut last_delivered: HashMap<(String, u64, String), (u64, u64)> = HashMap::new();
    // (process, session, chat, user) → (delivered, read, op)
    type ReceiptKey = (String, u64, String, String);
    let mut receipts: HashMap<ReceiptKey, (u64, u64, u64)> = HashMap::new();
    for op in ops {
        if op.is(Kind::Ok, F::Deliver) {
            res.deliveries += 1;
            let (Some(chat), Some(seq)) = (&op.chat, op.seq) else {
                continue;
            };
            let kind = op
                .entries
                .as_ref()
                .and_then(|e| e.first())
                .map(|e| e.kind.clone());
            let text = op.msg.clone().unwrap_or_default();
            observe(
                &mut r,
                chat,
                seq,
                kind.as_deref().unwrap_or("text"),
                &text,
                op.index,
            );
            let key = (op.process.clone(), op.session.unwrap_or(0), chat.clone());
            if let Some((prev, prev_op)) = last_delivered.get(&key) {
                if seq == *prev {
                    r.add(
                        AnomalyKind::Duplicate,
                        chat,
                        format!(
                            "seq {seq} delivered twice to {} session {}",
                            op.process, key.1
                        ),
                        vec![*prev_op, op.index],
                    );
                } else if seq < *prev {
                    r.add(
                        AnomalyKind::NonMonotonic,
                        chat,
                        format!(
                            "{} session {} got seq {seq} after seq {prev}",
                            op.process, key.1
                        ),
                        vec![*prev_op, op.index],
                    );
                }
            }
            let best = last_delivered.get(&key).map_or(seq, |(p, _)| (*p).max(seq));
            last_delivered.insert(key, (best, op.index));
        } else if op.is(Kind::Ok, F::ReceiptSeen) {
            let (Some(chat), Some(user)) = (&op.chat, &op.user) else {
                continue;
            };
            let (d, rd) = (op.delivered.unwrap_or(0), op.read.unwrap_or(0));
            let key = (
                op.process.clone(),
                op.session.unwrap_or(0),
                chat.clone(),
                user.clone(),
            );
            if let Some((pd, pr, prev_op)) = receipts.get(&key) {
                if d < *pd || rd < *pr {
                    r.add(
                        AnomalyKind::ReceiptBackwards,
                        chat,
                        format!(
                            "{user}'s receipt went from delivered {pd}/read {pr} to {d}/{rd} at {}",
                            op.process
                        ),
                        vec![*prev_op, op.index],
                    );
                }
            }
            let (pd, pr) = receipts.get(&key).map_or((0, 0), |(a, b, _)| (*a, *b));
            receipts.insert(key, (pd.max(d), pr.max(rd), op.index));
        }
    }

    // Stale reads: the highest seq acked before the read began must be reflected.
    let mut acked_by_time: HashMap<&str, Vec<(u64, u64, u64)>> = HashMap::new();
    for (chat, list) in &acks {
        let mut v: Vec<(u64, u64, u64)> = list.iter().map(|a| (a.at_us, a.seq, a.op)).collect();
        v.sort_unstable();
        // Running maximum of seq over time.
        let mut best = (0u64, 0u64);
        for x in &mut v {
            if x.1 > best.0 {
                best = (x.1, x.2);
            }
            x.1 = best.0;
            x.2 = best.1;
        }
        acked_by_time.insert(chat.as_str(), v);
    }
    let acked_before = |chat: &str, t_us: u64| -> Option<(u64, u64)> {
        let v = acked_by_time.get(chat)?;
        let i = v.partition_point(|x| x.0 < t_us);
        (i > 0).then(|| (v[i - 1].1, v[i - 1].2))
    };
    for (op, invoked) in &reads {
        let chat = op.chat.clone().unwrap_or_default();
        let high = op
            .entries
            .as_ref()
            .and_then(|e| e.iter().map(|e| e.seq).max())
            .unwrap_or(0);
        if let Some((seq, ack_op)) = acked_before(&chat, *invoked) {
            if high < seq {
                r.add(
                    AnomalyKind::StaleRead,
                    &chat,
                    format!("a read begun after seq {seq} was acked returned up to seq {high}"),
                    vec![ack_op, op.index],
                );
            }
        }
    }
    let mut own_read: HashMap<(String, String), (u64, u64)> = HashMap::new();
    for (op, invoked) in &syncs {
        for c in op.cursors.clone().unwrap_or_default() {
            if let Some((seq, ack_op)) = acked_before(&c.chat, *invoked) {
                if c.last_seq < seq {
                    r.add(
                        AnomalyKind::StaleRead,
                        &c.chat,
                        format!(
                            "a sync begun after seq {seq} was acked says last seq {}",
                            c.last_seq
                        ),
                        vec![ack_op, op.index],
                    );
                }
            }
            let key = (op.process.clone(), c.chat.clone());
            if let Some((prev, prev_op)) = own_read.get(&key) {
                if c.read < *prev {
                    r.add(
                        AnomalyKind::ReceiptBackwards,
                        &c.chat,
                        format!(
                            "{}'s read cursor went from {prev} to {} between syncs",
                            op.process, c.read
                        ),
                        vec![*prev_op, op.index],
                    );
                }
            }
            let best = own_read.get(&key).map_or(c.read, |(p, _)| (*p).max(c.read));
            own_read.insert(key, (best, op.index));
        }
    }

    // Final reads: whole, gapless, the same length everywhere, holding every ack.
    for (chat, list) in &finals {
        let mut lengths: Vec<(u64, usize, u64)> = Vec::new();
        for (op, node) in list {
            let entries = entries_of(op);
            lengths.push((node.unwrap_or(0), entries.len(), op.index));
            for (i, e) in entries.iter().enumerate() {
                let want = i as u64 + 1;
                if e.seq != want {
                    r.add(
                        AnomalyKind::Gap,
                        chat,
                        format!(
                            "the final read from node {} has seq {} where seq {want} belongs",
                            node.unwrap_or(0),
                            e.seq
                        ),
                        vec![op.index],
                    );
                    break;
                }
            }
            let have: HashSet<(&str, &str)> = entries
                .iter()
                .map(|e| (e.kind.as_str(), e.text.as_str()))
                .collect();
            for a in acks.get(chat).map(Vec::as_slice).unwrap_or_default() {
                if !have.contains(&(a.kind.as_str(), a.msg.as_str())) {
                    r.add(
                        AnomalyKind::Lost,
                        chat,
                        format!(
                            "{:?} acked at seq {} is missing from the final read of node {}",
                            a.msg,
                            a.seq,
                            node.unwrap_or(0)
                        ),
                        vec![a.op, op.index],
                    );
                }
            }
        }
        let min = lengths.iter().map(|l| l.1).min().unwrap_or(0);
        let max = lengths.iter().map(|l| l.1).max().unwrap_or(0);
        if min != max {
            let shown: Vec<String> = lengths
                .iter()
                .map(|(n, len, _)| format!("node {n}: {len}"))
                .collect();
            r.add(
                AnomalyKind::Inconsistent,
                chat,
                format!("final reads differ in length: {}", shown.join(", ")),
                lengths.iter().map(|l| l.2).collect(),
            );
        }
    }
    // E2E chats: one commit per epoch, in log order, in every final read and in what each
    // read page shows; every entry at one seq with one epoch; acknowledged E2E messages
    // stored with the epoch their send named.
    for (op, _) in &reads {
        let chat = op.chat.as_deref().unwrap_or_default();
        let mut entries = entries_of(op);
        entries.sort_by_key(|e| e.seq);
        for v in epoch_violations(&entries) {
            r.add(
                AnomalyKind::EpochOrder,
                chat,
                format!("a read page: {v}"),
                vec![op.index],
            );
        }
    }
    for (chat, list) in &finals {
        for (op, node) in list {
            let entries = entries_of(op);
            for v in epoch_violations(&entries) {
                r.add(
                    AnomalyKind::EpochOrder,
                    chat,
                    format!("the final read from node {}: {v}", node.unwrap_or(0)),
                    vec![op.index],
                );
            }
            let commits = entries.iter().filter(|e| e.kind == "mls_commit").count() as u64;
            res.e2e.epoch_max = res.e2e.epoch_max.max(commits);
        }
    }
    // Every E2E entry observed: (chat, seq) → (epoch, op, kind, text) of the first
    // observation; two epochs at one seq are inconsistent.
    let mut seq_epoch: HashMap<(&str, u64), (u64, u64, &str, &str)> = HashMap::new();
    let observed = reads
        .iter()
        .map(|(op, _)| *op)
        .chain(finals.values().flatten().map(|(op, _)| *op))
        .chain(ops.iter().filter(|o| o.is(Kind::Ok, F::Deliver)));
    for op in observed {
        let Some(chat) = op.chat.as_deref() else {
            continue;
        };
        for e in op.entries.as_deref().unwrap_or_default() {
            let Some(epoch) = e.epoch.filter(|_| e.kind.starts_with("mls_")) else {
                continue;
            };
            match seq_epoch.get(&(chat, e.seq)) {
                None => {
                    seq_epoch.insert((chat, e.seq), (epoch, op.index, &e.kind, &e.text));
                }
                Some((first, first_op, _, _)) if *first != epoch => {
                    if reported_seq.insert((chat.to_string(), e.seq)) {
                        r.add(
                            AnomalyKind::Inconsistent,
                            chat,
                            format!(
                                "seq {} is at epoch {first} (op {first_op}) and epoch {epoch} \
                                 (op {})",
                                e.seq, op.index
                            ),
                            vec![*first_op, op.index],
                        );
                    }
                }
                Some(_) => {}
            }
        }
    }
    for (chat, list) in &acks {
        for a in list {
            let Some(named) = a.epoch else {
                continue;
            };
            let Some((stored, seen_op, kind, text)) = seq_epoch.get(&(chat.as_str(), a.seq)) else {
                continue;
            };
            // (Another entry at the ack's seq is `inconsistent` or `lost`, not this.)
            if *kind == a.kind && *text == a.msg && *stored != named {
                r.add(
                    AnomalyKind::EpochOrder,
                    chat,
                    format!(
                        "{} acked at seq {} named epoch {named}, stored with epoch {stored}",
                        a.kind, a.seq
                    ),
                    vec![a.op, *seen_op],
                );
            }
        }
    }

    // A chat with acks but no final read at all cannot be judged.
    for chat in acks.keys() {
        if !finals.contains_key(chat) {
            final_failures.push(format!("no final read of {chat}"));
        }
    }
    res.incomplete = final_failures;
    check_files(ops, &mut r, &mut res);
    res.messages_acked = msg_seq
        .keys()
        .filter(|(chat, m)| {
            acks.get(chat)
                .is_some_and(|l| l.iter().any(|a| &a.msg == m))
        })
        .count() as u64;
    for list in acks.values() {
        let distinct = |kind: &str| {
            list.iter()
                .filter(|a| a.kind == kind)
                .map(|a| a.msg.as_str())
                .collect::<HashSet<_>>()
                .len() as u64
        };
        res.e2e.messages_acked += distinct("mls_application");
        res.e2e.commits_acked += distinct("mls_commit");
    }
    res.counts = r.counts;
    res.examples = r.examples;
    res.valid = res.anomalies() == 0 && res.incomplete.is_empty();
    res
}

mod files;
use files::check_files;

#[cfg(test)]
mod tests;
