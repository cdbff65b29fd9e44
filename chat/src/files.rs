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

/// Where a complete file's bytes are (docs/files.md "Dedup by content").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Content {
    /// Not yet entered in its content's index: its own chunks hold its bytes.
    #[default]
    Unregistered,
    /// The first file with these bytes: its chunks hold them for every holder.
    Canonical,
    /// The same bytes as this canonical file, whose chunks are read instead; its own
    /// chunks are deleted.
    Alias(String),
    /// Kept apart (the index refused it): its own chunks hold its bytes.
    Own,
}

/// A file's state beside its record (kept apart so that records and the log's
/// `FileBegin`s keep their layout); the default is not stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileState {
    pub content: Content,
    /// When its owner let it go (collected): no one may read or attach it any more; the
    /// record stays only while it is a canonical file other holders read.
    pub released_ms: Option<u64>,
}

impl FileState {
    /// The file whose chunks hold this one's bytes, and whether that is another one.
    pub fn source<'a>(&'a self, own: &'a str) -> &'a str {
        match &self.content {
            Content::Alias(c) => c,
            _ => own,
        }
    }
}

fn state_key(file: &str) -> Vec<u8> {
    crate::keys::file_state(file)
}

fn get_state(txn: &ApplyTxn<'_>, file: &str) -> Result<FileState, StorageError> {
    Ok(get::<FileState>(txn, &state_key(file))?.unwrap_or_default())
}

fn put_state(txn: &mut ApplyTxn<'_>, file: &str, state: &FileState) -> Result<(), StorageError> {
    if *state == FileState::default() {
        txn.delete(&state_key(file));
        Ok(())
    } else {
        put(txn, &state_key(file), state)
    }
}

/// `FileContent`: what the content index answered for a complete file; set once, on a
/// file still held (a released or unknown one changes nothing).
pub(crate) fn set_content(
    txn: &mut ApplyTxn<'_>,
    file: &str,
    content: Content,
) -> Result<ChatReply, StorageError> {
    match get::<FileRecord>(txn, &key(file))? {
        Some(r) if r.complete() => {}
        _ => return Ok(reject("unknown_file", format!("no complete file {file}"))),
    }
    let mut state = get_state(txn, file)?;
    if state.released_ms.is_some() {
        return Ok(reject("unknown_file", format!("{file} was released")));
    }
    if state.content == content {
        return Ok(ChatReply::Done { seq: 0 });
    }
    if state.content != Content::Unregistered {
        return Ok(reject(
            "conflict",
            format!("{file}'s content is {:?} already", state.content),
        ));
    }
    if content == Content::Alias(file.to_string()) {
        return Ok(reject("invalid_field", "a file cannot alias itself"));
    }
    state.content = content;
    put_state(txn, file, &state)?;
    Ok(ChatReply::Done { seq: 0 })
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
/// deleted by each replica's sweep (chunks without a record).
pub(crate) fn drop_file(txn: &mut ApplyTxn<'_>, file: &str) -> Result<ChatReply, StorageError> {
    for (k, _) in txn.scan(
        &crate::keys::file_chat_prefix(file),
        &crate::keys::prefix_end(&crate::keys::file_chat_prefix(file)),
        FILE_CHATS_MAX + 1,
    )? {
        txn.delete(&k);
    }
    txn.delete(&key(file));
    txn.delete(&state_key(file));
    Ok(ChatReply::Done { seq: 0 })
}

/// Chats one file may be attached in, at most (a send to one more is refused).
pub const FILE_CHATS_MAX: usize = 1024;

/// `FileAttach`: records that `sender` attaches `file` in `chat` at `ts`.
pub(crate) fn attach(
    txn: &mut ApplyTxn<'_>,
    file: &str,
    chat: &str,
    sender: &str,
    ts: u64,
) -> Result<ChatReply, StorageError> {
    match get::<FileRecord>(txn, &key(file))? {
        Some(r)
            if r.owner == sender && r.complete() && get_state(txn, file)?.released_ms.is_none() => {
        }
        _ => {
            return Ok(reject(
                "unknown_file",
                format!("no complete upload {file} of {sender}'s"),
            ))
        }
    }
    let k = crate::keys::file_chat(file, chat);
    if txn.get(&k)?.is_none() {
        let prefix = crate::keys::file_chat_prefix(file);
        let n = txn
            .scan(&prefix, &crate::keys::prefix_end(&prefix), FILE_CHATS_MAX)?
            .len();
        if n >= FILE_CHATS_MAX {
            return Ok(reject(
                "too_large",
                format!("{file} is attached in {FILE_CHATS_MAX} chats already"),
            ));
        }
    }
    put(txn, &k, &ts)?;
    Ok(ChatReply::Done { seq: 0 })
}

/// `FileDetach`: forgets the attach of `attached_ms` in `chat` (a later attach stays).
pub(crate) fn detach(
    txn: &mut ApplyTxn<'_>,
    file: &str,
    chat: &str,
    attached_ms: u64,
) -> Result<ChatReply, StorageError> {
    let k = crate::keys::file_chat(file, chat);
    if get::<u64>(txn, &k)? == Some(attached_ms) {
        txn.delete(&k);
    }
    Ok(ChatReply::Done { seq: 0 })
}

/// `FileCollect`: at log time `ts`, drops an upload older than `upload_ttl_ms`
/// (`Done { seq: 1 }`) and releases a complete file attached nowhere older than
/// `unattached_ttl_ms` (`Done { seq: 2 }`: no one reads or attaches it any more; the
/// collector drops it once its content's index lets it go). `Done { seq: 0 }`: it stays.
pub(crate) fn collect(
    txn: &mut ApplyTxn<'_>,
    file: &str,
    ts: u64,
    upload_ttl_ms: u64,
    unattached_ttl_ms: u64,
) -> Result<ChatReply, StorageError> {
    let Some(r) = get::<FileRecord>(txn, &key(file))? else {
        return Ok(ChatReply::Done { seq: 0 });
    };
    if get_state(txn, file)?.released_ms.is_some() {
        return Ok(ChatReply::Done { seq: 2 });
    }
    let age = ts.saturating_sub(r.created_ms);
    let prefix = crate::keys::file_chat_prefix(file);
    let drop = if r.complete() {
        age >= unattached_ttl_ms
            && txn
                .scan(&prefix, &crate::keys::prefix_end(&prefix), 1)?
                .is_empty()
    } else {
        age >= upload_ttl_ms
    };
    if !drop {
        return Ok(ChatReply::Done { seq: 0 });
    }
    if r.complete() {
        // Its bytes may be another holder's too: released here, dropped once its
        // content's index lets it go (the collector's next steps).
        let mut state = get_state(txn, file)?;
        if state.released_ms.is_none() {
            state.released_ms = Some(ts);
            put_state(txn, file, &state)?;
        }
        return Ok(ChatReply::Done { seq: 2 });
    }
    drop_file(txn, file)?;
    Ok(ChatReply::Done { seq: 1 })
}

/// The chats `file` is attached in, with the time of the last attach in each (at most
/// [`FILE_CHATS_MAX`]).
pub fn attached_chats(
    store: &chatd_storage::Storage,
    group: chatd_raftlog::GroupId,
    file: &str,
) -> Result<Vec<(String, u64)>, StorageError> {
    let prefix = crate::keys::file_chat_prefix(file);
    chatd_raftlog::scan_records(
        store,
        group,
        &prefix,
        &crate::keys::prefix_end(&prefix),
        FILE_CHATS_MAX,
    )?
    .into_iter()
    .map(|(k, v)| {
        let chat = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
        let at: u64 = chatd_codec::decode(&v).map_err(crate::corrupt)?;
        Ok((chat, at))
    })
    .collect()
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

/// The state of `file` beside its record, as applied on this replica.
pub fn read_state(
    store: &chatd_storage::Storage,
    group: chatd_raftlog::GroupId,
    file: &str,
) -> Result<FileState, StorageError> {
    Ok(chatd_raftlog::read_record(store, group, &state_key(file))?
        .map(|b| chatd_codec::decode(&b).map_err(crate::corrupt))
        .transpose()?
        .unwrap_or_default())
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
