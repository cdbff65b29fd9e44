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
