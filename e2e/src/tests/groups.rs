//! Group scenarios: joining, removal, concurrent commits, catching up, KeyPackages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::{member_ids, messages, texts, three, World, CHAT};
use crate::{Device, E2eError, Event, Kind};

#[test]
fn three_devices_join_and_read_each_other() {
    let (mut w, mut alice, mut bob, mut carol) = three();
    let all = ["alice/phone", "bob/laptop", "carol/phone"];
    for dev in [&alice, &bob, &carol] {
        assert_eq!(member_ids(dev), all);
    }
    // Safety numbers agree between a device and what the others see of it.
    let sn = alice.safety_number();
    for dev in [&bob, &carol] {
        let m = dev
            .members(CHAT)
            .into_iter()
            .find(|m| m.user == "alice")
            .unwrap();
        assert_eq!(m.safety_number, sn);
    }
    assert_ne!(alice.safety_number(), bob.safety_number());

    let o = alice.encrypt(CHAT, b"hi from alice").unwrap();
    assert_eq!(o.epoch, 1);
    w.server.send(&alice, o);
    let o = bob.encrypt(CHAT, b"hi from bob").unwrap();
    w.server.send(&bob, o);
    let o = carol.encrypt(CHAT, b"hi from carol").unwrap();
    w.server.send(&carol, o);
    let expected = vec![
        ("alice/phone".to_string(), b"hi from alice".to_vec()),
        ("bob/laptop".to_string(), b"hi from bob".to_vec()),
        ("carol/phone".to_string(), b"hi from carol".to_vec()),
    ];
    for dev in [&mut alice, &mut bob, &mut carol] {
        let ev = w.server.sync(dev);
        assert_eq!(messages(&ev), expected, "{}", dev.user());
        let h = dev.history(CHAT);
        assert_eq!(h.iter().map(|s| s.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(h[1].sender_user, "bob");
        assert_eq!(h[1].sender_device, "laptop");
        assert_eq!(h[1].ts_ms, 1_004);
        // Re-feeding is harmless.
        let again = dev
            .process(CHAT, 4, "bob", Kind::Application, &w.server.log[3].data, 0)
            .unwrap();
        assert!(matches!(again, Event::Ignored { seq: 4, .. }));
        assert_eq!(dev.history(CHAT).len(), 3);
    }
}

#[test]
fn removed_device_cannot_read_later_messages_and_can_rejoin() {
    let (mut w, mut alice, mut bob, mut carol) = three();
    assert!(matches!(
        alice.remove(CHAT, &["dave".to_string()]),
        Err(E2eError::NothingToRemove)
    ));
    assert!(matches!(
        alice.remove(CHAT, &["alice".to_string()]),
        Err(E2eError::NothingToRemove)
    ));
    let c = alice.remove(CHAT, &["carol".to_string()]).unwrap();
    assert!(matches!(
        alice.update(CHAT),
        Err(E2eError::PendingCommit(_))
    ));
    assert!(w.server.commit(&alice, &c));
    for dev in [&mut alice, &mut bob] {
        let ev = w.server.sync(dev);
        assert!(
            matches!(&ev[0], Event::Epoch { epoch: 2, removed, removed_self: false, .. } if removed == &["carol/phone".to_string()]),
            "{ev:?}"
        );
        assert_eq!(member_ids(dev), ["alice/phone", "bob/laptop"]);
    }
    let ev = w.server.sync(&mut carol);
    assert!(
        matches!(
            &ev[0],
            Event::Epoch {
                removed_self: true,
                ..
            }
        ),
        "{ev:?}"
    );
    assert!(!carol.is_member(CHAT));
    assert!(matches!(
        carol.encrypt(CHAT, b"x"),
        Err(E2eError::NotMember(_))
    ));

    let o = bob.encrypt(CHAT, b"secret after carol left").unwrap();
    w.server.send(&bob, o);
    let ev = w.server.sync(&mut carol);
    assert!(matches!(&ev[0], Event::Undecryptable { .. }), "{ev:?}");
    assert!(texts(&carol).is_empty());
    for dev in [&mut alice, &mut bob] {
        let ev = w.server.sync(dev);
        assert_eq!(
            messages(&ev),
            vec![(
                "bob/laptop".to_string(),
                b"secret after carol left".to_vec()
            )]
        );
    }

    // carol comes back with a fresh KeyPackage: her old group is replaced.
    let kp = World::kp(&mut carol);
    let c = bob.add(CHAT, &[kp]).unwrap();
    assert!(w.server.commit(&bob, &c));
    assert!(matches!(
        w.server.sync(&mut alice).as_slice(),
        [Event::Epoch { epoch: 3, .. }, Event::Ignored { .. }]
    ));
    let o2 = alice.encrypt(CHAT, b"welcome back, epoch 3").unwrap();
    w.server.send(&alice, o2);
    let ev = w.server.sync(&mut carol);
    assert!(
        matches!(
            ev.as_slice(),
            [
                Event::Ignored { .. },
                Event::Joined { epoch: 3, .. },
                Event::Message { .. }
            ]
        ),
        "{ev:?}"
    );
    assert!(carol.is_member(CHAT));
    assert_eq!(texts(&carol), vec![b"welcome back, epoch 3".to_vec()]);
}

#[test]
fn concurrent_commits_converge_and_lose_no_message() {
    let (mut w, mut alice, mut bob, mut carol) = three();
    let mut dave = w.device("dave", "tablet");
    let dave_kp = World::kp(&mut dave);

    // Both commit on epoch 1; messages are sent around the commits.
    let m1 = alice.encrypt(CHAT, b"m1 before commits").unwrap();
    let a = alice.add(CHAT, &[dave_kp]).unwrap();
    let b = bob.remove(CHAT, &["carol".to_string()]).unwrap();
    assert_eq!((a.epoch, b.epoch), (1, 1));
    let m2 = bob
        .encrypt(CHAT, b"m2 while bob's commit is pending")
        .unwrap();
    assert_eq!(m2.epoch, 1);
    w.server.send(&alice, m1);
    assert!(w.server.commit(&alice, &a));
    assert!(
        !w.server.commit(&bob, &b),
        "the server takes one commit per epoch"
    );
    // Epoch-1 message ordered after the epoch-2 commit: decrypted from the past epoch.
    w.server.send(&bob, m2);

    bob.discard_pending(CHAT);
    assert_eq!(bob.pending_commit(CHAT), None);
    for dev in [&mut alice, &mut bob, &mut carol] {
        let ev = w.server.sync(dev);
        assert!(
            matches!(&ev[1], Event::Epoch { epoch: 2, added, .. } if added == &["dave/tablet".to_string()]),
            "{}: {ev:?}",
            dev.user()
        );
    }
    // A commit for an epoch the group has left is ignored.
    let stale = alice
        .process(CHAT, 100, "bob", Kind::Commit, &b.data, 0)
        .unwrap();
    assert!(
        matches!(&stale, Event::Ignored { reason, .. } if reason.contains("stale")),
        "{stale:?}"
    );
    alice.chats.get_mut(CHAT).unwrap().processed_seq = w.server.log.len() as u64;

    // bob retries on the new epoch and wins it.
    let b2 = bob.remove(CHAT, &["carol".to_string()]).unwrap();
    assert_eq!(b2.epoch, 2);
    let m3 = alice.encrypt(CHAT, b"m3 at epoch 2").unwrap();
    assert!(w.server.commit(&bob, &b2));
    w.server.send(&alice, m3);
    let ev = w.server.sync(&mut dave);
    assert!(matches!(
        ev.iter().find(|e| matches!(e, Event::Joined { .. })),
        Some(Event::Joined { epoch: 2, .. })
    ));
    for dev in [&mut alice, &mut bob, &mut carol] {
        w.server.sync(dev);
    }
    assert_eq!(alice.epoch(CHAT), Some(3));
    assert_eq!(bob.epoch(CHAT), Some(3));
    assert_eq!(dave.epoch(CHAT), Some(3));
    assert_eq!(
        member_ids(&alice),
        ["alice/phone", "bob/laptop", "dave/tablet"]
    );
    assert_eq!(member_ids(&bob), member_ids(&alice));
    assert_eq!(member_ids(&dave), member_ids(&alice));
    assert!(!carol.is_member(CHAT));

    let all = vec![
        b"m1 before commits".to_vec(),
        b"m2 while bob's commit is pending".to_vec(),
        b"m3 at epoch 2".to_vec(),
    ];
    assert_eq!(texts(&alice), all);
    assert_eq!(texts(&bob), all);
    assert_eq!(
        texts(&carol),
        all[..2],
        "carol sees nothing after her removal"
    );
    assert_eq!(texts(&dave), vec![b"m3 at epoch 2".to_vec()]);

    // The loser need not discard first: the winner's commit clears its pending one.
    let a = alice.update(CHAT).unwrap();
    let d = dave.update(CHAT).unwrap();
    assert!(w.server.commit(&dave, &d));
    assert!(!w.server.commit(&alice, &a));
    w.server.sync(&mut alice);
    assert_eq!(alice.pending_commit(CHAT), None);
    let a2 = alice.update(CHAT).unwrap();
    assert_eq!(a2.epoch, 4);
    assert!(w.server.commit(&alice, &a2));
    let o = dave.encrypt(CHAT, b"after both updates").unwrap();
    w.server.send(&dave, o);
    for dev in [&mut alice, &mut bob, &mut dave] {
        w.server.sync(dev);
        assert_eq!(dev.epoch(CHAT), Some(5));
        assert_eq!(texts(dev).last().unwrap(), b"after both updates");
    }
}

#[test]
fn offline_device_catches_up_across_epochs() {
    let (mut w, mut alice, mut bob, mut carol) = three();
    let mut dave = w.device("dave", "tablet");
    let mut expected = Vec::new();
    let mut say = |w: &mut World, dev: &mut Device, text: &str| {
        let o = dev.encrypt(CHAT, text.as_bytes()).unwrap();
        w.server.send(dev, o);
        expected.push(text.as_bytes().to_vec());
    };
    // carol is offline from here on.
    say(&mut w, &mut alice, "epoch 1 from alice");
    let c = bob.update(CHAT).unwrap();
    assert!(w.server.commit(&bob, &c));
    w.server.sync(&mut alice);
    w.server.sync(&mut bob);
    say(&mut w, &mut alice, "epoch 2 from alice");
    say(&mut w, &mut bob, "epoch 2 from bob");
    let kp = World::kp(&mut dave);
    let c = alice.add(CHAT, &[kp]).unwrap();
    assert!(w.server.commit(&alice, &c));
    for dev in [&mut alice, &mut bob, &mut dave] {
        w.server.sync(dev);
    }
    say(&mut w, &mut dave, "epoch 3 from dave");
    let c = alice.update(CHAT).unwrap();
    assert!(w.server.commit(&alice, &c));
    for dev in [&mut alice, &mut bob, &mut dave] {
        w.server.sync(dev);
    }
    say(&mut w, &mut bob, "epoch 4 from bob");
    let c = dave.update(CHAT).unwrap();
    assert!(w.server.commit(&dave, &c));
    say(
        &mut w,
        &mut alice,
        "epoch 4 from alice, after dave's commit in the log",
    );
    for dev in [&mut alice, &mut bob, &mut dave] {
        w.server.sync(dev);
    }
    say(&mut w, &mut dave, "epoch 5 from dave");
    for dev in [&mut alice, &mut bob, &mut dave] {
        w.server.sync(dev);
        assert_eq!(dev.epoch(CHAT), Some(5));
    }

    assert_eq!(carol.processed_seq(CHAT), 2);
    let ev = w.server.sync(&mut carol);
    assert!(
        ev.iter().all(|e| !matches!(e, Event::Undecryptable { .. })),
        "{ev:?}"
    );
    assert_eq!(
        ev.iter()
            .filter(|e| matches!(e, Event::Epoch { .. }))
            .count(),
        4
    );
    assert_eq!(carol.epoch(CHAT), Some(5));
    assert_eq!(texts(&carol), expected);
    assert_eq!(member_ids(&carol), member_ids(&alice));
    assert_eq!(texts(&alice), expected);
}

#[test]
fn key_packages_are_checked_and_last_resort_is_reusable() {
    let mut w = World::new();
    let mut alice = w.device("alice", "phone");
    let mut bob = w.device("bob", "laptop");
    let mut carol = w.device("carol", "phone");
    alice.create_group(CHAT).unwrap();
    assert!(matches!(
        alice.create_group(CHAT),
        Err(E2eError::AlreadyExists(_))
    ));
    bob.create_group("chat-2").unwrap();

    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let kps = carol.key_packages(2, 3600, true).unwrap();
    assert_eq!(kps.len(), 3);
    assert_eq!(
        kps.iter().map(|k| k.last_resort).collect::<Vec<_>>(),
        vec![false, false, true]
    );
    for kp in &kps {
        assert!(
            kp.expires_ms >= now_ms + 3_590_000 && kp.expires_ms <= now_ms + 3_610_000,
            "{}",
            kp.expires_ms
        );
    }
    let expired = carol.key_packages(1, 0, false).unwrap().remove(0);
    assert!(matches!(
        alice.add(CHAT, &[expired.data]),
        Err(E2eError::BadKeyPackage(_))
    ));
    assert!(matches!(
        alice.add(CHAT, &[vec![1, 2, 3]]),
        Err(E2eError::BadKeyPackage(_))
    ));
    let own = World::kp(&mut alice);
    assert!(matches!(
        alice.add(CHAT, &[own]),
        Err(E2eError::BadKeyPackage(_))
    ));
    let mut tampered = kps[0].data.clone();
    let n = tampered.len();
    tampered[n - 10] ^= 1;
    assert!(matches!(
        alice.add(CHAT, &[tampered]),
        Err(E2eError::BadKeyPackage(_))
    ));
    assert!(matches!(
        alice.add("no-such-chat", &[kps[0].data.clone()]),
        Err(E2eError::NoGroup(_))
    ));
    assert_eq!(
        alice.pending_commit(CHAT),
        None,
        "refused adds leave nothing pending"
    );

    // The last-resort package joins two groups; an ordinary one only its first.
    let c = alice.add(CHAT, &[kps[2].data.clone()]).unwrap();
    assert!(w.server.commit(&alice, &c));
    w.server.sync(&mut alice);
    let ev = w.server.sync(&mut carol);
    assert!(matches!(ev.last(), Some(Event::Joined { .. })), "{ev:?}");
    let c2 = bob.add("chat-2", &[kps[2].data.clone()]).unwrap();
    bob.process("chat-2", 1, "bob", Kind::Commit, &c2.data, 0)
        .unwrap();
    let w2 = c2.welcome.unwrap();
    let ev = carol
        .process("chat-2", 2, "bob", Kind::Welcome, &w2, 0)
        .unwrap();
    assert!(matches!(ev, Event::Joined { epoch: 1, .. }), "{ev:?}");
    assert_eq!(carol.chats(), vec![CHAT.to_string(), "chat-2".to_string()]);
    // A welcome whose secrets are for others only is ignored.
    let mut dave = w.device("dave", "tablet");
    let ev = dave
        .process("chat-2", 2, "bob", Kind::Welcome, &w2, 0)
        .unwrap();
    assert!(
        matches!(&ev, Event::Ignored { reason, .. } if reason.contains("other devices")),
        "{ev:?}"
    );
    assert!(!dave.has_group("chat-2"));
}
