//! A minimal blocking HTTP/1.1 client for the admin API (create users, inspect chats,
//! find leaders), usable from the nemesis thread. One request per connection, bounded in
//! time and size.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Per request: connect, write and read each bounded by this.
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

fn request(
    addr: &str,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&serde_json::Value>,
) -> Result<serde_json::Value, HttpError> {
    let io = |cause: String| HttpError::Io {
        addr: addr.to_string(),
        cause,
    };
    let sock: SocketAddr = addr
        .to_socket_addrs()
        .map_err(|e| io(e.to_string()))?
        .next()
        .ok_or_else(|| io("no address".into()))?;
    let mut s =
        TcpStream::connect_timeout(&sock, REQUEST_TIMEOUT).map_err(|e| io(e.to_string()))?;
    s.set_read_timeout(Some(REQUEST_TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(REQUEST_TIMEOUT)))
        .map_err(|e| io(e.to_string()))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| io(e.to_string()))?;
    let mut raw = Vec::new();
    s.take(RESPONSE_BYTES_MAX)
        .read_to_end(&mut raw)
        .map_err(|e| io(e.to_string()))?;
    let malformed = |cause: &str| HttpError::Malformed {
        addr: addr.to_string(),
        path: path.to_string(),
        cause: cause.to_string(),
    };
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| malformed("no header end"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| malformed("no status"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    if !(200..300).contains(&status) {
        return Err(HttpError::Status {
            addr: addr.to_string(),
            path: path.to_string(),
            status,
            body: body.trim().chars().take(300).collect(),
        });
    }
    serde_json::from_str(&body).map_err(|e| malformed(&e.to_string()))
}

/// Joins the chunks of a chunked body.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// `GET path` with the bearer token; the JSON answer.
pub fn get_json(addr: &str, path: &str, token: &str) -> Result<serde_json::Value, HttpError> {
    request(addr, "GET", path, token, None)
}

/// `POST path` with a JSON body and the bearer token; the JSON answer.
pub fn post_json(
    addr: &str,
    path: &str,
    token: &str,
    body: &serde_json::Value,
) -> Result<serde_json::Value, HttpError> {
    request(addr, "POST", path, token, Some(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk("4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n"), "{\"a\":1}");
        assert_eq!(dechunk("zz\r\n"), "");
    }
}
