//! The one codec for every format chatd puts on disk or on the wire.
//!
//! Every encoded value is `[FORMAT_VERSION][bincode 2, standard config]`. The version byte
//! lets a future format be told apart from this one; a value with any other version byte is
//! refused with [`CodecError::UnsupportedVersion`], never guessed at. Decoding is bounded by
//! [`DECODE_BYTES_MAX`] so a corrupt length prefix cannot make us allocate without limit.
//!
//! Formats are frozen by golden-bytes tests in the crates that define them: a change to a
//! type that changes its bytes fails those tests, so it cannot happen by accident.

use serde::{de::DeserializeOwned, Serialize};

pub mod frame;

/// The version byte written in front of every encoded value.
pub const FORMAT_VERSION: u8 = 1;

/// Upper bound on the bytes a single decoded value may claim (lengths inside it included).
pub const DECODE_BYTES_MAX: usize = 256 * 1024 * 1024;

/// Why bytes could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The input was empty: not even a version byte.
    #[error("empty input: expected a version byte")]
    Empty,
    /// The version byte is not one this build understands.
    #[error("unsupported format version {found} (this build reads version {expected})")]
    UnsupportedVersion { found: u8, expected: u8 },
    /// The bytes after the version byte are not a valid value of the expected type.
    #[error("malformed {what}: {cause}")]
    Malformed { what: &'static str, cause: String },
    /// The bytes decoded to a value but some were left over.
    #[error("malformed {what}: {extra} trailing bytes")]
    TrailingBytes { what: &'static str, extra: usize },
    /// The value could not be encoded.
    #[error("cannot encode {what}: {cause}")]
    Encode { what: &'static str, cause: String },
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_BYTES_MAX>()
}

/// Encodes `value` as `[FORMAT_VERSION][bincode]`.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(64);
    encode_into(value, &mut out)?;
    Ok(out)
}

/// Appends `[FORMAT_VERSION][bincode]` of `value` to `out` (after whatever `out` holds).
pub fn encode_into<T: Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    out.push(FORMAT_VERSION);
    bincode::serde::encode_into_std_write(value, out, config()).map_err(|e| {
        CodecError::Encode {
            what: std::any::type_name::<T>(),
            cause: e.to_string(),
        }
    })?;
    Ok(())
}

/// Decodes a value encoded by [`encode`], refusing other versions and trailing bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let what = std::any::type_name::<T>();
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(CodecError::UnsupportedVersion {
            found: version,
            expected: FORMAT_VERSION,
        });
    }
    let (value, read) = bincode::serde::decode_from_slice::<T, _>(body, config()).map_err(|e| {
        CodecError::Malformed {
            what,
            cause: e.to_string(),
        }
    })?;
    if read != body.len() {
        return Err(CodecError::TrailingBytes {
            what,
            extra: body.len() - read,
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Sample {
        id: u64,
        name: String,
        data: Vec<u8>,
        flag: Option<bool>,
    }

    fn sample() -> Sample {
        Sample {
            id: 300,
            name: "ab".into(),
            data: vec![1, 2, 3],
            flag: Some(true),
        }
    }

    #[test]
    fn golden_bytes_of_the_version_1_layout() {
        // Frozen: varint 300 = [251, 44, 1]; strings and vecs are varint length + bytes.
        let golden: &[u8] = &[1, 251, 44, 1, 2, b'a', b'b', 3, 1, 2, 3, 1, 1];
        assert_eq!(encode(&sample()).unwrap(), golden);
        assert_eq!(decode::<Sample>(golden).unwrap(), sample());
    }

    #[test]
    fn refuses_other_versions_empty_input_and_trailing_bytes() {
        let mut bytes = encode(&sample()).unwrap();
        assert!(matches!(decode::<Sample>(&[]), Err(CodecError::Empty)));
        bytes[0] = 2;
        assert!(matches!(
            decode::<Sample>(&bytes),
            Err(CodecError::UnsupportedVersion { found: 2, .. })
        ));
        bytes[0] = FORMAT_VERSION;
        bytes.push(0);
        assert!(matches!(
            decode::<Sample>(&bytes),
            Err(CodecError::TrailingBytes { extra: 1, .. })
        ));
    }

    #[test]
    fn truncated_or_garbage_input_is_an_error_not_a_panic() {
        let bytes = encode(&sample()).unwrap();
        for cut in 1..bytes.len() {
            assert!(decode::<Sample>(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // A length prefix claiming far more than the bound is refused without allocating it.
        let huge: &[u8] = &[1, 0, 253, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        assert!(decode::<Sample>(huge).is_err());
    }
}
