//! Thumbnails of images (docs/files.md): `GET /v1/files/{id}/thumbnail` answers a JPEG (a
//! PNG when the image has transparency) at most [`THUMBNAIL_EDGE_PX`] on its long side,
//! made once per node from the file's bytes and kept beside its chunks
//! (`group | 0xfe | file id`, deleted with them). Only PNG, JPEG, GIF and WebP files up to
//! [`THUMBNAIL_SOURCE_BYTES_MAX`] get one; decoding is bounded in pixels and memory (a
//! decompression bomb is refused, not decoded), runs off the async runtime, and at most
//! [`THUMBNAILS_IN_FLIGHT_MAX`] run at once per node.

use std::io::Cursor;

use chatd_chat::FileRecord;

/// The long side of a thumbnail, in pixels.
pub const THUMBNAIL_EDGE_PX: u32 = 320;
/// Largest file a thumbnail is made of, in bytes (it is read whole to decode it).
pub const THUMBNAIL_SOURCE_BYTES_MAX: u64 = 32 << 20;
/// Largest width or height an image may declare to be decoded, in pixels.
pub const THUMBNAIL_SOURCE_EDGE_PX_MAX: u32 = 16_384;
/// Most memory one decode may allocate, in bytes.
pub const THUMBNAIL_DECODE_BYTES_MAX: u64 = 256 << 20;
/// Thumbnails made at once per node, at most (decoding is CPU-bound); more wait.
pub const THUMBNAILS_IN_FLIGHT_MAX: usize = 2;
/// JPEG quality of thumbnails.
const JPEG_QUALITY: u8 = 80;
/// The byte after the group in a stored thumbnail's key (chunk keys start with `f:`,
/// marks with 0xff: thumbnails sort between, inside the group's range).
pub const THUMBNAIL_TAG: u8 = 0xfe;

/// The key of `file`'s thumbnail in the `blobs` family.
pub fn thumbnail_key(group: u64, file: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + 1 + file.len());
    k.extend_from_slice(&group.to_be_bytes());
    k.push(THUMBNAIL_TAG);
    k.extend_from_slice(file.as_bytes());
    k
}

/// Whether a thumbnail is made for files like `record`.
pub fn has_thumbnail(record: &FileRecord) -> bool {
    matches!(
        record.mime.as_str(),
        "image/png" | "image/jpeg" | "image/gif" | "image/webp"
    ) && record.size > 0
        && record.size <= THUMBNAIL_SOURCE_BYTES_MAX
}

/// A made thumbnail: its media type and bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thumbnail {
    pub mime: &'static str,
    pub bytes: Vec<u8>,
}

/// Why no thumbnail could be made of an image's bytes.
#[derive(Debug, thiserror::Error)]
pub enum ThumbnailError {
    /// Not an image this build decodes, a damaged one, or one past the decoding bounds.
    #[error("not a decodable image within the bounds: {0}")]
    Undecodable(String),
    /// The thumbnail could not be encoded.
    #[error("thumbnail not encoded: {0}")]
    Encode(String),
}

/// Makes the thumbnail of an image's bytes (blocking: call it on a blocking thread).
pub fn make(bytes: &[u8]) -> Result<Thumbnail, ThumbnailError> {
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ThumbnailError::Undecodable(e.to_string()))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(THUMBNAIL_SOURCE_EDGE_PX_MAX);
    limits.max_image_height = Some(THUMBNAIL_SOURCE_EDGE_PX_MAX);
    limits.max_alloc = Some(THUMBNAIL_DECODE_BYTES_MAX);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| ThumbnailError::Undecodable(e.to_string()))?;
    let small = if img.width().max(img.height()) > THUMBNAIL_EDGE_PX {
        img.thumbnail(THUMBNAIL_EDGE_PX, THUMBNAIL_EDGE_PX)
    } else {
        img
    };
    let mut out = Vec::new();
    if small.color().has_alpha() {
        small
            .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .map_err(|e| ThumbnailError::Encode(e.to_string()))?;
        return Ok(Thumbnail {
            mime: "image/png",
            bytes: out,
        });
    }
    let rgb = small.to_rgb8();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, JPEG_QUALITY)
        .encode_image(&rgb)
        .map_err(|e| ThumbnailError::Encode(e.to_string()))?;
    Ok(Thumbnail {
        mime: "image/jpeg",
        bytes: out,
    })
}

/// A stored thumbnail: one byte naming its type (`j` JPEG, `p` PNG), then its bytes.
pub fn encode_stored(t: &Thumbnail) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + t.bytes.len());
    v.push(if t.mime == "image/png" { b'p' } else { b'j' });
    v.extend_from_slice(&t.bytes);
    v
}

/// Reads a stored thumbnail (`None` for bytes this code did not write).
pub fn decode_stored(v: &[u8]) -> Option<Thumbnail> {
    let (&kind, bytes) = v.split_first()?;
    let mime = match kind {
        b'p' => "image/png",
        b'j' => "image/jpeg",
        _ => return None,
    };
    Some(Thumbnail {
        mime,
        bytes: bytes.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn png(w: u32, h: u32, alpha: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let img: image::DynamicImage = if alpha {
            image::RgbaImage::from_fn(w, h, |x, y| image::Rgba([x as u8, y as u8, 9, 128])).into()
        } else {
            image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 9])).into()
        };
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn thumbnails_fit_320_on_the_long_side_and_keep_transparency() {
        let t = make(&png(1000, 500, false)).unwrap();
        assert_eq!(t.mime, "image/jpeg");
        let img = image::load_from_memory(&t.bytes).unwrap();
        assert_eq!((img.width(), img.height()), (320, 160));
        let t = make(&png(100, 800, true)).unwrap();
        assert_eq!(t.mime, "image/png");
        let img = image::load_from_memory(&t.bytes).unwrap();
        assert_eq!((img.width(), img.height()), (40, 320));
        // Small images are not enlarged.
        let img = image::load_from_memory(&make(&png(30, 20, false)).unwrap().bytes).unwrap();
        assert_eq!((img.width(), img.height()), (30, 20));
        assert_eq!(decode_stored(&encode_stored(&t)), Some(t));
    }

    /// CRC-32 (IEEE), as PNG chunks carry it.
    fn crc32(data: &[u8]) -> u32 {
        let mut c = 0xffff_ffffu32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    #[test]
    fn damaged_and_oversized_images_are_refused_not_decoded() {
        assert!(make(b"not an image").is_err());
        let mut cut = png(64, 64, false);
        cut.truncate(cut.len() / 2);
        assert!(make(&cut).is_err());
        // A well-formed PNG header (its CRC right) that declares 100000 x 100000 pixels:
        // refused by the bounds before any pixel is decoded.
        let mut bomb = png(1, 1, false);
        bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32(&bomb[12..29]);
        bomb[29..33].copy_from_slice(&crc.to_be_bytes());
        let e = make(&bomb).unwrap_err().to_string();
        assert!(e.contains("limit") || e.contains("Limit"), "{e}");
    }
}
