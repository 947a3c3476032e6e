//! Loading an image file as transformers' `image_utils.load_image` (Pillow) does.

use std::fmt;
use std::fs;
use std::path::Path;

use crate::{ImageError, RgbImage};

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
