//! The write side of files: a request's body is cut into chunks, each chunk is sent to every
//! replica of the file's home partition at once and is acknowledged once a majority stored
//! it (each with an fdatasync), at most `files.chunks_in_flight` chunks ahead; the resume
//! point (`FileProgress`) is committed through Raft every `files.progress_chunks` chunks and
//! at the end, and `FileComplete` records the SHA-256 once every byte is acknowledged.
//!
//! The resume point is always a whole number of chunks (or the file's size): bytes of a
//! request that broke off after its last whole acknowledged chunk are not kept, and the
//! client resends from the offset it is told (docs/protocol.md §2).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use chatd_chat::{ChatCommand, ChatReply, FileRecord};
use futures::StreamExt;

use super::download::fetch_chunk;
use crate::node::{Node, NodeReply, NodeRequest, ProposeError};

/// Longest wait for one replica to store (or return) one chunk.
pub(crate) const CHUNK_CALL_TIMEOUT_MS: u64 = 10_000;

/// Why an upload request failed.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The body is not as long as its `Content-Length` said (or broke off).
    #[error("{0}")]
    Body(String),
    /// A chunk did not reach a majority of the file's replicas.
    #[error("{0}")]
    Replicas(String),
    /// The record could not be committed (no leader, timeout, shutdown).
    #[error(transparent)]
    Propose(#[from] ProposeError),
    /// The partition refused the command (`code`, `message`).
    #[error("{code}: {message}")]
    Rejected { code: String, message: String },
    /// An encoding failure or a broken invariant.
    #[error("{0}")]
    Internal(String),
}

/// The uploads this node is serving: at most one request per file at a time here, at most
/// `files.uploads_max` in all.
#[derive(Default)]
pub struct Uploads {
    writing: std::sync::Mutex<HashSet<String>>,
}

/// Why an upload could not start here.
#[derive(Debug, PartialEq, Eq)]
pub enum Busy {
    /// Another request of this node is writing the same file.
    SameFile,
    /// `files.uploads_max` requests are writing.
    Full,
}

/// Held while a request writes a file; frees its place when dropped.
pub struct Writing<'a> {
    uploads: &'a Uploads,
    file: String,
}

impl Uploads {
    /// A place for a request writing `file`, if there is one (at most `max` at once).
    pub fn start(&self, file: &str, max: usize) -> Result<Writing<'_>, Busy> {
        let mut w = self
            .writing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if w.contains(file) {
            return Err(Busy::SameFile);
        }
        if w.len() >= max {
            return Err(Busy::Full);
        }
        w.insert(file.to_string());
        Ok(Writing {
            uploads: self,
            file: file.to_string(),
        })
    }

    /// Requests writing now.
    pub fn len(&self) -> usize {
        self.writing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Whether no request is writing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.uploads
            .writing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.file);
    }
}

/// Proposes a file command to `group` and reads its answer.
pub(crate) async fn propose_file(
    node: &Node,
    group: u64,
    cmd: &ChatCommand,
) -> Result<(), UploadError> {
    let bytes = chatd_codec::encode(cmd).map_err(|e| UploadError::Internal(e.to_string()))?;
    let reply = node.propose(group, bytes).await?;
    match chatd_codec::decode::<ChatReply>(&reply.response) {
        Ok(ChatReply::Done { .. }) => Ok(()),
        Ok(ChatReply::Rejected { code, message }) => Err(UploadError::Rejected { code, message }),
        Ok(other) => Err(UploadError::Internal(format!("unexpected reply {other:?}"))),
        Err(e) => Err(UploadError::Internal(e.to_string())),
    }
}

/// How far a request got.
#[derive(Debug)]
pub struct Written {
    /// The committed resume point after it.
    pub offset: u64,
    /// The file's SHA-256 when this request completed it.
    pub sha256: Option<String>,
}

/// Writes `body` (`len` bytes) at `from` of `record`'s file: `from` is the committed resume
/// point (a whole number of chunks). Commits the resume point as it goes and at the end,
/// and completes the file when the body reaches its end. On failure, the resume point of
/// every whole chunk a majority stored is committed before the error returns (unless
/// `keep_on_failure` is false: then the record is dropped, for a one-shot upload).
///
/// Runs in its own task, so a client that goes away cannot cut the commits short.
pub async fn write(
    node: Arc<Node>,
    group: u64,
    record: FileRecord,
    from: u64,
    len: u64,
    body: Body,
    keep_on_failure: bool,
) -> Result<Written, UploadError> {
    let task = tokio::spawn(async move {
        let mut acked = from;
        let result = receive(&node, group, &record, from, len, body, &mut acked).await;
        match result {
            Ok(sha256) => {
                commit_progress(&node, group, &record.id, acked).await?;
                if let Some(sha256) = &sha256 {
                    propose_file(
                        &node,
                        group,
                        &ChatCommand::FileComplete {
                            file: record.id.clone(),
                            sha256: sha256.clone(),
                        },
                    )
                    .await?;
                    // Dedup needs no answer of the upload's: off its path (the repair
                    // pass registers a file this misses).
                    let (node, file, sha256) = (node.clone(), record.id.clone(), sha256.clone());
                    tokio::spawn(async move {
                        if let Err(e) = super::dedup::register(&node, group, &file, &sha256).await {
                            tracing::debug!(file, error = %e, "content not registered yet");
                        }
                    });
                }
                Ok(Written {
                    offset: acked,
                    sha256,
                })
            }
            Err(e) => {
                let kept = if keep_on_failure {
                    commit_progress(&node, group, &record.id, acked).await
                } else {
                    let dropped = propose_file(
                        &node,
                        group,
                        &ChatCommand::FileDrop {
                            file: record.id.clone(),
                        },
                    )
                    .await;
                    if dropped.is_ok() {
                        super::dedup::refund(&node, &record.owner, &record.id).await;
                    }
                    dropped
                };
                if let Err(k) = kept {
                    tracing::warn!(file = %record.id, error = %k,
                        "an interrupted upload's record was not updated");
                }
                Err(e)
            }
        }
    });
    task.await
        .map_err(|e| UploadError::Internal(format!("the upload task failed: {e}")))?
}

async fn commit_progress(
    node: &Node,
    group: u64,
    file: &str,
    offset: u64,
) -> Result<(), UploadError> {
    propose_file(
        node,
        group,
        &ChatCommand::FileProgress {
            file: file.to_string(),
            offset,
        },
    )
    .await
}

type ChunkTask = tokio::task::JoinHandle<Result<u64, UploadError>>;

/// Reads the body into chunks and stores them; `acked` follows the end of the last chunk
/// of the unbroken run a majority stored. Returns the file's SHA-256 when the body reaches
/// the file's end.
async fn receive(
    node: &Arc<Node>,
    group: u64,
    record: &FileRecord,
    from: u64,
    len: u64,
    body: Body,
    acked: &mut u64,
) -> Result<Option<String>, UploadError> {
    let cfg = &node.config.files;
    let cb = u64::from(record.chunk_bytes.max(1));
    let chunk_bytes = cb as usize;
    let in_flight_max = cfg.chunks_in_flight;
    let progress_every = u64::from(cfg.progress_chunks.max(1));
    let to_end = from + len == record.size;
    // The hash covers the whole file: the bytes before `from` are read back from the
    // replicas first (only when this request can complete the file).
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    if to_end && from > 0 {
        for i in 0..from / cb {
            let index = u32::try_from(i).map_err(|e| UploadError::Internal(e.to_string()))?;
            let c = fetch_chunk(node, group, &record.id, index, chunk_bytes)
                .await
                .map_err(UploadError::Replicas)?;
            hash.update(&c);
        }
    }
    let mut received: u64 = 0;
    let mut buf: Vec<u8> = Vec::with_capacity(chunk_bytes);
    let mut index = u32::try_from(from / cb).map_err(|e| UploadError::Internal(e.to_string()))?;
    let mut in_flight: VecDeque<ChunkTask> = VecDeque::new();
    let mut since_commit: u64 = 0;
    let mut committing: Option<tokio::task::JoinHandle<Result<(), UploadError>>> = None;
    let mut stream = body.into_data_stream();
    loop {
        // Chunks already stored move the resume point (at the bound: wait for the oldest
        // before reading more); it is committed every `progress_every` chunks.
        while in_flight.len() >= in_flight_max || in_flight.front().is_some_and(|h| h.is_finished())
        {
            settle_oldest(&mut in_flight, acked, &mut since_commit).await?;
        }
        // One resume-point commit at a time, beside the chunks: awaiting each inline
        // stalled the body behind a Raft commit whose fsync queues behind megabytes of
        // chunk writes (1 GiB: 137 -> 49 MiB/s).
        if committing.as_ref().is_some_and(|h| h.is_finished()) {
            if let Some(h) = committing.take() {
                h.await
                    .map_err(|e| UploadError::Internal(e.to_string()))??;
            }
        }
        if since_commit >= progress_every && committing.is_none() {
            let (node, file, at) = (node.clone(), record.id.clone(), *acked);
            committing = Some(tokio::spawn(async move {
                commit_progress(&node, group, &file, at).await
            }));
            since_commit = 0;
        }
        let Some(next) = stream.next().await else {
            break;
        };
        let data = match next {
            Ok(d) => d,
            Err(e) => {
                // The whole chunks already sent still count for the resume point.
                drain(&mut in_flight, acked).await;
                return Err(UploadError::Body(format!(
                    "the upload's body broke off: {e}"
                )));
            }
        };
        received += data.len() as u64;
        if received > len {
            return Err(UploadError::Body(format!(
                "the body has {received} bytes or more, Content-Length said {len}"
            )));
        }
        hash.update(&data);
        let mut rest: &[u8] = &data;
        while !rest.is_empty() {
            let take = (chunk_bytes - buf.len()).min(rest.len());
            buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if buf.len() == chunk_bytes {
                let chunk = std::mem::replace(&mut buf, Vec::with_capacity(chunk_bytes));
                in_flight.push_back(spawn_chunk(node, group, record, index, chunk));
                index += 1;
                while in_flight.len() > in_flight_max {
                    settle_oldest(&mut in_flight, acked, &mut since_commit).await?;
                }
            }
        }
    }
    if received != len {
        // Whatever whole chunks were sent are still acknowledged (and committed by the
        // caller) so that a resume does not resend them.
        drain(&mut in_flight, acked).await;
        return Err(UploadError::Body(format!(
            "the body has {received} bytes, Content-Length said {len}"
        )));
    }
    // The file's last chunk may be short; a request that stops before the file's end
    // keeps whole chunks only.
    if !buf.is_empty() && to_end {
        let chunk = std::mem::take(&mut buf);
        in_flight.push_back(spawn_chunk(node, group, record, index, chunk));
    }
    while !in_flight.is_empty() {
        settle_oldest(&mut in_flight, acked, &mut since_commit).await?;
    }
    if let Some(h) = committing.take() {
        h.await
            .map_err(|e| UploadError::Internal(e.to_string()))??;
    }
    Ok(to_end.then(|| hex(hash.finish().as_ref())))
}

fn spawn_chunk(
    node: &Arc<Node>,
    group: u64,
    record: &FileRecord,
    index: u32,
    chunk: Vec<u8>,
) -> ChunkTask {
    let (node, file) = (node.clone(), record.id.clone());
    let end =
        (u64::from(index) * u64::from(record.chunk_bytes) + chunk.len() as u64).min(record.size);
    tokio::spawn(async move {
        store_on_majority(&node, group, &file, index, chunk)
            .await
            .map_err(UploadError::Replicas)?;
        Ok(end)
    })
}

/// Waits for the oldest chunk in flight; on success `acked` moves to its end.
async fn settle_oldest(
    in_flight: &mut VecDeque<ChunkTask>,
    acked: &mut u64,
    since_commit: &mut u64,
) -> Result<(), UploadError> {
    let Some(h) = in_flight.pop_front() else {
        return Ok(());
    };
    match h.await {
        Ok(Ok(end)) => {
            *acked = end;
            *since_commit += 1;
            Ok(())
        }
        Ok(Err(e)) => {
            // The chunks after a failed one cannot extend the unbroken run; let them end.
            in_flight.clear();
            Err(e)
        }
        Err(e) => Err(UploadError::Internal(e.to_string())),
    }
}

/// Waits for every chunk in flight, extending `acked` over the unbroken run that made it.
async fn drain(in_flight: &mut VecDeque<ChunkTask>, acked: &mut u64) {
    let mut n = 0;
    while !in_flight.is_empty() {
        if settle_oldest(in_flight, acked, &mut n).await.is_err() {
            break;
        }
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Stores chunk `index` on every replica of `group` at once; returns once a majority
/// stored it (each with an fdatasync). The other replicas' calls go on by themselves.
async fn store_on_majority(
    node: &Arc<Node>,
    group: u64,
    file: &str,
    index: u32,
    chunk: Vec<u8>,
) -> Result<(), String> {
    let replicas = node
        .partition_replicas(group)
        .filter(|r| !r.is_empty())
        .ok_or_else(|| format!("partition {group} has no replicas"))?;
    let need = replicas.len() / 2 + 1;
    let (tx, mut rx) = tokio::sync::mpsc::channel(replicas.len().max(1));
    // Encoded once for every remote replica (the chunk is copied into the frame, once).
    let req = NodeRequest::PutChunk {
        group,
        file: file.to_string(),
        index,
        bytes: chunk,
    };
    let frame = Node::call_frame(&req).map_err(|e| e.to_string())?;
    let NodeRequest::PutChunk { bytes: chunk, .. } = req else {
        return Err("unreachable: the request is a PutChunk".into());
    };
    let chunk = Arc::new(chunk);
    for r in &replicas {
        let (node, tx, chunk, frame, file, r) = (
            node.clone(),
            tx.clone(),
            chunk.clone(),
            frame.clone(),
            file.to_string(),
            *r,
        );
        tokio::spawn(async move {
            let reply = if r == node.id {
                node.put_chunk(group, &file, index, &chunk).await
            } else {
                drop(chunk);
                match node.peer(r) {
                    None => NodeReply::Failed(format!("node {r} is not a known peer")),
                    Some(p) => node
                        .call_frame_to(
                            p.cluster_addr,
                            frame,
                            Duration::from_millis(CHUNK_CALL_TIMEOUT_MS),
                        )
                        .await
                        .unwrap_or_else(|e| NodeReply::Failed(e.to_string())),
                }
            };
            let _ = tx.send((r, reply)).await;
        });
    }
    drop(tx);
    let (mut stored, mut failed) = (0, Vec::new());
    while let Some((r, reply)) = rx.recv().await {
        match reply {
            NodeReply::Delivered => {
                stored += 1;
                if stored >= need {
                    return Ok(());
                }
            }
            other => {
                failed.push(format!("node {r}: {other:?}"));
                if failed.len() > replicas.len() - need {
                    break;
                }
            }
        }
    }
    Err(format!(
        "chunk {index} of {file} reached {stored} of the {need} replicas it needs: {}",
        failed.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn one_request_per_file_and_at_most_max_in_all() {
        let u = Uploads::default();
        let a = u.start("f:a", 2).unwrap();
        assert_eq!(u.start("f:a", 2).err(), Some(Busy::SameFile));
        let b = u.start("f:b", 2).unwrap();
        assert_eq!(u.start("f:c", 2).err(), Some(Busy::Full), "the bound");
        drop(a);
        assert_eq!(u.len(), 1);
        let _c = u.start("f:c", 2).unwrap();
        drop(b);
        assert!(u.start("f:a", 2).is_ok(), "a place is freed on drop");
    }
}
