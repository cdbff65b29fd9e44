#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;
use chatd_storage::{NodeIdentity, Storage, StorageOptions};

const G: GroupId = 3;

pub(crate) struct Sm {
    _dir: tempfile::TempDir,
    pub(crate) store: Storage,
    index: u64,
    /// Kept from one apply to the next, as `ChatApplier` keeps it.
    hint: SweepHint,
    /// Forget the hint before every apply (a replica that just restarted, each time).
    forget_hint: bool,
}

impl Sm {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Storage::open(
            dir.path(),
            &NodeIdentity {
                cluster_id: "t".into(),
                node_id: 1,
            },
            &StorageOptions::default(),
        )
        .unwrap();
        Self {
            _dir: dir,
            store,
            index: 0,
            hint: SweepHint::default(),
            forget_hint: false,
        }
    }

    pub(crate) fn apply(&mut self, cmd: ChatCommand) -> (ChatReply, Vec<ChatEvent>) {
        self.index += 1;
        let mut txn = ApplyTxn::standalone(G, &self.store);
        if self.forget_hint {
            self.hint = SweepHint::default();
        }
        let reply = apply_command(self.index, cmd, &mut txn, &mut self.hint).unwrap();
        let events = txn
            .commit()
            .unwrap()
            .iter()
            .map(|e| chatd_codec::decode(e).unwrap())
            .collect();
        (reply, events)
    }

    pub(crate) fn send(&mut self, chat: &str, sender: &str, key: &str, text: &str) -> ChatReply {
        self.send_at(chat, sender, key, text, 1, DEDUP_WINDOW_MS_DEFAULT)
    }

    fn send_at(
        &mut self,
        chat: &str,
        sender: &str,
        key: &str,
        text: &str,
        ts: u64,
        dedup_window_ms: u64,
    ) -> ChatReply {
        self.apply(ChatCommand::Send {
            chat: chat.into(),
            sender: sender.into(),
            client_msg_id: key.into(),
            text: text.into(),
            reply_to: None,
            ts,
            dedup_window_ms,
        })
        .0
    }

    /// Every stored record of the partition under `prefix`.
    pub(crate) fn records(&self, prefix: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        chatd_raftlog::scan_records(
            &self.store,
            G,
            prefix,
            &keys::prefix_end(prefix),
            usize::MAX,
        )
        .unwrap()
    }

    pub(crate) fn group(&mut self, creator: &str, members: &[&str]) -> String {
        let chat = "g:1".to_string();
        let (r, _) = self.apply(ChatCommand::CreateGroup {
            chat: chat.clone(),
            creator: creator.into(),
            name: "g".into(),
            members: members.iter().map(|m| m.to_string()).collect(),
            members_max: 4,
            ts: 1,
        });
        assert!(matches!(r, ChatReply::Done { .. }), "{r:?}");
        chat
    }
}

pub(crate) fn rejected(r: &ChatReply) -> &str {
    match r {
        ChatReply::Rejected { code, .. } => code,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn seqs_are_gapless_and_retries_return_the_original_ack() {
    let mut sm = Sm::new();
    sm.apply(ChatCommand::OpenDirect {
        chat: "d:a:b".into(),
        a: "a".into(),
        b: "b".into(),
        ts: 1,
    });
    assert_eq!(
        sm.send("d:a:b", "a", "k1", "one"),
        ChatReply::Acked {
            seq: 1,
            ts: 1,
            duplicate: false
        }
    );
    assert_eq!(
        sm.send("d:a:b", "b", "k1", "two"),
        ChatReply::Acked {
            seq: 2,
            ts: 1,
            duplicate: false
        },
        "idempotency keys are per sender"
    );
    assert_eq!(
        sm.send("d:a:b", "a", "k1", "one"),
        ChatReply::Acked {
            seq: 1,
            ts: 1,
            duplicate: true
        }
    );
    let record = chat_record(&sm.store, G, "d:a:b").unwrap().unwrap();
    assert_eq!(record.last_seq, 2, "the retry wrote nothing");
    assert_eq!(rejected(&sm.send("d:a:b", "c", "k9", "x")), "not_member");
    assert_eq!(rejected(&sm.send("d:x:y", "a", "k8", "x")), "unknown_chat");
}

#[test]
fn attached_files_are_readable_by_whoever_may_read_the_message() {
    let mut sm = Sm::new();
    let chat = sm.group("a", &["b"]);
    let att = |id: &str| Attachment {
        file_id: id.into(),
        name: "cat.png".into(),
        mime: "image/png".into(),
        size: 3,
    };
    let with_files = |key: &str, files: Vec<Attachment>| ChatCommand::SendWithFiles {
        chat: chat.clone(),
        sender: "a".into(),
        client_msg_id: key.into(),
        text: "look".into(),
        reply_to: None,
        ts: 1,
        dedup_window_ms: DEDUP_WINDOW_MS_DEFAULT,
        files,
    };
    let (r, events) = sm.apply(with_files("1", vec![att("f:1")]));
    let ChatReply::Acked { seq, .. } = r else {
        panic!("{r:?}")
    };
    assert!(
        matches!(&events[0], ChatEvent::Message { message, .. } if message.files == vec![att("f:1")]),
        "the pushed message carries its files: {events:?}"
    );
    assert_eq!(
        message(&sm.store, G, &chat, seq).unwrap().unwrap().files,
        vec![att("f:1")]
    );
    let readable =
        |sm: &Sm, user: &str, file: &str| file_readable(&sm.store, G, &chat, file, user).unwrap();
    assert!(readable(&sm, "a", "f:1") && readable(&sm, "b", "f:1"));
    assert!(!readable(&sm, "z", "f:1"), "not a member");
    assert!(!readable(&sm, "b", "f:2"), "not attached here");
    assert!(!file_readable(&sm.store, G, "g:other", "f:1", "b").unwrap());
    // A member who joins later does not see a file sent before the join (span rules),
    // but sees one sent after it.
    sm.apply(ChatCommand::AddMembers {
        chat: chat.clone(),
        by: "a".into(),
        users: vec!["c".into()],
        members_max: 4,
        ts: 2,
    });
    assert!(!readable(&sm, "c", "f:1"));
    sm.apply(with_files("2", vec![att("f:1"), att("f:2")]));
    assert!(readable(&sm, "c", "f:1") && readable(&sm, "c", "f:2"));
    // Too many files: refused, nothing changes.
    let many = (0..=MESSAGE_FILES_MAX)
        .map(|i| att(&format!("f:x{i}")))
        .collect();
    let (r, _) = sm.apply(with_files("3", many));
    assert_eq!(rejected(&r), "too_large");
    assert!(!readable(&sm, "a", "f:x0"));
    // Deleting the second message takes c's access (c's span holds only that one);
    // b still reads f:1 through the first; deleting that one too ends it for all.
    let (r, events) = sm.apply(ChatCommand::Delete {
        chat: chat.clone(),
        sender: "a".into(),
        seq: seq + 2,
        ts: 3,
    });
    assert!(matches!(r, ChatReply::Done { .. }), "{r:?}");
    assert!(
        matches!(&events[0], ChatEvent::Updated { message, .. } if message.files.is_empty()),
        "a deleted message shows no files: {events:?}"
    );
    assert!(!readable(&sm, "c", "f:1") && !readable(&sm, "c", "f:2"));
    assert!(readable(&sm, "b", "f:1"), "still through the first message");
    sm.apply(ChatCommand::Delete {
        chat: chat.clone(),
        sender: "a".into(),
        seq,
        ts: 4,
    });
    assert!(!readable(&sm, "a", "f:1") && !readable(&sm, "b", "f:1"));
}

#[test]
fn files_are_collected_only_when_unattached_or_never_completed_past_their_ttl() {
    let mut sm = Sm::new();
    let record = |id: &str, complete: bool| FileRecord {
        id: id.into(),
        owner: "a".into(),
        size: 4,
        mime: "m".into(),
        name: "n".into(),
        chunk_bytes: 2,
        offset: if complete { 4 } else { 2 },
        sha256: complete.then(|| "h".to_string()),
        created_ms: 100,
    };
    sm.apply(ChatCommand::FileBegin(record("f:up", false)));
    sm.apply(ChatCommand::FileBegin(record("f:done", false)));
    sm.apply(ChatCommand::FileProgress {
        file: "f:done".into(),
        offset: 4,
    });
    sm.apply(ChatCommand::FileComplete {
        file: "f:done".into(),
        sha256: "h".into(),
    });
    let collect = |file: &str, ts: u64| ChatCommand::FileCollect {
        file: file.into(),
        ts,
        upload_ttl_ms: 50,
        unattached_ttl_ms: 80,
    };
    let exists = |sm: &Sm, f: &str| files::read(&sm.store, G, f).unwrap().is_some();
    // Attach: only the owner's complete file.
    let attach = |file: &str, sender: &str, ts: u64| ChatCommand::FileAttach {
        file: file.into(),
        chat: "g:1".into(),
        sender: sender.into(),
        ts,
    };
    assert_eq!(
        rejected(&sm.apply(attach("f:up", "a", 120)).0),
        "unknown_file"
    );
    assert_eq!(
        rejected(&sm.apply(attach("f:done", "b", 120)).0),
        "unknown_file"
    );
    assert!(matches!(
        sm.apply(attach("f:done", "a", 120)).0,
        ChatReply::Done { .. }
    ));
    assert_eq!(
        files::attached_chats(&sm.store, G, "f:done").unwrap(),
        vec![("g:1".to_string(), 120)]
    );
    // Too young: both stay.
    assert_eq!(sm.apply(collect("f:up", 149)).0, ChatReply::Done { seq: 0 });
    assert!(exists(&sm, "f:up"));
    // The upload past its ttl goes; the attached file stays however old.
    assert_eq!(sm.apply(collect("f:up", 150)).0, ChatReply::Done { seq: 1 });
    assert!(!exists(&sm, "f:up"));
    assert_eq!(
        sm.apply(collect("f:done", 10_000)).0,
        ChatReply::Done { seq: 0 }
    );
    // A detach of an older attach does nothing; of the current one, it frees the file.
    sm.apply(ChatCommand::FileDetach {
        file: "f:done".into(),
        chat: "g:1".into(),
        attached_ms: 119,
    });
    assert_eq!(
        sm.apply(collect("f:done", 10_000)).0,
        ChatReply::Done { seq: 0 }
    );
    sm.apply(ChatCommand::FileDetach {
        file: "f:done".into(),
        chat: "g:1".into(),
        attached_ms: 120,
    });
    // A complete file is released (its bytes may be another holder's too), not dropped:
    // no one may attach it any more; collecting it again says the same.
    assert_eq!(
        sm.apply(collect("f:done", 10_000)).0,
        ChatReply::Done { seq: 2 }
    );
    assert!(exists(&sm, "f:done"));
    assert_eq!(
        files::read_state(&sm.store, G, "f:done")
            .unwrap()
            .released_ms,
        Some(10_000)
    );
    assert_eq!(
        rejected(&sm.apply(attach("f:done", "a", 10_001)).0),
        "unknown_file"
    );
    assert_eq!(
        sm.apply(collect("f:done", 10_002)).0,
        ChatReply::Done { seq: 2 }
    );
    // The collector drops it once its content lets it go.
    sm.apply(ChatCommand::FileDrop {
        file: "f:done".into(),
    });
    assert!(!exists(&sm, "f:done"));
    assert_eq!(
        files::read_state(&sm.store, G, "f:done").unwrap(),
        FileState::default()
    );
    assert!(files::attached_chats(&sm.store, G, "f:done")
        .unwrap()
        .is_empty());
    // Collecting what is gone changes nothing.
    assert_eq!(
        sm.apply(collect("f:done", 10_000)).0,
        ChatReply::Done { seq: 0 }
    );
}

#[test]
fn the_content_index_keeps_the_canonical_file_while_any_holder_is_left() {
    let mut sm = Sm::new();
    let hold = |file: &str| ChatCommand::ContentHold {
        sha256: "h".into(),
        file: file.into(),
    };
    let release = |file: &str| ChatCommand::ContentRelease {
        sha256: "h".into(),
        file: file.into(),
        ts: 7,
    };
    let canonical = |c: Option<&str>| ChatReply::Content {
        canonical: c.map(str::to_string),
    };
    // The first holder is canonical; the next ones read it; a retry answers the same.
    assert_eq!(sm.apply(hold("f:a")).0, canonical(Some("f:a")));
    assert_eq!(sm.apply(hold("f:b")).0, canonical(Some("f:a")));
    assert_eq!(sm.apply(hold("f:b")).0, canonical(Some("f:a")));
    assert_eq!(sm.apply(hold("f:c")).0, canonical(Some("f:a")));
    let of = |sm: &Sm, f: &str| content::read_of(&sm.store, G, "h", f).unwrap();
    assert!(of(&sm, "f:b").held && !of(&sm, "f:b").released);
    // The canonical file's owner lets go: it stays canonical for the others.
    assert_eq!(sm.apply(release("f:a")).0, canonical(Some("f:a")));
    assert_eq!(sm.apply(release("f:a")).0, canonical(Some("f:a")));
    let a = of(&sm, "f:a");
    assert!(a.released && !a.held && a.canonical.as_deref() == Some("f:a"));
    // A hold arriving after its release is refused: it never becomes canonical again.
    assert_eq!(sm.apply(hold("f:a")).0, canonical(None));
    assert_eq!(sm.apply(release("f:b")).0, canonical(Some("f:a")));
    // The last holder goes: the entry with it.
    assert_eq!(sm.apply(release("f:c")).0, canonical(None));
    assert_eq!(of(&sm, "f:a").canonical, None);
    // The same bytes uploaded later start a new entry.
    assert_eq!(sm.apply(hold("f:d")).0, canonical(Some("f:d")));
    // A file that never held it releasing it changes nothing but its own tombstone.
    assert_eq!(sm.apply(release("f:e")).0, canonical(Some("f:d")));
    assert_eq!(sm.apply(hold("f:e")).0, canonical(None));
    assert_eq!(sm.apply(hold("f:f")).0, canonical(Some("f:d")));
}

#[test]
fn release_tombstones_expire_by_log_time_a_bounded_number_per_release() {
    let mut sm = Sm::new();
    let release = |sha: &str, file: &str, ts: u64| ChatCommand::ContentRelease {
        sha256: sha.into(),
        file: file.into(),
        ts,
    };
    let n = content::CONTENT_TOMBSTONES_SWEPT_PER_RELEASE_MAX + 2;
    for i in 0..n {
        sm.apply(release("h", &format!("f:{i}"), 10 + i as u64));
    }
    let tombs = |sm: &Sm| sm.records(b"ct\0").len();
    assert_eq!(tombs(&sm), n);
    assert_eq!(sm.records(b"cx\0").len(), n);
    // Not yet expired: kept (a late hold is refused).
    sm.apply(release(
        "k",
        "f:x",
        10 + content::CONTENT_TOMBSTONE_TTL_MS - 1,
    ));
    assert_eq!(tombs(&sm), n + 1);
    assert_eq!(
        sm.apply(ChatCommand::ContentHold {
            sha256: "h".into(),
            file: "f:0".into()
        })
        .0,
        ChatReply::Content { canonical: None }
    );
    // Every one expired: a release removes at most the bound, oldest first, and adds its
    // own; the next one removes the rest.
    let late = 100 + content::CONTENT_TOMBSTONE_TTL_MS * 2;
    sm.apply(release("k", "f:y", late));
    assert_eq!(
        tombs(&sm),
        n + 2 - content::CONTENT_TOMBSTONES_SWEPT_PER_RELEASE_MAX
    );
    sm.apply(release("k", "f:z", late));
    assert_eq!(tombs(&sm), 2, "only the two recent ones are left");
    assert_eq!(sm.records(b"cx\0").len(), 2);
    assert!(content::read_of(&sm.store, G, "k", "f:z").unwrap().released);
}

#[test]
fn a_file_records_its_content_once_and_only_while_held() {
    let mut sm = Sm::new();
    let record = FileRecord {
        id: "f:x".into(),
        owner: "a".into(),
        size: 2,
        mime: "m".into(),
        name: "n".into(),
        chunk_bytes: 2,
        offset: 0,
        sha256: None,
        created_ms: 1,
    };
    sm.apply(ChatCommand::FileBegin(record));
    let set = |c: Content| ChatCommand::FileContent {
        file: "f:x".into(),
        content: c,
    };
    assert_eq!(
        rejected(&sm.apply(set(Content::Canonical)).0),
        "unknown_file",
        "not complete yet"
    );
    sm.apply(ChatCommand::FileProgress {
        file: "f:x".into(),
        offset: 2,
    });
    sm.apply(ChatCommand::FileComplete {
        file: "f:x".into(),
        sha256: "h".into(),
    });
    assert_eq!(
        rejected(&sm.apply(set(Content::Alias("f:x".into()))).0),
        "invalid_field"
    );
    let alias = Content::Alias("f:y".into());
    assert_eq!(sm.apply(set(alias.clone())).0, ChatReply::Done { seq: 0 });
    assert_eq!(sm.apply(set(alias.clone())).0, ChatReply::Done { seq: 0 });
    assert_eq!(rejected(&sm.apply(set(Content::Own)).0), "conflict");
    let state = files::read_state(&sm.store, G, "f:x").unwrap();
    assert_eq!(state.content, alias);
    assert_eq!(state.source("f:x"), "f:y");
}

#[test]
fn quotas_charge_each_file_once_refuse_past_the_limit_and_refund() {
    let mut sm = Sm::new();
    let charge = |file: &str, bytes: u64| ChatCommand::QuotaCharge {
        user: "a".into(),
        file: file.into(),
        bytes,
        quota_bytes: 10,
        ts: 5,
    };
    let usage = |sm: &Sm| quota::usage(&sm.store, G, "a").unwrap();
    assert_eq!(sm.apply(charge("f:1", 6)).0, ChatReply::Done { seq: 0 });
    assert_eq!(sm.apply(charge("f:1", 6)).0, ChatReply::Done { seq: 0 });
    assert_eq!(usage(&sm), quota::QuotaUsage { bytes: 6, files: 1 });
    // At the bound exactly: allowed; one byte past it: refused, nothing changes.
    assert_eq!(sm.apply(charge("f:2", 4)).0, ChatReply::Done { seq: 0 });
    assert_eq!(rejected(&sm.apply(charge("f:3", 1)).0), "quota_exceeded");
    assert_eq!(
        usage(&sm),
        quota::QuotaUsage {
            bytes: 10,
            files: 2
        }
    );
    // Another user's quota is their own.
    sm.apply(ChatCommand::QuotaCharge {
        user: "b".into(),
        file: "f:9".into(),
        bytes: 10,
        quota_bytes: 10,
        ts: 5,
    });
    let listed = quota::charges(&sm.store, G, None, 10).unwrap();
    let names: Vec<(&str, &str)> = listed
        .iter()
        .map(|c| (c.user.as_str(), c.file.as_str()))
        .collect();
    assert_eq!(names, vec![("a", "f:1"), ("a", "f:2"), ("b", "f:9")]);
    assert_eq!(
        quota::charges(&sm.store, G, Some(("a", "f:2")), 10).unwrap()[0].file,
        "f:9"
    );
    // Refunds are idempotent and free room.
    let refund = ChatCommand::QuotaRefund {
        user: "a".into(),
        file: "f:1".into(),
    };
    sm.apply(refund.clone());
    sm.apply(refund);
    assert_eq!(usage(&sm), quota::QuotaUsage { bytes: 4, files: 1 });
    assert_eq!(sm.apply(charge("f:3", 6)).0, ChatReply::Done { seq: 0 });
}

#[test]
fn members_see_exactly_their_span_and_groups_are_bounded() {
    let mut sm = Sm::new();
    let chat = sm.group("a", &["b"]);
    sm.send(&chat, "a", "1", "before c");
    let (r, events) = sm.apply(ChatCommand::AddMembers {
        chat: chat.clone(),
        by: "b".into(),
        users: vec!["c".into()],
        members_max: 4,
        ts: 2,
    });
    let ChatReply::Done { seq: joined } = r else {
        panic!("{r:?}")
    };
    assert!(
        matches!(&events[0], ChatEvent::Message { recipients, .. } if recipients.contains(&"c".to_string()))
    );
    sm.send(&chat, "a", "2", "with c");
    let (r, _) = sm.apply(ChatCommand::RemoveMember {
        chat: chat.clone(),
        by: "c".into(),
        user: "c".into(),
        ts: 3,
    });
    let ChatReply::Done { seq: left } = r else {
        panic!("{r:?}")
    };
    sm.send(&chat, "a", "3", "after c");
    let record = chat_record(&sm.store, G, &chat).unwrap().unwrap();
    let span = record.span_of("c").unwrap();
    assert_eq!((span.from, span.to), (joined, Some(left)));
    let page = history(
        &sm.store,
        G,
        &chat,
        span,
        record.last_seq,
        PageRequest {
            before: None,
            after: Some(0),
            limit: 100,
        },
    )
    .unwrap();
    let texts: Vec<&str> = page.messages.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, vec!["c", "with c", "c"], "join, message, leave");
    assert_eq!(rejected(&sm.send(&chat, "c", "4", "x")), "not_member");
    let (r, _) = sm.apply(ChatCommand::AddMembers {
        chat: chat.clone(),
        by: "a".into(),
        users: vec!["d".into(), "e".into(), "f".into()],
        members_max: 4,
        ts: 4,
    });
    assert_eq!(rejected(&r), "group_full");
}

#[test]
fn cursors_only_move_forward_and_edits_are_log_entries() {
    let mut sm = Sm::new();
    sm.apply(ChatCommand::OpenDirect {
        chat: "d:a:b".into(),
        a: "a".into(),
        b: "b".into(),
        ts: 1,
    });
    for i in 0..5 {
        sm.send("d:a:b", "a", &i.to_string(), "m");
    }
    let receipt = |d: Option<u64>, r: Option<u64>| {
        ChatCommand::Receipts(vec![ReceiptUpdate {
            chat: "d:a:b".into(),
            user: "b".into(),
            delivered: d,
            read: r,
        }])
    };
    let (_, events) = sm.apply(receipt(Some(5), Some(3)));
    assert_eq!(events.len(), 1);
    let (_, events) = sm.apply(receipt(Some(1), Some(1)));
    assert!(events.is_empty(), "a backward receipt changes nothing");
    sm.apply(receipt(None, Some(99)));
    let c = cursors(&sm.store, G, "d:a:b").unwrap()["b"];
    assert_eq!(
        (c.delivered, c.read),
        (5, 5),
        "clamped to the last seq; read implies delivered"
    );
    let (r, events) = sm.apply(ChatCommand::Edit {
        chat: "d:a:b".into(),
        sender: "a".into(),
        seq: 1,
        text: "new".into(),
        ts: 9,
    });
    assert_eq!(r, ChatReply::Done { seq: 6 });
    assert!(matches!(&events[0], ChatEvent::Updated { message, .. } if message.text == "new"));
    let (r, _) = sm.apply(ChatCommand::Delete {
        chat: "d:a:b".into(),
        sender: "b".into(),
        seq: 2,
        ts: 9,
    });
    assert_eq!(rejected(&r), "forbidden", "only the sender deletes");
    sm.apply(ChatCommand::Delete {
        chat: "d:a:b".into(),
        sender: "a".into(),
        seq: 2,
        ts: 9,
    });
    let m1 = message(&sm.store, G, "d:a:b", 1).unwrap().unwrap();
    let m2 = message(&sm.store, G, "d:a:b", 2).unwrap().unwrap();
    assert_eq!((m1.text.as_str(), m1.edited_ts), ("new", Some(9)));
    assert_eq!((m2.kind.as_str(), m2.text.as_str()), ("deleted", ""));
}

fn acked(seq: u64, ts: u64, duplicate: bool) -> ChatReply {
    ChatReply::Acked { seq, ts, duplicate }
}

fn open_direct(sm: &mut Sm, chat: &str, a: &str, b: &str) {
    let (r, _) = sm.apply(ChatCommand::OpenDirect {
        chat: chat.into(),
        a: a.into(),
        b: b.into(),
        ts: 1,
    });
    assert!(matches!(r, ChatReply::Done { .. }), "{r:?}");
}

#[test]
fn a_client_msg_id_is_scoped_to_its_chat() {
    let mut sm = Sm::new();
    open_direct(&mut sm, "d:a:b", "a", "b");
    open_direct(&mut sm, "d:a:c", "a", "c");
    assert_eq!(sm.send("d:a:b", "a", "k", "to b"), acked(1, 1, false));
    assert_eq!(
        sm.send("d:a:c", "a", "k", "to c"),
        acked(1, 1, false),
        "the same key in another chat is another message"
    );
    assert_eq!(sm.send("d:a:b", "a", "k", "to b"), acked(1, 1, true));
    assert_eq!(sm.send("d:a:c", "a", "k", "to c"), acked(1, 1, true));
    assert_eq!(
        message(&sm.store, G, "d:a:c", 1).unwrap().unwrap().text,
        "to c"
    );
}

#[test]
fn dedup_records_answer_retries_within_the_window_and_expire_by_log_time() {
    const W: u64 = 1_000;
    let mut sm = Sm::new();
    open_direct(&mut sm, "d:a:b", "a", "b");
    assert_eq!(
        sm.send_at("d:a:b", "a", "k1", "one", 100, W),
        acked(1, 100, false)
    );
    // A retry one millisecond before expiry still gets the original answer.
    assert_eq!(
        sm.send_at("d:a:b", "a", "k1", "one", 1_099, W),
        acked(1, 100, true)
    );
    // At expiry the key is free again: the same send is a new message.
    assert_eq!(
        sm.send_at("d:a:b", "a", "k1", "one", 1_100, W),
        acked(2, 1_100, false)
    );
    assert_eq!(
        sm.send_at("d:a:b", "a", "k1", "one", 1_200, W),
        acked(2, 1_100, true)
    );
    // The re-used key has exactly one record and one index entry.
    assert_eq!(sm.records(b"i\0").len(), 1);
    assert_eq!(sm.records(b"x\0").len(), 1);
    // A refused send sweeps nothing.
    assert_eq!(
        rejected(&sm.send_at("d:x:y", "a", "k2", "?", 10_000, W)),
        "unknown_chat"
    );
    assert_eq!(sm.records(b"i\0").len(), 1);
}

/// The sweep hint only skips scans that would find nothing: a replica that keeps it and
/// one that forgets it before every apply (as after a restart) store the same records,
/// through sends that expire nothing, one, or more than a sweep removes, and with windows
/// that put a new expiry before the ones already indexed.
#[test]
fn sweep_hint_never_changes_what_is_removed() {
    let mut kept = Sm::new();
    let mut forgot = Sm::new();
    forgot.forget_hint = true;
    for sm in [&mut kept, &mut forgot] {
        open_direct(sm, "d:a:b", "a", "b");
    }
    let mut skipped_scans = 0;
    let mut ts = 100;
    for i in 0..400u64 {
        // Mostly 1 ms apart; now and then a jump past many expiries at once.
        ts += if i % 97 == 0 { 5_000 } else { 1 };
        let window = [50, 3_000, 20, 700][(i % 4) as usize];
        let key = format!("k{}", i % 150);
        let before = kept.hint;
        let r1 = kept.send_at("d:a:b", "a", &key, "m", ts, window);
        let r2 = forgot.send_at("d:a:b", "a", &key, "m", ts, window);
        assert_eq!(r1, r2, "send {i}");
        if before.expiries_from_ms.is_some_and(|from| ts < from) {
            skipped_scans += 1;
        }
        assert_eq!(kept.records(b""), forgot.records(b""), "after send {i}");
    }
    assert!(
        skipped_scans > 100,
        "the hint let only {skipped_scans} of 400 sends skip their scan"
    );
    // Every expiry still indexed is at or after what the hint says.
    let from = kept.hint.expiries_from_ms.unwrap_or(0);
    let indexed = kept.records(b"x\0");
    assert!(!indexed.is_empty());
    for (k, _) in indexed {
        assert!(keys::expiry_of(&k).unwrap() >= from);
    }
}

#[test]
fn expired_dedup_records_are_swept_a_bounded_number_per_send() {
    const W: u64 = 1_000;
    let mut sm = Sm::new();
    open_direct(&mut sm, "d:a:b", "a", "b");
    let n = 3 * DEDUP_EXPIRED_SWEEP_PER_SEND_MAX as u64;
    for i in 0..n {
        let r = sm.send_at("d:a:b", "a", &format!("k{i}"), "m", 10 + i, W);
        assert_eq!(r, acked(i + 1, 10 + i, false));
    }
    assert_eq!(sm.records(b"i\0").len() as u64, n);
    // Long after the window: each send removes at most the bound, oldest first, and
    // adds its own record.
    let late = 1_000_000;
    sm.send_at("d:a:b", "b", "late-0", "m", late, W);
    let left = n - DEDUP_EXPIRED_SWEEP_PER_SEND_MAX as u64 + 1;
    assert_eq!(sm.records(b"i\0").len() as u64, left);
    assert_eq!(sm.records(b"x\0").len() as u64, left);
    // The oldest went first: k0 is new again, the newest (still stored) is expired
    // by log time and so is not a duplicate either.
    assert!(matches!(
        sm.send_at("d:a:b", "a", "k0", "m", late, W),
        ChatReply::Acked {
            duplicate: false,
            ..
        }
    ));
    for i in 2..6 {
        sm.send_at("d:a:b", "b", &format!("late-{i}"), "m", late, W);
    }
    // Only the late sends' records remain (six of them), all live.
    let keys: Vec<String> = sm
        .records(b"i\0")
        .into_iter()
        .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
        .collect();
    assert_eq!(keys.len(), 6, "{keys:?}");
    assert!(
        keys.iter()
            .all(|k| k.contains("late-") || k.ends_with("k0")),
        "{keys:?}"
    );
    assert_eq!(sm.records(b"x\0").len(), 6);
    assert_eq!(
        sm.send_at("d:a:b", "b", "late-0", "m", late + 1, W),
        acked(n + 1, late, true)
    );
}

#[test]
fn golden_bytes_of_the_send_with_a_window_and_its_dedup_record() {
    let cmd = ChatCommand::Send {
        chat: "c".into(),
        sender: "a".into(),
        client_msg_id: "k".into(),
        text: "t".into(),
        reply_to: Some(3),
        ts: 5,
        dedup_window_ms: 200,
    };
    let bytes = chatd_codec::encode(&cmd).unwrap();
    assert_eq!(
        bytes,
        vec![1, 10, 1, b'c', 1, b'a', 1, b'k', 1, b't', 1, 3, 5, 200]
    );
    assert_eq!(chatd_codec::decode::<ChatCommand>(&bytes).unwrap(), cmd);
    let d = DedupRecord {
        seq: 7,
        ts: 300,
        expires_ms: 1_000,
    };
    let bytes = chatd_codec::encode(&d).unwrap();
    assert_eq!(bytes, vec![1, 7, 251, 44, 1, 251, 232, 3]);
    assert_eq!(chatd_codec::decode::<DedupRecord>(&bytes).unwrap(), d);
    assert_eq!(keys::dedup("c", "a", "k"), b"i\0c\0a\0k".to_vec());
    assert_eq!(
        keys::dedup_expiry(258, b"i\0c"),
        b"x\0\0\0\0\0\0\0\x01\x02\0i\0c".to_vec()
    );
    assert_eq!(
        keys::dedup_key_of_expiry(b"x\0\0\0\0\0\0\0\x01\x02\0i\0c"),
        Some(&b"i\0c"[..])
    );
}

#[test]
fn golden_bytes_of_chat_formats() {
    let cmd = ChatCommand::SendWithoutWindow {
        chat: "c".into(),
        sender: "a".into(),
        client_msg_id: "k".into(),
        text: "t".into(),
        reply_to: None,
        ts: 5,
    };
    assert_eq!(
        chatd_codec::encode(&cmd).unwrap(),
        vec![1, 1, 1, b'c', 1, b'a', 1, b'k', 1, b't', 0, 5]
    );
    let reply = ChatReply::Acked {
        seq: 2,
        ts: 5,
        duplicate: true,
    };
    assert_eq!(chatd_codec::encode(&reply).unwrap(), vec![1, 0, 2, 5, 1]);
    assert_eq!(
        chatd_codec::encode(&ChatCommand::Append(b"hi".to_vec())).unwrap(),
        vec![1, 0, 2, b'h', b'i']
    );
}
