//! Files end to end (issue 14, docs/files.md): uploads stream into chunks stored with an
//! fdatasync on a majority of the file's replicas, downloads stream back from any node;
//! bad uploads and reads get their documented errors and leave nothing readable.

use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;

use crate::chat::{cluster3, create_user};
use crate::harness::Cluster;

/// Deterministic bytes that differ in every chunk (a chunk mixed up would show).
pub(crate) fn content(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) async fn upload(
    c: &Cluster,
    via: u64,
    token: &str,
    bytes: Vec<u8>,
    name: &str,
) -> reqwest::Response {
    c.http
        .post(c.url(via, "/v1/files"))
        .bearer_auth(token)
        .header("content-type", "application/pdf")
        .header("x-file-name", name)
        .body(bytes)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap()
}

pub(crate) async fn download(
    c: &Cluster,
    via: u64,
    token: &str,
    file: &str,
    range: Option<&str>,
) -> reqwest::Response {
    let mut r = c
        .http
        .get(c.url(via, &format!("/v1/files/{file}")))
        .bearer_auth(token)
        .timeout(Duration::from_secs(60));
    if let Some(range) = range {
        r = r.header("range", range);
    }
    r.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_upload_on_one_node_download_identical_from_every_node_with_ranges() {
    let c = cluster3(&[]).await;
    let token = create_user(&c, 1, "ann").await;
    // 5 MiB and a bit: five full chunks and a short last one.
    let bytes = content(5 * (1 << 20) + 12_345);
    let sha = sha256_hex(&bytes);
    let r = upload(&c, 1, &token, bytes.clone(), "report.pdf").await;
    assert_eq!(r.status(), 201);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["size"], bytes.len() as u64, "{body}");
    assert_eq!(body["sha256"], sha, "{body}");
    assert_eq!(body["mime"], "application/pdf");
    assert_eq!(body["name"], "report.pdf");
    let file = body["file_id"].as_str().unwrap().to_string();
    for via in 1..=3 {
        let r = download(&c, via, &token, &file, None).await;
        assert_eq!(r.status(), 200, "node {via}");
        let h = r.headers().clone();
        assert_eq!(h["content-type"], "application/pdf");
        assert_eq!(h["etag"], format!("\"{sha}\"").as_str());
        assert_eq!(h["accept-ranges"], "bytes");
        assert_eq!(
            h["content-disposition"],
            "attachment; filename=\"report.pdf\""
        );
        let got = r.bytes().await.unwrap();
        assert_eq!(got.len(), bytes.len(), "node {via}");
        assert_eq!(sha256_hex(&got), sha, "node {via}: different bytes");
    }
    // A range across a chunk boundary, a suffix, and the same ETag answered 304.
    let (a, b) = ((1 << 20) - 10, (1 << 20) + 9);
    let r = download(&c, 2, &token, &file, Some(&format!("bytes={a}-{b}"))).await;
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes {a}-{b}/{}", bytes.len()).as_str()
    );
    assert_eq!(r.bytes().await.unwrap().as_ref(), &bytes[a..=b]);
    let r = download(&c, 3, &token, &file, Some("bytes=-100")).await;
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.bytes().await.unwrap().as_ref(),
        &bytes[bytes.len() - 100..]
    );
    let r = download(
        &c,
        1,
        &token,
        &file,
        Some(&format!("bytes={}-", bytes.len())),
    )
    .await;
    assert_eq!(r.status(), 416);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes */{}", bytes.len()).as_str()
    );
    let r = c
        .http
        .get(c.url(1, &format!("/v1/files/{file}")))
        .bearer_auth(&token)
        .header("if-none-match", format!("\"{sha}\""))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    // A majority stored every chunk before the answer; the third replica's copies follow
    // (its calls go on after the majority answered): all 3 x 6 chunks, once each.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut stored = 0;
        for id in 1..=3 {
            stored += chunks_stored(&c, id).await;
        }
        if stored == 18 {
            break;
        }
        assert!(
            stored < 18,
            "more chunk writes than chunks x replicas: {stored}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "chunks stored on the replicas: {stored} of 18"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends only the headers of an upload (a declared length, or chunked encoding), waits
/// for the answer, and returns its status: what the node decides before reading a body.
pub(crate) async fn headers_only_upload(
    c: &Cluster,
    via: u64,
    token: &str,
    length: Option<u64>,
) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = c.node(via).api;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let length = match length {
        Some(n) => format!("Content-Length: {n}\r\n"),
        None => "Transfer-Encoding: chunked\r\n".to_string(),
    };
    let head = format!(
        "POST /v1/files HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n{length}\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("an answer before any body byte")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    text.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"))
}

/// Sends an upload announcing `length` bytes but only `sent` of them, half-closes, and
/// returns the answer's status and text.
pub(crate) async fn truncated_upload(
    c: &Cluster,
    via: u64,
    token: &str,
    length: u64,
    sent: usize,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = c.node(via).api;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/files HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: {length}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&content(sent)).await.unwrap();
    s.shutdown().await.unwrap();
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_string(&mut text))
        .await
        .expect("an answer")
        .unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    (status, text)
}

/// `chatd_file_chunks_stored_total` of node `id`.
async fn chunks_stored(c: &Cluster, id: u64) -> u64 {
    metric(c, id, "chatd_file_chunks_stored_total").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_bad_uploads_and_reads_get_their_errors_and_leave_nothing_readable() {
    let c = cluster3(&[]).await;
    let ann = create_user(&c, 1, "ann").await;
    let bob = create_user(&c, 1, "bob").await;
    // No token, a wrong token.
    let r = c
        .http
        .post(c.url(1, "/v1/files"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = upload(&c, 1, "nope", b"x".to_vec(), "a").await;
    assert_eq!(r.status(), 401);
    // Over files.max_bytes (100 MiB): refused from the headers, before any body is sent
    // (a raw request: headers only, then the answer is read).
    assert_eq!(
        headers_only_upload(&c, 1, &ann, Some((100u64 << 20) + 1)).await,
        413
    );
    // No Content-Length (a chunked body): 411.
    assert_eq!(headers_only_upload(&c, 1, &ann, None).await, 411);
    // A body shorter than its Content-Length (the client stops sending and half-closes):
    // 400, and the upload's record is dropped (nothing of it is readable).
    let (status, text) = truncated_upload(&c, 3, &ann, 3 << 20, (1 << 20) + 5).await;
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("body_error") || text.contains("length_mismatch"),
        "{text}"
    );
    // A bad name.
    let r = upload(&c, 1, &ann, b"x".to_vec(), "../../etc/passwd").await;
    assert_eq!(r.status(), 400);
    // Unknown ids, malformed ids: 404.
    let r = download(&c, 1, &ann, "f:0123456789abcdef0123456789abcdef", None).await;
    assert_eq!(r.status(), 404);
    let r = download(&c, 1, &ann, "nonsense", None).await;
    assert_eq!(r.status(), 404);
    // Another user's file: 404, as if it did not exist.
    let r = upload(&c, 2, &ann, content(3000), "a.bin").await;
    assert_eq!(r.status(), 201);
    let file = r.json::<Value>().await.unwrap()["file_id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = download(&c, 3, &bob, &file, None).await;
    assert_eq!(r.status(), 404);
    let r = download(&c, 3, &ann, &file, None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), content(3000).as_slice());
    // An empty file is a file.
    let r = upload(&c, 1, &ann, Vec::new(), "empty").await;
    assert_eq!(r.status(), 201);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["size"], 0);
    let r = download(&c, 2, &ann, body["file_id"].as_str().unwrap(), None).await;
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_an_acknowledged_upload_survives_kill_9_of_the_node_that_took_it() {
    let mut c = cluster3(&[]).await;
    let token = create_user(&c, 1, "ann").await;
    let bytes = content(3 * (1 << 20) + 7);
    let sha = sha256_hex(&bytes);
    let r = upload(&c, 1, &token, bytes.clone(), "movie.mp4").await;
    assert_eq!(r.status(), 201);
    let file = r.json::<Value>().await.unwrap()["file_id"]
        .as_str()
        .unwrap()
        .to_string();
    // The node that took the upload dies at once: what it acknowledged is on a majority.
    c.kill(1);
    for via in [2, 3] {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let r = download(&c, via, &token, &file, None).await;
            if r.status() == 200 {
                let got = r.bytes().await.unwrap();
                assert_eq!(sha256_hex(&got), sha, "node {via}");
                break;
            }
            // 503 while the file's partition elects a leader without node 1.
            assert_eq!(r.status(), 503, "node {via}");
            assert!(
                std::time::Instant::now() < deadline,
                "node {via}: no leader"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Back, node 1 serves it too (its own synced chunks, or its peers').
    c.start(1);
    c.wait_ready(crate::chat::READY).await;
    let r = download(&c, 1, &token, &file, None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(sha256_hex(&r.bytes().await.unwrap()), sha);
    // Then the other replica that held it dies: nodes 1 and 3 still have every chunk
    // (node 3 from the upload's third call or the repair loop) and serve it.
    wait_whole(&c, &[1, 3], &file, Duration::from_secs(30)).await;
    c.kill(2);
    for via in [1, 3] {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let r = download(&c, via, &token, &file, None).await;
            if r.status() == 200 {
                assert_eq!(sha256_hex(&r.bytes().await.unwrap()), sha, "node {via}");
                break;
            }
            assert_eq!(r.status(), 503, "node {via}");
            assert!(
                std::time::Instant::now() < deadline,
                "node {via}: no leader"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Node `id`'s own copy of `file` (`/v1/admin/files/{id}/local`).
pub(crate) async fn local_copy(c: &Cluster, id: u64, file: &str) -> Value {
    c.http
        .get(c.url(id, &format!("/v1/admin/files/{file}/local")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits until each of `nodes` holds every chunk of `file` below its committed offset.
async fn wait_whole(c: &Cluster, nodes: &[u64], file: &str, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    for &id in nodes {
        loop {
            let l = local_copy(c, id, file).await;
            if l["record"].is_object()
                && l["chunks_needed"].as_u64() > Some(0)
                && l["chunks_present"] == l["chunks_needed"]
            {
                assert_eq!(l["missing"], serde_json::json!([]), "{l}");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node {id} lacks chunks: {l}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// `POST /v1/files` creating a resumable upload of `size` bytes (no body yet).
pub(crate) async fn create_upload(
    c: &Cluster,
    via: u64,
    token: &str,
    size: u64,
) -> reqwest::Response {
    c.http
        .post(c.url(via, "/v1/files"))
        .bearer_auth(token)
        .header("upload-length", size)
        .header("content-type", "video/mp4")
        .header("x-file-name", "clip.mp4")
        .send()
        .await
        .unwrap()
}

async fn patch(
    c: &Cluster,
    via: u64,
    token: &str,
    file: &str,
    offset: u64,
    bytes: Vec<u8>,
) -> reqwest::Response {
    c.http
        .patch(c.url(via, &format!("/v1/files/{file}")))
        .bearer_auth(token)
        .header("upload-offset", offset)
        .header("content-type", "application/offset+octet-stream")
        .body(bytes)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap()
}

async fn head(c: &Cluster, via: u64, token: &str, file: &str) -> reqwest::Response {
    c.http
        .head(c.url(via, &format!("/v1/files/{file}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

fn header_u64(r: &reqwest::Response, name: &str) -> u64 {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {:?}", r.headers()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_a_resumable_upload_continues_at_the_committed_offset_from_any_node() {
    let c = cluster3(&[]).await;
    let ann = create_user(&c, 1, "ann").await;
    let bob = create_user(&c, 1, "bob").await;
    let mib = 1usize << 20;
    let bytes = content(3 * mib + 5);
    let size = bytes.len() as u64;
    let sha = sha256_hex(&bytes);
    let r = create_upload(&c, 1, &ann, size).await;
    assert_eq!(r.status(), 201);
    assert_eq!(header_u64(&r, "upload-offset"), 0);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let body: Value = r.json().await.unwrap();
    let file = body["file_id"].as_str().unwrap().to_string();
    assert_eq!(location, format!("/v1/files/{file}"));
    assert_eq!(body["offset"], 0, "{body}");
    assert!(
        body.get("sha256").is_none(),
        "incomplete: no hash yet: {body}"
    );
    let r = head(&c, 2, &ann, &file).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header_u64(&r, "upload-offset"), 0);
    assert_eq!(header_u64(&r, "upload-length"), size);
    // Someone else's upload does not exist for them.
    assert_eq!(head(&c, 2, &bob, &file).await.status(), 404);
    assert_eq!(patch(&c, 2, &bob, &file, 0, vec![1]).await.status(), 404);
    // Not at the resume point: 409 with the resume point.
    let r = patch(&c, 1, &ann, &file, 5, bytes[5..10].to_vec()).await;
    assert_eq!(r.status(), 409);
    assert_eq!(header_u64(&r, "upload-offset"), 0);
    assert!(r.text().await.unwrap().contains("offset_mismatch"));
    // No Upload-Offset: 400.
    let r = c
        .http
        .patch(c.url(1, &format!("/v1/files/{file}")))
        .bearer_auth(&ann)
        .body(vec![1u8])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // 1.5 MiB: the whole first chunk is kept, the half chunk after it is not.
    let r = patch(&c, 1, &ann, &file, 0, bytes[..mib + mib / 2].to_vec()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header_u64(&r, "upload-offset"), mib as u64);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["offset"], mib as u64, "{body}");
    // Every node says the same resume point; the file is not readable yet.
    let r = head(&c, 3, &ann, &file).await;
    assert_eq!(header_u64(&r, "upload-offset"), mib as u64);
    assert!(r.headers().get("etag").is_none(), "incomplete: no ETag");
    assert_eq!(download(&c, 3, &ann, &file, None).await.status(), 404);
    // Bytes past the declared size: 400, the resume point unchanged.
    let mut long = bytes[mib..].to_vec();
    long.push(0);
    let r = patch(&c, 2, &ann, &file, mib as u64, long).await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        header_u64(&head(&c, 1, &ann, &file).await, "upload-offset"),
        mib as u64
    );
    // The rest, through another node: complete, hashed over the whole file.
    let r = patch(&c, 2, &ann, &file, mib as u64, bytes[mib..].to_vec()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header_u64(&r, "upload-offset"), size);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["sha256"], sha, "{body}");
    assert_eq!(body["mime"], "video/mp4");
    let r = download(&c, 3, &ann, &file, None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(sha256_hex(&r.bytes().await.unwrap()), sha);
    // The retry of the completing request (its answer lost): the file as it is.
    let r = patch(&c, 1, &ann, &file, size, Vec::new()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["sha256"], sha);
    // Anything else on a complete file: 409.
    let r = patch(&c, 1, &ann, &file, 0, bytes[..10].to_vec()).await;
    assert_eq!(r.status(), 409);
    // HEAD of a complete file: a download's headers.
    let r = head(&c, 1, &ann, &file).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header_u64(&r, "upload-offset"), size);
    assert_eq!(header_u64(&r, "content-length"), size);
    assert_eq!(r.headers()["etag"], format!("\"{sha}\"").as_str());
    // Over files.max_bytes by Upload-Length: 413 before anything is recorded.
    let r = create_upload(&c, 1, &ann, (100 << 20) + 1).await;
    assert_eq!(r.status(), 413);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_kill_9_mid_upload_resumes_from_the_acknowledged_offset_and_the_node_catches_up() {
    let mut c = Cluster::init(3, &[]);
    c.set_config("files", "repair_interval_ms", "300");
    c.start_all();
    c.wait_ready(crate::chat::READY).await;
    let ann = create_user(&c, 1, "ann").await;
    let mib = 1usize << 20;
    let bytes = content(24 * mib + 77);
    let size = bytes.len() as u64;
    let sha = sha256_hex(&bytes);
    let r = create_upload(&c, 1, &ann, size).await;
    let file = r.json::<Value>().await.unwrap()["file_id"]
        .as_str()
        .unwrap()
        .to_string();
    // The whole body to node 1, slowly (256 KiB every 25 ms, ~10 MiB/s).
    let slow: Vec<Result<Vec<u8>, std::io::Error>> =
        bytes.chunks(256 << 10).map(|p| Ok(p.to_vec())).collect();
    let body = futures::stream::iter(slow).then(|p| async move {
        tokio::time::sleep(Duration::from_millis(25)).await;
        p
    });
    let sending = tokio::spawn(
        c.http
            .patch(c.url(1, &format!("/v1/files/{file}")))
            .bearer_auth(&ann)
            .header("upload-offset", 0)
            .header("content-length", size)
            .body(reqwest::Body::wrap_stream(body))
            .timeout(Duration::from_secs(120))
            .send(),
    );
    // Once a resume point past 8 MiB is committed, node 1 dies mid-upload.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let before = loop {
        let o = header_u64(&head(&c, 2, &ann, &file).await, "upload-offset");
        if o >= 8 * mib as u64 {
            break o;
        }
        assert!(std::time::Instant::now() < deadline, "no progress: {o}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    c.kill(1);
    let sent = sending.await.unwrap();
    assert!(
        sent.as_ref().map_or(true, |r| !r.status().is_success()),
        "the interrupted request did not succeed: {sent:?}"
    );
    // The resume point, from another node: whole chunks, where the upload got to.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let offset = loop {
        let r = head(&c, 2, &ann, &file).await;
        if r.status() == 200 {
            break header_u64(&r, "upload-offset");
        }
        assert_eq!(r.status(), 503);
        assert!(std::time::Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        offset >= before && offset < size,
        "{before} <= {offset} < {size}"
    );
    assert_eq!(offset % mib as u64, 0, "a whole number of chunks");
    let r = patch(
        &c,
        2,
        &ann,
        &file,
        offset,
        bytes[offset as usize..].to_vec(),
    )
    .await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let r = download(&c, 3, &ann, &file, None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(sha256_hex(&r.bytes().await.unwrap()), sha);
    // Node 1 returns without the chunks sent while it was down, and fetches them.
    c.start(1);
    c.wait_ready(crate::chat::READY).await;
    wait_whole(&c, &[1, 2, 3], &file, Duration::from_secs(60)).await;
    let metrics = c
        .http
        .get(c.url(1, "/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let repaired: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("chatd_file_chunks_repaired_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(
        repaired >= (size - offset) / mib as u64,
        "node 1 fetched the {} chunks after {offset}: {repaired}",
        (size - offset).div_ceil(mib as u64)
    );
    eprintln!("resumed at {offset} of {size} (committed {before} at the kill); node 1 repaired {repaired} chunks");
    let r = download(&c, 1, &ann, &file, None).await;
    assert_eq!(sha256_hex(&r.bytes().await.unwrap()), sha);
}

/// `GET /v1/files/{file}?chat={chat}` as `token`: the status, and the bytes on 200.
pub(crate) async fn read_via(
    c: &Cluster,
    via: u64,
    token: &str,
    file: &str,
    chat: &str,
) -> (u16, Vec<u8>) {
    let r = c
        .http
        .get(c.url(via, &format!("/v1/files/{file}")))
        .query(&[("chat", chat)])
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.bytes().await.unwrap().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_attached_to_a_message_are_readable_by_who_may_read_it_and_no_one_else() {
    use crate::ws::Ws;
    use serde_json::json;
    let c = cluster3(&[]).await;
    let mut t = std::collections::HashMap::new();
    for u in ["ann", "bob", "cat", "dan"] {
        t.insert(u, create_user(&c, 1, u).await);
    }
    let bytes = content((1 << 20) + 999);
    let r = upload(&c, 1, &t["ann"], bytes.clone(), "plan.pdf").await;
    assert_eq!(r.status(), 201);
    let file = r.json::<Value>().await.unwrap()["file_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut ann = Ws::connect(c.node(1).api, "ann", &t["ann"]).await;
    let mut bob = Ws::connect(c.node(2).api, "bob", &t["bob"]).await;
    let (group, _) = ann.create_group("team", &["bob"]).await;
    let send = |key: &str, files: Value| {
        json!({"type": "send", "chat": group, "client_msg_id": key, "text": "the plan",
               "files": files})
    };
    // Before it is shared, only ann reads it.
    assert_eq!(read_via(&c, 2, &t["bob"], &file, &group).await.0, 404);
    let ack = ann
        .request(send("m1", json!([{"file_id": file, "size": bytes.len()}])))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let seq = ack["seq"].as_u64().unwrap();
    // Bob's push and history carry the attachment, as the upload named it.
    let pushed = bob
        .wait_for(Duration::from_secs(10), |f| {
            f["type"] == "message" && f["message"]["seq"] == seq
        })
        .await
        .expect("bob gets the message");
    let expect = json!([{"file_id": file, "name": "plan.pdf", "mime": "application/pdf",
                         "size": bytes.len()}]);
    assert_eq!(pushed["message"]["files"], expect, "{pushed}");
    let history = bob.full_history(&group).await;
    assert_eq!(history.last().unwrap()["files"], expect);
    // A member reads it through the chat, from any node; not without naming the chat.
    for via in 1..=3 {
        let (status, got) = read_via(&c, via, &t["bob"], &file, &group).await;
        assert_eq!(status, 200, "node {via}");
        assert_eq!(got, bytes, "node {via}");
    }
    assert_eq!(download(&c, 3, &t["bob"], &file, None).await.status(), 404);
    // A non-member, and a member of another chat, do not.
    assert_eq!(read_via(&c, 3, &t["cat"], &file, &group).await.0, 404);
    let mut cat = Ws::connect(c.node(3).api, "cat", &t["cat"]).await;
    let (other, _) = cat.create_group("other", &["dan"]).await;
    assert_eq!(read_via(&c, 3, &t["cat"], &file, &other).await.0, 404);
    // Someone joining later does not see what was sent before the join.
    let a = ann
        .request(json!({"type": "add_members", "chat": group, "users": ["dan"]}))
        .await;
    assert_eq!(a["type"], "done", "{a}");
    assert_eq!(read_via(&c, 1, &t["dan"], &file, &group).await.0, 404);
    // Bad attachments: refused, nothing sent.
    let mut bobs_file = upload(&c, 2, &t["bob"], content(10), "b.txt").await;
    assert_eq!(bobs_file.status(), 201);
    let bobs = bobs_file.json::<Value>().await.unwrap()["file_id"]
        .as_str()
        .unwrap()
        .to_string();
    bobs_file = create_upload(&c, 1, &t["ann"], 10).await;
    let incomplete = bobs_file.json::<Value>().await.unwrap()["file_id"]
        .as_str()
        .unwrap()
        .to_string();
    let too_many: Vec<Value> = (0..11).map(|_| json!({"file_id": file})).collect();
    for (files, code) in [
        (json!([{"file_id": bobs}]), "unknown_file"),
        (json!([{"file_id": incomplete}]), "unknown_file"),
        (
            json!([{"file_id": "f:0123456789abcdef0123456789abcdef"}]),
            "unknown_file",
        ),
        (json!([{"file_id": "nonsense"}]), "invalid_field"),
        (
            json!([{"file_id": file}, {"file_id": file}]),
            "invalid_field",
        ),
        (
            json!([{"file_id": file, "mime": "image/png"}]),
            "invalid_field",
        ),
        (json!([{"file_id": file, "size": 1}]), "invalid_field"),
        (json!([{"file_id": file, "name": "../x"}]), "invalid_field"),
        (Value::Array(too_many), "too_large"),
    ] {
        let e = ann.request(send("bad", files.clone())).await;
        assert_eq!(e["type"], "error", "{files}: {e}");
        assert_eq!(e["code"], code, "{files}: {e}");
    }
    assert_eq!(
        bob.full_history(&group).await.len(),
        history.len() + 1,
        "only dan's join was added"
    );
    // A name given at send time is what readers see.
    let ack = ann
        .request(send(
            "m2",
            json!([{"file_id": file, "name": "Plan v2.pdf"}]),
        ))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let seq2 = ack["seq"].as_u64().unwrap();
    let h = bob.full_history(&group).await;
    assert_eq!(h.last().unwrap()["files"][0]["name"], "Plan v2.pdf");
    assert_eq!(read_via(&c, 1, &t["dan"], &file, &group).await.0, 200);
    // Deleting the messages takes the access away from the others; the owner keeps it.
    for s in [seq, seq2] {
        let d = ann
            .request(json!({"type": "delete", "chat": group, "seq": s}))
            .await;
        assert_eq!(d["type"], "done", "{d}");
    }
    assert_eq!(read_via(&c, 2, &t["bob"], &file, &group).await.0, 404);
    assert_eq!(read_via(&c, 2, &t["dan"], &file, &group).await.0, 404);
    assert_eq!(read_via(&c, 2, &t["ann"], &file, &group).await.0, 200);
    // A malformed query string: 400 with the error body.
    let r = c
        .http
        .get(c.url(1, &format!("/v1/files/{file}?chat=%ZZ&chat=a")))
        .bearer_auth(&t["bob"])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

/// A metric of node `id` (0 when absent).
pub(crate) async fn metric(c: &Cluster, id: u64, name: &str) -> u64 {
    let text = c
        .http
        .get(c.url(id, "/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Creates a group of the session's user and `member` and sends `file` there: the group
/// and the message's seq.
pub(crate) async fn share_in_group(
    ws: &mut crate::ws::Ws,
    member: &str,
    file: &str,
) -> (String, u64) {
    let (group, _) = ws.create_group("g", &[member]).await;
    let ack = ws
        .request(
            serde_json::json!({"type": "send", "chat": group, "client_msg_id": "m",
                                    "text": "", "files": [{"file_id": file}]}),
        )
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    (group, ack["seq"].as_u64().unwrap())
}

/// Waits until `check` holds, or fails with `what`.
pub(crate) async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    while !check().await {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_unfinished_unattached_and_unreferenced_files_are_collected_with_their_chunks() {
    use crate::ws::Ws;
    use serde_json::json;
    let mut c = Cluster::init(3, &[]);
    for (k, v) in [
        ("repair_interval_ms", "200"),
        ("sweep_interval_ms", "300"),
        ("upload_ttl_ms", "2000"),
        ("unattached_ttl_ms", "2000"),
        ("detach_grace_ms", "500"),
        ("orphan_grace_ms", "300"),
    ] {
        c.set_config("files", k, v);
    }
    c.start_all();
    c.wait_ready(crate::chat::READY).await;
    let ann = create_user(&c, 1, "ann").await;
    let bob = create_user(&c, 1, "bob").await;
    let mib = 1usize << 20;
    let id_of = |v: Value| v["file_id"].as_str().unwrap().to_string();
    let kept = id_of(
        upload(&c, 1, &ann, content(2 * mib), "kept.bin")
            .await
            .json()
            .await
            .unwrap(),
    );
    let lonely = id_of(
        upload(&c, 2, &ann, content(mib + 1), "lonely.bin")
            .await
            .json()
            .await
            .unwrap(),
    );
    let unfinished = id_of(
        create_upload(&c, 3, &ann, 3 * mib as u64)
            .await
            .json()
            .await
            .unwrap(),
    );
    let r = patch(&c, 3, &ann, &unfinished, 0, content(mib)).await;
    assert_eq!(r.status(), 200);
    let mut ws = Ws::connect(c.node(1).api, "ann", &ann).await;
    let (group, seq) = share_in_group(&mut ws, "bob", &kept).await;
    // Every node's sweep counts what it holds.
    eventually(Duration::from_secs(20), "file bytes counted", || async {
        metric(&c, 1, "chatd_file_bytes").await >= (4 * mib + 1) as u64
    })
    .await;
    // Past the ttls: the unattached file and the unfinished upload go, records and
    // chunks; the attached one stays.
    eventually(
        Duration::from_secs(30),
        "unattached and unfinished dropped",
        || async {
            download(&c, 1, &ann, &lonely, None).await.status() == 404
                && head(&c, 1, &ann, &unfinished).await.status() == 404
        },
    )
    .await;
    for file in [&lonely, &unfinished] {
        for id in 1..=3 {
            let what = format!("node {id} deletes the chunks of {file}");
            eventually(Duration::from_secs(20), &what, || async {
                local_copy(&c, id, file).await["chunks_held"] == 0
            })
            .await;
        }
    }
    let (status, got) = read_via(&c, 2, &bob, &kept, &group).await;
    assert_eq!(status, 200);
    assert_eq!(got, content(2 * mib));
    let collected: u64 = {
        let mut n = 0;
        for id in 1..=3 {
            n += metric(&c, id, "chatd_files_collected_total").await;
        }
        n
    };
    assert_eq!(collected, 2, "two files collected, once each");
    // The message is deleted: no message carries the file, so it goes too.
    let d = ws
        .request(json!({"type": "delete", "chat": group, "seq": seq}))
        .await;
    assert_eq!(d["type"], "done", "{d}");
    eventually(
        Duration::from_secs(30),
        "the unreferenced file dropped",
        || async { download(&c, 1, &ann, &kept, None).await.status() == 404 },
    )
    .await;
    for id in 1..=3 {
        eventually(Duration::from_secs(20), "no file bytes left", || async {
            metric(&c, id, "chatd_file_bytes").await == 0
                && local_copy(&c, id, &kept).await["chunks_held"] == 0
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_images_get_a_320px_thumbnail_others_none() {
    let c = cluster3(&[]).await;
    let ann = create_user(&c, 1, "ann").await;
    let bob = create_user(&c, 1, "bob").await;
    // A 1200 x 900 photo-like PNG (no alpha), over a megabyte: two chunks.
    let img = image::RgbImage::from_fn(1200, 900, |x, y| {
        image::Rgb([(x * 7 + y) as u8, (y * 3) as u8, ((x ^ y) * 13) as u8])
    });
    let mut png = Vec::new();
    image::DynamicImage::from(img)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    assert!(png.len() > 1 << 20, "{} bytes", png.len());
    let up = |bytes: Vec<u8>, mime: &'static str| {
        let c = &c;
        let ann = ann.clone();
        async move {
            let r = c
                .http
                .post(c.url(1, "/v1/files"))
                .bearer_auth(&ann)
                .header("content-type", mime)
                .body(bytes)
                .timeout(Duration::from_secs(60))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
            r.json::<Value>().await.unwrap()["file_id"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let photo = up(png, "image/png").await;
    let thumb = |via: u64, token: String, file: String| {
        let c = &c;
        async move {
            c.http
                .get(c.url(via, &format!("/v1/files/{file}/thumbnail")))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
        }
    };
    for via in [2, 3, 2] {
        let r = thumb(via, ann.clone(), photo.clone()).await;
        assert_eq!(r.status(), 200, "node {via}");
        assert_eq!(r.headers()["content-type"], "image/jpeg");
        let t = image::load_from_memory(&r.bytes().await.unwrap()).unwrap();
        assert_eq!((t.width(), t.height()), (320, 240), "node {via}");
    }
    // The same access as the file: not someone else's.
    assert_eq!(thumb(1, bob.clone(), photo.clone()).await.status(), 404);
    // A video has none; an "image" that is not one has none; both said.
    let video = up(content(5000), "video/mp4").await;
    let r = thumb(1, ann.clone(), video).await;
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("no_thumbnail"));
    let fake = up(content(5000), "image/png").await;
    let r = thumb(1, ann.clone(), fake).await;
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("no_thumbnail"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_follow_their_partitions_when_replicas_move_to_a_new_node() {
    let mut c = Cluster::init(3, &[]);
    let tune = |c: &Cluster| {
        for (k, v) in [
            ("repair_interval_ms", "200"),
            ("sweep_interval_ms", "300"),
            ("unhosted_grace_ms", "1000"),
        ] {
            c.set_config("files", k, v);
        }
    };
    tune(&c);
    c.start_all();
    c.wait_ready(crate::chat::READY).await;
    let ann = create_user(&c, 1, "ann").await;
    // Files over many of the 16 partitions, one to three chunks each.
    let mut files = Vec::new();
    for i in 0..20usize {
        let bytes = content((i % 3) * (1 << 20) + 1000 + i);
        let r = upload(&c, 1 + (i as u64 % 3), &ann, bytes.clone(), "f.bin").await;
        assert_eq!(r.status(), 201);
        files.push((
            r.json::<Value>().await.unwrap()["file_id"]
                .as_str()
                .unwrap()
                .to_string(),
            bytes,
        ));
    }
    // A fourth node joins; the rebalancer moves replicas to it.
    c.add_node(4, &[]).expect("add-node");
    tune(&c);
    c.start(4);
    c.wait_ready(crate::chat::READY).await;
    // In the end every file's chunks are exactly on its partition's replicas: whole on
    // each of the three (node 4 included for the partitions it took), and gone from the
    // node each moved replica left.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let mut settled = true;
        let mut on_4 = 0;
        for (file, _) in &files {
            let mut hosts = 0;
            for id in 1..=4 {
                let l = local_copy(&c, id, file).await;
                if l["hosted"] == true {
                    hosts += 1;
                    on_4 += usize::from(id == 4);
                    settled &= l["record"].is_object()
                        && l["chunks_present"] == l["chunks_needed"]
                        && l["chunks_held"] == l["chunks_needed"];
                } else {
                    settled &= l["chunks_held"] == 0;
                }
            }
            settled &= hosts == 3;
        }
        if settled && on_4 > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "chunks did not follow the partitions (node 4 hosts {on_4} of the files)"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // And every file reads back whole from the new node.
    for (file, bytes) in &files {
        let r = download(&c, 4, &ann, file, None).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap().as_ref(), bytes.as_slice());
    }
}
