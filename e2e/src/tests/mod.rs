//! Tests with real openmls over a simulated chat log (`groups`), and of the state file
//! (`state`). The harness: a [`Server`] that keeps a gapless log and takes one commit per
//! epoch, and devices that feed themselves the log in order.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod groups;
mod state;

use std::path::PathBuf;

use crate::{Commit, Device, Event, Kind, Outgoing, StoreKey, KEY_PACKAGE_LIFETIME_SECS_DEFAULT};

const CHAT: &str = "chat-1";

/// One entry of the simulated chat log.
#[derive(Clone)]
pub(crate) struct Entry {
    pub(crate) seq: u64,
    pub(crate) sender: String,
    pub(crate) kind: Kind,
    pub(crate) data: Vec<u8>,
}

/// The server's part: a gapless log and the one-commit-per-epoch rule.
#[derive(Default)]
pub(crate) struct Server {
    pub(crate) log: Vec<Entry>,
    pub(crate) epoch: u64,
}

impl Server {
    pub(crate) fn push(&mut self, sender: &str, kind: Kind, data: Vec<u8>) -> u64 {
        let seq = self.log.len() as u64 + 1;
        self.log.push(Entry {
            seq,
            sender: sender.to_string(),
            kind,
            data,
        });
        seq
    }

    pub(crate) fn send(&mut self, sender: &Device, out: Outgoing) -> u64 {
        self.push(sender.user(), Kind::Application, out.data)
    }

    /// Accepts the commit (and stores its welcome after it) only on the chat's epoch.
    pub(crate) fn commit(&mut self, sender: &Device, c: &Commit) -> bool {
        if c.epoch != self.epoch {
            return false;
        }
        self.push(sender.user(), Kind::Commit, c.data.clone());
        if let Some(w) = &c.welcome {
            self.push(sender.user(), Kind::Welcome, w.clone());
        }
        self.epoch += 1;
        true
    }

    /// Feeds `dev` every entry past its cursor, in order.
    pub(crate) fn sync(&self, dev: &mut Device) -> Vec<Event> {
        let from = dev.processed_seq(CHAT);
        let mut events = Vec::new();
        for e in self.log.iter().filter(|e| e.seq > from) {
            let ev = dev
                .process(CHAT, e.seq, &e.sender, e.kind, &e.data, 1_000 + e.seq)
                .unwrap();
            assert_eq!(ev.seq(), e.seq);
            events.push(ev);
        }
        assert_eq!(dev.processed_seq(CHAT), self.log.len() as u64);
        events
    }
}

pub(crate) struct World {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) server: Server,
    pub(crate) keys: Vec<StoreKey>,
}

impl World {
    pub(crate) fn new() -> World {
        World {
            dir: tempfile::tempdir().unwrap(),
            server: Server::default(),
            keys: Vec::new(),
        }
    }

    pub(crate) fn path(&self, user: &str) -> PathBuf {
        self.dir.path().join(format!("{user}.e2e"))
    }

    pub(crate) fn device(&mut self, user: &str, device: &str) -> Device {
        let key = StoreKey::random();
        let dev = Device::create(&self.path(user), &key, user, device).unwrap();
        self.keys.push(key);
        dev
    }

    pub(crate) fn kp(dev: &mut Device) -> Vec<u8> {
        dev.key_packages(1, KEY_PACKAGE_LIFETIME_SECS_DEFAULT, false)
            .unwrap()
            .remove(0)
            .data
    }
}

pub(crate) fn messages(events: &[Event]) -> Vec<(String, Vec<u8>)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message {
                sender_user,
                sender_device,
                plaintext,
                ..
            } => Some((format!("{sender_user}/{sender_device}"), plaintext.clone())),
            _ => None,
        })
        .collect()
}

pub(crate) fn texts(dev: &Device) -> Vec<Vec<u8>> {
    dev.history(CHAT).into_iter().map(|s| s.text).collect()
}

pub(crate) fn member_ids(dev: &Device) -> Vec<String> {
    let mut m: Vec<String> = dev
        .members(CHAT)
        .into_iter()
        .map(|m| format!("{}/{}", m.user, m.device))
        .collect();
    m.sort();
    m
}

/// alice creates the chat's group and adds bob and carol in one commit; all have synced.
pub(crate) fn three() -> (World, Device, Device, Device) {
    let mut w = World::new();
    let mut alice = w.device("alice", "phone");
    let mut bob = w.device("bob", "laptop");
    let mut carol = w.device("carol", "phone");
    alice.create_group(CHAT).unwrap();
    assert_eq!(alice.epoch(CHAT), Some(0));
    let kps = vec![World::kp(&mut bob), World::kp(&mut carol)];
    let c = alice.add(CHAT, &kps).unwrap();
    assert_eq!(c.epoch, 0);
    assert!(c.welcome.is_some());
    assert_eq!(alice.pending_commit(CHAT), Some(c.clone()));
    assert!(w.server.commit(&alice, &c));

    let ev = w.server.sync(&mut alice);
    assert!(
        matches!(&ev[0], Event::Epoch { epoch: 1, added, removed, removed_self: false, .. }
            if added == &["bob/laptop".to_string(), "carol/phone".to_string()] && removed.is_empty()),
        "{ev:?}"
    );
    assert!(matches!(&ev[1], Event::Ignored { .. }), "{ev:?}");
    assert_eq!(alice.pending_commit(CHAT), None);
    for dev in [&mut bob, &mut carol] {
        assert!(!dev.has_group(CHAT));
        let ev = w.server.sync(dev);
        assert!(matches!(&ev[0], Event::Ignored { .. }), "{ev:?}");
        assert_eq!(ev[1], Event::Joined { seq: 2, epoch: 1 });
        assert_eq!(dev.epoch(CHAT), Some(1));
        assert_eq!(dev.chats(), vec![CHAT.to_string()]);
    }
    (w, alice, bob, carol)
}
