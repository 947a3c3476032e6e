//! The CLIP image processor of LLaVA-1.5 (`CLIPImageProcessorPil`): its settings,
//! read from `processor_config.json` (transformers 5) or `preprocessor_config.json`
//! (older checkpoints), and the pipeline: optional pad-to-square, resize, centre
//! crop, rescale, normalise, in that order (`image_processing_backends.py`
//! `PilBackend._preprocess`; `image_transforms.py` for each step).

use serde::Deserialize;
use serde_json::Value;
use std::path::Path;
use vlmhost_imaging::{center_crop, expand_to_square, resize, ResampleFilter, RgbImage};
use vlmhost_plugin_sdk::files::read_json;
use vlmhost_plugin_sdk::pixels::{Pixels, RawPixels};
use vlmhost_plugin_sdk::ProcessorError;

/// `size` of an image processor config: `{"shortest_edge": N}`, `{"height", "width"}`, or a bare
/// integer (old CLIP configs), which transformers' `get_size_dict(default_to_square=False)`
/// reads as a shortest edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeTarget {
    ShortestEdge(usize),
    Exact { height: usize, width: usize },
}

/// The image-processor settings of a LLaVA checkpoint (CLIP image processor).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessorConfig {
    pub do_resize: bool,
    pub size: ResizeTarget,
    pub resample: ResampleFilter,
    pub do_center_crop: bool,
    /// (height, width)
    pub crop_size: (usize, usize),
    /// Rescale and normalise.
    pub pixels: Pixels,
    /// Parsed for completeness: images loaded from a path are always converted to RGB
    /// (`load_image` does `convert("RGB")`), so this changes nothing here.
    pub do_convert_rgb: bool,
    /// Original LLaVA repo's `image_aspect_ratio == "pad"`: expand the image to a square filled
    /// with the mean colour (`int(255 * mean)`) before resizing. Not an HF key; off by default.
    pub pad_to_square: bool,
}

/// The JSON form, as transformers writes it (all keys optional, CLIP defaults).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawImageProcessorConfig {
    do_resize: Option<bool>,
    size: Option<Value>,
    do_center_crop: Option<bool>,
    crop_size: Option<Value>,
    do_convert_rgb: Option<bool>,
    pad_to_square: Option<bool>,
    #[serde(flatten)]
    pixels: RawPixels,
}

/// `processor_config.json` (transformers 5 nests the image processor in it).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawProcessorConfig {
    pub image_processor: Option<RawImageProcessorConfig>,
    pub image_token: Option<String>,
    pub patch_size: Option<usize>,
    pub vision_feature_select_strategy: Option<String>,
    pub num_additional_image_tokens: Option<usize>,
}

impl Default for ImageProcessorConfig {
    /// `CLIPImageProcessorPil`'s class defaults (size 224).
    fn default() -> Self {
        Self {
            do_resize: true,
            size: ResizeTarget::ShortestEdge(224),
            resample: ResampleFilter::Bicubic,
            do_center_crop: true,
            crop_size: (224, 224),
            pixels: Pixels::CLIP,
            do_convert_rgb: true,
            pad_to_square: false,
        }
    }
}

impl ImageProcessorConfig {
    /// Reads the image-processor settings of a model folder: `processor_config.json` with an
    /// `image_processor` key (transformers 5), else `preprocessor_config.json` at top level
    /// (older checkpoints such as llava-hf/llava-1.5-7b-hf).
    pub fn from_dir(dir: &Path) -> Result<Self, ProcessorError> {
        let processor = dir.join("processor_config.json");
        if processor.is_file() {
            let raw: RawProcessorConfig = read_json(&processor)?;
            if let Some(image) = raw.image_processor {
                return Self::from_raw(image, &processor);
            }
        }
        let preprocessor = dir.join("preprocessor_config.json");
        if preprocessor.is_file() {
            return Self::from_file(&preprocessor);
        }
        Err(ProcessorError::ImageConfigMissing {
            dir: dir.to_path_buf(),
            expected: "processor_config.json with an `image_processor` key (transformers 5) or \
                       preprocessor_config.json (older checkpoints)",
        })
    }

    /// Reads a flat image-processor config (`preprocessor_config.json`).
    pub fn from_file(path: &Path) -> Result<Self, ProcessorError> {
        Self::from_raw(read_json(path)?, path)
    }

    fn from_raw(raw: RawImageProcessorConfig, path: &Path) -> Result<Self, ProcessorError> {
        let invalid = |reason: String| ProcessorError::ImageConfigInvalid { path: path.to_path_buf(), reason };
        let d = Self::default();
        let size = match raw.size {
            None => d.size,
            Some(v) => parse_size(&v)
                .ok_or_else(|| invalid(format!("`size` {v} is not {{\"shortest_edge\": N}}, {{\"height\", \"width\"}} or N")))?,
        };
        let crop_size = match raw.crop_size {
            None => d.crop_size,
            Some(v) => parse_crop(&v).ok_or_else(|| invalid(format!("`crop_size` {v} is not {{\"height\", \"width\"}} or N")))?,
        };
        Ok(Self {
            do_resize: raw.do_resize.unwrap_or(d.do_resize),
            size,
            resample: raw.pixels.resample(d.resample).map_err(invalid)?,
            do_center_crop: raw.do_center_crop.unwrap_or(d.do_center_crop),
            crop_size,
            pixels: raw.pixels.resolve(&d.pixels).map_err(invalid)?,
            do_convert_rgb: raw.do_convert_rgb.unwrap_or(d.do_convert_rgb),
            pad_to_square: raw.pad_to_square.unwrap_or(d.pad_to_square),
        })
    }

    /// Output (height, width) of the resize step for an input of `height` x `width`
    /// (`image_transforms.get_resize_output_image_size` with `default_to_square=False`): the
    /// short edge becomes N and the long edge `int(N * long / short)`, truncated, not rounded.
    pub fn resize_output_size(&self, height: usize, width: usize) -> (usize, usize) {
        match self.size {
            ResizeTarget::Exact { height, width } => (height, width),
            ResizeTarget::ShortestEdge(n) => {
                let (short, long) = if width <= height { (width, height) } else { (height, width) };
                // Python: int(n * long / short); the product is an exact integer and `/` is a
                // correctly rounded float division, as here.
                let new_long = ((n * long) as f64 / short as f64) as usize;
                if width <= height {
                    (new_long, n)
                } else {
                    (n, new_long)
                }
            }
        }
    }

    /// The uint8 pipeline: optional pad-to-square, resize, centre crop. Returns the image that
    /// rescale/normalise turn into pixel values.
    pub fn resize_and_crop(&self, image: &RgbImage) -> RgbImage {
        let mut img = if self.pad_to_square {
            let fill = self.pixels.image_mean.map(|m| (m * 255.0) as u8);
            expand_to_square(image, fill)
        } else {
            image.clone()
        };
        if self.do_resize {
            let (h, w) = self.resize_output_size(img.height, img.width);
            img = resize(&img, w, h, self.resample);
        }
        if self.do_center_crop {
            img = center_crop(&img, self.crop_size.0, self.crop_size.1);
        }
        img
    }

    /// Rescale and normalise a uint8 image into channel-first float32 values `[3, H, W]`.
    pub fn to_pixel_values(&self, image: &RgbImage) -> Vec<f32> {
        self.pixels.to_chw(image)
    }

    /// Full image pipeline for one decoded image: `[3, H, W]` values and (H, W).
    pub fn preprocess(&self, image: &RgbImage) -> (Vec<f32>, (usize, usize)) {
        let img = self.resize_and_crop(image);
        (self.to_pixel_values(&img), (img.height, img.width))
    }
}

fn json_usize(v: &Value, key: &str) -> Option<usize> {
    v.get(key)?.as_u64().map(|x| x as usize)
}

fn parse_size(v: &Value) -> Option<ResizeTarget> {
    if let Some(n) = v.as_u64() {
        return Some(ResizeTarget::ShortestEdge(n as usize));
    }
    if let Some(n) = json_usize(v, "shortest_edge") {
        return Some(ResizeTarget::ShortestEdge(n));
    }
    Some(ResizeTarget::Exact { height: json_usize(v, "height")?, width: json_usize(v, "width")? })
}

fn parse_crop(v: &Value) -> Option<(usize, usize)> {
    if let Some(n) = v.as_u64() {
        return Some((n as usize, n as usize));
    }
    Some((json_usize(v, "height")?, json_usize(v, "width")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_output_size_truncates_the_long_edge() {
        let cfg = ImageProcessorConfig { size: ResizeTarget::ShortestEdge(30), ..Default::default() };
        assert_eq!(cfg.resize_output_size(33, 45), (30, 40)); // 40.9 -> 40
        assert_eq!(cfg.resize_output_size(57, 23), (74, 30));
        assert_eq!(cfg.resize_output_size(30, 40), (30, 40));
        assert_eq!(cfg.resize_output_size(64, 64), (30, 30));
    }
}
