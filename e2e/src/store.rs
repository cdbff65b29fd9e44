//! The encrypted state file: its key, its byte layout, and atomic reads and writes.
//!
//! ```text
//! offset  bytes  what
//!      0      8  magic b"CHATDE2E"
//!      8      1  format version (1)
//!      9     16  salt (Argon2id salt of a passphrase key; random otherwise)
//!     25     24  XChaCha20-Poly1305 nonce (random per save)
//!     49      …  ciphertext of the state (`chatd_codec::encode`) with its 16-byte tag;
//!                the associated data is bytes 0..49
//! ```

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use zeroize::{Zeroize, Zeroizing};

use crate::{E2eError, STATE_FILE_BYTES_MAX};

/// The first bytes of every state file.
pub const MAGIC: &[u8; 8] = b"CHATDE2E";
/// The state file format this build writes and reads.
pub const VERSION: u8 = 1;
/// Bytes of the salt in the header.
pub const SALT_BYTES: usize = 16;
/// Bytes of the nonce in the header.
pub const NONCE_BYTES: usize = 24;
/// Bytes of the header (the associated data of the AEAD).
pub const HEADER_BYTES: usize = MAGIC.len() + 1 + SALT_BYTES + NONCE_BYTES;
/// Bytes of the AEAD tag after the ciphertext.
pub const TAG_BYTES: usize = 16;

/// Argon2id cost of [`StoreKey::from_passphrase`]: memory in KiB.
pub const ARGON2_MEMORY_KIB: u32 = 64 * 1024;
/// Argon2id cost: passes over memory.
pub const ARGON2_ITERATIONS: u32 = 3;
/// Argon2id cost: lanes.
pub const ARGON2_LANES: u32 = 1;
/// Shortest salt [`StoreKey::from_passphrase`] accepts.
pub const SALT_BYTES_MIN: usize = 8;

/// The 32-byte key of a device's state file. Zeroized on drop.
pub struct StoreKey {
    key: [u8; 32],
    /// The salt a passphrase key was derived with, written into the header on save.
    salt: Option<[u8; SALT_BYTES]>,
}

impl StoreKey {
    /// Derives the key from a passphrase with Argon2id (64 MiB, 3 passes, 1 lane). The salt
    /// must be at least 8 bytes; a 16-byte salt is also written into the state file's
    /// header (read it back with [`read_salt`] before opening).
    pub fn from_passphrase(passphrase: &str, salt: &[u8]) -> Result<StoreKey, E2eError> {
        if salt.len() < SALT_BYTES_MIN {
            return Err(E2eError::InvalidInput(format!(
                "salt of {} bytes, at least {SALT_BYTES_MIN} needed",
                salt.len()
            )));
        }
        let params =
            argon2::Params::new(ARGON2_MEMORY_KIB, ARGON2_ITERATIONS, ARGON2_LANES, Some(32))
                .map_err(|e| E2eError::InvalidInput(format!("argon2 parameters: {e}")))?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut key = [0u8; 32];
        argon
            .hash_password_into(passphrase.as_bytes(), salt, &mut key)
            .map_err(|e| E2eError::InvalidInput(format!("argon2: {e}")))?;
        Ok(StoreKey {
            key,
            salt: <[u8; SALT_BYTES]>::try_from(salt).ok(),
        })
    }

    /// A fresh random key (from the OS).
    pub fn random() -> StoreKey {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        StoreKey { key, salt: None }
    }

    /// A key from its raw bytes.
    pub fn from_bytes(b: [u8; 32]) -> StoreKey {
        StoreKey { key: b, salt: None }
    }

    /// The raw key bytes (to keep in an OS key store, say).
    pub fn to_bytes(&self) -> [u8; 32] {
        self.key
    }

    /// A fresh random 16-byte salt for [`StoreKey::from_passphrase`].
    pub fn new_salt() -> [u8; SALT_BYTES] {
        let mut salt = [0u8; SALT_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        salt
    }

    pub(crate) fn salt(&self) -> Option<[u8; SALT_BYTES]> {
        self.salt
    }

    pub(crate) fn duplicate(&self) -> StoreKey {
        StoreKey {
            key: self.key,
            salt: self.salt,
        }
    }
}

impl Drop for StoreKey {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKey(***)")
    }
}

/// The header of a state file.
fn header(salt: &[u8; SALT_BYTES], nonce: &[u8; NONCE_BYTES]) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[..8].copy_from_slice(MAGIC);
    h[8] = VERSION;
    h[9..9 + SALT_BYTES].copy_from_slice(salt);
    h[9 + SALT_BYTES..].copy_from_slice(nonce);
    h
}

/// Encrypts `plaintext` into a whole state file's bytes with the given nonce.
pub(crate) fn seal_with_nonce(
    key: &StoreKey,
    salt: &[u8; SALT_BYTES],
    nonce: &[u8; NONCE_BYTES],
    plaintext: &[u8],
) -> Result<Vec<u8>, E2eError> {
    let h = header(salt, nonce);
    let cipher = XChaCha20Poly1305::new((&key.key).into());
    let ct = cipher
        .encrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: plaintext,
                aad: &h,
            },
        )
        .map_err(|_| E2eError::Corrupt("state encryption failed".into()))?;
    let mut out = Vec::with_capacity(HEADER_BYTES + ct.len());
    out.extend_from_slice(&h);
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Encrypts `plaintext` into a whole state file's bytes with a fresh random nonce.
pub(crate) fn seal(
    key: &StoreKey,
    salt: &[u8; SALT_BYTES],
    plaintext: &[u8],
) -> Result<Vec<u8>, E2eError> {
    let mut nonce = [0u8; NONCE_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    seal_with_nonce(key, salt, &nonce, plaintext)
}

/// Checks the header of a state file's bytes and returns its salt.
fn parse_header(bytes: &[u8]) -> Result<[u8; SALT_BYTES], E2eError> {
    if bytes.len() < HEADER_BYTES + TAG_BYTES {
        return Err(E2eError::Corrupt(format!(
            "{} bytes, shorter than a header and a tag",
            bytes.len()
        )));
    }
    if &bytes[..8] != MAGIC {
        return Err(E2eError::Corrupt(
            "not a chatd E2E state file (bad magic)".into(),
        ));
    }
    if bytes[8] != VERSION {
        return Err(E2eError::Corrupt(format!(
            "state file version {} (this build reads {VERSION})",
            bytes[8]
        )));
    }
    let mut salt = [0u8; SALT_BYTES];
    salt.copy_from_slice(&bytes[9..9 + SALT_BYTES]);
    Ok(salt)
}

/// Decrypts a whole state file's bytes; returns the salt and the plaintext.
pub(crate) fn open_bytes(
    key: &StoreKey,
    bytes: &[u8],
) -> Result<([u8; SALT_BYTES], Zeroizing<Vec<u8>>), E2eError> {
    let salt = parse_header(bytes)?;
    let (h, ct) = bytes.split_at(HEADER_BYTES);
    let nonce = &h[9 + SALT_BYTES..];
    let cipher = XChaCha20Poly1305::new((&key.key).into());
    let pt = cipher
        .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: h })
        .map_err(|_| E2eError::BadKey)?;
    Ok((salt, Zeroizing::new(pt)))
}

/// Reads a state file whole, refusing one over [`STATE_FILE_BYTES_MAX`].
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, E2eError> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    if len > STATE_FILE_BYTES_MAX {
        return Err(E2eError::TooLarge {
            bytes: len,
            max: STATE_FILE_BYTES_MAX,
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    // The file may grow between the metadata and the read: read at most one byte more.
    file.take(STATE_FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)?;
    let read = bytes.len() as u64;
    if read > STATE_FILE_BYTES_MAX {
        return Err(E2eError::TooLarge {
            bytes: read,
            max: STATE_FILE_BYTES_MAX,
        });
    }
    Ok(bytes)
}

/// The salt in a state file's header, to derive its passphrase key before opening it.
pub fn read_salt(path: &Path) -> Result<[u8; SALT_BYTES], E2eError> {
    let mut file = File::open(path)?;
    let mut h = [0u8; HEADER_BYTES + TAG_BYTES];
    let mut got = 0;
    while got < h.len() {
        let n = file.read(&mut h[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    parse_header(&h[..got])
}

/// The temporary file a save writes before renaming it over `path`.
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes `bytes` as the file at `path` atomically: a temporary file (mode 0600) is
/// written and fsynced, renamed over `path`, and the directory is fsynced.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), E2eError> {
    if bytes.len() as u64 > STATE_FILE_BYTES_MAX {
        return Err(E2eError::TooLarge {
            bytes: bytes.len() as u64,
            max: STATE_FILE_BYTES_MAX,
        });
    }
    let tmp = tmp_path(path);
    let result = (|| -> Result<(), E2eError> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// The header layout is frozen: a change to it must be a new version.
    #[test]
    fn golden_header_bytes() {
        let key = StoreKey::from_bytes([7u8; 32]);
        let salt = [0x11u8; SALT_BYTES];
        let nonce = [0x22u8; NONCE_BYTES];
        let file = seal_with_nonce(&key, &salt, &nonce, b"state").unwrap();
        let mut expected = Vec::new();
        expected.extend_from_slice(b"CHATDE2E");
        expected.push(1);
        expected.extend_from_slice(&[0x11; 16]);
        expected.extend_from_slice(&[0x22; 24]);
        assert_eq!(&file[..HEADER_BYTES], &expected[..]);
        assert_eq!(HEADER_BYTES, 49);
        assert_eq!(file.len(), 49 + 5 + 16);
        // The ciphertext is frozen too (XChaCha20-Poly1305 over the header as AD).
        let ct: String = file[HEADER_BYTES..]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(ct, GOLDEN_CIPHERTEXT_HEX);
        let (s, pt) = open_bytes(&key, &file).unwrap();
        assert_eq!(s, salt);
        assert_eq!(&pt[..], b"state");
    }

    const GOLDEN_CIPHERTEXT_HEX: &str = "e516d0a615844d0a4d5e3133fa824b61811931d8da";

    #[test]
    fn header_is_authenticated() {
        let key = StoreKey::from_bytes([7u8; 32]);
        let file = seal(&key, &[1; SALT_BYTES], b"hello").unwrap();
        for i in 0..file.len() {
            let mut bad = file.clone();
            bad[i] ^= 0x01;
            assert!(
                open_bytes(&key, &bad).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
        let other = StoreKey::from_bytes([8u8; 32]);
        assert!(matches!(open_bytes(&other, &file), Err(E2eError::BadKey)));
        assert!(matches!(
            open_bytes(&key, &file[..HEADER_BYTES + 3]),
            Err(E2eError::Corrupt(_))
        ));
    }

    #[test]
    fn passphrase_key_is_deterministic_and_salted() {
        let salt = [5u8; 16];
        let a = StoreKey::from_passphrase("correct horse", &salt).unwrap();
        let b = StoreKey::from_passphrase("correct horse", &salt).unwrap();
        assert_eq!(a.to_bytes(), b.to_bytes());
        assert_eq!(a.salt(), Some(salt));
        let c = StoreKey::from_passphrase("correct horse", &[6u8; 16]).unwrap();
        assert_ne!(a.to_bytes(), c.to_bytes());
        assert!(matches!(
            StoreKey::from_passphrase("x", &[1u8; 4]),
            Err(E2eError::InvalidInput(_))
        ));
    }
}
