//! Presence: who is online anywhere in the cluster, as seen from this node.
//!
//! Each node knows its own sessions. It tells every other node when a user's first session
//! opens or last one closes, and re-announces all its online users every heartbeat; an
//! announcement is valid for the presence TTL. So a user connected to a node that dies goes
//! offline everywhere within the TTL, and nobody else changes. Queries are answered from
//! this table without asking other nodes.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
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

/// Shards of the presence table, by user: a change to one user locks only its shard.
pub const PRESENCE_SHARDS: usize = 64;

/// One remote node's announcement that a user is online.
#[derive(Clone, Copy)]
struct Announcement {
    until: Instant,
    /// Matches the announcement's entry in the expiry queue (older entries are stale).
    generation: u64,
}

#[derive(Default)]
struct Shard {
    /// user → node → announcement.
    remote: HashMap<String, HashMap<NodeId, Announcement>>,
    /// When announcements lapse: at most one live entry per (user, node) (a renewal moves
    /// the time in `remote`; the entry is re-queued when it comes due), plus stale ones of
    /// withdrawn announcements until their time. So expiring costs what lapses, not a scan.
    expiries: BinaryHeap<Reverse<(Instant, String, NodeId, u64)>>,
    next_generation: u64,
    /// watched user (of this shard) → subscribers.
    watchers: HashMap<String, HashSet<String>>,
    /// subscriber (of this shard) → watched users.
    watching: HashMap<String, HashSet<String>>,
}

/// Where a remote node's roster (every user with a session there, re-sent each heartbeat
/// in numbered parts) stands here.
#[derive(Default)]
struct Roster {
    round: u64,
    /// The next part expected of `round` (parts come in order; a gap voids the round).
    next_part: Option<u32>,
    /// Until when this node knows every user with a session there: a whole round arrived
    /// within the presence TTL. Sessions opened since were announced before they served
    /// anything (`Node::broadcast_confirmed`).
    complete_until: Option<Instant>,
}

/// The cluster-wide presence table of one node.
pub struct Presence {
    ttl: Duration,
    shards: Box<[Mutex<Shard>]>,
    /// node → its roster's state here: whether deliveries to it may skip it when none of
    /// their recipients has a session there.
    rosters: Mutex<HashMap<NodeId, Roster>>,
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
            shards: (0..PRESENCE_SHARDS)
                .map(|_| Mutex::new(Shard::default()))
                .collect(),
            rosters: Mutex::new(HashMap::new()),
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

    fn lock(&self, user: &str) -> std::sync::MutexGuard<'_, Shard> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        user.hash(&mut h);
        let shard = &self.shards[(h.finish() % PRESENCE_SHARDS as u64) as usize];
        shard.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn online_in(shard: &Shard, user: &str, local: bool, now: Instant) -> bool {
        local
            || shard
                .remote
                .get(user)
                .is_some_and(|nodes| nodes.values().any(|a| a.until > now))
    }

    /// Part `part` of `parts` of `node`'s roster round `round` arrived (its users were
    /// announced online through [`Self::announce`]). Parts come in order on one channel; a
    /// missing part voids the round, and the previous complete one stands until it lapses.
    pub fn roster_part(&self, node: NodeId, round: u64, part: u32, parts: u32) {
        let mut rosters = self.rosters.lock().unwrap_or_else(|p| p.into_inner());
        let r = rosters.entry(node).or_default();
        if r.round != round || r.next_part.is_none() && part == 0 {
            r.round = round;
            r.next_part = Some(0);
        }
        if r.next_part == Some(part) {
            let next = part.saturating_add(1);
            if next >= parts {
                r.complete_until = Some(Instant::now() + self.ttl);
                r.next_part = None;
            } else {
                r.next_part = Some(next);
            }
        } else {
            r.next_part = None;
        }
    }

    /// Whether this node knows every user with a session on `node` (a whole roster within
    /// the TTL): if not, deliveries must go there whoever their recipients are.
    pub fn knows_roster_of(&self, node: NodeId) -> bool {
        let now = Instant::now();
        self.rosters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .and_then(|r| r.complete_until)
            .is_some_and(|t| t > now)
    }

    /// Forgets what this node knew of `node`'s roster (it restarted, or was unreachable).
    pub fn forget_roster_of(&self, node: NodeId) {
        self.rosters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&node);
    }

    /// The remote nodes that announced a session of any of `users` (within the TTL).
    pub fn holders<'a>(&self, users: impl IntoIterator<Item = &'a str>) -> HashSet<NodeId> {
        let now = Instant::now();
        let mut out = HashSet::new();
        for u in users {
            if let Some(nodes) = self.lock(u).remote.get(u) {
                out.extend(nodes.iter().filter(|(_, a)| a.until > now).map(|(n, _)| *n));
            }
        }
        out
    }

    /// The presence of `users`; `local` says whether this node has a session of a user.
    pub fn query(&self, users: &[String], local: impl Fn(&str) -> bool) -> Vec<PresenceView> {
        let now = Instant::now();
        users
            .iter()
            .map(|u| PresenceView {
                user: u.clone(),
                online: local(u) || Self::online_in(&self.lock(u), u, false, now),
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
        let mut shard = self.lock(user);
        let now = Instant::now();
        let before = Self::online_in(&shard, user, local, now);
        if online {
            let until = now + self.ttl;
            let queued = shard
                .remote
                .get_mut(user)
                .and_then(|nodes| nodes.get_mut(&node))
                .map(|a| a.until = until)
                .is_some();
            if !queued {
                shard.next_generation += 1;
                let generation = shard.next_generation;
                shard
                    .remote
                    .entry(user.to_string())
                    .or_default()
                    .insert(node, Announcement { until, generation });
                shard
                    .expiries
                    .push(Reverse((until, user.to_string(), node, generation)));
            }
        } else {
            if let Some(nodes) = shard.remote.get_mut(user) {
                nodes.remove(&node);
                if nodes.is_empty() {
                    shard.remote.remove(user);
                }
            }
            self.seen_offline(user, at_ms);
        }
        let after = Self::online_in(&shard, user, local, now);
        self.change(&shard, user, before, after)
    }

    /// A local session change: `before`/`after` are whether this node has sessions of it.
    pub fn local_change(
        &self,
        user: &str,
        before: bool,
        after: bool,
        at_ms: u64,
    ) -> Option<Change> {
        let shard = self.lock(user);
        let now = Instant::now();
        let was = Self::online_in(&shard, user, before, now);
        if !after {
            self.seen_offline(user, at_ms);
        }
        let is = Self::online_in(&shard, user, after, now);
        self.change(&shard, user, was, is)
    }

    fn change(&self, shard: &Shard, user: &str, before: bool, after: bool) -> Option<Change> {
        if before == after {
            return None;
        }
        let subscribers: Vec<String> = shard
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

    /// Drops lapsed announcements (dead or silent nodes); returns the resulting changes.
    /// Its cost is the announcements that came due (each renewed one is re-queued once per
    /// TTL), not the number of users online.
    pub fn expire(&self, local: impl Fn(&str) -> bool, now_ms: u64) -> Vec<Change> {
        let now = Instant::now();
        let mut changes = Vec::new();
        for lock in self.shards.iter() {
            let mut flipped = Vec::new();
            {
                let mut shard = lock.lock().unwrap_or_else(|p| p.into_inner());
                let shard = &mut *shard;
                while shard
                    .expiries
                    .peek()
                    .is_some_and(|Reverse((at, ..))| *at <= now)
                {
                    let Some(Reverse((_, user, node, generation))) = shard.expiries.pop() else {
                        break;
                    };
                    let Some(nodes) = shard.remote.get_mut(&user) else {
                        continue;
                    };
                    let Some(a) = nodes.get(&node).copied() else {
                        continue;
                    };
                    if a.generation != generation {
                        continue;
                    }
                    if a.until > now {
                        // Renewed since it was queued: due again at its new time.
                        shard
                            .expiries
                            .push(Reverse((a.until, user, node, generation)));
                        continue;
                    }
                    nodes.remove(&node);
                    if nodes.is_empty() {
                        shard.remote.remove(&user);
                        flipped.push(user);
                    }
                }
            }
            for user in flipped {
                if local(&user) {
                    continue;
                }
                self.seen_offline(&user, now_ms);
                let shard = lock.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(c) = self.change(&shard, &user, true, false) {
                    changes.push(c);
                }
            }
        }
        changes
    }

    /// Announcements waiting in the expiry queues (live and stale), for tests and bounds.
    pub fn queued_expiries(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).expiries.len())
            .sum()
    }

    /// `subscriber` watches `users`; false if that would exceed the bound.
    pub fn subscribe(&self, subscriber: &str, users: &[String]) -> bool {
        {
            let mut shard = self.lock(subscriber);
            let watching = shard.watching.entry(subscriber.to_string()).or_default();
            let new = users.iter().filter(|u| !watching.contains(*u)).count();
            if watching.len() + new > SUBSCRIPTIONS_PER_USER_MAX {
                if watching.is_empty() {
                    shard.watching.remove(subscriber);
                }
                return false;
            }
            watching.extend(users.iter().cloned());
        }
        for u in users {
            self.lock(u)
                .watchers
                .entry(u.clone())
                .or_default()
                .insert(subscriber.to_string());
        }
        true
    }

    /// Forgets every subscription of `subscriber` (its last session closed).
    pub fn unsubscribe_all(&self, subscriber: &str) {
        let watched = self.lock(subscriber).watching.remove(subscriber);
        for u in watched.into_iter().flatten() {
            let mut shard = self.lock(&u);
            if let Some(s) = shard.watchers.get_mut(&u) {
                s.remove(subscriber);
                if s.is_empty() {
                    shard.watchers.remove(&u);
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
    fn a_roster_is_known_only_whole_in_order_and_within_the_ttl() {
        let p = Presence::new(Duration::from_secs(2));
        assert!(!p.knows_roster_of(2), "nothing heard");
        p.roster_part(2, 1, 0, 2);
        assert!(!p.knows_roster_of(2), "half a round");
        p.roster_part(2, 1, 1, 2);
        assert!(p.knows_roster_of(2));
        // A round with a missing part does not count; the last whole one stands.
        p.roster_part(2, 2, 1, 2);
        assert!(p.knows_roster_of(2));
        p.roster_part(3, 7, 0, 3);
        p.roster_part(3, 7, 2, 3);
        assert!(!p.knows_roster_of(3), "part 1 of 3 missing");
        // An empty node's roster is one empty part.
        p.roster_part(4, 1, 0, 1);
        assert!(p.knows_roster_of(4));
        p.forget_roster_of(4);
        assert!(!p.knows_roster_of(4), "forgotten (restart, unreachable)");
        // Who holds whom: announced online, within the TTL.
        p.announce(2, "carol", true, 1, false);
        p.announce(3, "carol", true, 1, false);
        p.announce(3, "dave", true, 1, false);
        p.announce(3, "dave", false, 2, false);
        assert_eq!(p.holders(["carol"]), HashSet::from([2, 3]));
        assert_eq!(p.holders(["dave", "erin"]), HashSet::new());
        let short = Presence::new(Duration::from_millis(100));
        short.roster_part(2, 1, 0, 1);
        short.announce(2, "carol", true, 1, false);
        std::thread::sleep(Duration::from_millis(150));
        assert!(!short.knows_roster_of(2), "lapsed with the TTL");
        assert!(short.holders(["carol"]).is_empty());
    }

    #[test]
    fn announcements_expire_and_flip_watched_users_offline() {
        let p = Presence::new(Duration::from_millis(300));
        assert!(p.subscribe("bob", &["carol".to_string()]));
        let c = p.announce(2, "carol", true, 1, false).expect("a change");
        assert!(c.view.online && c.subscribers == vec!["bob".to_string()]);
        let q = p.query(&["carol".into(), "dave".into()], |_| false);
        assert!(q[0].online && !q[1].online);
        std::thread::sleep(Duration::from_millis(400));
        let changes = p.expire(|_| false, 99);
        assert_eq!(changes.len(), 1);
        assert!(!changes[0].view.online);
        assert_eq!(changes[0].view.last_seen, Some(99));
        assert!(!p.query(&["carol".into()], |_| false)[0].online);
        // A user also connected here stays online when a remote announcement expires.
        p.announce(3, "erin", true, 1, true);
        std::thread::sleep(Duration::from_millis(400));
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

    #[test]
    fn renewals_keep_one_queued_expiry_per_announcement_and_expiry_scans_only_what_is_due() {
        // A TTL of 2 s, every check 0.5 s from the deadlines around it: the test stays right
        // on a loaded machine (with a 60 ms TTL it failed under CI's load once).
        let p = Presence::new(Duration::from_millis(2_000));
        assert!(p.subscribe("w", &["u0".to_string()]));
        for round in 0..5 {
            for i in 0..1000 {
                p.announce(2, &format!("u{i}"), true, round, false);
            }
        }
        assert_eq!(p.queued_expiries(), 1000, "a renewal does not queue again");
        // Nothing is due yet: nothing flips, nothing is dropped.
        assert!(p.expire(|_| false, 1).is_empty());
        assert_eq!(p.queued_expiries(), 1000);
        // Half renew; after the first TTL only the other half lapse.
        std::thread::sleep(Duration::from_millis(1_000));
        for i in 0..500 {
            p.announce(2, &format!("u{i}"), true, 9, false);
        }
        // The first half lapsed at ~2 s; the renewed half lapses at ~3 s.
        std::thread::sleep(Duration::from_millis(1_500));
        let changes = p.expire(|_| false, 10);
        assert!(changes.is_empty(), "u0 renewed: no change for its watcher");
        let online = |p: &Presence| {
            let users: Vec<String> = (0..1000).map(|i| format!("u{i}")).collect();
            p.query(&users, |_| false)
                .iter()
                .filter(|v| v.online)
                .count()
        };
        assert_eq!(online(&p), 500);
        assert_eq!(
            p.queued_expiries(),
            500,
            "the renewed half is queued again, once"
        );
        std::thread::sleep(Duration::from_millis(1_000));
        let changes = p.expire(|_| false, 11);
        assert_eq!(changes.len(), 1, "u0 lapsed: its watcher is told");
        assert!(!changes[0].view.online && changes[0].view.user == "u0");
        assert_eq!(online(&p), 0);
        assert_eq!(p.queued_expiries(), 0);
        // A withdrawn then renewed announcement: the stale entry is skipped.
        p.announce(3, "v", true, 1, false);
        p.announce(3, "v", false, 2, false);
        p.announce(3, "v", true, 3, false);
        assert_eq!(p.queued_expiries(), 2);
        assert!(p.query(&["v".into()], |_| false)[0].online);
    }
}
