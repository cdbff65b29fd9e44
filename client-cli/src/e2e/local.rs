//! This device: its state file and key, and what `chat-cli chat` needs of it (decrypting
//! entries, sealing what is typed).

use base64::Engine as _;
use chatd_e2e::{Device, E2eError, Event, Kind, StoreKey};

use super::*;

pub(super) fn e2e_error(e: E2eError) -> CliError {
    CliError::Failed(format!("e2e: {e}"))
}

pub(super) fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The default state file of `user`.
pub(super) fn default_state(user: &str) -> Result<PathBuf, CliError> {
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

pub(super) fn key_file(state: &Path) -> PathBuf {
    let mut name = state.as_os_str().to_owned();
    name.push(".key");
    PathBuf::from(name)
}

/// The state file's key: from the passphrase, else from the key file (made if `create`).
pub(super) fn state_key(state: &Path, create: bool) -> Result<StoreKey, CliError> {
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
pub(super) struct Session {
    pub(super) conn: Connection,
    pub(super) dev: Device,
}

pub(super) async fn open(cli: &Cli, args: &E2eArgs) -> Result<Session, CliError> {
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
