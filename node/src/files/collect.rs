//! Collection (docs/files.md): what no one can read any more goes.
//!
//! * **Records**, by the leader of each file's home partition, during the repair pass: an
//!   upload never completed within `files.upload_ttl_ms`, and a complete file attached to
//!   no message within `files.unattached_ttl_ms` of its upload, are dropped
//!   (`FileCollect`, which checks again at apply time, so a concurrent attach wins; a
//!   complete file is released first and dropped once its content lets it go, see
//!   `dedup`). An
//!   attach older than `files.detach_grace_ms` whose chat no longer carries the file (its
//!   messages were deleted) is forgotten (`FileDetach`); the file then counts as attached
//!   nowhere.
//! * **Chunks**, by every node, every `files.sweep_interval_ms`: chunks of files that have
//!   no record here (dropped, collected, failed, or put after the drop), or whose bytes
//!   are another file's (dedup), once their newest mark is older than
//!   `files.orphan_grace_ms`; every chunk of a partition this node has
//!   not hosted for `files.unhosted_grace_ms`. The sweep also sums what this node holds
//!   (`chatd_file_bytes`, `chatd_file_chunks`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use chatd_chat::{ChatCommand, Content, FileRecord, FileState};
use chatd_storage::{Batch, Cf};

use super::upload::propose_file;
use super::{chunk_key, mark_key, parse_mark, MARK_TAG};
use crate::gateway::{chat_group, now_ms};
use crate::node::Node;
use crate::queries::{ChatQuery, ChatQueryReply};

/// Commands one repair pass proposes for collection, at most.
pub const COLLECT_PROPOSALS_PER_PASS_MAX: usize = 64;
/// Marks read per page of the sweep.
pub const SWEEP_MARKS_PAGE: usize = 4096;

/// What the collector did in one pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    pub dropped: u64,
    pub detached: u64,
}

/// Collection of one record of a partition this node leads; `budget` counts proposals.
/// Also takes the file's cross-partition steps on (docs/files.md): a complete file not yet
/// in its content's index is registered, a released one settled.
pub async fn collect_record(
    node: &Arc<Node>,
    group: u64,
    record: &FileRecord,
    state: &FileState,
    budget: &mut usize,
    out: &mut Collected,
) {
    let cfg = &node.config.files;
    let now = now_ms();
    let age = now.saturating_sub(record.created_ms);
    if *budget == 0 {
        return;
    }
    if state.released_ms.is_some() {
        *budget -= 1;
        settle(node, group, record, state, out).await;
        return;
    }
    let collect = ChatCommand::FileCollect {
        file: record.id.clone(),
        ts: now,
        upload_ttl_ms: cfg.upload_ttl_ms,
        unattached_ttl_ms: cfg.unattached_ttl_ms,
    };
    if !record.complete() {
        if age >= cfg.upload_ttl_ms {
            *budget -= 1;
            if propose_collect(node, group, &collect).await == Some(DROPPED) {
                out.dropped += 1;
                super::dedup::refund(node, &record.owner, &record.id).await;
            }
        }
        return;
    }
    if state.content == Content::Unregistered {
        if let Some(sha256) = &record.sha256 {
            *budget -= 1;
            if let Err(e) = super::dedup::register(node, group, &record.id, sha256).await {
                tracing::debug!(file = %record.id, error = %e, "content not registered yet");
            }
        }
    }
    let chats = match chatd_chat::files::attached_chats(&node.store, group, &record.id) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(file = %record.id, error = %e, "attached chats not read");
            return;
        }
    };
    if chats.is_empty() {
        if age >= cfg.unattached_ttl_ms && *budget > 0 {
            *budget -= 1;
            if propose_collect(node, group, &collect).await == Some(RELEASED) {
                // Released: it no longer counts for its owner, whatever becomes of its
                // bytes.
                super::dedup::refund(node, &record.owner, &record.id).await;
                let released = FileState {
                    released_ms: Some(now),
                    ..state.clone()
                };
                settle(node, group, record, &released, out).await;
            }
        }
        return;
    }
    for (chat, attached_ms) in chats {
        if *budget == 0 || now.saturating_sub(attached_ms) < cfg.detach_grace_ms {
            continue;
        }
        *budget -= 1;
        let carried = node
            .query(
                chat_group(node, &chat),
                ChatQuery::FileCarried {
                    chat: chat.clone(),
                    file: record.id.clone(),
                },
            )
            .await;
        if !matches!(carried, Ok(ChatQueryReply::Allowed(false))) {
            continue; // carried, or not known now: ask again next pass
        }
        let detach = ChatCommand::FileDetach {
            file: record.id.clone(),
            chat,
            attached_ms,
        };
        match propose_file(node, group, &detach).await {
            Ok(()) => out.detached += 1,
            Err(e) => tracing::debug!(file = %record.id, error = %e, "detach not committed"),
        }
    }
}

/// `FileCollect`'s answer (`Done { seq }`) when it dropped an upload.
const DROPPED: u64 = 1;
/// `FileCollect`'s answer when it released a complete file.
const RELEASED: u64 = 2;

/// Proposes a `FileCollect`; its answer's `seq` (0: the file stays), `None` if not known.
async fn propose_collect(node: &Node, group: u64, cmd: &ChatCommand) -> Option<u64> {
    let bytes = match chatd_codec::encode(cmd) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "collect command not encoded");
            return None;
        }
    };
    match node.propose(group, bytes).await {
        Ok(reply) => match chatd_codec::decode::<chatd_chat::ChatReply>(&reply.response) {
            Ok(chatd_chat::ChatReply::Done { seq }) => Some(seq),
            _ => None,
        },
        Err(e) => {
            tracing::debug!(group, error = %e, "collect not committed");
            None
        }
    }
}

/// Takes a released file a step on ([`super::dedup::settle_released`]).
async fn settle(
    node: &Node,
    group: u64,
    record: &FileRecord,
    state: &FileState,
    out: &mut Collected,
) {
    match super::dedup::settle_released(node, group, record, state).await {
        Ok(true) => out.dropped += 1,
        Ok(false) => {}
        Err(e) => tracing::debug!(file = %record.id, error = %e, "a released file not settled"),
    }
}

/// What the sweep keeps between passes: since when each partition with chunks here has
/// not been hosted.
#[derive(Default)]
pub struct Sweeper {
    unhosted_since: HashMap<u64, Instant>,
}

/// What one sweep found and did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Chunks and their bytes this node holds after the sweep.
    pub chunks: u64,
    pub bytes: u64,
    /// Files whose chunks were deleted (no record), and partitions wholly deleted.
    pub orphan_files: u64,
    pub unhosted_groups: u64,
}

impl Sweeper {
    /// One sweep over every partition's marks.
    pub async fn sweep(&mut self, node: &Arc<Node>) -> Swept {
        let node2 = node.clone();
        let mut state = std::mem::take(&mut self.unhosted_since);
        let result = tokio::task::spawn_blocking(move || {
            let out = sweep_blocking(&node2, &mut state);
            (out, state)
        })
        .await;
        match result {
            Ok((out, state)) => {
                self.unhosted_since = state;
                out
            }
            Err(e) => {
                tracing::warn!(error = %e, "file sweep failed");
                Swept::default()
            }
        }
    }
}

/// The groups whose marks are in `blobs`: every partition number (group 0 holds none).
fn sweep_blocking(node: &Node, unhosted_since: &mut HashMap<u64, Instant>) -> Swept {
    let cfg = &node.config.files;
    let now = now_ms();
    let mut out = Swept::default();
    for group in 1..=u64::from(node.partitions()) {
        // Marks of the group, by file: (newest stored_ms, chunks, bytes).
        let mut files: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
        let mut from = {
            let mut k = group.to_be_bytes().to_vec();
            k.push(MARK_TAG);
            k
        };
        let to = (group + 1).to_be_bytes().to_vec();
        loop {
            let mut last = None;
            let mut n = 0;
            let scanned = node.store.scan_with(Cf::Blobs, &from, &to, |k, v| {
                n += 1;
                if let Some(m) = parse_mark(group, k, v) {
                    let e = files.entry(m.file).or_insert((0, 0, 0));
                    e.0 = e.0.max(m.stored_ms);
                    e.1 += 1;
                    e.2 += u64::from(m.len);
                }
                last = Some(k.to_vec());
                n < SWEEP_MARKS_PAGE
            });
            if let Err(e) = scanned {
                tracing::warn!(group, error = %e, "file marks not read");
                break;
            }
            match last {
                Some(mut k) if n >= SWEEP_MARKS_PAGE => {
                    k.push(0);
                    from = k;
                }
                _ => break,
            }
        }
        if files.is_empty() {
            unhosted_since.remove(&group);
            continue;
        }
        if !node.registry.hosts(group) {
            let since = *unhosted_since.entry(group).or_insert_with(Instant::now);
            if since.elapsed().as_millis() as u64 >= cfg.unhosted_grace_ms {
                let mut b = Batch::new();
                node.store.batch(&mut b).delete_range(
                    Cf::Blobs,
                    &group.to_be_bytes(),
                    &(group + 1).to_be_bytes(),
                );
                match node.store.write(b) {
                    Ok(()) => {
                        out.unhosted_groups += 1;
                        unhosted_since.remove(&group);
                        tracing::info!(
                            group,
                            files = files.len(),
                            "deleted the file chunks of a partition no longer hosted here"
                        );
                        continue;
                    }
                    Err(e) => tracing::warn!(group, error = %e, "chunks not deleted"),
                }
            }
        } else {
            unhosted_since.remove(&group);
        }
        for (file, (newest, chunks, bytes)) in files {
            // Not needed: no record (dropped, failed), or its bytes are another file's.
            let unneeded = || match chatd_chat::files::read(&node.store, group, &file) {
                Ok(None) => true,
                Ok(Some(_)) => chatd_chat::files::read_state(&node.store, group, &file)
                    .is_ok_and(|s| !super::keeps_chunks(&s)),
                Err(_) => false,
            };
            let orphan = node.registry.hosts(group)
                && now.saturating_sub(newest) >= cfg.orphan_grace_ms
                && unneeded();
            if orphan {
                let mut b = Batch::new();
                {
                    let mut w = node.store.batch(&mut b);
                    w.delete_range(
                        Cf::Blobs,
                        &chunk_key(group, &file, 0),
                        &chunk_key(group, &file, u32::MAX),
                    );
                    w.delete_range(
                        Cf::Blobs,
                        &mark_key(group, &file, 0),
                        &mark_key(group, &file, u32::MAX),
                    );
                    // The last index's pair (the ranges' ends are exclusive), and the
                    // thumbnail made of it.
                    w.delete(Cf::Blobs, &chunk_key(group, &file, u32::MAX));
                    w.delete(Cf::Blobs, &mark_key(group, &file, u32::MAX));
                    w.delete(Cf::Blobs, &super::thumbnail::thumbnail_key(group, &file));
                }
                match node.store.write(b) {
                    Ok(()) => {
                        out.orphan_files += 1;
                        continue;
                    }
                    Err(e) => tracing::warn!(file, error = %e, "orphan chunks not deleted"),
                }
            }
            out.chunks += chunks;
            out.bytes += bytes;
        }
    }
    out
}
