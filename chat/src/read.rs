//! Reads of committed chat state (outside apply), for history, sync and delivery.

use std::collections::BTreeMap;

use chatd_raftlog::{read_record, scan_records, GroupId};
use chatd_storage::{Storage, StorageError};

use crate::corrupt;
use crate::keys;
use crate::model::{ChatRecord, Cursor, LogRecord, MessageRecord, Span};

fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, StorageError> {
    chatd_codec::decode(b).map_err(corrupt)
}

/// The chat's record.
pub fn chat_record(
    store: &Storage,
    group: GroupId,
    chat: &str,
) -> Result<Option<ChatRecord>, StorageError> {
    read_record(store, group, &keys::chat(chat))?
        .map(|b| decode(&b))
        .transpose()
}

/// One message.
pub fn message(
    store: &Storage,
    group: GroupId,
    chat: &str,
    seq: u64,
) -> Result<Option<MessageRecord>, StorageError> {
    read_record(store, group, &keys::message(chat, seq))?
        .map(|b| decode(&b))
        .transpose()
}

/// A page of history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryPage {
    /// Ascending by seq.
    pub messages: Vec<MessageRecord>,
    /// More messages exist beyond the page in the paging direction.
    pub more: bool,
}

/// Which page of history: strictly before `before` (the newest such page, returned
/// ascending) or strictly after `after` (ascending); at most `limit` messages.
#[derive(Clone, Copy, Debug)]
pub struct PageRequest {
    pub before: Option<u64>,
    pub after: Option<u64>,
    pub limit: usize,
}

/// A page of `chat`'s history within `span` (the reader's visible seqs).
pub fn history(
    store: &Storage,
    group: GroupId,
    chat: &str,
    span: Span,
    last_seq: u64,
    page: PageRequest,
) -> Result<HistoryPage, StorageError> {
    let PageRequest {
        before,
        after,
        limit,
    } = page;
    let lo = span.from.max(after.map_or(1, |a| a.saturating_add(1)));
    let hi = span
        .to
        .unwrap_or(last_seq)
        .min(last_seq)
        .min(before.map_or(u64::MAX, |b| b.saturating_sub(1)));
    if lo > hi || limit == 0 {
        return Ok(HistoryPage {
            messages: Vec::new(),
            more: false,
        });
    }
    let count = hi - lo + 1;
    // Paging forward (after) starts at lo; otherwise the newest `limit` up to hi.
    let (from, to) = if after.is_some() {
        (lo, lo.saturating_add(limit as u64 - 1).min(hi))
    } else {
        (hi.saturating_sub(limit as u64 - 1).max(lo), hi)
    };
    let rows = scan_records(
        store,
        group,
        &keys::message(chat, from),
        &keys::message(chat, to.saturating_add(1)),
        limit,
    )?;
    let messages = rows
        .iter()
        .map(|(_, v)| decode::<MessageRecord>(v))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(HistoryPage {
        more: count > messages.len() as u64,
        messages,
    })
}

/// Every member's cursors in `chat`.
pub fn cursors(
    store: &Storage,
    group: GroupId,
    chat: &str,
) -> Result<BTreeMap<String, Cursor>, StorageError> {
    let prefix = keys::cursor_prefix(chat);
    let rows = scan_records(store, group, &prefix, &keys::prefix_end(&prefix), 4096)?;
    rows.iter()
        .map(|(k, v)| {
            let user = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            Ok((user, decode::<Cursor>(v)?))
        })
        .collect()
}

/// The chats recorded for `user` on this partition (the user's own partition).
pub fn user_chats(
    store: &Storage,
    group: GroupId,
    user: &str,
) -> Result<Vec<String>, StorageError> {
    let prefix = keys::user_chat_prefix(user);
    let rows = scan_records(store, group, &prefix, &keys::prefix_end(&prefix), 100_000)?;
    Ok(rows
        .iter()
        .map(|(k, _)| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
        .collect())
}

/// Messages by others in `(read, last]` within the span: the unread count (bounded scan).
pub fn unread(
    store: &Storage,
    group: GroupId,
    chat: &str,
    user: &str,
    span: Span,
    last_seq: u64,
    read: u64,
) -> Result<u64, StorageError> {
    let from = span.from.max(read + 1);
    let to = span.to.unwrap_or(last_seq).min(last_seq);
    if from > to {
        return Ok(0);
    }
    let rows = scan_records(
        store,
        group,
        &keys::message(chat, from),
        &keys::message(chat, to + 1),
        UNREAD_SCAN_MAX,
    )?;
    let mut n = 0;
    for (_, v) in rows {
        let m: MessageRecord = decode(&v)?;
        if m.sender != user && m.kind == "text" {
            n += 1;
        }
    }
    Ok(n)
}

/// Upper bound of messages scanned to count unread ones.
pub const UNREAD_SCAN_MAX: usize = 10_000;

/// Records of the foundation's opaque log.
pub fn log_count(store: &Storage, group: GroupId) -> Result<u64, StorageError> {
    read_record(store, group, keys::LOG_COUNT)?
        .map(|b| decode(&b))
        .transpose()
        .map(|c| c.unwrap_or(0))
}

/// Up to `limit` records of the opaque log from `from_seq` on.
pub fn log_records(
    store: &Storage,
    group: GroupId,
    from_seq: u64,
    limit: usize,
) -> Result<Vec<LogRecord>, StorageError> {
    let rows = scan_records(
        store,
        group,
        &keys::log_record(from_seq),
        &keys::log_record(u64::MAX),
        limit,
    )?;
    rows.iter().map(|(_, v)| decode(v)).collect()
}
