//! The image processor of Fuyu (`FuyuImageProcessorPil`,
//! `models/fuyu/image_processing_pil_fuyu.py`): `resize` (aspect-preserving
//! downscale, only when larger than the target, `int()` truncation), padding
//! bottom/right with `padding_value` on the **uint8** image (so the default 1.0
//! pads with grey level 1, not white), crop to whole patches (`_process_images`:
//! `min(padded, ceil(unpadded / patch) * patch)`), rescale, normalise,
//! `patchify_image` (patches row-major, each flattened as `(patch_h, patch_w, channel)`).

use serde::Deserialize;
use serde_json::Value;
use std::path::Path;
use vlmhost_imaging::{resize, ResampleFilter, RgbImage};
use vlmhost_plugin_sdk::files::{self, read_value};
use vlmhost_plugin_sdk::pixels::{Pixels, RawPixels};
use vlmhost_plugin_sdk::ProcessorError;

use vlmhost_plugin_sdk::error::Result;

/// `FuyuImageProcessorPil`'s settings (its class defaults unless the checkpoint says otherwise).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageConfig {
    pub do_resize: bool,
    /// Target (height, width): images larger are downscaled to fit, smaller ones padded.
    pub size: (usize, usize),
    /// Patch (height, width).
    pub patch: (usize, usize),
    pub resample: ResampleFilter,
    pub do_pad: bool,
    /// Applied to the uint8 image, so cast to uint8 (numpy's `np.pad` on a uint8 array).
    pub padding_value: u8,
    /// Rescale and normalise.
    pub pixels: Pixels,
}

impl Default for ImageConfig {
    fn default() -> Self {
        ImageConfig {
            do_resize: true,
            size: (1080, 1920),
            patch: (30, 30),
            resample: ResampleFilter::Bilinear,
            do_pad: true,
            padding_value: 1,
            pixels: Pixels::new([0.5; 3], [0.5; 3]),
        }
    }
}

/// The image processor's keys, as its config writes them.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawImageConfig {
    do_resize: Option<bool>,
    size: Option<HeightWidth>,
    patch_size: Option<HeightWidth>,
    do_pad: Option<bool>,
    padding_mode: Option<String>,
    padding_value: Option<f64>,
    #[serde(flatten)]
    pixels: RawPixels,
}

#[derive(Debug, Clone, Copy, Deserialize)]
struct HeightWidth {
    height: usize,
    width: usize,
}

/// What one image becomes.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessedImage {
    /// `[rows * cols, patch_h * patch_w * 3]`, row-major.
    pub patches: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
    /// The uint8 image the patches are cut from (resized, padded, cropped to whole patches).
    pub image: RgbImage,
}

impl ImageConfig {
    /// The image-processor settings of a model folder: `processor_config.json`'s
    /// `image_processor` (transformers 5), else `preprocessor_config.json` (older
    /// checkpoints, adept/fuyu-8b), else the class defaults.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        for (name, nested) in [("processor_config.json", true), ("preprocessor_config.json", false)] {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            let v = read_value(&path)?;
            let v = if nested { v.get("image_processor").cloned() } else { Some(v) };
            if let Some(v) = v {
                return Self::from_json(&v).map_err(|reason| ProcessorError::ImageConfigInvalid { path, reason });
            }
        }
        Ok(Self::default())
    }

    /// Read a (flat) image-processor config; errors name the key.
    pub fn from_json(v: &Value) -> std::result::Result<Self, String> {
        let d = Self::default();
        let raw: RawImageConfig = files::from_value(v).map_err(|(key, m)| format!("`{key}`: {m}"))?;
        if let Some(mode) = raw.padding_mode.as_deref().filter(|m| *m != "constant") {
            return Err(format!("`padding_mode` {mode:?} is not supported (only \"constant\")"));
        }
        let padding_value = raw.padding_value.unwrap_or(d.padding_value as f64);
        if !(0.0..256.0).contains(&padding_value) {
            return Err(format!("`padding_value` {padding_value} does not fit the uint8 image it pads"));
        }
        let hw = |x: Option<HeightWidth>, default: (usize, usize)| x.map_or(default, |x| (x.height, x.width));
        let cfg = ImageConfig {
            do_resize: raw.do_resize.unwrap_or(d.do_resize),
            size: hw(raw.size, d.size),
            patch: hw(raw.patch_size, d.patch),
            resample: raw.pixels.resample(d.resample)?,
            do_pad: raw.do_pad.unwrap_or(d.do_pad),
            padding_value: padding_value as u8,
            pixels: raw.pixels.resolve(&d.pixels)?,
        };
        cfg.check_size().map_err(|e| format!("`size`: {e}"))?;
        Ok(cfg)
    }

    /// The target size must be whole patches: otherwise transformers fails on
    /// images whose padded size is not (`get_num_patches` raises).
    pub fn check_size(&self) -> std::result::Result<(), String> {
        let ((h, w), (ph, pw)) = (self.size, self.patch);
        if ph == 0 || pw == 0 {
            return Err("the patch size is 0".into());
        }
        if h == 0 || w == 0 || h % ph != 0 || w % pw != 0 {
            return Err(format!("target {h}x{w} (height x width) is not a positive multiple of the {ph}x{pw} patch"));
        }
        Ok(())
    }

    /// The size `FuyuImageProcessorPil.resize` gives an image of `height` x `width`:
    /// unchanged unless larger than the target, else scaled by
    /// `min(target_h / h, target_w / w)` with each side truncated by `int()`.
    pub fn resized_size(&self, height: usize, width: usize) -> (usize, usize) {
        let (th, tw) = self.size;
        if !self.do_resize || (width <= tw && height <= th) {
            return (height, width);
        }
        let scale = (th as f64 / height as f64).min(tw as f64 / width as f64);
        ((height as f64 * scale) as usize, (width as f64 * scale) as usize)
    }

    /// Resize, pad bottom/right with `padding_value`, crop to whole patches
    /// (`min(padded, ceil(unpadded / patch) * patch)` per side).
    pub fn resize_pad_crop(&self, image: &RgbImage, path: &Path) -> Result<RgbImage> {
        let err = |message: String| ProcessorError::sample(format!("image {}: {message}", path.display()));
        let (th, tw) = self.size;
        let (ph, pw) = self.patch;
        let (h, w) = self.resized_size(image.height, image.width);
        if h == 0 || w == 0 {
            return Err(err(format!(
                "{}x{} (width x height) shrinks to {w}x{h} to fit {tw}x{th}: too thin to make a patch",
                image.width, image.height
            )));
        }
        let resized = if (h, w) == (image.height, image.width) { image.clone() } else { resize(image, w, h, self.resample) };
        let (padded_h, padded_w) = if self.do_pad { (th.max(h), tw.max(w)) } else { (h, w) };
        if self.do_pad && (h > th || w > tw) {
            return Err(err(format!("{w}x{h} (width x height) is larger than the target {tw}x{th} and do_resize is false")));
        }
        let crop_h = padded_h.min(h.div_ceil(ph) * ph);
        let crop_w = padded_w.min(w.div_ceil(pw) * pw);
        if crop_h % ph != 0 || crop_w % pw != 0 {
            return Err(err(format!(
                "{w}x{h} (width x height) is not whole {pw}x{ph} patches and padding is off (do_pad: false)"
            )));
        }
        let mut out = RgbImage::filled(crop_w, crop_h, [self.padding_value; 3]);
        out.paste(&resized, 0, 0);
        Ok(out)
    }

    /// The whole pipeline for one decoded image.
    pub fn process(&self, image: &RgbImage, path: &Path) -> Result<ProcessedImage> {
        let img = self.resize_pad_crop(image, path)?;
        let (ph, pw) = self.patch;
        let (rows, cols) = (img.height / ph, img.width / pw);
        let mut patches = Vec::with_capacity(rows * cols * ph * pw * 3);
        for r in 0..rows {
            for c in 0..cols {
                for y in 0..ph {
                    let start = ((r * ph + y) * img.width + c * pw) * 3;
                    for (i, &u) in img.data[start..start + pw * 3].iter().enumerate() {
                        patches.push(self.pixels.value(u, i % 3));
                    }
                }
            }
        }
        Ok(ProcessedImage { patches, rows, cols, image: img })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(h: usize, w: usize) -> ImageConfig {
        ImageConfig { size: (h, w), ..Default::default() }
    }

    #[test]
    fn resize_only_when_larger_and_truncates() {
        let c = cfg(60, 90);
        assert_eq!(c.resized_size(35, 47), (35, 47));
        assert_eq!(c.resized_size(60, 90), (60, 90));
        assert_eq!(c.resized_size(130, 200), (58, 90)); // 130 * 0.45 = 58.5
        assert_eq!(c.resized_size(150, 40), (60, 16));
        assert_eq!(c.resized_size(70, 36), (60, 30)); // 36 * 60/70 = 30.86
        assert_eq!(cfg(1080, 1920).resized_size(2000, 3000), (1080, 1620));
    }

    #[test]
    fn pad_bottom_right_with_grey_level_one_and_crop_to_patches() {
        let c = cfg(60, 90);
        let img = RgbImage::filled(47, 35, [200, 100, 50]);
        let out = c.resize_pad_crop(&img, Path::new("x.png")).unwrap();
        assert_eq!((out.width, out.height), (60, 60));
        let px = |x: usize, y: usize| &out.data[(y * 60 + x) * 3..(y * 60 + x) * 3 + 3];
        assert_eq!(px(46, 34), [200, 100, 50]);
        assert_eq!(px(47, 0), [1, 1, 1]);
        assert_eq!(px(0, 35), [1, 1, 1]);
        let p = c.process(&img, Path::new("x.png")).unwrap();
        assert_eq!((p.rows, p.cols, p.patches.len()), (2, 2, 4 * 2700));
        // Patch order: (row, col) row-major; inside a patch (y, x, channel).
        assert_eq!(p.patches[0], (((200.0f64 / 255.0) as f32) - 0.5) / 0.5);
        assert_eq!(p.patches[1], (((100.0f64 / 255.0) as f32) - 0.5) / 0.5);
        let pad = (((1.0f64 / 255.0) as f32) - 0.5) / 0.5;
        // Patch 1 (row 0, col 1): x = 30..60; x >= 47 is padding.
        assert_eq!(p.patches[2700 + 17 * 3], pad);
        assert_eq!(p.patches[2700 + 16 * 3], p.patches[0]);
    }

    #[test]
    fn sizes_must_be_whole_patches() {
        let e = ImageConfig::from_json(&serde_json::json!({"size": {"height": 100, "width": 90}})).unwrap_err();
        assert!(e.contains("not a positive multiple of the 30x30 patch"), "{e}");
        let e = ImageConfig::from_json(&serde_json::json!({"padding_mode": "reflect"})).unwrap_err();
        assert!(e.contains("padding_mode"), "{e}");
        let c = ImageConfig::from_json(&serde_json::json!({"size": {"height": 60, "width": 90}, "resample": 2})).unwrap();
        assert_eq!((c.size, c.padding_value, c.pixels.image_mean), ((60, 90), 1, [0.5; 3]));
    }

    #[test]
    fn a_thin_image_is_explained() {
        let c = cfg(60, 90);
        let e = c.resize_pad_crop(&RgbImage::filled(1, 1000, [0, 0, 0]), Path::new("thin.png")).unwrap_err();
        assert!(e.to_string().contains("thin.png") && e.to_string().contains("too thin"), "{e}");
    }
}
