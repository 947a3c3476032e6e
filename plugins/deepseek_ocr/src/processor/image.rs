//! DeepSeek-OCR's images: the official resolution modes ([`ImageOptions`]),
//! the views infer builds of an image (the global view, and in crop mode the
//! tiles of [`super::tiles`]), their normalisation, and how many image tokens
//! an image takes.
//!
//! * crop mode (Gundam): an image with both sides <= the tile size is not tiled (grid (1, 1));
//!   otherwise the image is resized (bicubic) to the grid's pixel size and cut into tiles left
//!   to right, top to bottom. The global view is
//!   `ImageOps.pad(image, (base_size, base_size), color=(127, 127, 127))`.
//! * non-crop modes (Tiny/Small/Base/Large): when `image_size <= 640` the image is first resized
//!   (bicubic) to `image_size` x `image_size` (infer's "directly resize"), then padded to
//!   `image_size` (a no-op after that resize); Large (1280) is only padded.
//! * every view: `x / 255` (float32), `(x - 0.5) / 0.5`, rounded to bfloat16 (nearest even) as
//!   infer's `.to(torch.bfloat16)`; kept as f32 (exact).

use super::tiles::{cut_tiles, tile_grid};
use vlmhost_imaging::{pad, resize, ResampleFilter, RgbImage};
use vlmhost_plugin_sdk::ProcessorError;

use vlmhost_plugin_sdk::error::Result;

/// Colour the global view is padded with: `int(0.5 * 255)` per channel (infer's mean).
pub const PAD_FILL: [u8; 3] = [127, 127, 127];
/// infer's `patch_size` and `downsample_ratio`: one image token per 64 x 64 pixels.
const PATCH_SIZE: usize = 16;
const DOWNSAMPLE_RATIO: usize = 4;
/// infer resizes the image to the view size first ("directly resize") up to this size.
const DIRECT_RESIZE_MAX: usize = 640;

/// View sizes of infer's `base_size` / `image_size` / `crop_mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageOptions {
    /// Global view size in crop mode.
    pub base_size: usize,
    /// Tile size in crop mode; the (only) view size otherwise.
    pub image_size: usize,
    pub crop_mode: bool,
}

impl ImageOptions {
    /// Gundam: 1024 global view + 640 tiles. The default.
    pub const GUNDAM: ImageOptions = ImageOptions {
        base_size: 1024,
        image_size: 640,
        crop_mode: true,
    };

    /// tiny (512/512, no crop), small (640/640, no crop), base (1024/1024, no crop), large
    /// (1280/1280, no crop), gundam (1024 global + 640 tiles, crop) — the official modes
    /// (DeepSeek-OCR's README and run script); names are case-insensitive.
    pub fn mode(name: &str) -> Result<ImageOptions, ProcessorError> {
        let plain = |size| ImageOptions {
            base_size: size,
            image_size: size,
            crop_mode: false,
        };
        match name.to_ascii_lowercase().as_str() {
            "tiny" => Ok(plain(512)),
            "small" => Ok(plain(640)),
            "base" => Ok(plain(1024)),
            "large" => Ok(plain(1280)),
            "gundam" => Ok(Self::GUNDAM),
            _ => Err(ProcessorError::Option {
                key: "mode".into(),
                reason: format!(
                    "unknown DeepSeek-OCR image mode {name:?}: use one of tiny (512), small (640), base (1024), \
                     large (1280) or gundam (1024 global view + 640 tiles)"
                ),
            }),
        }
    }

    pub(crate) fn validate(self) -> Result<Self> {
        if self.base_size < PATCH_SIZE || self.image_size < PATCH_SIZE {
            return Err(ProcessorError::Option {
                key: "base_size/image_size".into(),
                reason: format!(
                    "invalid image options (base_size {}, image_size {}): both sizes must be at least {PATCH_SIZE} pixels",
                    self.base_size, self.image_size
                ),
            });
        }
        Ok(self)
    }
}

impl Default for ImageOptions {
    fn default() -> Self {
        Self::GUNDAM
    }
}

/// The 8-bit views of one image, before normalisation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageViews {
    /// The global view (`base_size` in crop mode, `image_size` otherwise), square.
    pub global: RgbImage,
    /// The tiles, left to right, top to bottom; empty when the image is not tiled.
    pub tiles: Vec<RgbImage>,
    /// (tiles across, tiles down); (1, 1) when not tiled.
    pub grid: (usize, usize),
}

/// Views of `image` exactly as infer builds them (see the module docs).
pub fn image_views(image: &RgbImage, options: ImageOptions) -> ImageViews {
    if options.crop_mode {
        let tile = options.image_size;
        let (tiles, grid) = match tile_grid(image.width, image.height, tile) {
            Some(grid) => (cut_tiles(image, grid, tile), grid),
            None => (Vec::new(), (1, 1)),
        };
        let global = pad(image, options.base_size, options.base_size, PAD_FILL);
        ImageViews {
            global,
            tiles,
            grid,
        }
    } else {
        let size = options.image_size;
        let global = if size <= DIRECT_RESIZE_MAX {
            let resized = resize(image, size, size, ResampleFilter::Bicubic);
            pad(&resized, size, size, PAD_FILL)
        } else {
            pad(image, size, size, PAD_FILL)
        };
        ImageViews {
            global,
            tiles: Vec::new(),
            grid: (1, 1),
        }
    }
}

/// Image tokens per side of a view: `ceil((size // 16) / 4)`.
fn queries(size: usize) -> usize {
    (size / PATCH_SIZE).div_ceil(DOWNSAMPLE_RATIO)
}

/// Number of image tokens infer writes for an image with tile grid `grid` (`None`: not tiled):
/// crop mode `(q_base + 1) * q_base + 1` plus `(q * cols + 1) * (q * rows)` for tiles;
/// otherwise `(q + 1) * q + 1` with q from `image_size`.
pub fn num_image_tokens(options: ImageOptions, grid: Option<(usize, usize)>) -> usize {
    if options.crop_mode {
        let qb = queries(options.base_size);
        let mut n = (qb + 1) * qb + 1;
        if let Some((cols, rows)) = grid {
            let q = queries(options.image_size);
            n += (q * cols + 1) * (q * rows);
        }
        n
    } else {
        let q = queries(options.image_size);
        (q + 1) * q + 1
    }
}

/// float32 to bfloat16 precision, round to nearest even (c10::BFloat16 `round_to_nearest_even`),
/// returned as float32. Inputs here are finite.
pub fn round_bf16(x: f32) -> f32 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    f32::from_bits(rounded & 0xffff_0000)
}

/// The 256 normalised values: torchvision ToTensor (`float32(u) / 255`, a true float32
/// division as torch's CPU `div` does), Normalize(0.5, 0.5) (`(x - 0.5) / 0.5`), then bf16.
fn normalised_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    for (u, v) in t.iter_mut().enumerate() {
        let x = u as f32 / 255.0f32;
        *v = round_bf16((x - 0.5f32) / 0.5f32);
    }
    t
}

/// A view as infer's `image_transform(view).to(torch.bfloat16)`: CHW `[3, H, W]`, values in
/// bf16 precision stored as f32.
pub fn normalize(image: &RgbImage) -> Vec<f32> {
    let table = normalised_table();
    image
        .to_chw()
        .into_iter()
        .map(|u| table[u as usize])
        .collect()
}

/// One image, ready for the model.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessedImage {
    /// The global view, CHW, normalised ((x/255-0.5)/0.5) then rounded to bfloat16 precision
    /// (round-to-nearest-even) exactly as the original `.to(torch.bfloat16)`, stored as f32.
    pub global: Vec<f32>,
    pub global_size: usize,
    /// Tiles [n_tiles, 3, tile, tile], same normalisation; empty when the image is not tiled.
    pub tiles: Vec<f32>,
    pub tile_size: usize,
    pub n_tiles: usize,
    /// (tiles across, tiles down); (1, 1) when not tiled — as images_spatial_crop.
    pub grid: (usize, usize),
    /// Number of image tokens this image takes in the text.
    pub num_tokens: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_counts_match_infer() {
        let fixture = ImageOptions {
            base_size: 256,
            image_size: 128,
            crop_mode: true,
        };
        assert_eq!(num_image_tokens(fixture, Some((3, 2))), 49);
        assert_eq!(num_image_tokens(fixture, None), 21);
        // The official modes: 64 / 100 / 256 / 400 tokens + a newline per row + the separator.
        let plain = |name| num_image_tokens(ImageOptions::mode(name).unwrap(), None);
        assert_eq!(plain("tiny"), 9 * 8 + 1);
        assert_eq!(plain("small"), 11 * 10 + 1);
        assert_eq!(plain("base"), 17 * 16 + 1);
        assert_eq!(plain("large"), 21 * 20 + 1);
        assert_eq!(
            num_image_tokens(ImageOptions::GUNDAM, Some((2, 3))),
            17 * 16 + 1 + 21 * 30
        );
        assert!(ImageOptions::mode("huge").unwrap_err().to_string().contains("unknown DeepSeek-OCR image mode"));
        assert_eq!(
            ImageOptions::mode("Gundam").unwrap(),
            ImageOptions::default()
        );
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(round_bf16(1.0), 1.0);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(round_bf16(-0.2), -205.0 / 1024.0); // torch.tensor(-0.2).to(torch.bfloat16)
        let t = normalised_table();
        assert_eq!((t[0], t[255]), (-1.0, 1.0));
    }
}
