//! Length-prefixed frames of codec values, as snapshot files hold them:
//! `[u32 LE length][codec value]`, one after another, each at most a caller-given bound.
//!
//! [`read_frame`] is the reader of untrusted bytes (a snapshot received from a peer, a file
//! on disk): every failure is a typed [`FrameError`], never a panic, and it allocates no
//! more than the bytes actually present (a corrupt length cannot make it reserve 64 MiB).

use std::io::{Read, Write};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::CodecError;

/// Bytes of a frame's header: the body length, `u32` little endian.
pub const FRAME_HEADER_BYTES: usize = 4;

/// Target size of one snapshot frame; a frame holds whole records, so it may exceed it by
/// one record.
pub const SNAPSHOT_FRAME_BYTES_TARGET: usize = 1 << 20;
/// Upper bound on one snapshot frame when reading: a larger length is corruption.
pub const SNAPSHOT_FRAME_BYTES_MAX: usize = 64 << 20;

/// One frame of a snapshot file: a run of a group's records, `(user key, value)`, in key
/// order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFrame {
    /// The records.
    pub records: Vec<(serde_bytes::ByteBuf, serde_bytes::ByteBuf)>,
}

/// Why a frame could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Reading or writing failed.
    #[error("frame i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The header claims (or the value needs) more than the bound.
    #[error("frame of {len} bytes exceeds the {max} byte bound")]
    TooLarge { len: usize, max: usize },
    /// The input ended inside a frame: in its header or its body.
    #[error("truncated frame: {got} of {expected} bytes")]
    Truncated { expected: usize, got: usize },
    /// The body is not a valid value.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Writes `value` as one frame; refuses a value whose encoding exceeds `max` bytes.
pub fn write_frame<T: Serialize>(
    out: &mut impl Write,
    value: &T,
    max: usize,
) -> Result<(), FrameError> {
    let bytes = crate::encode(value)?;
    let len = u32::try_from(bytes.len())
        .ok()
        .filter(|&l| l as usize <= max)
        .ok_or(FrameError::TooLarge {
            len: bytes.len(),
            max,
        })?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(&bytes)?;
    Ok(())
}

/// Reads `input` until `buf` is full or the input ends; returns the bytes read.
fn read_up_to(input: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads the next frame, of at most `max` body bytes; `None` at a clean end of input (no
/// byte of a next header). A partial header or body is [`FrameError::Truncated`].
pub fn read_frame<T: DeserializeOwned>(
    input: &mut impl Read,
    max: usize,
) -> Result<Option<T>, FrameError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    match read_up_to(input, &mut header)? {
        0 => return Ok(None),
        FRAME_HEADER_BYTES => {}
        got => {
            return Err(FrameError::Truncated {
                expected: FRAME_HEADER_BYTES,
                got,
            })
        }
    }
    let len = u32::from_le_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    // Grows with what arrives, not with what the header claims.
    let mut body = Vec::with_capacity(len.min(64 * 1024));
    input.take(len as u64).read_to_end(&mut body)?;
    if body.len() != len {
        return Err(FrameError::Truncated {
            expected: len,
            got: body.len(),
        });
    }
    Ok(Some(crate::decode(&body)?))
}

/// Reads every frame of `bytes` (a whole snapshot file); the fuzzers' entry point.
pub fn read_all_frames<T: DeserializeOwned>(
    mut bytes: &[u8],
    max: usize,
) -> Result<Vec<T>, FrameError> {
    let mut out = Vec::new();
    while let Some(frame) = read_frame(&mut bytes, max)? {
        out.push(frame);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_bytes::ByteBuf;

    fn frame() -> SnapshotFrame {
        SnapshotFrame {
            records: vec![
                (ByteBuf::from(b"c\0g:1".to_vec()), ByteBuf::from(vec![1, 2])),
                (ByteBuf::from(b"n".to_vec()), ByteBuf::from(Vec::new())),
            ],
        }
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn golden_bytes_of_a_snapshot_frame_with_its_header() {
        let mut out = Vec::new();
        write_frame(&mut out, &frame(), SNAPSHOT_FRAME_BYTES_MAX).unwrap();
        // [len 14 u32 LE][version 1][2 records][5 "c\0g:1"][2 01 02][1 "n"][0]
        assert_eq!(hex(&out), "0e0000000102056300673a31020102016e00");
        let back: Vec<SnapshotFrame> = read_all_frames(&out, SNAPSHOT_FRAME_BYTES_MAX).unwrap();
        assert_eq!(back, vec![frame()]);
    }

    #[test]
    fn clean_end_truncation_and_bounds_are_typed_errors() {
        let mut two = Vec::new();
        write_frame(&mut two, &frame(), 1024).unwrap();
        write_frame(&mut two, &SnapshotFrame::default(), 1024).unwrap();
        let all: Vec<SnapshotFrame> = read_all_frames(&two, 1024).unwrap();
        assert_eq!(all, vec![frame(), SnapshotFrame::default()]);
        for cut in 1..two.len() {
            let r = read_all_frames::<SnapshotFrame>(&two[..cut], 1024);
            // A cut exactly between frames is a clean end; anywhere else it is an error.
            if cut == 4 + 14 {
                assert_eq!(r.unwrap().len(), 1);
            } else {
                assert!(r.is_err(), "cut at {cut}");
            }
        }
        assert!(matches!(
            read_all_frames::<SnapshotFrame>(&[1, 0], 1024),
            Err(FrameError::Truncated {
                expected: 4,
                got: 2
            })
        ));
        // A header claiming 4 GiB is refused before anything is allocated.
        assert!(matches!(
            read_all_frames::<SnapshotFrame>(&[0xff, 0xff, 0xff, 0xff, 1], 1024),
            Err(FrameError::TooLarge { .. })
        ));
        // A header within the bound but past the input is a truncation, not an allocation.
        assert!(matches!(
            read_all_frames::<SnapshotFrame>(&[0, 0, 0, 4, 1], SNAPSHOT_FRAME_BYTES_MAX),
            Err(FrameError::Truncated { got: 1, .. })
        ));
        assert!(matches!(
            write_frame(&mut Vec::new(), &frame(), 3),
            Err(FrameError::TooLarge { max: 3, .. })
        ));
        assert!(matches!(
            read_all_frames::<SnapshotFrame>(&[1, 0, 0, 0, 9], 1024),
            Err(FrameError::Codec(CodecError::UnsupportedVersion {
                found: 9,
                ..
            }))
        ));
    }
}
