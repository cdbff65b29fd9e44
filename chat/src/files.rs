//! File records in their home partition's state machine (docs/files.md): what a file is
//! (owner, size, type, name, chunk size), how far its upload is acknowledged, and its
//! SHA-256 once complete. The bytes are not here: they are chunks beside the log.

use chatd_raftlog::ApplyTxn;
use chatd_storage::StorageError;
use serde::{Deserialize, Serialize};

use crate::{get, put, reject, ChatReply};

/// A file as its home partition records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub id: String,
    /// The user who uploaded it.
    pub owner: String,
    /// Its size in bytes (the upload's `Content-Length`).
    pub size: u64,
    /// Its media type, as the uploader said.
    pub mime: String,
    /// Its file name, as the uploader said.
    pub name: String,
    /// Bytes per chunk (the last chunk may be shorter).
    pub chunk_bytes: u32,
    /// Bytes acknowledged so far: every chunk before it is on a majority of replicas.
    pub offset: u64,
    /// The SHA-256 of its bytes (lowercase hex) once the upload is complete.
    pub sha256: Option<String>,
    /// When the upload began (the gateway's clock, in the log).
    pub created_ms: u64,
}

impl FileRecord {
    /// Whether every byte is stored and the hash recorded.
    pub fn complete(&self) -> bool {
        self.sha256.is_some()
    }

    /// How many chunks the file has.
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(u64::from(self.chunk_bytes.max(1)))
    }
}

pub(crate) fn key(file: &str) -> Vec<u8> {
    crate::keys::file(file)
}

/// `FileBegin`: records a new upload; a retry of the same begin (same owner and size) is
/// answered again, anything else under an existing id is refused.
pub(crate) fn begin(txn: &mut ApplyTxn<'_>, record: FileRecord) -> Result<ChatReply, StorageError> {
    if record.chunk_bytes == 0 {
        return Ok(reject("invalid_field", "chunk size 0"));
    }
    if let Some(existing) = get::<FileRecord>(txn, &key(&record.id))? {
        if existing.owner == record.owner && existing.size == record.size {
            return Ok(ChatReply::Done { seq: 0 });
        }
        return Ok(reject("conflict", format!("file {} exists", record.id)));
    }
    put(txn, &key(&record.id), &record)?;
    Ok(ChatReply::Done { seq: 0 })
}

/// `FileProgress`: the upload is acknowledged up to `offset` (never moves back).
pub(crate) fn progress(
    txn: &mut ApplyTxn<'_>,
    file: &str,
    offset: u64,
) -> Result<ChatReply, StorageError> {
    let Some(mut record) = get::<FileRecord>(txn, &key(file))? else {
        return Ok(reject("unknown_file", format!("no file {file}")));
    };
    if offset > record.size {
        return Ok(reject(
            "invalid_field",
            format!("offset {offset} past the file's {} bytes", record.size),
        ));
    }
    if record.complete() || offset <= record.offset {
        return Ok(ChatReply::Done { seq: 0 });
    }
    record.offset = offset;
    put(txn, &key(file), &record)?;
    Ok(ChatReply::Done { seq: 0 })
}

/// `FileComplete`: every byte is acknowledged; records the hash. Idempotent.
pub(crate) fn complete(
    txn: &mut ApplyTxn<'_>,
    file: &str,
    sha256: String,
) -> Result<ChatReply, StorageError> {
    let Some(mut record) = get::<FileRecord>(txn, &key(file))? else {
        return Ok(reject("unknown_file", format!("no file {file}")));
    };
    match &record.sha256 {
        Some(h) if *h == sha256 => return Ok(ChatReply::Done { seq: 0 }),
        Some(_) => return Ok(reject("conflict", format!("file {file} is complete"))),
        None => {}
    }
    if record.offset != record.size {
        return Ok(reject(
            "incomplete",
            format!(
                "file {file} has {} of {} bytes acknowledged",
                record.offset, record.size
            ),
        ));
    }
    record.sha256 = Some(sha256);
    put(txn, &key(file), &record)?;
    Ok(ChatReply::Done { seq: 0 })
}

/// `FileDrop`: forgets the file (an upload that failed, or collected). Its chunks are
/// deleted by each replica's collection.
pub(crate) fn drop_file(txn: &mut ApplyTxn<'_>, file: &str) -> Result<ChatReply, StorageError> {
    txn.delete(&key(file));
    Ok(ChatReply::Done { seq: 0 })
}

/// The record of `file`, as applied on this replica.
pub fn read(
    store: &chatd_storage::Storage,
    group: chatd_raftlog::GroupId,
    file: &str,
) -> Result<Option<FileRecord>, StorageError> {
    chatd_raftlog::read_record(store, group, &key(file))?
        .map(|b| chatd_codec::decode(&b).map_err(crate::corrupt))
        .transpose()
}

/// Up to `limit` file records of `group` as applied on this replica, in id order, starting
/// after `after` (from the first when `None`).
pub fn scan(
    store: &chatd_storage::Storage,
    group: chatd_raftlog::GroupId,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<FileRecord>, StorageError> {
    let start = crate::keys::file("");
    let end = crate::keys::prefix_end(&start);
    let from = match after {
        Some(id) => {
            let mut k = key(id);
            k.push(0); // the smallest key after it
            k
        }
        None => start,
    };
    chatd_raftlog::scan_records(store, group, &from, &end, limit)?
        .into_iter()
        .map(|(_, v)| chatd_codec::decode(&v).map_err(crate::corrupt))
        .collect()
}
