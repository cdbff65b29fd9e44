//! The web client (issue 15, ARCHITECTURE.md "Web client"): plain ES modules in `web/`,
//! embedded in the binary and served by every node at `/` with a strict
//! Content-Security-Policy (nothing from anywhere but this cluster's nodes), gzip when the
//! browser takes it, and an ETag. Also what a browser needs of the API across nodes: the
//! public list of nodes (`GET /v1/nodes`, to switch when one drains) and CORS on the file
//! API (the page of one node reads files from another once it has switched).

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::node::Node;

/// One embedded asset.
pub struct Asset {
    pub path: &'static str,
    pub mime: &'static str,
    pub bytes: &'static [u8],
}

/// Every file of the client, as built into this binary.
pub const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        mime: "text/html; charset=utf-8",
        bytes: include_bytes!("../../web/index.html"),
    },
    Asset {
        path: "/app.css",
        mime: "text/css; charset=utf-8",
        bytes: include_bytes!("../../web/app.css"),
    },
    Asset {
        path: "/js/main.js",
        mime: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../../web/js/main.js"),
    },
    Asset {
        path: "/js/conn.js",
        mime: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../../web/js/conn.js"),
    },
    Asset {
        path: "/js/view.js",
        mime: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../../web/js/view.js"),
    },
    Asset {
        path: "/js/files.js",
        mime: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../../web/js/files.js"),
    },
];

/// An asset ready to serve: its gzip form and ETag, made once.
struct Prepared {
    gzip: Vec<u8>,
    etag: String,
}

fn prepared() -> &'static [Prepared] {
    static P: OnceLock<Vec<Prepared>> = OnceLock::new();
    P.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                let digest = ring::digest::digest(&ring::digest::SHA256, a.bytes);
                let etag: String = digest.as_ref()[..12]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                Prepared {
                    gzip: gzip(a.bytes),
                    etag: format!("\"{etag}\""),
                }
            })
            .collect()
    })
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    // Writing into a Vec cannot fail.
    let _ = e.write_all(bytes);
    e.finish().unwrap_or_default()
}

/// The bytes the whole client weighs: (plain, gzip).
pub fn weight() -> (usize, usize) {
    let plain = ASSETS.iter().map(|a| a.bytes.len()).sum();
    let gz = prepared().iter().map(|p| p.gzip.len()).sum();
    (plain, gz)
}

/// The Content-Security-Policy of the client's pages: its own scripts and styles only,
/// no inline code, connections to this cluster's nodes only (the WebSocket and the file
/// API of whichever node it uses), images from blob URLs (thumbnails read with the token).
pub fn content_security_policy(nodes: &[String]) -> String {
    let mut connect = vec!["'self'".to_string()];
    for n in nodes {
        for scheme in ["ws", "wss", "http", "https"] {
            connect.push(format!("{scheme}://{n}"));
        }
    }
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; \
         connect-src {}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        connect.join(" ")
    )
}

/// The API addresses of the cluster's active nodes, as group 0 knows them here.
fn node_addrs(node: &Node) -> Vec<PublicNode> {
    let Some(m) = node.meta.membership() else {
        return Vec::new();
    };
    m.nodes
        .values()
        .map(|n| PublicNode {
            id: n.info.id,
            api_addr: n.info.api_addr.clone(),
            state: n.state.name(),
        })
        .collect()
}

/// One node as `GET /v1/nodes` lists it.
#[derive(Debug, Serialize)]
pub struct PublicNode {
    pub id: u64,
    pub api_addr: String,
    pub state: &'static str,
}

/// `GET /v1/nodes`: the cluster's nodes and where clients reach them (no token: a client
/// needs it before it can sign in anywhere else).
pub async fn nodes(State(node): State<Arc<Node>>) -> Response {
    Json(node_addrs(&node)).into_response()
}

/// `GET /`, `/app.css`, `/js/*.js`.
pub async fn asset(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    request: Request,
) -> Response {
    let path = request.uri().path();
    let Some(i) = ASSETS.iter().position(|a| a.path == path) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let (asset, p) = (&ASSETS[i], &prepared()[i]);
    let addrs: Vec<String> = node_addrs(&node).into_iter().map(|n| n.api_addr).collect();
    let mut r = if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == p.etag))
    {
        StatusCode::NOT_MODIFIED.into_response()
    } else if headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|e| e.trim().starts_with("gzip")))
    {
        let mut r = Response::new(Body::from(p.gzip.clone()));
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        r
    } else {
        Response::new(Body::from(asset.bytes))
    };
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.mime));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if let Ok(v) = HeaderValue::from_str(&p.etag) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&content_security_policy(&addrs)) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    r
}

/// Request headers a page of another node may send to the file API.
const CORS_ALLOW_HEADERS: &str =
    "authorization, content-type, x-file-name, upload-length, upload-offset, range, if-none-match";
/// Answer headers it may read.
const CORS_EXPOSE_HEADERS: &str =
    "upload-offset, upload-length, location, etag, content-disposition, content-range, retry-after";

/// CORS for the endpoints a browser page calls on other nodes (the file API, the quota,
/// the node list): any origin, since they are authorized by a bearer token, never by a
/// cookie. A preflight is answered here.
pub async fn cors(request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let open = path.starts_with("/v1/files") || path == "/v1/quota" || path == "/v1/nodes";
    if !open {
        return next.run(request).await;
    }
    let mut r = if request.method() == Method::OPTIONS {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, HEAD, POST, PATCH"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(CORS_ALLOW_HEADERS),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        r
    } else {
        next.run(request).await
    };
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(CORS_EXPOSE_HEADERS),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_served_compressed_and_the_client_is_small() {
        let (plain, gz) = weight();
        assert!(plain > 10_000, "the client is there: {plain} bytes");
        // The aim: under 100 KB compressed.
        assert!(gz < 100_000, "{gz} bytes gzipped");
        for (a, p) in ASSETS.iter().zip(prepared()) {
            let mut back = Vec::new();
            use std::io::Read;
            flate2::read::GzDecoder::new(&p.gzip[..])
                .read_to_end(&mut back)
                .unwrap_or_default();
            assert_eq!(back, a.bytes, "{}", a.path);
        }
    }

    #[test]
    fn the_policy_allows_the_cluster_and_nothing_inline() {
        let csp = content_security_policy(&["127.0.0.1:7001".into()]);
        assert!(
            csp.contains("connect-src 'self' ws://127.0.0.1:7001"),
            "{csp}"
        );
        assert!(csp.contains("script-src 'self';"), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        assert!(csp.starts_with("default-src 'none'"), "{csp}");
    }

    #[test]
    fn the_page_loads_only_embedded_files() {
        let html = std::str::from_utf8(ASSETS[0].bytes).unwrap_or_default();
        for needle in ["/app.css", "/js/main.js"] {
            assert!(html.contains(needle), "{needle}");
        }
        assert!(!html.contains("http://") && !html.contains("https://"));
        for a in ASSETS {
            let text = std::str::from_utf8(a.bytes).unwrap_or_default();
            assert!(!text.contains("innerHTML"), "{} sets HTML", a.path);
            for imported in text
                .lines()
                .filter_map(|l| l.split(" from \"./").nth(1))
                .filter_map(|l| l.split('"').next())
            {
                assert!(
                    ASSETS.iter().any(|x| x.path == format!("/js/{imported}")),
                    "{} imports {imported}, which is not embedded",
                    a.path
                );
            }
        }
    }
}
