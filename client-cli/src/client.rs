//! HTTP access to a chatd node, with errors sorted by what went wrong.

use std::time::Duration;

use reqwest::header::{HeaderValue, AUTHORIZATION};
use reqwest::Url;
use serde::Deserialize;

/// Why a command failed. [`CliError::exit_code`] maps each to the process exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// `--server` is not a usable URL.
    #[error("invalid server address {given:?}: {reason}")]
    BadServer {
        /// What was given.
        given: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `--token` cannot be sent in an HTTP header.
    #[error("invalid token: {0}")]
    BadToken(String),
    /// No token was given where one is needed; the message says how to give one.
    #[error("{0}")]
    NoToken(String),
    /// The server refused the token (unknown, disabled, or not the admin token); the
    /// message says so in the CLI's terms.
    #[error("{0}")]
    TokenRefused(String),
    /// The command line (or a piped script) asks for something that cannot be done as
    /// given; nothing was sent.
    #[error("{0}")]
    Usage(String),
    /// No answer: connection refused, DNS failure, timeout, connection lost.
    #[error("cannot reach chatd at {url}: {cause}")]
    Unreachable {
        /// The URL requested.
        url: String,
        /// The underlying cause.
        cause: String,
    },
    /// The node answered with an API error (`{"code","message"}`).
    #[error("chatd at {url} answered HTTP {status}: {code}: {message}")]
    Api {
        /// The URL requested.
        url: String,
        /// HTTP status.
        status: u16,
        /// The error's stable code.
        code: String,
        /// The error's message.
        message: String,
    },
    /// A non-2xx status without the API's error body (a proxy, another server).
    #[error("chatd at {url} answered HTTP {status}: {body}")]
    Http {
        /// The URL requested.
        url: String,
        /// HTTP status line, e.g. `502 Bad Gateway`.
        status: String,
        /// The start of the body.
        body: String,
    },
    /// A 2xx answer that is not the expected JSON.
    #[error("malformed response from {url}: {cause}")]
    Malformed {
        /// The URL requested.
        url: String,
        /// What is wrong with it.
        cause: String,
    },
    /// Any other failure of a command, already worded for the user.
    #[error("{0}")]
    Failed(String),
}

/// The process exit statuses of `chat-cli`.
pub mod exit {
    /// The command did what was asked.
    pub const OK: u8 = 0;
    /// The server refused the request (unknown chat, not a member, user exists, …), gave
    /// a malformed answer, or the command failed otherwise.
    pub const FAILED: u8 = 1;
    /// A usage error: bad arguments (clap's convention), or input the command cannot act
    /// on as given. Nothing was sent.
    pub const USAGE: u8 = 2;
    /// The server could not be reached (refused, timed out, connection lost), or the
    /// address is unusable.
    pub const UNREACHABLE: u8 = 3;
    /// No token, an unusable one, or the server refused it.
    pub const TOKEN: u8 = 4;
}

impl CliError {
    /// The process exit status for this error (see [`exit`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => exit::USAGE,
            CliError::BadServer { .. } | CliError::Unreachable { .. } => exit::UNREACHABLE,
            CliError::BadToken(_) | CliError::NoToken(_) | CliError::TokenRefused(_) => exit::TOKEN,
            CliError::Api { .. }
            | CliError::Http { .. }
            | CliError::Malformed { .. }
            | CliError::Failed(_) => exit::FAILED,
        }
    }
}

/// Turns `--server` into a base URL: `host:port` gets `http://`; only http and https.
pub fn server_url(given: &str) -> Result<Url, CliError> {
    let bad = |reason: &str| CliError::BadServer {
        given: given.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = given.trim();
    if trimmed.is_empty() {
        return Err(bad("it is empty"));
    }
    // `localhost:7000` parses as a URL with scheme "localhost", so look for "://".
    let text = if trimmed.contains("://") {
        trimmed.to_string()
    } else {
        format!("http://{trimmed}")
    };
    let mut url = Url::parse(&text).map_err(|e| bad(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("the scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("it has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("it must not have a query or fragment"));
    }
    // A path prefix (a node behind a reverse proxy) is kept; make it a directory so
    // joining keeps it.
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

/// A client for one node's HTTP admin API (a `401` is reported as a refused admin token).
#[derive(Clone, Debug)]
pub struct Client {
    base: Url,
    http: reqwest::Client,
    auth: Option<HeaderValue>,
    timeout: Duration,
}

/// The API's error body: `{"code","message"}` (`error` is accepted for `code`).
#[derive(Deserialize)]
pub(crate) struct ApiErrorBody {
    #[serde(alias = "error")]
    pub(crate) code: String,
    #[serde(default)]
    pub(crate) message: String,
}

/// What `chat-cli` says when the admin API answers 401.
pub const ADMIN_TOKEN_REFUSED: &str =
    "the admin token was refused; pass --token or set CHATD_TOKEN";
/// What `chat-cli` says when the admin API answers 401 to a request without a token.
pub const ADMIN_TOKEN_MISSING: &str =
    "this command needs the admin token; pass --token or set CHATD_TOKEN";

impl Client {
    /// A client for the node at `server` (see [`server_url`]); `token`, when given and
    /// not empty, is sent as `Authorization: Bearer`.
    pub fn new(server: &str, token: Option<&str>, timeout: Duration) -> Result<Self, CliError> {
        let base = server_url(server)?;
        let auth = match token.map(str::trim).filter(|t| !t.is_empty()) {
            Some(t) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                    CliError::BadToken("it contains characters not allowed in a header".into())
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("chat-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CliError::Unreachable {
                url: base.to_string(),
                cause: format!("cannot set up the HTTP client: {}", cause_chain(&e)),
            })?;
        Ok(Client {
            base,
            http,
            auth,
            timeout,
        })
    }

    /// The full URL of an API path such as `v1/admin/cluster`.
    pub fn url(&self, path: &str) -> Result<Url, CliError> {
        self.base
            .join(path.trim_start_matches('/'))
            .map_err(|e| CliError::BadServer {
                given: self.base.to_string(),
                reason: e.to_string(),
            })
    }

    /// `GET path`; on success the body, checked to be JSON.
    pub async fn get_json(&self, path: &str) -> Result<String, CliError> {
        self.request_json(reqwest::Method::GET, path, None).await
    }

    /// `POST path` with `body` as JSON (or no body); on success the answer, checked to be
    /// JSON.
    pub async fn post_json(
        &self,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<String, CliError> {
        self.request_json(reqwest::Method::POST, path, body).await
    }

    /// The base URL (with a trailing slash).
    pub fn base(&self) -> &Url {
        &self.base
    }

    /// The request timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn request_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<String, CliError> {
        let url = self.url(path)?;
        let shown = url.to_string();
        let mut req = self
            .http
            .request(method, url)
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(body) = body {
            req = req.json(body);
        }
        if let Some(auth) = &self.auth {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        let resp = req.send().await.map_err(|e| self.transport(&shown, &e))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| self.transport(&shown, &e))?;
        let text = String::from_utf8_lossy(&body);
        if status == reqwest::StatusCode::UNAUTHORIZED {
            // Said in the CLI's terms: which token, and how to give another one.
            return Err(if self.auth.is_some() {
                CliError::TokenRefused(ADMIN_TOKEN_REFUSED.to_string())
            } else {
                CliError::NoToken(ADMIN_TOKEN_MISSING.to_string())
            });
        }
        if !status.is_success() {
            return Err(match serde_json::from_str::<ApiErrorBody>(&text) {
                Ok(e) => CliError::Api {
                    url: shown,
                    status: status.as_u16(),
                    code: e.code,
                    message: e.message,
                },
                Err(_) => CliError::Http {
                    url: shown,
                    status: status.to_string(),
                    body: snippet(&text),
                },
            });
        }
        if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&text) {
            return Err(CliError::Malformed {
                url: shown,
                cause: format!("not JSON ({e}); body starts: {}", snippet(&text)),
            });
        }
        Ok(text.into_owned())
    }

    fn transport(&self, url: &str, e: &reqwest::Error) -> CliError {
        let cause = if e.is_timeout() {
            format!("no answer within {} ms", self.timeout.as_millis())
        } else {
            cause_chain(e)
        };
        CliError::Unreachable {
            url: url.to_string(),
            cause,
        }
    }
}

/// The error's causes, innermost last, skipping reqwest's own "error sending request
/// for url (…)" wrapper when there is something more specific.
pub(crate) fn cause_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = s.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    }
}

/// The first line(s) of a body, shortened, for error messages.
pub(crate) fn snippet(text: &str) -> String {
    const MAX: usize = 200;
    let one_line: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.is_empty() {
        return "(empty body)".to_string();
    }
    if one_line.chars().count() > MAX {
        let cut: String = one_line.chars().take(MAX).collect();
        format!("{cut}…")
    } else {
        one_line
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn server_urls() {
        let ok = |s: &str| server_url(s).map(|u| u.to_string()).ok();
        assert_eq!(
            ok("127.0.0.1:7000").as_deref(),
            Some("http://127.0.0.1:7000/")
        );
        assert_eq!(
            ok("localhost:7000").as_deref(),
            Some("http://localhost:7000/")
        );
        assert_eq!(
            ok("http://127.0.0.1:7000").as_deref(),
            Some("http://127.0.0.1:7000/")
        );
        assert_eq!(
            ok("https://chat.example/prefix").as_deref(),
            Some("https://chat.example/prefix/")
        );
        assert!(server_url("").is_err());
        assert!(server_url("ftp://x:1").is_err());
        assert!(server_url("http://").is_err());
        assert!(server_url("host:notaport").is_err());
    }

    #[test]
    fn urls_join_under_the_base() {
        let c = Client::new("chat.example/p", None, Duration::from_secs(1));
        let url = c
            .and_then(|c| c.url("/v1/admin/cluster"))
            .map(|u| u.to_string());
        assert_eq!(
            url.ok().as_deref(),
            Some("http://chat.example/p/v1/admin/cluster")
        );
    }

    #[test]
    fn tokens() {
        let t = Duration::from_secs(1);
        assert!(Client::new("h:1", Some("abc.def"), t).is_ok_and(|c| c.auth.is_some()));
        assert!(Client::new("h:1", Some(""), t).is_ok_and(|c| c.auth.is_none()));
        assert!(matches!(
            Client::new("h:1", Some("a\nb"), t),
            Err(CliError::BadToken(_))
        ));
    }

    #[test]
    fn exit_codes() {
        let unreachable = CliError::Unreachable {
            url: "u".into(),
            cause: "c".into(),
        };
        let api = CliError::Api {
            url: "u".into(),
            status: 503,
            code: "not_ready".into(),
            message: "m".into(),
        };
        let malformed = CliError::Malformed {
            url: "u".into(),
            cause: "c".into(),
        };
        let bad_server = server_url("ftp://x:1").unwrap_err();
        assert_eq!(CliError::Usage("u".into()).exit_code(), 2);
        assert_eq!(unreachable.exit_code(), 3);
        assert_eq!(bad_server.exit_code(), 3);
        assert_eq!(CliError::TokenRefused("t".into()).exit_code(), 4);
        assert_eq!(CliError::NoToken("t".into()).exit_code(), 4);
        assert_eq!(CliError::BadToken("t".into()).exit_code(), 4);
        assert_eq!(api.exit_code(), 1);
        assert_eq!(malformed.exit_code(), 1);
        assert_eq!(CliError::Failed("f".into()).exit_code(), 1);
        assert!(api.to_string().contains("not_ready: m"));
        // The codes are distinct from each other and from success.
        let mut codes = [
            exit::OK,
            exit::FAILED,
            exit::USAGE,
            exit::UNREACHABLE,
            exit::TOKEN,
        ];
        codes.sort_unstable();
        assert_eq!(codes, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn api_error_bodies() {
        let b: ApiErrorBody =
            serde_json::from_str(r#"{"code":"unknown_user","message":"no user x"}"#).unwrap();
        assert_eq!(
            (b.code.as_str(), b.message.as_str()),
            ("unknown_user", "no user x")
        );
        let b: ApiErrorBody = serde_json::from_str(r#"{"error":"user_disabled"}"#).unwrap();
        assert_eq!((b.code.as_str(), b.message.as_str()), ("user_disabled", ""));
    }
}
