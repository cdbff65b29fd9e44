//! The WebSocket side of a chatd node (`/v1/ws`): connecting with a user token, sending
//! client frames, and reading server frames, with request/answer matching by `id`.
//!
//! [`Connection::recv`] is cancel-safe, so it can sit in a `tokio::select!` next to
//! keyboard input and timers; [`Connection::request`] is for one-shot commands: it sends
//! a request and waits for its answer, keeping the pushes that arrive meanwhile for later
//! [`Connection::recv`] calls.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chatd_proto::{ClientFrame, ServerFrame};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use reqwest::Url;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::client::{cause_chain, server_url, snippet, ApiErrorBody, CliError};

type Stream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Frames kept while a request waits for its answer (pushes that arrive meanwhile);
/// beyond it the connection is given up (sessions reconnect and catch up with history).
pub const STASH_FRAMES_MAX: usize = 10_000;

/// How often long-lived sessions (`tail`, `chat`) send a `ping` (the server closes
/// connections silent for 60 s).
pub const PING_INTERVAL: Duration = Duration::from_secs(20);

/// What `chat-cli` says when a messaging command has no user token.
pub const NO_USER_TOKEN: &str =
    "no token: pass --token, set CHATD_TOKEN, or put `token` in the config file";
/// What `chat-cli` says when the server refuses the user token (`unauthorized`).
pub const USER_TOKEN_REFUSED: &str =
    "the token was refused (unknown or disabled user, or not a user token); pass --token or set CHATD_TOKEN";

/// Said when the server ends a session because its token stopped working (close 4004).
pub const USER_TOKEN_REVOKED: &str =
    "the server ended the session: this token was revoked (the user was disabled or its token rotated); ask an operator for a new token";

/// The WebSocket URL of the node at `server`: `http` becomes `ws`, `https` `wss`, and
/// `v1/ws` is appended to the base path.
pub fn ws_url(server: &str) -> Result<Url, CliError> {
    let base = server_url(server)?;
    let mut url = base.join("v1/ws").map_err(|e| CliError::BadServer {
        given: server.to_string(),
        reason: e.to_string(),
    })?;
    let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
    url.set_scheme(scheme).map_err(|()| CliError::BadServer {
        given: server.to_string(),
        reason: format!("cannot use the scheme {scheme}"),
    })?;
    Ok(url)
}

/// A frame from the server: its text, as JSON, and as a known frame type (`None` for
/// frame types this client does not know, which it ignores).
#[derive(Clone, Debug)]
pub struct Incoming {
    /// The frame's text as received.
    pub raw: String,
    /// The frame as JSON.
    pub value: serde_json::Value,
    /// The frame, if its type is known.
    pub frame: Option<ServerFrame>,
}

impl Incoming {
    /// Parses a text frame; `None` if it is not a JSON object.
    pub fn parse(raw: &str) -> Option<Incoming> {
        let value: serde_json::Value = serde_json::from_str(raw).ok()?;
        if !value.is_object() {
            return None;
        }
        let frame = serde_json::from_value(value.clone()).ok();
        Some(Incoming {
            raw: raw.to_string(),
            value,
            frame,
        })
    }

    /// The request id the frame answers, if any.
    pub fn id(&self) -> Option<&str> {
        self.value.get("id").and_then(|v| v.as_str())
    }

    /// `(code, message)` when this is an `error` frame.
    pub fn error(&self) -> Option<(&str, &str)> {
        match &self.frame {
            Some(ServerFrame::Error { code, message, .. }) => Some((code, message)),
            _ => None,
        }
    }

    /// The frame as compact JSON without its request `id` (for `--json` output).
    pub fn without_id(&self) -> serde_json::Value {
        let mut v = self.value.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("id");
        }
        v
    }
}

/// The names of chatd's close codes, for messages.
pub fn close_reason_name(code: u16) -> &'static str {
    use chatd_proto::close;
    match code {
        close::UNAUTHORIZED => "unauthorized",
        close::AUTH_TIMEOUT => "authentication timeout",
        close::TOO_MANY_SESSIONS => "too many sessions",
        close::SLOW_CONSUMER => "slow consumer",
        close::BAD_FRAME => "bad frame",
        close::IDLE => "idle",
        close::GOING_AWAY => "node going away",
        close::REVOKED => "token revoked",
        close::SERVER_FULL => "server full",
        1000 => "normal closure",
        _ => "closed",
    }
}

/// A client-chosen message id: unique per user across chats (time, process and a
/// counter), so a retry of the same send can reuse it.
pub fn new_client_msg_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("cli-{nanos:x}-{:x}-{n}", std::process::id())
}

/// One authenticated WebSocket session.
pub struct Connection {
    sink: SplitSink<Stream, Message>,
    stream: SplitStream<Stream>,
    url: String,
    user: String,
    session: String,
    next_id: u64,
    timeout: Duration,
    /// Frames read while waiting for an answer, oldest first.
    stash: VecDeque<Incoming>,
    /// The close code, once the server closed the connection with one.
    close_code: Option<u16>,
}

impl Connection {
    /// Connects to `server` with `token` in the `Authorization` header and waits for
    /// `ready`. Each step is bounded by `timeout`.
    pub async fn connect(
        server: &str,
        token: Option<&str>,
        timeout: Duration,
    ) -> Result<Connection, CliError> {
        Self::connect_from(server, token, timeout, None).await
    }

    /// [`Self::connect`] from the local address `source` (port chosen by the system): a
    /// probe holding more sessions than one source address has ports spreads them over
    /// several (127.0.0.2, 127.0.0.3, ... on loopback). `ws://` only.
    pub async fn connect_from(
        server: &str,
        token: Option<&str>,
        timeout: Duration,
        source: Option<std::net::IpAddr>,
    ) -> Result<Connection, CliError> {
        let url = ws_url(server)?;
        let shown = url.to_string();
        let Some(token) = token.map(str::trim).filter(|t| !t.is_empty()) else {
            return Err(CliError::NoToken(NO_USER_TOKEN.to_string()));
        };
        let mut req = url
            .as_str()
            .into_client_request()
            .map_err(|e| CliError::BadServer {
                given: server.to_string(),
                reason: e.to_string(),
            })?;
        let mut auth = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            CliError::BadToken("it contains characters not allowed in a header".into())
        })?;
        auth.set_sensitive(true);
        req.headers_mut().insert(AUTHORIZATION, auth);
        let unreachable = |cause: String| CliError::Unreachable {
            url: shown.clone(),
            cause,
        };
        let handshake = async {
            match source {
                None => tokio_tungstenite::connect_async_with_config(req, None, true).await,
                Some(source) => {
                    let (host, port) = match (
                        url.scheme(),
                        url.host_str(),
                        url.port_or_known_default(),
                    ) {
                        ("ws", Some(h), Some(p)) => (h.to_string(), p),
                        _ => return Err(tokio_tungstenite::tungstenite::Error::Url(
                            tokio_tungstenite::tungstenite::error::UrlError::UnsupportedUrlScheme,
                        )),
                    };
                    let addr = tokio::net::lookup_host((host.as_str(), port))
                        .await?
                        .find(|a| a.is_ipv4() == source.is_ipv4())
                        .ok_or_else(|| {
                            std::io::Error::other(format!(
                                "{host} has no address of the source's family"
                            ))
                        })?;
                    let socket = if source.is_ipv4() {
                        tokio::net::TcpSocket::new_v4()?
                    } else {
                        tokio::net::TcpSocket::new_v6()?
                    };
                    socket.bind(std::net::SocketAddr::new(source, 0))?;
                    let tcp = socket.connect(addr).await?;
                    tcp.set_nodelay(true)?;
                    tokio_tungstenite::client_async_with_config(
                        req,
                        tokio_tungstenite::MaybeTlsStream::Plain(tcp),
                        None,
                    )
                    .await
                }
            }
        };
        let (stream, _) = tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| unreachable(format!("no answer within {} ms", timeout.as_millis())))?
            .map_err(|e| handshake_error(&shown, e))?;
        let (sink, stream) = stream.split();
        let mut conn = Connection {
            sink,
            stream,
            url: shown.clone(),
            user: String::new(),
            session: String::new(),
            next_id: 0,
            timeout,
            stash: VecDeque::new(),
            close_code: None,
        };
        let first = tokio::time::timeout(timeout, conn.recv_wire())
            .await
            .map_err(|_| unreachable(format!("no `ready` within {} ms", timeout.as_millis())))?;
        let first = match first {
            Ok(f) => f,
            // Closed with 4001 before its `unauthorized` frame was read: the same refusal.
            Err(_) if conn.close_code == Some(chatd_proto::close::UNAUTHORIZED) => {
                return Err(CliError::TokenRefused(USER_TOKEN_REFUSED.to_string()))
            }
            Err(_) if conn.close_code == Some(chatd_proto::close::REVOKED) => {
                return Err(CliError::TokenRefused(USER_TOKEN_REVOKED.to_string()))
            }
            Err(e) => return Err(e),
        };
        match first.frame {
            Some(ServerFrame::Ready { user, session }) => {
                conn.user = user;
                conn.session = session;
                Ok(conn)
            }
            Some(ServerFrame::Error { code, .. }) if code == chatd_proto::code::UNAUTHORIZED => {
                Err(CliError::TokenRefused(USER_TOKEN_REFUSED.to_string()))
            }
            Some(ServerFrame::Error { code, message, .. }) => Err(CliError::Failed(format!(
                "{code}: {message} (chatd at {shown})"
            ))),
            _ => Err(CliError::Malformed {
                url: shown,
                cause: format!("expected `ready`, got {}", snippet(&first.raw)),
            }),
        }
    }

    /// The authenticated user.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The server's session id.
    pub fn session(&self) -> &str {
        &self.session
    }

    /// The WebSocket URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The close code the server sent, once it closed the connection with one.
    pub fn close_code(&self) -> Option<u16> {
        self.close_code
    }

    /// A fresh request id.
    pub fn next_id(&mut self) -> String {
        self.next_id += 1;
        self.next_id.to_string()
    }

    /// Sends one client frame.
    pub async fn send(&mut self, frame: &ClientFrame) -> Result<(), CliError> {
        let text = serde_json::to_string(frame)
            .map_err(|e| CliError::Failed(format!("cannot encode a frame: {e}")))?;
        self.sink
            .send(Message::text(text))
            .await
            .map_err(|e| self.lost(&e))
    }

    /// The next server frame: those kept by [`Connection::request`] first, then from the
    /// wire. Cancel-safe. An error means the connection is over.
    pub async fn recv(&mut self) -> Result<Incoming, CliError> {
        if let Some(f) = self.stash.pop_front() {
            return Ok(f);
        }
        self.recv_wire().await
    }

    async fn recv_wire(&mut self) -> Result<Incoming, CliError> {
        loop {
            match self.stream.next().await {
                Some(Ok(Message::Text(t))) => {
                    if let Some(f) = Incoming::parse(t.as_str()) {
                        return Ok(f);
                    }
                    // Not a JSON object: not something this client can use; skip it.
                }
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = match frame {
                        Some(CloseFrame { code, reason }) => {
                            (Some(u16::from(code)), reason.as_str().to_string())
                        }
                        None => (None, String::new()),
                    };
                    self.close_code = code;
                    let cause = match code {
                        Some(c) if reason.is_empty() => {
                            format!(
                                "the server closed the connection ({c} {})",
                                close_reason_name(c)
                            )
                        }
                        Some(c) => format!(
                            "the server closed the connection ({c} {}: {reason})",
                            close_reason_name(c)
                        ),
                        None => "the server closed the connection".to_string(),
                    };
                    return Err(CliError::Unreachable {
                        url: self.url.clone(),
                        cause,
                    });
                }
                Some(Ok(_)) => {} // binary, ping, pong: nothing to do (pongs are automatic)
                Some(Err(e)) => return Err(self.lost(&e)),
                None => {
                    return Err(CliError::Unreachable {
                        url: self.url.clone(),
                        cause: "the connection ended".to_string(),
                    })
                }
            }
        }
    }

    /// Sends the frame `make(id)` and waits for its answer (any frame with that `id`,
    /// `error` frames included), within the timeout. Other frames are kept for
    /// [`Connection::recv`].
    pub async fn request_raw(
        &mut self,
        make: impl FnOnce(String) -> ClientFrame,
    ) -> Result<Incoming, CliError> {
        let id = self.next_id();
        self.send(&make(id.clone())).await?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let next = tokio::time::timeout_at(deadline.into(), self.recv_wire()).await;
            let frame = match next {
                Ok(f) => f?,
                Err(_) => {
                    return Err(CliError::Unreachable {
                        url: self.url.clone(),
                        cause: format!("no answer within {} ms", self.timeout.as_millis()),
                    })
                }
            };
            if frame.id() == Some(id.as_str()) {
                return Ok(frame);
            }
            if self.stash.len() >= STASH_FRAMES_MAX {
                return Err(CliError::Unreachable {
                    url: self.url.clone(),
                    cause: format!(
                        "more than {STASH_FRAMES_MAX} frames arrived while waiting for an answer"
                    ),
                });
            }
            self.stash.push_back(frame);
        }
    }

    /// Like [`Connection::request_raw`], with an `error` answer turned into an error:
    /// `"<code>: <message>"`.
    pub async fn request(
        &mut self,
        make: impl FnOnce(String) -> ClientFrame,
    ) -> Result<Incoming, CliError> {
        let answer = self.request_raw(make).await?;
        match answer.error() {
            Some((code, message)) => Err(refused(code, message)),
            None => Ok(answer),
        }
    }

    /// Closes the connection normally (best effort, bounded in time).
    pub async fn close(mut self) {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        };
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            let _ = self.sink.send(Message::Close(Some(frame))).await;
            let _ = self.sink.flush().await;
        })
        .await;
    }

    fn lost(&self, e: &tungstenite::Error) -> CliError {
        CliError::Unreachable {
            url: self.url.clone(),
            cause: format!("connection lost: {}", cause_chain(e)),
        }
    }
}

/// The error for a refused request: the server's code and message.
pub fn refused(code: &str, message: &str) -> CliError {
    CliError::Failed(format!("{code}: {message}"))
}

/// Sorts a failed WebSocket handshake like the HTTP client sorts its errors.
fn handshake_error(url: &str, e: tungstenite::Error) -> CliError {
    match e {
        tungstenite::Error::Http(resp) if resp.status().as_u16() == 401 => {
            CliError::TokenRefused(USER_TOKEN_REFUSED.to_string())
        }
        tungstenite::Error::Http(resp) => {
            let status = resp.status();
            let body = resp
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default()
                .into_owned();
            match serde_json::from_str::<ApiErrorBody>(&body) {
                Ok(b) => CliError::Api {
                    url: url.to_string(),
                    status: status.as_u16(),
                    code: b.code,
                    message: b.message,
                },
                Err(_) => CliError::Http {
                    url: url.to_string(),
                    status: status.to_string(),
                    body: snippet(&body),
                },
            }
        }
        other => CliError::Unreachable {
            url: url.to_string(),
            cause: match &other {
                tungstenite::Error::Io(io) => io.to_string(),
                e => cause_chain(e),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn ws_urls() {
        let u = |s: &str| ws_url(s).map(|u| u.to_string()).unwrap();
        assert_eq!(u("127.0.0.1:7000"), "ws://127.0.0.1:7000/v1/ws");
        assert_eq!(u("http://h:1/"), "ws://h:1/v1/ws");
        assert_eq!(u("https://chat.example/p"), "wss://chat.example/p/v1/ws");
        assert!(ws_url("").is_err());
    }

    #[test]
    fn incoming_frames() {
        let f = Incoming::parse(
            r#"{"type":"error","id":"3","code":"unknown_chat","message":"no chat x"}"#,
        )
        .unwrap();
        assert_eq!(f.id(), Some("3"));
        assert_eq!(f.error(), Some(("unknown_chat", "no chat x")));
        assert_eq!(f.without_id().get("id"), None);
        let unknown = Incoming::parse(r#"{"type":"new_thing","x":1}"#).unwrap();
        assert!(unknown.frame.is_none());
        assert!(Incoming::parse("[1]").is_none());
        assert!(Incoming::parse("nope").is_none());
    }

    #[test]
    fn client_msg_ids_are_unique_and_valid() {
        let a = new_client_msg_id();
        let b = new_client_msg_id();
        assert_ne!(a, b);
        for id in [a, b] {
            assert!(id.len() <= chatd_proto::CLIENT_MSG_ID_BYTES_MAX);
            assert!(id
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b':' | b'-')));
        }
    }
}
