#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;
use crate::history::Cursor;

#[test]
fn files_acknowledged_must_read_back_whole_from_every_node() {
    let op = |process: &str, kind: Kind, f: F, file: Option<&str>, sha: Option<&str>| {
        let mut o = Op::new(process, kind, f);
        o.file = file.map(str::to_string);
        o.sha256 = sha.map(str::to_string);
        o.node = Some(1);
        o
    };
    let mut h = H::new();
    h.push(op("c1", Kind::Invoke, F::Upload, None, Some("aa")))
        .push(op("c1", Kind::Ok, F::Upload, Some("f:1"), Some("aa")))
        .push(op("c1", Kind::Invoke, F::Download, Some("f:1"), None))
        .push(op("c1", Kind::Ok, F::Download, Some("f:1"), Some("aa")))
        .push(op("c2", Kind::Invoke, F::Upload, None, Some("bb")))
        .push(op("c2", Kind::Info, F::Upload, None, None))
        .push(op(
            "final-1",
            Kind::Invoke,
            F::FinalDownload,
            Some("f:1"),
            None,
        ))
        .push(op(
            "final-1",
            Kind::Ok,
            F::FinalDownload,
            Some("f:1"),
            Some("aa"),
        ));
    let res = check(&h.ops);
    assert_eq!(res.anomalies(), 0, "{:?}", res.examples);
    assert_eq!(
        (
            res.files.uploads,
            res.files.uploads_ok,
            res.files.uploads_info
        ),
        (2, 1, 1)
    );
    assert_eq!((res.files.downloads_ok, res.files.final_downloads), (1, 1));
    // Other bytes read back, and an acknowledged file answered 404: both found.
    let mut bad = H::new();
    bad.push(op("c1", Kind::Invoke, F::Upload, None, Some("aa")))
        .push(op("c1", Kind::Ok, F::Upload, Some("f:1"), Some("aa")))
        .push(op("c1", Kind::Invoke, F::Download, Some("f:1"), None))
        .push(op("c1", Kind::Ok, F::Download, Some("f:1"), Some("ab")))
        .push(op(
            "final-2",
            Kind::Invoke,
            F::FinalDownload,
            Some("f:1"),
            None,
        ));
    let mut lost = op("final-2", Kind::Fail, F::FinalDownload, Some("f:1"), None);
    lost.error = Some("404 {\"code\":\"unknown_file\"}".into());
    bad.push(lost);
    // An upload acknowledged with a hash unlike the bytes sent.
    bad.push(op("c3", Kind::Invoke, F::Upload, None, Some("cc")))
        .push(op("c3", Kind::Ok, F::Upload, Some("f:3"), Some("cd")));
    let res = check(&bad.ops);
    assert_eq!(
        res.counts[&AnomalyKind::FileCorrupt],
        2,
        "{:?}",
        res.examples
    );
    assert_eq!(res.counts[&AnomalyKind::FileLost], 1);
    assert!(!res.valid);
}

/// Builds histories by hand; times advance 1 ms per op unless set.
struct H {
    ops: Vec<Op>,
    t: u64,
}

fn text(seq: u64, msg: &str) -> Entry {
    Entry {
        seq,
        kind: "text".into(),
        sender: "u".into(),
        text: msg.into(),
        epoch: None,
    }
}

impl H {
    fn new() -> H {
        H {
            ops: Vec::new(),
            t: 0,
        }
    }

    fn push(&mut self, mut op: Op) -> &mut H {
        self.t += 1000;
        op.index = self.ops.len() as u64;
        op.time_us = self.t;
        self.ops.push(op);
        self
    }

    fn send(&mut self, p: &str, chat: &str, msg: &str, seq: Option<u64>) -> &mut H {
        let mut inv = Op::new(p, Kind::Invoke, F::Send);
        inv.chat = Some(chat.into());
        inv.msg = Some(msg.into());
        self.push(inv);
        let mut done = Op::new(
            p,
            if seq.is_some() { Kind::Ok } else { Kind::Info },
            F::Send,
        );
        done.seq = seq;
        self.push(done)
    }

    fn deliver(&mut self, p: &str, session: u64, chat: &str, seq: u64, msg: &str) -> &mut H {
        let mut op = Op::new(p, Kind::Ok, F::Deliver);
        op.session = Some(session);
        op.chat = Some(chat.into());
        op.seq = Some(seq);
        op.msg = Some(msg.into());
        self.push(op)
    }

    fn read(&mut self, p: &str, chat: &str, entries: Vec<Entry>) -> &mut H {
        let mut inv = Op::new(p, Kind::Invoke, F::Read);
        inv.chat = Some(chat.into());
        self.push(inv);
        let mut ok = Op::new(p, Kind::Ok, F::Read);
        ok.chat = Some(chat.into());
        ok.entries = Some(entries);
        self.push(ok)
    }

    fn final_read(&mut self, node: u64, chat: &str, entries: Vec<Entry>) -> &mut H {
        let p = format!("final-{node}");
        let mut inv = Op::new(&p, Kind::Invoke, F::FinalRead);
        inv.chat = Some(chat.into());
        inv.node = Some(node);
        self.push(inv);
        let mut ok = Op::new(&p, Kind::Ok, F::FinalRead);
        ok.chat = Some(chat.into());
        ok.entries = Some(entries);
        ok.complete = Some(true);
        self.push(ok)
    }

    /// Two acked messages, delivered and read back everywhere: a clean history.
    fn clean() -> H {
        let mut h = H::new();
        h.send("c1", "g", "c1-1", Some(1))
            .send("c2", "g", "c2-1", Some(2))
            .deliver("c1", 1, "g", 1, "c1-1")
            .deliver("c1", 1, "g", 2, "c2-1")
            .read("c2", "g", vec![text(1, "c1-1"), text(2, "c2-1")])
            .final_read(1, "g", vec![text(1, "c1-1"), text(2, "c2-1")])
            .final_read(2, "g", vec![text(1, "c1-1"), text(2, "c2-1")]);
        h
    }

    fn check(&self) -> Results {
        check(&self.ops)
    }
}

fn only(res: &Results, kind: AnomalyKind) -> u64 {
    for (k, n) in &res.counts {
        if *k != kind {
            assert_eq!(*n, 0, "unexpected {k:?}: {:#?}", res.examples);
        }
    }
    assert!(!res.valid);
    res.counts[&kind]
}

#[test]
fn a_clean_history_is_valid() {
    let res = H::clean().check();
    assert!(res.valid, "{:#?}", res);
    assert_eq!(res.anomalies(), 0);
    assert_eq!(res.messages_acked, 2);
    assert_eq!(res.sends_ok, 2);
    assert_eq!(res.deliveries, 2);
    assert_eq!(res.final_reads, 2);
    assert!(res.verdict().starts_with("VALID"));
}

#[test]
fn lost_write_is_reported() {
    let mut h = H::clean();
    h.send("c3", "g", "c3-1", Some(3))
        .final_read(3, "g", vec![text(1, "c1-1"), text(2, "c2-1")]);
    let res = h.check();
    // Missing from nodes 1, 2 and 3.
    assert_eq!(only(&res, AnomalyKind::Lost), 3);
    assert!(
        res.verdict().starts_with("INVALID: 3 lost"),
        "{}",
        res.verdict()
    );
}

#[test]
fn a_message_at_two_seqs_is_a_duplicate() {
    let mut h = H::new();
    h.send("c1", "g", "c1-1", None)
        .send("c1", "g", "c1-1", Some(2))
        .final_read(1, "g", vec![text(1, "c1-1"), text(2, "c1-1")]);
    assert_eq!(only(&h.check(), AnomalyKind::Duplicate), 1);
}

#[test]
fn a_seq_delivered_twice_to_one_connection_is_a_duplicate() {
    let mut h = H::clean();
    h.deliver("c1", 1, "g", 2, "c2-1");
    assert_eq!(only(&h.check(), AnomalyKind::Duplicate), 1);
    // On a new connection (after a reconnect) it is not.
    let mut h = H::clean();
    h.deliver("c1", 2, "g", 2, "c2-1");
    assert!(h.check().valid);
}

#[test]
fn two_messages_at_one_seq_are_inconsistent() {
    let mut h = H::clean();
    h.send("c3", "g", "c3-1", Some(3));
    h.final_read(
        3,
        "g",
        vec![text(1, "c1-1"), text(2, "c2-1"), text(3, "c3-1")],
    );
    // Node 1 and 2 read back before c3-1 (another entry at 3 seen by a client).
    h.read("c1", "g", vec![text(3, "c1-9")]);
    let res = h.check();
    assert!(
        res.counts[&AnomalyKind::Inconsistent] >= 1,
        "{:#?}",
        res.examples
    );
}

#[test]
fn final_reads_of_different_lengths_are_inconsistent() {
    let mut h = H::clean();
    h.send("c3", "g", "c3-1", None);
    h.final_read(
        3,
        "g",
        vec![text(1, "c1-1"), text(2, "c2-1"), text(3, "c3-1")],
    );
    assert_eq!(only(&h.check(), AnomalyKind::Inconsistent), 1);
}

#[test]
fn a_hole_in_the_seqs_is_a_gap() {
    let mut h = H::new();
    h.send("c1", "g", "c1-1", Some(1))
        .send("c1", "g", "c1-2", Some(3))
        .final_read(1, "g", vec![text(1, "c1-1"), text(3, "c1-2")]);
    assert_eq!(only(&h.check(), AnomalyKind::Gap), 1);
}

#[test]
fn delivery_going_back_is_non_monotonic() {
    let mut h = H::clean();
    h.deliver("c2", 1, "g", 2, "c2-1")
        .deliver("c2", 1, "g", 1, "c1-1");
    assert_eq!(only(&h.check(), AnomalyKind::NonMonotonic), 1);
}

#[test]
fn a_message_nobody_sent_is_unexpected() {
    let mut h = H::clean();
    h.deliver("c2", 1, "g", 3, "forged");
    h.final_read(
        3,
        "g",
        vec![text(1, "c1-1"), text(2, "c2-1"), text(3, "forged")],
    );
    // Also: nodes 1 and 2 have 2 entries, node 3 has 3.
    let res = h.check();
    assert_eq!(
        res.counts[&AnomalyKind::Unexpected],
        1,
        "{:#?}",
        res.examples
    );
    assert_eq!(res.counts[&AnomalyKind::Lost], 0);
}

#[test]
fn a_read_missing_an_earlier_ack_is_stale() {
    let mut h = H::clean();
    h.read("c3", "g", vec![text(1, "c1-1")]);
    assert_eq!(only(&h.check(), AnomalyKind::StaleRead), 1);
    // A sync that says last seq 1 after seq 2 was acked is stale too.
    let mut h = H::clean();
    let mut inv = Op::new("c3", Kind::Invoke, F::Sync);
    inv.chat = None;
    h.push(inv);
    let mut ok = Op::new("c3", Kind::Ok, F::Sync);
    ok.cursors = Some(vec![Cursor {
        chat: "g".into(),
        last_seq: 1,
        read: 0,
    }]);
    h.push(ok);
    assert_eq!(only(&h.check(), AnomalyKind::StaleRead), 1);
}

#[test]
fn a_read_concurrent_with_the_ack_is_not_stale() {
    let mut h = H::new();
    // The read begins before the ack arrives: it may or may not see the message.
    let mut inv = Op::new("c2", Kind::Invoke, F::Read);
    inv.chat = Some("g".into());
    h.push(inv);
    h.send("c1", "g", "c1-1", Some(1));
    let mut ok = Op::new("c2", Kind::Ok, F::Read);
    ok.chat = Some("g".into());
    ok.entries = Some(vec![]);
    h.push(ok);
    h.final_read(1, "g", vec![text(1, "c1-1")]);
    assert!(h.check().valid, "{:#?}", h.check());
}

#[test]
fn receipts_going_back_are_reported() {
    let mut h = H::clean();
    for (d, r) in [(2, 1), (2, 2), (2, 1)] {
        let mut op = Op::new("c1", Kind::Ok, F::ReceiptSeen);
        op.session = Some(1);
        op.chat = Some("g".into());
        op.user = Some("u2".into());
        op.delivered = Some(d);
        op.read = Some(r);
        h.push(op);
    }
    assert_eq!(only(&h.check(), AnomalyKind::ReceiptBackwards), 1);
}

#[test]
fn a_failed_final_read_makes_the_verdict_unknown() {
    let mut h = H::new();
    h.send("c1", "g", "c1-1", Some(1));
    let res = h.check();
    assert!(!res.valid);
    assert_eq!(res.anomalies(), 0);
    assert!(res.verdict().starts_with("UNKNOWN"), "{}", res.verdict());
}

#[test]
fn availability_and_unavailability_follow_the_fault_windows() {
    let mut h = H::new();
    h.send("c1", "g", "c1-1", Some(1));
    let mut f = Op::new("nemesis", Kind::Invoke, F::Fault);
    f.fault = Some("kill n2".into());
    h.push(f);
    h.send("c1", "g", "c1-2", None);
    h.t += 500_000;
    h.send("c1", "g", "c1-2", Some(2));
    let mut f = Op::new("nemesis", Kind::Ok, F::Fault);
    f.fault = Some("kill n2".into());
    h.push(f);
    h.final_read(1, "g", vec![text(1, "c1-1"), text(2, "c1-2")]);
    let res = h.check();
    assert!(res.valid, "{:#?}", res);
    let a = &res.availability["kill n2"];
    assert_eq!((a.completed, a.ok), (2, 1));
    assert!((a.share_ok - 0.5).abs() < 1e-9);
    assert_eq!(res.windows.len(), 1);
    assert!(
        res.longest_unavailable_ms >= 500.0,
        "{}",
        res.longest_unavailable_ms
    );
    assert_eq!(res.ack_latency_ms.count, 2);
}

#[test]
fn the_longest_write_gap_of_one_chat_is_measured_per_chat() {
    let mut h = H::new();
    // Chat "a" acks every 12 ms throughout; chat "b" has no ack for ~930 ms.
    h.send("c1", "a", "a-1", Some(1));
    h.send("c2", "b", "b-1", Some(1));
    h.t += 100_000;
    h.send("c2", "b", "b-2", None);
    for i in 2..=70 {
        h.t += 10_000;
        h.send("c1", "a", &format!("a-{i}"), Some(i));
    }
    h.send("c2", "b", "b-2", Some(2));
    h.final_read(
        1,
        "a",
        (1..=70).map(|i| text(i, &format!("a-{i}"))).collect(),
    );
    h.final_read(1, "b", vec![text(1, "b-1"), text(2, "b-2")]);
    let res = h.check();
    assert!(res.valid, "{:#?}", res);
    assert!(
        res.longest_unavailable_ms < 200.0,
        "{}",
        res.longest_unavailable_ms
    );
    assert_eq!(res.longest_chat_gap_chat, "b");
    assert!(
        (900.0..=960.0).contains(&res.longest_chat_gap_ms),
        "{}",
        res.longest_chat_gap_ms
    );
}

#[test]
fn membership_changes_are_counted_with_their_durations() {
    let fault = |h: &mut H, kind: Kind, name: &str, error: Option<&str>| {
        let mut op = Op::new("nemesis", kind, F::Fault);
        op.fault = Some(name.into());
        op.error = error.map(str::to_string);
        h.push(op);
    };
    let mut h = H::clean();
    fault(&mut h, Kind::Invoke, "membership add n4", None);
    h.t += 4_000_000;
    fault(&mut h, Kind::Ok, "membership add n4", None);
    fault(&mut h, Kind::Invoke, "membership remove n2", None);
    // A kill while the removal goes on: windows overlap; a send during both counts
    // for the kill, one after it for the removal.
    fault(&mut h, Kind::Invoke, "kill -9 n1", None);
    h.send("c3", "g", "c3-1", None);
    fault(&mut h, Kind::Ok, "kill -9 n1", None);
    h.send("c3", "g", "c3-1", None);
    h.t += 20_000_000;
    fault(&mut h, Kind::Ok, "membership remove n2", None);
    fault(&mut h, Kind::Invoke, "membership replace n3 by n5", None);
    fault(
        &mut h,
        Kind::Ok,
        "membership replace n3 by n5",
        Some("not removed"),
    );
    fault(&mut h, Kind::Invoke, "membership add n6", None);
    let res = h.check();
    assert!(res.valid, "{:#?}", res);
    let m = &res.membership;
    assert_eq!((m.adds, m.removes, m.replaces, m.failed), (1, 1, 0, 2));
    assert_eq!(m.changes.len(), 4);
    assert_eq!(m.changes[0].kind, "add");
    let add = m.durations("add");
    assert_eq!(add.len(), 1);
    assert!((add[0] - 4.001).abs() < 1e-6, "{add:?}");
    let remove = m.durations("remove");
    assert!((remove[0] - 20.007).abs() < 1e-6, "{remove:?}");
    assert_eq!(res.availability["kill -9 n1"].completed, 1);
    assert_eq!(res.availability["membership remove n2"].completed, 1);
    assert_eq!(res.fault_errors.len(), 1);
    assert_eq!(res.windows.len(), 5);
}

// --- End-to-end encrypted chats -------------------------------------------------------

fn mls(seq: u64, kind: &str, text: &str, epoch: u64) -> Entry {
    Entry {
        seq,
        kind: format!("mls_{kind}"),
        sender: "u".into(),
        text: text.into(),
        epoch: Some(epoch),
    }
}

fn marker(seq: u64, kind: &str, user: &str) -> Entry {
    Entry {
        seq,
        kind: kind.into(),
        sender: "u1".into(),
        text: user.into(),
        epoch: None,
    }
}

const E: &str = "e:00000000000000e2";

impl H {
    /// An `e2e_send` of MLS `kind` naming `epoch`: acked at `seq`, or refused with
    /// `error`, or of unknown outcome when neither is given.
    fn e2e(
        &mut self,
        p: &str,
        kind: &str,
        msg: &str,
        epoch: u64,
        seq: Option<u64>,
        error: Option<&str>,
    ) -> &mut H {
        let mut inv = Op::new(p, Kind::Invoke, F::Send);
        inv.chat = Some(E.into());
        inv.msg = Some(msg.into());
        inv.mls = Some(kind.into());
        inv.epoch = Some(epoch);
        self.push(inv);
        let outcome = match (seq, error) {
            (Some(_), _) => Kind::Ok,
            (None, Some(_)) => Kind::Fail,
            (None, None) => Kind::Info,
        };
        let mut done = Op::new(p, outcome, F::Send);
        done.seq = seq;
        done.error = error.map(str::to_string);
        done.mls = Some(kind.into());
        done.epoch = Some(epoch);
        self.push(done)
    }

    fn deliver_entry(&mut self, p: &str, session: u64, chat: &str, e: Entry) -> &mut H {
        let mut op = Op::new(p, Kind::Ok, F::Deliver);
        op.session = Some(session);
        op.chat = Some(chat.into());
        op.seq = Some(e.seq);
        op.msg = Some(e.text.clone());
        op.entries = Some(vec![e]);
        self.push(op)
    }

    /// An E2E chat: created (u1's join), the setup's commit of epoch 0 adding u2 with a
    /// welcome, an application message, a commit of epoch 1 that won over another one
    /// (refused `stale_epoch`), a late application message of epoch 0 (allowed), a
    /// message of unknown outcome never stored; delivered, read and read back from two
    /// nodes: valid. The final log is [`H::e2e_log`].
    fn e2e_clean() -> H {
        let mut h = H::clean();
        h.e2e("setup", "commit", "C0", 0, Some(2), None)
            .e2e("c1", "application", "A1", 1, Some(5), None)
            .deliver_entry("c2", 1, E, mls(5, "application", "A1", 1))
            .e2e("c2", "commit", "C1", 1, Some(6), None)
            .e2e(
                "c3",
                "commit",
                "C1x",
                1,
                None,
                Some("stale_epoch: e:… is at epoch 2"),
            )
            .deliver_entry("c2", 1, E, mls(6, "commit", "C1", 1))
            .e2e("c1", "application", "A2", 0, Some(7), None)
            .e2e("c3", "application", "A3", 2, None, None)
            .read("c3", E, H::e2e_log()[3..].to_vec());
        for node in [1, 2] {
            h.final_read(node, E, H::e2e_log());
        }
        h
    }

    fn e2e_log() -> Vec<Entry> {
        vec![
            marker(1, "join", "u1"),
            mls(2, "commit", "C0", 0),
            marker(3, "join", "u2"),
            mls(4, "welcome", "W1", 1),
            mls(5, "application", "A1", 1),
            mls(6, "commit", "C1", 1),
            mls(7, "application", "A2", 0),
        ]
    }

    /// [`H::e2e_clean`] with `more` entries appended to both final reads (instead of the
    /// clean ones), after the ops `add` records.
    fn e2e_with(add: impl FnOnce(&mut H), more: Vec<Entry>) -> H {
        let mut h = H::e2e_clean();
        h.ops
            .retain(|o| !(o.f == Some(F::FinalRead) && o.chat.as_deref() == Some(E)));
        for (i, o) in h.ops.iter_mut().enumerate() {
            o.index = i as u64;
        }
        add(&mut h);
        let mut log = H::e2e_log();
        log.extend(more);
        for node in [1, 2] {
            h.final_read(node, E, log.clone());
        }
        h
    }
}

#[test]
fn an_e2e_chat_with_competing_commits_is_valid() {
    let res = H::e2e_clean().check();
    assert!(res.valid, "{:#?}", res.examples);
    assert_eq!(res.anomalies(), 0);
    let e = &res.e2e;
    assert_eq!((e.sends, e.messages_acked), (3, 2));
    assert_eq!((e.commits, e.commits_acked, e.commits_stale), (3, 2, 1));
    assert_eq!(e.epoch_max, 2);
    // The acks (mls_application, mls_commit) agree with the reads' kinds: with the text
    // messages, 2 + 4 distinct messages acked.
    assert_eq!(res.messages_acked, 6);
}

#[test]
fn a_lost_acked_e2e_message_is_reported() {
    let h = H::e2e_with(
        |h| {
            h.e2e("c4", "application", "A4", 2, Some(8), None);
        },
        vec![],
    );
    // Missing from the final reads of nodes 1 and 2.
    assert_eq!(only(&h.check(), AnomalyKind::Lost), 2);
    // Stored as a text message with that ciphertext is not the E2E message either.
    let h = H::e2e_with(
        |h| {
            h.e2e("c4", "application", "A4", 2, Some(8), None);
        },
        vec![text(8, "A4")],
    );
    let res = h.check();
    assert!(res.counts[&AnomalyKind::Lost] >= 2, "{:#?}", res.examples);
}

#[test]
fn an_acked_commit_missing_from_a_final_read_is_lost() {
    let h = H::e2e_with(
        |h| {
            h.e2e("c4", "commit", "C2", 2, Some(8), None);
        },
        vec![],
    );
    assert_eq!(only(&h.check(), AnomalyKind::Lost), 2);
}

#[test]
fn two_commits_for_one_epoch_break_the_epoch_order() {
    let h = H::e2e_with(
        |h| {
            h.e2e("c4", "commit", "C1y", 1, Some(8), None);
        },
        vec![mls(8, "commit", "C1y", 1)],
    );
    // In the final read of each node.
    assert_eq!(only(&h.check(), AnomalyKind::EpochOrder), 2);
}

#[test]
fn a_skipped_epoch_breaks_the_epoch_order() {
    let h = H::e2e_with(
        |h| {
            h.e2e("c4", "commit", "C3", 3, Some(8), None);
        },
        vec![mls(8, "commit", "C3", 3)],
    );
    assert_eq!(only(&h.check(), AnomalyKind::EpochOrder), 2);
    // Seen in a read page too (which shows the chat from a commit on, not from seq 1).
    let mut h = H::new();
    h.e2e("c1", "commit", "C1", 1, None, None)
        .e2e("c2", "application", "A", 0, None, None)
        .e2e("c3", "commit", "C4", 4, None, None)
        .read(
            "c1",
            E,
            vec![
                mls(6, "commit", "C1", 1),
                mls(7, "application", "A", 0),
                mls(8, "commit", "C4", 4),
            ],
        );
    let res = h.check();
    assert_eq!(
        res.counts[&AnomalyKind::EpochOrder],
        1,
        "{:#?}",
        res.examples
    );
    assert_eq!(res.anomalies(), 1);
}

#[test]
fn an_acked_e2e_message_stored_at_another_epoch_breaks_the_epoch_order() {
    // The commit named epoch 5, the entry says 2 (the right epoch for the log, so only
    // the ack tells).
    let h = H::e2e_with(
        |h| {
            h.e2e("c4", "commit", "C2", 5, Some(8), None);
        },
        vec![mls(8, "commit", "C2", 2)],
    );
    assert_eq!(only(&h.check(), AnomalyKind::EpochOrder), 1);
    // An application message ahead of the chat's epoch, or a welcome at the wrong one.
    let h = H::e2e_with(
        |h| {
            h.e2e("c4", "application", "A9", 9, Some(8), None);
        },
        vec![mls(8, "application", "A9", 9), mls(9, "welcome", "W", 1)],
    );
    // Per final read: the application message and the welcome.
    assert_eq!(only(&h.check(), AnomalyKind::EpochOrder), 4);
}

#[test]
fn e2e_ciphertext_nobody_sent_or_stored_twice_is_reported() {
    let h = H::e2e_with(|_| {}, vec![mls(8, "application", "forged", 2)]);
    assert_eq!(only(&h.check(), AnomalyKind::Unexpected), 1);
    let h = H::e2e_with(|_| {}, vec![mls(8, "application", "A1", 2)]);
    assert_eq!(only(&h.check(), AnomalyKind::Duplicate), 1);
    // One seq at two epochs (a delivery and the final reads) is inconsistent.
    let mut h = H::e2e_clean();
    h.deliver_entry("c4", 1, E, mls(5, "application", "A1", 0));
    assert_eq!(only(&h.check(), AnomalyKind::Inconsistent), 1);
}

#[test]
fn one_wrong_commit_is_one_epoch_violation() {
    // A commit repeating epoch 1 where epoch 2 belongs, then the log goes on at epoch 3.
    let log = |wrong: u64| {
        vec![
            mls(1, "commit", "a", 0),
            mls(2, "commit", "b", 1),
            mls(3, "commit", "c", wrong),
            mls(4, "application", "d", 3),
            mls(5, "commit", "e", 3),
        ]
    };
    assert_eq!(epoch_violations(&log(2)), Vec::<String>::new());
    let v = epoch_violations(&log(1));
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].contains("a second commit for one epoch"), "{v:?}");
    // A skipped epoch (3 where 2 belongs): the next commit must then name 4.
    let v = epoch_violations(&log(3));
    assert_eq!(v.len(), 2, "{v:?}");
    assert!(v[0].contains("an epoch skipped"), "{v:?}");
}
