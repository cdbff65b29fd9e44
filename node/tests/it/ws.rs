//! A small WebSocket client for chatd's `/v1/ws`: JSON text frames, request/answer matching
//! by `id`, and a buffer for the frames that arrive while an answer is awaited.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Stream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a request waits for its answer.
pub const ANSWER: Duration = Duration::from_secs(30);

/// What the server sent next.
#[derive(Debug, Clone)]
pub enum Event {
    /// A JSON text frame.
    Frame(Value),
    /// The connection ended: with a close frame and its code, or without one (`None`).
    Closed(Option<u16>),
}

/// Opens a WebSocket to `api` with `Authorization: Bearer <token>` when a token is given.
pub async fn open(api: SocketAddr, token: Option<&str>) -> Result<Stream, tungstenite::Error> {
    let mut req = format!("ws://{api}/v1/ws").into_client_request()?;
    if let Some(t) = token {
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("header value"),
        );
    }
    let (stream, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(req),
    )
    .await
    .map_err(|_| tungstenite::Error::Io(std::io::Error::other("connect timed out")))??;
    Ok(stream)
}

/// A text frame whose payload is `bytes` as is (may be invalid UTF-8).
pub fn raw_text_frame(bytes: Vec<u8>) -> Message {
    Message::Frame(Frame::message(bytes, OpCode::Data(Data::Text), true))
}

/// One client session.
pub struct Ws {
    pub user: String,
    pub stream: Stream,
    /// Frames read while waiting for something else, oldest first.
    pub pending: VecDeque<Value>,
    next_id: u64,
    closed: Option<Option<u16>>,
}

impl Ws {
    /// Wraps an open stream (no frame read yet).
    pub fn from_stream(user: &str, stream: Stream) -> Self {
        Ws {
            user: user.to_string(),
            stream,
            pending: VecDeque::new(),
            next_id: 0,
            closed: None,
        }
    }

    /// Connects as `user` with its token in the header and waits for `ready`.
    pub async fn connect(api: SocketAddr, user: &str, token: &str) -> Self {
        let stream = open(api, Some(token))
            .await
            .unwrap_or_else(|e| panic!("{user} cannot connect to {api}: {e}"));
        let mut ws = Ws::from_stream(user, stream);
        ws.expect_ready().await;
        ws
    }

    /// Reads the first frame, which must be `ready` for this user.
    pub async fn expect_ready(&mut self) {
        let first = self.recv_frame(Duration::from_secs(10)).await;
        assert_eq!(first["type"], "ready", "{}: first frame {first}", self.user);
        assert_eq!(first["user"], self.user.as_str(), "{first}");
        assert!(first["session"].as_str().is_some(), "{first}");
    }

    /// A fresh request id.
    pub fn id(&mut self) -> String {
        self.next_id += 1;
        format!("{}-{}", self.user, self.next_id)
    }

    pub async fn send_message(&mut self, m: Message) -> Result<(), tungstenite::Error> {
        self.stream.send(m).await
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        let text: String = text.into();
        self.stream
            .send(Message::text(text))
            .await
            .unwrap_or_else(|e| panic!("{}: send failed: {e}", self.user));
    }

    pub async fn send_json(&mut self, v: &Value) {
        self.send_text(v.to_string()).await;
    }

    /// The next event from the wire (the pending buffer is not looked at), or `None` when
    /// nothing arrived within `timeout`.
    pub async fn recv_wire(&mut self, timeout: Duration) -> Option<Event> {
        if let Some(c) = self.closed {
            return Some(Event::Closed(c));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return None,
                Ok(n) => n,
            };
            let event = match next {
                None | Some(Err(_)) => Event::Closed(None),
                Some(Ok(Message::Close(f))) => {
                    Event::Closed(Some(f.map_or(1005, |f| f.code.into())))
                }
                Some(Ok(Message::Text(t))) => {
                    Event::Frame(serde_json::from_str(t.as_str()).unwrap_or_else(|e| {
                        panic!("{}: server sent non-JSON {t:?}: {e}", self.user)
                    }))
                }
                Some(Ok(other)) => {
                    assert!(
                        matches!(other, Message::Ping(_) | Message::Pong(_)),
                        "{}: unexpected message {other:?}",
                        self.user
                    );
                    continue;
                }
            };
            if let Event::Closed(c) = event {
                self.closed = Some(c);
            }
            return Some(event);
        }
    }

    /// The next event: pending frames first, then the wire.
    pub async fn recv(&mut self, timeout: Duration) -> Option<Event> {
        if let Some(f) = self.pending.pop_front() {
            return Some(Event::Frame(f));
        }
        self.recv_wire(timeout).await
    }

    /// The next frame; panics if the connection ended or nothing came within `timeout`.
    pub async fn recv_frame(&mut self, timeout: Duration) -> Value {
        match self.recv(timeout).await {
            Some(Event::Frame(f)) => f,
            Some(Event::Closed(c)) => panic!("{}: connection closed ({c:?})", self.user),
            None => panic!("{}: no frame within {timeout:?}", self.user),
        }
    }

    /// The first frame (pending or new) matching `pred` within `timeout`; frames that do
    /// not match stay pending. Panics if the connection ends.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        if let Some(i) = self.pending.iter().position(&pred) {
            return self.pending.remove(i);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_wire(left).await {
                None => return None,
                Some(Event::Closed(c)) => {
                    panic!("{}: connection closed ({c:?}) while waiting", self.user)
                }
                Some(Event::Frame(f)) if pred(&f) => return Some(f),
                Some(Event::Frame(f)) => self.pending.push_back(f),
            }
        }
    }

    /// Takes every pending frame matching `pred`.
    pub fn take_pending(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let (hit, keep): (Vec<Value>, Vec<Value>) = self.pending.drain(..).partition(|f| pred(f));
        self.pending = keep.into();
        hit
    }

    /// Reads until the connection ends; returns the frames read and the close code (None:
    /// ended without a close frame). Panics if it stays open for `timeout`.
    pub async fn expect_close(&mut self, timeout: Duration) -> (Vec<Value>, Option<u16>) {
        let mut frames: Vec<Value> = self.pending.drain(..).collect();
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_wire(left).await {
                None => panic!(
                    "{}: connection still open after {timeout:?}; frames {frames:?}",
                    self.user
                ),
                Some(Event::Closed(c)) => return (frames, c),
                Some(Event::Frame(f)) => frames.push(f),
            }
        }
    }

    /// Sends `frame` (given an `id` if it has none) and returns the answer carrying that id.
    pub async fn request(&mut self, mut frame: Value) -> Value {
        if frame.get("id").is_none() {
            frame["id"] = Value::String(self.id());
        }
        let id = frame["id"].clone();
        self.send_json(&frame).await;
        self.wait_for(ANSWER, |f| f.get("id") == Some(&id))
            .await
            .unwrap_or_else(|| panic!("{}: no answer to {frame} within {ANSWER:?}", self.user))
    }

    pub async fn ping(&mut self) {
        let id = self.id();
        let pong = self.request(json!({"type": "ping", "id": id})).await;
        assert_eq!(pong, json!({"type": "pong", "id": id}));
    }

    /// `open_direct` with `user`; returns the chat id.
    pub async fn open_direct(&mut self, user: &str) -> String {
        let a = self
            .request(json!({"type": "open_direct", "user": user}))
            .await;
        assert_eq!(a["type"], "done", "open_direct {user}: {a}");
        a["chat"].as_str().expect("chat").to_string()
    }

    /// `create_group`; returns the chat id and the seq of the last join entry.
    pub async fn create_group(&mut self, name: &str, members: &[&str]) -> (String, u64) {
        let a = self
            .request(json!({"type": "create_group", "name": name, "members": members}))
            .await;
        assert_eq!(a["type"], "done", "create_group: {a}");
        (
            a["chat"].as_str().expect("chat").to_string(),
            a["seq"].as_u64().expect("seq"),
        )
    }

    /// One send; returns the answer (ack or error).
    pub async fn send(&mut self, chat: &str, client_msg_id: &str, text: &str) -> Value {
        self.request(json!({
            "type": "send", "chat": chat, "client_msg_id": client_msg_id, "text": text
        }))
        .await
    }

    /// One send that must be acked; returns the ack.
    pub async fn send_ok(&mut self, chat: &str, client_msg_id: &str, text: &str) -> Value {
        let a = self.send(chat, client_msg_id, text).await;
        assert_eq!(a["type"], "ack", "{}: send {client_msg_id}: {a}", self.user);
        a
    }

    /// One history page (answer or error).
    pub async fn history(
        &mut self,
        chat: &str,
        before: Option<u64>,
        after: Option<u64>,
        limit: Option<u32>,
    ) -> Value {
        let mut f = json!({"type": "history", "chat": chat});
        if let Some(b) = before {
            f["before"] = json!(b);
        }
        if let Some(a) = after {
            f["after"] = json!(a);
        }
        if let Some(l) = limit {
            f["limit"] = json!(l);
        }
        self.request(f).await
    }

    /// The whole visible history of `chat`, paging forward; retries "unavailable" (no
    /// leader yet) for a while.
    pub async fn full_history(&mut self, chat: &str) -> Vec<Value> {
        let mut out: Vec<Value> = Vec::new();
        let mut after = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let page = self.history(chat, None, Some(after), Some(100)).await;
            if page["type"] == "error" && page["code"] == "unavailable" && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            assert_eq!(
                page["type"], "history",
                "{}: history of {chat}: {page}",
                self.user
            );
            let msgs = page["messages"].as_array().expect("messages").clone();
            let more = page["more"].as_bool().expect("more");
            if let Some(last) = msgs.last() {
                after = last["seq"].as_u64().expect("seq");
            }
            let empty = msgs.is_empty();
            out.extend(msgs);
            if !more || empty {
                return out;
            }
        }
    }

    /// The caller's chats (`sync`), retrying "unavailable" for a while.
    pub async fn sync(&mut self) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let a = self.request(json!({"type": "sync"})).await;
            if a["type"] == "error" && a["code"] == "unavailable" && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            assert_eq!(a["type"], "chats", "{}: sync: {a}", self.user);
            return a["chats"].as_array().expect("chats").clone();
        }
    }

    /// `sync`, and the state of one chat in it.
    pub async fn chat_state(&mut self, chat: &str) -> Value {
        let chats = self.sync().await;
        chats
            .iter()
            .find(|c| c["chat"] == chat)
            .cloned()
            .unwrap_or_else(|| panic!("{}: {chat} not in sync answer {chats:?}", self.user))
    }

    /// Closes the connection politely and waits for it to end.
    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match self.recv_wire(Duration::from_millis(500)).await {
                Some(Event::Closed(_)) => return,
                _ => continue,
            }
        }
    }
}
