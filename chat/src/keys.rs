//! Key layout inside a partition (raftlog adds the group prefix). Ids never contain `\0`
//! (the gateway validates them), so `\0` separates the parts.

pub(crate) const LOG_COUNT: &[u8] = b"n";

fn join(parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p);
    }
    k
}

pub(crate) fn log_record(seq: u64) -> Vec<u8> {
    [b"l".as_slice(), &seq.to_be_bytes()].concat()
}
pub(crate) fn chat(chat: &str) -> Vec<u8> {
    join(&[b"c", chat.as_bytes()])
}
pub(crate) fn message(chat: &str, seq: u64) -> Vec<u8> {
    join(&[b"m", chat.as_bytes(), &seq.to_be_bytes()])
}
/// A send's idempotency record: per (chat, sender, client_msg_id). (Records under the
/// earlier `d\0sender\0client_msg_id` layout, which had no expiry, are never read.)
pub(crate) fn dedup(chat: &str, sender: &str, client_msg_id: &str) -> Vec<u8> {
    join(&[
        b"i",
        chat.as_bytes(),
        sender.as_bytes(),
        client_msg_id.as_bytes(),
    ])
}
/// The expiry index of dedup records: `x\0` · expiry (ms, u64 BE) · `\0` · the dedup key.
pub(crate) fn dedup_expiry(expires_ms: u64, dedup_key: &[u8]) -> Vec<u8> {
    join(&[b"x", &expires_ms.to_be_bytes(), dedup_key])
}
/// The start of the expiry index.
pub(crate) const DEDUP_EXPIRY_START: &[u8] = b"x\0";
/// The end (exclusive) of the whole expiry index.
pub(crate) const DEDUP_EXPIRY_END: &[u8] = b"x\x01";
/// The expiry time inside an expiry index key.
pub(crate) fn expiry_of(expiry_key: &[u8]) -> Option<u64> {
    // "x" · 0 · 8 bytes · 0 · dedup key
    let bytes: [u8; 8] = expiry_key.get(2..10)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}
/// The dedup key inside an expiry index key.
pub(crate) fn dedup_key_of_expiry(expiry_key: &[u8]) -> Option<&[u8]> {
    // "x" · 0 · 8 bytes · 0 · dedup key
    expiry_key.get(11..)
}
pub(crate) fn cursor(chat: &str, user: &str) -> Vec<u8> {
    join(&[b"r", chat.as_bytes(), user.as_bytes()])
}
pub(crate) fn cursor_prefix(chat: &str) -> Vec<u8> {
    join(&[b"r", chat.as_bytes(), b""])
}
pub(crate) fn user_chat(user: &str, chat: &str) -> Vec<u8> {
    join(&[b"u", user.as_bytes(), chat.as_bytes()])
}
pub(crate) fn user_chat_prefix(user: &str) -> Vec<u8> {
    join(&[b"u", user.as_bytes(), b""])
}

/// The attachment index of a chat's partition: `a\0chat\0file\0seq (u64 BE)` for each
/// message of `chat` that carries `file` (removed when the message is deleted). Who may
/// read a file through a chat is decided from it.
pub(crate) fn attachment(chat: &str, file: &str, seq: u64) -> Vec<u8> {
    join(&[b"a", chat.as_bytes(), file.as_bytes(), &seq.to_be_bytes()])
}
/// The start of `file`'s entries in `chat`'s attachment index.
pub(crate) fn attachment_prefix(chat: &str, file: &str) -> Vec<u8> {
    join(&[b"a", chat.as_bytes(), file.as_bytes(), b""])
}

/// A chat a file was attached in, in the file's home partition: `fc\0file\0chat` → the
/// time of the last attach there (what collection checks the chat's index against).
pub(crate) fn file_chat(file: &str, chat: &str) -> Vec<u8> {
    join(&[b"fc", file.as_bytes(), chat.as_bytes()])
}
/// The start of `file`'s chats.
pub(crate) fn file_chat_prefix(file: &str) -> Vec<u8> {
    join(&[b"fc", file.as_bytes(), b""])
}

/// A file's record in its home partition.
pub(crate) fn file(file: &str) -> Vec<u8> {
    join(&[b"f", file.as_bytes()])
}

/// A file's state beside its record (docs/files.md "Dedup by content"): `fs\0file` ->
/// [`crate::files::FileState`], absent while it is the default.
pub(crate) fn file_state(file: &str) -> Vec<u8> {
    join(&[b"fs", file.as_bytes()])
}

/// The content index, in the content's partition (`1 + fnv1a64("c:" + sha256) % P`):
/// `ci\0sha256` -> [`crate::content::ContentEntry`] (the canonical file, its holders).
pub(crate) fn content(sha256: &str) -> Vec<u8> {
    join(&[b"ci", sha256.as_bytes()])
}
/// A holder of a content: `ch\0sha256\0file`.
pub(crate) fn content_holder(sha256: &str, file: &str) -> Vec<u8> {
    join(&[b"ch", sha256.as_bytes(), file.as_bytes()])
}
/// A file that let a content go, and may never hold it again: `ct\0sha256\0file` -> ms.
pub(crate) fn content_released(sha256: &str, file: &str) -> Vec<u8> {
    join(&[b"ct", sha256.as_bytes(), file.as_bytes()])
}

/// The expiry index of those: `cx\0` · expiry (ms, u64 BE) · the tombstone's key.
pub(crate) fn content_released_expiry(expires_ms: u64, tomb: &[u8]) -> Vec<u8> {
    [b"cx\0".as_slice(), &expires_ms.to_be_bytes(), tomb].concat()
}
/// The start and end of that index.
pub(crate) const CONTENT_RELEASED_EXPIRY_START: &[u8] = b"cx\0";
pub(crate) const CONTENT_RELEASED_EXPIRY_END: &[u8] = b"cx\x01";

/// A user's storage use, in the user's partition (`1 + fnv1a64("u:" + user) % P`):
/// `qu\0user` -> [`crate::quota::QuotaUsage`].
pub(crate) fn quota_usage(user: &str) -> Vec<u8> {
    join(&[b"qu", user.as_bytes()])
}
/// One charge: `qf\0user\0file` -> [`crate::quota::Charge`].
pub(crate) fn quota_charge(user: &str, file: &str) -> Vec<u8> {
    join(&[b"qf", user.as_bytes(), file.as_bytes()])
}
/// The start of every charge of a partition.
pub(crate) const QUOTA_CHARGES_START: &[u8] = b"qf\0";

/// The smallest key greater than every key starting with `prefix`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    end.push(0xff);
    end
}

/// An E2E chat's state (its epoch), in the chat's partition: `e2\0chat` ->
/// [`crate::e2e::E2eState`].
pub(crate) fn e2e(chat: &str) -> Vec<u8> {
    join(&[b"e2", chat.as_bytes()])
}

/// An E2E device's record, in its user's partition: `kd\0user\0device` ->
/// [`crate::e2e::DeviceRecord`].
pub(crate) fn device(user: &str, device: &str) -> Vec<u8> {
    join(&[b"kd", user.as_bytes(), device.as_bytes()])
}
/// The start of `user`'s devices.
pub(crate) fn device_prefix(user: &str) -> Vec<u8> {
    join(&[b"kd", user.as_bytes(), b""])
}
/// One stored KeyPackage: `kp\0user\0device\0index (u64 BE)` -> [`crate::e2e::KeyPackage`].
pub(crate) fn key_package(user: &str, device: &str, index: u64) -> Vec<u8> {
    join(&[
        b"kp",
        user.as_bytes(),
        device.as_bytes(),
        &index.to_be_bytes(),
    ])
}
/// The start of a device's KeyPackages.
pub(crate) fn key_package_prefix(user: &str, device: &str) -> Vec<u8> {
    join(&[b"kp", user.as_bytes(), device.as_bytes(), b""])
}
