//! Presence: who is online anywhere in the cluster, as seen from this node.
//!
//! Each node knows its own sessions. It tells every other node when a user's first session
//! opens or last one closes, and re-announces all its online users every heartbeat; an
//! announcement is valid for the presence TTL. So a user connected to a node that dies goes
//! offline everywhere within the TTL, and nobody else changes. Queries are answered from
//! this table without asking other nodes.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chatd_proto::PresenceView;
use chatd_raftlog::NodeId;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;

/// Users one subscriber may watch.
pub const SUBSCRIPTIONS_PER_USER_MAX: usize = 1024;
/// Users whose `last_seen` a node remembers; beyond it the least recently set or read is
/// forgotten (that user then has no `last_seen` until it goes offline again).
pub const LAST_SEEN_USERS_MAX: u64 = 200_000;
/// A `last_seen` neither set nor read for this long is forgotten, in milliseconds (7 days).
pub const LAST_SEEN_IDLE_MS: u64 = 7 * 24 * 60 * 60 * 1000;

#[derive(Default)]
struct Inner {
    /// user → node → announcement valid until.
    remote: HashMap<String, HashMap<NodeId, Instant>>,
    /// watched user → subscribers.
    watchers: HashMap<String, HashSet<String>>,
    /// subscriber → watched users.
    watching: HashMap<String, HashSet<String>>,
}

/// The cluster-wide presence table of one node.
pub struct Presence {
    ttl: Duration,
    inner: Mutex<Inner>,
    /// user → last time it was seen going offline (ms since epoch); bounded, idle entries
    /// dropped.
    last_seen: Cache<String, u64>,
}

/// A change to push: `user` is now `online` (or not) to these subscribers.
pub struct Change {
    pub view: PresenceView,
    pub subscribers: Vec<String>,
}

impl Presence {
    /// A table whose remote announcements expire after `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self::with_last_seen_bounds(
            ttl,
            LAST_SEEN_USERS_MAX,
            Duration::from_millis(LAST_SEEN_IDLE_MS),
        )
    }

    fn with_last_seen_bounds(ttl: Duration, users_max: u64, idle: Duration) -> Self {
        Self {
            ttl,
            inner: Mutex::new(Inner::default()),
            last_seen: Cache::builder()
                .max_capacity(users_max)
                .time_to_idle(idle)
                .eviction_policy(EvictionPolicy::lru())
                .build(),
        }
    }

    /// Records that `user` went offline at `at_ms` (the latest such time is kept).
    fn seen_offline(&self, user: &str, at_ms: u64) {
        self.last_seen
            .entry_by_ref(user)
            .and_upsert_with(|old| old.map_or(at_ms, |e| e.into_value().max(at_ms)));
    }

    /// Users whose `last_seen` is remembered (after pending evictions).
    pub fn last_seen_users(&self) -> u64 {
        self.last_seen.run_pending_tasks();
        self.last_seen.entry_count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn online_in(inner: &Inner, user: &str, local: bool, now: Instant) -> bool {
        local
            || inner
                .remote
                .get(user)
                .is_some_and(|nodes| nodes.values().any(|until| *until > now))
    }

    /// The presence of `users`; `local` says whether this node has a session of a user.
    pub fn query(&self, users: &[String], local: impl Fn(&str) -> bool) -> Vec<PresenceView> {
        let inner = self.lock();
        let now = Instant::now();
        users
            .iter()
            .map(|u| PresenceView {
                user: u.clone(),
                online: Self::online_in(&inner, u, local(u), now),
                last_seen: self.last_seen.get(u),
            })
            .collect()
    }

    /// Applies an announcement from `node` (or this node: `local_before`/`local_after`
    /// tell how the change looks locally). Returns the change if the user's cluster-wide
    /// state flipped and someone watches it.
    pub fn announce(
        &self,
        node: NodeId,
        user: &str,
        online: bool,
        at_ms: u64,
        local: bool,
    ) -> Option<Change> {
        let mut inner = self.lock();
        let now = Instant::now();
        let before = Self::online_in(&inner, user, local, now);
        let entry = inner.remote.entry(user.to_string()).or_default();
        if online {
            entry.insert(node, now + self.ttl);
        } else {
            entry.remove(&node);
            if entry.is_empty() {
                inner.remote.remove(user);
            }
            self.seen_offline(user, at_ms);
        }
        let after = Self::online_in(&inner, user, local, now);
        self.change(&inner, user, before, after)
    }

    /// A local session change: `before`/`after` are whether this node has sessions of it.
    pub fn local_change(
        &self,
        user: &str,
        before: bool,
        after: bool,
        at_ms: u64,
    ) -> Option<Change> {
        let inner = self.lock();
        let now = Instant::now();
        let was = Self::online_in(&inner, user, before, now);
        if !after {
            self.seen_offline(user, at_ms);
        }
        let is = Self::online_in(&inner, user, after, now);
        self.change(&inner, user, was, is)
    }

    fn change(&self, inner: &Inner, user: &str, before: bool, after: bool) -> Option<Change> {
        if before == after {
            return None;
        }
        let subscribers: Vec<String> = inner
            .watchers
            .get(user)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        if subscribers.is_empty() {
            return None;
        }
        Some(Change {
            view: PresenceView {
                user: user.to_string(),
                online: after,
                last_seen: self.last_seen.get(user),
            },
            subscribers,
        })
    }

    /// Drops expired announcements (dead or silent nodes); returns the resulting changes.
    pub fn expire(&self, local: impl Fn(&str) -> bool, now_ms: u64) -> Vec<Change> {
        let mut inner = self.lock();
        let now = Instant::now();
        let mut flipped = Vec::new();
        for (user, nodes) in inner.remote.iter_mut() {
            // Entries leave the table only here or by an explicit offline announcement, so
            // a non-empty set means the user was online through some node until now.
            let had = !nodes.is_empty();
            nodes.retain(|_, until| *until > now);
            if had && nodes.is_empty() && !local(user) {
                flipped.push(user.clone());
            }
        }
        inner.remote.retain(|_, nodes| !nodes.is_empty());
        let mut changes = Vec::new();
        for user in flipped {
            self.seen_offline(&user, now_ms);
            if let Some(c) = self.change(&inner, &user, true, false) {
                changes.push(c);
            }
        }
        changes
    }

    /// `subscriber` watches `users`; false if that would exceed the bound.
    pub fn subscribe(&self, subscriber: &str, users: &[String]) -> bool {
        let mut inner = self.lock();
        let current = inner.watching.get(subscriber).map_or(0, HashSet::len);
        let new: Vec<&String> = users
            .iter()
            .filter(|u| {
                !inner
                    .watching
                    .get(subscriber)
                    .is_some_and(|s| s.contains(*u))
            })
            .collect();
        if current + new.len() > SUBSCRIPTIONS_PER_USER_MAX {
            return false;
        }
        for u in users {
            inner
                .watchers
                .entry(u.clone())
                .or_default()
                .insert(subscriber.to_string());
            inner
                .watching
                .entry(subscriber.to_string())
                .or_default()
                .insert(u.clone());
        }
        true
    }

    /// Forgets every subscription of `subscriber` (its last session closed).
    pub fn unsubscribe_all(&self, subscriber: &str) {
        let mut inner = self.lock();
        if let Some(watched) = inner.watching.remove(subscriber) {
            for u in watched {
                if let Some(s) = inner.watchers.get_mut(&u) {
                    s.remove(subscriber);
                    if s.is_empty() {
                        inner.watchers.remove(&u);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn announcements_expire_and_flip_watched_users_offline() {
        let p = Presence::new(Duration::from_millis(50));
        assert!(p.subscribe("bob", &["carol".to_string()]));
        let c = p.announce(2, "carol", true, 1, false).expect("a change");
        assert!(c.view.online && c.subscribers == vec!["bob".to_string()]);
        let q = p.query(&["carol".into(), "dave".into()], |_| false);
        assert!(q[0].online && !q[1].online);
        std::thread::sleep(Duration::from_millis(80));
        let changes = p.expire(|_| false, 99);
        assert_eq!(changes.len(), 1);
        assert!(!changes[0].view.online);
        assert_eq!(changes[0].view.last_seen, Some(99));
        assert!(!p.query(&["carol".into()], |_| false)[0].online);
        // A user also connected here stays online when a remote announcement expires.
        p.announce(3, "erin", true, 1, true);
        std::thread::sleep(Duration::from_millis(80));
        assert!(p.expire(|u| u == "erin", 5).is_empty());
    }

    #[test]
    fn last_seen_is_bounded_in_users_and_forgotten_when_idle() {
        let p = Presence::new(Duration::from_secs(1));
        for i in 0..LAST_SEEN_USERS_MAX + 1 {
            p.local_change(&format!("u{i}"), true, false, i + 1);
        }
        assert_eq!(p.last_seen_users(), LAST_SEEN_USERS_MAX);
        let newest = format!("u{LAST_SEEN_USERS_MAX}");
        let q = p.query(&[newest, "u0".into()], |_| false);
        assert_eq!(q[0].last_seen, Some(LAST_SEEN_USERS_MAX + 1), "newest kept");
        assert_eq!(q[1].last_seen, None, "least recently used forgotten");
        // The latest offline time wins, whatever order announcements come in.
        p.announce(2, "u5", false, 3, false);
        assert_eq!(p.query(&["u5".into()], |_| false)[0].last_seen, Some(6));

        let p =
            Presence::with_last_seen_bounds(Duration::from_secs(1), 10, Duration::from_millis(30));
        p.local_change("carol", true, false, 7);
        assert_eq!(p.last_seen_users(), 1);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(p.last_seen_users(), 0, "idle entries are dropped");
        assert_eq!(p.query(&["carol".into()], |_| false)[0].last_seen, None);
    }

    #[test]
    fn subscriptions_are_bounded_per_subscriber() {
        let p = Presence::new(Duration::from_secs(1));
        let many: Vec<String> = (0..SUBSCRIPTIONS_PER_USER_MAX)
            .map(|i| format!("u{i}"))
            .collect();
        assert!(p.subscribe("s", &many));
        assert!(
            p.subscribe("s", &many[..10]),
            "re-subscribing costs nothing"
        );
        assert!(!p.subscribe("s", &["one-more".to_string()]));
        p.unsubscribe_all("s");
        assert!(p.subscribe("s", &["one-more".to_string()]));
    }
}
