//! Offline notifications by webhook end to end (moved from chat.rs).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::chat::{bounded, cluster3, create_user};
use crate::ws::Ws;

/// A webhook receiver on loopback: records each POSTed JSON body with its arrival time.
async fn webhook_receiver() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<(Instant, Value)>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got: std::sync::Arc<std::sync::Mutex<Vec<(Instant, Value)>>> = Default::default();
    let sink = got.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    let Some(split) = text.find("\r\n\r\n") else {
                        continue;
                    };
                    let len: usize = text[..split]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if buf.len() < split + 4 + len {
                        continue;
                    }
                    let body: Value = serde_json::from_slice(&buf[split + 4..split + 4 + len])
                        .expect("webhook body is JSON");
                    sink.lock().unwrap().push((Instant::now(), body));
                    let _ = s
                        .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                        .await;
                    return;
                }
            });
        }
    });
    (addr, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_offline_member_gets_coalesced_webhook_notifications_and_none_while_online() {
    bounded(async {
        let (hook, got) = webhook_receiver().await;
        let url = format!("http://{hook}/hook");
        let window_ms: u64 = 700;
        let c = cluster3(&["--webhook-url", &url, "--notify-window-ms", "700"]).await;
        let alice_token = create_user(&c, 1, "alice").await;
        let bob_token = create_user(&c, 1, "bob").await;
        let mut alice = Ws::connect(c.node(1).api, "alice", &alice_token).await;
        let chat = alice.open_direct("bob").await;

        // Bob online (on another node): nothing is sent for him.
        let bob = Ws::connect(c.node(2).api, "bob", &bob_token).await;
        for i in 0..5 {
            alice
                .send_ok(&chat, &format!("on{i}"), "while online")
                .await;
        }
        tokio::time::sleep(Duration::from_millis(window_ms * 3)).await;
        assert!(
            got.lock().unwrap().is_empty(),
            "no notification while bob is online: {:?}",
            got.lock().unwrap()
        );

        // Bob offline: one message, then after a pause many.
        bob.close().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let offline_from = Instant::now();
        alice.send_ok(&chat, "off-first", "Hello!").await;
        tokio::time::sleep(Duration::from_millis(window_ms * 3)).await;
        for i in 0..30 {
            alice.send_ok(&chat, &format!("off{i}"), "more").await;
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let total: u64 = got
                .lock()
                .unwrap()
                .iter()
                .map(|(_, b)| b["count"].as_u64().unwrap_or(0))
                .sum();
            if total >= 31 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "notifications missing: {:?}",
                got.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let calls = got.lock().unwrap().clone();
        for (_, body) in &calls {
            assert_eq!(body["user"], "bob", "{body}");
            assert_eq!(body["chats"], json!([chat]), "{body}");
        }
        let total: u64 = calls
            .iter()
            .map(|(_, b)| b["count"].as_u64().unwrap())
            .sum();
        assert_eq!(
            total, 31,
            "every offline message counted exactly once: {calls:?}"
        );
        assert_eq!(
            calls[0].1["text"], "alice: Hello!",
            "one message: its preview"
        );
        assert!(
            calls[1..].iter().any(|(_, b)| b["text"]
                .as_str()
                .is_some_and(|t| t.starts_with("You have ") && t.ends_with(" new messages"))),
            "many messages are coalesced: {calls:?}"
        );
        // At most one notification per window per user.
        for pair in calls.windows(2) {
            let gap = pair[1].0.duration_since(pair[0].0);
            assert!(
                gap >= Duration::from_millis(window_ms - 100),
                "two notifications {gap:?} apart"
            );
        }
        let elapsed = offline_from.elapsed().as_millis() as u64;
        assert!(calls.len() as u64 <= elapsed / window_ms + 1, "{calls:?}");

        // Back online: nothing more.
        let before = got.lock().unwrap().len();
        let mut bob = Ws::connect(c.node(3).api, "bob", &bob_token).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        for i in 0..3 {
            alice
                .send_ok(&chat, &format!("back{i}"), "online again")
                .await;
        }
        tokio::time::sleep(Duration::from_millis(window_ms * 3)).await;
        assert_eq!(got.lock().unwrap().len(), before, "none while online again");
        bob.ping().await;
    })
    .await;
}
