//! Bounded work per request, as clients see it (docs/protocol.md §12): `sync` pages, the
//! per-connection typing bound, typing membership from the node's members cache.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::chat::{bounded, cluster3, create_user};
use crate::ws::Ws;

/// `SYNC_PAGE_CHATS_MAX` (docs/protocol.md §12).
const SYNC_PAGE_CHATS_MAX: usize = 100;
/// `TYPING_CHATS_PER_SESSION_MAX` (docs/protocol.md §12).
const TYPING_CHATS_PER_SESSION_MAX: usize = 64;

/// One `sync` page (retrying `unavailable` for a while).
async fn sync_page(ws: &mut Ws, after: Option<&str>, limit: Option<u64>) -> Value {
    let mut f = json!({"type": "sync"});
    if let Some(a) = after {
        f["after"] = json!(a);
    }
    if let Some(l) = limit {
        f["limit"] = json!(l);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = ws.request(f.clone()).await;
        if a["type"] == "error" && a["code"] == "unavailable" && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        return a;
    }
}

fn chat_ids(page: &Value) -> Vec<String> {
    assert_eq!(page["type"], "chats", "{page}");
    page["chats"]
        .as_array()
        .expect("chats")
        .iter()
        .map(|c| c["chat"].as_str().expect("chat").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounds_sync_pages_a_user_in_more_chats_than_one_page() {
    bounded(async {
        let c = cluster3(&[]).await;
        let token = create_user(&c, 1, "alice").await;
        let mut alice = Ws::connect(c.node(2).api, "alice", &token).await;
        // One chat more than a page: groups of alice alone, created 32 at a time.
        let total = SYNC_PAGE_CHATS_MAX + 1;
        let mut created = BTreeSet::new();
        while created.len() < total {
            let n = (total - created.len()).min(32);
            let ids: Vec<String> = (0..n).map(|_| alice.id()).collect();
            for id in &ids {
                alice
                    .send_json(&json!({"type": "create_group", "id": id, "name": "g"}))
                    .await;
            }
            for id in &ids {
                let a = alice
                    .wait_for(Duration::from_secs(30), |f| f["id"] == id.as_str())
                    .await
                    .expect("create_group answered");
                assert_eq!(a["type"], "done", "{a}");
                created.insert(a["chat"].as_str().expect("chat").to_string());
            }
        }
        let all: Vec<String> = created.into_iter().collect();

        // A client that knows nothing of paging gets the first page and a `next`.
        let first = sync_page(&mut alice, None, None).await;
        assert_eq!(chat_ids(&first), all[..SYNC_PAGE_CHATS_MAX], "sorted by id");
        assert_eq!(first["next"], all[SYNC_PAGE_CHATS_MAX - 1], "{first}");
        let last = sync_page(&mut alice, first["next"].as_str(), None).await;
        assert_eq!(chat_ids(&last), all[SYNC_PAGE_CHATS_MAX..]);
        assert!(
            last.get("next").is_none(),
            "the last page has no next: {last}"
        );

        // Exactly a page's worth after the cursor: full page, and no `next`.
        let exact = sync_page(
            &mut alice,
            Some(all[0].as_str()),
            Some(SYNC_PAGE_CHATS_MAX as u64),
        )
        .await;
        assert_eq!(chat_ids(&exact), all[1..]);
        assert!(exact.get("next").is_none(), "{exact}");

        // Small pages walk the whole list once, in order.
        let mut walked = Vec::new();
        let mut after: Option<String> = None;
        let mut pages = 0;
        loop {
            let p = sync_page(&mut alice, after.as_deref(), Some(7)).await;
            let ids = chat_ids(&p);
            assert!(ids.len() <= 7, "{p}");
            walked.extend(ids);
            pages += 1;
            match p.get("next").and_then(Value::as_str) {
                Some(n) => after = Some(n.to_string()),
                None => break,
            }
        }
        assert_eq!(walked, all);
        assert_eq!(pages, total.div_ceil(7));

        // The bound and the cursor are checked.
        for (frame, why) in [
            (
                json!({"type": "sync", "limit": SYNC_PAGE_CHATS_MAX + 1}),
                "above the page bound",
            ),
            (json!({"type": "sync", "limit": 0}), "zero"),
            (
                json!({"type": "sync", "after": "not a chat id"}),
                "bad cursor",
            ),
            (json!({"type": "sync", "after": ""}), "empty cursor"),
        ] {
            let a = alice.request(frame.clone()).await;
            assert_eq!(a["type"], "error", "{why}: {frame} -> {a}");
            assert_eq!(a["code"], "invalid_field", "{why}: {a}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounds_typing_tracks_at_most_its_bound_of_chats_per_connection() {
    bounded(async {
        let c = cluster3(&[]).await;
        let token = create_user(&c, 1, "alice").await;
        let mut alice = Ws::connect(c.node(1).api, "alice", &token).await;
        // Typing for one chat more than the bound, all within one typing interval: chats
        // that do not exist, so each one that goes through is answered `unknown_chat`.
        let chats: Vec<String> = (0..=TYPING_CHATS_PER_SESSION_MAX)
            .map(|i| format!("g:{i:016x}"))
            .collect();
        let started = Instant::now();
        for chat in &chats {
            alice
                .send_json(&json!({"type": "typing", "chat": chat}))
                .await;
        }
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "the frames must arrive within one interval"
        );
        assert_eq!(
            count_errors(&mut alice, Duration::from_secs(3)).await,
            TYPING_CHATS_PER_SESSION_MAX,
            "one frame per tracked chat goes through; the one over the bound is dropped"
        );
        // Once the tracked chats are older than the interval, a new chat gets through.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        alice
            .send_json(&json!({"type": "typing", "chat": chats[TYPING_CHATS_PER_SESSION_MAX]}))
            .await;
        assert_eq!(count_errors(&mut alice, Duration::from_secs(3)).await, 1);
        alice.ping().await;
    })
    .await;
}

/// Errors (all `unknown_chat`, without id) that arrive until `quiet` passes without one.
async fn count_errors(ws: &mut Ws, quiet: Duration) -> usize {
    let mut n = 0;
    while let Some(e) = ws.wait_for(quiet, |f| f["type"] == "error").await {
        assert_eq!(e["code"], "unknown_chat", "{e}");
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounds_typing_members_come_from_the_cache_and_a_leave_refreshes_them() {
    bounded(async {
        let c = cluster3(&[]).await;
        let alice_token = create_user(&c, 1, "alice").await;
        let bob_token = create_user(&c, 1, "bob").await;
        let mut alice = Ws::connect(c.node(1).api, "alice", &alice_token).await;
        let mut bob = Ws::connect(c.node(2).api, "bob", &bob_token).await;
        let (chat, _) = alice.create_group("g", &["bob"]).await;
        let is_typing = |f: &Value| f["type"] == "typing";
        // Typing reaches bob (alice's node reads and caches the members).
        alice
            .send_json(&json!({"type": "typing", "chat": chat}))
            .await;
        assert!(bob
            .wait_for(Duration::from_secs(20), is_typing)
            .await
            .is_some());
        // Bob leaves. Alice's node delivers the leave to alice after dropping its cached
        // members of the chat, so her next typing frame no longer reaches bob.
        let left = bob.request(json!({"type": "leave", "chat": chat})).await;
        assert_eq!(left["type"], "done", "{left}");
        let seq = left["seq"].as_u64().expect("seq");
        alice
            .wait_for(Duration::from_secs(20), |f| {
                f["type"] == "message" && f["message"]["seq"] == seq
            })
            .await
            .expect("alice sees bob's leave");
        tokio::time::sleep(Duration::from_millis(1100)).await; // the typing interval
        alice
            .send_json(&json!({"type": "typing", "chat": chat}))
            .await;
        assert!(
            bob.wait_for(Duration::from_secs(2), is_typing)
                .await
                .is_none(),
            "a former member gets no typing"
        );
        // And bob's own typing is refused: he is no longer a member.
        bob.send_json(&json!({"type": "typing", "chat": chat}))
            .await;
        let e = bob
            .wait_for(Duration::from_secs(20), |f| f["type"] == "error")
            .await
            .expect("refused");
        assert_eq!(e["code"], "not_member", "{e}");
    })
    .await;
}

/// `CLUSTER_PAGE_GROUPS_MAX` (node/src/api.rs): one page of `GET /v1/admin/cluster`.
const CLUSTER_PAGE_GROUPS_MAX: u64 = 4_097;

/// `GET /v1/admin/cluster` pages its groups: `limit` of them after `after`, each with
/// every replica's view, and `next_after` until the last; a limit past the bound is the
/// bound. Paging through lists every group once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_cluster_view_pages_its_groups() {
    bounded(async {
        let c = cluster3(&[]).await;
        let page = |after: Option<u64>, limit: u64| {
            let mut url = c.url(2, &format!("/v1/admin/cluster?limit={limit}"));
            if let Some(a) = after {
                url.push_str(&format!("&after={a}"));
            }
            let http = c.http.clone();
            async move {
                let v: Value = http.get(url).send().await.unwrap().json().await.unwrap();
                v
            }
        };
        let whole = page(None, CLUSTER_PAGE_GROUPS_MAX + 1_000).await;
        let all: Vec<u64> = whole["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["group"].as_u64().unwrap())
            .collect();
        // Group 0 and every partition, in order, more than one page of 5.
        assert_eq!(all, (0..all.len() as u64).collect::<Vec<_>>(), "{whole}");
        assert!(all.len() > 5, "{whole}");
        assert!(whole["next_after"].is_null(), "{whole}");
        let mut seen = Vec::new();
        let mut after = None;
        let mut pages = 0;
        loop {
            let p = page(after, 5).await;
            let groups = p["partitions"].as_array().unwrap();
            assert!(!groups.is_empty() && groups.len() <= 5, "{p}");
            for g in groups {
                // Each listed replica of a page's group answered for that group.
                let views = g["replica_views"].as_array().unwrap();
                assert_eq!(views.len(), 3, "{g}");
                seen.push(g["group"].as_u64().unwrap());
            }
            pages += 1;
            match p["next_after"].as_u64() {
                Some(n) => {
                    assert_eq!(Some(n), seen.last().copied());
                    after = Some(n);
                }
                None => break,
            }
        }
        assert_eq!(seen, all);
        assert_eq!(pages as u64, all.len().div_ceil(5) as u64);
    })
    .await;
}
