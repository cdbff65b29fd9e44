//! Just enough of the W3C WebDriver protocol to drive Debian's headless Chromium through
//! `chromedriver` (package chromium-driver): sessions, navigation, elements, keys, script,
//! window size and screenshots. chromedriver runs as a child of the test, on loopback,
//! killed by PID when dropped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The WebDriver element key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Driver {
    child: Child,
    base: String,
    http: reqwest::Client,
    _profiles: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn binary(names: &[&str]) -> String {
    for n in names {
        for dir in ["/usr/bin", "/usr/lib/chromium", "/usr/local/bin"] {
            let p = format!("{dir}/{n}");
            if std::path::Path::new(&p).exists() {
                return p;
            }
        }
    }
    panic!("none of {names:?} found: install chromium and chromium-driver (./dev deps does)")
}

impl Driver {
    pub async fn start() -> Driver {
        let port = crate::harness::free_base_port(1);
        let child = Command::new(binary(&["chromedriver"]))
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let d = Driver {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            _profiles: tempfile::tempdir().unwrap(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = d.http.get(format!("{}/status", d.base)).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver never answered");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        d
    }

    /// A new browser (its own profile) with a window of `width` x `height`.
    pub async fn browser(&self, width: u32, height: u32) -> Browser {
        let profile = self._profiles.path().join(format!("p{}", rand_suffix()));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": binary(&["chromium"]),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--no-first-run",
                         format!("--window-size={width},{height}"),
                         format!("--user-data-dir={}", profile.display())],
            }
        }}});
        let v = call(&self.http, "POST", &format!("{}/session", self.base), caps).await;
        let id = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        Browser {
            http: self.http.clone(),
            url: format!("{}/session/{id}", self.base),
        }
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

async fn call(http: &reqwest::Client, method: &str, url: &str, body: Value) -> Value {
    let req = match method {
        "GET" => http.get(url),
        "DELETE" => http.delete(url),
        _ => http.post(url).json(&body),
    };
    let r = req
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let v: Value = r.json().await.unwrap_or(Value::Null);
    v["value"].clone()
}

pub struct Browser {
    http: reqwest::Client,
    url: String,
}

impl Browser {
    async fn post(&self, path: &str, body: Value) -> Value {
        call(&self.http, "POST", &format!("{}{path}", self.url), body).await
    }

    pub async fn goto(&self, url: &str) {
        self.post("/url", json!({ "url": url })).await;
    }

    pub async fn resize(&self, width: u32, height: u32) {
        self.post("/window/rect", json!({"width": width, "height": height}))
            .await;
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its value.
    pub async fn js(&self, script: &str, args: Value) -> Value {
        let v = self
            .post("/execute/sync", json!({"script": script, "args": args}))
            .await;
        assert!(
            !(v.is_object() && v.get("error").is_some()),
            "script failed: {v}\n{script}"
        );
        v
    }

    /// The first element matching `css`, if any.
    pub async fn find(&self, css: &str) -> Option<String> {
        let v = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await;
        v.get(ELEMENT).and_then(Value::as_str).map(str::to_string)
    }

    /// Waits (at most `within`) for an element matching `css`.
    pub async fn wait(&self, css: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(e) = self.find(css).await {
                return e;
            }
            if Instant::now() >= deadline {
                let v = self
                    .post("/element", json!({"using": "css selector", "value": css}))
                    .await;
                panic!(
                    "no {css} within {within:?}: {v}; page: {}",
                    self.text("body").await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `script` (returning a boolean) is true.
    pub async fn until(&self, what: &str, within: Duration, script: &str, args: Value) {
        let deadline = Instant::now() + within;
        loop {
            if self.js(script, args.clone()).await == json!(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {within:?}; page: {}",
                self.text("body").await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the element; again if the page re-rendered it between finding and clicking
    /// (a stale element).
    pub async fn click(&self, css: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let e = self.wait(css, Duration::from_secs(20)).await;
            let v = self.post(&format!("/element/{e}/click"), json!({})).await;
            match v.get("error").and_then(Value::as_str) {
                None => return,
                Some(err) => assert!(Instant::now() < deadline, "clicking {css}: {err}: {v}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Types `text` into the element (`\u{E007}` is Enter).
    pub async fn type_into(&self, css: &str, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let e = self.wait(css, Duration::from_secs(20)).await;
            let v = self
                .post(&format!("/element/{e}/value"), json!({ "text": text }))
                .await;
            match v.get("error").and_then(Value::as_str) {
                None => return,
                Some(err) => assert!(Instant::now() < deadline, "typing into {css}: {err}: {v}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The text of the first element matching `css` ("" if none).
    pub async fn text(&self, css: &str) -> String {
        self.js(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';",
            json!([css]),
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// A PNG screenshot of the page.
    pub async fn screenshot(&self, path: &std::path::Path) {
        let v = call(
            &self.http,
            "GET",
            &format!("{}/screenshot", self.url),
            Value::Null,
        )
        .await;
        let b64 = v.as_str().expect("a screenshot");
        std::fs::write(path, base64_decode(b64)).unwrap();
    }

    pub async fn quit(self) {
        call(&self.http, "DELETE", &self.url, Value::Null).await;
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            _ => 63,
        }
    };
    let clean: Vec<u8> = s.bytes().filter(|c| *c != b'=' && *c != b'\n').collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c) << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len().saturating_sub(1)]);
    }
    out
}
