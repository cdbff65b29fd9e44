//! `chat-cli upload` and `chat-cli download` against a real 3-node cluster: the bytes come
//! back identical from another node, checked against their SHA-256, and errors are said.

use serde_json::Value;

use crate::harness::{chat_cli, text, Cluster};
use crate::messaging::add_user;

#[test]
fn upload_on_one_node_and_download_from_another_gives_the_same_bytes() {
    let cluster = Cluster::start(3);
    let s: Vec<String> = cluster
        .ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let token = add_user(&s[0], &cluster.token, "fay");
    // 2.5 MiB: three chunks, the last one short.
    let bytes: Vec<u8> = (0..(5u32 << 19))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let input = cluster.dir.path().join("photo.png");
    std::fs::write(&input, &bytes).unwrap();
    let out = chat_cli(&[
        "--server",
        &s[0],
        "--token",
        &token,
        "--json",
        "upload",
        input.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let up: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(up["size"], bytes.len() as u64, "{up}");
    assert_eq!(up["mime"], "image/png", "type from the extension");
    assert_eq!(up["name"], "photo.png");
    let file = up["file_id"].as_str().unwrap();
    let output = cluster.dir.path().join("back.png");
    let out = chat_cli(&[
        "--server",
        &s[2],
        "--token",
        &token,
        "--json",
        "download",
        file,
        "-o",
        output.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let down: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(down["sha256"], up["sha256"], "{down}");
    assert_eq!(std::fs::read(&output).unwrap(), bytes);
    assert!(
        !cluster.dir.path().join("back.png.part").exists(),
        "the partial file is renamed"
    );
    // An unknown id: the node's 404, said, and no file left behind.
    let missing = cluster.dir.path().join("missing.bin");
    let out = chat_cli(&[
        "--server",
        &s[1],
        "--token",
        &token,
        "download",
        "f:0123456789abcdef0123456789abcdef",
        "-o",
        missing.to_str().unwrap(),
    ]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("unknown_file"),
        "{}",
        text(&out.stderr)
    );
    assert!(!missing.exists());
    // A file that cannot be read: said, nothing sent.
    let out = chat_cli(&[
        "--server",
        &s[0],
        "--token",
        &token,
        "upload",
        "/nonexistent/x",
    ]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("cannot open"),
        "{}",
        text(&out.stderr)
    );
}

/// `POST` (resumable, `Upload-Length`) and a first `PATCH` of `first` bytes, as an upload
/// that broke off would leave it: returns the file id and the committed offset.
fn start_upload(server: &str, token: &str, bytes: &[u8], first: usize) -> (String, u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let r = http
            .post(format!("http://{server}/v1/files"))
            .bearer_auth(token)
            .header("upload-length", bytes.len())
            .header("x-file-name", "notes.txt")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        let file = v["file_id"].as_str().unwrap().to_string();
        let r = http
            .patch(format!("http://{server}/v1/files/{file}"))
            .bearer_auth(token)
            .header("upload-offset", 0)
            .body(bytes[..first].to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        (file, v["offset"].as_u64().unwrap())
    })
}

#[test]
fn upload_resume_continues_an_interrupted_upload_from_another_node() {
    let cluster = Cluster::start(3);
    let s: Vec<String> = cluster
        .ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let token = add_user(&s[0], &cluster.token, "gus");
    let bytes: Vec<u8> = (0..(5u32 << 19) + 3)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let input = cluster.dir.path().join("notes.txt");
    std::fs::write(&input, &bytes).unwrap();
    let (file, offset) = start_upload(&s[0], &token, &bytes, (1 << 20) + 100);
    assert_eq!(offset, 1 << 20, "whole chunks kept");
    // Another file's bytes do not resume it.
    let other = cluster.dir.path().join("other.txt");
    std::fs::write(&other, b"short").unwrap();
    let out = chat_cli(&[
        "--server",
        &s[1],
        "--token",
        &token,
        "upload",
        "--resume",
        &file,
        other.to_str().unwrap(),
    ]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("is an upload of"),
        "{}",
        text(&out.stderr)
    );
    // The file itself does, through node 2.
    let out = chat_cli(&[
        "--server",
        &s[1],
        "--token",
        &token,
        "--json",
        "upload",
        "--resume",
        &file,
        input.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let up: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(up["file_id"], file.as_str());
    assert_eq!(up["size"], bytes.len() as u64);
    assert_eq!(up["offset"], bytes.len() as u64);
    let output = cluster.dir.path().join("back.txt");
    let out = chat_cli(&[
        "--server",
        &s[2],
        "--token",
        &token,
        "download",
        &file,
        "-o",
        output.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(&output).unwrap(), bytes);
    // Resuming a complete upload answers it again.
    let out = chat_cli(&[
        "--server",
        &s[0],
        "--token",
        &token,
        "--json",
        "upload",
        "--resume",
        &file,
        input.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}
