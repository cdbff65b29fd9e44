//! The `cursors` frame (docs/protocol.md §7.17): every current member's cursors of a chat,
//! read from the chat's partition, for a client that starts without them.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::chat::{cluster3, create_user};
use crate::ws::Ws;

/// The answer's cursors as (user, delivered, read).
fn rows(a: &Value) -> Vec<(String, u64, u64)> {
    assert_eq!(a["type"], "cursors", "{a}");
    a["cursors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["user"].as_str().unwrap().to_string(),
                c["delivered"].as_u64().unwrap(),
                c["read"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_answers_every_current_members_cursors_and_only_to_members() {
    let c = cluster3(&[]).await;
    let ann = create_user(&c, 1, "ann").await;
    let bob = create_user(&c, 1, "bob").await;
    let cat = create_user(&c, 1, "cat").await;
    let mut a = Ws::connect(c.node(1).api, "ann", &ann).await;
    let mut b = Ws::connect(c.node(2).api, "bob", &bob).await;
    let mut k = Ws::connect(c.node(3).api, "cat", &cat).await;
    let (group, _) = a.create_group("g", &["bob", "cat"]).await;
    let ack = a.send_ok(&group, "m1", "hello").await;
    let seq = ack["seq"].as_u64().unwrap();
    b.send_json(&json!({"type": "receipt", "chat": group, "delivered": seq, "read": seq}))
        .await;
    k.send_json(&json!({"type": "receipt", "chat": group, "delivered": seq}))
        .await;
    // Receipts are batched: wait until both are in, as a client starting now would read.
    let deadline = Instant::now() + Duration::from_secs(20);
    let want = vec![
        ("ann".to_string(), 0, 0),
        ("bob".to_string(), seq, seq),
        ("cat".to_string(), seq, 0),
    ];
    loop {
        let got = rows(&a.request(json!({"type": "cursors", "chat": group})).await);
        if got == want {
            break;
        }
        assert!(Instant::now() < deadline, "cursors {got:?}, not {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Cat leaves: no longer listed, and may not ask.
    let left = k.request(json!({"type": "leave", "chat": group})).await;
    assert_eq!(left["type"], "done", "{left}");
    let got = rows(&b.request(json!({"type": "cursors", "chat": group})).await);
    assert_eq!(
        got.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
        ["ann", "bob"]
    );
    let refused = k.request(json!({"type": "cursors", "chat": group})).await;
    assert_eq!(refused["code"], "not_member", "{refused}");
    // Bad input: a bad id, an unknown chat, a missing field.
    let bad = a
        .request(json!({"type": "cursors", "chat": "no spaces"}))
        .await;
    assert_eq!(bad["code"], "invalid_field", "{bad}");
    let unknown = a
        .request(json!({"type": "cursors", "chat": "g:0000000000000000"}))
        .await;
    assert_eq!(unknown["code"], "unknown_chat", "{unknown}");
    let missing = a.request(json!({"type": "cursors"})).await;
    assert_eq!(missing["code"], "invalid_field", "{missing}");
}
