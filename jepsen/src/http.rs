//! A blocking HTTP client for the admin API (create users, inspect chats, find leaders),
//! usable from the nemesis thread: ureq, bounded in time and size.

use std::sync::OnceLock;
use std::time::Duration;

use ureq::http::Response;
use ureq::Body;

/// Per request, from connecting to the last byte of the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer read.
pub const RESPONSE_BYTES_MAX: u64 = 16 * 1024 * 1024;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// No connection or no answer.
    #[error("{addr}: {cause}")]
    Io {
        /// The server.
        addr: String,
        /// The cause.
        cause: String,
    },
    /// A non-2xx status.
    #[error("{addr}{path}: HTTP {status}: {body}")]
    Status {
        /// The server.
        addr: String,
        /// The path.
        path: String,
        /// The status.
        status: u16,
        /// The body.
        body: String,
    },
    /// The answer is not HTTP or not JSON.
    #[error("{addr}{path}: malformed answer: {cause}")]
    Malformed {
        /// The server.
        addr: String,
        /// The path.
        path: String,
        /// What is wrong.
        cause: String,
    },
}

/// The agent every request goes through: no redirects, errors for statuses left to us.
fn agent() -> &'static ureq::Agent {
    static AGENT: OnceLock<ureq::Agent> = OnceLock::new();
    AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            .timeout_global(Some(REQUEST_TIMEOUT))
            .http_status_as_error(false)
            .max_redirects(0)
            .build()
            .into()
    })
}

/// `GET path`, or `POST path` with `body`, with the bearer token; the JSON answer.
fn request(
    addr: &str,
    path: &str,
    token: &str,
    body: Option<&serde_json::Value>,
) -> Result<serde_json::Value, HttpError> {
    let url = format!("http://{addr}{path}");
    let auth = format!("Bearer {token}");
    let answer: Result<Response<Body>, ureq::Error> = match body {
        None => agent().get(&url).header("Authorization", &auth).call(),
        Some(b) => agent()
            .post(&url)
            .header("Authorization", &auth)
            .send_json(b),
    };
    let mut answer = answer.map_err(|e| HttpError::Io {
        addr: addr.to_string(),
        cause: e.to_string(),
    })?;
    let malformed = |cause: String| HttpError::Malformed {
        addr: addr.to_string(),
        path: path.to_string(),
        cause,
    };
    let status = answer.status().as_u16();
    let text = answer
        .body_mut()
        .with_config()
        .limit(RESPONSE_BYTES_MAX)
        .read_to_string()
        .map_err(|e| malformed(e.to_string()))?;
    if !(200..300).contains(&status) {
        return Err(HttpError::Status {
            addr: addr.to_string(),
            path: path.to_string(),
            status,
            body: text.trim().chars().take(300).collect(),
        });
    }
    serde_json::from_str(&text).map_err(|e| malformed(e.to_string()))
}

/// `GET path` with the bearer token; the JSON answer.
pub fn get_json(addr: &str, path: &str, token: &str) -> Result<serde_json::Value, HttpError> {
    request(addr, path, token, None)
}

/// `POST path` with a JSON body and the bearer token; the JSON answer.
pub fn post_json(
    addr: &str,
    path: &str,
    token: &str,
    body: &serde_json::Value,
) -> Result<serde_json::Value, HttpError> {
    request(addr, path, token, Some(body))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    use super::*;

    /// Serves each of `answers` to one connection in turn; returns the address and the
    /// request heads and bodies received.
    fn serve(answers: Vec<&'static str>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for answer in answers {
                let (s, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(s.try_clone().unwrap());
                let mut head = String::new();
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let mut body = vec![0; len];
                reader.read_exact(&mut body).unwrap();
                seen.push(format!("{head}\n{}", String::from_utf8(body).unwrap()));
                (&s).write_all(answer.as_bytes()).unwrap();
            }
            seen
        });
        (addr, handle)
    }

    #[test]
    fn chunked_answers_statuses_and_requests() {
        let (addr, server) = serve(vec![
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n",
            "HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nno chat\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nnot",
        ]);
        let v = post_json(
            &addr,
            "/v1/admin/users",
            "tok",
            &serde_json::json!({"user": "u1"}),
        );
        assert_eq!(v.unwrap(), serde_json::json!({"a": 1}));
        match get_json(&addr, "/v1/admin/chats/x", "tok") {
            Err(HttpError::Status { status, body, .. }) => {
                assert_eq!((status, body.as_str()), (404, "no chat"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            get_json(&addr, "/v1/admin/cluster", "tok"),
            Err(HttpError::Malformed { .. })
        ));
        let seen = server.join().unwrap();
        assert!(
            seen[0].starts_with("POST /v1/admin/users HTTP/1.1\r\n"),
            "{}",
            seen[0]
        );
        assert!(seen[0]
            .to_ascii_lowercase()
            .contains("authorization: bearer tok\r\n"));
        let (_, body) = seen[0].split_once("\r\n\n").unwrap();
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body, serde_json::json!({"user": "u1"}));
        assert!(seen[1].starts_with("GET /v1/admin/chats/x HTTP/1.1\r\n"));
        // Nothing listens any more: an I/O error, not a hang.
        assert!(matches!(
            get_json(&addr, "/v1/admin/cluster", "tok"),
            Err(HttpError::Io { .. })
        ));
    }
}
