//! Dedup by content and per-user quotas (docs/files.md): the steps that cross
//! partitions. Each is one idempotent command of one partition, taken in an order that
//! keeps the bytes safe whatever fails between two steps, and repeated by the leader of
//! the file's partition (the repair pass) until the file's state says it is done:
//!
//! * **Register** a complete file: `ContentHold` in the content's partition, then
//!   `FileContent` in the file's (canonical, alias of the canonical file, or its own bytes).
//!   An alias's own chunks are deleted by the sweep; its reads go to the canonical file.
//! * **Release** a collected file: `FileCollect` released it (no one reads or attaches it
//!   any more), `ContentRelease` lets its content go for good, and `FileDrop` forgets it
//!   unless it is the canonical file of holders still left (then it stays, chunks and all,
//!   until the last of them lets go).
//! * **Quota**: `QuotaCharge` in the owner's partition before `FileBegin`, `QuotaRefund`
//!   once the file is dropped or released; the leader of the owner's partition refunds
//!   charges whose file is gone (a refund lost to a crash) after a grace period.

use std::collections::HashMap;
use std::sync::Arc;

use chatd_chat::{ChatCommand, ChatReply, Content, FileRecord, FileState};

use super::upload::UploadError;
use crate::gateway::{chat_group, now_ms};
use crate::node::Node;
use crate::queries::{ChatQuery, ChatQueryReply};

/// A charge younger than this is never refunded by the reconciler: its `FileBegin` may
/// still be on its way.
pub const QUOTA_RECONCILE_GRACE_MS: u64 = 10 * 60 * 1000;
/// Charges one pass checks per partition, at most (each check reads the file's record).
pub const QUOTA_CHARGES_PER_PASS_MAX: usize = 64;

/// The partition of the content index entry of `sha256`.
pub fn content_group(node: &Node, sha256: &str) -> u64 {
    chat_group(node, &format!("c:{sha256}"))
}

/// The partition that keeps `user`'s quota.
pub fn user_group(node: &Node, user: &str) -> u64 {
    chat_group(node, &format!("u:{user}"))
}

/// Proposes `cmd` to `group` and returns its answer (a refusal as an error).
async fn propose(node: &Node, group: u64, cmd: &ChatCommand) -> Result<ChatReply, UploadError> {
    let bytes = chatd_codec::encode(cmd).map_err(|e| UploadError::Internal(e.to_string()))?;
    let reply = node.propose(group, bytes).await?;
    match chatd_codec::decode::<ChatReply>(&reply.response) {
        Ok(ChatReply::Rejected { code, message }) => Err(UploadError::Rejected { code, message }),
        Ok(r) => Ok(r),
        Err(e) => Err(UploadError::Internal(e.to_string())),
    }
}

/// Enters complete `file` (of partition `group`, hashing to `sha256`) in its content's
/// index and records the answer in its state.
pub async fn register(
    node: &Node,
    group: u64,
    file: &str,
    sha256: &str,
) -> Result<Content, UploadError> {
    let hold = ChatCommand::ContentHold {
        sha256: sha256.to_string(),
        file: file.to_string(),
    };
    let content = match propose(node, content_group(node, sha256), &hold).await? {
        ChatReply::Content { canonical: Some(c) } if c == file => Content::Canonical,
        ChatReply::Content { canonical: Some(c) } => Content::Alias(c),
        ChatReply::Content { canonical: None } => Content::Own,
        other => return Err(UploadError::Internal(format!("unexpected {other:?}"))),
    };
    let set = ChatCommand::FileContent {
        file: file.to_string(),
        content: content.clone(),
    };
    propose(node, group, &set).await?;
    Ok(content)
}

/// Charges `bytes` of `file` to `user` (refused past `files.user_quota_bytes`).
pub async fn charge(node: &Node, user: &str, file: &str, bytes: u64) -> Result<(), UploadError> {
    let cmd = ChatCommand::QuotaCharge {
        user: user.to_string(),
        file: file.to_string(),
        bytes,
        quota_bytes: node.config.files.user_quota_bytes,
        ts: now_ms(),
    };
    propose(node, user_group(node, user), &cmd).await.map(drop)
}

/// Refunds `file`'s charge to `user`; a failure is left to the reconciler.
pub async fn refund(node: &Node, user: &str, file: &str) {
    let cmd = ChatCommand::QuotaRefund {
        user: user.to_string(),
        file: file.to_string(),
    };
    if let Err(e) = propose(node, user_group(node, user), &cmd).await {
        tracing::debug!(file, user, error = %e, "quota refund not committed (the reconciler will)");
    }
}

/// Takes released `record` (state `state`) of partition `group` one step on: lets its
/// content go, and drops it unless it is the canonical file of holders still left.
/// Returns whether it was dropped.
pub async fn settle_released(
    node: &Node,
    group: u64,
    record: &FileRecord,
    state: &FileState,
) -> Result<bool, UploadError> {
    let Some(sha256) = &record.sha256 else {
        return Ok(false);
    };
    let cgroup = content_group(node, sha256);
    let of = ChatQuery::ContentOf {
        sha256: sha256.clone(),
        file: record.id.clone(),
    };
    let canonical = match node.query(cgroup, of).await? {
        // Released already (and so for good): what the index says now is final for it.
        ChatQueryReply::ContentOf(o) if o.released && !o.held => o.canonical,
        ChatQueryReply::ContentOf(_) => {
            let release = ChatCommand::ContentRelease {
                sha256: sha256.clone(),
                file: record.id.clone(),
                ts: state.released_ms.unwrap_or_else(now_ms),
            };
            match propose(node, cgroup, &release).await? {
                ChatReply::Content { canonical } => canonical,
                other => return Err(UploadError::Internal(format!("unexpected {other:?}"))),
            }
        }
        other => return Err(UploadError::Internal(format!("unexpected {other:?}"))),
    };
    if canonical.as_deref() == Some(record.id.as_str()) {
        return Ok(false); // other holders read its chunks
    }
    let drop = ChatCommand::FileDrop {
        file: record.id.clone(),
    };
    propose(node, group, &drop).await?;
    refund(node, &record.owner, &record.id).await;
    Ok(true)
}

/// Where the reconciler stopped in each partition it leads.
#[derive(Default)]
pub struct ChargeCursor {
    after: HashMap<u64, (String, String)>,
}

/// Checks up to [`QUOTA_CHARGES_PER_PASS_MAX`] charges of `group` (this node leads it) and
/// refunds those whose file is gone, released, or not the user's. Returns the refunds.
pub async fn reconcile_charges(node: &Arc<Node>, group: u64, cursor: &mut ChargeCursor) -> u64 {
    let after = cursor.after.get(&group).cloned();
    let page = match chatd_chat::quota::charges(
        &node.store,
        group,
        after.as_ref().map(|(u, f)| (u.as_str(), f.as_str())),
        QUOTA_CHARGES_PER_PASS_MAX,
    ) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(group, error = %e, "quota charges not read");
            return 0;
        }
    };
    match page.last() {
        Some(last) if page.len() == QUOTA_CHARGES_PER_PASS_MAX => {
            cursor
                .after
                .insert(group, (last.user.clone(), last.file.clone()));
        }
        _ => {
            cursor.after.remove(&group);
        }
    }
    let now = now_ms();
    let mut refunded = 0;
    for c in page {
        if now.saturating_sub(c.charge.ts) < QUOTA_RECONCILE_GRACE_MS {
            continue;
        }
        let q = ChatQuery::FileEntry {
            file: c.file.clone(),
        };
        let gone = match node.query(chat_group(node, &c.file), q).await {
            Ok(ChatQueryReply::FileEntry(None)) => true,
            Ok(ChatQueryReply::FileEntry(Some((r, s)))) => {
                r.owner != c.user || s.released_ms.is_some()
            }
            _ => false, // not known now: next time
        };
        if gone {
            refund(node, &c.user, &c.file).await;
            refunded += 1;
        }
    }
    refunded
}
