//! `chat-cli upload PATH` and `chat-cli download FILE_ID [-o PATH]` (docs/protocol.md §2):
//! the file streams from and to disk (never whole in memory), with progress on stderr; a
//! download is checked against the SHA-256 the node names in its `ETag`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::{cause_chain, server_url, snippet, ApiErrorBody};
use crate::{Cli, CliError};

/// Bytes read from disk per body piece of an upload.
const READ_BYTES: usize = 256 << 10;
/// Progress lines at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// `upload` arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct UploadArgs {
    /// The file to upload.
    pub path: PathBuf,
    /// Its media type [default: from the file name's extension].
    #[arg(long)]
    pub mime: Option<String>,
}

/// `download` arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct DownloadArgs {
    /// The file's id (`f:` and 32 hex digits), as `upload` printed it.
    pub file_id: String,
    /// Where to write it [default: the file's name in the current directory].
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

/// What an upload answers.
#[derive(Debug, Deserialize, serde::Serialize)]
struct Uploaded {
    file_id: String,
    size: u64,
    sha256: String,
    mime: String,
    name: String,
}

/// A media type for `path` from its extension (the common ones; else binary).
pub fn mime_for(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "svg" => "image/svg+xml",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mov" => "video/quicktime",
        "mp3" => "audio/mpeg",
        "ogg" => "audio/ogg",
        "pdf" => "application/pdf",
        "txt" | "md" | "log" => "text/plain",
        "json" => "application/json",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        _ => "application/octet-stream",
    }
}

fn client(cli: &Cli) -> Result<(reqwest::Client, reqwest::Url, String), CliError> {
    let base = server_url(&cli.server)?;
    let token = cli
        .token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            CliError::NoToken("files need a user token: pass --token or set CHATD_TOKEN".into())
        })?
        .to_string();
    let http = reqwest::Client::builder()
        // No bound on the whole transfer (a large file takes what it takes); the
        // connection and each read are bounded by reqwest's own timeouts.
        .connect_timeout(Duration::from_millis(cli.timeout_ms))
        .read_timeout(Duration::from_millis(cli.timeout_ms.max(30_000)))
        .user_agent(concat!("chat-cli/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(unreachable(base.as_str()))?;
    Ok((http, base, token))
}

/// The error of a request to `url` that got no (whole) answer.
fn unreachable(url: &str) -> impl Fn(reqwest::Error) -> CliError + '_ {
    move |e| CliError::Unreachable {
        url: url.to_string(),
        cause: cause_chain(&e),
    }
}

/// `path` under the node's base URL.
fn join(base: &reqwest::Url, path: &str) -> Result<reqwest::Url, CliError> {
    base.join(path).map_err(|e| CliError::BadServer {
        given: base.to_string(),
        reason: e.to_string(),
    })
}

/// The error an answer that is not a success stands for.
async fn failed(url: &str, resp: reqwest::Response) -> CliError {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    match serde_json::from_str::<ApiErrorBody>(&text) {
        Ok(e) => CliError::Api {
            url: url.to_string(),
            status: status.as_u16(),
            code: e.code,
            message: e.message,
        },
        Err(_) => CliError::Http {
            url: url.to_string(),
            status: status.to_string(),
            body: snippet(&text),
        },
    }
}

/// Prints "what: done / total (percent)" on stderr, at most every [`PROGRESS_EVERY`].
struct Progress {
    what: String,
    total: u64,
    done: u64,
    last: Option<Instant>,
    started: Instant,
}

impl Progress {
    fn new(what: String, total: u64) -> Self {
        Self {
            what,
            total,
            done: 0,
            last: None,
            started: Instant::now(),
        }
    }

    fn add(&mut self, n: u64) {
        self.done += n;
        if self.last.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY) || self.done == self.total {
            self.last = Some(Instant::now());
            let pct = if self.total == 0 {
                100.0
            } else {
                self.done as f64 * 100.0 / self.total as f64
            };
            let mib = |b: u64| b as f64 / (1 << 20) as f64;
            let secs = self.started.elapsed().as_secs_f64().max(1e-3);
            eprint!(
                "\r{}: {:.1} / {:.1} MiB ({pct:.0}%, {:.1} MiB/s)   ",
                self.what,
                mib(self.done),
                mib(self.total),
                mib(self.done) / secs
            );
        }
    }

    fn finish(&self) {
        eprintln!();
    }
}

/// `chat-cli upload PATH`.
pub async fn upload(cli: &Cli, args: &UploadArgs) -> Result<String, CliError> {
    let (http, base, token) = client(cli)?;
    let path = &args.path;
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| CliError::Usage(format!("cannot open {}: {e}", path.display())))?;
    let size = file
        .metadata()
        .await
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?
        .len();
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("file")
        .to_string();
    let mime = args
        .mime
        .clone()
        .unwrap_or_else(|| mime_for(path).to_string());
    let url = join(&base, "v1/files")?;
    let shown = url.to_string();
    let progress = std::sync::Arc::new(std::sync::Mutex::new(Progress::new(
        format!("uploading {name}"),
        size,
    )));
    let counted = progress.clone();
    let body = futures::stream::unfold(file, |mut f| async move {
        let mut buf = vec![0u8; READ_BYTES];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(buf), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    })
    .map(move |piece| {
        if let Ok(p) = &piece {
            if let Ok(mut g) = counted.lock() {
                g.add(p.len() as u64);
            }
        }
        piece
    });
    let resp = http
        .post(url)
        .bearer_auth(&token)
        .header(reqwest::header::CONTENT_LENGTH, size)
        .header(reqwest::header::CONTENT_TYPE, mime)
        .header("x-file-name", name)
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .map_err(unreachable(&shown))?;
    if let Ok(g) = progress.lock() {
        g.finish();
    }
    if !resp.status().is_success() {
        return Err(failed(&shown, resp).await);
    }
    let text = resp.text().await.map_err(unreachable(&shown))?;
    let up: Uploaded = serde_json::from_str(&text).map_err(|e| CliError::Malformed {
        url: shown,
        cause: format!("{e}: {}", snippet(&text)),
    })?;
    if cli.json {
        return serde_json::to_string_pretty(&up)
            .map(|j| j + "\n")
            .map_err(|e| CliError::Failed(e.to_string()));
    }
    Ok(format!(
        "{}  {} bytes  {}  {}  sha256 {}\n",
        up.file_id, up.size, up.mime, up.name, up.sha256
    ))
}

/// The file name a `Content-Disposition` names (`filename="…"`), if it is a plain one.
fn disposition_name(value: &str) -> Option<String> {
    let start = value.find("filename=\"")? + "filename=\"".len();
    let rest = &value[start..];
    let name = &rest[..rest.find('"')?];
    (!name.is_empty() && !name.contains(['/', '\\']) && name != "." && name != "..")
        .then(|| name.to_string())
}

/// `chat-cli download FILE_ID [-o PATH]`.
pub async fn download(cli: &Cli, args: &DownloadArgs) -> Result<String, CliError> {
    let (http, base, token) = client(cli)?;
    let url = join(&base, &format!("v1/files/{}", args.file_id))?;
    let shown = url.to_string();
    let resp = http
        .get(url)
        .bearer_auth(&token)
        .send()
        .await
        .map_err(unreachable(&shown))?;
    if !resp.status().is_success() {
        return Err(failed(&shown, resp).await);
    }
    let header = |name: reqwest::header::HeaderName| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let expected = header(reqwest::header::ETAG).map(|t| t.trim_matches('"').to_string());
    let size = resp.content_length().unwrap_or(0);
    let out = match &args.output {
        Some(p) => p.clone(),
        None => PathBuf::from(
            header(reqwest::header::CONTENT_DISPOSITION)
                .and_then(|d| disposition_name(&d))
                .unwrap_or_else(|| args.file_id.replace(':', "_")),
        ),
    };
    // Written beside the target and renamed once complete and checked: a failed download
    // never leaves a partial file under the final name.
    let partial = out.with_extension(format!(
        "{}part",
        out.extension()
            .and_then(|e| e.to_str())
            .map(|e| format!("{e}."))
            .unwrap_or_default()
    ));
    let mut f = tokio::fs::File::create(&partial)
        .await
        .map_err(|e| CliError::Usage(format!("cannot create {}: {e}", partial.display())))?;
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut progress = Progress::new(format!("downloading {}", out.display()), size);
    let mut stream = resp.bytes_stream();
    let mut got: u64 = 0;
    let result: Result<(), CliError> = async {
        while let Some(piece) = stream.next().await {
            let piece = piece.map_err(unreachable(&shown))?;
            hash.update(&piece);
            f.write_all(&piece).await.map_err(|e| {
                CliError::Failed(format!("cannot write {}: {e}", partial.display()))
            })?;
            got += piece.len() as u64;
            progress.add(piece.len() as u64);
        }
        f.sync_all()
            .await
            .map_err(|e| CliError::Failed(format!("cannot write {}: {e}", partial.display())))?;
        Ok(())
    }
    .await;
    progress.finish();
    let checked = result.and_then(|()| {
        if got != size {
            return Err(CliError::Failed(format!(
                "the download ended after {got} of {size} bytes"
            )));
        }
        let sha: String = hash
            .finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        match &expected {
            Some(e) if *e != sha => Err(CliError::Failed(format!(
                "the bytes hash to {sha}, the node said {e}: not kept"
            ))),
            _ => Ok(sha),
        }
    });
    match checked {
        Ok(sha) => {
            tokio::fs::rename(&partial, &out).await.map_err(|e| {
                CliError::Failed(format!("cannot rename to {}: {e}", out.display()))
            })?;
            if cli.json {
                let v = serde_json::json!({
                    "path": out.display().to_string(),
                    "size": got,
                    "sha256": sha,
                });
                return Ok(format!("{v:#}\n"));
            }
            Ok(format!("{}  {got} bytes  sha256 {sha}\n", out.display()))
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&partial).await;
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_and_download_names() {
        assert_eq!(mime_for(Path::new("a/b/Cat.PNG")), "image/png");
        assert_eq!(mime_for(Path::new("x")), "application/octet-stream");
        assert_eq!(
            disposition_name("attachment; filename=\"report.pdf\""),
            Some("report.pdf".into())
        );
        assert_eq!(disposition_name("attachment; filename=\"../x\""), None);
        assert_eq!(disposition_name("attachment"), None);
    }
}
