//! Bounded per-user and per-session state of the gateway: send rate buckets, the typing
//! rate limit and the chat members the typing path uses. Each bound is a named constant
//! (or a config field) with its unit, listed in docs/protocol.md §12.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::policy::EvictionPolicy;
use moka::sync::Cache;

/// Users whose send token bucket a node keeps; beyond it the least recently used bucket is
/// dropped (that user starts again with a full bucket).
pub const SEND_BUCKETS_USERS_MAX: u64 = 100_000;
/// Longest time an idle send bucket is kept, in milliseconds. A bucket is dropped once it
/// has been idle long enough to be full again (`send_burst / send_rate_per_sec`: 4 s by
/// default), which changes nothing; this caps that time for tiny rates.
pub const SEND_BUCKET_IDLE_MS_MAX: u64 = 3_600_000;
/// Chats whose current members the typing path keeps (least recently used dropped).
pub const TYPING_MEMBERS_CACHE_CHATS_MAX: u64 = 65_536;
/// How long a chat's cached members answer typing frames, in milliseconds. A join or leave
/// the node delivers drops the entry at once; a lost delivery is corrected within this time.
pub const TYPING_MEMBERS_TTL_MS: u64 = 5_000;
/// Chats one session's typing rate limit remembers at once. A typing frame for another
/// chat while all of them were typed in within `typing_interval_ms` is dropped.
pub const TYPING_CHATS_PER_SESSION_MAX: usize = 64;

/// (chat, user) receipt cursors a node remembers having pushed to its sessions (least
/// recently used dropped).
pub const RECEIPTS_PUSHED_MAX: u64 = 262_144;
/// How long a pushed receipt cursor is remembered, in milliseconds. Receipt events of one
/// cursor can reach a node by two paths when the partition's leader changes (each leader
/// forwards what it applied); within this time a late, older one is not pushed after a
/// newer one.
pub const RECEIPTS_PUSHED_TTL_MS: u64 = 600_000;

#[derive(Clone, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Per-user send token buckets (`send_burst` tokens, refilled at `send_rate_per_sec`),
/// bounded in number and dropped when idle.
pub struct SendBuckets {
    burst: f64,
    rate_per_sec: f64,
    buckets: Cache<String, Bucket>,
}

impl SendBuckets {
    /// Buckets of `burst` tokens refilled at `rate_per_sec`, for at most
    /// [`SEND_BUCKETS_USERS_MAX`] users.
    pub fn new(burst: f64, rate_per_sec: f64) -> Self {
        Self::with_capacity(burst, rate_per_sec, SEND_BUCKETS_USERS_MAX)
    }

    fn with_capacity(burst: f64, rate_per_sec: f64, users_max: u64) -> Self {
        Self {
            burst,
            rate_per_sec,
            buckets: Cache::builder()
                .max_capacity(users_max)
                .time_to_idle(Self::idle(burst, rate_per_sec))
                .eviction_policy(EvictionPolicy::lru())
                .build(),
        }
    }

    /// How long an untouched bucket is kept: until it is full again, at most
    /// [`SEND_BUCKET_IDLE_MS_MAX`].
    pub fn idle(burst: f64, rate_per_sec: f64) -> Duration {
        let max = Duration::from_millis(SEND_BUCKET_IDLE_MS_MAX);
        let secs = burst / rate_per_sec;
        if secs.is_finite() && secs >= 0.0 {
            Duration::from_secs_f64(secs).clamp(Duration::from_millis(1), max)
        } else {
            max
        }
    }

    /// Takes a token of `user`; false when its bucket is empty.
    pub fn take(&self, user: &str) -> bool {
        let now = Instant::now();
        let mut taken = false;
        self.buckets.entry_by_ref(user).and_upsert_with(|old| {
            let mut b = old.map(|e| e.into_value()).unwrap_or(Bucket {
                tokens: self.burst,
                at: now,
            });
            let refill = now.duration_since(b.at).as_secs_f64() * self.rate_per_sec;
            b.tokens = (b.tokens + refill).min(self.burst);
            b.at = now;
            if b.tokens >= 1.0 {
                b.tokens -= 1.0;
                taken = true;
            }
            b
        });
        taken
    }

    /// Users with a bucket (after pending evictions).
    pub fn users(&self) -> u64 {
        self.buckets.run_pending_tasks();
        self.buckets.entry_count()
    }
}

/// One session's typing rate limit: at most one typing frame per chat per interval,
/// remembering at most [`TYPING_CHATS_PER_SESSION_MAX`] chats. Owned by the session's
/// reader, so it needs no lock.
pub struct TypingLimiter {
    interval: Duration,
    last: HashMap<String, Instant>,
}

impl TypingLimiter {
    /// A limiter of one frame per chat per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: HashMap::new(),
        }
    }

    /// True if a typing frame for `chat` at `now` goes through (and counts); false if it
    /// is dropped: the chat's previous one is younger than the interval, or the limiter
    /// already tracks [`TYPING_CHATS_PER_SESSION_MAX`] chats typed in within the interval.
    pub fn allow(&mut self, chat: &str, now: Instant) -> bool {
        let interval = self.interval;
        if let Some(t) = self.last.get_mut(chat) {
            if now.saturating_duration_since(*t) < interval {
                return false;
            }
            *t = now;
            return true;
        }
        if self.last.len() >= TYPING_CHATS_PER_SESSION_MAX {
            // Entries older than the interval no longer limit anything: evict them.
            self.last
                .retain(|_, t| now.saturating_duration_since(*t) < interval);
            if self.last.len() >= TYPING_CHATS_PER_SESSION_MAX {
                return false;
            }
        }
        self.last.insert(chat.to_string(), now);
        true
    }

    /// Chats tracked now.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    /// True when no chat is tracked.
    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

/// Current members of chats, for typing frames: answered without a read of the partition
/// while fresh ([`TYPING_MEMBERS_TTL_MS`]), for at most [`TYPING_MEMBERS_CACHE_CHATS_MAX`]
/// chats. Only chats that exist are cached (a chat id a client makes up takes no entry).
pub struct ChatMembers {
    cache: Cache<String, Arc<Vec<String>>>,
}

impl Default for ChatMembers {
    fn default() -> Self {
        Self::with_bounds(
            TYPING_MEMBERS_CACHE_CHATS_MAX,
            Duration::from_millis(TYPING_MEMBERS_TTL_MS),
        )
    }
}

impl ChatMembers {
    fn with_bounds(chats_max: u64, ttl: Duration) -> Self {
        Self {
            cache: Cache::builder()
                .max_capacity(chats_max)
                .time_to_live(ttl)
                .eviction_policy(EvictionPolicy::lru())
                .build(),
        }
    }

    /// The cached members of `chat`, if fresh.
    pub fn get(&self, chat: &str) -> Option<Arc<Vec<String>>> {
        self.cache.get(chat)
    }

    /// Caches the members of `chat` as just read.
    pub fn insert(&self, chat: &str, members: Arc<Vec<String>>) {
        self.cache.insert(chat.to_string(), members);
    }

    /// Forgets `chat` (its membership changed).
    pub fn invalidate(&self, chat: &str) {
        self.cache.invalidate(chat);
    }

    /// Chats cached now (after pending evictions).
    pub fn chats(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }
}

/// The receipt cursors this node pushed, so that sessions never see one go backwards (a
/// cursor only moves forward in the partition; its events may arrive out of order). At
/// most [`RECEIPTS_PUSHED_MAX`] (chat, user) pairs, each for [`RECEIPTS_PUSHED_TTL_MS`].
pub struct ReceiptsPushed {
    cache: Cache<(String, String), (u64, u64)>,
}

impl Default for ReceiptsPushed {
    fn default() -> Self {
        Self::with_bounds(
            RECEIPTS_PUSHED_MAX,
            Duration::from_millis(RECEIPTS_PUSHED_TTL_MS),
        )
    }
}

impl ReceiptsPushed {
    fn with_bounds(pairs_max: u64, ttl: Duration) -> Self {
        Self {
            cache: Cache::builder()
                .max_capacity(pairs_max)
                .time_to_live(ttl)
                .eviction_policy(EvictionPolicy::lru())
                .build(),
        }
    }

    /// True if (`delivered`, `read`) moves `user`'s cursor in `chat` forward from what was
    /// pushed (and records it); false for a cursor already pushed or behind one.
    pub fn advance(&self, chat: &str, user: &str, delivered: u64, read: u64) -> bool {
        let key = (chat.to_string(), user.to_string());
        let mut moved = false;
        self.cache
            .entry(key)
            .and_compute_with(|current| match current.map(|e| e.into_value()) {
                Some((d, r)) if delivered <= d && read <= r => moka::ops::compute::Op::Nop,
                Some((d, r)) => {
                    moved = true;
                    moka::ops::compute::Op::Put((d.max(delivered), r.max(read)))
                }
                None => {
                    moved = true;
                    moka::ops::compute::Op::Put((delivered, read))
                }
            });
        moved
    }

    /// Pairs remembered now (after pending evictions).
    pub fn pairs(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_bucket_gives_exactly_its_burst_then_refills_at_the_rate() {
        let b = SendBuckets::new(200.0, 50.0);
        for i in 0..200 {
            assert!(b.take("alice"), "token {i} of the burst");
        }
        assert!(!b.take("alice"), "the burst is 200");
        assert!(b.take("bob"), "buckets are per user");
        std::thread::sleep(Duration::from_millis(40)); // 2 tokens at 50/s
        assert!(b.take("alice"));
        assert_eq!(SendBuckets::idle(200.0, 50.0), Duration::from_secs(4));
        assert_eq!(
            SendBuckets::idle(200.0, 0.0),
            Duration::from_millis(SEND_BUCKET_IDLE_MS_MAX)
        );
        assert_eq!(
            SendBuckets::idle(1e9, 1.0),
            Duration::from_millis(SEND_BUCKET_IDLE_MS_MAX)
        );
    }

    #[test]
    fn buckets_are_bounded_at_their_user_count() {
        let b = SendBuckets::new(200.0, 50.0);
        for i in 0..SEND_BUCKETS_USERS_MAX + 1 {
            assert!(b.take(&format!("u{i}")));
        }
        assert_eq!(b.users(), SEND_BUCKETS_USERS_MAX);
        // The least recently used went first: the newest user keeps its (drained) bucket.
        let newest = format!("u{SEND_BUCKETS_USERS_MAX}");
        assert!(b.buckets.contains_key(&newest));
        assert!(!b.buckets.contains_key("u0"));
    }

    #[test]
    fn idle_buckets_are_dropped_once_full_again() {
        // Burst 2 at 100/s: full again after 20 ms.
        let b = SendBuckets::with_capacity(2.0, 100.0, 10);
        assert!(b.take("alice") && b.take("alice") && !b.take("alice"));
        assert_eq!(b.users(), 1);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.users(), 0, "an idle bucket is dropped");
        assert!(b.take("alice") && b.take("alice") && !b.take("alice"));
    }

    #[test]
    fn typing_limiter_is_per_chat_and_bounded_in_chats() {
        let interval = Duration::from_millis(1000);
        let mut l = TypingLimiter::new(interval);
        let t0 = Instant::now();
        assert!(l.allow("g:a", t0));
        assert!(!l.allow("g:a", t0 + Duration::from_millis(999)));
        assert!(l.allow("g:a", t0 + interval));
        // Exactly TYPING_CHATS_PER_SESSION_MAX chats within one interval.
        let mut l = TypingLimiter::new(interval);
        for i in 0..TYPING_CHATS_PER_SESSION_MAX {
            assert!(l.allow(&format!("g:{i}"), t0), "chat {i}");
        }
        assert!(
            !l.allow("g:one-more", t0 + Duration::from_millis(10)),
            "dropped at the bound"
        );
        assert_eq!(l.len(), TYPING_CHATS_PER_SESSION_MAX);
        // A known chat is still limited as usual at the bound.
        assert!(l.allow("g:0", t0 + interval));
        // Once the others are older than the interval they are evicted for new chats.
        assert!(l.allow("g:one-more", t0 + interval));
        assert_eq!(l.len(), 2, "g:0 and g:one-more");
    }

    #[test]
    fn receipts_pushed_only_move_forward_and_are_bounded() {
        let p = ReceiptsPushed::default();
        assert!(p.advance("g:1", "u", 481, 481));
        assert!(
            !p.advance("g:1", "u", 476, 476),
            "an older cursor after a newer one"
        );
        assert!(!p.advance("g:1", "u", 481, 481), "the same cursor twice");
        assert!(p.advance("g:1", "u", 481, 482), "read moved");
        assert!(p.advance("g:1", "v", 1, 0), "another user");
        assert!(p.advance("g:2", "u", 1, 0), "another chat");

        let p = ReceiptsPushed::with_bounds(100, Duration::from_secs(60));
        for i in 0..101 {
            assert!(p.advance(&format!("g:{i}"), "u", 5, 5));
        }
        assert_eq!(
            p.pairs(),
            100,
            "bounded: the least recently used pair is dropped"
        );

        let p = ReceiptsPushed::with_bounds(10, Duration::from_millis(30));
        assert!(p.advance("g:a", "u", 9, 9));
        std::thread::sleep(Duration::from_millis(60));
        assert!(p.advance("g:a", "u", 3, 3), "forgotten after the TTL");
    }

    #[test]
    fn chat_members_are_bounded_and_expire() {
        let m = ChatMembers::default();
        let members = Arc::new(vec!["alice".to_string(), "bob".to_string()]);
        for i in 0..TYPING_MEMBERS_CACHE_CHATS_MAX + 1 {
            m.insert(&format!("g:{i}"), members.clone());
        }
        assert_eq!(m.chats(), TYPING_MEMBERS_CACHE_CHATS_MAX);
        assert!(m
            .get(&format!("g:{TYPING_MEMBERS_CACHE_CHATS_MAX}"))
            .is_some());
        m.invalidate(&format!("g:{TYPING_MEMBERS_CACHE_CHATS_MAX}"));
        assert!(m
            .get(&format!("g:{TYPING_MEMBERS_CACHE_CHATS_MAX}"))
            .is_none());

        let m = ChatMembers::with_bounds(10, Duration::from_millis(30));
        m.insert("g:a", members);
        assert!(m.get("g:a").is_some());
        std::thread::sleep(Duration::from_millis(60));
        assert!(m.get("g:a").is_none(), "stale after the TTL");
    }
}
