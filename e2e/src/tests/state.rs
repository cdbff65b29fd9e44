//! The state file: persistence, encryption at rest, tampering, bounds, garbage input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use super::{messages, texts, three, World, CHAT};
use crate::store::HEADER_BYTES;
use crate::{Device, E2eError, Event, Kind, StoreKey, STATE_FILE_BYTES_MAX};

#[test]
fn state_survives_reopen_and_refuses_wrong_key() {
    let (mut w, mut alice, mut bob, _carol) = three();
    let o = bob.encrypt(CHAT, b"before reopen").unwrap();
    w.server.send(&bob, o);
    w.server.sync(&mut bob);
    w.server.sync(&mut alice);
    bob.save().unwrap();
    let bob_sn = bob.safety_number();
    drop(bob);

    let path = w.path("bob");
    let before = std::fs::read(&path).unwrap();
    let wrong = StoreKey::random();
    assert!(matches!(Device::open(&path, &wrong), Err(E2eError::BadKey)));
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "a failed open leaves the file"
    );

    let mut bob = Device::open(&path, &w.keys[1]).unwrap();
    assert_eq!((bob.user(), bob.device_id()), ("bob", "laptop"));
    assert_eq!(bob.safety_number(), bob_sn);
    assert_eq!(bob.epoch(CHAT), Some(1));
    assert_eq!(texts(&bob), vec![b"before reopen".to_vec()]);
    assert_eq!(bob.processed_seq(CHAT), 3);
    let o = bob.encrypt(CHAT, b"after reopen").unwrap();
    w.server.send(&bob, o);
    let o = alice.encrypt(CHAT, b"to reopened bob").unwrap();
    w.server.send(&alice, o);
    w.server.sync(&mut alice);
    w.server.sync(&mut bob);
    let all = vec![
        b"before reopen".to_vec(),
        b"after reopen".to_vec(),
        b"to reopened bob".to_vec(),
    ];
    assert_eq!(texts(&bob), all);
    assert_eq!(texts(&alice), all);

    // A pending commit survives a restart and is merged when the log shows it.
    let c = alice.update(CHAT).unwrap();
    drop(alice);
    let mut alice = Device::open(&w.path("alice"), &w.keys[0]).unwrap();
    assert_eq!(alice.pending_commit(CHAT), Some(c.clone()));
    assert!(w.server.commit(&alice, &c));
    let ev = w.server.sync(&mut alice);
    assert!(
        matches!(ev.last(), Some(Event::Epoch { epoch: 2, .. })),
        "{ev:?}"
    );
    w.server.sync(&mut bob);
    let o = bob.encrypt(CHAT, b"epoch 2").unwrap();
    w.server.send(&bob, o);
    w.server.sync(&mut alice);
    assert_eq!(texts(&alice).last().unwrap(), b"epoch 2");

    // A passphrase key: the salt is read back from the header.
    let salt = StoreKey::new_salt();
    let key = StoreKey::from_passphrase("hunter2 hunter2", &salt).unwrap();
    let p = w.dir.path().join("pass.e2e");
    Device::create(&p, &key, "erin", "pc").unwrap();
    assert_eq!(crate::read_salt(&p).unwrap(), salt);
    let again =
        StoreKey::from_passphrase("hunter2 hunter2", &crate::read_salt(&p).unwrap()).unwrap();
    assert_eq!(Device::open(&p, &again).unwrap().user(), "erin");
    let bad = StoreKey::from_passphrase("hunter3 hunter3", &salt).unwrap();
    assert!(matches!(Device::open(&p, &bad), Err(E2eError::BadKey)));
    assert!(matches!(
        Device::create(&p, &key, "erin", "pc"),
        Err(E2eError::AlreadyExists(_))
    ));
}

#[test]
fn state_file_holds_no_plaintext_and_detects_tampering() {
    let (mut w, mut alice, mut bob, _carol) = three();
    let marker = b"MARKER-q7Zx-plaintext";
    let o = alice.encrypt(CHAT, marker).unwrap();
    w.server.send(&alice, o);
    w.server.sync(&mut alice);
    w.server.sync(&mut bob);
    assert_eq!(texts(&bob), vec![marker.to_vec()]);
    bob.save().unwrap();
    let path = w.path("bob");
    let bytes = std::fs::read(&path).unwrap();
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|win| win == needle);
    assert!(!contains(&bytes, marker));
    assert!(!contains(&bytes, b"MARKER"));
    assert!(!contains(&bytes, b"laptop"), "even names are encrypted");
    assert_eq!(&bytes[..8], b"CHATDE2E");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert!(!w.dir.path().join("bob.e2e.tmp").exists());

    let key = &w.keys[1];
    for pos in [0, 8, 9, 30, HEADER_BYTES, bytes.len() / 2, bytes.len() - 1] {
        let mut bad = bytes.clone();
        bad[pos] ^= 0x04;
        std::fs::write(&path, &bad).unwrap();
        let err = Device::open(&path, key).unwrap_err();
        assert!(
            matches!(err, E2eError::BadKey | E2eError::Corrupt(_)),
            "flip at {pos}: {err:?}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), bad, "open never writes");
    }
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    assert!(matches!(Device::open(&path, key), Err(E2eError::BadKey)));
    std::fs::write(&path, &bytes[..20]).unwrap();
    assert!(matches!(
        Device::open(&path, key),
        Err(E2eError::Corrupt(_))
    ));
    std::fs::write(
        &path,
        b"something else entirely, long enough to hold a header and a tag ...",
    )
    .unwrap();
    assert!(matches!(
        Device::open(&path, key),
        Err(E2eError::Corrupt(_))
    ));
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(
        texts(&Device::open(&path, key).unwrap()),
        vec![marker.to_vec()]
    );
}

#[test]
fn bounds_history_file_size_and_garbage() {
    let (mut w, mut alice, mut bob, _carol) = three();
    bob.set_history_max(3);
    for i in 0..5 {
        let o = alice.encrypt(CHAT, format!("msg {i}").as_bytes()).unwrap();
        w.server.send(&alice, o);
    }
    let ev = w.server.sync(&mut bob);
    assert_eq!(
        messages(&ev).len(),
        5,
        "all are delivered, only the history is bounded"
    );
    let h = bob.history(CHAT);
    assert_eq!(h.iter().map(|s| s.seq).collect::<Vec<_>>(), vec![5, 6, 7]);
    assert_eq!(
        texts(&bob),
        vec![b"msg 2".to_vec(), b"msg 3".to_vec(), b"msg 4".to_vec()]
    );

    // Garbage never panics: undecryptable, cursor moved, group still usable.
    let good = w.server.log.last().unwrap().data.clone();
    let commit = w.server.log[0].data.clone();
    let welcome = w.server.log[1].data.clone();
    let mut seq = bob.processed_seq(CHAT);
    let cases: Vec<(Kind, Vec<u8>)> = vec![
        (Kind::Application, vec![]),
        (Kind::Application, vec![0xff; 64]),
        (Kind::Commit, vec![0, 1, 0, 2, 0, 0, 0, 0]),
        (Kind::Application, good[..good.len() / 2].to_vec()),
        (Kind::Application, {
            let mut g = good.clone();
            g.push(0);
            g
        }),
        (Kind::Application, {
            let mut g = good.clone();
            let n = g.len();
            g[n - 3] ^= 1;
            g
        }),
        (Kind::Commit, good.clone()),
        (Kind::Welcome, good.clone()),
        (Kind::Application, welcome.clone()),
        (Kind::Application, commit.clone()),
        (Kind::Welcome, welcome[..welcome.len() - 1].to_vec()),
    ];
    for (kind, data) in cases {
        seq += 1;
        let ev = bob.process(CHAT, seq, "alice", kind, &data, 0).unwrap();
        assert!(
            matches!(ev, Event::Undecryptable { .. } | Event::Ignored { .. }),
            "{kind} of {} bytes: {ev:?}",
            data.len()
        );
        assert_eq!(bob.processed_seq(CHAT), seq);
    }
    // The server says carol sent alice's message: refused.
    let o = alice.encrypt(CHAT, b"who sent this?").unwrap();
    seq += 1;
    let ev = bob
        .process(CHAT, seq, "carol", Kind::Application, &o.data, 0)
        .unwrap();
    assert!(
        matches!(&ev, Event::Undecryptable { reason, .. } if reason.contains("mismatch")),
        "{ev:?}"
    );
    // Garbage to a device without a group, too.
    let mut x = w.device("xavier", "pc");
    for (i, data) in [vec![], vec![1, 2, 3], good.clone(), commit.clone()]
        .iter()
        .enumerate()
    {
        let ev = x
            .process(CHAT, i as u64 + 1, "alice", Kind::Application, data, 0)
            .unwrap();
        assert!(
            matches!(ev, Event::Undecryptable { .. } | Event::Ignored { .. }),
            "{ev:?}"
        );
    }
    let o = alice.encrypt(CHAT, b"still fine").unwrap();
    seq += 1;
    let ev = bob
        .process(CHAT, seq, "alice", Kind::Application, &o.data, 0)
        .unwrap();
    assert!(
        matches!(ev, Event::Message { ref plaintext, .. } if plaintext == b"still fine"),
        "{ev:?}"
    );

    // A state file over the limit is refused before it is read (a sparse file).
    let big = w.dir.path().join("big.e2e");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(STATE_FILE_BYTES_MAX + 1).unwrap();
    drop(f);
    assert!(matches!(
        Device::open(&big, &w.keys[0]),
        Err(E2eError::TooLarge { .. })
    ));
    assert!(matches!(
        Device::open(Path::new("/nonexistent/x.e2e"), &w.keys[0]),
        Err(E2eError::Io(_))
    ));
}

#[test]
fn names_are_checked() {
    let w = World::new();
    let key = StoreKey::random();
    for (u, d) in [("", "x"), ("a/b", "x"), ("alice", ""), ("alice", "p/q")] {
        let p = w.dir.path().join("n.e2e");
        assert!(
            matches!(
                Device::create(&p, &key, u, d),
                Err(E2eError::InvalidInput(_))
            ),
            "{u:?} {d:?}"
        );
        assert!(!p.exists());
    }
    assert_eq!(Kind::parse("mls_commit"), Some(Kind::Commit));
    for k in [
        Kind::Application,
        Kind::Commit,
        Kind::Welcome,
        Kind::Proposal,
    ] {
        assert_eq!(Kind::parse(k.as_str()), Some(k));
    }
    assert_eq!(Kind::parse("nope"), None);
}

/// Inputs the `e2e_entry` fuzz target found (openmls 0.8.3 panicked re-serializing a
/// non-canonical encoding to find the remainder): refused, never a panic.
#[test]
fn fuzz_regressions_are_refused_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::from_bytes([7; 32]);
    let mut dev = Device::create(&dir.path().join("d.mls"), &key, "alice", "phone").unwrap();
    dev.create_group("e:fuzz").unwrap();
    let inputs: [&[u8]; 2] = [
        include_bytes!("fuzz_regressions/noncanonical-1.bin"),
        include_bytes!("fuzz_regressions/noncanonical-2.bin"),
    ];
    for (i, input) in inputs.iter().enumerate() {
        // As the fuzz target reads them: a kind selector, then the message.
        let (selector, message) = input.split_first().unwrap();
        let kind = match selector % 4 {
            0 => Kind::Application,
            1 => Kind::Commit,
            2 => Kind::Welcome,
            _ => Kind::Proposal,
        };
        for k in [kind, Kind::Application, Kind::Commit, Kind::Welcome] {
            let seq = dev.processed_seq("e:fuzz") + 1;
            match dev.process("e:fuzz", seq, "bob", k, message, 0) {
                Ok(Event::Undecryptable { .. } | Event::Ignored { .. }) | Err(_) => {}
                Ok(other) => panic!("input {i} as {k:?} was taken: {other:?}"),
            }
        }
        // And as a KeyPackage to add.
        assert!(dev.add("e:fuzz", &[message.to_vec()]).is_err(), "input {i}");
    }
}
