//! The content index (docs/files.md "Dedup by content"): in the partition of each
//! content (`1 + fnv1a64("c:" + sha256) % P`), which file's chunks hold those bytes (the
//! canonical file, the first complete one) and which files hold the content. The
//! canonical file's chunks are kept while any holder is left; every other holder reads
//! them and deletes its own.
//!
//! Each step is one command of one partition, idempotent, so the collector can repeat
//! it after any failure: `ContentHold` (a complete file enters), `ContentRelease` (a
//! file that its owner let go leaves, for good: a hold of it arriving late is refused,
//! so a dropped file never becomes canonical again; the tombstone that refuses it is
//! kept for [`CONTENT_TOMBSTONE_TTL_MS`] and then swept by later releases).

use chatd_raftlog::ApplyTxn;
use chatd_storage::StorageError;
use serde::{Deserialize, Serialize};

use crate::{get, keys, put, ChatReply};

/// Holders of one content, at most: a file past it keeps its own bytes (`Content::Own`).
pub const CONTENT_HOLDERS_MAX: u64 = 1 << 20;

/// How long a release's tombstone is kept (log time): far longer than any hold can be on
/// its way (a hold is proposed for a file not yet released, and a proposal commits or is
/// lost within an election), so a late hold always finds it.
pub const CONTENT_TOMBSTONE_TTL_MS: u64 = 24 * 3_600_000;
/// Expired tombstones one release removes, at most: each release adds one, so the
/// expired backlog only shrinks.
pub const CONTENT_TOMBSTONES_SWEPT_PER_RELEASE_MAX: usize = 8;

/// A content as its index records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentEntry {
    /// The file whose chunks hold the bytes.
    pub canonical: String,
    /// Files holding it (the canonical one among them while its owner keeps it).
    pub holders: u64,
}

/// What the index says of a content for one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentOf {
    /// The content's canonical file, while any file holds it.
    pub canonical: Option<String>,
    /// Whether the file holds it.
    pub held: bool,
    /// Whether the file released it (and may never hold it again).
    pub released: bool,
}

/// `ContentHold`: `file` (complete, hashing to `sha256`) holds the content. Answers
/// `Content { canonical }`: the file whose chunks to read (itself when first), or `None`
/// when it may not hold it (released before, or the holders' bound is reached).
pub(crate) fn hold(
    txn: &mut ApplyTxn<'_>,
    sha256: &str,
    file: &str,
) -> Result<ChatReply, StorageError> {
    if txn.get(&keys::content_released(sha256, file))?.is_some() {
        return Ok(ChatReply::Content { canonical: None });
    }
    let entry = get::<ContentEntry>(txn, &keys::content(sha256))?;
    let holder = keys::content_holder(sha256, file);
    if txn.get(&holder)?.is_some() {
        return Ok(ChatReply::Content {
            canonical: entry.map(|e| e.canonical),
        });
    }
    let entry = match entry {
        None => ContentEntry {
            canonical: file.to_string(),
            holders: 1,
        },
        Some(e) if e.holders >= CONTENT_HOLDERS_MAX => {
            return Ok(ChatReply::Content { canonical: None })
        }
        Some(e) => ContentEntry {
            holders: e.holders + 1,
            ..e
        },
    };
    txn.put(&holder, Vec::new());
    put(txn, &keys::content(sha256), &entry)?;
    Ok(ChatReply::Content {
        canonical: Some(entry.canonical),
    })
}

/// `ContentRelease`: `file` lets the content go at `ts`, for good. Answers
/// `Content { canonical }`: the canonical file while other holders are left (when it is
/// `file` itself, its chunks must stay), `None` when none is (the entry is gone).
pub(crate) fn release(
    txn: &mut ApplyTxn<'_>,
    sha256: &str,
    file: &str,
    ts: u64,
) -> Result<ChatReply, StorageError> {
    sweep_tombstones(txn, ts)?;
    let tomb = keys::content_released(sha256, file);
    if txn.get(&tomb)?.is_none() {
        put(txn, &tomb, &ts)?;
        let expires_ms = ts.saturating_add(CONTENT_TOMBSTONE_TTL_MS);
        txn.put(
            &keys::content_released_expiry(expires_ms, &tomb),
            Vec::new(),
        );
    }
    let mut entry = get::<ContentEntry>(txn, &keys::content(sha256))?;
    let holder = keys::content_holder(sha256, file);
    if txn.get(&holder)?.is_some() {
        txn.delete(&holder);
        if let Some(e) = &mut entry {
            e.holders = e.holders.saturating_sub(1);
            if e.holders == 0 {
                txn.delete(&keys::content(sha256));
                entry = None;
            } else {
                put(txn, &keys::content(sha256), e)?;
            }
        }
    }
    Ok(ChatReply::Content {
        canonical: entry.map(|e| e.canonical),
    })
}

/// Removes up to [`CONTENT_TOMBSTONES_SWEPT_PER_RELEASE_MAX`] tombstones expired at log
/// time `now_ms`, oldest first.
fn sweep_tombstones(txn: &mut ApplyTxn<'_>, now_ms: u64) -> Result<(), StorageError> {
    let start = keys::CONTENT_RELEASED_EXPIRY_START;
    for (k, _) in txn.scan(
        start,
        keys::CONTENT_RELEASED_EXPIRY_END,
        CONTENT_TOMBSTONES_SWEPT_PER_RELEASE_MAX,
    )? {
        let Some(at) = k
            .get(start.len()..start.len() + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
        else {
            break; // not written by this code
        };
        if u64::from_be_bytes(at) > now_ms {
            break;
        }
        txn.delete(&k[start.len() + 8..]);
        txn.delete(&k);
    }
    Ok(())
}

/// What the index of `sha256`, as applied on this replica, says for `file`.
pub fn read_of(
    store: &chatd_storage::Storage,
    group: chatd_raftlog::GroupId,
    sha256: &str,
    file: &str,
) -> Result<ContentOf, StorageError> {
    let entry: Option<ContentEntry> =
        chatd_raftlog::read_record(store, group, &keys::content(sha256))?
            .map(|b| chatd_codec::decode(&b).map_err(crate::corrupt))
            .transpose()?;
    Ok(ContentOf {
        canonical: entry.map(|e| e.canonical),
        held: chatd_raftlog::read_record(store, group, &keys::content_holder(sha256, file))?
            .is_some(),
        released: chatd_raftlog::read_record(store, group, &keys::content_released(sha256, file))?
            .is_some(),
    })
}
