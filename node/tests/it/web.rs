//! The web client (issue 15) in real headless Chromium (Debian's chromium and
//! chromium-driver, over WebDriver) against a real 3-node cluster: two people on two nodes
//! chat and see their marks move, a third sees only its span of a group, history scrolls
//! back 500 messages, a drained node's page moves to another node and shows what was sent
//! meanwhile exactly once, attachments show thumbnails, errors are said plainly, and E2E
//! chats (whose keys a browser does not hold) are marked and never show their ciphertext.
//! Screenshots of the main screens are saved (see [`shots_dir`]).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::chat::{create_user, READY};
use crate::harness::Cluster;
use crate::webdriver::{Browser, Driver};
use crate::ws::Ws;

const WAIT: Duration = Duration::from_secs(30);
const ENTER: &str = "\u{E007}";

/// Where screenshots go: `$CHATD_WEB_SCREENSHOTS`, else `web-screenshots` under the cargo
/// target directory.
fn shots_dir() -> PathBuf {
    let dir = std::env::var_os("CHATD_WEB_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("target"));
            target.join("web-screenshots")
        });
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn cluster(files: &[(&str, &str)]) -> Cluster {
    let mut c = Cluster::init(3, &[]);
    for (k, v) in files {
        c.set_config("files", k, v);
    }
    c.start_all();
    c.wait_ready(READY).await;
    c
}

/// Opens the client of node `id` signed in with `token` (the sign-in link) and waits until
/// it is connected as `user`.
async fn sign_in(b: &Browser, c: &Cluster, id: u64, user: &str, token: &str) {
    b.goto(&format!("http://{}/#token={token}", c.node(id).api))
        .await;
    b.until(
        &format!("{user} signed in"),
        WAIT,
        "return document.getElementById('me-name').textContent === arguments[0]
             && document.getElementById('conn-state').dataset.state === 'up';",
        json!([user]),
    )
    .await;
}

/// Waits until the status mark of my last message in the open chat is `what`.
async fn last_status_is(b: &Browser, what: &str) {
    b.until(
        &format!("the last message is {what}"),
        WAIT,
        "const s = [...document.querySelectorAll('#messages .msg.mine .status')].pop();
         return !!s && s.dataset.status === arguments[0];",
        json!([what]),
    )
    .await;
}

/// The texts of the open chat's messages, in order.
async fn texts(b: &Browser) -> Vec<String> {
    let v = b
        .js(
            "return [...document.querySelectorAll('#messages .msg .text')].map(e => e.textContent);",
            json!([]),
        )
        .await;
    serde_json::from_value(v).unwrap()
}

async fn shows_text(b: &Browser, text: &str) {
    b.until(
        &format!("{text:?} shown"),
        WAIT,
        "return [...document.querySelectorAll('#messages .msg .text')]
             .some(e => e.textContent === arguments[0]);",
        json!([text]),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_two_people_on_two_nodes_chat_see_marks_and_a_third_sees_only_its_span() {
    let c = cluster(&[]).await;
    let ann = create_user(&c, 1, "ann").await;
    let bob = create_user(&c, 1, "bob").await;
    let cat = create_user(&c, 1, "cat").await;
    let d = Driver::start().await;
    let a = d.browser(1280, 800).await;
    let b = d.browser(1280, 800).await;
    // Time to interactive on loopback, and what the page weighs as transferred.
    let started = Instant::now();
    sign_in(&a, &c, 1, "ann", &ann).await;
    let interactive = started.elapsed();
    let weight = a
        .js(
            "const n = performance.getEntriesByType('navigation')[0];
             const r = performance.getEntriesByType('resource')
                 .filter(e => /\\.(js|css)$/.test(e.name));
             return {bytes: n.transferSize + r.reduce((s, e) => s + e.transferSize, 0),
                     dom_interactive_ms: n.domInteractive,
                     load_ms: n.loadEventEnd};",
            json!([]),
        )
        .await;
    eprintln!(
        "web client: signed in and connected {} ms after navigation; {weight}",
        interactive.as_millis()
    );
    sign_in(&b, &c, 2, "bob", &bob).await;

    // Ann opens a direct chat with Bob and writes.
    a.click("#new-direct").await;
    a.type_into("#f-user", "bob").await;
    a.click("#dialog-ok").await;
    a.until(
        "the chat with bob open",
        WAIT,
        "return document.getElementById('chat-title').textContent === 'bob';",
        json!([]),
    )
    .await;
    a.type_into("#input", &format!("hello bob{ENTER}")).await;
    // Stored (✓); Bob's page, on another node, holds it (✓✓) before he opens the chat; his
    // list counts it unread.
    b.wait("#chat-list button[data-chat='d:ann:bob']", WAIT)
        .await;
    last_status_is(&a, "delivered").await;
    b.until(
        "one unread",
        WAIT,
        "const u = document.querySelector(\"#chat-list button[data-chat='d:ann:bob'] .unread\");
         return !!u && u.textContent === '1';",
        json!([]),
    )
    .await;
    // Bob opens it: read.
    b.click("#chat-list button[data-chat='d:ann:bob']").await;
    shows_text(&b, "hello bob").await;
    last_status_is(&a, "read").await;
    // Bob types (Ann sees it), then answers with Enter; Shift+Enter is a new line.
    b.type_into("#input", "hi ann").await;
    a.until(
        "bob is typing",
        WAIT,
        "return document.getElementById('typing').textContent.includes('bob is typing');",
        json!([]),
    )
    .await;
    b.type_into("#input", "\u{E008}\u{E007}\u{E000}second line")
        .await;
    b.type_into("#input", ENTER).await;
    shows_text(&a, "hi ann\nsecond line").await;
    // Presence: Ann sees Bob online.
    a.until(
        "bob online",
        WAIT,
        "return document.getElementById('chat-sub').textContent === 'online';",
        json!([]),
    )
    .await;
    // Ann edits her message; Bob sees the new text.
    a.js(
        "document.querySelector('#messages .msg.mine .tools button').click(); return true;",
        json!([]),
    )
    .await;
    a.wait("#messages .msg textarea", WAIT).await;
    a.js(
        "const t = document.querySelector('#messages .msg textarea');
         t.value = ''; t.dispatchEvent(new Event('input')); return true;",
        json!([]),
    )
    .await;
    a.type_into("#messages .msg textarea", &format!("hello Bob!{ENTER}"))
        .await;
    shows_text(&b, "hello Bob!").await;

    // A group: Ann creates it with Bob, writes, then adds Cat, who sees only from its join.
    a.click("#new-group").await;
    a.type_into("#f-name", "team").await;
    a.type_into("#f-members", "bob").await;
    a.click("#dialog-ok").await;
    a.until(
        "the group open",
        WAIT,
        "return document.getElementById('chat-title').textContent === 'team';",
        json!([]),
    )
    .await;
    let group = a
        .js(
            "return decodeURIComponent(location.hash.slice('#chat='.length));",
            json!([]),
        )
        .await
        .as_str()
        .unwrap()
        .to_string();
    assert!(group.starts_with("g:"), "{group}");
    a.type_into("#input", &format!("before cat{ENTER}")).await;
    last_status_is(&a, "delivered").await;
    a.click("#members-button").await;
    a.type_into("#f-add", "cat").await;
    a.click("#dialog-ok").await;
    a.type_into("#input", &format!("after cat{ENTER}")).await;
    let k = d.browser(1280, 800).await;
    sign_in(&k, &c, 3, "cat", &cat).await;
    k.click(&format!("#chat-list button[data-chat='{group}']"))
        .await;
    shows_text(&k, "after cat").await;
    assert_eq!(texts(&k).await, vec!["after cat".to_string()]);
    assert!(
        k.text("#messages").await.contains("cat joined"),
        "{}",
        k.text("#messages").await
    );
    // Cat read it; Bob has not opened the group: read by 1 of 2.
    a.until(
        "read by 1 of 2",
        WAIT,
        "const s = [...document.querySelectorAll('#messages .msg.mine .status')].pop();
         return !!s && s.textContent.includes('read by 1 of 2');",
        json!([]),
    )
    .await;

    // Ann moves to node 3 from the menu's list of nodes and goes on.
    let node3 = c.node(3).api.to_string();
    a.click("#menu-button").await;
    a.click("#nodes-button").await;
    a.click(&format!("#dialog button[data-node='{node3}']"))
        .await;
    a.until(
        "connected to node 3",
        WAIT,
        "const s = document.getElementById('conn-state');
         return s.dataset.state === 'up' && s.dataset.node === arguments[0];",
        json!([node3]),
    )
    .await;
    a.type_into("#input", &format!("from node 3{ENTER}")).await;
    k.until(
        "cat reads what ann sent from node 3",
        WAIT,
        "return [...document.querySelectorAll('#messages .msg .text')]
             .some(e => e.textContent === 'from node 3');",
        json!([]),
    )
    .await;
    // Screenshots: desktop and phone width.
    let dir = shots_dir();
    a.screenshot(&dir.join("desktop-group.png")).await;
    b.screenshot(&dir.join("desktop-direct.png")).await;
    a.resize(390, 844).await;
    a.screenshot(&dir.join("phone-chat.png")).await;
    a.click("#back").await;
    a.wait("#chat-list", WAIT).await;
    a.screenshot(&dir.join("phone-list.png")).await;
    let s = d.browser(1280, 800).await;
    s.goto(&format!("http://{}/", c.node(1).api)).await;
    s.wait("#signin-form", WAIT).await;
    s.screenshot(&dir.join("desktop-signin.png")).await;
    eprintln!("web client screenshots in {}", dir.display());
    for x in [a, b, k, s] {
        x.quit().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_assets_are_gzipped_cached_and_locked_down_and_the_file_api_answers_cors() {
    let c = cluster(&[]).await;
    let page = c
        .http
        .get(c.url(2, "/"))
        .header("accept-encoding", "gzip, br")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let h = page.headers().clone();
    assert_eq!(h["content-encoding"], "gzip");
    assert!(h["content-type"].to_str().unwrap().starts_with("text/html"));
    let csp = h["content-security-policy"].to_str().unwrap().to_string();
    for id in 1..=3 {
        let ws = format!("ws://{}", c.node(id).api);
        assert!(csp.contains(&ws), "{csp} lacks {ws}");
    }
    assert!(
        csp.starts_with("default-src 'none'") && !csp.contains("unsafe"),
        "{csp}"
    );
    let gz = page.bytes().await.unwrap();
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "gzip bytes");
    // Unchanged: 304 without a body; without gzip: the plain page.
    let etag = h["etag"].to_str().unwrap();
    let again = c
        .http
        .get(c.url(1, "/"))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(
        again.status(),
        304,
        "the same build has the same ETag on every node"
    );
    let plain = c.http.get(c.url(1, "/js/main.js")).send().await.unwrap();
    assert_eq!(plain.status(), 200);
    assert!(plain.headers().get("content-encoding").is_none());
    assert!(plain.text().await.unwrap().contains("import"));
    assert_eq!(
        c.http
            .get(c.url(1, "/js/nope.js"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    // The nodes, without a token; CORS on the file API for a page of another node.
    let nodes: serde_json::Value = c
        .http
        .get(c.url(3, "/v1/nodes"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let addrs: Vec<String> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["state"] == "active")
        .map(|n| n["api_addr"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(addrs.len(), 3, "{nodes}");
    let pre = c
        .http
        .request(reqwest::Method::OPTIONS, c.url(1, "/v1/files"))
        .header("origin", format!("http://{}", c.node(2).api))
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, upload-length",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(pre.status(), 204);
    assert_eq!(pre.headers()["access-control-allow-origin"], "*");
    assert!(pre.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("upload-length"));
    let unauthorized = c.http.get(c.url(1, "/v1/quota")).send().await.unwrap();
    assert_eq!(unauthorized.status(), 401);
    assert_eq!(unauthorized.headers()["access-control-allow-origin"], "*");
    // The admin API stays same-origin.
    let admin = c
        .http
        .request(reqwest::Method::OPTIONS, c.url(1, "/v1/admin/users"))
        .header("origin", "http://elsewhere")
        .send()
        .await
        .unwrap();
    assert!(admin.headers().get("access-control-allow-origin").is_none());
}

/// Sends `text` as `client_msg_id` until it is acknowledged (a drain moves leaders).
async fn send_surely(ws: &mut Ws, chat: &str, id: &str, text: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let a = ws.send(chat, id, text).await;
        if a["type"] == "ack" {
            return;
        }
        assert!(Instant::now() < deadline, "{text} never acknowledged: {a}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_history_scrolls_back_500_and_a_drained_nodes_page_catches_up_exactly_once() {
    let mut c = cluster(&[]).await;
    let ann = create_user(&c, 1, "ann").await;
    let bob = create_user(&c, 1, "bob").await;
    let mut ws = Ws::connect(c.node(1).api, "ann", &ann).await;
    let chat = ws.open_direct("bob").await;
    let sent: Vec<String> = (1..=500).map(|i| format!("m{i}")).collect();
    for (i, t) in sent.iter().enumerate() {
        send_surely(&mut ws, &chat, &format!("k{i}"), t).await;
    }
    let d = Driver::start().await;
    let b = d.browser(1280, 800).await;
    sign_in(&b, &c, 2, "bob", &bob).await;
    b.click(&format!("#chat-list button[data-chat='{chat}']"))
        .await;
    shows_text(&b, "m500").await;
    // Scrolling up loads older pages until the start of the history.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = b
            .js(
                "const m = document.getElementById('messages'); m.scrollTop = 0;
                 return !!document.querySelector(\"#messages li[data-seq='1']\");",
                json!([]),
            )
            .await;
        if done == json!(true) {
            break;
        }
        assert!(Instant::now() < deadline, "history never reached seq 1");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(texts(&b).await, sent, "every message once, in order");

    // Node 2 drains (SIGTERM): the page moves to another node; what Ann sends meanwhile
    // shows exactly once.
    let node2 = c.node(2).api.to_string();
    c.signal(2, "TERM");
    // Bob writes as the drain begins: stored once, whichever node takes it.
    b.type_into("#input", &format!("bob during drain{ENTER}"))
        .await;
    let mut expect = sent.clone();
    for i in 1..=5 {
        let t = format!("during drain {i}");
        send_surely(&mut ws, &chat, &format!("d{i}"), &t).await;
        expect.push(t);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    b.until(
        "connected to another node",
        WAIT,
        "const s = document.getElementById('conn-state');
         return s.dataset.state === 'up' && s.dataset.node !== arguments[0];",
        json!([node2]),
    )
    .await;
    shows_text(&b, "during drain 5").await;
    b.until(
        "bob's message acknowledged",
        WAIT,
        "return !document.querySelector('#messages .pending')
             && [...document.querySelectorAll('#messages .msg.mine .text')]
                  .some(e => e.textContent === 'bob during drain');",
        json!([]),
    )
    .await;
    let got = texts(&b).await;
    let bobs = got.iter().filter(|t| *t == "bob during drain").count();
    assert_eq!(bobs, 1, "bob's message once: {got:?}");
    let others: Vec<String> = got
        .into_iter()
        .filter(|t| t != "bob during drain")
        .collect();
    assert_eq!(others, expect, "nothing lost, nothing twice");
    let stored = ws.full_history(&chat).await;
    assert_eq!(
        stored
            .iter()
            .filter(|m| m["text"] == "bob during drain")
            .count(),
        1,
        "stored once"
    );
    assert!(c.wait_exit(2, Duration::from_secs(30)).is_some());
    b.quit().await;
}

fn png(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 128])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_attachments_show_thumbnails_and_errors_are_said_plainly() {
    let c = cluster(&[("max_bytes", "1048576")]).await;
    let ann = create_user(&c, 1, "ann").await;
    let bob = create_user(&c, 1, "bob").await;
    let cat = create_user(&c, 1, "cat").await;
    let mut ws = Ws::connect(c.node(1).api, "ann", &ann).await;
    let chat = ws.open_direct("bob").await;
    send_surely(&mut ws, &chat, "first", "here comes a picture").await;
    let d = Driver::start().await;
    let a = d.browser(1280, 800).await;
    sign_in(&a, &c, 1, "ann", &ann).await;
    a.click(&format!("#chat-list button[data-chat='{chat}']"))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let picture = dir.path().join("picture.png");
    std::fs::write(&picture, png(900, 600)).unwrap();
    a.js(
        "document.getElementById('attach').hidden = false; return true;",
        json!([]),
    )
    .await;
    a.type_into("#attach", picture.to_str().unwrap()).await;
    // Uploaded (with its progress bar while it goes) and sent.
    a.until(
        "the picture sent",
        WAIT,
        "return [...document.querySelectorAll('#messages .msg.mine .file button')]
             .some(b => b.textContent.includes('picture.png'))
             && !document.querySelector('#messages .pending');",
        json!([]),
    )
    .await;
    // Bob, on node 3, sees the thumbnail (fetched with his token through the chat).
    let b = d.browser(1280, 800).await;
    sign_in(&b, &c, 3, "bob", &bob).await;
    b.click(&format!("#chat-list button[data-chat='{chat}']"))
        .await;
    b.until(
        "the thumbnail shown",
        WAIT,
        "const i = document.querySelector('#messages .file img');
         return !!i && i.complete && i.naturalWidth === 320;",
        json!([]),
    )
    .await;
    assert!(b.text("#messages").await.contains("picture.png"));
    shots(&b, "desktop-attachment.png").await;
    // Too large a file: said, nothing sent.
    let big = dir.path().join("big.bin");
    std::fs::write(&big, vec![7u8; 2 << 20]).unwrap();
    a.type_into("#attach", big.to_str().unwrap()).await;
    a.until(
        "the oversize file refused",
        WAIT,
        "const t = document.getElementById('toast');
         return !t.hidden && t.textContent.includes('big.bin') && t.textContent.includes('too large');",
        json!([]),
    )
    .await;
    // A wrong token: the sign-in page says so.
    let x = d.browser(1280, 800).await;
    x.goto(&format!("http://{}/#token=not-a-token", c.node(2).api))
        .await;
    x.until(
        "the token refused",
        WAIT,
        "const e = document.getElementById('signin-error');
         return !e.hidden && e.textContent.includes('unknown or disabled');",
        json!([]),
    )
    .await;
    // A chat the user is not in: said, nothing shown, nothing to type into.
    let k = d.browser(1280, 800).await;
    sign_in(&k, &c, 2, "cat", &cat).await;
    k.js(
        "location.hash = '#chat=' + encodeURIComponent(arguments[0]); return true;",
        json!([chat]),
    )
    .await;
    k.until(
        "not a member said",
        WAIT,
        "const n = document.getElementById('notice');
         return !n.hidden && n.textContent.includes('not a member')
             && document.getElementById('composer').hidden;",
        json!([]),
    )
    .await;
    assert!(texts(&k).await.is_empty());
    for x in [a, b, x, k] {
        x.quit().await;
    }
}

async fn shots(b: &Browser, name: &str) {
    b.screenshot(&shots_dir().join(name)).await;
}

/// An E2E chat in the browser, which holds no MLS keys: it is marked, its entries say what
/// they are (never their base64), and there is no composer to send plaintext into it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_marks_e2e_chats_and_never_shows_their_ciphertext() {
    let c = cluster(&[]).await;
    let ann = create_user(&c, 1, "ann").await;
    let bob = create_user(&c, 1, "bob").await;
    let mut ws = Ws::connect(c.node(1).api, "ann", &ann).await;
    let done = ws
        .request(json!({"type": "create_e2e", "name": "", "direct": true}))
        .await;
    let chat = done["chat"].as_str().unwrap().to_string();
    // "secret-ciphertext" in base64: what must never be shown.
    let data = "c2VjcmV0LWNpcGhlcnRleHQ=";
    let commit = ws
        .request(
            json!({"type": "e2e_send", "chat": chat, "client_msg_id": "c0",
            "kind": "commit", "epoch": 0, "data": data, "welcome": data, "add": ["bob"]}),
        )
        .await;
    assert_eq!(commit["type"], "ack", "{commit}");
    let app = ws
        .request(
            json!({"type": "e2e_send", "chat": chat, "client_msg_id": "m1",
            "kind": "application", "epoch": 1, "data": data}),
        )
        .await;
    assert_eq!(app["type"], "ack", "{app}");
    let d = Driver::start().await;
    let b = d.browser(1280, 800).await;
    sign_in(&b, &c, 2, "bob", &bob).await;
    b.click(&format!("#chat-list button[data-chat='{chat}']"))
        .await;
    b.until(
        "the encrypted message shown as such",
        WAIT,
        "return [...document.querySelectorAll('#messages li.e2e')]
             .some(e => e.textContent === 'ann: 🔒 Encrypted message');",
        json!([]),
    )
    .await;
    let page = b.js("return document.body.innerText;", json!([])).await;
    let page = page.as_str().unwrap();
    assert!(!page.contains(data), "ciphertext shown: {page}");
    assert!(page.contains("🔒 ann"), "the chat is not marked: {page}");
    assert!(page.contains("End-to-end encrypted"), "{page}");
    let composer_hidden = b
        .js(
            "return document.getElementById('composer').hidden;",
            json!([]),
        )
        .await;
    assert_eq!(composer_hidden, json!(true));
    b.screenshot(&shots_dir().join("e2e-chat.png")).await;
    b.quit().await;
}
