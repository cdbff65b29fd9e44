//! E2E chats and KeyPackages (docs/protocol.md §20) over real WebSockets on a 3-node
//! cluster: every bad frame gets its typed error and changes nothing, a KeyPackage is
//! handed out once even to claimers on different nodes, the bounds hold, and one commit
//! per epoch wins when two members commit at once.

use std::collections::BTreeSet;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::chat::{assert_error, bounded, cluster3, create_user};
use crate::ws::{Ws, ANSWER};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn packages(prefix: &str, n: usize, expires: u64) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"data": b64(format!("{prefix}-{i}").as_bytes()), "expires": expires}))
        .collect()
}

async fn available(ws: &mut Ws, user: &str) -> Vec<(String, u64, bool)> {
    let a = ws.request(json!({"type": "devices", "user": user})).await;
    assert_eq!(a["type"], "devices", "{a}");
    a["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["device"].as_str().unwrap().to_string(),
                d["available"].as_u64().unwrap(),
                d["last_resort"].as_bool().unwrap(),
            )
        })
        .collect()
}

async fn claim(ws: &mut Ws, user: &str) -> Vec<String> {
    let a = ws
        .request(json!({"type": "key_packages_claim", "user": user}))
        .await;
    assert_eq!(a["type"], "key_packages", "{a}");
    a["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["data"].as_str().unwrap().to_string())
        .collect()
}

/// Alice, Bob and Carol, connected to nodes 1, 2 and 3.
async fn three_people(c: &crate::harness::Cluster) -> [Ws; 3] {
    let mut out = Vec::new();
    for (node, u) in [(1, "alice"), (2, "bob"), (3, "carol")] {
        let token = create_user(c, 1, u).await;
        out.push(Ws::connect(c.node(node).api, u, &token).await);
    }
    <[Ws; 3]>::try_from(out).unwrap_or_else(|_| unreachable!("three connections"))
}

fn e2e_send(chat: &str, cmid: &str, kind: &str, epoch: u64, data: &[u8]) -> Value {
    json!({"type": "e2e_send", "chat": chat, "client_msg_id": cmid, "kind": kind,
        "epoch": epoch, "data": b64(data)})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_packages_are_claimed_once_across_nodes_within_their_bounds() {
    bounded(async {
        let c = cluster3(&[]).await;
        let [mut alice, mut bob, mut carol] = three_people(&c).await;
        let expires = now_ms() + 3_600_000;
        let up = bob
            .request(json!({"type": "key_packages_upload", "device": "phone",
                "packages": packages("kp", 5, expires)}))
            .await;
        assert_eq!(
            up["devices"],
            json!([{"device": "phone", "available": 5, "last_resort": false}])
        );

        // Refused uploads change nothing.
        let big = b64(&[7u8; 2049]);
        for (frame, code) in [
            (
                json!({"type": "key_packages_upload", "device": "bad id", "packages": packages("x", 1, expires)}),
                "invalid_field",
            ),
            (
                json!({"type": "key_packages_upload", "device": "phone", "packages": [{"data": "not base64!", "expires": expires}]}),
                "invalid_field",
            ),
            (
                json!({"type": "key_packages_upload", "device": "phone", "packages": [{"data": big, "expires": expires}]}),
                "invalid_field",
            ),
            (
                json!({"type": "key_packages_upload", "device": "phone", "packages": packages("x", 21, expires)}),
                "too_large",
            ),
            (
                json!({"type": "key_packages_upload", "device": "phone", "packages": packages("x", 1, now_ms() - 1)}),
                "invalid_field",
            ),
            (
                json!({"type": "key_packages_upload", "device": "phone", "packages": packages("x", 1, now_ms() + 91 * 86_400_000)}),
                "invalid_field",
            ),
            (
                json!({"type": "key_packages_upload", "device": "phone", "packages": []}),
                "invalid_field",
            ),
            (
                json!({"type": "key_packages_claim", "user": "nobody"}),
                "unknown_user",
            ),
        ] {
            let a = bob.request(frame.clone()).await;
            assert_error(&a, code, None);
        }
        assert_eq!(
            available(&mut alice, "bob").await,
            [("phone".to_string(), 5, false)]
        );

        // Six claims at once from two nodes: the five packages each go to one claimer.
        let (a, b) = tokio::join!(
            async {
                let mut got = Vec::new();
                for _ in 0..3 {
                    got.extend(claim(&mut alice, "bob").await);
                }
                got
            },
            async {
                let mut got = Vec::new();
                for _ in 0..3 {
                    got.extend(claim(&mut carol, "bob").await);
                }
                got
            }
        );
        let all: Vec<String> = a.into_iter().chain(b).collect();
        let distinct: BTreeSet<&String> = all.iter().collect();
        assert_eq!(all.len(), 5, "{all:?}");
        assert_eq!(distinct.len(), 5, "a KeyPackage was handed out twice: {all:?}");
        assert_eq!(
            available(&mut bob, "bob").await,
            [("phone".to_string(), 0, false)]
        );
        // The last-resort package: handed out when nothing else is left, and kept.
        let last = json!({"data": b64(b"last"), "expires": expires});
        bob.request(json!({"type": "key_packages_upload", "device": "phone",
            "packages": [], "last_resort": last}))
            .await;
        for _ in 0..2 {
            assert_eq!(claim(&mut carol, "bob").await, [b64(b"last")]);
        }

        // At most 5 devices; retiring one makes room.
        for d in ["d2", "d3", "d4", "d5"] {
            let a = bob
                .request(json!({"type": "key_packages_upload", "device": d,
                    "packages": packages(d, 1, expires)}))
                .await;
            assert_eq!(a["type"], "devices", "{a}");
        }
        let a = bob
            .request(json!({"type": "key_packages_upload", "device": "d6",
                "packages": packages("d6", 1, expires)}))
            .await;
        assert_error(&a, "limit_reached", None);
        let a = bob
            .request(json!({"type": "retire_device", "device": "d5"}))
            .await;
        assert_eq!(a["devices"], json!([]), "{a}");
        let a = bob
            .request(json!({"type": "retire_device", "device": "d5"}))
            .await;
        assert_error(&a, "invalid_field", None);
        let a = bob
            .request(json!({"type": "key_packages_upload", "device": "d6",
                "packages": packages("d6", 1, expires)}))
            .await;
        assert_eq!(a["type"], "devices", "{a}");
        // At most 100 unclaimed per device.
        for i in 0..5 {
            let a = bob
                .request(json!({"type": "key_packages_upload", "device": "d6",
                    "packages": packages(&format!("d6-{i}"), if i == 0 { 19 } else { 20 }, expires)}))
                .await;
            assert_eq!(a["type"], "devices", "{a}");
        }
        assert!(available(&mut bob, "bob")
            .await
            .contains(&("d6".to_string(), 100, false)));
        let a = bob
            .request(json!({"type": "key_packages_upload", "device": "d6",
                "packages": packages("over", 1, expires)}))
            .await;
        assert_error(&a, "limit_reached", None);
        assert!(available(&mut bob, "bob")
            .await
            .contains(&("d6".to_string(), 100, false)));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_chats_take_opaque_messages_and_one_commit_per_epoch() {
    bounded(async {
        let c = cluster3(&[]).await;
        let [mut alice, mut bob, mut carol] = three_people(&c).await;
        let done = alice
            .request(json!({"type": "create_e2e", "name": "", "direct": false}))
            .await;
        let chat = done["chat"].as_str().unwrap().to_string();
        assert!(chat.starts_with("e:"), "{done}");
        assert_eq!(done["seq"], 1);

        // Refused: plaintext, bad fields, welcomes and members outside commits.
        let plain = alice
            .request(json!({"type": "send", "chat": chat, "client_msg_id": "p", "text": "hi"}))
            .await;
        assert_error(&plain, "forbidden", None);
        let mut bad_kind = e2e_send(&chat, "k", "secret", 0, b"x");
        bad_kind["kind"] = json!("secret");
        let mut bad_b64 = e2e_send(&chat, "k", "application", 0, b"x");
        bad_b64["data"] = json!("!!!");
        let mut welcome_alone = e2e_send(&chat, "k", "application", 0, b"x");
        welcome_alone["welcome"] = json!(b64(b"w"));
        let mut add_alone = e2e_send(&chat, "k", "application", 0, b"x");
        add_alone["add"] = json!(["bob"]);
        let mut add_nobody = e2e_send(&chat, "k", "commit", 0, b"x");
        add_nobody["add"] = json!(["nobody"]);
        for (frame, code) in [
            (bad_kind, "invalid_field"),
            (bad_b64, "invalid_field"),
            (
                e2e_send(&chat, "k", "application", 0, &[1u8; 46_001]),
                "invalid_field",
            ),
            (welcome_alone, "invalid_field"),
            (add_alone, "invalid_field"),
            (
                e2e_send(&chat, "k", "application", 1, b"ahead"),
                "invalid_field",
            ),
            (e2e_send(&chat, "k", "commit", 3, b"stale"), "stale_epoch"),
            (add_nobody, "unknown_user"),
            (e2e_send("g:0", "k", "application", 0, b"x"), "unknown_chat"),
        ] {
            let a = alice.request(frame.clone()).await;
            assert_error(&a, code, None);
        }
        let added = alice
            .request(json!({"type": "add_members", "chat": chat, "users": ["bob"]}))
            .await;
        assert_error(&added, "forbidden", None);
        assert_eq!(
            alice.full_history(&chat).await.len(),
            1,
            "only the creator's join"
        );

        // Alice's commit adds Bob and Carol; each is pushed the welcome.
        let mut commit = e2e_send(&chat, "c0", "commit", 0, b"commit-0");
        commit["add"] = json!(["bob", "carol"]);
        commit["welcome"] = json!(b64(b"welcome-1"));
        let ack = alice.request(commit.clone()).await;
        assert_eq!(
            (ack["type"].as_str(), ack["seq"].as_u64()),
            (Some("ack"), Some(2)),
            "{ack}"
        );
        for ws in [&mut bob, &mut carol] {
            let w = ws
                .wait_for(ANSWER, |f| {
                    f["type"] == "message" && f["message"]["kind"] == "mls_welcome"
                })
                .await
                .expect("welcome pushed");
            assert_eq!(w["message"]["text"], b64(b"welcome-1"));
            assert_eq!(w["message"]["epoch"], 1);
            assert_eq!(ws.chat_state(&chat).await["kind"], "e2e");
        }
        // A retry of the winning commit answers the original, even after the epoch moved.
        let again = alice.request(commit).await;
        assert_eq!(
            (again["seq"].as_u64(), again["duplicate"].as_bool()),
            (Some(2), Some(true))
        );

        // Bob and Carol commit on epoch 1 at once, from two nodes: one wins.
        let (b, cr) = tokio::join!(
            bob.request(e2e_send(&chat, "cb", "commit", 1, b"bob-commit")),
            carol.request(e2e_send(&chat, "cc", "commit", 1, b"carol-commit")),
        );
        let outcomes: BTreeSet<&str> = [&b, &cr]
            .iter()
            .map(|a| a["type"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(outcomes, BTreeSet::from(["ack", "error"]), "{b} {cr}");
        let lost = if b["type"] == "error" { &b } else { &cr };
        assert_error(lost, "stale_epoch", None);
        let app = bob
            .request(e2e_send(&chat, "m1", "application", 1, b"late but fine"))
            .await;
        assert_eq!(app["type"], "ack", "{app}");

        // The log: one commit per epoch, in order; Bob and Carol joined after the first.
        let history = carol.full_history(&chat).await;
        let commits: Vec<u64> = history
            .iter()
            .filter(|m| m["kind"] == "mls_commit")
            .map(|m| m["epoch"].as_u64().unwrap())
            .collect();
        assert_eq!(
            commits,
            [1],
            "Carol sees only the commit after her join: {history:?}"
        );
        let all = alice.full_history(&chat).await;
        let kinds: Vec<&str> = all.iter().map(|m| m["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "join",
                "mls_commit",
                "join",
                "join",
                "mls_welcome",
                "mls_commit",
                "mls_application"
            ]
        );
        let epochs: Vec<u64> = all
            .iter()
            .filter(|m| m["kind"] == "mls_commit")
            .map(|m| m["epoch"].as_u64().unwrap())
            .collect();
        assert_eq!(epochs, [0, 1]);
        // Edits never; a member may leave.
        let seq = app["seq"].as_u64().unwrap();
        let edit = bob
            .request(json!({"type": "edit", "chat": chat, "seq": seq, "text": "x"}))
            .await;
        assert_error(&edit, "forbidden", None);
        let left = carol.request(json!({"type": "leave", "chat": chat})).await;
        assert_eq!(left["type"], "done", "{left}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_package_writes_share_the_senders_rate_limit() {
    bounded(async {
        let mut c = crate::harness::Cluster::init(3, &[]);
        c.set_everywhere("gateway", "send_burst", toml::Value::Float(4.0));
        c.set_everywhere("gateway", "send_rate_per_sec", toml::Value::Float(0.1));
        c.start_all();
        c.wait_ready(crate::chat::READY).await;
        let bob_token = create_user(&c, 1, "bob").await;
        let mallory_token = create_user(&c, 1, "mallory").await;
        let mut bob = Ws::connect(c.node(1).api, "bob", &bob_token).await;
        let mut mallory = Ws::connect(c.node(2).api, "mallory", &mallory_token).await;
        let expires = now_ms() + 3_600_000;
        let up = bob
            .request(json!({"type": "key_packages_upload", "device": "phone",
                "packages": packages("kp", 10, expires)}))
            .await;
        assert_eq!(up["type"], "devices", "{up}");
        // A flood of claims: the burst (4) is served, then `rate_limited`, and the
        // KeyPackages it did not take are still there.
        let mut served: u64 = 0;
        let mut limited: u64 = 0;
        for _ in 0..10 {
            let a = mallory
                .request(json!({"type": "key_packages_claim", "user": "bob"}))
                .await;
            match a["type"].as_str() {
                Some("key_packages") => served += 1,
                _ => {
                    assert_error(&a, "rate_limited", None);
                    limited += 1;
                }
            }
        }
        assert!((4..=5).contains(&served), "{served} served");
        assert_eq!(served + limited, 10);
        assert_eq!(
            available(&mut bob, "bob").await,
            [("phone".to_string(), 10 - served, false)]
        );
    })
    .await;
}
