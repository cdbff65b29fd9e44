//! The history of a run: every client operation as `invoke` then `ok`, `fail` or `info`
//! (outcome unknown), every observation (a pushed message, a pushed receipt) and every
//! fault, with the process, node and time. Written as JSON lines as it happens, and kept in
//! memory (up to a bound) for the checker.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::time::Instant;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// The phase of an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The client is about to do it.
    Invoke,
    /// It happened (for an observation: it was seen).
    Ok,
    /// It certainly did not happen.
    Fail,
    /// Unknown whether it happened (a timeout, a lost connection).
    Info,
}

/// What the operation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum F {
    /// Send `msg` (the client_msg_id, also the text) to `chat`; `ok` carries `seq`. In an
    /// E2E chat (`mls` set: `application` or `commit`, with the `epoch` named), an
    /// `e2e_send` whose `msg` is the base64 "ciphertext" (the entry's text).
    Send,
    /// Read the newest page of `chat`'s history; `ok` carries `entries`.
    Read,
    /// Sync: `ok` carries `cursors` (last seq and own read cursor per chat).
    Sync,
    /// Report own delivered/read cursors for `chat` (`seq`); fire-and-forget.
    Receipt,
    /// Observation: a message of `chat` pushed to this client's session `session`.
    Deliver,
    /// Observation: a receipt of `user` for `chat` pushed to this client's session.
    ReceiptSeen,
    /// The read of a whole chat from one node after the faults are healed.
    FinalRead,
    /// A fault starts (`invoke`) or is healed (`ok`); `fault` describes it.
    Fault,
    /// Upload a file of `size` bytes hashing to `sha256` (invoke); `ok` carries the `file`
    /// id and the SHA-256 the node answered.
    Upload,
    /// Download own `file`; `ok` carries the SHA-256 of the bytes read, `fail` the status.
    Download,
    /// The download of an acknowledged file from one node after the faults are healed.
    FinalDownload,
}

/// One log entry as read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Its seq in the chat.
    pub seq: u64,
    /// `text`, `join`, `leave`, …
    pub kind: String,
    /// Who wrote it.
    pub sender: String,
    /// The text (for the workload's messages: the client_msg_id; for E2E entries, the
    /// base64 MLS message).
    pub text: String,
    /// For E2E entries (`mls_*` kinds): the MLS epoch the sender named (a commit's: the
    /// epoch it moves the chat from; a welcome's: the epoch it joins at).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

/// A chat's cursors in a sync answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// The chat.
    pub chat: String,
    /// Its last seq.
    pub last_seq: u64,
    /// The syncing user's read cursor.
    pub read: u64,
}

/// One line of the history.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// Position in the history.
    pub index: u64,
    /// Microseconds since the run started.
    pub time_us: u64,
    /// `c<N>` for client N, `nemesis`, `final`.
    pub process: String,
    /// The phase.
    pub kind: Option<Kind>,
    /// What.
    pub f: Option<F>,
    /// The node the client talked to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    /// The client's connection number (deliveries are judged per connection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<u64>,
    /// The chat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat: Option<String>,
    /// The message's client_msg_id (= its text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg: Option<String>,
    /// A seq: of an ack, a delivered message, a receipt sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Entries of a read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<Vec<Entry>>,
    /// Whether `entries` is the whole chat from seq 1 (a final read) or its newest page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complete: Option<bool>,
    /// Cursors of a sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursors: Option<Vec<Cursor>>,
    /// For receipts seen: whose receipt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// For receipts seen: delivered and read cursors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered: Option<u64>,
    /// For receipts seen: the read cursor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read: Option<u64>,
    /// For faults: what it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
    /// Why it failed or is unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A file's id (uploads, downloads, and sends that attach it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// A file's SHA-256 (what was sent, what the node answered, what was read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// A file's size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// An E2E send: its MLS kind (`application`, `commit`), absent for a plain send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mls: Option<String>,
    /// An E2E send: the MLS epoch it named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

impl Op {
    /// An operation of `process`: `kind` of `f`; the other fields are set by the caller.
    pub fn new(process: &str, kind: Kind, f: F) -> Op {
        Op {
            process: process.to_string(),
            kind: Some(kind),
            f: Some(f),
            ..Op::default()
        }
    }

    /// Whether this is `kind` of `f`.
    pub fn is(&self, kind: Kind, f: F) -> bool {
        self.kind == Some(kind) && self.f == Some(f)
    }
}

/// Errors of the history file.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The file cannot be written or read.
    #[error("history file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A line is not an operation.
    #[error("history file {path} line {line}: {cause}")]
    Parse {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// The cause.
        cause: String,
    },
}

struct Inner {
    next: u64,
    out: BufWriter<File>,
    ops: Vec<Op>,
    write_error: Option<String>,
}

/// The recorder: numbers and timestamps operations, appends them to the JSONL file and
/// keeps them for the checker, up to `ops_max`.
pub struct History {
    start: Instant,
    ops_max: usize,
    inner: Mutex<Inner>,
}

impl History {
    /// A history written to `path`, holding at most `ops_max` operations.
    pub fn create(path: &Path, start: Instant, ops_max: usize) -> Result<History, HistoryError> {
        let file = File::create(path).map_err(|source| HistoryError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Ok(History {
            start,
            ops_max,
            inner: Mutex::new(Inner {
                next: 0,
                out: BufWriter::new(file),
                ops: Vec::new(),
                write_error: None,
            }),
        })
    }

    /// Microseconds since the run started.
    pub fn now_us(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Records `op` (its index and time are set here). `false` once the history holds
    /// `ops_max` operations: the op is dropped and the workload must stop.
    pub fn record(&self, mut op: Op) -> bool {
        let mut inner = self.inner.lock();
        if inner.ops.len() >= self.ops_max {
            return false;
        }
        op.index = inner.next;
        op.time_us = self.now_us();
        inner.next += 1;
        if inner.write_error.is_none() {
            let line = serde_json::to_string(&op).map_err(|e| e.to_string());
            let written = line.and_then(|l| writeln!(inner.out, "{l}").map_err(|e| e.to_string()));
            if let Err(e) = written {
                inner.write_error = Some(e);
            }
        }
        inner.ops.push(op);
        true
    }

    /// Whether the bound was reached.
    pub fn full(&self) -> bool {
        let inner = self.inner.lock();
        inner.ops.len() >= self.ops_max
    }

    /// The operations recorded so far (a copy; at most `ops_max`).
    pub fn snapshot(&self) -> Vec<Op> {
        self.inner.lock().ops.clone()
    }

    /// Flushes the file and returns the operations.
    pub fn finish(&self) -> Result<Vec<Op>, String> {
        let mut inner = self.inner.lock();
        if let Err(e) = inner.out.flush() {
            inner.write_error.get_or_insert(e.to_string());
        }
        match &inner.write_error {
            Some(e) => Err(e.clone()),
            None => Ok(inner.ops.clone()),
        }
    }
}

/// Reads a history file (to check a run again: `chatd-jepsen check FILE`).
pub fn load(path: &Path) -> Result<Vec<Op>, HistoryError> {
    let shown = path.display().to_string();
    let file = File::open(path).map_err(|source| HistoryError::Io {
        path: shown.clone(),
        source,
    })?;
    let mut ops = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| HistoryError::Io {
            path: shown.clone(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let op: Op = serde_json::from_str(&line).map_err(|e| HistoryError::Parse {
            path: shown.clone(),
            line: i + 1,
            cause: e.to_string(),
        })?;
        ops.push(op);
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn recorded_ops_round_trip_through_the_file_and_stop_at_the_bound() {
        let dir = std::env::temp_dir().join(format!("jepsen-history-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("history.jsonl");
        let h = History::create(&path, Instant::now(), 3).unwrap();
        let mut op = Op::new("c1", Kind::Invoke, F::Send);
        op.chat = Some("g:1".into());
        op.msg = Some("c1-1".into());
        assert!(h.record(op.clone()));
        let mut ok = Op::new("c1", Kind::Ok, F::Send);
        ok.seq = Some(7);
        assert!(h.record(ok));
        assert!(h.record(Op::new("nemesis", Kind::Invoke, F::Fault)));
        assert!(h.full());
        assert!(
            !h.record(Op::new("c2", Kind::Invoke, F::Send)),
            "over the bound"
        );
        let ops = h.finish().unwrap();
        assert_eq!(ops.len(), 3);
        assert_eq!(
            ops.iter().map(|o| o.index).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        let loaded = load(&path).unwrap();
        assert_eq!(loaded, ops);
        let first = serde_json::to_string(&ops[0]).unwrap();
        std::fs::write(&path, format!("{first}\nnot json\n")).unwrap();
        match load(&path) {
            Err(HistoryError::Parse { line, .. }) => assert_eq!(line, 2),
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn histories_without_e2e_fields_still_parse_and_plain_ops_write_none() {
        let old = r#"{"index":3,"time_us":9,"process":"c1","kind":"ok","f":"read","chat":"g:1","entries":[{"seq":1,"kind":"text","sender":"u1","text":"c1-1"}]}"#;
        let op: Op = serde_json::from_str(old).unwrap();
        let entries = op.entries.as_ref().unwrap();
        assert_eq!(
            (entries[0].epoch, op.mls.as_ref(), op.epoch),
            (None, None, None)
        );
        assert_eq!(serde_json::to_string(&op).unwrap(), old);
        let mut e2e = Op::new("c2", Kind::Invoke, F::Send);
        e2e.mls = Some("commit".into());
        e2e.epoch = Some(0);
        let line = serde_json::to_string(&e2e).unwrap();
        assert!(line.contains(r#""mls":"commit","epoch":0"#), "{line}");
        assert_eq!(serde_json::from_str::<Op>(&line).unwrap(), e2e);
    }
}
