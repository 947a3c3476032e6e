//! Images for vlmhost plugins: loading as Pillow/transformers do, and bit-exact ports of the
//! Pillow 13.0.0 operations the reference preprocessors use.
//!
//! * [`load_image`]: decode, EXIF transpose, `convert("RGB")` (`PIL.ImageOps.exif_transpose`,
//!   transformers' `image_utils.load_image`).
//! * [`resize`]: `Image.resize` with [`ResampleFilter::Bilinear`] / [`ResampleFilter::Bicubic`]
//!   (Pillow `src/libImaging/Resample.c`, 8-bit fixed point, Pillow 13's pass order).
//! * [`pad`]: `ImageOps.pad(image, size, method=BICUBIC, color, centering=(0.5, 0.5))`
//!   (`ImageOps.contain`, then a centred paste).
//! * [`crop`]: `Image.crop(box)`; [`center_crop`]: transformers' `image_transforms.center_crop`;
//!   [`expand_to_square`]: original LLaVA's `expand2square`.
//!
//! Everything works on [`RgbImage`] (8-bit RGB, channels last); nothing here depends on libtorch.
//!
//! Parity: PNG inputs give bit-identical pixels. JPEG inputs do not: the `image` crate decodes with
//! zune-jpeg, whose IDCT and chroma upsampling differ from the libjpeg-turbo inside Pillow by up to
//! about 3-4 levels of 255.

mod load;
mod ops;
mod resample;

use std::fmt;
use std::path::PathBuf;

pub use load::{load_image, max_image_pixels, DEFAULT_MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS_VAR};
pub use ops::{center_crop, contain_size, crop, expand_to_square, pad};
pub use resample::{resize, ResampleFilter};

/// What can go wrong reading an image file.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image file not found: {path} (check the path; relative paths are resolved against the data file's folder)")]
    Missing { path: PathBuf },
    #[error("cannot read image {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot decode image {path}: {message} (PNG and JPEG are supported)")]
    Decode { path: PathBuf, message: String },
    #[error(
        "image {path} is {width} x {height} = {} pixels, more than the limit of {limit} \
         (a guard against decompression bombs, as Pillow's); downscale it, or raise the limit \
         (vlmhost: train.max_image_pixels)", area(.width, .height)
    )]
    TooLarge { path: PathBuf, width: u32, height: u32, limit: u64 },
}

fn area(width: &u32, height: &u32) -> u64 {
    u64::from(*width) * u64::from(*height)
}

impl ImageError {
    /// The image file the error is about.
    pub fn path(&self) -> &std::path::Path {
        match self {
            ImageError::Missing { path }
            | ImageError::Io { path, .. }
            | ImageError::Decode { path, .. }
            | ImageError::TooLarge { path, .. } => path,
        }
    }
}

/// An 8-bit RGB image, row-major, channels last (`[H, W, 3]`).
#[derive(Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl fmt::Debug for RgbImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RgbImage({}x{} WxH)", self.width, self.height)
    }
}

impl RgbImage {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Self {
        assert_eq!(data.len(), width * height * 3, "RgbImage buffer size");
        Self {
            width,
            height,
            data,
        }
    }

    /// A `width` x `height` image of one colour (`Image.new("RGB", size, fill)`).
    pub fn filled(width: usize, height: usize, fill: [u8; 3]) -> Self {
        let data = fill
            .iter()
            .copied()
            .cycle()
            .take(width * height * 3)
            .collect();
        Self::new(width, height, data)
    }

    /// Channel-first copy `[3, H, W]`.
    pub fn to_chw(&self) -> Vec<u8> {
        let n = self.width * self.height;
        let mut out = vec![0u8; 3 * n];
        for i in 0..n {
            for c in 0..3 {
                out[c * n + i] = self.data[i * 3 + c];
            }
        }
        out
    }

    /// Copies `src` into this image with its top-left corner at (`x`, `y`), clipped to this
    /// image (`Image.paste(src, (x, y))` for non-negative offsets).
    pub fn paste(&mut self, src: &RgbImage, x: usize, y: usize) {
        if x >= self.width || y >= self.height {
            return;
        }
        let w = src.width.min(self.width - x);
        let h = src.height.min(self.height - y);
        for row in 0..h {
            let s = row * src.width * 3;
            let d = ((y + row) * self.width + x) * 3;
            self.data[d..d + w * 3].copy_from_slice(&src.data[s..s + w * 3]);
        }
    }
}
