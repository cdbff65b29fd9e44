//! Files stored once and counted per owner (issue 14, docs/files.md "Dedup by content",
//! "Quotas"): the same bytes uploaded by two people are kept once, on one file's chunks,
//! for as long as either may read them; every file counts against its owner's quota.

use std::time::Duration;

use serde_json::{json, Value};

use crate::chat::create_user;
use crate::files::{
    content, create_upload, download, eventually, headers_only_upload, local_copy, metric,
    read_via, sha256_hex, share_in_group, truncated_upload, upload,
};
use crate::harness::Cluster;

/// Bytes that differ from [`content`]'s and from another seed's.
fn other_content(len: usize, seed: u64) -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d ^ seed.wrapping_mul(0x9e37_79b9);
    (0..len)
        .map(|_| {
            x ^= x << 7;
            x ^= x >> 9;
            x as u8
        })
        .collect()
}

async fn cluster_with(files: &[(&str, &str)]) -> Cluster {
    let mut c = Cluster::init(3, &[]);
    for (k, v) in files {
        c.set_config("files", k, v);
    }
    c.start_all();
    c.wait_ready(crate::chat::READY).await;
    c
}

async fn file_id(r: reqwest::Response) -> String {
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    v["file_id"].as_str().unwrap().to_string()
}

async fn quota(c: &Cluster, via: u64, token: &str) -> Value {
    c.http
        .get(c.url(via, "/v1/quota"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The bytes every node holds, once its sweep has counted them.
async fn bytes_held(c: &Cluster) -> Vec<u64> {
    let mut out = Vec::new();
    for id in 1..=3 {
        out.push(metric(c, id, "chatd_file_bytes").await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_the_same_bytes_uploaded_twice_are_stored_once_while_anyone_may_read_them() {
    let c = cluster_with(&[
        ("repair_interval_ms", "200"),
        ("sweep_interval_ms", "300"),
        ("orphan_grace_ms", "300"),
        ("unattached_ttl_ms", "10000"),
        ("detach_grace_ms", "500"),
    ])
    .await;
    let ann = create_user(&c, 1, "ann").await;
    let bob = create_user(&c, 1, "bob").await;
    let cat = create_user(&c, 1, "cat").await;
    let size = (3usize << 20) + 5;
    let bytes = content(size);
    let sha = sha256_hex(&bytes);
    let a = file_id(upload(&c, 1, &ann, bytes.clone(), "ann.pdf").await).await;
    let b = file_id(upload(&c, 2, &bob, bytes.clone(), "bob.pdf").await).await;
    // Bob shares his with Cat.
    let mut ws = crate::ws::Ws::connect(c.node(2).api, "bob", &bob).await;
    let (group, seq) = share_in_group(&mut ws, "cat", &b).await;
    // Bob's file reads Ann's chunks; its own go on every node.
    eventually(
        Duration::from_secs(20),
        "bob's file is an alias",
        || async {
            let (la, lb) = (local_copy(&c, 1, &a).await, local_copy(&c, 1, &b).await);
            la["state"]["content"] == json!("Canonical")
                && lb["state"]["content"] == json!({"Alias": &a})
        },
    )
    .await;
    for id in 1..=3 {
        let what = format!("node {id} keeps one copy");
        eventually(Duration::from_secs(20), &what, || async {
            let (la, lb) = (local_copy(&c, id, &a).await, local_copy(&c, id, &b).await);
            lb["chunks_held"] == 0
                && lb["chunks_needed"] == 0
                && la["chunks_present"] == la["chunks_needed"]
                && metric(&c, id, "chatd_file_bytes").await == size as u64
        })
        .await;
    }
    // Each owner is charged for their file in full.
    for t in [&ann, &bob] {
        let q = quota(&c, 3, t).await;
        assert_eq!(q["used_bytes"], size as u64, "{q}");
        assert_eq!(q["files"], 1, "{q}");
    }
    // Bob reads his file (its name, the same bytes, ranges) from a node of his choice.
    let r = download(&c, 3, &bob, &b, None).await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .contains("bob.pdf"),
        "{:?}",
        r.headers()
    );
    assert_eq!(r.headers()["etag"].to_str().unwrap(), format!("\"{sha}\""));
    assert_eq!(sha256_hex(&r.bytes().await.unwrap()), sha);
    let r = download(&c, 2, &bob, &b, Some("bytes=1048570-2097160")).await;
    assert_eq!(r.status(), 206);
    assert_eq!(&r.bytes().await.unwrap()[..], &bytes[1_048_570..=2_097_160]);
    // Ann cannot read Bob's file by its id, nor Bob Ann's: the same bytes give no access.
    assert_eq!(download(&c, 1, &ann, &b, None).await.status(), 404);
    assert_eq!(download(&c, 1, &bob, &a, None).await.status(), 404);
    // Ann's file is attached nowhere and goes past its ttl.
    eventually(Duration::from_secs(30), "ann's file released", || async {
        download(&c, 1, &ann, &a, None).await.status() == 404
    })
    .await;
    eventually(Duration::from_secs(10), "ann is refunded", || async {
        quota(&c, 1, &ann).await["used_bytes"] == 0
    })
    .await;
    // Released, but its chunks stay: Bob's file still reads them.
    let la = local_copy(&c, 1, &a).await;
    assert!(la["record"].is_object(), "{la}");
    assert!(la["state"]["released_ms"].as_u64().is_some(), "{la}");
    let (status, got) = read_via(&c, 3, &cat, &b, &group).await;
    assert_eq!(status, 200);
    assert_eq!(sha256_hex(&got), sha);
    assert_eq!(bytes_held(&c).await, vec![size as u64; 3]);
    // A new upload of the same bytes after Ann's release reads the same chunks.
    let d = file_id(upload(&c, 3, &cat, bytes.clone(), "cat.pdf").await).await;
    eventually(
        Duration::from_secs(20),
        "cat's file is an alias",
        || async { local_copy(&c, 1, &d).await["state"]["content"] == json!({"Alias": &a}) },
    )
    .await;
    assert_eq!(
        sha256_hex(&download(&c, 1, &cat, &d, None).await.bytes().await.unwrap()),
        sha
    );
    // Bob deletes his message: his file goes, then Cat's (attached nowhere), then the
    // last holder gone, Ann's record and chunks.
    let del = ws
        .request(json!({"type": "delete", "chat": group, "seq": seq}))
        .await;
    assert_eq!(del["type"], "done", "{del}");
    eventually(
        Duration::from_secs(40),
        "every file and chunk gone",
        || async {
            bytes_held(&c).await == vec![0; 3]
                && local_copy(&c, 1, &a).await["record"].is_null()
                && local_copy(&c, 1, &b).await["record"].is_null()
                && local_copy(&c, 1, &d).await["record"].is_null()
        },
    )
    .await;
    for t in [&bob, &cat] {
        assert_eq!(quota(&c, 1, t).await["used_bytes"], 0);
    }
    // The same bytes once more: a new canonical file (Ann's never comes back).
    let e = file_id(upload(&c, 2, &ann, bytes.clone(), "again.pdf").await).await;
    eventually(Duration::from_secs(20), "a new canonical file", || async {
        local_copy(&c, 1, &e).await["state"]["content"] == json!("Canonical")
    })
    .await;
    assert_eq!(
        sha256_hex(&download(&c, 3, &ann, &e, None).await.bytes().await.unwrap()),
        sha
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_quotas_refuse_uploads_past_the_limit_and_free_room_when_files_go() {
    let mib = 1u64 << 20;
    let c = cluster_with(&[
        ("user_quota_bytes", &(3 * mib).to_string()),
        ("repair_interval_ms", "200"),
        ("unattached_ttl_ms", "5000"),
    ])
    .await;
    let ann = create_user(&c, 1, "ann").await;
    let bob = create_user(&c, 1, "bob").await;
    let q = quota(&c, 2, &ann).await;
    assert_eq!(q["used_bytes"], 0, "{q}");
    assert_eq!(q["quota_bytes"], 3 * mib, "{q}");
    file_id(upload(&c, 1, &ann, other_content(2 << 20, 1), "one").await).await;
    // A failed upload is refunded at once; a resumable one counts its declared size.
    let (status, _) = truncated_upload(&c, 2, &ann, mib, 1000).await;
    assert_eq!(status, 400);
    assert_eq!(quota(&c, 3, &ann).await["used_bytes"], 2 * mib);
    // Past the quota: 413 from the headers, before any body byte; nothing charged.
    assert_eq!(headers_only_upload(&c, 3, &ann, Some(mib + 1)).await, 413);
    let r = create_upload(&c, 1, &ann, 2 * mib).await;
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "quota_exceeded", "{v}");
    let q = quota(&c, 1, &ann).await;
    assert_eq!(
        (q["used_bytes"].as_u64(), q["files"].as_u64()),
        (Some(2 * mib), Some(1))
    );
    // Exactly to the quota is allowed; another user's quota is their own.
    let open = create_upload(&c, 2, &ann, mib).await;
    assert_eq!(open.status(), 201);
    assert_eq!(quota(&c, 1, &ann).await["used_bytes"], 3 * mib);
    assert_eq!(
        upload(&c, 1, &ann, other_content(1, 2), "byte")
            .await
            .status(),
        413
    );
    file_id(upload(&c, 3, &bob, other_content(3 << 20, 3), "bob's").await).await;
    // Ann's complete file goes past its ttl (attached nowhere): room again.
    eventually(
        Duration::from_secs(30),
        "ann's file collected and refunded",
        || async { quota(&c, 2, &ann).await["used_bytes"] == mib },
    )
    .await;
    file_id(upload(&c, 2, &ann, other_content(2 << 20, 4), "two").await).await;
    assert_eq!(quota(&c, 3, &ann).await["used_bytes"], 3 * mib);
}
