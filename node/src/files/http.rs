//! The HTTP file API (docs/files.md, docs/protocol.md §2): `POST /v1/files` (an upload in
//! one request, or the creation of a resumable one), `PATCH /v1/files/{id}` (more bytes at
//! the committed offset, tus-style), `HEAD /v1/files/{id}` (where an upload stands) and
//! `GET /v1/files/{id}` (a download, with ranges). The write path is in `upload`, the read
//! path in `download`.

// The helpers below return the answer a handler gives when a check fails; it is built once
// and returned at once, so its size does not matter.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chatd_chat::{FileRecord, FileState};
use serde::Serialize;

use super::download::{chunks, disposition, parse_range, set, Unsatisfiable};
use super::upload::{propose_file, write, Busy, UploadError, Written};
use super::{is_file_id, new_file_id};
use crate::gateway::{chat_group, now_ms};
use crate::node::{Node, ProposeError};
use crate::queries::{ChatQuery, ChatQueryReply};

/// Longest file name kept, in bytes.
pub const FILE_NAME_BYTES_MAX: usize = 255;
/// Longest media type kept, in bytes.
pub const MIME_BYTES_MAX: usize = 127;
/// The header naming the uploaded file (UTF-8, percent-encoding not decoded).
pub const FILE_NAME_HEADER: &str = "x-file-name";
/// The committed resume point of an upload (tus's header): sent with `PATCH`, answered by
/// `HEAD`, `POST` and `PATCH`.
pub const UPLOAD_OFFSET_HEADER: &str = "upload-offset";
/// The whole file's size on a `POST` that creates a resumable upload (tus's header).
pub const UPLOAD_LENGTH_HEADER: &str = "upload-length";
/// Seconds a client waits before retrying an upload refused because the node is full.
const RETRY_AFTER_SECS: u32 = 1;

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

fn invalid(message: impl Into<String>) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        chatd_proto::code::INVALID_FIELD,
        message,
    )
}

fn unavailable(e: ProposeError) -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        chatd_proto::code::UNAVAILABLE,
        e.to_string(),
    )
}

fn upload_failed(e: UploadError) -> Response {
    match e {
        UploadError::Body(m) => error(StatusCode::BAD_REQUEST, "length_mismatch", m),
        UploadError::Replicas(m) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            chatd_proto::code::UNAVAILABLE,
            m,
        ),
        UploadError::Propose(e) => unavailable(e),
        UploadError::Rejected { code, message } => error(StatusCode::CONFLICT, &code, message),
        UploadError::Internal(m) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", m),
    }
}

fn busy(b: Busy, file: &str) -> Response {
    match b {
        Busy::SameFile => error(
            StatusCode::CONFLICT,
            "upload_busy",
            format!("another request is writing {file} on this node"),
        ),
        Busy::Full => {
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_uploads",
                "this node serves files.uploads_max uploads already",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            r
        }
    }
}

/// The user whose token the request carries, if it is a known, enabled user's.
async fn user_of(node: &Node, headers: &HeaderMap) -> Result<String, Response> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let user = match token {
        Some(t) => {
            node.user_by_token_caught_up(&crate::auth::sha256_hex(t.trim()))
                .await
        }
        None => None,
    };
    user.ok_or_else(|| {
        error(
            StatusCode::UNAUTHORIZED,
            chatd_proto::code::UNAUTHORIZED,
            "unknown or disabled token",
        )
    })
}

/// What an upload request answers: the file as it stands.
#[derive(Debug, Serialize)]
pub struct FileAnswer {
    pub file_id: String,
    pub size: u64,
    /// The committed resume point (`size` once complete).
    pub offset: u64,
    /// Present once every byte is stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub mime: String,
    pub name: String,
}

fn answer(status: StatusCode, record: &FileRecord, written: Option<Written>) -> Response {
    let (offset, sha256) = match written {
        Some(w) => (w.offset, w.sha256.or_else(|| record.sha256.clone())),
        None => (record.offset, record.sha256.clone()),
    };
    let mut r = (
        status,
        Json(FileAnswer {
            file_id: record.id.clone(),
            size: record.size,
            offset,
            sha256,
            mime: record.mime.clone(),
            name: record.name.clone(),
        }),
    )
        .into_response();
    let h = r.headers_mut();
    set(h, header::LOCATION, format!("/v1/files/{}", record.id));
    set(h, header::CACHE_CONTROL, "no-store".into());
    h.insert(UPLOAD_OFFSET_HEADER, HeaderValue::from(offset));
    r
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
    check_file_name(v).map_err(|e| format!("X-File-Name {e}"))?;
    Ok(v.to_string())
}

/// A file name's rule: 1 to [`FILE_NAME_BYTES_MAX`] bytes without control characters,
/// slashes or quotes (it ends up in `Content-Disposition` and in people's file systems).
pub fn check_file_name(v: &str) -> Result<(), String> {
    if v.is_empty()
        || v.len() > FILE_NAME_BYTES_MAX
        || v.chars()
            .any(|c| c.is_control() || matches!(c, '/' | '\\' | '"'))
    {
        return Err(format!(
            "must be 1-{FILE_NAME_BYTES_MAX} bytes without control characters, slashes or \
             quotes"
        ));
    }
    Ok(())
}

/// A header holding a number of bytes, if present.
fn bytes_header(headers: &HeaderMap, name: &str) -> Result<Option<u64>, Response> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| invalid(format!("{name} is not a number"))),
    }
}

/// The body's length. HTTP/1.1: a request with neither `Content-Length` nor
/// `Transfer-Encoding` has no body (RFC 9112 §6.3). A body of unknown length (chunked) is
/// refused: what is stored must be known before the first byte is.
fn body_length(headers: &HeaderMap) -> Result<u64, Response> {
    match bytes_header(headers, header::CONTENT_LENGTH.as_str())? {
        Some(n) => Ok(n),
        None if headers.contains_key(header::TRANSFER_ENCODING) => Err(error(
            StatusCode::LENGTH_REQUIRED,
            "length_required",
            "an upload needs a Content-Length",
        )),
        None => Ok(0),
    }
}

/// `POST /v1/files`. Without `Upload-Length`, the body is the whole file and a failure
/// leaves nothing (the record is dropped). With `Upload-Length: N`, the upload is
/// resumable: the body (possibly empty) is its first bytes, and what a majority stored
/// stays for a `PATCH` to continue.
pub async fn upload(State(node): State<Arc<Node>>, headers: HeaderMap, body: Body) -> Response {
    let user = match user_of(&node, &headers).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let cfg = &node.config.files;
    let len = match body_length(&headers) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let declared = match bytes_header(&headers, UPLOAD_LENGTH_HEADER) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let size = declared.unwrap_or(len);
    if size > cfg.max_bytes {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            chatd_proto::code::TOO_LARGE,
            format!("{size} bytes exceeds files.max_bytes {}", cfg.max_bytes),
        );
    }
    if len > size {
        return error(
            StatusCode::BAD_REQUEST,
            "length_mismatch",
            format!("a body of {len} bytes does not fit Upload-Length {size}"),
        );
    }
    let (mime, name) = match (mime_of(&headers), name_of(&headers)) {
        (Ok(m), Ok(n)) => (m, n),
        (Err(e), _) | (_, Err(e)) => return invalid(e),
    };
    let file = new_file_id();
    let _writing = match node.uploads.start(&file, cfg.uploads_max) {
        Ok(w) => w,
        Err(b) => return busy(b, &file),
    };
    let group = chat_group(&node, &file);
    // Charged before the record exists: a file never holds bytes its owner was not
    // charged for (a charge whose file never came is refunded by the reconciler).
    match super::dedup::charge(&node, &user, &file, size).await {
        Ok(()) => {}
        Err(UploadError::Rejected { code, message }) if code == "quota_exceeded" => {
            return error(StatusCode::PAYLOAD_TOO_LARGE, &code, message)
        }
        Err(e) => return upload_failed(e),
    }
    let record = FileRecord {
        id: file.clone(),
        owner: user,
        size,
        mime,
        name,
        chunk_bytes: cfg.chunk_bytes,
        offset: 0,
        sha256: None,
        created_ms: now_ms(),
    };
    if let Err(e) = propose_file(
        &node,
        group,
        &chatd_chat::ChatCommand::FileBegin(record.clone()),
    )
    .await
    {
        super::dedup::refund(&node, &record.owner, &file).await;
        return upload_failed(e);
    }
    if len == 0 && size > 0 {
        return answer(StatusCode::CREATED, &record, None);
    }
    let resumable = declared.is_some();
    match write(node.clone(), group, record.clone(), 0, len, body, resumable).await {
        Ok(w) => answer(StatusCode::CREATED, &record, Some(w)),
        Err(e) => upload_failed(e),
    }
}

/// The record of `file` if `user` may see it (its owner), else the answer to give.
async fn owned_record(node: &Node, user: &str, file: &str) -> Result<(u64, FileRecord), Response> {
    readable_record(node, user, file, None)
        .await
        .map(|(group, record, _)| (group, record))
}

/// The query of a download: the chat through which the reader may read the file.
#[derive(Debug, serde::Deserialize)]
pub struct ReadQuery {
    pub chat: Option<String>,
}

/// The query string of a download, or the answer to a malformed one.
fn read_query(
    q: Result<Query<ReadQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Option<String>, Response> {
    match q {
        Ok(Query(q)) => Ok(q.chat),
        Err(e) => Err(invalid(format!("bad query string: {e}"))),
    }
}

/// The record of `file` if `user` may read it: its owner, or, with `chat`, a reader of a
/// message of that chat carrying it (the chat's partition decides, by the user's span).
/// Everything else, a file that does not exist and one its owner let go (collected) are
/// the same 404.
async fn readable_record(
    node: &Node,
    user: &str,
    file: &str,
    chat: Option<&str>,
) -> Result<(u64, FileRecord, FileState), Response> {
    if !is_file_id(file) {
        return Err(not_found());
    }
    let group = chat_group(node, file);
    let (record, state) = match node
        .query(
            group,
            ChatQuery::FileEntry {
                file: file.to_string(),
            },
        )
        .await
    {
        Ok(ChatQueryReply::FileEntry(Some(r))) => r,
        Ok(_) => return Err(not_found()),
        Err(e) => return Err(unavailable(e)),
    };
    if state.released_ms.is_some() {
        return Err(not_found());
    }
    if record.owner == user {
        return Ok((group, record, state));
    }
    let Some(chat) = chat else {
        return Err(not_found());
    };
    if !record.complete() || chat.len() > chatd_proto::CHAT_ID_BYTES_MAX {
        return Err(not_found());
    }
    match node
        .query(
            chat_group(node, chat),
            ChatQuery::FileAccess {
                chat: chat.to_string(),
                file: file.to_string(),
                user: user.to_string(),
            },
        )
        .await
    {
        Ok(ChatQueryReply::Allowed(true)) => Ok((group, record, state)),
        Ok(_) => Err(not_found()),
        Err(e) => Err(unavailable(e)),
    }
}

/// `PATCH /v1/files/{id}`: `Upload-Offset` (the committed resume point, as `HEAD` says)
/// and `Content-Length` bytes from there. Answers the file as it stands with the new
/// `Upload-Offset`; 409 `offset_mismatch` (with the current `Upload-Offset`) when the
/// offset is not the resume point.
pub async fn resume(
    State(node): State<Arc<Node>>,
    Path(file): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let user = match user_of(&node, &headers).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let len = match body_length(&headers) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let offset = match bytes_header(&headers, UPLOAD_OFFSET_HEADER) {
        Ok(Some(o)) => o,
        Ok(None) => return invalid("a PATCH needs Upload-Offset"),
        Err(r) => return r,
    };
    let (group, record) = match owned_record(&node, &user, &file).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let conflict = |code: &str, message: String| {
        let mut r = error(StatusCode::CONFLICT, code, message);
        r.headers_mut()
            .insert(UPLOAD_OFFSET_HEADER, HeaderValue::from(record.offset));
        r
    };
    if record.complete() {
        // The retry of a request that completed the file (its answer was lost).
        if offset == record.size && len == 0 {
            return answer(StatusCode::OK, &record, None);
        }
        return conflict("complete", format!("{file} is complete"));
    }
    if offset != record.offset {
        return conflict(
            "offset_mismatch",
            format!(
                "Upload-Offset {offset} is not the upload's resume point {}",
                record.offset
            ),
        );
    }
    if offset + len > record.size {
        return error(
            StatusCode::BAD_REQUEST,
            "length_mismatch",
            format!(
                "{len} bytes at {offset} run past the file's {} bytes",
                record.size
            ),
        );
    }
    let _writing = match node.uploads.start(&file, node.config.files.uploads_max) {
        Ok(w) => w,
        Err(b) => return busy(b, &file),
    };
    match write(node.clone(), group, record.clone(), offset, len, body, true).await {
        Ok(w) => answer(StatusCode::OK, &record, Some(w)),
        Err(e) => upload_failed(e),
    }
}

/// `HEAD /v1/files/{id}`: where the upload stands (`Upload-Offset`, `Upload-Length`) and,
/// once complete, a download's headers without its body.
pub async fn status(
    State(node): State<Arc<Node>>,
    Path(file): Path<String>,
    query: Result<Query<ReadQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let user = match user_of(&node, &headers).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let chat = match read_query(query) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let record = match readable_record(&node, &user, &file, chat.as_deref()).await {
        Ok((_, r, _)) => r,
        Err(r) => return r,
    };
    let mut response = Response::new(Body::empty());
    let h = response.headers_mut();
    h.insert(UPLOAD_OFFSET_HEADER, HeaderValue::from(record.offset));
    h.insert(UPLOAD_LENGTH_HEADER, HeaderValue::from(record.size));
    set(h, header::CACHE_CONTROL, "no-store".into());
    if let Some(sha256) = &record.sha256 {
        download_headers(h, &record, sha256, record.size);
    }
    response
}

/// Thumbnails being made on this node ([`super::thumbnail::THUMBNAILS_IN_FLIGHT_MAX`]).
static THUMBNAILS: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(super::thumbnail::THUMBNAILS_IN_FLIGHT_MAX);

/// `GET /v1/files/{id}/thumbnail[?chat=CHAT]`: who may read the file may read its
/// thumbnail. Made on first request on each node, then served from its own copy.
pub async fn thumbnail(
    State(node): State<Arc<Node>>,
    Path(file): Path<String>,
    query: Result<Query<ReadQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Response {
    use super::thumbnail::{decode_stored, encode_stored, has_thumbnail, make, thumbnail_key};
    let Readable {
        record,
        sha256,
        source_group: group,
        source,
    } = match complete_readable(&node, &headers, &file, query).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    // Made of, and kept with, the bytes' own file (once for every alias of it).
    let file = source.id.clone();
    let none = |why: &str| error(StatusCode::NOT_FOUND, "no_thumbnail", why.to_string());
    if !has_thumbnail(&record) {
        return none("only PNG, JPEG, GIF and WebP images up to 32 MiB have a thumbnail");
    }
    let key = thumbnail_key(group, &file);
    let stored = node
        .store
        .get(chatd_storage::Cf::Blobs, &key)
        .ok()
        .flatten()
        .and_then(|v| decode_stored(&v));
    let thumb = match stored {
        Some(t) => t,
        None => {
            let Ok(_permit) = THUMBNAILS.acquire().await else {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "shutting down",
                );
            };
            let mut bytes = Vec::with_capacity(record.size as usize);
            for i in 0..source.chunks() {
                let len = super::repair::chunk_len(&source, i) as usize;
                let Ok(index) = u32::try_from(i) else {
                    return not_found();
                };
                match super::download::fetch_chunk(&node, group, &file, index, len).await {
                    Ok(c) => bytes.extend_from_slice(&c),
                    Err(e) => {
                        return error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            chatd_proto::code::UNAVAILABLE,
                            e,
                        )
                    }
                }
            }
            let made = tokio::task::spawn_blocking(move || make(&bytes)).await;
            let t = match made {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return none(&e.to_string()),
                Err(e) => {
                    return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                }
            };
            let mut b = chatd_storage::Batch::new();
            node.store
                .batch(&mut b)
                .put(chatd_storage::Cf::Blobs, &key, &encode_stored(&t));
            if let Err(e) = node.store.write(b) {
                tracing::warn!(file, error = %e, "a thumbnail was not kept");
            }
            t
        }
    };
    let mut response = Response::new(Body::from(thumb.bytes));
    let h = response.headers_mut();
    set(h, header::CONTENT_TYPE, thumb.mime.to_string());
    set(h, header::ETAG, format!("\"{sha256}-thumbnail\""));
    set(h, header::CACHE_CONTROL, "private, max-age=86400".into());
    response
}

/// What `GET /v1/quota` answers.
#[derive(Debug, Serialize)]
pub struct Quota {
    pub user: String,
    /// Bytes of the user's files (uploads under way count their declared size).
    pub used_bytes: u64,
    pub files: u64,
    /// `files.user_quota_bytes` of the node that answers.
    pub quota_bytes: u64,
}

/// `GET /v1/quota`: what the token's user holds against the quota.
pub async fn quota(State(node): State<Arc<Node>>, headers: HeaderMap) -> Response {
    let user = match user_of(&node, &headers).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let group = super::dedup::user_group(&node, &user);
    let q = ChatQuery::Quota { user: user.clone() };
    match node.query(group, q).await {
        Ok(ChatQueryReply::Quota(u)) => Json(Quota {
            user,
            used_bytes: u.bytes,
            files: u.files,
            quota_bytes: node.config.files.user_quota_bytes,
        })
        .into_response(),
        Ok(other) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("unexpected {other:?}"),
        ),
        Err(e) => unavailable(e),
    }
}

/// Missing chunk indexes listed by [`local_file`], at most.
pub const LOCAL_MISSING_LISTED_MAX: usize = 64;

/// This node's own copy of a file, for operators (`GET /v1/admin/files/{id}/local`).
#[derive(Debug, Serialize)]
pub struct LocalFile {
    pub node: u64,
    pub file_id: String,
    pub group: u64,
    /// Whether this node hosts the file's partition.
    pub hosted: bool,
    /// The record as applied here.
    pub record: Option<FileRecord>,
    /// Its state as applied here: where its bytes are (dedup), whether it was released.
    pub state: FileState,
    /// Chunks below the committed offset, and how many of them are here.
    pub chunks_needed: u64,
    pub chunks_present: u64,
    /// Chunks of the file held here at all (with or without a record: before the sweep
    /// deletes a dropped file's).
    pub chunks_held: u64,
    /// The first missing ones (at most [`LOCAL_MISSING_LISTED_MAX`]).
    pub missing: Vec<u64>,
}

/// `GET /v1/admin/files/{id}/local`: which chunks of a file this node holds, from its own
/// applied record and chunk marks (no calls to other nodes).
pub async fn local_file(State(node): State<Arc<Node>>, Path(file): Path<String>) -> Response {
    if !is_file_id(&file) {
        return not_found();
    }
    let group = chat_group(&node, &file);
    let record = match chatd_chat::files::read(&node.store, group, &file) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()),
    };
    let state = match chatd_chat::files::read_state(&node.store, group, &file) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()),
    };
    let present = match super::present_chunks(&node.store, group, &file) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()),
    };
    let needed = record.as_ref().map_or(0, |r| {
        if !super::keeps_chunks(&state) {
            0
        } else if r.complete() {
            r.chunks()
        } else {
            r.offset / u64::from(r.chunk_bytes.max(1))
        }
    });
    let mut missing = Vec::new();
    let mut have = 0;
    if let Some(r) = &record {
        for i in 0..needed {
            let ok = u32::try_from(i)
                .ok()
                .and_then(|i| present.get(&i))
                .is_some_and(|l| u64::from(*l) == super::repair::chunk_len(r, i));
            if ok {
                have += 1;
            } else if missing.len() < LOCAL_MISSING_LISTED_MAX {
                missing.push(i);
            }
        }
    }
    Json(LocalFile {
        node: node.id,
        file_id: file,
        group,
        hosted: node.registry.hosts(group),
        record,
        state,
        chunks_needed: needed,
        chunks_present: have,
        chunks_held: present.len() as u64,
        missing,
    })
    .into_response()
}

/// The headers of a download of `length` bytes of `record`.
fn download_headers(h: &mut HeaderMap, record: &FileRecord, sha256: &str, length: u64) {
    set(h, header::CONTENT_TYPE, record.mime.clone());
    set(h, header::CONTENT_LENGTH, length.to_string());
    set(h, header::ETAG, format!("\"{sha256}\""));
    set(h, header::ACCEPT_RANGES, "bytes".into());
    set(h, header::CONTENT_DISPOSITION, disposition(&record.name));
}

/// A complete file a read request may read.
struct Readable {
    /// Its own record (name, type, size, hash).
    record: FileRecord,
    sha256: String,
    /// Where its bytes are: its own partition and record, or, for a file whose bytes are
    /// stored once for several (an alias), the canonical file's.
    source_group: u64,
    source: FileRecord,
}

/// The complete file a read request names, if its user may read it, else the answer to
/// give.
async fn complete_readable(
    node: &Node,
    headers: &HeaderMap,
    file: &str,
    query: Result<Query<ReadQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Readable, Response> {
    let user = user_of(node, headers).await?;
    let chat = read_query(query)?;
    let (group, record, state) = readable_record(node, &user, file, chat.as_deref()).await?;
    let Some(sha256) = record.sha256.clone() else {
        return Err(not_found());
    };
    let canonical = state.source(&record.id);
    if canonical == record.id {
        return Ok(Readable {
            source: record.clone(),
            record,
            sha256,
            source_group: group,
        });
    }
    // The canonical file's record stays while this one holds its content.
    let source_group = chat_group(node, canonical);
    let q = ChatQuery::File {
        file: canonical.to_string(),
    };
    match node.query(source_group, q).await {
        Ok(ChatQueryReply::File(Some(source)))
            if source.sha256.as_deref() == Some(sha256.as_str()) && source.size == record.size =>
        {
            Ok(Readable {
                record,
                sha256,
                source_group,
                source,
            })
        }
        Ok(_) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{file}'s bytes are {canonical}'s, which is missing or differs"),
        )),
        Err(e) => Err(unavailable(e)),
    }
}

/// `GET /v1/files/{id}[?chat=CHAT]`: streamed from this node's copy of each chunk, else
/// another replica's. The owner may read a complete file; with `?chat=`, so may whoever
/// may read a message of that chat carrying it; anyone else, and every incomplete or
/// unknown file, gets 404.
pub async fn download(
    State(node): State<Arc<Node>>,
    Path(file): Path<String>,
    query: Result<Query<ReadQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let Readable {
        record,
        sha256,
        source_group,
        source,
    } = match complete_readable(&node, &headers, &file, query).await {
        Ok(x) => x,
        Err(r) => return r,
    };
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
        Body::from_stream(chunks(node.clone(), source_group, source, start, end))
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    download_headers(h, &record, &sha256, length);
    if status == StatusCode::PARTIAL_CONTENT {
        set(
            h,
            header::CONTENT_RANGE,
            format!("bytes {start}-{end}/{}", record.size),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

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
