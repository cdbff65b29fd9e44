//! The newest entries of one group's log, kept in memory.
//!
//! openraft reads every entry back right after appending it: each follower's replication
//! task reads it to send it, and the core reads it again to apply it once committed (on a
//! follower, to apply it). Each read was a RocksDB iterator seek and a decode (on a loaded
//! node, ~5 % of all CPU, and on the path of every acknowledgement). The tail keeps the
//! entries just appended, already decoded, and answers those reads with a copy.
//!
//! Invariant: the tail is one run of consecutive entries, each exactly what the log holds at
//! its index. So it takes an entry only after the log's write of it returned (readable),
//! and drops entries *before* the log deletes them (a truncated or purged index is never
//! answered from here). A read the tail cannot answer in full goes to RocksDB.
//!
//! Bounds: per group [`LOG_TAIL_ENTRIES_MAX`] and [`LOG_TAIL_BYTES_MAX`]; per node
//! [`LOG_TAIL_NODE_BYTES_MAX`] over all groups (a [`TailBudget`]); once an entry is applied
//! it stays only while the tail is small ([`LOG_TAIL_APPLIED_KEEP_ENTRIES`],
//! [`LOG_TAIL_APPLIED_KEEP_BYTES`]: a follower a little behind still reads from memory), so
//! thousands of idle groups hold almost nothing.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use openraft::Entry;

use crate::TypeConfig;

/// Entries one group's tail holds at most (the oldest go first).
pub const LOG_TAIL_ENTRIES_MAX: usize = 256;
/// Encoded bytes one group's tail holds at most (the oldest go first).
pub const LOG_TAIL_BYTES_MAX: usize = 4 << 20;
/// Encoded bytes the tails of all groups of a node hold at most; past it an append is not
/// kept (that group's tail starts again at its next append that fits).
pub const LOG_TAIL_NODE_BYTES_MAX: usize = 64 << 20;
/// Applied entries a tail keeps, at most, for a follower a little behind.
pub const LOG_TAIL_APPLIED_KEEP_ENTRIES: usize = 16;
/// Encoded bytes of applied entries a tail keeps, at most.
pub const LOG_TAIL_APPLIED_KEEP_BYTES: usize = 64 << 10;

/// The bytes every tail of a node holds together, against [`LOG_TAIL_NODE_BYTES_MAX`].
#[derive(Debug)]
pub struct TailBudget {
    used_bytes: AtomicUsize,
    max_bytes: usize,
}

impl TailBudget {
    /// A budget of `max_bytes` ([`LOG_TAIL_NODE_BYTES_MAX`] for a node).
    pub fn new(max_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            used_bytes: AtomicUsize::new(0),
            max_bytes,
        })
    }

    /// Bytes held now by every tail.
    pub fn used_bytes(&self) -> usize {
        self.used_bytes.load(Ordering::Relaxed)
    }

    fn take(&self, bytes: usize) -> bool {
        self.used_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|n| *n <= self.max_bytes)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: usize) {
        self.used_bytes.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// One group's tail (shared by its log, its log readers and its state machine).
#[derive(Debug)]
pub(crate) struct LogTail {
    inner: parking_lot::Mutex<Tail>,
    budget: Arc<TailBudget>,
}

#[derive(Debug, Default)]
struct Tail {
    /// Consecutive entries and each one's encoded size.
    entries: VecDeque<(Entry<TypeConfig>, usize)>,
    bytes: usize,
}

impl Tail {
    fn first(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn last(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.log_id.index)
    }

    fn pop_front(&mut self, budget: &TailBudget) {
        if let Some((_, size)) = self.entries.pop_front() {
            self.bytes -= size;
            budget.give_back(size);
        }
    }

    fn pop_back(&mut self, budget: &TailBudget) {
        if let Some((_, size)) = self.entries.pop_back() {
            self.bytes -= size;
            budget.give_back(size);
        }
    }

    fn clear(&mut self, budget: &TailBudget) {
        budget.give_back(self.bytes);
        self.entries.clear();
        self.bytes = 0;
    }
}

impl LogTail {
    pub(crate) fn new(budget: Arc<TailBudget>) -> Self {
        Self {
            inner: parking_lot::Mutex::new(Tail::default()),
            budget,
        }
    }

    /// Takes entries the log has just written (readable now), each with its encoded size.
    /// An entry that does not follow the tail's last replaces what it overwrites (or, after
    /// a gap, the whole tail); one that cannot be held empties the tail, which stays one
    /// consecutive run.
    pub(crate) fn appended(&self, entries: impl IntoIterator<Item = (Entry<TypeConfig>, usize)>) {
        let mut t = self.inner.lock();
        for (entry, size) in entries {
            let index = entry.log_id.index;
            if let (Some(first), Some(last)) = (t.first(), t.last()) {
                if index > first && index <= last {
                    while t.last().is_some_and(|l| l >= index) {
                        t.pop_back(&self.budget);
                    }
                } else if index != last.saturating_add(1) {
                    t.clear(&self.budget);
                }
            }
            if size > LOG_TAIL_BYTES_MAX {
                t.clear(&self.budget);
                continue;
            }
            while t.entries.len() >= LOG_TAIL_ENTRIES_MAX || t.bytes + size > LOG_TAIL_BYTES_MAX {
                t.pop_front(&self.budget);
            }
            if !self.budget.take(size) {
                t.clear(&self.budget);
                continue;
            }
            t.bytes += size;
            t.entries.push_back((entry, size));
        }
    }

    /// Copies of the entries `start..end` (at most `max`), if the tail holds all of them.
    pub(crate) fn get(&self, start: u64, end: u64, max: usize) -> Option<Vec<Entry<TypeConfig>>> {
        let t = self.inner.lock();
        let (first, last) = (t.first()?, t.last()?);
        let end = end.min(start.saturating_add(max as u64));
        if start < first || start >= end || end > last.saturating_add(1) {
            return None;
        }
        let from = usize::try_from(start - first).ok()?;
        let to = usize::try_from(end - first).ok()?;
        Some(t.entries.range(from..to).map(|(e, _)| e.clone()).collect())
    }

    /// Forgets the entries from `index` on: the log is about to delete them.
    pub(crate) fn truncate_from(&self, index: u64) {
        let mut t = self.inner.lock();
        while t.last().is_some_and(|l| l >= index) {
            t.pop_back(&self.budget);
        }
    }

    /// Forgets the entries up to `index`: the log is about to delete them.
    pub(crate) fn purge_through(&self, index: u64) {
        let mut t = self.inner.lock();
        while t.first().is_some_and(|f| f <= index) {
            t.pop_front(&self.budget);
        }
    }

    /// The state machine applied every entry before `next`: applied entries stay only while
    /// the tail is small.
    pub(crate) fn applied(&self, next: u64) {
        let mut t = self.inner.lock();
        while t.first().is_some_and(|f| f < next)
            && (t.entries.len() > LOG_TAIL_APPLIED_KEEP_ENTRIES
                || t.bytes > LOG_TAIL_APPLIED_KEEP_BYTES)
        {
            t.pop_front(&self.budget);
        }
    }

    #[cfg(test)]
    fn span(&self) -> Option<(u64, u64, usize)> {
        let t = self.inner.lock();
        Some((t.first()?, t.last()?, t.bytes))
    }
}

impl Drop for LogTail {
    fn drop(&mut self) {
        self.inner.get_mut().clear(&self.budget);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::{Command, LogId};
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(term: u64, index: u64) -> (Entry<TypeConfig>, usize) {
        let e = Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(Command(vec![serde_bytes::ByteBuf::from(
                format!("{term}/{index}").into_bytes(),
            )])),
        };
        (e, 100)
    }

    fn ids(v: &[Entry<TypeConfig>]) -> Vec<(u64, u64)> {
        v.iter()
            .map(|e| (e.log_id.leader_id.term, e.log_id.index))
            .collect()
    }

    #[test]
    fn answers_only_ranges_it_holds_in_full() {
        let budget = TailBudget::new(LOG_TAIL_NODE_BYTES_MAX);
        let tail = LogTail::new(budget.clone());
        assert!(tail.get(1, 2, 10).is_none());
        tail.appended((5..=9).map(|i| entry(1, i)));
        assert_eq!(
            ids(&tail.get(5, 10, 100).unwrap()),
            [(1, 5), (1, 6), (1, 7), (1, 8), (1, 9)]
        );
        assert_eq!(ids(&tail.get(7, 8, 100).unwrap()), [(1, 7)]);
        // At most `max`, from the start.
        assert_eq!(ids(&tail.get(6, 10, 2).unwrap()), [(1, 6), (1, 7)]);
        assert!(tail.get(4, 6, 100).is_none(), "starts before the tail");
        assert!(tail.get(8, 11, 100).is_none(), "ends past the tail");
        assert!(tail.get(7, 7, 100).is_none(), "empty range");
        assert_eq!(budget.used_bytes(), 500);
    }

    #[test]
    fn an_overwriting_append_replaces_the_entries_after_it_and_a_gap_starts_over() {
        let budget = TailBudget::new(LOG_TAIL_NODE_BYTES_MAX);
        let tail = LogTail::new(budget.clone());
        tail.appended((1..=6).map(|i| entry(1, i)));
        // A new leader's entries from index 4 (without a truncate first: still correct).
        tail.appended((4..=5).map(|i| entry(2, i)));
        assert_eq!(
            ids(&tail.get(1, 6, 100).unwrap()),
            [(1, 1), (1, 2), (1, 3), (2, 4), (2, 5)]
        );
        assert!(tail.get(6, 7, 100).is_none(), "the old entry 6 is gone");
        // An append overwriting from before the tail's first entry replaces all of it.
        tail.appended([entry(3, 1)]);
        assert_eq!(tail.span(), Some((1, 1, 100)));
        // A gap: the tail holds only what follows it.
        tail.appended([entry(3, 9), entry(3, 10)]);
        assert_eq!(tail.span(), Some((9, 10, 200)));
        assert_eq!(budget.used_bytes(), 200);
    }

    #[test]
    fn truncate_and_purge_forget_before_the_log_deletes() {
        let budget = TailBudget::new(LOG_TAIL_NODE_BYTES_MAX);
        let tail = LogTail::new(budget.clone());
        tail.appended((1..=10).map(|i| entry(1, i)));
        tail.truncate_from(8);
        assert_eq!(tail.span(), Some((1, 7, 700)));
        tail.purge_through(3);
        assert_eq!(tail.span(), Some((4, 7, 400)));
        assert!(tail.get(3, 5, 10).is_none());
        tail.truncate_from(0);
        assert_eq!(tail.span(), None);
        assert_eq!(budget.used_bytes(), 0);
    }

    #[test]
    fn the_group_bounds_drop_the_oldest_entries() {
        let budget = TailBudget::new(usize::MAX);
        let tail = LogTail::new(budget.clone());
        tail.appended((1..=LOG_TAIL_ENTRIES_MAX as u64 + 10).map(|i| entry(1, i)));
        let (first, last, _) = tail.span().unwrap();
        assert_eq!(last - first + 1, LOG_TAIL_ENTRIES_MAX as u64);
        assert_eq!(first, 11);
        // By bytes: three entries of a third of the bound, then a fourth pushes the first out.
        let tail = LogTail::new(budget.clone());
        let third = LOG_TAIL_BYTES_MAX / 3;
        tail.appended((1..=4).map(|i| (entry(1, i).0, third)));
        assert_eq!(tail.span(), Some((2, 4, 3 * third)));
        // An entry over the bound is never held, and the tail stays one run.
        tail.appended([(entry(1, 5).0, LOG_TAIL_BYTES_MAX + 1)]);
        assert_eq!(tail.span(), None);
        tail.appended([entry(1, 6)]);
        assert_eq!(tail.span(), Some((6, 6, 100)));
    }

    #[test]
    fn the_node_budget_is_shared_and_an_append_past_it_is_not_kept() {
        let budget = TailBudget::new(1_000);
        let a = LogTail::new(budget.clone());
        let b = LogTail::new(budget.clone());
        a.appended((1..=6).map(|i| entry(1, i)));
        b.appended((1..=4).map(|i| entry(1, i)));
        assert_eq!(budget.used_bytes(), 1_000);
        assert_eq!(b.span(), Some((1, 4, 400)));
        // At the bound: b's next entry does not fit, so b holds nothing (no gap inside).
        b.appended([entry(1, 5)]);
        assert_eq!(b.span(), None);
        assert!(b.get(1, 2, 10).is_none());
        assert_eq!(budget.used_bytes(), 600);
        // Dropping a tail (its group closed) gives its bytes back.
        drop(a);
        assert_eq!(budget.used_bytes(), 0);
        b.appended([entry(1, 6)]);
        assert_eq!(b.span(), Some((6, 6, 100)));
    }

    #[test]
    fn applied_entries_stay_only_while_the_tail_is_small() {
        let budget = TailBudget::new(usize::MAX);
        let tail = LogTail::new(budget.clone());
        let n = LOG_TAIL_APPLIED_KEEP_ENTRIES as u64 + 20;
        tail.appended((1..=n).map(|i| entry(1, i)));
        // Applied through 10: those go while more than the keep bound remain.
        tail.applied(11);
        assert_eq!(tail.span().unwrap().0, 11);
        tail.applied(n + 1);
        let (first, last, bytes) = tail.span().unwrap();
        assert_eq!(last, n);
        assert_eq!(last - first + 1, LOG_TAIL_APPLIED_KEEP_ENTRIES as u64);
        assert_eq!(budget.used_bytes(), bytes);
        // Unapplied entries are never dropped by `applied`.
        tail.appended((n + 1..=n + 40).map(|i| entry(1, i)));
        tail.applied(n + 1);
        assert_eq!(tail.span().unwrap().0, n + 1);
    }
}
