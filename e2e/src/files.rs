//! Attachments of E2E chats: each file gets a fresh random key and is encrypted with
//! ChaCha20-Poly1305 in the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár).
//!
//! ```text
//! version (1 byte, = 1) | chunk 0 | chunk 1 | … | last chunk
//! chunk i = ChaCha20-Poly1305(key, nonce_i, plaintext[i * 64 KiB ..][.. 64 KiB]) (+16-byte tag)
//! nonce_i = 7 zero bytes | i as u32 big-endian | 1 if last chunk else 0
//! ```
//!
//! Every chunk but the last holds exactly [`FILE_CHUNK_BYTES`] of plaintext; the last holds
//! the rest (possibly nothing). The last-chunk flag in the nonce makes truncation at a chunk
//! boundary detectable, the index makes reordering detectable. The version byte is the
//! associated data of every chunk. The key is never reused, so a fixed nonce prefix is safe.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use rand::RngCore;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroize;

use crate::E2eError;

/// Plaintext bytes per chunk.
pub const FILE_CHUNK_BYTES: usize = 64 * 1024;
/// The encrypted file format's version byte.
pub const FILE_FORMAT_VERSION: u8 = 1;
const TAG_BYTES: usize = 16;

/// The key of one encrypted file. Serialized as a 64-character lowercase hex string.
#[derive(Clone, PartialEq, Eq)]
pub struct FileKey {
    pub key: [u8; 32],
}

impl Drop for FileKey {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

impl std::fmt::Debug for FileKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileKey(***)")
    }
}

impl FileKey {
    /// The key as 64 lowercase hex characters.
    pub fn to_hex(&self) -> String {
        self.key.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Option<FileKey> {
        let s = s.as_bytes();
        if s.len() != 64 {
            return None;
        }
        let mut key = [0u8; 32];
        for (i, pair) in s.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            key[i] = u8::try_from(hi * 16 + lo).ok()?;
        }
        Some(FileKey { key })
    }
}

impl Serialize for FileKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for FileKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<FileKey, D::Error> {
        let s = String::deserialize(d)?;
        FileKey::from_hex(&s)
            .ok_or_else(|| serde::de::Error::custom("a file key is 64 hex characters"))
    }
}

fn chunk_nonce(index: u32, last: bool) -> Nonce {
    let mut n = [0u8; 12];
    n[7..11].copy_from_slice(&index.to_be_bytes());
    n[11] = u8::from(last);
    Nonce::from(n)
}

/// Encrypts a whole file under a fresh random key. Infallible for any buffer that fits in
/// memory (the format allows 2^32 chunks: 256 TiB).
pub fn encrypt_file(plaintext: &[u8]) -> (Vec<u8>, FileKey) {
    let mut key = FileKey { key: [0u8; 32] };
    rand::rngs::OsRng.fill_bytes(&mut key.key);
    let ct = encrypt_file_with_key(plaintext, &key);
    (ct, key)
}

pub(crate) fn encrypt_file_with_key(plaintext: &[u8], key: &FileKey) -> Vec<u8> {
    let cipher = ChaCha20Poly1305::new((&key.key).into());
    let chunks = plaintext.len().div_ceil(FILE_CHUNK_BYTES).max(1);
    let mut out = Vec::with_capacity(1 + plaintext.len() + chunks * TAG_BYTES);
    out.push(FILE_FORMAT_VERSION);
    let aad = [FILE_FORMAT_VERSION];
    for i in 0..chunks {
        let start = i * FILE_CHUNK_BYTES;
        let end = (start + FILE_CHUNK_BYTES).min(plaintext.len());
        let last = i + 1 == chunks;
        // A chunk index beyond u32 would need a 256 TiB buffer.
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        let ct = cipher.encrypt(
            &chunk_nonce(index, last),
            Payload {
                msg: &plaintext[start..end],
                aad: &aad,
            },
        );
        match ct {
            Ok(ct) => out.extend_from_slice(&ct),
            // ChaCha20-Poly1305 fails only for messages over 256 GiB; chunks are 64 KiB.
            // An empty output would not decrypt, so this could never pass for a file.
            Err(_) => return Vec::new(),
        }
    }
    out
}

/// Decrypts a file made by [`encrypt_file`]; any change, truncation or extension of the
/// ciphertext, or a wrong key, is an error.
pub fn decrypt_file(ciphertext: &[u8], key: &FileKey) -> Result<Vec<u8>, E2eError> {
    let Some((&version, mut rest)) = ciphertext.split_first() else {
        return Err(E2eError::BadFile("empty"));
    };
    if version != FILE_FORMAT_VERSION {
        return Err(E2eError::BadFile("unknown format version"));
    }
    let cipher = ChaCha20Poly1305::new((&key.key).into());
    let aad = [FILE_FORMAT_VERSION];
    let mut out = Vec::with_capacity(rest.len());
    let mut index: u32 = 0;
    loop {
        let full = FILE_CHUNK_BYTES + TAG_BYTES;
        let last = rest.len() <= full;
        let take = if last { rest.len() } else { full };
        if take < TAG_BYTES {
            return Err(E2eError::BadFile("truncated"));
        }
        let (chunk, tail) = rest.split_at(take);
        let pt = cipher
            .decrypt(
                &chunk_nonce(index, last),
                Payload {
                    msg: chunk,
                    aad: &aad,
                },
            )
            .map_err(|_| {
                E2eError::BadFile("authentication failed (wrong key, tampered or truncated)")
            })?;
        out.extend_from_slice(&pt);
        if last {
            return Ok(out);
        }
        rest = tail;
        index = index
            .checked_add(1)
            .ok_or(E2eError::BadFile("too many chunks"))?;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn file_round_trips_at_chunk_edges() {
        for n in [
            0,
            1,
            FILE_CHUNK_BYTES - 1,
            FILE_CHUNK_BYTES,
            FILE_CHUNK_BYTES + 1,
            3 * FILE_CHUNK_BYTES,
            200_000,
        ] {
            let pt = data(n);
            let (ct, key) = encrypt_file(&pt);
            assert_eq!(
                ct.len(),
                1 + n + n.div_ceil(FILE_CHUNK_BYTES).max(1) * TAG_BYTES,
                "n={n}"
            );
            assert_eq!(decrypt_file(&ct, &key).unwrap(), pt, "n={n}");
        }
    }

    #[test]
    fn file_keys_are_fresh() {
        let (c1, k1) = encrypt_file(b"same");
        let (c2, k2) = encrypt_file(b"same");
        assert_ne!(k1.key, k2.key);
        assert_ne!(c1, c2);
    }

    #[test]
    fn file_tamper_truncation_and_wrong_key_fail() {
        let pt = data(2 * FILE_CHUNK_BYTES + 100);
        let (ct, key) = encrypt_file(&pt);
        for pos in [0, 1, 100, FILE_CHUNK_BYTES + 20, ct.len() - 1] {
            let mut bad = ct.clone();
            bad[pos] ^= 0x80;
            assert!(decrypt_file(&bad, &key).is_err(), "flip at {pos}");
        }
        // Truncation at a chunk boundary: the first two chunks alone are not a file.
        let two = 1 + 2 * (FILE_CHUNK_BYTES + TAG_BYTES);
        assert!(decrypt_file(&ct[..two], &key).is_err());
        assert!(decrypt_file(&ct[..ct.len() - 1], &key).is_err());
        assert!(decrypt_file(&ct[..1], &key).is_err());
        assert!(decrypt_file(&[], &key).is_err());
        let mut longer = ct.clone();
        longer.extend_from_slice(&[0u8; 16]);
        assert!(decrypt_file(&longer, &key).is_err());
        // Swapping two full chunks.
        let c = FILE_CHUNK_BYTES + TAG_BYTES;
        let mut swapped = ct.clone();
        swapped[1..1 + c].copy_from_slice(&ct[1 + c..1 + 2 * c]);
        swapped[1 + c..1 + 2 * c].copy_from_slice(&ct[1..1 + c]);
        assert!(decrypt_file(&swapped, &key).is_err());
        let other = FileKey { key: [9u8; 32] };
        assert!(decrypt_file(&ct, &other).is_err());
        assert_eq!(decrypt_file(&ct, &key).unwrap(), pt);
    }

    #[test]
    fn file_key_serde_is_hex() {
        let key = FileKey { key: [0xab; 32] };
        let s = key.to_hex();
        assert_eq!(s, "ab".repeat(32));
        assert_eq!(FileKey::from_hex(&s).unwrap(), key);
        assert!(FileKey::from_hex("zz").is_none());
        assert!(FileKey::from_hex(&"g".repeat(64)).is_none());
    }

    /// The format is frozen: a fixed key and plaintext give these bytes forever.
    #[test]
    fn golden_file_bytes() {
        let key = FileKey { key: [1u8; 32] };
        let ct = encrypt_file_with_key(b"chatd", &key);
        let hex: String = ct.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, GOLDEN_FILE_HEX);
    }

    const GOLDEN_FILE_HEX: &str = "017630e15ccd4eb4d9552646d90299cb06309713e974";
}
