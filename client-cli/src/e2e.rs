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

use chatd_e2e::Device;
use chatd_proto::{ClientFrame, ServerFrame};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use crate::client::CliError;
use crate::format::{clean, format_time};
use crate::messaging::{connect, context};
use crate::render::{Align, Table};
use crate::ws::{self, Connection};
use crate::Cli;

mod files;
mod local;
mod log;

pub use files::seal_file;
use files::*;
use local::*;
pub use local::{feed, line_of, seal_payload, seal_text, session_device};
use log::*;

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
    /// Leave an E2E chat: the server stops giving you its entries; the members' next
    /// message commits your devices' removal from the group.
    Leave {
        /// The chat.
        chat: String,
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
        E2eCommand::Leave { chat } => {
            let mut conn = connect(cli).await?;
            conn.request(|id| ClientFrame::Leave {
                id,
                chat: chat.clone(),
            })
            .await
            .map_err(|e| context(e, &format!("cannot leave {chat}")))?;
            Ok(format!("left {chat}\n"))
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
}
