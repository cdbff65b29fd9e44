//! `POST /v1/files` and `GET /v1/files/{id}` (docs/files.md, docs/protocol.md §2).
//!
//! An upload streams: the body is read a chunk at a time, hashed as it goes, and each chunk
//! is sent to every replica of the file's home partition, at most `files.chunks_in_flight`
//! chunks ahead of the last one a majority stored. The answer comes once every chunk is on
//! a majority (each replica synced it) and the record is complete in Raft. A download
//! streams the chunks back, this node's own copy first, else another replica's.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chatd_chat::{ChatCommand, ChatReply, FileRecord};
use chatd_storage::Cf;
use futures::StreamExt;
use serde::Serialize;

use super::{chunk_key, is_file_id, new_file_id};
use crate::gateway::{chat_group, now_ms};
use crate::node::{Node, NodeReply, NodeRequest, ProposeError};
use crate::queries::{ChatQuery, ChatQueryReply};

/// Longest wait for one replica to store (or return) one chunk.
const CHUNK_CALL_TIMEOUT_MS: u64 = 10_000;
/// Longest file name kept, in bytes.
pub const FILE_NAME_BYTES_MAX: usize = 255;
/// Longest media type kept, in bytes.
pub const MIME_BYTES_MAX: usize = 127;
/// The header naming the uploaded file (UTF-8, percent-encoding not decoded).
pub const FILE_NAME_HEADER: &str = "x-file-name";

/// An error answer: `{code, message}` with its status.
fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    #[derive(Serialize)]
    struct ApiError<'a> {
        code: &'a str,
        message: String,
    }
    (
        status,
        Json(ApiError {
            code,
            message: message.into(),
        }),
    )
        .into_response()
}

fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "unknown_file", "no such file")
}

/// The user whose token the request carries, if it is a known, enabled user's.
async fn user_of(node: &Node, headers: &HeaderMap) -> Option<String> {
    let token = headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")?;
    node.user_by_token_caught_up(&crate::auth::sha256_hex(token.trim()))
        .await
}

/// What an upload answers.
#[derive(Debug, Serialize)]
pub struct Uploaded {
    pub file_id: String,
    pub size: u64,
    pub sha256: String,
    pub mime: String,
    pub name: String,
}

/// The media type the upload names (`Content-Type`), or `application/octet-stream`.
fn mime_of(headers: &HeaderMap) -> Result<String, String> {
    let Some(v) = headers.get(header::CONTENT_TYPE) else {
        return Ok("application/octet-stream".into());
    };
    let v = v
        .to_str()
        .map_err(|_| "Content-Type is not ASCII".to_string())?;
    if v.is_empty() || v.len() > MIME_BYTES_MAX || v.bytes().any(|b| b.is_ascii_control()) {
        return Err(format!(
            "Content-Type must be 1-{MIME_BYTES_MAX} printable bytes"
        ));
    }
    Ok(v.to_string())
}

/// The file name the upload names (`X-File-Name`), or `file`.
fn name_of(headers: &HeaderMap) -> Result<String, String> {
    let Some(v) = headers.get(FILE_NAME_HEADER) else {
        return Ok("file".into());
    };
    let v = std::str::from_utf8(v.as_bytes()).map_err(|_| "X-File-Name is not UTF-8")?;
    if v.is_empty()
        || v.len() > FILE_NAME_BYTES_MAX
        || v.chars()
            .any(|c| c.is_control() || matches!(c, '/' | '\\' | '"'))
    {
        return Err(format!(
            "X-File-Name must be 1-{FILE_NAME_BYTES_MAX} bytes without control characters, \
             slashes or quotes"
        ));
    }
    Ok(v.to_string())
}

async fn propose_file(node: &Node, group: u64, cmd: &ChatCommand) -> Result<(), Response> {
    let bytes = chatd_codec::encode(cmd)
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let reply = node.propose(group, bytes).await.map_err(propose_failed)?;
    match chatd_codec::decode::<ChatReply>(&reply.response) {
        Ok(ChatReply::Done { .. }) => Ok(()),
        Ok(ChatReply::Rejected { code, message }) => {
            Err(error(StatusCode::CONFLICT, &code, message))
        }
        Ok(other) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("unexpected reply {other:?}"),
        )),
        Err(e) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            e.to_string(),
        )),
    }
}

fn propose_failed(e: ProposeError) -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        chatd_proto::code::UNAVAILABLE,
        e.to_string(),
    )
}

/// `POST /v1/files`: see the module doc.
pub async fn upload(State(node): State<Arc<Node>>, headers: HeaderMap, body: Body) -> Response {
    let Some(user) = user_of(&node, &headers).await else {
        return error(
            StatusCode::UNAUTHORIZED,
            chatd_proto::code::UNAUTHORIZED,
            "unknown or disabled token",
        );
    };
    let cfg = &node.config.files;
    // HTTP/1.1: a request with neither Content-Length nor Transfer-Encoding has no body
    // (RFC 9112 §6.3): an empty file. A body of unknown length (chunked) is refused: the
    // size must be known before the first byte is stored.
    let size = match headers.get(header::CONTENT_LENGTH) {
        Some(v) => match v.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) {
            Some(n) => n,
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    chatd_proto::code::INVALID_FIELD,
                    "Content-Length is not a number",
                )
            }
        },
        None if headers.contains_key(header::TRANSFER_ENCODING) => {
            return error(
                StatusCode::LENGTH_REQUIRED,
                "length_required",
                "an upload needs a Content-Length",
            )
        }
        None => 0,
    };
    if size > cfg.max_bytes {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            chatd_proto::code::TOO_LARGE,
            format!("{size} bytes exceeds files.max_bytes {}", cfg.max_bytes),
        );
    }
    let (mime, name) = match (mime_of(&headers), name_of(&headers)) {
        (Ok(m), Ok(n)) => (m, n),
        (Err(e), _) | (_, Err(e)) => {
            return error(StatusCode::BAD_REQUEST, chatd_proto::code::INVALID_FIELD, e)
        }
    };
    let file = new_file_id();
    let group = chat_group(&node, &file);
    let record = FileRecord {
        id: file.clone(),
        owner: user,
        size,
        mime: mime.clone(),
        name: name.clone(),
        chunk_bytes: cfg.chunk_bytes,
        offset: 0,
        sha256: None,
        created_ms: now_ms(),
    };
    if let Err(r) = propose_file(&node, group, &ChatCommand::FileBegin(record)).await {
        return r;
    }
    match receive(&node, group, &file, size, body).await {
        Ok(sha256) => {
            let done = propose_file(
                &node,
                group,
                &ChatCommand::FileProgress {
                    file: file.clone(),
                    offset: size,
                },
            )
            .await;
            let done = match done {
                Ok(()) => {
                    propose_file(
                        &node,
                        group,
                        &ChatCommand::FileComplete {
                            file: file.clone(),
                            sha256: sha256.clone(),
                        },
                    )
                    .await
                }
                Err(r) => Err(r),
            };
            match done {
                Ok(()) => (
                    StatusCode::CREATED,
                    Json(Uploaded {
                        file_id: file,
                        size,
                        sha256,
                        mime,
                        name,
                    }),
                )
                    .into_response(),
                Err(r) => r,
            }
        }
        Err(r) => {
            // Nothing of a failed upload stays readable: its record goes (its chunks are
            // collected with it).
            if let Err(e) = propose_file(&node, group, &ChatCommand::FileDrop { file }).await {
                tracing::warn!(status = %e.status(), "a failed upload's record was not dropped");
            }
            r
        }
    }
}

/// Reads the body, stores it chunk by chunk on a majority of `group`'s replicas, and
/// returns its SHA-256; an error answer when the body is not `size` bytes or a chunk
/// cannot reach a majority.
async fn receive(
    node: &Arc<Node>,
    group: u64,
    file: &str,
    size: u64,
    body: Body,
) -> Result<String, Response> {
    let chunk_bytes = node.config.files.chunk_bytes as usize;
    let in_flight_max = node.config.files.chunks_in_flight;
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut received: u64 = 0;
    let mut buf: Vec<u8> = Vec::with_capacity(chunk_bytes);
    let mut index: u32 = 0;
    let mut in_flight: VecDeque<tokio::task::JoinHandle<Result<(), String>>> = VecDeque::new();
    let mismatch = |got: u64| {
        error(
            StatusCode::BAD_REQUEST,
            "length_mismatch",
            format!("the body has {got} bytes or more, Content-Length said {size}"),
        )
    };
    let mut stream = body.into_data_stream();
    let push =
        |buf: &mut Vec<u8>,
         index: &mut u32,
         in_flight: &mut VecDeque<tokio::task::JoinHandle<Result<(), String>>>| {
            let chunk = std::mem::replace(buf, Vec::with_capacity(chunk_bytes));
            let (node, file, i) = (node.clone(), file.to_string(), *index);
            in_flight.push_back(tokio::spawn(async move {
                store_on_majority(&node, group, &file, i, chunk).await
            }));
            *index += 1;
        };
    loop {
        // At the bound, wait for the oldest chunk before reading more.
        while in_flight.len() >= in_flight_max {
            if let Some(h) = in_flight.pop_front() {
                chunk_stored(h).await?;
            }
        }
        let Some(next) = stream.next().await else {
            break;
        };
        let data = next.map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                "body_error",
                format!("the upload's body broke off: {e}"),
            )
        })?;
        received += data.len() as u64;
        if received > size {
            return Err(mismatch(received));
        }
        hash.update(&data);
        let mut rest: &[u8] = &data;
        while !rest.is_empty() {
            let take = (chunk_bytes - buf.len()).min(rest.len());
            buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if buf.len() == chunk_bytes {
                push(&mut buf, &mut index, &mut in_flight);
                while in_flight.len() > in_flight_max {
                    if let Some(h) = in_flight.pop_front() {
                        chunk_stored(h).await?;
                    }
                }
            }
        }
    }
    if received != size {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "length_mismatch",
            format!("the body has {received} bytes, Content-Length said {size}"),
        ));
    }
    if !buf.is_empty() {
        push(&mut buf, &mut index, &mut in_flight);
    }
    while let Some(h) = in_flight.pop_front() {
        chunk_stored(h).await?;
    }
    Ok(hex(hash.finish().as_ref()))
}

async fn chunk_stored(h: tokio::task::JoinHandle<Result<(), String>>) -> Result<(), Response> {
    match h.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            chatd_proto::code::UNAVAILABLE,
            e,
        )),
        Err(e) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            e.to_string(),
        )),
    }
}

fn hex(bytes: &[u8]) -> String {
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

/// Chunk `index` of `file` (`expect` bytes): this node's copy, else another replica's.
async fn fetch_chunk(
    node: &Arc<Node>,
    group: u64,
    file: &str,
    index: u32,
    expect: usize,
) -> Result<Vec<u8>, String> {
    let key = chunk_key(group, file, index);
    if let Ok(Some(c)) = node.store.get(Cf::Blobs, &key) {
        if c.len() == expect {
            return Ok(c);
        }
    }
    let replicas = node.partition_replicas(group).unwrap_or_default();
    let mut tried = Vec::new();
    for r in replicas.into_iter().filter(|r| *r != node.id) {
        let Some(p) = node.peer(r) else {
            continue;
        };
        let req = NodeRequest::GetChunk {
            group,
            file: file.to_string(),
            index,
        };
        match node
            .call(
                p.cluster_addr,
                &req,
                Duration::from_millis(CHUNK_CALL_TIMEOUT_MS),
            )
            .await
        {
            Ok(NodeReply::Chunk(Some(c))) if c.len() == expect => return Ok(c.into_vec()),
            Ok(other) => tried.push(format!("node {r}: {other:?}")),
            Err(e) => tried.push(format!("node {r}: {e}")),
        }
    }
    Err(format!(
        "no replica returned chunk {index} of {file}: {}",
        tried.join("; ")
    ))
}

/// A `Range` header that cannot be served: 416.
#[derive(Debug, PartialEq, Eq)]
pub struct Unsatisfiable;

/// A byte range of a file of `size` bytes, from a `Range` header: `Ok(None)` for the whole
/// file, `Err(Unsatisfiable)` for a range that cannot be served (416). One range only.
pub fn parse_range(header: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
    let Some(h) = header else {
        return Ok(None);
    };
    let spec = h.trim().strip_prefix("bytes=").ok_or(Unsatisfiable)?;
    if spec.contains(',') {
        return Err(Unsatisfiable);
    }
    let (a, b) = spec.split_once('-').ok_or(Unsatisfiable)?;
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        // The last `b` bytes.
        let n: u64 = b.parse().map_err(|_| Unsatisfiable)?;
        if n == 0 || size == 0 {
            return Err(Unsatisfiable);
        }
        (size.saturating_sub(n), size - 1)
    } else {
        let start: u64 = a.parse().map_err(|_| Unsatisfiable)?;
        let end: u64 = if b.is_empty() {
            size.checked_sub(1).ok_or(Unsatisfiable)?
        } else {
            b.parse::<u64>()
                .map_err(|_| Unsatisfiable)?
                .min(size.saturating_sub(1))
        };
        (start, end)
    };
    if start >= size || end < start {
        return Err(Unsatisfiable);
    }
    Ok(Some((start, end)))
}

/// `GET /v1/files/{id}`: see the module doc. The owner may read a complete file; anyone
/// else, and every incomplete or unknown file, gets 404.
pub async fn download(
    State(node): State<Arc<Node>>,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(user) = user_of(&node, &headers).await else {
        return error(
            StatusCode::UNAUTHORIZED,
            chatd_proto::code::UNAUTHORIZED,
            "unknown or disabled token",
        );
    };
    if !is_file_id(&file) {
        return not_found();
    }
    let group = chat_group(&node, &file);
    let record = match node
        .query(group, ChatQuery::File { file: file.clone() })
        .await
    {
        Ok(ChatQueryReply::File(Some(r))) => r,
        Ok(_) => return not_found(),
        Err(e) => return propose_failed(e),
    };
    let Some(sha256) = record.sha256.clone() else {
        return not_found();
    };
    if record.owner != user {
        return not_found();
    }
    let etag = format!("\"{sha256}\"");
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    let range = parse_range(
        headers.get(header::RANGE).and_then(|v| v.to_str().ok()),
        record.size,
    );
    let (status, start, end) = match range {
        Ok(None) => (StatusCode::OK, 0, record.size.saturating_sub(1)),
        Ok(Some((s, e))) => (StatusCode::PARTIAL_CONTENT, s, e),
        Err(Unsatisfiable) => {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{}", record.size))],
            )
                .into_response()
        }
    };
    let length = if record.size == 0 { 0 } else { end - start + 1 };
    let body = if length == 0 {
        Body::empty()
    } else {
        Body::from_stream(chunks(node.clone(), group, record.clone(), start, end))
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    set(h, header::CONTENT_TYPE, record.mime.clone());
    set(h, header::CONTENT_LENGTH, length.to_string());
    set(h, header::ETAG, etag);
    set(h, header::ACCEPT_RANGES, "bytes".into());
    set(h, header::CONTENT_DISPOSITION, disposition(&record.name));
    if status == StatusCode::PARTIAL_CONTENT {
        set(
            h,
            header::CONTENT_RANGE,
            format!("bytes {start}-{end}/{}", record.size),
        );
    }
    response
}

/// `Content-Disposition` for a download of `name`: as is when it is printable ASCII, else
/// with an ASCII stand-in and the UTF-8 name percent-encoded (RFC 6266, RFC 8187).
fn disposition(name: &str) -> String {
    if name.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return format!("attachment; filename=\"{name}\"");
    }
    let encoded: String = name
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!("attachment; filename=\"file\"; filename*=UTF-8''{encoded}")
}

/// Sets header `name` to `value` (dropped if it is not a valid header value; every value
/// set here is checked on upload or made of digits).
fn set(h: &mut HeaderMap, name: header::HeaderName, value: String) {
    if let Ok(v) = HeaderValue::from_str(&value) {
        h.insert(name, v);
    }
}

/// The bytes `start..=end` of `record`'s file, a chunk at a time.
fn chunks(
    node: Arc<Node>,
    group: u64,
    record: FileRecord,
    start: u64,
    end: u64,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    let cb = u64::from(record.chunk_bytes.max(1));
    let first = start / cb;
    let last = end / cb;
    futures::stream::unfold(Some(first), move |next| {
        let (node, record) = (node.clone(), record.clone());
        async move {
            let i = next?;
            if i > last {
                return None;
            }
            let chunk_start = i * cb;
            let expect = (record.size - chunk_start).min(cb) as usize;
            let index = u32::try_from(i).ok()?;
            match fetch_chunk(&node, group, &record.id, index, expect).await {
                Ok(c) => {
                    let from = start.saturating_sub(chunk_start) as usize;
                    let to = ((end - chunk_start + 1).min(expect as u64)) as usize;
                    let part = Bytes::from(c).slice(from..to);
                    Some((Ok(part), Some(i + 1)))
                }
                Err(e) => {
                    tracing::warn!(file = %record.id, chunk = i, error = %e, "a download broke off");
                    Some((Err(std::io::Error::other(e)), None))
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn ranges_are_parsed_clamped_and_refused_as_http_says() {
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-3"), 10), Ok(Some((0, 3))));
        assert_eq!(parse_range(Some("bytes=4-"), 10), Ok(Some((4, 9))));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Ok(Some((7, 9))));
        assert_eq!(parse_range(Some("bytes=-30"), 10), Ok(Some((0, 9))));
        assert_eq!(parse_range(Some("bytes=5-100"), 10), Ok(Some((5, 9))));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=5-4"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("items=0-1"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=-0"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=0-0"), 0), Err(Unsatisfiable));
    }

    #[test]
    fn disposition_keeps_ascii_names_and_encodes_the_others() {
        assert_eq!(disposition("a b.pdf"), "attachment; filename=\"a b.pdf\"");
        assert_eq!(
            disposition("é.png"),
            "attachment; filename=\"file\"; filename*=UTF-8''%C3%A9.png"
        );
        assert!(HeaderValue::from_str(&disposition("日本.txt")).is_ok());
    }

    #[test]
    fn names_and_types_are_checked() {
        let mut h = HeaderMap::new();
        assert_eq!(name_of(&h).unwrap(), "file");
        assert_eq!(mime_of(&h).unwrap(), "application/octet-stream");
        h.insert(FILE_NAME_HEADER, HeaderValue::from_static("cat.png"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
        assert_eq!(name_of(&h).unwrap(), "cat.png");
        assert_eq!(mime_of(&h).unwrap(), "image/png");
        h.insert(FILE_NAME_HEADER, HeaderValue::from_static("../etc/passwd"));
        assert!(name_of(&h).is_err());
        h.insert(FILE_NAME_HEADER, HeaderValue::from_static("a\"b"));
        assert!(name_of(&h).is_err());
        let long = "x".repeat(FILE_NAME_BYTES_MAX + 1);
        h.insert(FILE_NAME_HEADER, HeaderValue::from_str(&long).unwrap());
        assert!(name_of(&h).is_err());
    }
}
