//! Qwen2-VL preprocessing: images, chat template, tokens, labels.
//!
//! Mirrors transformers 5.23 with the PIL image-processor backend, which is what
//! `AutoImageProcessor` selects when torchvision is not installed (this project's
//! reference environment). Files followed:
//!
//! * `models/qwen2_vl/image_processing_pil_qwen2_vl.py` (`Qwen2VLImageProcessorPil`):
//!   `smart_resize` (factor patch * merge, `min_pixels` / `max_pixels`, Python's `round`,
//!   i.e. half to even), bicubic resize, rescale, normalise (CLIP mean / std), `patchify`
//!   (frame duplicated to `temporal_patch_size`; rows ordered `(grid_h/m, grid_w/m, m, m)`
//!   with values `(C, T, P, P)`), `image_grid_thw = (1, grid_h, grid_w)`.
//! * `image_processing_backends.py` `PilBackend` and `image_transforms.py` (`rescale`:
//!   `float32(float64(u8) * factor)`; `normalize`: float32), `image_utils.load_image`
//!   (EXIF transpose, `convert("RGB")`): through the shared `vlmhost-imaging` crate, a
//!   bit-exact port of Pillow 13's resampling.
//! * `models/qwen2_vl/processing_qwen2_vl.py` (`replace_image_token`): each
//!   `<|image_pad|>` becomes `t * h * w / merge^2` copies.
//! * the Qwen2-VL-2B-Instruct chat template (ChatML, the default system prompt when the
//!   conversation has none, images as `<|vision_start|><|image_pad|><|vision_end|>` where
//!   they occur in a message), rendered natively by [`render_chat`]; labels on each
//!   assistant answer and its `<|im_end|>`, as `apply_chat_template`'s assistant mask
//!   (`processing_utils._adjust_assistant_masks_indices`: tokens overlapping the span).
//!
//! Nothing here depends on libtorch.

use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::Tokenizer;
use vlmhost_imaging::{load_image, resize, ResampleFilter, RgbImage};
use vlmhost_plugin_api::sample::{Message, Part, Speaker};

/// The default `max_pixels` of this plugin: 1280 * 28 * 28 = 1,003,520 pixels, at most
/// 1280 image tokens per image. It is transformers' class default too; the hub's
/// `preprocessor_config.json` of Qwen2-VL says 12,845,056 (16384 tokens per image), which
/// exhausts GPU memory on ordinary photos when training. A checkpoint's larger value is
/// capped to this one unless the user asks for it (`--processor max_pixels=N`).
pub const DEFAULT_MAX_PIXELS: usize = 1280 * 28 * 28;

/// Label of positions that do not count in the loss.
pub const IGNORE_INDEX: i64 = -100;

/// Qwen's ChatML / vision tokens.
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
pub const VISION_START: &str = "<|vision_start|>";
pub const VISION_END: &str = "<|vision_end|>";
pub const IMAGE_PAD: &str = "<|image_pad|>";
/// The system prompt the Qwen2-VL template adds when a conversation has none.
pub const DEFAULT_SYSTEM: &str = "You are a helpful assistant.";

/// Texts a message may not contain: they would shift images against their tokens.
const RESERVED: [&str; 4] = [IMAGE_PAD, VISION_START, VISION_END, "<|video_pad|>"];

#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {message}")]
    Json { path: PathBuf, message: String },
    #[error("no image processor config in {dir}: expected preprocessor_config.json, or processor_config.json with an `image_processor` object")]
    ImageConfigMissing { dir: PathBuf },
    #[error("{path}: `{key}`: {reason}")]
    ImageConfigInvalid { path: PathBuf, key: String, reason: String },
    #[error("processor option {key}: {reason}")]
    Option { key: String, reason: String },
    #[error("tokenizer file missing: {path} (the model folder needs the tokenizer.json of Qwen2-VL's fast tokenizer)")]
    TokenizerMissing { path: PathBuf },
    #[error("cannot load tokenizer {path}: {message}")]
    TokenizerLoad { path: PathBuf, message: String },
    #[error("the tokenizer {path} has no token {token:?}, which Qwen2-VL's template needs")]
    TokenUnknown { token: String, path: PathBuf },
    #[error("tokenizing the rendered conversation failed: {message}")]
    Tokenize { message: String },
    #[error("image file not found: {path} (relative paths are resolved against the data file's folder)")]
    ImageMissing { path: PathBuf },
    #[error("cannot decode image {path}: {message}")]
    ImageDecode { path: PathBuf, message: String },
    #[error("{0}")]
    ImageTooLarge(String),
    #[error("image {path} ({width}x{height}): {reason}")]
    ImageSize { path: PathBuf, width: usize, height: usize, reason: String },
    #[error("message {index} ({role}) contains {token:?}, which stands for image content: write images as image parts or `<image>` placeholders")]
    ReservedText { index: usize, role: &'static str, token: &'static str },
    #[error("message {index} (assistant) contains an image: images belong to system or user messages")]
    AssistantImage { index: usize },
    #[error("message {index} (assistant) has an empty answer: nothing to train on")]
    EmptyAnswer { index: usize },
    #[error("the conversation has no assistant message: no token would be labelled")]
    NoAnswer,
}

impl From<vlmhost_imaging::ImageError> for ProcessorError {
    fn from(e: vlmhost_imaging::ImageError) -> Self {
        use vlmhost_imaging::ImageError;
        match e {
            ImageError::Missing { path } => Self::ImageMissing { path },
            ImageError::Io { path, source } => Self::Io { path, source },
            ImageError::Decode { path, message } => Self::ImageDecode { path, message },
            e @ ImageError::TooLarge { .. } => Self::ImageTooLarge(e.to_string()),
        }
    }
}

type Result<T, E = ProcessorError> = std::result::Result<T, E>;

fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read_to_string(path).map_err(|source| ProcessorError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|e| ProcessorError::Json { path: path.to_path_buf(), message: e.to_string() })
}

// ---------------------------------------------------------------------------------------------
// smart_resize
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Image processor
// ---------------------------------------------------------------------------------------------

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
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
}

const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

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
            if let Some(obj) = read_json(&processor)?.get("image_processor").filter(|v| v.is_object()) {
                return Self::from_value(obj, &processor, options);
            }
        }
        let path = dir.join("preprocessor_config.json");
        if !path.is_file() {
            return Err(ProcessorError::ImageConfigMissing { dir: dir.to_path_buf() });
        }
        Self::from_value(&read_json(&path)?, &path, options)
    }

    pub fn from_value(v: &Value, path: &Path, options: PixelOptions) -> Result<Self> {
        let invalid = |key: &str, reason: String| ProcessorError::ImageConfigInvalid { path: path.to_path_buf(), key: key.into(), reason };
        let uint = |key: &str| -> Result<Option<usize>> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| invalid(key, format!("expected a whole number, got {x}"))),
            }
        };
        let flag = |key: &str, default: bool| -> Result<bool> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(x) => Err(invalid(key, format!("expected true or false, got {x}"))),
            }
        };
        let size_edge = |edge: &str| -> Result<Option<usize>> {
            match v.get("size").and_then(|s| s.get(edge)) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| invalid(&format!("size.{edge}"), format!("expected a whole number, got {x}"))),
            }
        };
        let channels = |key: &str, default: [f64; 3]| -> Result<[f64; 3]> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Number(n)) => Ok([n.as_f64().unwrap_or(0.0); 3]),
                Some(Value::Array(a)) if a.len() == 3 && a.iter().all(Value::is_number) => {
                    Ok([a[0].as_f64().unwrap_or(0.0), a[1].as_f64().unwrap_or(0.0), a[2].as_f64().unwrap_or(0.0)])
                }
                Some(x) => Err(invalid(key, format!("expected three numbers (RGB), got {x}"))),
            }
        };
        // transformers: `min_pixels` / `max_pixels` override `size` (Qwen2VLImageProcessorPil.__init__).
        let file_min = uint("min_pixels")?.or(size_edge("shortest_edge")?).unwrap_or(56 * 56);
        let file_max = uint("max_pixels")?.or(size_edge("longest_edge")?).unwrap_or(DEFAULT_MAX_PIXELS);
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
            return Err(option_err(
                key,
                format!("min_pixels {min_pixels} exceeds max_pixels {max_pixels}; choose min_pixels <= max_pixels"),
            ));
        }
        let resample = match uint("resample")? {
            None => ResampleFilter::Bicubic,
            Some(code) => ResampleFilter::from_pil(code as u32)
                .ok_or_else(|| invalid("resample", format!("{code} is not supported (2 = bilinear, 3 = bicubic)")))?,
        };
        let cfg = ImageConfig {
            min_pixels,
            max_pixels,
            capped_max_pixels: capped,
            patch_size: uint("patch_size")?.unwrap_or(14),
            temporal_patch_size: uint("temporal_patch_size")?.unwrap_or(2),
            merge_size: uint("merge_size")?.unwrap_or(2),
            do_resize: flag("do_resize", true)?,
            resample,
            do_rescale: flag("do_rescale", true)?,
            rescale_factor: match v.get("rescale_factor") {
                None | Some(Value::Null) => 1.0 / 255.0,
                Some(x) => x.as_f64().ok_or_else(|| invalid("rescale_factor", format!("expected a number, got {x}")))?,
            },
            do_normalize: flag("do_normalize", true)?,
            image_mean: channels("image_mean", OPENAI_CLIP_MEAN)?,
            image_std: channels("image_std", OPENAI_CLIP_STD)?,
        };
        for (key, n) in [("patch_size", cfg.patch_size), ("temporal_patch_size", cfg.temporal_patch_size), ("merge_size", cfg.merge_size)] {
            if n == 0 {
                return Err(invalid(key, "must be positive".into()));
            }
        }
        if cfg.image_std.contains(&0.0) {
            return Err(invalid("image_std", "contains 0".into()));
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
        let (h, w) = self.target_size(image.height, image.width).map_err(|reason| ProcessorError::ImageSize {
            path: path.to_path_buf(),
            width: image.width,
            height: image.height,
            reason: format!("{reason}; crop or pad the image"),
        })?;
        if !self.do_resize {
            if (image.height, image.width) != (h, w) {
                return Err(ProcessorError::ImageSize {
                    path: path.to_path_buf(),
                    width: image.width,
                    height: image.height,
                    reason: format!("do_resize is false but the sides are not multiples of {}", self.factor()),
                });
            }
            return Ok(image.clone());
        }
        Ok(resize(image, w, h, self.resample))
    }

    /// Rescale, normalise and patchify a resized image.
    pub fn patchify(&self, image: &RgbImage) -> ProcessedImage {
        let (h, w) = (image.height, image.width);
        let (p, m, tp) = (self.patch_size, self.merge_size, self.temporal_patch_size);
        let mean = self.image_mean.map(|x| x as f32);
        let std = self.image_std.map(|x| x as f32);
        // [3, H, W] float32, as rescale (float64 product, cast) then normalize (float32).
        let mut chw = vec![0f32; 3 * h * w];
        for c in 0..3 {
            for i in 0..h * w {
                let u = image.data[i * 3 + c];
                let mut x = if self.do_rescale { (u as f64 * self.rescale_factor) as f32 } else { u as f32 };
                if self.do_normalize {
                    x = (x - mean[c]) / std[c];
                }
                chw[c * h * w + i] = x;
            }
        }
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

// ---------------------------------------------------------------------------------------------
// Chat template
// ---------------------------------------------------------------------------------------------

/// A conversation rendered by the chat template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedChat {
    pub text: String,
    /// Byte ranges of `text` in `{% generation %}`: each answer and its `<|im_end|>`.
    pub generation_spans: Vec<Range<usize>>,
    /// Image paths in the order of their `<|image_pad|>` in `text`.
    pub images: Vec<PathBuf>,
}

fn role_name(role: Speaker) -> &'static str {
    match role {
        Speaker::System => "system",
        Speaker::User => "user",
        Speaker::Assistant => "assistant",
    }
}

/// Renders a conversation as Qwen2-VL-2B-Instruct's chat template does:
///
/// ```text
/// if the first message is not a system message:
///     "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
/// for each message:
///     "<|im_start|>{role}\n"
///     each part in order: text verbatim, image "<|vision_start|><|image_pad|><|vision_end|>"
///     "<|im_end|>\n"     (assistant: the content and <|im_end|> are the generation span)
/// add_generation_prompt: "<|im_start|>assistant\n"
/// ```
pub fn render_chat(messages: &[Message], add_generation_prompt: bool) -> RenderedChat {
    let mut text = String::new();
    let mut spans = Vec::new();
    let mut images = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if i == 0 && m.role != Speaker::System {
            text.push_str(&format!("{IM_START}system\n{DEFAULT_SYSTEM}{IM_END}\n"));
        }
        text.push_str(IM_START);
        text.push_str(role_name(m.role));
        text.push('\n');
        let start = text.len();
        for part in &m.content {
            match part {
                Part::Text { text: t } => text.push_str(t),
                Part::Image { path } => {
                    text.push_str(VISION_START);
                    text.push_str(IMAGE_PAD);
                    text.push_str(VISION_END);
                    images.push(path.clone());
                }
            }
        }
        text.push_str(IM_END);
        if m.role == Speaker::Assistant {
            spans.push(start..text.len());
        }
        text.push('\n');
    }
    if add_generation_prompt {
        text.push_str(IM_START);
        text.push_str("assistant\n");
    }
    RenderedChat { text, generation_spans: spans, images }
}

/// Replaces the `placeholder`s of `text` by `replacements` in order and maps byte `spans`
/// into the new text (`_adjust_assistant_masks_indices`).
fn expand_placeholders(text: &str, placeholder: &str, replacements: &[String], spans: &[Range<usize>]) -> (String, Vec<Range<usize>>) {
    let mut out = String::with_capacity(text.len() + replacements.iter().map(String::len).sum::<usize>());
    let mut shifts: Vec<(usize, isize)> = Vec::new();
    let (mut gained, mut last) = (0isize, 0);
    for ((pos, _), rep) in text.match_indices(placeholder).zip(replacements) {
        out.push_str(&text[last..pos]);
        out.push_str(rep);
        last = pos + placeholder.len();
        gained += rep.len() as isize - placeholder.len() as isize;
        shifts.push((last, gained));
    }
    out.push_str(&text[last..]);
    let map = |p: usize| {
        let n = shifts.partition_point(|&(end, _)| end <= p);
        (p as isize + if n == 0 { 0 } else { shifts[n - 1].1 }) as usize
    };
    (out, spans.iter().map(|r| map(r.start)..map(r.end)).collect())
}

// ---------------------------------------------------------------------------------------------
// The processor
// ---------------------------------------------------------------------------------------------

/// Model inputs of one sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Processed {
    pub input_ids: Vec<i64>,
    /// The answer tokens and their `<|im_end|>`; -100 elsewhere. Not shifted.
    pub labels: Vec<i64>,
    /// `[patches, C*T*P*P]` of all images, in order.
    pub pixel_values: Vec<f32>,
    /// `image_grid_thw`, one (t, h, w) per image.
    pub grids: Vec<[i64; 3]>,
}

/// Qwen2-VL processor: image processor + chat template + tokenizer + labels.
pub struct Qwen2VlProcessor {
    pub image_config: ImageConfig,
    tokenizer: Tokenizer,
    pub image_token_id: i64,
    pub vision_start_id: i64,
    pub vision_end_id: i64,
    pub pad_token_id: Option<i64>,
}

impl Qwen2VlProcessor {
    /// Loads the processor of a model folder: the image processor config (see
    /// [`ImageConfig::from_dir`]), `tokenizer.json`, and the pad token of `tokenizer_config.json`.
    pub fn from_dir(dir: &Path, options: PixelOptions) -> Result<Self> {
        let image_config = ImageConfig::from_dir(dir, options)?;
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(ProcessorError::TokenizerMissing { path });
        }
        let mut tokenizer = Tokenizer::from_file(&path).map_err(|e| ProcessorError::TokenizerLoad { path: path.clone(), message: e.to_string() })?;
        tokenizer
            .with_truncation(None)
            .map_err(|e| ProcessorError::TokenizerLoad { path: path.clone(), message: e.to_string() })?;
        tokenizer.with_padding(None);
        let id = |token: &str| {
            tokenizer
                .token_to_id(token)
                .map(i64::from)
                .ok_or_else(|| ProcessorError::TokenUnknown { token: token.into(), path: path.clone() })
        };
        for t in [IM_START, IM_END] {
            id(t)?;
        }
        let (image_token_id, vision_start_id, vision_end_id) = (id(IMAGE_PAD)?, id(VISION_START)?, id(VISION_END)?);
        let tc = dir.join("tokenizer_config.json");
        let pad = if tc.is_file() {
            match read_json(&tc)?.get("pad_token") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_owned),
                _ => None,
            }
        } else {
            None
        };
        let pad_token_id = pad.as_deref().or(Some("<|endoftext|>")).and_then(|p| tokenizer.token_to_id(p)).map(i64::from);
        Ok(Qwen2VlProcessor { image_config, tokenizer, image_token_id, vision_start_id, vision_end_id, pad_token_id })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Checks a conversation: no reserved image tokens in text, no image in an answer.
    fn check(&self, messages: &[Message], training: bool) -> Result<()> {
        let mut has_answer = false;
        for (index, m) in messages.iter().enumerate() {
            for part in &m.content {
                match part {
                    Part::Text { text } => {
                        if let Some(token) = RESERVED.iter().find(|t| text.contains(*t)) {
                            return Err(ProcessorError::ReservedText { index, role: role_name(m.role), token });
                        }
                    }
                    Part::Image { .. } if m.role == Speaker::Assistant => return Err(ProcessorError::AssistantImage { index }),
                    Part::Image { .. } => {}
                }
            }
            if m.role == Speaker::Assistant {
                has_answer = true;
                if training && m.content.iter().all(|p| matches!(p, Part::Text { text } if text.trim().is_empty())) {
                    return Err(ProcessorError::EmptyAnswer { index });
                }
            }
        }
        if training && !has_answer {
            return Err(ProcessorError::NoAnswer);
        }
        Ok(())
    }

    /// Processes one conversation. A conversation that ends with a user
    /// message is a prompt: it gets the generation prompt and needs no answer.
    pub fn process(&self, messages: &[Message]) -> Result<Processed> {
        let prompt = messages.last().is_some_and(|m| m.role == Speaker::User);
        self.check(messages, !prompt)?;
        let chat = render_chat(messages, prompt);
        let mut pixel_values = Vec::new();
        let mut grids = Vec::new();
        let mut replacements = Vec::new();
        for path in &chat.images {
            let img = load_image(path)?;
            let p = self.image_config.preprocess(&img, path)?;
            replacements.push(IMAGE_PAD.repeat(self.image_config.num_tokens(p.grid)));
            pixel_values.extend_from_slice(&p.patches);
            grids.push(p.grid);
        }
        let (text, spans) = expand_placeholders(&chat.text, IMAGE_PAD, &replacements, &chat.generation_spans);
        let enc = self.tokenizer.encode_char_offsets(text.as_str(), true).map_err(|e| ProcessorError::Tokenize { message: e.to_string() })?;
        let input_ids: Vec<i64> = enc.get_ids().iter().map(|&i| i as i64).collect();
        let char_index = |byte: usize| text[..byte].chars().count();
        let char_spans: Vec<(usize, usize)> = spans.iter().map(|r| (char_index(r.start), char_index(r.end))).collect();
        let labels = input_ids
            .iter()
            .zip(enc.get_offsets())
            .map(|(&id, &(ts, te))| if char_spans.iter().any(|&(s, e)| ts < e && te > s) { id } else { IGNORE_INDEX })
            .collect();
        Ok(Processed { input_ids, labels, pixel_values, grids })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(parts: Vec<Part>) -> Message {
        Message { role: Speaker::User, content: parts }
    }
    fn text(t: &str) -> Part {
        Part::Text { text: t.into() }
    }

    #[test]
    fn template_adds_the_default_system_prompt_and_spans_answers() {
        let msgs = vec![
            user(vec![Part::Image { path: "a.png".into() }, text("Hi?")]),
            Message { role: Speaker::Assistant, content: vec![text("Yes.")] },
        ];
        let r = render_chat(&msgs, false);
        assert_eq!(
            r.text,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\
             <|vision_start|><|image_pad|><|vision_end|>Hi?<|im_end|>\n<|im_start|>assistant\nYes.<|im_end|>\n"
        );
        assert_eq!(&r.text[r.generation_spans[0].clone()], "Yes.<|im_end|>");
        let sys = vec![Message { role: Speaker::System, content: vec![text("Be brief.")] }, user(vec![text("Q")])];
        assert_eq!(render_chat(&sys, true).text, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n");
    }

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
        let hub: Value = serde_json::from_str(include_str!("../tests/qwen2-vl-2b.preprocessor_config.json")).unwrap();
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
        assert!(e.to_string().contains("preprocessor_config.json: `image_mean`: expected three numbers"), "{e}");
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
