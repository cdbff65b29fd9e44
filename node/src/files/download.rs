//! The read side of files: a chunk from this node's copy or another replica's, a byte
//! range streamed chunk by chunk, and the headers of a download (`Range`,
//! `Content-Disposition`).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, HeaderMap, HeaderValue};
use chatd_chat::FileRecord;
use chatd_storage::Cf;

use super::chunk_key;
use super::upload::CHUNK_CALL_TIMEOUT_MS;
use crate::node::{Node, NodeReply, NodeRequest};

/// Chunk `index` of `file` (`expect` bytes): this node's copy, else another replica's.
pub(crate) async fn fetch_chunk(
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
    fetch_remote_chunk(node, group, file, index, expect).await
}

/// Chunk `index` of `file` (`expect` bytes) from another node: the replicas of `group`
/// first, then every other node (a replica that moved away keeps its chunks for
/// `files.unhosted_grace_ms`): the first that has it.
pub(crate) async fn fetch_remote_chunk(
    node: &Node,
    group: u64,
    file: &str,
    index: u32,
    expect: usize,
) -> Result<Vec<u8>, String> {
    let mut order = node.partition_replicas(group).unwrap_or_default();
    if let Some(m) = node.meta.membership() {
        for (id, n) in &m.nodes {
            if !order.contains(id) && n.state != chatd_membership::NodeState::Removed {
                order.push(*id);
            }
        }
    }
    let mut tried = Vec::new();
    for r in order.into_iter().filter(|r| *r != node.id) {
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
            Ok(NodeReply::Chunk(Some(c))) => {
                tried.push(format!("node {r}: {} bytes, not {expect}", c.len()))
            }
            Ok(NodeReply::Chunk(None)) => tried.push(format!("node {r}: not there")),
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

/// `Content-Disposition` for a download of `name`: as is when it is printable ASCII, else
/// with an ASCII stand-in and the UTF-8 name percent-encoded (RFC 6266, RFC 8187).
pub(super) fn disposition(name: &str) -> String {
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
pub(super) fn set(h: &mut HeaderMap, name: header::HeaderName, value: String) {
    if let Ok(v) = HeaderValue::from_str(&value) {
        h.insert(name, v);
    }
}

/// The bytes `start..=end` of `record`'s file, a chunk at a time.
pub(super) fn chunks(
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
}
