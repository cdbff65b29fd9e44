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
    // The upload counts against the user's quota.
    let out = chat_cli(&["--server", &s[1], "--token", &token, "quota"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        "fay: 2.5 MiB of 10.0 GiB in 1 file(s)"
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

#[test]
fn send_file_shares_a_file_that_members_see_in_history_and_download_through_the_chat() {
    use crate::messaging::json_ok;
    let cluster = Cluster::start(3);
    let s: Vec<String> = cluster
        .ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let hal = add_user(&s[0], &cluster.token, "hal");
    let ida = add_user(&s[0], &cluster.token, "ida");
    let jon = add_user(&s[0], &cluster.token, "jon");
    let g = json_ok(&[
        "--server",
        &s[0],
        "--token",
        &hal,
        "--json",
        "create-group",
        "crew",
        "ida",
    ]);
    let group = g["chat"].as_str().unwrap().to_string();
    let bytes: Vec<u8> = (0..(3u32 << 19)).map(|i| (i ^ (i >> 9)) as u8).collect();
    let input = cluster.dir.path().join("map.png");
    std::fs::write(&input, &bytes).unwrap();
    let sent = json_ok(&[
        "--server",
        &s[0],
        "--token",
        &hal,
        "--json",
        "send-file",
        &group,
        input.to_str().unwrap(),
        "--text",
        "the map",
    ]);
    assert_eq!(sent["type"], "ack", "{sent}");
    // Ida sees it in history with its name, size and type.
    let out = chat_cli(&["--server", &s[1], "--token", &ida, "history", &group]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(
        shown.contains("the map 📎 map.png (1.5 MiB, image/png) f:"),
        "{shown}"
    );
    let file = shown
        .split_whitespace()
        .find(|w| w.starts_with("f:"))
        .unwrap()
        .to_string();
    // She downloads it through the chat; without naming the chat it is not hers.
    let output = cluster.dir.path().join("ida.png");
    let out = chat_cli(&[
        "--server",
        &s[2],
        "--token",
        &ida,
        "download",
        &file,
        "--chat",
        &group,
        "-o",
        output.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(&output).unwrap(), bytes);
    let out = chat_cli(&[
        "--server",
        &s[2],
        "--token",
        &ida,
        "download",
        &file,
        "-o",
        output.to_str().unwrap(),
    ]);
    assert_ne!(out.status.code(), Some(0));
    // Jon, not a member, gets nothing.
    let out = chat_cli(&[
        "--server",
        &s[2],
        "--token",
        &jon,
        "download",
        &file,
        "--chat",
        &group,
        "-o",
        cluster.dir.path().join("jon.png").to_str().unwrap(),
    ]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("unknown_file"),
        "{}",
        text(&out.stderr)
    );
}
