//! The node's sessions: the bound on WebSocket sessions (`gateway.sessions_max`: a slot is
//! taken before the upgrade and held for the session's life, so the bound counts every
//! open socket, authenticated or not, and a full node refuses cleanly instead of running
//! out of file descriptors), and the sharded map of sessions by user.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Sockets a full node still upgrades, only to tell the client why it is refused (an
/// `error` frame `server_full` and close 4013: a browser sees no HTTP status); past them,
/// the upgrade itself is answered HTTP 503 `server_full`.
pub const FULL_NOTICES_IN_FLIGHT_MAX: usize = 64;

/// Open sessions, and the notices being sent to refused ones.
pub struct SessionSlots {
    max: usize,
    open: Arc<AtomicUsize>,
    notices: Arc<AtomicUsize>,
}

/// What a new connection gets.
pub enum Admission {
    /// A session slot, released when dropped.
    Session(Slot),
    /// The node is full: upgrade, send the reason, close (the notice slot is released when
    /// dropped).
    Notice(Slot),
    /// The node is full and busy refusing: answer the upgrade with 503.
    Refuse,
}

/// A held slot; dropping it frees it.
pub struct Slot {
    counter: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
    }
}

impl SessionSlots {
    /// At most `max` sessions at once.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            open: Arc::new(AtomicUsize::new(0)),
            notices: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Admits a new connection, or says how to refuse it.
    pub fn admit(&self) -> Admission {
        if let Some(slot) = take(&self.open, self.max) {
            return Admission::Session(slot);
        }
        match take(&self.notices, FULL_NOTICES_IN_FLIGHT_MAX) {
            Some(slot) => Admission::Notice(slot),
            None => Admission::Refuse,
        }
    }

    /// Sessions open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// The bound.
    pub fn max(&self) -> usize {
        self.max
    }
}

/// Takes one of `max` slots of `counter`, if one is free.
fn take(counter: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot {
            counter: counter.clone(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_bound_a_connection_gets_a_notice_then_a_refusal_and_a_freed_slot_is_reused() {
        let s = SessionSlots::new(2);
        let a = s.admit();
        let b = s.admit();
        assert!(matches!(a, Admission::Session(_)));
        assert!(matches!(b, Admission::Session(_)));
        assert_eq!(s.open(), 2);
        let notices: Vec<Admission> = (0..FULL_NOTICES_IN_FLIGHT_MAX).map(|_| s.admit()).collect();
        assert!(notices.iter().all(|n| matches!(n, Admission::Notice(_))));
        assert!(
            matches!(s.admit(), Admission::Refuse),
            "past the notices: 503"
        );
        assert_eq!(s.open(), 2, "refusals take no session slot");
        drop(notices);
        assert!(
            matches!(s.admit(), Admission::Notice(_)),
            "notice slots freed"
        );
        drop(a);
        assert_eq!(s.open(), 1);
        assert!(
            matches!(s.admit(), Admission::Session(_)),
            "a freed slot is reused"
        );
        drop(b);
    }
}

/// Shards of the map of sessions by user: sessions of different users rarely contend.
pub const SESSION_MAP_SHARDS: usize = 64;

/// This node's sessions by user, sharded by the user's hash: registering, unregistering and
/// pushing to one user lock only that user's shard, never the whole map.
pub struct SessionMap<H> {
    shards: Box<[std::sync::RwLock<Shard<H>>]>,
}

impl<H> Default for SessionMap<H> {
    fn default() -> Self {
        Self {
            shards: (0..SESSION_MAP_SHARDS)
                .map(|_| std::sync::RwLock::new(std::collections::HashMap::new()))
                .collect(),
        }
    }
}

type Shard<H> = std::collections::HashMap<String, Vec<H>>;

impl<H> SessionMap<H> {
    fn shard(&self, user: &str) -> &std::sync::RwLock<Shard<H>> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        user.hash(&mut h);
        &self.shards[(h.finish() % SESSION_MAP_SHARDS as u64) as usize]
    }

    fn read_shard(lock: &std::sync::RwLock<Shard<H>>) -> std::sync::RwLockReadGuard<'_, Shard<H>> {
        lock.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_shard(
        lock: &std::sync::RwLock<Shard<H>>,
    ) -> std::sync::RwLockWriteGuard<'_, Shard<H>> {
        lock.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on `user`'s sessions (`None`: it has none here).
    pub fn with_user<R>(&self, user: &str, f: impl FnOnce(Option<&[H]>) -> R) -> R {
        let shard = Self::read_shard(self.shard(user));
        f(shard.get(user).map(Vec::as_slice))
    }

    /// True if `user` has a session here.
    pub fn contains(&self, user: &str) -> bool {
        Self::read_shard(self.shard(user)).contains_key(user)
    }

    /// Adds a session of `user` unless it has `per_user_max` already (then gives it back);
    /// `Ok(true)` if it is the user's first here.
    pub fn insert_bounded(&self, user: &str, per_user_max: usize, h: H) -> Result<bool, H> {
        let mut shard = Self::write_shard(self.shard(user));
        let list = shard.entry(user.to_string()).or_default();
        if list.len() >= per_user_max {
            if list.is_empty() {
                shard.remove(user);
            }
            return Err(h);
        }
        list.push(h);
        Ok(list.len() == 1)
    }

    /// Removes the sessions of `user` that `gone` picks; returns whether it has any left.
    pub fn remove(&self, user: &str, gone: impl Fn(&H) -> bool) -> bool {
        let mut shard = Self::write_shard(self.shard(user));
        let Some(list) = shard.get_mut(user) else {
            return false;
        };
        list.retain(|h| !gone(h));
        if list.is_empty() {
            shard.remove(user);
            return false;
        }
        true
    }

    /// Users with a session here.
    pub fn users(&self) -> Vec<String> {
        self.shards
            .iter()
            .flat_map(|s| Self::read_shard(s).keys().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// Runs `f` on every session, one shard at a time.
    pub fn for_each(&self, mut f: impl FnMut(&H)) {
        for s in self.shards.iter() {
            for list in Self::read_shard(s).values() {
                list.iter().for_each(&mut f);
            }
        }
    }
}

#[cfg(test)]
mod map_tests {
    use super::*;

    #[test]
    fn the_session_map_bounds_each_user_and_forgets_users_without_sessions() {
        let m: SessionMap<u32> = SessionMap::default();
        assert_eq!(m.insert_bounded("ann", 2, 1), Ok(true), "first session");
        assert_eq!(m.insert_bounded("ann", 2, 2), Ok(false));
        assert_eq!(
            m.insert_bounded("ann", 2, 3),
            Err(3),
            "at the per-user bound"
        );
        assert_eq!(
            m.insert_bounded("bob", 0, 9),
            Err(9),
            "a zero bound admits nothing"
        );
        assert!(
            !m.contains("bob"),
            "a refused first session leaves no entry"
        );
        for i in 0..1000u32 {
            assert_eq!(m.insert_bounded(&format!("u{i}"), 8, i), Ok(true));
        }
        assert_eq!(m.users().len(), 1001);
        let mut n = 0;
        m.for_each(|_| n += 1);
        assert_eq!(n, 1002);
        assert_eq!(m.with_user("ann", |s| s.map(<[u32]>::len)), Some(2));
        assert!(m.remove("ann", |h| *h == 1), "one left");
        assert!(!m.remove("ann", |_| true), "none left");
        assert!(!m.contains("ann"));
        assert!(!m.remove("nobody", |_| true));
    }
}
