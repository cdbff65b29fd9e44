//! `chat-cli e2e …`: end-to-end encrypted chats with MLS (docs/protocol.md §20).
//!
//! This device's identity, groups and decrypted history live in one encrypted state file
//! (`chatd_e2e::Device`). The key comes from `CHAT_CLI_E2E_PASSPHRASE` (Argon2id), else
//! from a key file beside the state file (0600), made at `e2e init`. Every command first
//! catches up: it reads the chat's log after the last entry this device processed and
//! feeds it, in seq order, to the device. A commit is built on the device's epoch and sent
//! with that epoch; when another member's commit won it (`stale_epoch`), the device
//! discards its own, catches up and builds it again on the new epoch.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use chatd_e2e::{Device, E2eError, Event, Kind, StoreKey};
use chatd_proto::{ClientFrame, ServerFrame};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use crate::client::CliError;
use crate::format::{clean, format_time};
use crate::messaging::{connect, context};
use crate::render::{Align, Table};
use crate::ws::{self, Connection};
use crate::Cli;

/// KeyPackages a device keeps published (what `init` uploads, what `refresh` tops up to).
pub const KEY_PACKAGES_PUBLISHED: usize = 20;
/// Attempts of one commit: each one after another member's commit won the epoch.
pub const COMMIT_ATTEMPTS_MAX: u32 = 8;
/// Attempts of one `e2e_send` after a lost connection or `unavailable` (the same
/// `client_msg_id` and bytes each time).
pub const SEND_ATTEMPTS_MAX: u32 = 4;
/// Room left in a commit's frame for its other fields (ids, users).
pub const COMMIT_FRAME_OVERHEAD_BYTES: usize = 2048;
/// Largest file `e2e send --file` encrypts (it is encrypted in memory).
pub const FILE_BYTES_MAX: u64 = 256 << 20;
/// Tests only: milliseconds to wait between building a commit and sending it (at most
/// 60 000), so that another member's commit can win the epoch meanwhile.
pub const TEST_COMMIT_DELAY_ENV: &str = "CHAT_CLI_E2E_TEST_COMMIT_DELAY_MS";
/// The environment variable holding the state file's passphrase.
pub const PASSPHRASE_ENV: &str = "CHAT_CLI_E2E_PASSPHRASE";

/// `e2e` arguments.
#[derive(Clone, Debug, Args)]
pub struct E2eArgs {
    /// This device's state file [default: ~/.local/share/chat-cli/e2e/<user>.mls].
    #[arg(long, env = "CHAT_CLI_E2E_STATE", value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: E2eCommand,
}

/// `e2e` commands.
#[derive(Clone, Debug, Subcommand)]
pub enum E2eCommand {
    /// Make this device's identity and publish its KeyPackages.
    Init {
        /// The device's name (1-32 of A-Z a-z 0-9 _ . : -).
        #[arg(long, default_value = "cli")]
        device: String,
    },
    /// Publish KeyPackages up to 20, and a last-resort one if it is missing.
    Refresh,
    /// This device's user, device name and safety number.
    Whoami,
    /// A user's E2E devices and their KeyPackages left.
    Devices {
        /// The user [default: you].
        user: Option<String>,
    },
    /// Create an E2E group (or a direct chat) with these users; print its id.
    Create {
        /// A name the server stores in the clear (optional).
        #[arg(long, default_value = "")]
        name: String,
        /// A direct chat: you and one other user.
        #[arg(long)]
        direct: bool,
        /// The other members.
        users: Vec<String>,
    },
    /// Add users (every device of theirs) to an E2E chat.
    Add {
        /// The chat.
        chat: String,
        /// The users.
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Remove users from an E2E chat.
    Remove {
        /// The chat.
        chat: String,
        /// The users.
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Send an encrypted message, with encrypted files.
    Send {
        /// The chat.
        chat: String,
        /// The text.
        text: String,
        /// A file to encrypt and attach (repeatable).
        #[arg(long = "file", value_name = "PATH")]
        files: Vec<PathBuf>,
    },
    /// Catch up and print the chat's messages held on this device.
    Read {
        /// The chat.
        chat: String,
        /// Only the last N messages.
        #[arg(long)]
        last: Option<usize>,
    },
    /// Members of an E2E chat: devices and safety numbers.
    Members {
        /// The chat.
        chat: String,
    },
    /// Download and decrypt a file of an encrypted message.
    Download {
        /// The chat.
        chat: String,
        /// The message's seq.
        seq: u64,
        /// Which of its files (from 0).
        #[arg(long, default_value_t = 0)]
        index: usize,
        /// Where to write it [default: its name, in the current directory].
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// What MLS costs this machine: a group of N devices made in this process (no server),
    /// its commits and welcome, and messages encrypted and decrypted.
    Bench {
        /// Devices in the group (2-200).
        #[arg(long, default_value_t = 20)]
        devices: usize,
        /// Messages encrypted and decrypted.
        #[arg(long, default_value_t = 200)]
        messages: usize,
        /// Bytes of each message.
        #[arg(long, default_value_t = 100)]
        message_bytes: usize,
    },
    /// Forget one of your devices (and its KeyPackages) on the server.
    RetireDevice {
        /// The device.
        device: String,
    },
}

/// What an E2E application message carries, inside the encryption.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    pub text: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<SealedFile>,
}

/// An encrypted attachment: where its ciphertext is and what decrypts it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedFile {
    pub file_id: String,
    /// `chatd_e2e::FileKey` as hex.
    pub key: String,
    pub name: String,
    pub mime: String,
    pub size: u64,
}

impl Payload {
    /// The payload of decrypted bytes: JSON from chat-cli, else the bytes as text.
    pub fn parse(bytes: &[u8]) -> Payload {
        serde_json::from_slice(bytes).unwrap_or_else(|_| Payload {
            text: String::from_utf8_lossy(bytes).into_owned(),
            files: Vec::new(),
        })
    }
}

fn e2e_error(e: E2eError) -> CliError {
    CliError::Failed(format!("e2e: {e}"))
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The default state file of `user`.
fn default_state(user: &str) -> Result<PathBuf, CliError> {
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".local/share"))
        })
        .ok_or_else(|| CliError::Usage("no HOME: pass --state".into()))?;
    Ok(base.join("chat-cli/e2e").join(format!("{user}.mls")))
}

fn key_file(state: &Path) -> PathBuf {
    let mut name = state.as_os_str().to_owned();
    name.push(".key");
    PathBuf::from(name)
}

/// The state file's key: from the passphrase, else from the key file (made if `create`).
fn state_key(state: &Path, create: bool) -> Result<StoreKey, CliError> {
    if let Some(pass) = std::env::var(PASSPHRASE_ENV).ok().filter(|p| !p.is_empty()) {
        let salt = if create {
            chatd_e2e::store::StoreKey::new_salt()
        } else {
            chatd_e2e::read_salt(state).map_err(e2e_error)?
        };
        return StoreKey::from_passphrase(&pass, &salt).map_err(e2e_error);
    }
    let path = key_file(state);
    if create {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let key = StoreKey::random();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| CliError::Failed(format!("cannot create {}: {e}", path.display())))?;
        f.write_all(&key.to_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| CliError::Failed(format!("cannot write {}: {e}", path.display())))?;
        return Ok(key);
    }
    let bytes = std::fs::read(&path).map_err(|e| {
        CliError::Failed(format!(
            "cannot read the state key {} ({e}); set {PASSPHRASE_ENV} if the state was made with a passphrase",
            path.display()
        ))
    })?;
    let key: [u8; 32] = bytes
        .try_into()
        .map_err(|_| CliError::Failed(format!("{} is not a 32-byte key", path.display())))?;
    Ok(StoreKey::from_bytes(key))
}

/// This user's E2E device for `chat-cli chat`, if one is set up (the state file of
/// `CHAT_CLI_E2E_STATE`, else the default one): `Ok(None)` when there is none.
pub fn session_device(user: &str) -> Result<Option<Device>, CliError> {
    let path = match std::env::var_os("CHAT_CLI_E2E_STATE").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => default_state(user)?,
    };
    if !path.exists() {
        return Ok(None);
    }
    let key = state_key(&path, false)?;
    let dev = Device::open(&path, &key).map_err(e2e_error)?;
    if dev.user() != user {
        return Err(CliError::Usage(format!(
            "{} is {}'s device, not {user}'s",
            path.display(),
            dev.user()
        )));
    }
    Ok(Some(dev))
}

/// Feeds one log entry of an E2E chat to the device (entries that are not MLS messages,
/// and those at or below its cursor, change nothing).
pub fn feed(dev: &mut Device, m: &chatd_proto::MessageView) -> Result<Option<Event>, CliError> {
    let Some(kind) = m.kind.strip_prefix("mls_").and_then(Kind::parse) else {
        return Ok(None);
    };
    let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(&m.text) else {
        return Ok(None);
    };
    dev.process(&m.chat, m.seq, &m.sender, kind, &bytes, m.ts)
        .map(Some)
        .map_err(e2e_error)
}

/// The text of a decrypted message as one line: its text and its files' names.
pub fn line_of(plaintext: &[u8]) -> String {
    let p = Payload::parse(plaintext);
    let mut text = p.text;
    for f in &p.files {
        text.push_str(&format!(
            " [📎 {} {}]",
            f.name,
            crate::format::human_bytes(f.size)
        ));
    }
    text
}

/// Encrypts `text` for `chat` as chat-cli's payload: (epoch, base64 MLS message).
pub fn seal_text(dev: &mut Device, chat: &str, text: &str) -> Result<(u64, String), CliError> {
    seal_payload(
        dev,
        chat,
        &Payload {
            text: text.to_string(),
            files: Vec::new(),
        },
    )
}

/// Encrypts `payload` for `chat`: (epoch, base64 MLS message).
pub fn seal_payload(
    dev: &mut Device,
    chat: &str,
    payload: &Payload,
) -> Result<(u64, String), CliError> {
    let plain = serde_json::to_vec(payload)
        .map_err(|e| CliError::Failed(format!("cannot encode the message: {e}")))?;
    let out = dev.encrypt(chat, &plain).map_err(e2e_error)?;
    Ok((out.epoch, b64(&out.data)))
}

/// A connection and this device.
struct Session {
    conn: Connection,
    dev: Device,
}

async fn open(cli: &Cli, args: &E2eArgs) -> Result<Session, CliError> {
    let conn = connect(cli).await?;
    let path = match &args.state {
        Some(p) => p.clone(),
        None => default_state(conn.user())?,
    };
    if !path.exists() {
        return Err(CliError::Usage(format!(
            "no E2E device at {}: run `chat-cli e2e init` first",
            path.display()
        )));
    }
    let key = state_key(&path, false)?;
    let dev = Device::open(&path, &key).map_err(e2e_error)?;
    if dev.user() != conn.user() {
        return Err(CliError::Usage(format!(
            "{} is {}'s device, the token is {}'s",
            path.display(),
            dev.user(),
            conn.user()
        )));
    }
    Ok(Session { conn, dev })
}

/// Runs an `e2e` command.
pub async fn run(cli: &Cli, args: &E2eArgs) -> Result<String, CliError> {
    match &args.command {
        E2eCommand::Bench {
            devices,
            messages,
            message_bytes,
        } => {
            let dir = tempfile::tempdir()
                .map_err(|e| CliError::Failed(format!("cannot make a temporary directory: {e}")))?;
            let (d, m, b) = (*devices, *messages, *message_bytes);
            let r = tokio::task::spawn_blocking(move || {
                let r = chatd_e2e::bench::run(dir.path(), d, m, b);
                drop(dir);
                r
            })
            .await
            .map_err(|e| CliError::Failed(format!("the bench failed: {e}")))?
            .map_err(e2e_error)?;
            if cli.json {
                return json(&r);
            }
            Ok(format!(
                "MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519, {} devices, {} messages of {} bytes\n\
                 KeyPackage                     {:>9} bytes\n\
                 add {} devices (one commit)    {:>9.1} ms   commit {} bytes, welcome {} bytes\n\
                 join from the welcome          {:>9.2} ms per device\n\
                 key update commit              {:>9.2} ms   {} bytes; processed in {:.2} ms\n\
                 encrypt (state saved each)     {:>9.3} ms   p99 {:.3} ms; {} bytes on the wire\n\
                 decrypt                        {:>9.3} ms\n\
                 state file                     {:>9} bytes, saved in {:.2} ms\n",
                r.devices,
                r.messages,
                r.message_bytes,
                r.key_package_bytes,
                r.devices - 1,
                r.add_commit_ms,
                r.add_commit_bytes,
                r.welcome_bytes,
                r.join_ms,
                r.update_commit_ms,
                r.update_commit_bytes,
                r.update_process_ms,
                r.encrypt_ms,
                r.encrypt_p99_ms,
                r.ciphertext_bytes,
                r.decrypt_ms,
                r.state_file_bytes,
                r.save_ms,
            ))
        }
        E2eCommand::Init { device } => init(cli, args, device).await,
        E2eCommand::Refresh => {
            let mut s = open(cli, args).await?;
            let n = refresh(&mut s).await?;
            Ok(format!("published {n} KeyPackages\n"))
        }
        E2eCommand::Whoami => {
            let s = open(cli, args).await?;
            Ok(format!(
                "{} / {}\nsafety number: {}\n",
                s.dev.user(),
                s.dev.device_id(),
                s.dev.safety_number()
            ))
        }
        E2eCommand::Devices { user } => {
            let mut conn = connect(cli).await?;
            let user = user.clone().unwrap_or_else(|| conn.user().to_string());
            let devices = devices(&mut conn, &user).await?;
            if cli.json {
                return json(&devices);
            }
            let mut t = Table::new(&[
                ("DEVICE", Align::Left),
                ("KEYPACKAGES", Align::Right),
                ("LAST RESORT", Align::Left),
            ]);
            for d in devices {
                t.row(
                    d.available == 0,
                    vec![
                        d.device,
                        d.available.to_string(),
                        if d.last_resort { "yes" } else { "no" }.into(),
                    ],
                );
            }
            Ok(t.render(false))
        }
        E2eCommand::Create {
            name,
            direct,
            users,
        } => {
            let mut s = open(cli, args).await?;
            if *direct && users.len() != 1 {
                return Err(CliError::Usage(
                    "a direct E2E chat is with exactly one other user".into(),
                ));
            }
            let answer = s
                .conn
                .request(|id| ClientFrame::CreateE2e {
                    id,
                    name: name.clone(),
                    direct: *direct,
                })
                .await
                .map_err(|e| context(e, "cannot create the chat"))?;
            let Some(ServerFrame::Done { chat, .. }) = answer.frame else {
                return Err(CliError::Failed(format!(
                    "unexpected answer {}",
                    answer.raw
                )));
            };
            s.dev.create_group(&chat).map_err(e2e_error)?;
            s.dev.save().map_err(e2e_error)?;
            if !users.is_empty() {
                add(&mut s, &chat, users).await?;
            }
            Ok(format!("{chat}\n"))
        }
        E2eCommand::Add { chat, users } => {
            let mut s = open(cli, args).await?;
            let seq = add(&mut s, chat, users).await?;
            Ok(format!(
                "added at seq {seq}; epoch {}\n",
                epoch(&s.dev, chat)
            ))
        }
        E2eCommand::Remove { chat, users } => {
            let mut s = open(cli, args).await?;
            let seq = remove(&mut s, chat, users).await?;
            Ok(format!(
                "removed at seq {seq}; epoch {}\n",
                epoch(&s.dev, chat)
            ))
        }
        E2eCommand::Send { chat, text, files } => {
            let mut s = open(cli, args).await?;
            let mut payload = Payload {
                text: text.clone(),
                files: Vec::new(),
            };
            let mut refs = Vec::new();
            for path in files {
                let (sealed, file_ref) = seal_file(cli, path).await?;
                payload.files.push(sealed);
                refs.push(file_ref);
            }
            let seq = send(&mut s, chat, &payload, refs).await?;
            Ok(format!("{chat}/{seq}\n"))
        }
        E2eCommand::Read { chat, last } => {
            let mut s = open(cli, args).await?;
            catch_up(&mut s, chat).await?;
            let mut history = s.dev.history(chat);
            if let Some(n) = last {
                let skip = history.len().saturating_sub(*n);
                history.drain(..skip);
            }
            if cli.json {
                let rows: Vec<serde_json::Value> = history
                    .iter()
                    .map(|m| {
                        let p = Payload::parse(&m.text);
                        serde_json::json!({
                            "seq": m.seq, "ts": m.ts_ms, "sender": m.sender_user,
                            "device": m.sender_device, "text": p.text,
                            "files": p.files.iter().map(|f| serde_json::json!({
                                "name": f.name, "mime": f.mime, "size": f.size,
                            })).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                return json(&rows);
            }
            let mut t = Table::new(&[
                ("SEQ", Align::Right),
                ("TIME (UTC)", Align::Left),
                ("SENDER", Align::Left),
                ("TEXT", Align::Left),
            ]);
            for m in history {
                let p = Payload::parse(&m.text);
                let mut text = clean(&p.text);
                for f in &p.files {
                    text.push_str(&format!(
                        " [file: {} {}]",
                        clean(&f.name),
                        crate::format::human_bytes(f.size)
                    ));
                }
                t.row(
                    false,
                    vec![
                        m.seq.to_string(),
                        format_time(m.ts_ms),
                        format!("{}/{}", m.sender_user, m.sender_device),
                        text,
                    ],
                );
            }
            Ok(t.render(false))
        }
        E2eCommand::Members { chat } => {
            let mut s = open(cli, args).await?;
            catch_up(&mut s, chat).await?;
            let members = s.dev.members(chat);
            if cli.json {
                let rows: Vec<serde_json::Value> = members
                    .iter()
                    .map(|m| {
                        serde_json::json!({"user": m.user, "device": m.device,
                            "safety_number": m.safety_number})
                    })
                    .collect();
                return json(&serde_json::json!({
                    "chat": chat, "epoch": s.dev.epoch(chat), "members": rows,
                }));
            }
            let mut t = Table::new(&[
                ("USER", Align::Left),
                ("DEVICE", Align::Left),
                ("SAFETY NUMBER", Align::Left),
            ]);
            for m in members {
                t.row(false, vec![m.user, m.device, m.safety_number]);
            }
            Ok(format!(
                "epoch {}\n{}",
                epoch(&s.dev, chat),
                t.render(false)
            ))
        }
        E2eCommand::Download {
            chat,
            seq,
            index,
            output,
        } => {
            let mut s = open(cli, args).await?;
            catch_up(&mut s, chat).await?;
            let Some(m) = s.dev.history(chat).into_iter().find(|m| m.seq == *seq) else {
                return Err(CliError::Failed(format!(
                    "no decrypted message {seq} of {chat} on this device"
                )));
            };
            let Some(f) = Payload::parse(&m.text).files.get(*index).cloned() else {
                return Err(CliError::Failed(format!(
                    "message {seq} has no file {index}"
                )));
            };
            open_file(cli, chat, &f, output.clone()).await
        }
        E2eCommand::RetireDevice { device } => {
            let mut conn = connect(cli).await?;
            conn.request(|id| ClientFrame::RetireDevice {
                id,
                device: device.clone(),
            })
            .await
            .map_err(|e| context(e, &format!("cannot retire {device}")))?;
            Ok(format!("retired {device}\n"))
        }
    }
}

fn json(v: &impl Serialize) -> Result<String, CliError> {
    serde_json::to_string_pretty(v)
        .map(|s| s + "\n")
        .map_err(|e| CliError::Failed(format!("cannot encode JSON: {e}")))
}

fn epoch(dev: &Device, chat: &str) -> String {
    dev.epoch(chat)
        .map_or_else(|| "none (not in the group)".into(), |e| e.to_string())
}

async fn init(cli: &Cli, args: &E2eArgs, device: &str) -> Result<String, CliError> {
    let conn = connect(cli).await?;
    let path = match &args.state {
        Some(p) => p.clone(),
        None => default_state(conn.user())?,
    };
    if path.exists() {
        return Err(CliError::Usage(format!(
            "{} exists: this device is set up already",
            path.display()
        )));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| CliError::Failed(format!("cannot create {}: {e}", dir.display())))?;
    }
    let key = state_key(&path, true)?;
    let dev = Device::create(&path, &key, conn.user(), device).map_err(e2e_error)?;
    let mut s = Session { conn, dev };
    let n = refresh(&mut s).await?;
    Ok(format!(
        "device {} of {} ready; {n} KeyPackages published\nstate: {}\nsafety number: {}\n",
        s.dev.device_id(),
        s.dev.user(),
        path.display(),
        s.dev.safety_number()
    ))
}

async fn devices(
    conn: &mut Connection,
    user: &str,
) -> Result<Vec<chatd_proto::DeviceView>, CliError> {
    let answer = conn
        .request(|id| ClientFrame::Devices {
            id,
            user: user.to_string(),
        })
        .await
        .map_err(|e| context(e, &format!("cannot list {user}'s devices")))?;
    match answer.frame {
        Some(ServerFrame::Devices { devices, .. }) => Ok(devices),
        _ => Err(CliError::Failed(format!(
            "unexpected answer {}",
            answer.raw
        ))),
    }
}

/// Tops the device's published KeyPackages up to [`KEY_PACKAGES_PUBLISHED`], with a
/// last-resort one if it has none; answers how many it published.
async fn refresh(s: &mut Session) -> Result<usize, CliError> {
    let user = s.dev.user().to_string();
    let mine = devices(&mut s.conn, &user)
        .await?
        .into_iter()
        .find(|d| d.device == s.dev.device_id());
    let (available, last_resort) = mine.map_or((0, false), |d| (d.available, d.last_resort));
    let want = KEY_PACKAGES_PUBLISHED.saturating_sub(available as usize);
    if want == 0 && last_resort {
        return Ok(0);
    }
    let made = s
        .dev
        .key_packages(
            want,
            chatd_e2e::KEY_PACKAGE_LIFETIME_SECS_DEFAULT,
            !last_resort,
        )
        .map_err(e2e_error)?;
    let upload = |k: &chatd_e2e::KeyPackageOut| chatd_proto::KeyPackageUpload {
        data: b64(&k.data),
        expires: k.expires_ms,
    };
    let packages: Vec<_> = made.iter().filter(|k| !k.last_resort).map(upload).collect();
    let last = made.iter().find(|k| k.last_resort).map(upload);
    let n = packages.len() + usize::from(last.is_some());
    s.conn
        .request(|id| ClientFrame::KeyPackagesUpload {
            id,
            device: s.dev.device_id().to_string(),
            packages,
            last_resort: last,
        })
        .await
        .map_err(|e| context(e, "cannot publish KeyPackages"))?;
    Ok(n)
}

/// Reads `chat`'s log after what the device processed and feeds it in order; saves.
/// Answers the events.
async fn catch_up(s: &mut Session, chat: &str) -> Result<Vec<Event>, CliError> {
    let after = s.dev.processed_seq(chat);
    let (entries, _) =
        crate::messaging::read_history(&mut s.conn, chat, None, Some(after), None).await?;
    let mut events = Vec::new();
    for m in entries {
        let Some(kind) = m.kind.strip_prefix("mls_").and_then(Kind::parse) else {
            continue;
        };
        let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(&m.text) else {
            // Not what a client sent (the server checks base64): skip it.
            continue;
        };
        events.push(
            s.dev
                .process(chat, m.seq, &m.sender, kind, &bytes, m.ts)
                .map_err(e2e_error)?,
        );
    }
    s.dev.save().map_err(e2e_error)?;
    Ok(events)
}

enum SendError {
    /// Another commit won the epoch.
    Stale,
    Other(CliError),
}

/// Sends one `e2e_send`, retrying a lost connection or `unavailable`/`outcome_unknown`
/// with the same `client_msg_id` and bytes; answers the ack's seq.
#[allow(clippy::too_many_arguments)]
async fn e2e_send(
    s: &mut Session,
    chat: &str,
    kind: &str,
    epoch: u64,
    data: &[u8],
    welcome: Option<&[u8]>,
    add: &[String],
    remove: &[String],
    files: Vec<chatd_proto::FileRef>,
) -> Result<u64, SendError> {
    let client_msg_id = ws::new_client_msg_id();
    let (data, welcome) = (b64(data), welcome.map(b64));
    let mut last = None;
    for attempt in 1..=SEND_ATTEMPTS_MAX {
        if attempt > 1 {
            tokio::time::sleep(std::time::Duration::from_millis(250 << (attempt - 2))).await;
        }
        let answer = s
            .conn
            .request_raw(|id| ClientFrame::E2eSend {
                id,
                chat: chat.to_string(),
                client_msg_id: client_msg_id.clone(),
                kind: kind.to_string(),
                epoch,
                data: data.clone(),
                welcome: welcome.clone(),
                add: add.to_vec(),
                remove: remove.to_vec(),
                files: files.clone(),
            })
            .await;
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        if let Some((code, message)) = answer.error() {
            use chatd_proto::code;
            if code == code::STALE_EPOCH {
                return Err(SendError::Stale);
            }
            let e = context(
                ws::refused(code, message),
                &format!("cannot send to {chat}"),
            );
            if matches!(
                code,
                code::RATE_LIMITED | code::UNAVAILABLE | code::OUTCOME_UNKNOWN
            ) {
                last = Some(e);
                continue;
            }
            return Err(SendError::Other(e));
        }
        return match answer.frame {
            Some(ServerFrame::Ack { seq, .. }) => Ok(seq),
            _ => Err(SendError::Other(CliError::Failed(format!(
                "unexpected answer {}",
                answer.raw
            )))),
        };
    }
    Err(SendError::Other(last.unwrap_or_else(|| {
        CliError::Failed(format!("cannot send to {chat}"))
    })))
}

/// Builds a commit with `make` on the device's current epoch and sends it with the
/// server-side member changes; on `stale_epoch` catches up and builds it again.
async fn commit(
    s: &mut Session,
    chat: &str,
    make: impl Fn(&mut Device) -> Result<chatd_e2e::Commit, E2eError>,
    add: &[String],
    remove: &[String],
) -> Result<u64, CommitError> {
    for _ in 0..COMMIT_ATTEMPTS_MAX {
        catch_up(s, chat).await?;
        if !s.dev.has_group(chat) {
            return Err(CliError::Failed(format!("this device is not in {chat}'s group")).into());
        }
        // A commit of an earlier run that never reached the log (or it would have been
        // merged by the catch-up) is dropped.
        if s.dev.pending_commit(chat).is_some() {
            s.dev.discard_pending(chat);
        }
        let c = make(&mut s.dev).map_err(e2e_error)?;
        if !fits_in_a_frame(&c) {
            s.dev.discard_pending(chat);
            s.dev.save().map_err(e2e_error)?;
            return Err(CommitError::TooLarge);
        }
        if let Some(ms) = std::env::var(TEST_COMMIT_DELAY_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            // Tests widen the window in which another member's commit wins the epoch.
            tokio::time::sleep(std::time::Duration::from_millis(ms.min(60_000))).await;
        }
        match e2e_send(
            s,
            chat,
            "commit",
            c.epoch,
            &c.data,
            c.welcome.as_deref(),
            add,
            remove,
            Vec::new(),
        )
        .await
        {
            Ok(seq) => {
                catch_up(s, chat).await?;
                if s.dev.epoch(chat) != Some(c.epoch + 1) {
                    return Err(CliError::Failed(format!(
                        "the commit at seq {seq} was stored but this device did not apply it"
                    ))
                    .into());
                }
                return Ok(seq);
            }
            Err(SendError::Stale) => {
                eprintln!(
                    "chat-cli: another member's commit won epoch {} of {chat}; committing again on the next",
                    c.epoch
                );
                s.dev.discard_pending(chat);
                s.dev.save().map_err(e2e_error)?;
            }
            Err(SendError::Other(e)) => return Err(e.into()),
        }
    }
    Err(CliError::Failed(format!(
        "{COMMIT_ATTEMPTS_MAX} commits to {chat} lost their epoch to others; try again"
    ))
    .into())
}

/// Why a commit was not stored.
enum CommitError {
    /// The commit and its welcome do not fit in one frame: add fewer devices at once.
    TooLarge,
    Cli(CliError),
}

impl From<CliError> for CommitError {
    fn from(e: CliError) -> Self {
        CommitError::Cli(e)
    }
}

impl From<CommitError> for CliError {
    fn from(e: CommitError) -> Self {
        match e {
            CommitError::TooLarge => CliError::Failed(
                "the commit and its welcome do not fit in one frame (64 KiB)".into(),
            ),
            CommitError::Cli(e) => e,
        }
    }
}

/// Whether a commit's `e2e_send` is within the protocol's bounds (base64 of each part, the
/// whole frame with room for its other fields).
fn fits_in_a_frame(c: &chatd_e2e::Commit) -> bool {
    use chatd_proto::e2e::DATA_BYTES_MAX;
    let welcome = c.welcome.as_ref().map_or(0, Vec::len);
    let b64_len = |n: usize| n.div_ceil(3) * 4;
    c.data.len() <= DATA_BYTES_MAX
        && welcome <= DATA_BYTES_MAX
        && b64_len(c.data.len()) + b64_len(welcome) + COMMIT_FRAME_OVERHEAD_BYTES
            <= chatd_proto::FRAME_BYTES_MAX
}

/// The current members of `chat` on the server.
async fn server_members(s: &mut Session, chat: &str) -> Result<Vec<String>, CliError> {
    let answer = s
        .conn
        .request(|id| ClientFrame::Cursors {
            id,
            chat: chat.to_string(),
        })
        .await
        .map_err(|e| context(e, &format!("cannot read {chat}'s members")))?;
    match answer.frame {
        Some(ServerFrame::Cursors { cursors, .. }) => {
            Ok(cursors.into_iter().map(|c| c.user).collect())
        }
        _ => Err(CliError::Failed(format!(
            "unexpected answer {}",
            answer.raw
        ))),
    }
}

/// Commits the removal of group members who are no longer members on the server (they
/// left): nothing is sent to a chat whose group still holds someone who left.
async fn remove_departed(s: &mut Session, chat: &str) -> Result<(), CliError> {
    catch_up(s, chat).await?;
    let current = server_members(s, chat).await?;
    let mut gone: Vec<String> = s
        .dev
        .members(chat)
        .into_iter()
        .map(|m| m.user)
        .filter(|u| !current.contains(u))
        .collect();
    gone.sort();
    gone.dedup();
    if gone.is_empty() {
        return Ok(());
    }
    let users = gone.clone();
    commit(s, chat, move |d| d.remove(chat, &users), &[], &[]).await?;
    Ok(())
}

async fn add(s: &mut Session, chat: &str, users: &[String]) -> Result<u64, CliError> {
    let mut packages = Vec::new();
    for user in users {
        let answer = s
            .conn
            .request(|id| ClientFrame::KeyPackagesClaim {
                id,
                user: user.clone(),
            })
            .await
            .map_err(|e| context(e, &format!("cannot claim {user}'s KeyPackages")))?;
        let Some(ServerFrame::KeyPackages { packages: got, .. }) = answer.frame else {
            return Err(CliError::Failed(format!(
                "unexpected answer {}",
                answer.raw
            )));
        };
        if got.is_empty() {
            return Err(CliError::Failed(format!(
                "{user} has no E2E device with a KeyPackage (they run `chat-cli e2e init`)"
            )));
        }
        for p in got {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(&p.data)
                .map_err(|e| {
                    CliError::Failed(format!("{user}/{}: bad KeyPackage: {e}", p.device))
                })?;
            packages.push((user.clone(), bytes));
        }
    }
    // As many devices per commit as fit in a frame with the welcome (which carries the
    // whole ratchet tree): all at once, else halves, and so on.
    let mut batch = packages.len();
    let mut done = 0;
    let mut last_seq = 0;
    while done < packages.len() {
        let part = &packages[done..(done + batch).min(packages.len())];
        let kps: Vec<Vec<u8>> = part.iter().map(|(_, kp)| kp.clone()).collect();
        let mut joining: Vec<String> = part.iter().map(|(u, _)| u.clone()).collect();
        joining.dedup();
        match commit(s, chat, |d| d.add(chat, &kps), &joining, &[]).await {
            Ok(seq) => {
                last_seq = seq;
                done += part.len();
            }
            Err(CommitError::TooLarge) if batch > 1 => batch = batch.div_ceil(2),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(last_seq)
}

async fn remove(s: &mut Session, chat: &str, users: &[String]) -> Result<u64, CliError> {
    catch_up(s, chat).await?;
    let current = server_members(s, chat).await?;
    let on_server: Vec<String> = users
        .iter()
        .filter(|u| current.contains(u))
        .cloned()
        .collect();
    let users = users.to_vec();
    Ok(commit(s, chat, move |d| d.remove(chat, &users), &[], &on_server).await?)
}

/// Encrypts and sends `payload`; answers its seq once this device has seen it back.
async fn send(
    s: &mut Session,
    chat: &str,
    payload: &Payload,
    files: Vec<chatd_proto::FileRef>,
) -> Result<u64, CliError> {
    remove_departed(s, chat).await?;
    let plain = serde_json::to_vec(payload)
        .map_err(|e| CliError::Failed(format!("cannot encode the message: {e}")))?;
    let out = s.dev.encrypt(chat, &plain).map_err(e2e_error)?;
    let seq = match e2e_send(
        s,
        chat,
        "application",
        out.epoch,
        &out.data,
        None,
        &[],
        &[],
        files,
    )
    .await
    {
        Ok(seq) => seq,
        Err(SendError::Stale) => {
            return Err(CliError::Failed(
                "unexpected stale_epoch for a message".into(),
            ))
        }
        Err(SendError::Other(e)) => return Err(e),
    };
    catch_up(s, chat).await?;
    Ok(seq)
}

/// Encrypts the file at `path` with a fresh key and uploads the ciphertext.
pub async fn seal_file(
    cli: &Cli,
    path: &Path,
) -> Result<(SealedFile, chatd_proto::FileRef), CliError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| CliError::Usage(format!("cannot open {}: {e}", path.display())))?;
    if meta.len() > FILE_BYTES_MAX {
        return Err(CliError::Usage(format!(
            "{} is larger than {} (E2E files are encrypted in memory)",
            path.display(),
            crate::format::human_bytes(FILE_BYTES_MAX)
        )));
    }
    let plain = std::fs::read(path)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
    let (cipher, key) = chatd_e2e::encrypt_file(&plain);
    let dir = tempfile::tempdir()
        .map_err(|e| CliError::Failed(format!("cannot make a temporary directory: {e}")))?;
    // The server sees this name and type, never the real ones.
    let sealed_path = dir.path().join("encrypted.bin");
    std::fs::write(&sealed_path, &cipher)
        .map_err(|e| CliError::Failed(format!("cannot write {}: {e}", sealed_path.display())))?;
    let up = crate::files::upload_file(cli, &sealed_path, Some("application/octet-stream"), None)
        .await?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("file")
        .to_string();
    Ok((
        SealedFile {
            file_id: up.file_id.clone(),
            key: key.to_hex(),
            name,
            mime: crate::files::mime_for(path).to_string(),
            size: plain.len() as u64,
        },
        chatd_proto::FileRef {
            file_id: up.file_id,
            name: None,
            mime: None,
            size: Some(up.size),
        },
    ))
}

/// Downloads an encrypted attachment, decrypts it and writes it (whole, or not at all).
async fn open_file(
    cli: &Cli,
    chat: &str,
    f: &SealedFile,
    output: Option<PathBuf>,
) -> Result<String, CliError> {
    let key = chatd_e2e::FileKey::from_hex(&f.key)
        .ok_or_else(|| CliError::Failed("the message's file key is malformed".into()))?;
    let dir = tempfile::tempdir()
        .map_err(|e| CliError::Failed(format!("cannot make a temporary directory: {e}")))?;
    let sealed = dir.path().join("encrypted.bin");
    crate::files::download(
        cli,
        &crate::files::DownloadArgs {
            file_id: f.file_id.clone(),
            output: Some(sealed.clone()),
            chat: Some(chat.to_string()),
        },
    )
    .await?;
    let cipher = std::fs::read(&sealed)
        .map_err(|e| CliError::Failed(format!("cannot read {}: {e}", sealed.display())))?;
    let plain = chatd_e2e::decrypt_file(&cipher, &key).map_err(e2e_error)?;
    // The name came from another member: only its last component is used.
    let safe = Path::new(&f.name)
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("file"));
    let out = output.unwrap_or(safe);
    let partial = dir.path().join("plain.part");
    std::fs::write(&partial, &plain)
        .and_then(|()| std::fs::copy(&partial, &out).map(|_| ()))
        .map_err(|e| CliError::Failed(format!("cannot write {}: {e}", out.display())))?;
    Ok(format!(
        "{}  {} bytes  {}\n",
        out.display(),
        plain.len(),
        f.mime
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn payloads_round_trip_and_foreign_bytes_read_as_text() {
        let p = Payload {
            text: "hi".into(),
            files: vec![SealedFile {
                file_id: "f:1".into(),
                key: "00".repeat(32),
                name: "a.txt".into(),
                mime: "text/plain".into(),
                size: 3,
            }],
        };
        assert_eq!(Payload::parse(&serde_json::to_vec(&p).unwrap()), p);
        assert_eq!(Payload::parse(b"plain words").text, "plain words");
    }

    #[test]
    fn a_commit_fits_in_a_frame_or_is_split() {
        let c = |data: usize, welcome: Option<usize>| chatd_e2e::Commit {
            data: vec![0; data],
            welcome: welcome.map(|w| vec![0; w]),
            epoch: 0,
        };
        // Measured (`chat-cli e2e bench --devices 100`): adding 99 devices at once does
        // not fit; one device added to a 100-leaf group does.
        assert!(!fits_in_a_frame(&c(28_715, Some(33_730))));
        assert!(fits_in_a_frame(&c(9_000, Some(34_000))));
        assert!(fits_in_a_frame(&c(40_000, None)));
        assert!(!fits_in_a_frame(&c(46_001, None)));
        // At the frame's bound exactly.
        let room = chatd_proto::FRAME_BYTES_MAX - COMMIT_FRAME_OVERHEAD_BYTES;
        assert!(fits_in_a_frame(&c(room / 8 * 3, Some(room / 8 * 3))));
        assert!(!fits_in_a_frame(&c(room / 8 * 3 + 3, Some(room / 8 * 3))));
    }
}
