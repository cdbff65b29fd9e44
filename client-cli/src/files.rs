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
    /// Continue an interrupted upload of the same file (the id the interruption named).
    #[arg(long, value_name = "FILE_ID")]
    pub resume: Option<String>,
}

/// `download` arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct DownloadArgs {
    /// The file's id (`f:` and 32 hex digits), as `upload` printed it.
    pub file_id: String,
    /// Where to write it [default: the file's name in the current directory].
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// The chat it was shared in (needed for a file someone else uploaded).
    #[arg(long)]
    pub chat: Option<String>,
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

    /// Where a resumed transfer starts again.
    fn set(&mut self, done: u64) {
        self.done = done;
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

/// Attempts of one upload after the first (each resumes where the cluster stands).
const UPLOAD_RETRIES_MAX: u32 = 5;
/// The first wait before a retry; each next one doubles.
const UPLOAD_RETRY_FIRST: Duration = Duration::from_millis(500);

/// The file as an upload request answers it.
#[derive(Debug, Deserialize, serde::Serialize)]
pub(crate) struct FileState {
    pub(crate) file_id: String,
    pub(crate) size: u64,
    pub(crate) offset: u64,
    #[serde(default)]
    pub(crate) sha256: Option<String>,
    pub(crate) mime: String,
    pub(crate) name: String,
}

/// An upload's connection to one node.
struct Uploader<'a> {
    http: reqwest::Client,
    base: reqwest::Url,
    token: String,
    path: &'a Path,
    size: u64,
}

/// Why one request of an upload failed: worth a retry (the node or the network), or not.
enum Attempt {
    Retry(CliError),
    Fatal(CliError),
}

impl Uploader<'_> {
    fn url(&self, file: &str) -> Result<reqwest::Url, CliError> {
        join(&self.base, &format!("v1/files/{file}"))
    }

    /// `POST` with `Upload-Length` and no body: the upload's id.
    async fn create(&self, mime: &str, name: &str) -> Result<FileState, CliError> {
        let url = join(&self.base, "v1/files")?;
        let shown = url.to_string();
        let resp = self
            .http
            .post(url)
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_LENGTH, 0)
            .header("upload-length", self.size)
            .header(reqwest::header::CONTENT_TYPE, mime)
            .header("x-file-name", name)
            .send()
            .await
            .map_err(unreachable(&shown))?;
        if !resp.status().is_success() {
            return Err(failed(&shown, resp).await);
        }
        read_state(&shown, resp).await
    }

    /// `HEAD`: the committed resume point and the file's size.
    async fn offset(&self, file: &str) -> Result<(u64, u64), Attempt> {
        let url = self.url(file).map_err(Attempt::Fatal)?;
        let shown = url.to_string();
        let resp = self
            .http
            .head(url)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| Attempt::Retry(unreachable(&shown)(e)))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let e = failed(&shown, resp).await;
            return Err(if status.is_server_error() {
                Attempt::Retry(e)
            } else {
                Attempt::Fatal(e)
            });
        }
        let number = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
        };
        match (number("upload-offset"), number("upload-length")) {
            (Some(o), Some(l)) => Ok((o, l)),
            _ => Err(Attempt::Fatal(CliError::Malformed {
                url: shown,
                cause: "HEAD answered without Upload-Offset and Upload-Length".into(),
            })),
        }
    }

    /// `PATCH` the bytes from `offset` to the end.
    /// `hash`, when given, is fed every byte sent (the caller's hash of the file, for a
    /// request from offset 0).
    async fn patch(
        &self,
        file: &str,
        offset: u64,
        progress: &std::sync::Arc<std::sync::Mutex<Progress>>,
        hash: Option<std::sync::Arc<std::sync::Mutex<ring::digest::Context>>>,
    ) -> Result<FileState, Attempt> {
        use tokio::io::AsyncSeekExt;
        let url = self.url(file).map_err(Attempt::Fatal)?;
        let shown = url.to_string();
        let mut f = tokio::fs::File::open(self.path).await.map_err(|e| {
            Attempt::Fatal(CliError::Usage(format!(
                "cannot open {}: {e}",
                self.path.display()
            )))
        })?;
        f.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|e| {
                Attempt::Fatal(CliError::Usage(format!(
                    "cannot read {}: {e}",
                    self.path.display()
                )))
            })?;
        if let Ok(mut g) = progress.lock() {
            g.set(offset);
        }
        let counted = progress.clone();
        let body = read_stream(f.take(self.size - offset)).map(move |piece| {
            if let Ok(p) = &piece {
                if let Ok(mut g) = counted.lock() {
                    g.add(p.len() as u64);
                }
                if let Some(Ok(mut h)) = hash.as_ref().map(|h| h.lock()) {
                    h.update(p);
                }
            }
            piece
        });
        let resp = self
            .http
            .patch(url)
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_LENGTH, self.size - offset)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/offset+octet-stream",
            )
            .header("upload-offset", offset)
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
            .map_err(|e| Attempt::Retry(unreachable(&shown)(e)))?;
        let status = resp.status();
        if status.is_success() {
            return read_state(&shown, resp).await.map_err(Attempt::Retry);
        }
        let e = failed(&shown, resp).await;
        let again = status.is_server_error()
            || matches!(&e, CliError::Api { code, .. }
                if code == "offset_mismatch" || code == "upload_busy");
        Err(if again {
            Attempt::Retry(e)
        } else {
            Attempt::Fatal(e)
        })
    }
}

/// The pieces of `r`, [`READ_BYTES`] at a time.
fn read_stream<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    r: R,
) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + 'static {
    futures::stream::unfold(r, |mut f| async move {
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
}

async fn read_state(shown: &str, resp: reqwest::Response) -> Result<FileState, CliError> {
    let text = resp.text().await.map_err(unreachable(shown))?;
    serde_json::from_str(&text).map_err(|e| CliError::Malformed {
        url: shown.to_string(),
        cause: format!("{e}: {}", snippet(&text)),
    })
}

/// The SHA-256 of the file at `path` (lowercase hex), read a piece at a time.
async fn file_sha256(path: &Path) -> Result<String, CliError> {
    let f = tokio::fs::File::open(path)
        .await
        .map_err(|e| CliError::Usage(format!("cannot open {}: {e}", path.display())))?;
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut pieces = std::pin::pin!(read_stream(f));
    while let Some(p) = pieces.next().await {
        let p = p.map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
        hash.update(&p);
    }
    Ok(hex(hash.finish().as_ref()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Uploads `path` (resumable): creates the upload unless `resume` names one, then sends
/// the bytes from the cluster's resume point, retrying (from the new resume point) up to
/// [`UPLOAD_RETRIES_MAX`] times with a doubling wait. Returns the file's state once
/// complete; the error names how to resume.
pub(crate) async fn upload_file(
    cli: &Cli,
    path: &Path,
    mime: Option<&str>,
    resume: Option<&str>,
) -> Result<FileState, CliError> {
    let (http, base, token) = client(cli)?;
    let size = tokio::fs::metadata(path)
        .await
        .map_err(|e| CliError::Usage(format!("cannot open {}: {e}", path.display())))?
        .len();
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("file")
        .to_string();
    let mime = mime.map_or_else(|| mime_for(path).to_string(), str::to_string);
    let up = Uploader {
        http,
        base,
        token,
        path,
        size,
    };
    // The local bytes' hash, to compare with what the cluster stored: taken from the bytes
    // as they are sent when one request sends the whole file, else read again at the end.
    let whole_hash = std::sync::Arc::new(std::sync::Mutex::new(ring::digest::Context::new(
        &ring::digest::SHA256,
    )));
    let mut hashed_whole = false;
    let mut done = None;
    let (file, mut offset) = match resume {
        Some(f) => {
            let (offset, length) = match up.offset(f).await {
                Ok(x) => x,
                Err(Attempt::Retry(e) | Attempt::Fatal(e)) => return Err(e),
            };
            if length != size {
                return Err(CliError::Usage(format!(
                    "{f} is an upload of {length} bytes; {} has {size}",
                    path.display()
                )));
            }
            (f.to_string(), offset)
        }
        None => {
            let st = up.create(&mime, &name).await?;
            let created = (st.file_id.clone(), st.offset);
            if st.sha256.is_some() {
                done = Some(st); // an empty file is complete at once
            }
            created
        }
    };
    let progress = std::sync::Arc::new(std::sync::Mutex::new(Progress::new(
        format!("uploading {name}"),
        size,
    )));
    let mut wait = UPLOAD_RETRY_FIRST;
    let mut attempt = 0;
    let result = loop {
        if let Some(st) = done.take() {
            break Ok(st);
        }
        // At `offset == size` this is the empty PATCH that completes a file whose bytes
        // are all stored (or returns it, when the completing request lost its answer).
        let first = offset == 0 && attempt == 0;
        let hash = first.then(|| whole_hash.clone());
        match up.patch(&file, offset, &progress, hash).await {
            Ok(st) if st.sha256.is_some() => {
                hashed_whole = first;
                break Ok(st);
            }
            Ok(st) if st.offset > offset => offset = st.offset,
            Ok(st) => {
                if attempt == UPLOAD_RETRIES_MAX {
                    break Err(CliError::Failed(format!(
                        "{file} stays at {} of {size} bytes",
                        st.offset
                    )));
                }
                attempt += 1;
            }
            Err(Attempt::Fatal(e)) => break Err(e),
            Err(Attempt::Retry(e)) => {
                if attempt == UPLOAD_RETRIES_MAX {
                    break Err(e);
                }
                attempt += 1;
                tokio::time::sleep(wait).await;
                wait *= 2;
                match up.offset(&file).await {
                    Ok((o, _)) => offset = o,
                    Err(Attempt::Fatal(e)) => break Err(e),
                    Err(Attempt::Retry(_)) => {}
                }
            }
        }
    };
    if let Ok(g) = progress.lock() {
        g.finish();
    }
    let local_sha = match (&result, hashed_whole) {
        (Ok(_), true) => {
            let ctx = whole_hash
                .lock()
                .map(|c| c.clone())
                .map_err(|_| CliError::Failed("the hash was lost".into()))?;
            hex(ctx.finish().as_ref())
        }
        (Ok(_), false) => file_sha256(path).await?,
        (Err(_), _) => String::new(),
    };
    match result {
        Ok(st) => match &st.sha256 {
            Some(h) if *h == local_sha => Ok(st),
            other => Err(CliError::Failed(format!(
                "{file}: the cluster stored bytes hashing to {}, {} hashes to {local_sha}",
                other.as_deref().unwrap_or("nothing"),
                path.display()
            ))),
        },
        Err(e) => Err(CliError::Failed(format!(
            "{e}\nthe upload stopped; continue it (from any node) with: \
             chat-cli --server URL upload --resume {file} {}",
            path.display()
        ))),
    }
}

/// `chat-cli upload PATH [--resume FILE_ID]`.
pub async fn upload(cli: &Cli, args: &UploadArgs) -> Result<String, CliError> {
    let st = upload_file(
        cli,
        &args.path,
        args.mime.as_deref(),
        args.resume.as_deref(),
    )
    .await?;
    if cli.json {
        return serde_json::to_string_pretty(&st)
            .map(|j| j + "\n")
            .map_err(|e| CliError::Failed(e.to_string()));
    }
    Ok(format!(
        "{}  {} bytes  {}  {}  sha256 {}\n",
        st.file_id,
        st.size,
        st.mime,
        st.name,
        st.sha256.unwrap_or_default()
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

/// `GET url` with the user's token: the answer (and the URL as shown) when it is a
/// success, else the node's error.
async fn get_ok(
    http: &reqwest::Client,
    url: reqwest::Url,
    token: &str,
) -> Result<(reqwest::Response, String), CliError> {
    let shown = url.to_string();
    let resp = http
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .map_err(unreachable(&shown))?;
    if !resp.status().is_success() {
        return Err(failed(&shown, resp).await);
    }
    Ok((resp, shown))
}

/// `chat-cli quota`: what the user holds against the quota (`GET /v1/quota`).
pub async fn quota(cli: &Cli) -> Result<String, CliError> {
    let (http, base, token) = client(cli)?;
    let (resp, shown) = get_ok(&http, join(&base, "v1/quota")?, &token).await?;
    let v: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| CliError::Failed(format!("{shown}: {e}")))?;
    if cli.json {
        return Ok(format!("{v}\n"));
    }
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    Ok(format!(
        "{}: {} of {} in {} file(s)\n",
        v["user"].as_str().unwrap_or("?"),
        crate::format::human_bytes(n("used_bytes")),
        crate::format::human_bytes(n("quota_bytes")),
        n("files")
    ))
}

/// `chat-cli download FILE_ID [-o PATH]`.
pub async fn download(cli: &Cli, args: &DownloadArgs) -> Result<String, CliError> {
    let (http, base, token) = client(cli)?;
    let mut url = join(&base, &format!("v1/files/{}", args.file_id))?;
    if let Some(chat) = &args.chat {
        url.query_pairs_mut().append_pair("chat", chat);
    }
    let (resp, shown) = get_ok(&http, url, &token).await?;
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
