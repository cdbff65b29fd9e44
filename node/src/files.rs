//! Files (issue 14, docs/files.md): a file's bytes are cut into chunks kept beside the Raft
//! logs, never in them, on the replicas of the file's home partition
//! (`1 + fnv1a64(file_id) % P`, the rule chats use), so they move with the partition.
//!
//! This module holds the chunk store of one node (the `blobs` column family) and the two
//! node-to-node calls on it: `PutChunk` (a replica stores a chunk with an fdatasync before
//! it answers) and `GetChunk`.

use chatd_storage::{Batch, Cf};

use crate::node::{Node, NodeReply};

pub mod collect;
pub mod dedup;
mod download;
pub mod http;
pub mod repair;
pub mod thumbnail;
pub mod upload;

/// File ids: `f:` and 32 lowercase hex digits (128 random bits).
pub const FILE_ID_BYTES: usize = 34;

/// The largest chunk a replica stores; larger `PutChunk`s are refused (`Refused`): the
/// largest `files.chunk_bytes` a configuration may set.
pub const FILE_CHUNK_BYTES_MAX: usize = chatd_config::FILE_CHUNK_BYTES_MAX as usize;

/// Chunks of one file, at most (with 1 MiB chunks: a 1 TiB file).
pub const FILE_CHUNKS_MAX: u32 = 1 << 20;

/// A new random file id.
pub fn new_file_id() -> String {
    format!("f:{:032x}", rand::random::<u128>())
}

/// Whether `id` is a file id (`f:` and 32 lowercase hex digits).
pub fn is_file_id(id: &str) -> bool {
    id.len() == FILE_ID_BYTES
        && id.starts_with("f:")
        && id[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The key of chunk `index` of `file` in `group`'s part of the `blobs` family:
/// `group (8, BE) | file id (34) | index (4, BE)`: a file's chunks in order, a group's
/// files together (a replica that leaves a partition deletes one key range).
pub fn chunk_key(group: u64, file: &str, index: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + file.len() + 4);
    k.extend_from_slice(&group.to_be_bytes());
    k.extend_from_slice(file.as_bytes());
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// The byte after the group in a mark's key: marks sort after every chunk of their group
/// (file ids start with `f:`), inside the group's range.
pub const MARK_TAG: u8 = 0xff;

/// Bytes of a mark's value: the chunk's length (u32 BE) and when it was stored here (ms
/// since the epoch, u64 BE).
pub const MARK_VALUE_BYTES: usize = 12;

/// The key of chunk `index`'s **mark**: `group (8, BE) | 0xff | file id (34) | index (4,
/// BE)`, written with the chunk in one synced batch. Marks of a group are together after
/// its chunks and stay inline in the SST files (12-byte values), so which chunks a replica
/// holds, and since when, is read without loading a chunk (RocksDB's iterators load blob
/// values), and one range delete of the group still removes everything.
pub fn mark_key(group: u64, file: &str, index: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + 1 + file.len() + 4);
    k.extend_from_slice(&group.to_be_bytes());
    k.push(MARK_TAG);
    k.extend_from_slice(file.as_bytes());
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// A mark's value: `len` bytes stored at `stored_ms`.
pub fn mark_value(len: u32, stored_ms: u64) -> [u8; MARK_VALUE_BYTES] {
    let mut v = [0u8; MARK_VALUE_BYTES];
    v[..4].copy_from_slice(&len.to_be_bytes());
    v[4..].copy_from_slice(&stored_ms.to_be_bytes());
    v
}

/// One chunk as its mark says: (file, index, length, stored at ms).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mark {
    pub file: String,
    pub index: u32,
    pub len: u32,
    pub stored_ms: u64,
}

/// Reads a mark's key and value (of group `group`); `None` for bytes this code did not
/// write.
pub fn parse_mark(group: u64, key: &[u8], value: &[u8]) -> Option<Mark> {
    let rest = key.strip_prefix(&group.to_be_bytes()[..])?;
    let rest = rest.strip_prefix(&[MARK_TAG][..])?;
    if rest.len() != FILE_ID_BYTES + 4 || value.len() != MARK_VALUE_BYTES {
        return None;
    }
    let file = std::str::from_utf8(&rest[..FILE_ID_BYTES]).ok()?;
    let index = u32::from_be_bytes(rest[FILE_ID_BYTES..].try_into().ok()?);
    Some(Mark {
        file: file.to_string(),
        index,
        len: u32::from_be_bytes(value[..4].try_into().ok()?),
        stored_ms: u64::from_be_bytes(value[4..].try_into().ok()?),
    })
}

/// The chunks of `file` this node holds: index → length, from their marks.
pub fn present_chunks(
    store: &chatd_storage::Storage,
    group: u64,
    file: &str,
) -> Result<std::collections::BTreeMap<u32, u32>, chatd_storage::StorageError> {
    let from = mark_key(group, file, 0);
    let mut to = mark_key(group, file, u32::MAX);
    to.push(0);
    let mut out = std::collections::BTreeMap::new();
    store.scan_with(Cf::Blobs, &from, &to, |k, v| {
        if let Some(m) = parse_mark(group, k, v) {
            out.insert(m.index, m.len);
        }
        true
    })?;
    Ok(out)
}

/// Whether a file's own chunks must be kept: not when its bytes are another file's (an
/// alias: the sweep deletes them, repair does not fetch them).
pub fn keeps_chunks(state: &chatd_chat::FileState) -> bool {
    !matches!(state.content, chatd_chat::Content::Alias(_))
}

/// The attachments of a `send`: each named file must be a complete upload of `sender`'s;
/// a `mime` or `size` the sender gives must match it; a `name` replaces the uploaded one.
/// Err is `(protocol error code, sentence)`.
pub(crate) async fn attachments(
    node: &Node,
    sender: &str,
    chat: &str,
    files: Vec<chatd_proto::FileRef>,
) -> Result<Vec<chatd_chat::Attachment>, (String, String)> {
    use chatd_proto::code;
    if files.len() > chatd_proto::MESSAGE_FILES_MAX {
        return Err((
            code::TOO_LARGE.into(),
            format!(
                "{} files; a message carries {} at most",
                files.len(),
                chatd_proto::MESSAGE_FILES_MAX
            ),
        ));
    }
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        let unknown = || {
            (
                "unknown_file".to_string(),
                format!("no complete upload {} of yours", f.file_id),
            )
        };
        if !is_file_id(&f.file_id)
            || out
                .iter()
                .any(|a: &chatd_chat::Attachment| a.file_id == f.file_id)
        {
            return Err((
                code::INVALID_FIELD.into(),
                format!("{:?} is not a file id, or is named twice", f.file_id),
            ));
        }
        if let Some(n) = &f.name {
            http::check_file_name(n)
                .map_err(|e| (code::INVALID_FIELD.into(), format!("name {e}")))?;
        }
        let group = crate::gateway::chat_group(node, &f.file_id);
        let (record, state) = match node
            .query(
                group,
                crate::queries::ChatQuery::FileEntry {
                    file: f.file_id.clone(),
                },
            )
            .await
        {
            Ok(crate::queries::ChatQueryReply::FileEntry(Some(r))) => r,
            Ok(_) => return Err(unknown()),
            Err(e) => return Err((code::UNAVAILABLE.into(), e.to_string())),
        };
        if record.owner != sender || !record.complete() || state.released_ms.is_some() {
            return Err(unknown());
        }
        if f.mime.as_ref().is_some_and(|m| *m != record.mime)
            || f.size.is_some_and(|s| s != record.size)
        {
            return Err((
                code::INVALID_FIELD.into(),
                format!(
                    "{} is {} bytes of {}, not what the send says",
                    f.file_id, record.size, record.mime
                ),
            ));
        }
        // Recorded in the file's partition before the message exists: collection never
        // sees a file carried by a message as attached nowhere.
        let attach = chatd_chat::ChatCommand::FileAttach {
            file: record.id.clone(),
            chat: chat.to_string(),
            sender: sender.to_string(),
            ts: crate::gateway::now_ms(),
        };
        match upload::propose_file(node, group, &attach).await {
            Ok(()) => {}
            Err(upload::UploadError::Rejected { code, message }) => return Err((code, message)),
            Err(e) => return Err((code::UNAVAILABLE.into(), e.to_string())),
        }
        out.push(chatd_chat::Attachment {
            file_id: record.id,
            name: f.name.unwrap_or(record.name),
            mime: record.mime,
            size: record.size,
        });
    }
    Ok(out)
}

impl Node {
    /// Stores chunk `index` of `file` of partition `group` here, synced (a replica of
    /// `group` only). Answers `Delivered` once the chunk is on disk; `Refused` for a
    /// request no retry can fix; `Failed` when the write failed.
    pub(crate) async fn put_chunk(
        &self,
        group: u64,
        file: &str,
        index: u32,
        bytes: &[u8],
    ) -> NodeReply {
        if let Err(why) = check_chunk_request(file, index) {
            return NodeReply::Refused(why);
        }
        if bytes.len() > FILE_CHUNK_BYTES_MAX {
            return NodeReply::Refused(format!(
                "chunk of {} bytes exceeds {FILE_CHUNK_BYTES_MAX}",
                bytes.len()
            ));
        }
        if !self.registry.hosts(group) {
            return NodeReply::NotLeader { leader: None };
        }
        let mut b = Batch::new();
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        {
            let mut w = self.store.batch(&mut b);
            w.put(Cf::Blobs, &chunk_key(group, file, index), bytes);
            w.put(
                Cf::Blobs,
                &mark_key(group, file, index),
                &mark_value(len, crate::gateway::now_ms()),
            );
        }
        match self.store.write_synced(b).await {
            Ok(()) => {
                use std::sync::atomic::Ordering::Relaxed;
                let m = &self.gateway.metrics;
                m.file_chunks_stored.fetch_add(1, Relaxed);
                m.file_chunk_bytes_stored
                    .fetch_add(bytes.len() as u64, Relaxed);
                NodeReply::Delivered
            }
            Err(e) => NodeReply::Failed(format!("chunk not stored: {e}")),
        }
    }

    /// Chunk `index` of `file` of partition `group` as stored here, if it is.
    pub(crate) fn get_chunk(&self, group: u64, file: &str, index: u32) -> NodeReply {
        if let Err(why) = check_chunk_request(file, index) {
            return NodeReply::Refused(why);
        }
        match self.store.get(Cf::Blobs, &chunk_key(group, file, index)) {
            Ok(chunk) => NodeReply::Chunk(chunk.map(serde_bytes::ByteBuf::from)),
            Err(e) => NodeReply::Failed(format!("chunk not read: {e}")),
        }
    }
}

fn check_chunk_request(file: &str, index: u32) -> Result<(), String> {
    if !is_file_id(file) {
        return Err(format!("{file:?} is not a file id"));
    }
    if index >= FILE_CHUNKS_MAX {
        return Err(format!(
            "chunk index {index} is not below {FILE_CHUNKS_MAX}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_ids_are_recognised_and_keys_sort_by_group_file_and_index() {
        let id = new_file_id();
        assert!(is_file_id(&id), "{id}");
        assert!(!is_file_id("f:123"));
        assert!(!is_file_id(&id.to_uppercase()));
        assert!(!is_file_id(&format!("g:{}", &id[2..])));
        let a = chunk_key(1, &id, 2);
        assert_eq!(a.len(), 8 + FILE_ID_BYTES + 4);
        assert!(chunk_key(1, &id, 1) < a);
        assert!(a < chunk_key(1, &id, 3));
        assert!(a < chunk_key(1, &id, 256), "indexes compare as numbers");
        assert!(a < chunk_key(2, &id, 0), "a group's chunks are together");
        assert!(check_chunk_request(&id, FILE_CHUNKS_MAX).is_err());
        // Marks: after every chunk of the group, before the next group; read back.
        let m = mark_key(1, &id, 2);
        assert!(chunk_key(1, &id, u32::MAX) < m && m < chunk_key(2, &id, 0));
        assert!(mark_key(1, &id, 1) < m && m < mark_key(1, &id, 256));
        let v = mark_value(1000, 77);
        assert_eq!(
            parse_mark(1, &m, &v),
            Some(Mark {
                file: id.clone(),
                index: 2,
                len: 1000,
                stored_ms: 77
            })
        );
        assert_eq!(parse_mark(2, &m, &v), None, "another group's key");
        assert_eq!(
            parse_mark(1, &m, &v[..4]),
            None,
            "a value this code did not write"
        );
        assert!(check_chunk_request(&id, FILE_CHUNKS_MAX - 1).is_ok());
    }
}
