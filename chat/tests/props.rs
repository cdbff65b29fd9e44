//! Property tests of the chat state machine, each run against real RocksDB through the
//! public `Applier` interface (one `ApplyTxn` per command, as a standalone transaction):
//!
//! * seqs are gapless: every chat's log holds exactly seqs 1..=last_seq, each entry at its
//!   own seq, and every reply that appended names the next seq;
//! * spans: a member's span starts at its join entry and ends at its leave entry, and each
//!   new entry is delivered to exactly the members whose span contains it;
//! * cursors only move forward, read ≤ delivered ≤ last seq;
//! * apply is deterministic: the same commands on two fresh replicas (separate databases)
//!   give the same replies, the same events and byte-identical records;
//! * a retried send (same chat, sender and client_msg_id, nothing in between) gets the
//!   original seq. (Nothing more about dedup: its expiry rules are asserted with it.)
//!
//! Case counts are bounded (`CASES`) so the suite stays fast; each test prints its count.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use chatd_chat::{
    chat_record, cursors, history, message, ChatApplier, ChatCommand, ChatEvent, ChatKind,
    ChatReply, PageRequest, ReceiptUpdate, DEDUP_WINDOW_MS_DEFAULT, GROUP_MEMBERS_MAX,
};
use chatd_raftlog::{scan_records, Applier, ApplyTxn, GroupId};
use chatd_storage::{NodeIdentity, Storage, StorageOptions};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const G: GroupId = 7;
const CASES: u32 = 64;
const USERS: [&str; 4] = ["a", "b", "c", "d"];
const GROUPS: [&str; 2] = ["g:1", "g:2"];

/// One replica: a fresh database and the chat applier.
struct Replica {
    _dir: tempfile::TempDir,
    store: Storage,
    applier: ChatApplier<fn(GroupId, Vec<ChatEvent>)>,
    index: u64,
}

fn ignore_events(_: GroupId, _: Vec<ChatEvent>) {}

impl Replica {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Storage::open(
            dir.path(),
            &NodeIdentity {
                cluster_id: "props".into(),
                node_id: 1,
            },
            &StorageOptions {
                block_cache_bytes: 1 << 20,
                write_buffer_bytes: 1 << 20,
                ..StorageOptions::default()
            },
        )
        .unwrap();
        Self {
            _dir: dir,
            store,
            applier: ChatApplier::new(ignore_events as fn(GroupId, Vec<ChatEvent>)),
            index: 0,
        }
    }

    /// Applies one command as one committed transaction: its reply and events.
    fn apply(&mut self, cmd: &ChatCommand) -> (ChatReply, Vec<ChatEvent>) {
        self.index += 1;
        let bytes = chatd_codec::encode(cmd).unwrap();
        let mut txn = ApplyTxn::standalone(G, &self.store);
        let reply = self.applier.apply(G, self.index, &bytes, &mut txn).unwrap();
        let events = txn
            .commit()
            .unwrap()
            .iter()
            .map(|e| chatd_codec::decode(e).unwrap())
            .collect();
        (chatd_codec::decode(&reply).unwrap(), events)
    }

    /// Every record of the group, keys and values as stored.
    fn records(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        scan_records(&self.store, G, b"", &[0xff; 16], usize::MAX).unwrap()
    }
}

/// A command in terms of small indexes, so shrinking finds small cases.
#[derive(Clone, Debug)]
enum Op {
    OpenDirect(usize),
    CreateGroup(usize, usize, Vec<usize>),
    AddMembers(usize, usize, Vec<usize>),
    Remove(usize, usize, usize),
    /// chat, sender, key, retried at once
    Send(usize, usize, u8, bool),
    Edit(usize, usize, u64),
    Delete(usize, usize, u64),
    Receipt(usize, usize, Option<u64>, Option<u64>),
}

fn chats() -> Vec<String> {
    let mut v: Vec<String> = GROUPS.iter().map(|g| g.to_string()).collect();
    v.extend([
        "d:a:b".to_string(),
        "d:b:c".to_string(),
        "d:a:d".to_string(),
    ]);
    v
}

fn op() -> impl Strategy<Value = Op> {
    let u = 0..USERS.len();
    let c = 0..5usize;
    let g = 0..GROUPS.len();
    prop_oneof![
        1 => (0..3usize).prop_map(Op::OpenDirect),
        1 => (g.clone(), u.clone(), prop::collection::vec(0..USERS.len(), 0..3))
            .prop_map(|(g, u, m)| Op::CreateGroup(g, u, m)),
        1 => (g.clone(), u.clone(), prop::collection::vec(0..USERS.len(), 1..3))
            .prop_map(|(g, u, m)| Op::AddMembers(g, u, m)),
        1 => (g, u.clone(), u.clone()).prop_map(|(g, by, who)| Op::Remove(g, by, who)),
        6 => (c.clone(), u.clone(), 0..6u8, any::<bool>())
            .prop_map(|(c, u, k, r)| Op::Send(c, u, k, r)),
        1 => (c.clone(), u.clone(), 0..12u64).prop_map(|(c, u, s)| Op::Edit(c, u, s)),
        1 => (c.clone(), u.clone(), 0..12u64).prop_map(|(c, u, s)| Op::Delete(c, u, s)),
        2 => (c, u, prop::option::of(0..15u64), prop::option::of(0..15u64))
            .prop_map(|(c, u, d, r)| Op::Receipt(c, u, d, r)),
    ]
}

fn send(chat: &str, sender: &str, key: &str, ts: u64) -> ChatCommand {
    ChatCommand::Send {
        chat: chat.into(),
        sender: sender.into(),
        client_msg_id: key.into(),
        text: format!("{sender}:{key}"),
        reply_to: None,
        ts,
        dedup_window_ms: DEDUP_WINDOW_MS_DEFAULT,
    }
}

/// The commands of `ops`; a retried send appears twice in a row. `ts` grows by 10 ms a
/// command, far inside the dedup window.
fn commands(ops: &[Op]) -> Vec<ChatCommand> {
    let chats = chats();
    let direct = [("d:a:b", 0, 1), ("d:b:c", 1, 2), ("d:a:d", 0, 3)];
    let mut out = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let ts = 1_000 + 10 * i as u64;
        let users = |v: &[usize]| v.iter().map(|&u| USERS[u].to_string()).collect::<Vec<_>>();
        match op {
            Op::OpenDirect(c) => {
                let (chat, a, b) = direct[*c];
                out.push(ChatCommand::OpenDirect {
                    chat: chat.into(),
                    a: USERS[a].into(),
                    b: USERS[b].into(),
                    ts,
                });
            }
            Op::CreateGroup(g, u, m) => out.push(ChatCommand::CreateGroup {
                chat: GROUPS[*g].into(),
                creator: USERS[*u].into(),
                name: format!("group {g}"),
                members: users(m),
                members_max: GROUP_MEMBERS_MAX,
                ts,
            }),
            Op::AddMembers(g, u, m) => out.push(ChatCommand::AddMembers {
                chat: GROUPS[*g].into(),
                by: USERS[*u].into(),
                users: users(m),
                members_max: 3,
                ts,
            }),
            Op::Remove(g, by, who) => out.push(ChatCommand::RemoveMember {
                chat: GROUPS[*g].into(),
                by: USERS[*by].into(),
                user: USERS[*who].into(),
                ts,
            }),
            Op::Send(c, u, k, retried) => {
                let cmd = send(&chats[*c], USERS[*u], &format!("k{k}"), ts);
                if *retried {
                    out.push(cmd.clone());
                }
                out.push(cmd);
            }
            Op::Edit(c, u, seq) => out.push(ChatCommand::Edit {
                chat: chats[*c].clone(),
                sender: USERS[*u].into(),
                seq: *seq,
                text: format!("edit {i}"),
                ts,
            }),
            Op::Delete(c, u, seq) => out.push(ChatCommand::Delete {
                chat: chats[*c].clone(),
                sender: USERS[*u].into(),
                seq: *seq,
                ts,
            }),
            Op::Receipt(c, u, d, r) => out.push(ChatCommand::Receipts(vec![ReceiptUpdate {
                chat: chats[*c].clone(),
                user: USERS[*u].into(),
                delivered: *d,
                read: *r,
            }])),
        }
    }
    out
}

/// The chat a command is about (none for receipts, which may name several).
fn chat_of(cmd: &ChatCommand) -> Option<&str> {
    match cmd {
        ChatCommand::Send { chat, .. }
        | ChatCommand::Edit { chat, .. }
        | ChatCommand::Delete { chat, .. }
        | ChatCommand::OpenDirect { chat, .. }
        | ChatCommand::CreateGroup { chat, .. }
        | ChatCommand::AddMembers { chat, .. }
        | ChatCommand::RemoveMember { chat, .. } => Some(chat),
        _ => None,
    }
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    })
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 1..40)
}

/// Sends first open every chat, so most later commands do something.
fn with_chats(mut ops: Vec<Op>) -> Vec<Op> {
    let mut all = vec![
        Op::OpenDirect(0),
        Op::OpenDirect(1),
        Op::OpenDirect(2),
        Op::CreateGroup(0, 0, vec![1, 2]),
        Op::CreateGroup(1, 3, vec![0]),
    ];
    all.append(&mut ops);
    all
}

/// Runs `check` on `CASES` random command sequences and prints how many ran.
fn run(name: &str, check: impl Fn(&[ChatCommand]) -> Result<(), TestCaseError>) {
    let mut runner = runner();
    let cases = std::cell::Cell::new(0u32);
    let result = runner.run(&ops(), |ops| {
        cases.set(cases.get() + 1);
        check(&commands(&with_chats(ops)))
    });
    println!(
        "{name}: {} cases run ({CASES} required, the rest shrinking)",
        cases.get()
    );
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

#[test]
fn seqs_are_gapless_and_every_append_takes_the_next_seq() {
    run("gapless seqs", |cmds| {
        let mut r = Replica::new();
        let mut last: BTreeMap<String, u64> = BTreeMap::new();
        for cmd in cmds {
            let (reply, events) = r.apply(cmd);
            // Every new entry takes the chat's next seq, in order.
            for e in &events {
                if let ChatEvent::Message { message, .. } = e {
                    let l = last.entry(message.chat.clone()).or_insert(0);
                    prop_assert_eq!(message.seq, *l + 1, "{:?}", cmd);
                    *l = message.seq;
                }
            }
            // An answer's seq is the chat's last entry (a new one unless a duplicate).
            let chat_last = chat_of(cmd).and_then(|c| last.get(c)).copied();
            match reply {
                ChatReply::Acked {
                    seq,
                    duplicate: false,
                    ..
                } => prop_assert_eq!(Some(seq), chat_last, "{:?}", cmd),
                ChatReply::Acked { seq, .. } => {
                    prop_assert!(seq >= 1 && Some(seq) <= chat_last, "{:?}", cmd)
                }
                ChatReply::Done { seq } if seq > 0 => {
                    prop_assert_eq!(Some(seq), chat_last, "{:?}", cmd)
                }
                _ => {}
            }
        }
        for chat in chats() {
            let Some(record) = chat_record(&r.store, G, &chat).unwrap() else {
                continue;
            };
            prop_assert_eq!(record.last_seq, last.get(&chat).copied().unwrap_or(0));
            for seq in 1..=record.last_seq {
                let m = message(&r.store, G, &chat, seq).unwrap();
                prop_assert!(m.as_ref().is_some_and(|m| m.seq == seq && m.chat == chat));
            }
            prop_assert!(message(&r.store, G, &chat, record.last_seq + 1)
                .unwrap()
                .is_none());
        }
        Ok(())
    });
}

#[test]
fn spans_bound_what_members_receive_and_read() {
    run("spans", |cmds| {
        let mut r = Replica::new();
        for cmd in cmds {
            let (_, events) = r.apply(cmd);
            for e in &events {
                let ChatEvent::Message {
                    message,
                    recipients,
                } = e
                else {
                    continue;
                };
                let record = chat_record(&r.store, G, &message.chat).unwrap().unwrap();
                prop_assert_eq!(recipients, &record.members_at(message.seq));
                if message.kind == "join" {
                    let span = record.span_of(&message.text).unwrap();
                    prop_assert_eq!(span.from, message.seq);
                }
                if message.kind == "leave" {
                    prop_assert_eq!(record.span_of(&message.text).unwrap().to, Some(message.seq));
                }
            }
        }
        for chat in chats() {
            let Some(record) = chat_record(&r.store, G, &chat).unwrap() else {
                continue;
            };
            for (user, span) in &record.members {
                // Join at `from`, leave at `to`.
                if record.kind == ChatKind::Group {
                    let join = message(&r.store, G, &chat, span.from).unwrap().unwrap();
                    prop_assert_eq!((join.kind.as_str(), &join.text), ("join", user));
                }
                if let Some(to) = span.to {
                    prop_assert!(span.from <= to);
                    let leave = message(&r.store, G, &chat, to).unwrap().unwrap();
                    prop_assert_eq!((leave.kind.as_str(), &leave.text), ("leave", user));
                }
                // History shows a member exactly the entries of its span.
                let page = history(
                    &r.store,
                    G,
                    &chat,
                    *span,
                    record.last_seq,
                    PageRequest {
                        before: None,
                        after: Some(0),
                        limit: 100,
                    },
                )
                .unwrap();
                let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
                let want: Vec<u64> = (1..=record.last_seq)
                    .filter(|s| span.contains(*s))
                    .take(100)
                    .collect();
                prop_assert_eq!(seqs, want, "{} {:?}", user, span);
            }
        }
        Ok(())
    });
}

#[test]
fn cursors_only_move_forward_within_the_log() {
    run("monotonic cursors", |cmds| {
        let mut r = Replica::new();
        let mut seen: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
        for cmd in cmds {
            r.apply(cmd);
            let ChatCommand::Receipts(updates) = cmd else {
                continue;
            };
            for u in updates {
                let Some(record) = chat_record(&r.store, G, &u.chat).unwrap() else {
                    continue;
                };
                for (user, c) in cursors(&r.store, G, &u.chat).unwrap() {
                    prop_assert!(c.read <= c.delivered && c.delivered <= record.last_seq);
                    let old = seen
                        .insert((u.chat.clone(), user.clone()), (c.delivered, c.read))
                        .unwrap_or((0, 0));
                    prop_assert!(c.delivered >= old.0 && c.read >= old.1, "{:?} {:?}", old, c);
                }
            }
        }
        Ok(())
    });
}

#[test]
fn apply_is_deterministic_across_replicas() {
    run("determinism", |cmds| {
        let (mut one, mut two) = (Replica::new(), Replica::new());
        for cmd in cmds {
            prop_assert_eq!(one.apply(cmd), two.apply(cmd), "{:?}", cmd);
        }
        let (a, b) = (one.records(), two.records());
        prop_assert!(!a.is_empty());
        prop_assert_eq!(a, b);
        Ok(())
    });
}

#[test]
fn a_retried_send_gets_the_original_seq() {
    run("retries", |cmds| {
        let mut r = Replica::new();
        let mut previous: Option<(&ChatCommand, ChatReply)> = None;
        for cmd in cmds {
            let (reply, _) = r.apply(cmd);
            if let (Some((prev, ChatReply::Acked { seq, .. })), ChatCommand::Send { .. }) =
                (&previous, cmd)
            {
                if *prev == cmd {
                    prop_assert!(
                        matches!(reply, ChatReply::Acked { seq: s, .. } if s == *seq),
                        "{:?} after {:?}",
                        reply,
                        seq
                    );
                }
            }
            previous = Some((cmd, reply));
        }
        Ok(())
    });
}
