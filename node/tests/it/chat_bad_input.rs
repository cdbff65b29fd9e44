//! Bad client input end to end (moved from chat.rs): every malformed, oversized or
//! forbidden frame gets its typed error and changes nothing.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use futures::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::chat::{assert_error, assert_no_receipt, bounded, cluster3, create_user, DELIVERY};
use crate::ws::{self, Ws};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_bad_input_gets_typed_errors_and_changes_nothing() {
    bounded(async {
        let c = cluster3(&[]).await;
        let mut t = HashMap::new();
        for u in ["alice", "bob", "carol", "mallory"] {
            t.insert(u, create_user(&c, 1, u).await);
        }
        // A connection that never authenticates is closed after the auth timeout (5 s).
        let silent = ws::open(c.node(1).api, None).await.unwrap();

        let mut alice = Ws::connect(c.node(1).api, "alice", &t["alice"]).await;
        let mut bob = Ws::connect(c.node(2).api, "bob", &t["bob"]).await;
        let chat = alice.open_direct("bob").await;
        for i in 1..=3 {
            alice.send_ok(&chat, &format!("a{i}"), &format!("keep {i}")).await;
        }
        let before = alice.full_history(&chat).await;
        assert_eq!(before.len(), 3);

        // Mallory (not in the chat) authenticates with an auth frame instead of the header.
        let stream = ws::open(c.node(3).api, None).await.unwrap();
        let mut m = Ws::from_stream("mallory", stream);
        m.send_json(&json!({"type": "auth", "token": t["mallory"]})).await;
        m.expect_ready().await;

        // Unparseable frames: typed errors, the connection stays usable.
        for (frame, code, id) in [
            ("{", "malformed", None),
            ("[1]", "malformed", None),
            (r#"{"type":5,"id":"n"}"#, "malformed", Some("n")),
            (r#"{"type":"fly","id":"t1"}"#, "unknown_type", Some("t1")),
            (r#"{"type":"send","id":"t2"}"#, "invalid_field", Some("t2")),
            (
                r#"{"type":"history","id":"t3","chat":"d:alice:bob","limit":"x"}"#,
                "invalid_field",
                Some("t3"),
            ),
            (r#"{"type":"ping","id":"t4","extra":1}"#, "invalid_field", Some("t4")),
            (r#"{"type":"sync","id":7}"#, "invalid_field", None),
        ] {
            m.send_text(frame).await;
            let e = m.recv_frame(ws::ANSWER).await;
            assert_error(&e, code, id);
            if id.is_none() {
                assert!(e.get("id").is_none(), "{e}");
            }
            m.ping().await;
        }
        // Well-formed requests the gateway refuses by value.
        let long = "x".repeat(65);
        for (frame, code) in [
            (
                json!({"type": "send", "chat": "no spaces", "client_msg_id": "c", "text": "x"}),
                "invalid_field",
            ),
            (
                json!({"type": "send", "chat": chat, "client_msg_id": "", "text": "x"}),
                "invalid_field",
            ),
            (
                json!({"type": "send", "chat": chat, "client_msg_id": long, "text": "x"}),
                "invalid_field",
            ),
            (
                json!({"type": "send", "chat": chat, "client_msg_id": "big", "text": "y".repeat(16 * 1024 + 1)}),
                "too_large",
            ),
            (json!({"type": "history", "chat": chat, "limit": 0}), "invalid_field"),
            (json!({"type": "history", "chat": chat, "limit": 101}), "invalid_field"),
            (
                json!({"type": "history", "chat": chat, "before": 5, "after": 1}),
                "invalid_field",
            ),
            (json!({"type": "open_direct", "user": "nobody"}), "unknown_user"),
            (json!({"type": "open_direct", "user": "mallory"}), "invalid_field"),
            // Unknown chats.
            (
                json!({"type": "send", "chat": "g:0000000000000000", "client_msg_id": "u1", "text": "x"}),
                "unknown_chat",
            ),
            (json!({"type": "history", "chat": "g:0000000000000000"}), "unknown_chat"),
            // Direct chats a first send does not open: someone else's, one with oneself,
            // one written out of order, one with a user that does not exist.
            (
                json!({"type": "send", "chat": "d:bob:carol", "client_msg_id": "u2", "text": "x"}),
                "unknown_chat",
            ),
            (
                json!({"type": "send", "chat": "d:mallory:mallory", "client_msg_id": "u3", "text": "x"}),
                "unknown_chat",
            ),
            (
                json!({"type": "send", "chat": "d:mallory:bob", "client_msg_id": "u4", "text": "x"}),
                "unknown_chat",
            ),
            (
                json!({"type": "send", "chat": "d:mallory:nobody", "client_msg_id": "u5", "text": "x"}),
                "unknown_user",
            ),
            // A chat mallory is not in.
            (
                json!({"type": "send", "chat": chat, "client_msg_id": "n1", "text": "intrusion"}),
                "not_member",
            ),
            (json!({"type": "history", "chat": chat}), "not_member"),
            (
                json!({"type": "edit", "chat": chat, "seq": 1, "text": "intrusion"}),
                "not_member",
            ),
            (json!({"type": "delete", "chat": chat, "seq": 1}), "not_member"),
        ] {
            let id = m.id();
            let mut frame = frame;
            frame["id"] = json!(id);
            let e = m.request(frame.clone()).await;
            assert_error(&e, code, Some(&id));
        }
        // A second authentication is refused (it has no id to answer with).
        m.send_json(&json!({"type": "auth", "token": t["mallory"]})).await;
        let e = m.recv_frame(ws::ANSWER).await;
        assert_error(&e, "invalid_field", None);
        // A receipt in someone else's chat is ignored (and tells nobody).
        m.send_json(&json!({"type": "receipt", "chat": chat, "delivered": 3, "read": 3}))
            .await;
        assert_no_receipt(&mut alice, &chat, "mallory", Duration::from_millis(500)).await;
        m.ping().await;

        // A flood past the send rate limit (burst 200, 50/s): the excess is refused, the rest
        // stored, and the connection stays usable.
        let flood = m.open_direct("carol").await;
        const FLOOD: usize = 400;
        let mut ids = HashMap::new();
        for i in 0..FLOOD {
            let id = m.id();
            ids.insert(id.clone(), i);
            m.stream
                .feed(Message::text(
                    json!({"type": "send", "id": id, "chat": flood,
                           "client_msg_id": format!("f{i}"), "text": format!("flood {i}")})
                    .to_string(),
                ))
                .await
                .unwrap();
        }
        m.stream.flush().await.unwrap();
        let mut acked = BTreeSet::new();
        let mut limited = 0;
        while !ids.is_empty() {
            let f = m.recv_frame(ws::ANSWER).await;
            let Some(i) = f["id"].as_str().and_then(|id| ids.remove(id)) else {
                assert_eq!(f["type"], "message", "{f}");
                continue;
            };
            if f["type"] == "ack" {
                acked.insert(format!("flood {i}"));
            } else {
                assert_error(&f, "rate_limited", None);
                limited += 1;
            }
        }
        eprintln!("flood: {} acked, {limited} rate limited", acked.len());
        assert!(limited > 0, "400 sends at once must exceed the burst of 200");
        assert!(acked.len() >= 150, "the burst is honoured: {} acked", acked.len());
        m.ping().await;
        let texts = |h: Vec<Value>| -> Vec<String> {
            h.iter()
                .map(|x| x["text"].as_str().unwrap().to_string())
                .collect()
        };
        let stored = texts(m.full_history(&flood).await);
        assert_eq!(stored.len(), acked.len(), "no duplicates: {stored:?}");
        let stored: BTreeSet<String> = stored.into_iter().collect();
        assert_eq!(stored, acked, "exactly the acked sends are stored");
        tokio::time::sleep(Duration::from_millis(500)).await;
        m.send_ok(&flood, "after-flood", "tokens refill").await;

        // Oversized and unreadable frames, and bad tokens, each on a connection of its own.
        let close_of = |mut ws: Ws, what: &'static str| async move {
            let (frames, code) = ws.expect_close(Duration::from_secs(10)).await;
            (frames, code, what)
        };
        // Larger than 64 KiB (up to 128 KiB): refused with too_large (no id: the frame is not
        // read), and the connection stays usable (docs/protocol.md, "Size").
        let mut big = Ws::connect(c.node(3).api, "mallory", &t["mallory"]).await;
        let pad = "z".repeat(70 * 1024);
        big.send_json(&json!({"type": "send", "id": "big", "chat": flood,
                              "client_msg_id": "big", "text": "big", "pad": pad}))
            .await;
        let e = big.recv_frame(ws::ANSWER).await;
        assert_error(&e, "too_large", None);
        assert!(e.get("id").is_none(), "{e}");
        big.ping().await;
        big.close().await;
        // Far larger than the bound (over the codec's limit too): closed with 4009.
        let mut huge = Ws::connect(c.node(3).api, "mallory", &t["mallory"]).await;
        let pad = "z".repeat(300 * 1024);
        let _ = huge
            .send_message(Message::text(json!({"type": "ping", "pad": pad}).to_string()))
            .await;
        let (frames, code, what) = close_of(huge, "huge").await;
        assert_eq!(code, Some(4009), "{what}: {frames:?}");
        // A binary frame.
        let mut bin = Ws::connect(c.node(3).api, "mallory", &t["mallory"]).await;
        bin.send_message(Message::binary(b"{\"type\":\"ping\"}".to_vec()))
            .await
            .unwrap();
        let (frames, code, what) = close_of(bin, "binary").await;
        assert_eq!(code, Some(4009), "{what}: {frames:?}");
        // A text frame that is not UTF-8 (written raw: the client library would refuse).
        let mut bad = Ws::connect(c.node(3).api, "mallory", &t["mallory"]).await;
        bad.send_message(ws::raw_text_frame(b"{\"type\":\"ping\",\"id\":\"\xff\xfe\"}".to_vec()))
            .await
            .unwrap();
        let (frames, code, what) = close_of(bad, "invalid utf-8").await;
        assert_eq!(code, Some(4009), "{what}: {frames:?}");
        assert!(frames.is_empty(), "{what}: {frames:?}");
        // Wrong tokens, in the header or in the auth frame.
        let wrong = ws::open(c.node(2).api, Some(&"0".repeat(64))).await.unwrap();
        let (frames, code, _) = close_of(Ws::from_stream("?", wrong), "bad token").await;
        assert_eq!(code, Some(4001), "{frames:?}");
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_error(&frames[0], "unauthorized", None);
        let stream = ws::open(c.node(2).api, None).await.unwrap();
        let mut wrong = Ws::from_stream("?", stream);
        wrong.send_json(&json!({"type": "auth", "token": "nope"})).await;
        let (frames, code, _) = close_of(wrong, "bad auth frame").await;
        assert_eq!(code, Some(4001), "{frames:?}");
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_error(&frames[0], "unauthorized", None);
        // No auth at all.
        let (frames, code, _) = close_of(Ws::from_stream("?", silent), "no auth").await;
        assert_eq!(code, Some(4002), "{frames:?}");

        // Mallory's main connection survived all of it; nothing stored changed; the others
        // were not disturbed.
        m.ping().await;
        assert_eq!(alice.full_history(&chat).await, before);
        let mut expected: Vec<String> = acked.into_iter().collect();
        expected.push("tokens refill".to_string());
        let mut stored = texts(m.full_history(&flood).await);
        stored.sort();
        expected.sort();
        assert_eq!(stored, expected, "the refused frames stored nothing");
        let a = bob.send_ok(&chat, "b1", "still here").await;
        assert_eq!(a["seq"], 4, "{a}");
        let got = alice
            .wait_for(DELIVERY, |f| f["type"] == "message" && f["message"]["seq"] == 4)
            .await
            .expect("alice gets bob's message");
        assert_eq!(got["message"]["text"], "still here");
        assert_eq!(alice.take_pending(|f| f["type"] == "error"), Vec::<Value>::new());
        alice.ping().await;
    })
    .await;
}
