//! The delivery verifier of `chat-cli bench` (pure: what was sent and what each connection
//! saw in, a [`Verdict`] out), the chats' layout and the tags that name each send.

use std::collections::{BTreeMap, HashMap, HashSet};

/// Examples of each anomaly kind kept for the report.
const EXAMPLES_PER_KIND: usize = 5;

// ---------------------------------------------------------------------------------------
// Verification (pure; see `verify`).
// ---------------------------------------------------------------------------------------

/// A chat as the verifier sees it.
#[derive(Clone, Debug)]
pub struct ChatSpec {
    /// The chat id.
    pub id: String,
    /// Member connections in join order: the creator first. A connection at position `p`
    /// of a group receives the `join` entries from seq `p + 1` on.
    pub members: Vec<usize>,
    /// Number of `join` entries at the start of the log (seqs `1..=joins`; 0 for direct chats).
    pub joins: u64,
    /// The last seq of the chat's log as read at the end (with `history`), if known.
    pub log_end: Option<u64>,
}

/// How a send ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// Acknowledged with this seq.
    Acked(u64),
    /// Refused with an error that guarantees nothing was written.
    Refused,
    /// No answer, or an answer that leaves the outcome open (`outcome_unknown`).
    Unknown,
}

/// One send of a connection (its index in the connection's list is its number `n`).
#[derive(Clone, Copy, Debug)]
pub struct SentMsg {
    /// Index of the chat in the chat list.
    pub chat: usize,
    /// How it ended.
    pub outcome: SendOutcome,
}

/// What a log entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A text message of the bench: send number `n` of connection `conn`.
    Text {
        /// The sending connection.
        conn: usize,
        /// The send's number on that connection.
        n: usize,
    },
    /// A `join` entry.
    Join,
    /// Anything else (the kind, or a description).
    Other(String),
}

/// One `message` push as a connection received it.
#[derive(Clone, Debug)]
pub struct Observed {
    /// Index of the chat in the chat list (out of range: a chat the bench did not make).
    pub chat: usize,
    /// The entry's seq.
    pub seq: u64,
    /// What it was.
    pub entry: Entry,
}

/// Kinds of anomaly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AnomalyKind {
    /// An entry a member connection never received, and `history` did not have it either.
    Lost,
    /// An entry a member connection did not receive live, found with `history`.
    RecoveredViaHistory,
    /// An entry a member connection did not receive live, not looked up (`history`
    /// failed, or the bench's budget of history requests was used up).
    MissedUnchecked,
    /// A connection received the same seq of a chat twice.
    Duplicated,
    /// A connection received a seq lower than one it had already received in that chat.
    Reordered,
    /// A seq of a chat's log that no ack, join or delivery accounts for.
    Gap,
    /// Two sends were acknowledged with the same seq.
    SeqConflict,
    /// A push the bench did not expect: a foreign chat, a non-member, wrong content, an
    /// entry that was never acknowledged, an `updated` push.
    Unexpected,
}

impl AnomalyKind {
    /// All kinds, in report order.
    pub const ALL: [AnomalyKind; 8] = [
        AnomalyKind::Lost,
        AnomalyKind::RecoveredViaHistory,
        AnomalyKind::MissedUnchecked,
        AnomalyKind::Duplicated,
        AnomalyKind::Reordered,
        AnomalyKind::Gap,
        AnomalyKind::SeqConflict,
        AnomalyKind::Unexpected,
    ];

    /// The name used in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            AnomalyKind::Lost => "lost",
            AnomalyKind::RecoveredViaHistory => "recovered_via_history",
            AnomalyKind::MissedUnchecked => "missed_unchecked",
            AnomalyKind::Duplicated => "duplicated",
            AnomalyKind::Reordered => "reordered",
            AnomalyKind::Gap => "gaps",
            AnomalyKind::SeqConflict => "seq_conflicts",
            AnomalyKind::Unexpected => "unexpected",
        }
    }
}

/// One anomaly, for the report.
#[derive(Clone, Debug)]
pub struct Anomaly {
    /// What went wrong.
    pub kind: AnomalyKind,
    /// In which chat (index; out of range for foreign chats).
    pub chat: usize,
    /// At which connection, when it concerns one.
    pub conn: Option<usize>,
    /// The seq concerned.
    pub seq: u64,
    /// A sentence.
    pub detail: String,
}

/// An expected entry a connection did not receive live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing {
    /// The member connection.
    pub conn: usize,
    /// The chat index.
    pub chat: usize,
    /// The seq.
    pub seq: u64,
    /// What should be at that seq.
    pub expect: Entry,
}

/// The verifier's findings.
#[derive(Clone, Debug, Default)]
pub struct Verdict {
    /// Deliveries expected: every entry of each chat (joins from the member's own on) ×
    /// its member connections.
    pub expected: u64,
    /// Expected deliveries that arrived with the right content (counted once).
    pub delivered: u64,
    /// Sends without a definite answer that turned out committed (seen delivered).
    pub unconfirmed_committed: u64,
    /// Expected entries not received live (to be classified with `history`).
    pub missing: Vec<Missing>,
    /// Anomalies by kind (misses count once classified).
    pub counts: BTreeMap<AnomalyKind, u64>,
    /// A few examples of each kind.
    pub examples: Vec<Anomaly>,
}

impl Verdict {
    /// Records an anomaly.
    pub fn add(
        &mut self,
        kind: AnomalyKind,
        chat: usize,
        conn: Option<usize>,
        seq: u64,
        detail: String,
    ) {
        let count = self.counts.entry(kind).or_insert(0);
        *count += 1;
        if *count <= EXAMPLES_PER_KIND as u64 {
            self.examples.push(Anomaly {
                kind,
                chat,
                conn,
                seq,
                detail,
            });
        }
    }

    /// How many anomalies of `kind`.
    pub fn count(&self, kind: AnomalyKind) -> u64 {
        self.counts.get(&kind).copied().unwrap_or(0)
    }

    /// All anomalies, live-delivery misses included (unclassified ones too).
    pub fn anomalies(&self) -> u64 {
        self.counts.values().sum::<u64>() + self.missing.len() as u64
    }
}

pub(super) fn describe(e: &Entry) -> String {
    match e {
        Entry::Text { conn, n } => format!("text b{conn}.{n}"),
        Entry::Join => "a join".to_string(),
        Entry::Other(k) => k.clone(),
    }
}

/// Checks what the connections received against what was acknowledged.
///
/// `sends[c][n]` is send `n` of connection `c`; `observed[c]` the `message` pushes
/// connection `c` received, in arrival order. Live-delivery misses are returned in
/// [`Verdict::missing`] (the caller classifies them with `history`); everything else is
/// counted in [`Verdict::counts`].
pub fn verify(chats: &[ChatSpec], sends: &[Vec<SentMsg>], observed: &[Vec<Observed>]) -> Verdict {
    let mut v = Verdict::default();
    // The log of each chat as far as the bench knows it: seq → entry.
    let mut log: Vec<HashMap<u64, Entry>> = chats
        .iter()
        .map(|c| (1..=c.joins).map(|s| (s, Entry::Join)).collect())
        .collect();
    for (conn, list) in sends.iter().enumerate() {
        for (n, s) in list.iter().enumerate() {
            let SendOutcome::Acked(seq) = s.outcome else {
                continue;
            };
            let Some(chat_log) = log.get_mut(s.chat) else {
                continue;
            };
            let this = Entry::Text { conn, n };
            match chat_log.get(&seq) {
                None => {
                    chat_log.insert(seq, this);
                }
                Some(prev) => {
                    let detail = format!(
                        "seq {seq} acknowledged for {} but already taken by {}",
                        describe(&this),
                        describe(prev)
                    );
                    v.add(AnomalyKind::SeqConflict, s.chat, Some(conn), seq, detail);
                }
            }
        }
    }
    // Sends without a definite answer that were delivered: committed after all.
    let mut unconfirmed: HashSet<(usize, usize)> = HashSet::new();
    for obs in observed {
        for o in obs {
            let Entry::Text { conn, n } = o.entry else {
                continue;
            };
            let Some(s) = sends.get(conn).and_then(|l| l.get(n)) else {
                continue;
            };
            if s.outcome != SendOutcome::Unknown || s.chat != o.chat || o.chat >= chats.len() {
                continue;
            }
            if unconfirmed.insert((conn, n)) {
                v.unconfirmed_committed += 1;
            }
            log[o.chat].entry(o.seq).or_insert(Entry::Text { conn, n });
        }
    }
    // Gaps: seqs up to the end of the log that nothing accounts for.
    for (ci, chat) in chats.iter().enumerate() {
        let known_end = log[ci].keys().copied().max().unwrap_or(0);
        let end = known_end.max(chat.log_end.unwrap_or(0));
        for seq in 1..=end {
            if !log[ci].contains_key(&seq) {
                let detail = if seq > known_end {
                    format!(
                        "the log of {} has seq {seq} that the bench never got acknowledged",
                        chat.id
                    )
                } else {
                    format!("no ack accounts for seq {seq} of {}", chat.id)
                };
                v.add(AnomalyKind::Gap, ci, None, seq, detail);
            }
        }
    }
    // Per connection: each expected entry once, in increasing seq order, right content.
    let mut member_chats: Vec<Vec<(usize, usize)>> = vec![Vec::new(); observed.len()];
    for (ci, chat) in chats.iter().enumerate() {
        for (pos, &m) in chat.members.iter().enumerate() {
            if let Some(list) = member_chats.get_mut(m) {
                list.push((ci, pos));
            }
        }
    }
    for (conn, obs) in observed.iter().enumerate() {
        let position: HashMap<usize, usize> = member_chats[conn].iter().copied().collect();
        // Per chat: seq → whether the content matched; and the highest seq so far.
        let mut seen: HashMap<usize, HashMap<u64, bool>> = HashMap::new();
        let mut last: HashMap<usize, u64> = HashMap::new();
        for o in obs {
            let Some(chat) = chats.get(o.chat) else {
                v.add(
                    AnomalyKind::Unexpected,
                    o.chat,
                    Some(conn),
                    o.seq,
                    format!(
                        "{} at seq {} of a chat the bench did not make",
                        describe(&o.entry),
                        o.seq
                    ),
                );
                continue;
            };
            let Some(&pos) = position.get(&o.chat) else {
                v.add(
                    AnomalyKind::Unexpected,
                    o.chat,
                    Some(conn),
                    o.seq,
                    format!(
                        "seq {} of {} pushed to a connection that is not a member",
                        o.seq, chat.id
                    ),
                );
                continue;
            };
            let chat_seen = seen.entry(o.chat).or_default();
            if chat_seen.contains_key(&o.seq) {
                v.add(
                    AnomalyKind::Duplicated,
                    o.chat,
                    Some(conn),
                    o.seq,
                    format!("seq {} of {} received twice", o.seq, chat.id),
                );
                continue;
            }
            let high = last.entry(o.chat).or_insert(0);
            if o.seq < *high {
                v.add(
                    AnomalyKind::Reordered,
                    o.chat,
                    Some(conn),
                    o.seq,
                    format!("seq {} of {} received after seq {}", o.seq, chat.id, *high),
                );
            } else {
                *high = o.seq;
            }
            let matched = match log[o.chat].get(&o.seq) {
                Some(Entry::Join) if o.entry == Entry::Join && o.seq <= pos as u64 => {
                    v.add(
                        AnomalyKind::Unexpected,
                        o.chat,
                        Some(conn),
                        o.seq,
                        format!(
                            "join at seq {} of {}, before this member joined",
                            o.seq, chat.id
                        ),
                    );
                    false
                }
                Some(expected) if *expected == o.entry => true,
                Some(expected) => {
                    v.add(
                        AnomalyKind::Unexpected,
                        o.chat,
                        Some(conn),
                        o.seq,
                        format!(
                            "seq {} of {} is {}, expected {}",
                            o.seq,
                            chat.id,
                            describe(&o.entry),
                            describe(expected)
                        ),
                    );
                    false
                }
                None => {
                    v.add(
                        AnomalyKind::Unexpected,
                        o.chat,
                        Some(conn),
                        o.seq,
                        format!(
                            "seq {} of {} ({}) was never acknowledged",
                            o.seq,
                            chat.id,
                            describe(&o.entry)
                        ),
                    );
                    false
                }
            };
            chat_seen.insert(o.seq, matched);
        }
        for &(ci, pos) in &member_chats[conn] {
            let chat_seen = seen.get(&ci);
            let mut expected: Vec<(&u64, &Entry)> = log[ci]
                .iter()
                .filter(|(seq, e)| !(**e == Entry::Join && **seq <= pos as u64))
                .collect();
            expected.sort_unstable_by_key(|(seq, _)| **seq);
            for (&seq, e) in expected {
                v.expected += 1;
                match chat_seen.and_then(|s| s.get(&seq)) {
                    Some(true) => v.delivered += 1,
                    Some(false) => {} // reported above
                    None => v.missing.push(Missing {
                        conn,
                        chat: ci,
                        seq,
                        expect: e.clone(),
                    }),
                }
            }
        }
    }
    v
}

// ---------------------------------------------------------------------------------------
// Chat layout.
// ---------------------------------------------------------------------------------------

/// The member connections of each chat, creator first: groups of `group_size` consecutive
/// connections (so consecutive members are on different nodes); direct chats between
/// distinct pairs (neighbours first).
pub fn plan_chats(
    connections: usize,
    chats: usize,
    group_size: usize,
) -> Result<Vec<Vec<usize>>, String> {
    if group_size <= 1 {
        if connections < 2 {
            return Err("direct chats (--group-size 1) need at least 2 connections".into());
        }
        let pairs = connections * (connections - 1) / 2;
        if chats > pairs {
            return Err(format!(
                "{connections} connections make only {pairs} distinct direct chats; --chats is {chats}"
            ));
        }
        let mut out = Vec::with_capacity(chats);
        let mut taken = HashSet::new();
        'outer: for d in 1..connections {
            for a in 0..connections {
                if out.len() == chats {
                    break 'outer;
                }
                let b = (a + d) % connections;
                if taken.insert((a.min(b), a.max(b))) {
                    out.push(vec![a, b]);
                }
            }
        }
        Ok(out)
    } else {
        if group_size > connections {
            return Err(format!(
                "groups of {group_size} need at least {group_size} connections; --connections is {connections}"
            ));
        }
        Ok((0..chats)
            .map(|i| {
                (0..group_size)
                    .map(|j| (i * group_size + j) % connections)
                    .collect()
            })
            .collect())
    }
}

/// The tag at the start of a bench text: `b<conn>.<n>`.
pub fn tag(conn: usize, n: usize) -> String {
    format!("b{conn}.{n}")
}

/// Reads the tag at the start of a text (up to the first space).
pub fn parse_tag(text: &str) -> Option<(usize, usize)> {
    let t = text.strip_prefix('b')?;
    let t = t.split(' ').next()?;
    let (c, n) = t.split_once('.')?;
    Some((c.parse().ok()?, n.parse().ok()?))
}
