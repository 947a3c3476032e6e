//! Loading an image file as transformers' `image_utils.load_image` (Pillow) does, with
//! Pillow's guard against decompression bombs: the format is sniffed from the first bytes and
//! the size read from the header before the file is read whole or decoded, so a huge file that
//! is no image, or a small file that decodes to gigabytes, is refused at once.

use std::fmt;
use std::fs;
use std::path::Path;

use crate::{ImageError, RgbImage};

/// Pillow's limit (`Image.MAX_IMAGE_PIXELS` x 2, where it raises `DecompressionBombError`):
/// about 179 million pixels, a 13 000 x 13 000 image, 537 MB as 8-bit RGB.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 178_956_970;

/// The environment variable that overrides [`DEFAULT_MAX_IMAGE_PIXELS`] (the vlmhost host sets
/// it from `train.max_image_pixels`, so every plugin in the process applies the same limit).
pub const MAX_IMAGE_PIXELS_VAR: &str = "VLMHOST_MAX_IMAGE_PIXELS";

/// The largest image, in pixels, [`load_image`] decodes.
pub fn max_image_pixels() -> u64 {
    std::env::var(MAX_IMAGE_PIXELS_VAR).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(DEFAULT_MAX_IMAGE_PIXELS)
}

/// Refuse a file that is no image by its first bytes, or whose header declares more than
/// `limit` pixels, before it is read whole.
fn check_header(path: &Path, limit: u64) -> Result<(), ImageError> {
    let io = |source| ImageError::Io { path: path.to_path_buf(), source };
    let decode_err = |message: String| ImageError::Decode { path: path.to_path_buf(), message };
    let file = std::io::BufReader::new(fs::File::open(path).map_err(io)?);
    // The format from the content alone (not the file name): none for a file that is no image.
    let reader = image::ImageReader::new(file).with_guessed_format().map_err(io)?;
    if reader.format().is_none() {
        return Err(decode_err("its first bytes are not those of an image file".into()));
    }
    let (width, height) = reader.into_dimensions().map_err(|e| decode_err(e.to_string()))?;
    if width as u64 * height as u64 > limit {
        return Err(ImageError::TooLarge { path: path.to_path_buf(), width, height, limit });
    }
    Ok(())
}

/// Loads an image file the way transformers' `load_image(path)` does: decode (format sniffed
/// from the content, as PIL does), apply the EXIF orientation (`ImageOps.exif_transpose`; JPEG
/// APP1 and the PNG eXIf chunk), then `convert("RGB")`: alpha is dropped, NOT composited on
/// white; grayscale is replicated; palettes are looked up (the decoder expands them).
///
/// 16-bit PNGs follow Pillow too: colour channels keep their high byte (Pillow unpacks
/// `RGB;16B` that way), while 16-bit grayscale opens as mode `I;16`, whose conversion to RGB
/// clips at 255 instead of scaling.
///
/// Known differences from Pillow: JPEG pixels (decoder, see the module docs); PNG EXIF kept in
/// an ImageMagick "Raw profile type exif" text chunk is ignored (Pillow reads it); CMYK JPEGs
/// are converted to RGB by the decoder, not by Pillow's formula (measured: off by at most 1).
pub fn load_image(path: &Path) -> Result<RgbImage, ImageError> {
    use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

    if !path.is_file() {
        return Err(ImageError::Missing {
            path: path.to_path_buf(),
        });
    }
    check_header(path, max_image_pixels())?;
    let bytes = fs::read(path).map_err(|source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let decode_err = |e: &dyn fmt::Display| ImageError::Decode {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let reader = ImageReader::new(std::io::Cursor::new(&bytes[..]))
        .with_guessed_format()
        .map_err(|e| decode_err(&e))?;
    let is_png = reader.format() == Some(ImageFormat::Png);
    let mut decoder = reader.into_decoder().map_err(|e| decode_err(&e))?;
    let orientation = if is_png {
        png_exif_orientation(&bytes)
    } else {
        decoder.orientation().map_err(|e| decode_err(&e))?
    };
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| decode_err(&e))?;
    img.apply_orientation(orientation);

    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut data = Vec::with_capacity(w * h * 3);
    match &img {
        DynamicImage::ImageRgb8(b) => data.extend_from_slice(b.as_raw()),
        DynamicImage::ImageRgba8(b) => {
            for p in b.as_raw().chunks_exact(4) {
                data.extend_from_slice(&p[..3]);
            }
        }
        DynamicImage::ImageLuma8(b) => {
            for &v in b.as_raw() {
                data.extend_from_slice(&[v, v, v]);
            }
        }
        DynamicImage::ImageLumaA8(b) => {
            for p in b.as_raw().chunks_exact(2) {
                data.extend_from_slice(&[p[0], p[0], p[0]]);
            }
        }
        DynamicImage::ImageLuma16(b) => {
            for &v in b.as_raw() {
                let v = v.min(255) as u8;
                data.extend_from_slice(&[v, v, v]);
            }
        }
        DynamicImage::ImageLumaA16(b) => {
            for p in b.as_raw().chunks_exact(2) {
                let v = (p[0] >> 8) as u8;
                data.extend_from_slice(&[v, v, v]);
            }
        }
        DynamicImage::ImageRgb16(b) => data.extend(b.as_raw().iter().map(|&v| (v >> 8) as u8)),
        DynamicImage::ImageRgba16(b) => {
            for p in b.as_raw().chunks_exact(4) {
                data.extend(p[..3].iter().map(|&v| (v >> 8) as u8));
            }
        }
        other => data = other.to_rgb8().into_raw(),
    }
    Ok(RgbImage::new(w, h, data))
}

/// EXIF orientation of a PNG from its eXIf chunk, wherever it is: Pillow also reads an eXIf
/// chunk that comes after the image data (the decoder's metadata stops at the first IDAT), and
/// the last one wins (`PngImagePlugin.PngStream.chunk_eXIf` overwrites `info["exif"]`).
fn png_exif_orientation(bytes: &[u8]) -> image::metadata::Orientation {
    use image::metadata::Orientation;
    let mut exif = None;
    let mut pos = 8; // PNG signature
    while pos + 8 <= bytes.len() {
        let len = u32::from_be_bytes([bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]]);
        let kind = &bytes[pos + 4..pos + 8];
        let start = pos + 8;
        let Some(end) = start
            .checked_add(len as usize)
            .filter(|&e| e <= bytes.len())
        else {
            break;
        };
        match kind {
            b"eXIf" => exif = Some(&bytes[start..end]),
            b"IEND" => break,
            _ => {}
        }
        pos = end + 4; // CRC
    }
    exif.and_then(Orientation::from_exif_chunk)
        .unwrap_or(Orientation::NoTransforms)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PNG whose header declares `width` x `height`, with no image data: the size check
    /// must refuse it from the header alone.
    fn png_header_only(width: u32, height: u32) -> Vec<u8> {
        let chunk = |kind: &[u8], data: &[u8]| {
            let body = [kind, data].concat();
            [&(data.len() as u32).to_be_bytes()[..], &body, &crc32fast::hash(&body).to_be_bytes()].concat()
        };
        let ihdr = [&width.to_be_bytes()[..], &height.to_be_bytes(), &[8, 2, 0, 0, 0]].concat(); // 8-bit RGB
        [&b"\x89PNG\r\n\x1a\n"[..], &chunk(b"IHDR", &ihdr), &chunk(b"IDAT", &[]), &chunk(b"IEND", &[])].concat()
    }

    #[test]
    fn a_decompression_bomb_is_refused_from_its_header() {
        let dir = std::env::temp_dir().join(format!("vlmhost-imaging-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let bomb = dir.join("bomb.png");
        fs::write(&bomb, png_header_only(14_000, 14_000)).unwrap();
        let err = load_image(&bomb).unwrap_err();
        assert!(matches!(err, ImageError::TooLarge { width: 14_000, height: 14_000, limit: DEFAULT_MAX_IMAGE_PIXELS, .. }), "{err}");
        assert!(err.to_string().contains("196000000 pixels"), "{err}");
        // Under a lower limit a small declared size is refused too; within it, the (missing)
        // image data is what fails.
        assert!(matches!(check_header(&bomb, 1_000), Err(ImageError::TooLarge { .. })));
        fs::write(&bomb, png_header_only(10, 10)).unwrap();
        assert!(check_header(&bomb, 1_000).is_ok());
        // A file that is no image is refused by its first bytes, not read whole.
        let fake = dir.join("fake.png");
        fs::write(&fake, vec![b'x'; 4096]).unwrap();
        let err = load_image(&fake).unwrap_err();
        assert!(err.to_string().contains("not those of an image file"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn png_exif_after_the_image_data_is_found() {
        use image::metadata::Orientation;
        fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
            let mut c = (data.len() as u32).to_be_bytes().to_vec();
            c.extend_from_slice(kind);
            c.extend_from_slice(data);
            c.extend_from_slice(&[0; 4]); // CRC, not checked here
            c
        }
        // Big-endian TIFF header, one IFD entry: Orientation (0x0112), SHORT, 1 value: 6.
        let tiff = [
            b'M', b'M', 0, 42, 0, 0, 0, 8, 0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0,
            0,
        ];
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend(chunk(b"IHDR", &[0; 13]));
        png.extend(chunk(b"IDAT", &[1, 2, 3]));
        png.extend(chunk(b"eXIf", &tiff));
        png.extend(chunk(b"IEND", &[]));
        assert_eq!(png_exif_orientation(&png), Orientation::Rotate90);
        png.truncate(png.len() - 12 - 12 - tiff.len());
        assert_eq!(png_exif_orientation(&png), Orientation::NoTransforms);
    }
}
