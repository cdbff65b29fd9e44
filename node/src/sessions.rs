//! The node's bound on WebSocket sessions (`gateway.sessions_max`): a slot is taken before
//! the upgrade and held for the session's life, so the bound counts every open socket,
//! authenticated or not, and a full node refuses cleanly instead of running out of file
//! descriptors.

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
