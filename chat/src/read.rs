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
        .map(|b| decode_message(&b))
        .transpose()
}

/// A stored message, in either layout ([`crate::decode_stored_message`]).
fn decode_message(b: &[u8]) -> Result<MessageRecord, StorageError> {
    crate::model::decode_stored_message(b).map_err(corrupt)
}

/// Whether `user` may read `file` through `chat`: some message of `chat` that carries it
/// (and is not deleted) is inside the user's span, the span history gives them (a member
/// from its join on; a former member up to its leave). Reads at most
/// `ATTACHMENT_SCAN_MAX` of the file's index entries in the chat.
pub fn file_readable(
    store: &Storage,
    group: GroupId,
    chat: &str,
    file: &str,
    user: &str,
) -> Result<bool, StorageError> {
    let Some(span) = chat_record(store, group, chat)?.and_then(|c| c.span_of(user)) else {
        return Ok(false);
    };
    let prefix = keys::attachment_prefix(chat, file);
    let rows = scan_records(
        store,
        group,
        &prefix,
        &keys::prefix_end(&prefix),
        ATTACHMENT_SCAN_MAX,
    )?;
    Ok(rows.iter().any(|(k, _)| {
        k.len() >= 8
            && <[u8; 8]>::try_from(&k[k.len() - 8..])
                .is_ok_and(|b| span.contains(u64::from_be_bytes(b)))
    }))
}

/// Whether some message of `chat` carries `file` (for collection).
pub fn file_carried(
    store: &Storage,
    group: GroupId,
    chat: &str,
    file: &str,
) -> Result<bool, StorageError> {
    let prefix = keys::attachment_prefix(chat, file);
    Ok(!scan_records(store, group, &prefix, &keys::prefix_end(&prefix), 1)?.is_empty())
}

/// Index entries of one file in one chat read by [`file_readable`], at most (the file
/// attached to this many messages of one chat: plenty for any real chat).
pub const ATTACHMENT_SCAN_MAX: usize = 4096;

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
        .map(|(_, v)| decode_message(v))
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

/// `user`'s cursors in `chat` (default when never set): one point read.
pub fn cursor(
    store: &Storage,
    group: GroupId,
    chat: &str,
    user: &str,
) -> Result<Cursor, StorageError> {
    Ok(read_record(store, group, &keys::cursor(chat, user))?
        .map(|b| decode::<Cursor>(&b))
        .transpose()?
        .unwrap_or_default())
}

/// One page of the chats recorded for `user` on this partition (the user's own
/// partition), in chat id order: those after `after` (exclusive; from the first when
/// `None`), at most `limit`. Reads at most `limit` index entries.
pub fn user_chats(
    store: &Storage,
    group: GroupId,
    user: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<String>, StorageError> {
    if limit == 0 {
        // (A storage scan reads at least one record.)
        return Ok(Vec::new());
    }
    let prefix = keys::user_chat_prefix(user);
    // Chat ids never contain `\0`, so the first key after `u\0user\0after` is that key
    // followed by `\0`.
    let from = match after {
        Some(a) => {
            let mut k = keys::user_chat(user, a);
            k.push(0);
            k
        }
        None => prefix.clone(),
    };
    let rows = scan_records(store, group, &from, &keys::prefix_end(&prefix), limit)?;
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
        let m = decode_message(&v)?;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use chatd_raftlog::ApplyTxn;
    use chatd_storage::{NodeIdentity, StorageOptions};

    const G: GroupId = 5;

    fn store() -> (tempfile::TempDir, Storage) {
        let dir = tempfile::tempdir().unwrap();
        let store = Storage::open(
            dir.path(),
            &NodeIdentity {
                cluster_id: "t".into(),
                node_id: 1,
            },
            &StorageOptions::default(),
        )
        .unwrap();
        (dir, store)
    }

    #[test]
    fn user_chats_pages_read_at_most_limit_entries_after_the_cursor() {
        let (_dir, store) = store();
        let mut txn = ApplyTxn::standalone(G, &store);
        // Another user's entries around alice's must never leak into her pages, and a
        // chat id that extends another one ("g:1" / "g:10") must not be skipped.
        for chat in ["g:0", "g:1", "g:10", "g:2", "g:3"] {
            txn.put(&keys::user_chat("alice", chat), Vec::new());
        }
        txn.put(&keys::user_chat("alic", "g:9"), Vec::new());
        txn.put(&keys::user_chat("alice2", "g:9"), Vec::new());
        txn.commit().unwrap();
        let page =
            |after: Option<&str>, limit| user_chats(&store, G, "alice", after, limit).unwrap();
        assert_eq!(page(None, 2), vec!["g:0", "g:1"]);
        assert_eq!(page(Some("g:1"), 2), vec!["g:10", "g:2"]);
        assert_eq!(page(Some("g:2"), 2), vec!["g:3"]);
        assert!(page(Some("g:3"), 2).is_empty());
        // A cursor that is not in the index still pages from where it would sort.
        assert_eq!(page(Some("g:15"), 10), vec!["g:2", "g:3"]);
        assert_eq!(page(None, 100).len(), 5);
        assert!(page(None, 0).is_empty());
    }

    #[test]
    fn cursor_is_a_point_read_with_a_default() {
        let (_dir, store) = store();
        assert_eq!(
            cursor(&store, G, "g:1", "alice").unwrap(),
            Cursor::default()
        );
        let mut txn = ApplyTxn::standalone(G, &store);
        let c = Cursor {
            delivered: 4,
            read: 3,
        };
        txn.put(
            &keys::cursor("g:1", "alice"),
            chatd_codec::encode(&c).unwrap(),
        );
        txn.put(
            &keys::cursor("g:1", "alice2"),
            chatd_codec::encode(&Cursor {
                delivered: 9,
                read: 9,
            })
            .unwrap(),
        );
        txn.commit().unwrap();
        assert_eq!(cursor(&store, G, "g:1", "alice").unwrap(), c);
        assert_eq!(cursor(&store, G, "g:1", "bob").unwrap(), Cursor::default());
    }
}
