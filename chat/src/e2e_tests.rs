//! The E2E half of the state machine: one commit per epoch, members changed by commit,
//! KeyPackages handed out once, within their bounds; golden bytes of its formats.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::e2e::{DeviceInfo, E2eMessage, E2eState, KeyPackage, KeyPackageBounds, MlsKind};
use crate::golden::pin;
use crate::tests::{rejected, Sm};
use crate::*;

const CHAT: &str = "e:1";

fn create(sm: &mut Sm, direct: bool) {
    let (r, _) = sm.apply(ChatCommand::CreateE2e {
        chat: CHAT.into(),
        creator: "al".into(),
        name: "sec".into(),
        direct,
        ts: 1,
    });
    assert_eq!(r, ChatReply::Done { seq: 1 });
}

fn msg(sender: &str, key: &str, kind: MlsKind, epoch: u64) -> E2eMessage {
    E2eMessage {
        chat: CHAT.into(),
        sender: sender.into(),
        client_msg_id: key.into(),
        kind,
        epoch,
        data: format!("{key}-ciphertext"),
        welcome: None,
        add: Vec::new(),
        remove: Vec::new(),
        files: Vec::new(),
        members_max: 3,
        ts: 10,
        dedup_window_ms: DEDUP_WINDOW_MS_DEFAULT,
    }
}

fn commit(sender: &str, key: &str, epoch: u64, add: &[&str], remove: &[&str]) -> E2eMessage {
    E2eMessage {
        welcome: (!add.is_empty()).then(|| format!("{key}-welcome")),
        add: add.iter().map(|u| u.to_string()).collect(),
        remove: remove.iter().map(|u| u.to_string()).collect(),
        ..msg(sender, key, MlsKind::Commit, epoch)
    }
}

fn send(sm: &mut Sm, m: E2eMessage) -> ChatReply {
    sm.apply(ChatCommand::E2eSend(m)).0
}

fn chat(sm: &Sm) -> ChatRecord {
    read::chat_record(&sm.store, 3, CHAT).unwrap().unwrap()
}

fn entry(sm: &Sm, seq: u64) -> MessageRecord {
    read::message(&sm.store, 3, CHAT, seq).unwrap().unwrap()
}

fn epoch(sm: &Sm) -> u64 {
    let b = chatd_raftlog::read_record(&sm.store, 3, &keys::e2e(CHAT))
        .unwrap()
        .unwrap();
    chatd_codec::decode::<E2eState>(&b).unwrap().epoch
}

#[test]
fn one_commit_per_epoch_and_commits_change_members() {
    let mut sm = Sm::new();
    create(&mut sm, false);
    assert_eq!(epoch(&sm), 0);
    assert_eq!(chat(&sm).kind, ChatKind::E2eGroup);
    // Plaintext never enters an E2E chat, and members change by commit only.
    assert_eq!(rejected(&sm.send(CHAT, "al", "p", "plain")), "forbidden");
    let (r, _) = sm.apply(ChatCommand::AddMembers {
        chat: CHAT.into(),
        by: "al".into(),
        users: vec!["bo".into()],
        members_max: 8,
        ts: 2,
    });
    assert_eq!(rejected(&r), "forbidden");

    // Alice adds Bob: the commit, Bob's join, then the welcome Bob can read.
    let (r, events) = sm.apply(ChatCommand::E2eSend(commit("al", "c1", 0, &["bo"], &[])));
    assert_eq!(
        r,
        ChatReply::Acked {
            seq: 2,
            ts: 10,
            duplicate: false
        }
    );
    assert_eq!(epoch(&sm), 1);
    let kinds: Vec<(String, Option<u64>)> = (2..=4)
        .map(|s| entry(&sm, s))
        .map(|m| (m.kind, m.target))
        .collect();
    assert_eq!(
        kinds,
        [
            ("mls_commit".to_string(), Some(0)),
            ("join".to_string(), None),
            ("mls_welcome".to_string(), Some(1)),
        ]
    );
    assert_eq!(entry(&sm, 4).text, "c1-welcome");
    assert_eq!(chat(&sm).span_of("bo"), Some(Span { from: 3, to: None }));
    // Bob is told of the welcome, not of the commit before his join.
    let told: Vec<(u64, Vec<String>)> = events
        .iter()
        .filter_map(|e| match e {
            ChatEvent::Message {
                message,
                recipients,
            } => Some((message.seq, recipients.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(told[0], (2, vec!["al".to_string()]));
    assert_eq!(told[2], (4, vec!["al".to_string(), "bo".to_string()]));

    // Bob's concurrent commit for epoch 0 lost: refused, nothing stored.
    let before = sm.records(b"");
    let r = send(&mut sm, commit("bo", "c2", 0, &[], &[]));
    assert_eq!(rejected(&r), "stale_epoch");
    assert_eq!(sm.records(b""), before);
    // Alice's retry of her winning commit is answered as the original.
    assert_eq!(
        send(&mut sm, commit("al", "c1", 0, &["bo"], &[])),
        ChatReply::Acked {
            seq: 2,
            ts: 10,
            duplicate: true
        }
    );
    // Application messages: any epoch up to the chat's (late ones still decrypt), not ahead.
    assert!(matches!(
        send(&mut sm, msg("bo", "a1", MlsKind::Application, 0)),
        ChatReply::Acked { seq: 5, .. }
    ));
    assert_eq!(
        rejected(&send(&mut sm, msg("bo", "a2", MlsKind::Application, 2))),
        "invalid_field"
    );
    // Only a commit adds, removes or welcomes.
    let mut bad = msg("bo", "a3", MlsKind::Application, 1);
    bad.add = vec!["cy".into()];
    assert_eq!(rejected(&send(&mut sm, bad)), "invalid_field");
    // A member does not commit its own removal; bounds hold.
    assert_eq!(
        rejected(&send(&mut sm, commit("bo", "c3", 1, &[], &["bo"]))),
        "invalid_field"
    );
    assert_eq!(
        rejected(&send(&mut sm, commit("bo", "c3", 1, &["cy", "di"], &[]))),
        "group_full"
    );
    assert_eq!(
        rejected(&send(&mut sm, commit("bo", "c3", 1, &[], &["cy"]))),
        "not_member"
    );

    // Alice removes Bob and adds Cy: Bob sees the commit and his leave, nothing after.
    let r = send(&mut sm, commit("al", "c4", 1, &["cy"], &["bo"]));
    assert_eq!(
        r,
        ChatReply::Acked {
            seq: 6,
            ts: 10,
            duplicate: false
        }
    );
    assert_eq!(entry(&sm, 7).kind, "leave");
    assert_eq!(entry(&sm, 8).kind, "join");
    assert_eq!(entry(&sm, 9).kind, "mls_welcome");
    assert_eq!(
        chat(&sm).span_of("bo"),
        Some(Span {
            from: 3,
            to: Some(7)
        })
    );
    assert_eq!(chat(&sm).span_of("cy"), Some(Span { from: 8, to: None }));
    assert_eq!(epoch(&sm), 2);
    assert_eq!(
        rejected(&send(&mut sm, msg("bo", "a4", MlsKind::Application, 2))),
        "not_member"
    );
    // Edits never; deletes of one's own application message only.
    let (r, _) = sm.apply(ChatCommand::Edit {
        chat: CHAT.into(),
        sender: "bo".into(),
        seq: 5,
        text: "x".into(),
        ts: 11,
    });
    assert_eq!(rejected(&r), "not_member");
    assert!(matches!(
        send(&mut sm, msg("cy", "a5", MlsKind::Application, 2)),
        ChatReply::Acked { seq: 10, .. }
    ));
    let (r, _) = sm.apply(ChatCommand::Edit {
        chat: CHAT.into(),
        sender: "cy".into(),
        seq: 10,
        text: "x".into(),
        ts: 11,
    });
    assert_eq!(rejected(&r), "forbidden");
    let (r, _) = sm.apply(ChatCommand::Delete {
        chat: CHAT.into(),
        sender: "cy".into(),
        seq: 8,
        ts: 11,
    });
    assert_eq!(rejected(&r), "forbidden", "a join is not deletable");
    let (r, _) = sm.apply(ChatCommand::Delete {
        chat: CHAT.into(),
        sender: "cy".into(),
        seq: 10,
        ts: 11,
    });
    assert!(matches!(r, ChatReply::Done { .. }), "{r:?}");
    assert_eq!(entry(&sm, 10).kind, "deleted");
    assert_eq!(entry(&sm, 10).text, "");
    // A member may still leave by itself (its removal is then committed by the others).
    let (r, _) = sm.apply(ChatCommand::RemoveMember {
        chat: CHAT.into(),
        by: "cy".into(),
        user: "cy".into(),
        ts: 12,
    });
    assert!(matches!(r, ChatReply::Done { .. }), "{r:?}");
    let (r, _) = sm.apply(ChatCommand::RemoveMember {
        chat: CHAT.into(),
        by: "al".into(),
        user: "bo".into(),
        ts: 12,
    });
    assert_eq!(rejected(&r), "forbidden");
}

#[test]
fn a_direct_e2e_chat_holds_two_members() {
    let mut sm = Sm::new();
    create(&mut sm, true);
    assert_eq!(chat(&sm).kind, ChatKind::E2eDirect);
    assert_eq!(
        rejected(&send(&mut sm, commit("al", "c1", 0, &["bo", "cy"], &[]))),
        "group_full"
    );
    assert!(matches!(
        send(&mut sm, commit("al", "c1", 0, &["bo"], &[])),
        ChatReply::Acked { .. }
    ));
    assert_eq!(
        rejected(&send(&mut sm, commit("bo", "c2", 1, &[], &["al"]))),
        "forbidden"
    );
    let (r, _) = sm.apply(ChatCommand::RemoveMember {
        chat: CHAT.into(),
        by: "bo".into(),
        user: "bo".into(),
        ts: 12,
    });
    assert_eq!(rejected(&r), "forbidden");
}

#[test]
fn e2e_messages_go_to_plain_chats_never() {
    let mut sm = Sm::new();
    let g = sm.group("al", &[]);
    let mut m = msg("al", "a1", MlsKind::Application, 0);
    m.chat = g;
    assert_eq!(rejected(&send(&mut sm, m)), "invalid_field");
}

const BOUNDS: KeyPackageBounds = KeyPackageBounds {
    per_device_max: 3,
    devices_max: 2,
};

fn kp(name: &str, expires_ms: u64) -> KeyPackage {
    KeyPackage {
        data: name.into(),
        expires_ms,
    }
}

fn upload(sm: &mut Sm, device: &str, p: &[(&str, u64)], last: Option<(&str, u64)>) -> ChatReply {
    sm.apply(ChatCommand::KeyPackagesPut {
        user: "bo".into(),
        device: device.into(),
        packages: p.iter().map(|(n, e)| kp(n, *e)).collect(),
        last_resort: last.map(|(n, e)| kp(n, e)),
        bounds: BOUNDS,
        ts: 10,
    })
    .0
}

fn claim(sm: &mut Sm, ts: u64) -> Vec<(String, String)> {
    match sm
        .apply(ChatCommand::KeyPackagesClaim {
            user: "bo".into(),
            bounds: BOUNDS,
            ts,
        })
        .0
    {
        ChatReply::KeyPackages(p) => p,
        other => panic!("{other:?}"),
    }
}

fn infos(sm: &Sm, now_ms: u64) -> Vec<DeviceInfo> {
    e2e::device_infos(&sm.store, 3, "bo", BOUNDS, now_ms).unwrap()
}

#[test]
fn key_packages_are_claimed_once_never_expired_and_bounded() {
    let mut sm = Sm::new();
    assert!(claim(&mut sm, 10).is_empty(), "no device, nothing to claim");
    assert_eq!(
        upload(
            &mut sm,
            "phone",
            &[("p1", 100), ("p2", 50), ("p3", 100)],
            None
        ),
        ChatReply::Devices(vec![DeviceInfo {
            device: "phone".into(),
            available: 3,
            last_resort: false
        }])
    );
    // At the per-device bound: refused, nothing changed.
    let before = sm.records(b"");
    assert_eq!(
        rejected(&upload(&mut sm, "phone", &[("p4", 100)], None)),
        "limit_reached"
    );
    assert_eq!(sm.records(b""), before);
    assert!(matches!(
        upload(&mut sm, "laptop", &[("l1", 100)], Some(("lr", 1000))),
        ChatReply::Devices(_)
    ));
    // At the devices bound: a third device is refused, nothing changed.
    let before = sm.records(b"");
    assert_eq!(
        rejected(&upload(&mut sm, "tablet", &[("t1", 100)], None)),
        "limit_reached"
    );
    assert_eq!(sm.records(b""), before);

    // One per device, oldest first, each once; at ts 60 p2 has expired and is passed over.
    let mut first = claim(&mut sm, 20);
    first.sort();
    assert_eq!(
        first,
        [
            ("laptop".into(), "l1".into()),
            ("phone".into(), "p1".into())
        ]
    );
    let second = claim(&mut sm, 60);
    assert_eq!(
        second,
        [
            ("laptop".into(), "lr".into()),
            ("phone".into(), "p3".into())
        ]
    );
    assert_eq!(
        infos(&sm, 60),
        [
            DeviceInfo {
                device: "laptop".into(),
                available: 0,
                last_resort: true
            },
            DeviceInfo {
                device: "phone".into(),
                available: 0,
                last_resort: false
            }
        ]
    );
    // The last-resort package is kept; the phone has nothing left.
    assert_eq!(claim(&mut sm, 70), [("laptop".into(), "lr".into())]);
    // Expired uploads are dropped when the device uploads again; the bound counts live ones.
    assert!(matches!(
        upload(
            &mut sm,
            "phone",
            &[("q1", 100), ("q2", 100), ("q3", 100)],
            None
        ),
        ChatReply::Devices(_)
    ));
    // Retiring forgets the device and its packages.
    let (r, _) = sm.apply(ChatCommand::RetireDevice {
        user: "bo".into(),
        device: "phone".into(),
        bounds: BOUNDS,
    });
    assert_eq!(r, ChatReply::Devices(Vec::new()));
    assert!(sm
        .records(&keys::key_package_prefix("bo", "phone"))
        .is_empty());
    assert_eq!(infos(&sm, 70).len(), 1);
    assert!(matches!(
        upload(&mut sm, "tablet", &[("t1", 100)], None),
        ChatReply::Devices(_)
    ));
}

#[test]
fn golden_e2e_formats() {
    pin(
        &ChatCommand::E2eSend(E2eMessage {
            chat: "e:1".into(),
            sender: "al".into(),
            client_msg_id: "k".into(),
            kind: MlsKind::Commit,
            epoch: 7,
            data: "AQ==".into(),
            welcome: Some("Ag==".into()),
            add: vec!["bo".into()],
            remove: vec!["cy".into()],
            files: Vec::new(),
            members_max: 20,
            ts: 300,
            dedup_window_ms: 5,
        }),
        "011903653a3102616c016b01070441513d3d010441673d3d0102626f010263790014fb2c0105",
    );
    pin(
        &ChatCommand::CreateE2e {
            chat: "e:1".into(),
            creator: "al".into(),
            name: "n".into(),
            direct: true,
            ts: 1,
        },
        "011803653a3102616c016e0101",
    );
    pin(
        &ChatCommand::KeyPackagesPut {
            user: "bo".into(),
            device: "d".into(),
            packages: vec![kp("AQ==", 9)],
            last_resort: Some(kp("Ag==", 10)),
            bounds: BOUNDS,
            ts: 1,
        },
        "011a02626f0164010441513d3d09010441673d3d0a030201",
    );
    pin(
        &ChatCommand::KeyPackagesClaim {
            user: "bo".into(),
            bounds: BOUNDS,
            ts: 1,
        },
        "011b02626f030201",
    );
    pin(
        &ChatCommand::RetireDevice {
            user: "bo".into(),
            device: "d".into(),
            bounds: BOUNDS,
        },
        "011c02626f01640302",
    );
    pin(
        &ChatReply::KeyPackages(vec![("d".into(), "AQ==".into())]),
        "01060101640441513d3d",
    );
    pin(
        &ChatReply::Devices(vec![DeviceInfo {
            device: "d".into(),
            available: 2,
            last_resort: true,
        }]),
        "01050101640201",
    );
    pin(&E2eState { epoch: 300 }, "01fb2c01");
    pin(
        &e2e::DeviceRecord {
            next_index: 4,
            last_resort: Some(kp("Ag==", 10)),
        },
        "0104010441673d3d0a",
    );
    pin(&ChatKind::E2eDirect, "0103");
    assert_eq!(crate::golden::hex(&keys::e2e("e:1")), "653200653a31");
    assert_eq!(
        crate::golden::hex(&keys::device("bo", "d")),
        "6b6400626f0064"
    );
    assert_eq!(
        crate::golden::hex(&keys::key_package("bo", "d", 2)),
        "6b7000626f0064000000000000000002"
    );
}
