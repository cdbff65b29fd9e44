//! Chunk repair (catch-up): a replica that missed chunks (down or partitioned during an
//! upload, or new to a partition after a move) fetches them from the partition's other
//! replicas. Each node runs one loop over the file records of the partitions it hosts:
//! every chunk below a record's committed offset must be here; a missing one is fetched
//! (`GetChunk`, one chunk per frame) and stored synced, with its mark. Resumable by
//! construction: a chunk is stored or it is not, and the next pass starts over.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use chatd_chat::FileRecord;

use super::download::fetch_remote_chunk;
use super::present_chunks;
use crate::node::{Node, NodeReply};

/// File records read per page of one partition's scan.
pub const REPAIR_RECORDS_PAGE: usize = 256;
/// Chunks fetched per pass, at most: a pass that finds more missing stops there and the
/// next one goes on (the loop's bandwidth: this many chunks per interval).
pub const REPAIR_CHUNKS_PER_PASS_MAX: usize = 256;
/// Complete files found whole here, remembered so a pass does not read their marks again;
/// past this many the memory is cleared (and the next pass checks every file again).
pub const REPAIR_VERIFIED_FILES_MAX: usize = 100_000;

/// What one pass found and did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// File records looked at.
    pub files: u64,
    /// Chunks found missing here.
    pub missing: u64,
    /// Chunks fetched from another replica and stored.
    pub repaired: u64,
    /// Chunks no other replica could give (yet).
    pub failed: u64,
    /// What collection did (on the partitions this node leads).
    pub collected: super::collect::Collected,
}

/// Complete files known whole here, bounded; and what the last pass saw of the others.
#[derive(Default)]
pub struct Verified {
    files: HashSet<String>,
    /// File → (committed offset, complete) as the previous pass saw it. A file is
    /// repaired only once a pass sees it as the one before did: an upload under way (its
    /// last replica a few chunks behind the majority, its own calls still coming) is left
    /// to finish, so repair never races the upload for the same chunks.
    last_seen: HashMap<String, (u64, bool)>,
}

impl Verified {
    fn contains(&self, file: &str) -> bool {
        self.files.contains(file)
    }

    fn insert(&mut self, file: &str) {
        if self.files.len() >= REPAIR_VERIFIED_FILES_MAX {
            self.files.clear();
        }
        self.files.insert(file.to_string());
    }

    /// Files remembered.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// The repair loop of one node: a pass every `files.repair_interval_ms`.
pub async fn run(node: Weak<Node>) {
    let interval = match node.upgrade() {
        Some(n) => Duration::from_millis(n.config.files.repair_interval_ms.max(10)),
        None => return,
    };
    let mut verified = Verified::default();
    let mut sweeper = super::collect::Sweeper::default();
    let mut charges = super::dedup::ChargeCursor::default();
    let mut swept_at: Option<std::time::Instant> = None;
    loop {
        tokio::time::sleep(interval).await;
        let Some(n) = node.upgrade() else { return };
        let pass = pass(&n, &mut verified).await;
        let m = &n.gateway.metrics;
        use std::sync::atomic::Ordering::Relaxed;
        m.file_chunks_repaired.fetch_add(pass.repaired, Relaxed);
        m.file_chunks_missing
            .store(pass.missing.saturating_sub(pass.repaired), Relaxed);
        m.files_collected.fetch_add(pass.collected.dropped, Relaxed);
        let sweep_every = Duration::from_millis(n.config.files.sweep_interval_ms);
        if swept_at.is_none_or(|t| t.elapsed() >= sweep_every) {
            swept_at = Some(std::time::Instant::now());
            let s = sweeper.sweep(&n).await;
            // Quota charges whose refund was lost, at the sweep's pace (each check reads
            // a record from another partition).
            let mut refunded = 0;
            for group in n.registry.groups() {
                if group != 0 && n.registry.leads(group) {
                    refunded += super::dedup::reconcile_charges(&n, group, &mut charges).await;
                }
            }
            if refunded > 0 {
                tracing::info!(refunded, "quota charges of files gone refunded");
            }
            m.file_chunks.store(s.chunks, Relaxed);
            m.file_bytes.store(s.bytes, Relaxed);
            if s.orphan_files + s.unhosted_groups > 0 {
                tracing::info!(
                    orphan_files = s.orphan_files,
                    unhosted_groups = s.unhosted_groups,
                    "file sweep deleted chunks"
                );
            }
        }
        if pass.missing > 0 {
            tracing::info!(
                files = pass.files,
                missing = pass.missing,
                repaired = pass.repaired,
                failed = pass.failed,
                "file chunk repair pass"
            );
        }
    }
}

/// One pass over the file records of every partition this node hosts.
pub async fn pass(node: &Arc<Node>, verified: &mut Verified) -> Pass {
    let mut out = Pass::default();
    let mut seen_now: HashMap<String, (u64, bool)> = HashMap::new();
    let mut budget = REPAIR_CHUNKS_PER_PASS_MAX;
    let mut collect_budget = super::collect::COLLECT_PROPOSALS_PER_PASS_MAX;
    for group in node.registry.groups() {
        if group == 0 {
            continue;
        }
        let leads = node.registry.leads(group);
        let mut after: Option<String> = None;
        loop {
            let page = match chatd_chat::files::scan(
                &node.store,
                group,
                after.as_deref(),
                REPAIR_RECORDS_PAGE,
            ) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(group, error = %e, "file records not read for repair");
                    break;
                }
            };
            let full = page.len() == REPAIR_RECORDS_PAGE;
            for record in &page {
                out.files += 1;
                let state = match chatd_chat::files::read_state(&node.store, group, &record.id) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(file = %record.id, error = %e, "file state not read");
                        continue;
                    }
                };
                if leads {
                    super::collect::collect_record(
                        node,
                        group,
                        record,
                        &state,
                        &mut collect_budget,
                        &mut out.collected,
                    )
                    .await;
                }
                if verified.contains(&record.id) || !super::keeps_chunks(&state) {
                    continue;
                }
                let state = (record.offset, record.complete());
                let settled = verified.last_seen.get(&record.id) == Some(&state);
                if seen_now.len() < REPAIR_VERIFIED_FILES_MAX {
                    seen_now.insert(record.id.clone(), state);
                }
                if !settled {
                    continue;
                }
                match repair_file(node, group, record, &mut budget, &mut out).await {
                    Ok(true) if record.complete() => verified.insert(&record.id),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(file = %record.id, error = %e, "file chunks not checked")
                    }
                }
            }
            after = page.last().map(|r| r.id.clone());
            if !full {
                break;
            }
        }
    }
    verified.last_seen = seen_now;
    out
}

/// Chunks one `RepairFiles` call fetches, at most (the mover calls again).
pub const REPAIR_CHUNKS_PER_CALL_MAX: usize = 1024;

/// Fetches, now, the chunks this node lacks of `group`'s files (as applied here), at most
/// [`REPAIR_CHUNKS_PER_CALL_MAX`]; returns how many it still lacks. Unlike the loop's
/// pass, it does not wait for a file to settle: a move calls it on its new replica before
/// the leaving one stops being a voter, so that no chunk is left only on a replica that
/// goes.
pub async fn repair_group(node: &Node, group: u64) -> Result<u64, chatd_storage::StorageError> {
    let mut out = Pass::default();
    let mut budget = REPAIR_CHUNKS_PER_CALL_MAX;
    let mut after: Option<String> = None;
    loop {
        let page =
            chatd_chat::files::scan(&node.store, group, after.as_deref(), REPAIR_RECORDS_PAGE)?;
        for record in &page {
            let state = chatd_chat::files::read_state(&node.store, group, &record.id)?;
            if super::keeps_chunks(&state) {
                repair_file(node, group, record, &mut budget, &mut out).await?;
            }
        }
        match page.last() {
            Some(last) if page.len() == REPAIR_RECORDS_PAGE => after = Some(last.id.clone()),
            _ => break,
        }
    }
    Ok(out.missing.saturating_sub(out.repaired))
}

/// The length chunk `index` of `record` has.
pub fn chunk_len(record: &FileRecord, index: u64) -> u64 {
    let cb = u64::from(record.chunk_bytes.max(1));
    record.size.saturating_sub(index * cb).min(cb)
}

/// Fetches the chunks of `record` below its committed offset that are not here. Returns
/// whether every one of them is here now.
async fn repair_file(
    node: &Node,
    group: u64,
    record: &FileRecord,
    budget: &mut usize,
    out: &mut Pass,
) -> Result<bool, chatd_storage::StorageError> {
    let cb = u64::from(record.chunk_bytes.max(1));
    let needed = if record.complete() {
        record.chunks()
    } else {
        record.offset / cb
    };
    let present = present_chunks(&node.store, group, &record.id)?;
    let (mut missing, mut repaired) = (0u64, 0u64);
    for i in 0..needed {
        let Ok(index) = u32::try_from(i) else {
            break;
        };
        let len = chunk_len(record, i);
        if present.get(&index).is_some_and(|l| u64::from(*l) == len) {
            continue;
        }
        out.missing += 1;
        missing += 1;
        if *budget == 0 {
            continue;
        }
        *budget -= 1;
        let bytes = match fetch_remote_chunk(node, group, &record.id, index, len as usize).await {
            Ok(b) => b,
            Err(e) => {
                out.failed += 1;
                tracing::debug!(file = %record.id, chunk = i, error = %e, "chunk not repaired");
                continue;
            }
        };
        match node.put_chunk(group, &record.id, index, &bytes).await {
            NodeReply::Delivered => {
                out.repaired += 1;
                repaired += 1;
            }
            other => {
                out.failed += 1;
                tracing::warn!(file = %record.id, chunk = i, reply = ?other,
                    "a repaired chunk was not stored");
            }
        }
    }
    Ok(missing == repaired)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(size: u64, chunk_bytes: u32) -> FileRecord {
        FileRecord {
            id: "f:00000000000000000000000000000001".into(),
            owner: "u".into(),
            size,
            mime: "x/y".into(),
            name: "n".into(),
            chunk_bytes,
            offset: size,
            sha256: None,
            created_ms: 0,
        }
    }

    #[test]
    fn chunk_lengths_end_with_the_short_last_one() {
        let r = record(10, 4);
        assert_eq!(chunk_len(&r, 0), 4);
        assert_eq!(chunk_len(&r, 1), 4);
        assert_eq!(chunk_len(&r, 2), 2);
        assert_eq!(chunk_len(&r, 3), 0);
    }

    #[test]
    fn the_verified_memory_is_bounded() {
        let mut v = Verified::default();
        for i in 0..REPAIR_VERIFIED_FILES_MAX {
            v.insert(&format!("f:{i}"));
        }
        assert_eq!(v.len(), REPAIR_VERIFIED_FILES_MAX);
        assert!(v.contains("f:0"));
        v.insert("f:one-more");
        assert_eq!(v.len(), 1, "cleared at the bound, then the new one kept");
        assert!(v.contains("f:one-more") && !v.contains("f:0"));
    }
}
