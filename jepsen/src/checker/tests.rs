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
