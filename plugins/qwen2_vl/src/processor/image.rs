//! The image processor of Qwen2-VL (`Qwen2VLImageProcessorPil`,
//! `models/qwen2_vl/image_processing_pil_qwen2_vl.py`): its settings (the
//! checkpoint's files, then the user's pixel budget), `smart_resize` (factor
//! patch * merge, `min_pixels` / `max_pixels`, Python's `round`, i.e. half to
//! even), bicubic resize, rescale, normalise, and `patchify` (frame duplicated
//! to `temporal_patch_size`; rows ordered `(grid_h/m, grid_w/m, m, m)` with
//! values `(C, T, P, P)`), `image_grid_thw = (1, grid_h, grid_w)`.

use serde::Deserialize;
use serde_json::Value;
use std::path::Path;
use vlmhost_imaging::{resize, ResampleFilter, RgbImage};
use vlmhost_plugin_sdk::files::{self, read_value};
use vlmhost_plugin_sdk::pixels::{Pixels, RawPixels};
use vlmhost_plugin_sdk::ProcessorError;

use vlmhost_plugin_sdk::error::Result;

/// The default `max_pixels` of this plugin: 1280 * 28 * 28 = 1,003,520 pixels, at most
/// 1280 image tokens per image. It is transformers' class default too; the hub's
/// `preprocessor_config.json` of Qwen2-VL says 12,845,056 (16384 tokens per image), which
/// exhausts GPU memory on ordinary photos when training. A checkpoint's larger value is
/// capped to this one unless the user asks for it (`--processor max_pixels=N`).
pub const DEFAULT_MAX_PIXELS: usize = 1280 * 28 * 28;

/// transformers' `smart_resize`: (height, width) divisible by `factor`, with
/// `min_pixels <= h * w <= max_pixels` where possible, the aspect ratio kept as
/// closely as possible. Python's arithmetic is reproduced: float64 divisions,
/// `round` half to even (70 / 28 = 2.5 -> 2), `floor` / `ceil`.
pub fn smart_resize(height: usize, width: usize, factor: usize, min_pixels: usize, max_pixels: usize) -> Result<(usize, usize), String> {
    if height == 0 || width == 0 {
        return Err("the image is empty".into());
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > 200.0 {
        // Python's repr of a float: `201.0`, not `201`.
        let shown = if ratio.fract() == 0.0 { format!("{ratio:.1}") } else { format!("{ratio}") };
        return Err(format!("absolute aspect ratio must be smaller than 200, got {shown}"));
    }
    let mut h_bar = (h / f).round_ties_even() as usize * factor;
    let mut w_bar = (w / f).round_ties_even() as usize * factor;
    if h_bar * w_bar > max_pixels {
        let beta = ((height * width) as f64 / max_pixels as f64).sqrt();
        h_bar = factor.max((h / beta / f).floor() as usize * factor);
        w_bar = factor.max((w / beta / f).floor() as usize * factor);
    } else if h_bar * w_bar < min_pixels {
        let beta = (min_pixels as f64 / (height * width) as f64).sqrt();
        h_bar = (h * beta / f).ceil() as usize * factor;
        w_bar = (w * beta / f).ceil() as usize * factor;
    }
    Ok((h_bar, w_bar))
}

/// The user's processor options (`--processor min_pixels=N max_pixels=N`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PixelOptions {
    pub min_pixels: Option<usize>,
    pub max_pixels: Option<usize>,
}

/// `Qwen2VLImageProcessorPil`'s settings, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageConfig {
    pub min_pixels: usize,
    pub max_pixels: usize,
    /// The checkpoint's `max_pixels` when [`DEFAULT_MAX_PIXELS`] capped it.
    pub capped_max_pixels: Option<usize>,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    pub do_resize: bool,
    pub resample: ResampleFilter,
    /// Rescale and normalise.
    pub pixels: Pixels,
}

/// The image processor's keys, as `preprocessor_config.json` writes them.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawImageConfig {
    min_pixels: Option<usize>,
    max_pixels: Option<usize>,
    size: RawSize,
    patch_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    merge_size: Option<usize>,
    do_resize: Option<bool>,
    #[serde(flatten)]
    pixels: RawPixels,
}

/// transformers 5's `size`: the pixel budget as `shortest_edge` / `longest_edge`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawSize {
    shortest_edge: Option<usize>,
    longest_edge: Option<usize>,
}

/// One processed image.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    /// `[patches, C * T * P * P]` row-major.
    pub patches: Vec<f32>,
    /// (t, h, w) in patches.
    pub grid: [i64; 3],
}

impl ImageConfig {
    /// The settings of a model folder: `processor_config.json`'s `image_processor` object
    /// (transformers 5) or `preprocessor_config.json` (hub form: `min_pixels` / `max_pixels`;
    /// transformers 5 form: `size.shortest_edge` / `size.longest_edge`), then the user's options.
    pub fn from_dir(dir: &Path, options: PixelOptions) -> Result<Self> {
        let processor = dir.join("processor_config.json");
        if processor.is_file() {
            if let Some(obj) = read_value(&processor)?.get("image_processor").filter(|v| v.is_object()) {
                return Self::from_value(obj, &processor, options);
            }
        }
        let path = dir.join("preprocessor_config.json");
        if !path.is_file() {
            return Err(ProcessorError::ImageConfigMissing {
                dir: dir.to_path_buf(),
                expected: "preprocessor_config.json, or processor_config.json with an `image_processor` object",
            });
        }
        Self::from_value(&read_value(&path)?, &path, options)
    }

    pub fn from_value(v: &Value, path: &Path, options: PixelOptions) -> Result<Self> {
        let invalid = |reason: String| ProcessorError::ImageConfigInvalid { path: path.to_path_buf(), reason };
        let raw: RawImageConfig = files::from_value(v).map_err(|(key, m)| invalid(format!("`{key}`: {m}")))?;
        // transformers: `min_pixels` / `max_pixels` override `size` (Qwen2VLImageProcessorPil.__init__).
        let file_min = raw.min_pixels.or(raw.size.shortest_edge).unwrap_or(56 * 56);
        let file_max = raw.max_pixels.or(raw.size.longest_edge).unwrap_or(DEFAULT_MAX_PIXELS);
        let (min_pixels, max_pixels, capped) = pixel_budget(file_min, file_max, options)?;
        let cfg = ImageConfig {
            min_pixels,
            max_pixels,
            capped_max_pixels: capped,
            patch_size: raw.patch_size.unwrap_or(14),
            temporal_patch_size: raw.temporal_patch_size.unwrap_or(2),
            merge_size: raw.merge_size.unwrap_or(2),
            do_resize: raw.do_resize.unwrap_or(true),
            resample: raw.pixels.resample(ResampleFilter::Bicubic).map_err(invalid)?,
            pixels: raw.pixels.resolve(&Pixels::CLIP).map_err(invalid)?,
        };
        for (key, n) in [("patch_size", cfg.patch_size), ("temporal_patch_size", cfg.temporal_patch_size), ("merge_size", cfg.merge_size)] {
            if n == 0 {
                return Err(invalid(format!("`{key}`: must be positive")));
            }
        }
        Ok(cfg)
    }

    /// Resize factor: patch size times merge size (28).
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Values per patch row: 3 * T * P * P.
    pub fn patch_dim(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// The processed (height, width) of an image of `height` x `width`.
    pub fn target_size(&self, height: usize, width: usize) -> Result<(usize, usize), String> {
        smart_resize(height, width, self.factor(), self.min_pixels, self.max_pixels)
    }

    /// The uint8 pipeline: the resized image.
    pub fn resized(&self, image: &RgbImage, path: &Path) -> Result<RgbImage> {
        let refuse = |reason: String| {
            ProcessorError::sample(format!("image {} ({}x{}): {reason}", path.display(), image.width, image.height))
        };
        let (h, w) = self.target_size(image.height, image.width).map_err(|reason| refuse(format!("{reason}; crop or pad the image")))?;
        if !self.do_resize {
            if (image.height, image.width) != (h, w) {
                return Err(refuse(format!("do_resize is false but the sides are not multiples of {}", self.factor())));
            }
            return Ok(image.clone());
        }
        Ok(resize(image, w, h, self.resample))
    }

    /// Rescale, normalise and patchify a resized image.
    pub fn patchify(&self, image: &RgbImage) -> ProcessedImage {
        let (h, w) = (image.height, image.width);
        let (p, m, tp) = (self.patch_size, self.merge_size, self.temporal_patch_size);
        // [3, H, W] float32, as rescale (float64 product, cast) then normalize (float32).
        let chw = self.pixels.to_chw(image);
        let (gh, gw) = (h / p, w / p);
        let dim = self.patch_dim();
        let mut patches = vec![0f32; gh * gw * dim];
        let mut row = 0;
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                        let out = &mut patches[row * dim..(row + 1) * dim];
                        let mut k = 0;
                        for c in 0..3 {
                            for _t in 0..tp {
                                for py in 0..p {
                                    let src = c * h * w + (y0 + py) * w + x0;
                                    out[k..k + p].copy_from_slice(&chw[src..src + p]);
                                    k += p;
                                }
                            }
                        }
                        row += 1;
                    }
                }
            }
        }
        ProcessedImage { patches, grid: [1, gh as i64, gw as i64] }
    }

    /// The whole pipeline for one decoded image.
    pub fn preprocess(&self, image: &RgbImage, path: &Path) -> Result<ProcessedImage> {
        Ok(self.patchify(&self.resized(image, path)?))
    }

    /// Image tokens of a processed grid: t * h * w / merge^2.
    pub fn num_tokens(&self, grid: [i64; 3]) -> usize {
        (grid[0] * grid[1] * grid[2]) as usize / (self.merge_size * self.merge_size)
    }
}

/// The pixel budget: the file's, capped at [`DEFAULT_MAX_PIXELS`] unless the user's options set it.
fn pixel_budget(file_min: usize, file_max: usize, options: PixelOptions) -> Result<(usize, usize, Option<usize>)> {
    let (max_pixels, capped) = match options.max_pixels {
        Some(m) => (m, None),
        None if file_max > DEFAULT_MAX_PIXELS => (DEFAULT_MAX_PIXELS, Some(file_max)),
        None => (file_max, None),
    };
    let min_pixels = options.min_pixels.unwrap_or(file_min);
    let option_err = |key: &str, reason: String| ProcessorError::Option { key: key.into(), reason };
    if min_pixels == 0 {
        return Err(option_err("min_pixels", "must be at least 1".into()));
    }
    if min_pixels > max_pixels {
        let key = if options.min_pixels.is_some() { "min_pixels" } else { "max_pixels" };
        return Err(option_err(key, format!("min_pixels {min_pixels} exceeds max_pixels {max_pixels}; choose min_pixels <= max_pixels")));
    }
    Ok((min_pixels, max_pixels, capped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_follows_python() {
        // Values computed by transformers' smart_resize (reference/smart_resize.json).
        assert_eq!(smart_resize(70, 98, 28, 3136, 12544), Ok((56, 112))); // round half to even
        assert_eq!(smart_resize(57, 23, 28, 3136, 12544), Ok((112, 56)));
        assert_eq!(smart_resize(150, 200, 28, 3136, 12544), Ok((84, 112)));
        assert_eq!(smart_resize(1080, 1920, 28, 3136, 12845056), Ok((1092, 1932)));
        assert_eq!(smart_resize(1080, 1920, 28, 3136, 1003520), Ok((728, 1316)));
        assert_eq!(smart_resize(2000, 11, 28, 3136, 1003520), Ok((756, 28)));
        assert!(smart_resize(1, 201, 28, 3136, 1003520).unwrap_err().ends_with("smaller than 200, got 201.0"));
    }

    #[test]
    fn the_hub_max_pixels_is_capped_unless_asked_for() {
        let hub: Value = serde_json::from_str(include_str!("../../tests/qwen2-vl-2b.preprocessor_config.json")).unwrap();
        let p = Path::new("preprocessor_config.json");
        let c = ImageConfig::from_value(&hub, p, PixelOptions::default()).unwrap();
        assert_eq!((c.min_pixels, c.max_pixels, c.capped_max_pixels), (3136, DEFAULT_MAX_PIXELS, Some(12845056)));
        assert_eq!(c.patch_dim(), 1176);
        let c = ImageConfig::from_value(&hub, p, PixelOptions { max_pixels: Some(12845056), min_pixels: Some(6272) }).unwrap();
        assert_eq!((c.min_pixels, c.max_pixels, c.capped_max_pixels), (6272, 12845056, None));
        let e = ImageConfig::from_value(&hub, p, PixelOptions { min_pixels: Some(2_000_000), max_pixels: None }).unwrap_err();
        assert!(e.to_string().contains("processor option min_pixels: min_pixels 2000000 exceeds max_pixels 1003520"), "{e}");
        let bad: Value = serde_json::json!({"image_mean": [0.5, 0.5]});
        let e = ImageConfig::from_value(&bad, p, PixelOptions::default()).unwrap_err();
        assert!(e.to_string().contains("preprocessor_config.json: `image_mean` has 2 values, expected 3"), "{e}");
    }

    #[test]
    fn patch_rows_follow_the_merge_order() {
        let cfg = ImageConfig::from_value(&serde_json::json!({"do_normalize": false, "do_rescale": false}), Path::new("x"), PixelOptions::default()).unwrap();
        // 56x56 image whose red channel holds the column, green the row.
        let mut data = Vec::new();
        for y in 0..56u8 {
            for x in 0..56u8 {
                data.extend_from_slice(&[x, y, 0]);
            }
        }
        let p = cfg.patchify(&RgbImage::new(56, 56, data));
        assert_eq!(p.grid, [1, 4, 4]);
        let dim = cfg.patch_dim();
        // Row 2 is block (0, 0), patch (1, 0): rows 14..28, columns 0..14.
        let row = &p.patches[2 * dim..3 * dim];
        assert_eq!(row[0], 0.0); // red (column) at (0, 0) of the patch
        assert_eq!(row[13], 13.0);
        assert_eq!(row[196], 0.0); // second temporal copy of red
        assert_eq!(row[2 * 196], 14.0); // green (row) starts at 14
        // Row 4 is block (0, 1), patch (0, 0): columns 28..42.
        assert_eq!(p.patches[4 * dim], 28.0);
    }
}
