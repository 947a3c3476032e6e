//! LLaVA-1.5 preprocessing: image loading and processing, chat template, tokenisation, labels.
//!
//! Mirrors transformers 5.23 with the PIL image-processor backend (`CLIPImageProcessorPil`),
//! which is what transformers picks when torchvision is not installed. Files followed:
//!
//! * `transformers/image_utils.py` `load_image`: EXIF transpose, then `convert("RGB")` (alpha dropped).
//! * `transformers/image_processing_backends.py` `PilBackend._preprocess`: resize, centre crop,
//!   rescale, normalise, in that order.
//! * `transformers/image_transforms.py` `get_resize_output_image_size`, `resize`, `center_crop`,
//!   `rescale`, `normalize`.
//! * Pillow 13.0.0 `src/libImaging/Resample.c` (`ImagingResample`): the separable resampling
//!   filter, including Pillow 13's choice of which pass runs first: ported in the shared
//!   `vlmhost-imaging` crate, with image loading and the crops (re-exported here).
//! * `transformers/models/llava/processing_llava.py` `LlavaProcessor.replace_image_token`:
//!   the number of image tokens per image.
//! * `transformers/processing_utils.py` `ProcessorMixin.apply_chat_template` and
//!   `_adjust_assistant_masks_indices`: BOS handling and the assistant (label) mask.
//! * the llava-1.5-hf `chat_template.jinja`, with the assistant answer and `</s>` inside
//!   `{% generation %}`: rendered natively by [`render_chat`].
//!
//! Outputs are plain `Vec<f32>` / `Vec<i64>`; nothing here depends on libtorch.
//!
//! Parity: PNG inputs give bit-identical pixel values. JPEG inputs do not: the `image` crate
//! decodes with zune-jpeg, whose IDCT and chroma upsampling differ from the libjpeg-turbo inside
//! Pillow by up to about 3-4 levels of 255 before resizing.

use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokenizers::Tokenizer;

pub use vlmhost_imaging::{
    center_crop, expand_to_square, load_image, resize, ResampleFilter, RgbImage,
};

/// The placeholder that marks an image in plain-text data and in the rendered prompt.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// Label value of positions that do not count in the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Everything that can go wrong between a model folder / a conversation and the model inputs.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON for {what}: {source}")]
    Json {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "no image processor config in {dir}: expected processor_config.json with an \
         `image_processor` key (transformers 5) or preprocessor_config.json (older checkpoints)"
    )]
    ImageConfigMissing { dir: PathBuf },
    #[error("invalid image processor config in {path}: {reason}")]
    ImageConfigInvalid { path: PathBuf, reason: String },
    #[error(
        "tokenizer file missing: {path} (the model folder needs the tokenizer.json written by \
         save_pretrained of a fast tokenizer)"
    )]
    TokenizerMissing { path: PathBuf },
    #[error("cannot load tokenizer {path}: {message}")]
    TokenizerLoad { path: PathBuf, message: String },
    #[error("the image token {token:?} is not in the vocabulary of {path}")]
    ImageTokenUnknown { token: String, path: PathBuf },
    #[error("tokenizing the rendered conversation failed: {message}")]
    Tokenize { message: String },
    #[error("image file not found: {path}")]
    ImageMissing { path: PathBuf },
    #[error("cannot decode image {path}: {message}")]
    ImageDecode { path: PathBuf, message: String },
    #[error("{0}")]
    ImageTooLarge(String),
    #[error(
        "{placeholders} `<image>` placeholder(s) but {images} image(s): each placeholder takes \
         exactly one image, in order{context}"
    )]
    PlaceholderMismatch {
        placeholders: usize,
        images: usize,
        /// Where the mismatch was found (", in the rendered conversation", ...).
        context: String,
    },
    #[error("message {index} (assistant) has an empty answer: nothing to train on")]
    EmptyAnswer { index: usize },
    #[error("the conversation has no assistant message and does not end with a user prompt: no token would be labelled")]
    NoAnswer,
    #[error(
        "images of one sample have different processed sizes ({first:?} and {other:?} as HxW): \
         enable do_center_crop or use a fixed `size`"
    )]
    ImageSizeMismatch {
        first: (usize, usize),
        other: (usize, usize),
    },
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

fn read_file(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| ProcessorError::Io {
        path: path.to_path_buf(),
        source,
    })
}

// ---------------------------------------------------------------------------------------------
// Image processor config
// ---------------------------------------------------------------------------------------------

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
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
    /// Parsed for completeness: images loaded from a path are always converted to RGB
    /// (`load_image` does `convert("RGB")`), so this changes nothing here.
    pub do_convert_rgb: bool,
    /// Original LLaVA repo's `image_aspect_ratio == "pad"`: expand the image to a square filled
    /// with the mean colour (`int(255 * mean)`) before resizing. Not an HF key; off by default.
    pub pad_to_square: bool,
}

/// The JSON form, as transformers writes it (all keys optional, CLIP defaults).
#[derive(Debug, Deserialize)]
struct RawImageProcessorConfig {
    #[serde(default)]
    do_resize: Option<bool>,
    #[serde(default)]
    size: Option<serde_json::Value>,
    #[serde(default)]
    resample: Option<u32>,
    #[serde(default)]
    do_center_crop: Option<bool>,
    #[serde(default)]
    crop_size: Option<serde_json::Value>,
    #[serde(default)]
    do_rescale: Option<bool>,
    #[serde(default)]
    rescale_factor: Option<f64>,
    #[serde(default)]
    do_normalize: Option<bool>,
    #[serde(default)]
    image_mean: Option<MeanStd>,
    #[serde(default)]
    image_std: Option<MeanStd>,
    #[serde(default)]
    do_convert_rgb: Option<bool>,
    #[serde(default)]
    pad_to_square: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum MeanStd {
    One(f64),
    PerChannel(Vec<f64>),
}

/// `processor_config.json` (transformers 5 nests the image processor in it).
#[derive(Debug, Default, Deserialize)]
struct RawProcessorConfig {
    #[serde(default)]
    image_processor: Option<RawImageProcessorConfig>,
    #[serde(default)]
    image_token: Option<String>,
    #[serde(default)]
    patch_size: Option<usize>,
    #[serde(default)]
    vision_feature_select_strategy: Option<String>,
    #[serde(default)]
    num_additional_image_tokens: Option<usize>,
}

/// OpenAI CLIP mean/std (`transformers.image_utils.OPENAI_CLIP_MEAN/STD`), CLIP's defaults.
const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

impl Default for ImageProcessorConfig {
    /// `CLIPImageProcessorPil`'s class defaults (size 224).
    fn default() -> Self {
        Self {
            do_resize: true,
            size: ResizeTarget::ShortestEdge(224),
            resample: ResampleFilter::Bicubic,
            do_center_crop: true,
            crop_size: (224, 224),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
            do_convert_rgb: true,
            pad_to_square: false,
        }
    }
}

impl ImageProcessorConfig {
    /// Reads the image-processor settings of a model folder: `processor_config.json` with an
    /// `image_processor` key (transformers 5), else `preprocessor_config.json` at top level
    /// (older checkpoints such as llava-hf/llava-1.5-7b-hf).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let processor = dir.join("processor_config.json");
        if processor.is_file() {
            let raw: RawProcessorConfig = parse_json(&processor, "a processor config")?;
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
        })
    }

    /// Reads a flat image-processor config (`preprocessor_config.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: RawImageProcessorConfig = parse_json(path, "an image processor config")?;
        Self::from_raw(raw, path)
    }

    fn from_raw(raw: RawImageProcessorConfig, path: &Path) -> Result<Self> {
        let invalid = |reason: String| ProcessorError::ImageConfigInvalid {
            path: path.to_path_buf(),
            reason,
        };
        let d = Self::default();
        let size = match raw.size {
            None => d.size,
            Some(v) => parse_size(&v).ok_or_else(|| {
                invalid(format!(
                    "`size` {v} is not {{\"shortest_edge\": N}}, {{\"height\", \"width\"}} or N"
                ))
            })?,
        };
        let crop_size = match raw.crop_size {
            None => d.crop_size,
            Some(v) => parse_crop(&v).ok_or_else(|| {
                invalid(format!(
                    "`crop_size` {v} is not {{\"height\", \"width\"}} or N"
                ))
            })?,
        };
        let resample = match raw.resample {
            None => d.resample,
            Some(code) => ResampleFilter::from_pil(code).ok_or_else(|| {
                invalid(format!(
                    "`resample` {code} is not supported (2 = bilinear, 3 = bicubic)"
                ))
            })?,
        };
        let channels = |v: Option<MeanStd>, default: [f64; 3], key: &str| match v {
            None => Ok(default),
            Some(MeanStd::One(x)) => Ok([x; 3]),
            Some(MeanStd::PerChannel(v)) if v.len() == 3 => Ok([v[0], v[1], v[2]]),
            Some(MeanStd::PerChannel(v)) => Err(invalid(format!(
                "`{key}` has {} values, expected 3 (RGB)",
                v.len()
            ))),
        };
        let image_mean = channels(raw.image_mean, d.image_mean, "image_mean")?;
        let image_std = channels(raw.image_std, d.image_std, "image_std")?;
        if image_std.contains(&0.0) {
            return Err(invalid("`image_std` contains 0".into()));
        }
        Ok(Self {
            do_resize: raw.do_resize.unwrap_or(d.do_resize),
            size,
            resample,
            do_center_crop: raw.do_center_crop.unwrap_or(d.do_center_crop),
            crop_size,
            do_rescale: raw.do_rescale.unwrap_or(d.do_rescale),
            rescale_factor: raw.rescale_factor.unwrap_or(d.rescale_factor),
            do_normalize: raw.do_normalize.unwrap_or(d.do_normalize),
            image_mean,
            image_std,
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
                let (short, long) = if width <= height {
                    (width, height)
                } else {
                    (height, width)
                };
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
            let fill = self.image_mean.map(|m| (m * 255.0) as u8);
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
    ///
    /// `image_transforms.rescale`: `float32(float64(u8) * factor)`; `normalize`:
    /// `(x - float32(mean)) / float32(std)` in float32.
    pub fn to_pixel_values(&self, image: &RgbImage) -> Vec<f32> {
        let (h, w) = (image.height, image.width);
        let mean = self.image_mean.map(|m| m as f32);
        let std = self.image_std.map(|s| s as f32);
        let mut out = vec![0f32; 3 * h * w];
        for c in 0..3 {
            let plane = &mut out[c * h * w..(c + 1) * h * w];
            for (i, v) in plane.iter_mut().enumerate() {
                let u = image.data[i * 3 + c];
                let mut x = if self.do_rescale {
                    (u as f64 * self.rescale_factor) as f32
                } else {
                    u as f32
                };
                if self.do_normalize {
                    x = (x - mean[c]) / std[c];
                }
                *v = x;
            }
        }
        out
    }

    /// Full image pipeline for one decoded image: `[3, H, W]` values and (H, W).
    pub fn preprocess(&self, image: &RgbImage) -> (Vec<f32>, (usize, usize)) {
        let img = self.resize_and_crop(image);
        (self.to_pixel_values(&img), (img.height, img.width))
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(path: &Path, what: &'static str) -> Result<T> {
    let text = read_file(path)?;
    serde_json::from_str(&text).map_err(|source| ProcessorError::Json {
        path: path.to_path_buf(),
        what,
        source,
    })
}

fn json_usize(v: &serde_json::Value, key: &str) -> Option<usize> {
    v.get(key)?.as_u64().map(|x| x as usize)
}

fn parse_size(v: &serde_json::Value) -> Option<ResizeTarget> {
    if let Some(n) = v.as_u64() {
        return Some(ResizeTarget::ShortestEdge(n as usize));
    }
    if let Some(n) = json_usize(v, "shortest_edge") {
        return Some(ResizeTarget::ShortestEdge(n));
    }
    Some(ResizeTarget::Exact {
        height: json_usize(v, "height")?,
        width: json_usize(v, "width")?,
    })
}

fn parse_crop(v: &serde_json::Value) -> Option<(usize, usize)> {
    if let Some(n) = v.as_u64() {
        return Some((n as usize, n as usize));
    }
    Some((json_usize(v, "height")?, json_usize(v, "width")?))
}

// ---------------------------------------------------------------------------------------------
// Conversations and the chat template
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}


/// One typed content part, as `apply_chat_template` takes them (`{"type": "text"|"image"}`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    Text(String),
    /// Path already resolved (absolute, or relative to the working directory).
    Image(PathBuf),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: Vec<Part>,
}

/// A conversation rendered by the chat template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedChat {
    pub text: String,
    /// Byte ranges of `text` inside `{% generation %}`: each answer and its `</s>`.
    pub generation_spans: Vec<Range<usize>>,
    /// Image paths in the order their placeholders appear in `text`.
    pub images: Vec<PathBuf>,
}

/// Renders a conversation exactly as the llava-1.5-hf `chat_template.jinja` does:
///
/// ```text
/// for each message:
///     "USER: " / "ASSISTANT: " (no prefix for system)
///     "<image>\n" for each image part, ALL images of the message first, whatever their position
///     user/system: each text part + " "
///     assistant:   {% generation %} text parts joined by " " + eos {% endgeneration %}
/// add_generation_prompt: "ASSISTANT:"
/// ```
pub fn render_chat(
    messages: &[Message],
    eos_token: &str,
    add_generation_prompt: bool,
) -> RenderedChat {
    let mut text = String::new();
    let mut generation_spans = Vec::new();
    let mut images = Vec::new();
    for m in messages {
        match m.role {
            Role::System => {}
            Role::User => text.push_str("USER: "),
            Role::Assistant => text.push_str("ASSISTANT: "),
        }
        for part in &m.content {
            if let Part::Image(p) = part {
                text.push_str(IMAGE_PLACEHOLDER);
                text.push('\n');
                images.push(p.clone());
            }
        }
        let texts = m.content.iter().filter_map(|p| match p {
            Part::Text(t) => Some(t.as_str()),
            Part::Image(_) => None,
        });
        if m.role == Role::Assistant {
            let start = text.len();
            text.push_str(&texts.collect::<Vec<_>>().join(" "));
            text.push_str(eos_token);
            generation_spans.push(start..text.len());
        } else {
            for t in texts {
                text.push_str(t);
                text.push(' ');
            }
        }
    }
    if add_generation_prompt {
        text.push_str("ASSISTANT:");
    }
    RenderedChat {
        text,
        generation_spans,
        images,
    }
}

/// Replaces every `placeholder` in `text` by the matching entry of `replacements` (in order) and
/// maps `spans` (byte ranges) into the new text, shifting each position by what the
/// replacements ending at or before it added (processing_utils `_adjust_assistant_masks_indices`).
fn expand_placeholders(
    text: &str,
    placeholder: &str,
    replacements: &[String],
    spans: &[Range<usize>],
) -> (String, Vec<Range<usize>>) {
    let mut out =
        String::with_capacity(text.len() + replacements.iter().map(String::len).sum::<usize>());
    // (end of the placeholder in the old text, cumulative bytes gained up to it)
    let mut shifts: Vec<(usize, isize)> = Vec::new();
    let mut gained = 0isize;
    let mut last = 0;
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
        let shift = if n == 0 { 0 } else { shifts[n - 1].1 };
        (p as isize + shift) as usize
    };
    let spans = spans.iter().map(|r| map(r.start)..map(r.end)).collect();
    (out, spans)
}

// ---------------------------------------------------------------------------------------------
// The processor
// ---------------------------------------------------------------------------------------------

/// Model inputs of one sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Processed {
    /// `[L]` token ids: `<s>`, then the rendered conversation with each `<image>` expanded.
    pub input_ids: Vec<i64>,
    /// `[L]` the answer tokens and their `</s>`; -100 elsewhere. Not shifted (HF convention).
    pub labels: Vec<i64>,
    /// `[n_images, 3, H, W]` flattened, images in placeholder order.
    pub pixel_values: Vec<f32>,
    pub n_images: usize,
    /// (H, W) of each image in `pixel_values`; (0, 0) when there is no image.
    pub image_size: (usize, usize),
}

impl Processed {
    /// `[L]` attention mask of this unpadded sequence: all ones.
    pub fn attention_mask(&self) -> Vec<i64> {
        vec![1; self.input_ids.len()]
    }
}

/// LLaVA-1.5 processor: image processor + chat template + tokenizer + labels.
pub struct LlavaProcessor {
    pub image_config: ImageProcessorConfig,
    tokenizer: Tokenizer,
    pub image_token: String,
    pub image_token_id: u32,
    pub patch_size: usize,
    pub vision_feature_select_strategy: String,
    pub num_additional_image_tokens: usize,
    pub bos_token: Option<String>,
    pub eos_token: String,
}

/// Fallback for folders without processor_config.json: `config.json`'s vision settings.
#[derive(Debug, Default, Deserialize)]
struct RawModelConfig {
    #[serde(default)]
    vision_feature_select_strategy: Option<String>,
    #[serde(default)]
    vision_config: Option<RawVisionConfig>,
}

#[derive(Debug, Deserialize)]
struct RawVisionConfig {
    #[serde(default)]
    patch_size: Option<usize>,
}

/// A special token in tokenizer_config.json: a string or an AddedToken dict.
fn special_token(cfg: &serde_json::Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl LlavaProcessor {
    /// Loads the processor of a model folder: image-processor config (see
    /// [`ImageProcessorConfig::from_dir`]), `processor_config.json` (patch size, feature
    /// strategy, extra tokens; falling back to `config.json`), `tokenizer.json` and the special
    /// tokens of `tokenizer_config.json`.
    pub fn from_dir(model_dir: &Path) -> Result<Self> {
        let image_config = ImageProcessorConfig::from_dir(model_dir)?;

        let processor_path = model_dir.join("processor_config.json");
        let proc_cfg: RawProcessorConfig = if processor_path.is_file() {
            parse_json(&processor_path, "a processor config")?
        } else {
            RawProcessorConfig::default()
        };
        let model_path = model_dir.join("config.json");
        let model_cfg: RawModelConfig = if model_path.is_file() {
            parse_json(&model_path, "a model config")?
        } else {
            RawModelConfig::default()
        };
        let patch_size = proc_cfg
            .patch_size
            .or_else(|| model_cfg.vision_config.as_ref().and_then(|v| v.patch_size))
            .ok_or_else(|| ProcessorError::ImageConfigInvalid {
                path: processor_path.clone(),
                reason: "no `patch_size` in processor_config.json nor vision_config.patch_size \
                         in config.json"
                    .into(),
            })?;
        if patch_size == 0 {
            return Err(ProcessorError::ImageConfigInvalid {
                path: processor_path,
                reason: "`patch_size` is 0".into(),
            });
        }
        let vision_feature_select_strategy = proc_cfg
            .vision_feature_select_strategy
            .or(model_cfg.vision_feature_select_strategy)
            .unwrap_or_else(|| "default".to_string());
        // transformers' LlavaProcessor defaults this to 0, but every LLaVA-1.5 checkpoint pairs a
        // CLIP tower (one CLS token) with it, and the hub processor configs say 1: with 0 the
        // `default` strategy would drop a patch token and the model would reject the sample.
        let num_additional_image_tokens = proc_cfg.num_additional_image_tokens.unwrap_or(1);
        let image_token = proc_cfg
            .image_token
            .unwrap_or_else(|| IMAGE_PLACEHOLDER.to_string());

        let tok_path = model_dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(ProcessorError::TokenizerMissing { path: tok_path });
        }
        let mut tokenizer =
            Tokenizer::from_file(&tok_path).map_err(|e| ProcessorError::TokenizerLoad {
                path: tok_path.clone(),
                message: e.to_string(),
            })?;
        // transformers turns off the truncation/padding stored in tokenizer.json unless asked.
        tokenizer
            .with_truncation(None)
            .map_err(|e| ProcessorError::TokenizerLoad {
                path: tok_path.clone(),
                message: e.to_string(),
            })?;
        tokenizer.with_padding(None);
        let image_token_id = tokenizer.token_to_id(&image_token).ok_or_else(|| {
            ProcessorError::ImageTokenUnknown {
                token: image_token.clone(),
                path: tok_path.clone(),
            }
        })?;

        let tc_path = model_dir.join("tokenizer_config.json");
        let tok_cfg: serde_json::Value = if tc_path.is_file() {
            parse_json(&tc_path, "a tokenizer config")?
        } else {
            serde_json::Value::Null
        };
        // Llama's special tokens when tokenizer_config.json does not name them.
        let bos_token = special_token(&tok_cfg, "bos_token").or_else(|| Some("<s>".into()));
        let eos_token = special_token(&tok_cfg, "eos_token").unwrap_or_else(|| "</s>".into());

        Ok(Self {
            image_config,
            tokenizer,
            image_token,
            image_token_id,
            patch_size,
            vision_feature_select_strategy,
            num_additional_image_tokens,
            bos_token,
            eos_token,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Image tokens for a processed image of `height` x `width`
    /// (`LlavaProcessor.replace_image_token`): patches + additional tokens, minus the CLS token
    /// that the `default` strategy drops.
    pub fn num_image_tokens(&self, height: usize, width: usize) -> usize {
        let mut n = (height / self.patch_size) * (width / self.patch_size)
            + self.num_additional_image_tokens;
        if self.vision_feature_select_strategy == "default" {
            n = n.saturating_sub(1);
        }
        n
    }

    /// Renders a conversation with this checkpoint's eos token. A
    /// conversation that ends with a user message is a prompt to generate
    /// from: it gets the generation prompt (`ASSISTANT:`), as
    /// `apply_chat_template(add_generation_prompt=True)` renders it.
    pub fn render(&self, messages: &[Message]) -> RenderedChat {
        let prompt = messages.last().is_some_and(|m| m.role == Role::User);
        render_chat(messages, &self.eos_token, prompt)
    }

    /// Processes one training conversation into model inputs.
    pub fn process(&self, messages: &[Message]) -> Result<Processed> {
        // Reject conversations that cannot train anything, naming the message.
        let mut has_answer = false;
        for (index, m) in messages.iter().enumerate() {
            if m.role == Role::Assistant {
                has_answer = true;
                let empty = m.content.iter().all(|p| match p {
                    Part::Text(t) => t.trim().is_empty(),
                    Part::Image(_) => true,
                });
                if empty {
                    return Err(ProcessorError::EmptyAnswer { index });
                }
            }
        }
        // A conversation ending with the user is a prompt to generate from
        // (no labels); otherwise something must be labelled.
        let is_prompt = messages.last().is_some_and(|m| m.role == Role::User);
        if !has_answer && !is_prompt {
            return Err(ProcessorError::NoAnswer);
        }

        let chat = self.render(messages);
        // As transformers checks: every image token in the prompt takes one image. A text part
        // that itself contains `<image>` would otherwise shift all images by one.
        let placeholders = chat.text.matches(self.image_token.as_str()).count();
        if placeholders != chat.images.len() {
            return Err(ProcessorError::PlaceholderMismatch {
                placeholders,
                images: chat.images.len(),
                context: ", in the rendered conversation (does a text part contain `<image>`?)"
                    .into(),
            });
        }

        // Images, in placeholder order.
        let mut pixel_values = Vec::new();
        let mut replacements = Vec::with_capacity(chat.images.len());
        let mut image_size: Option<(usize, usize)> = None;
        for path in &chat.images {
            let img = load_image(path)?;
            let (values, size) = self.image_config.preprocess(&img);
            match image_size {
                None => image_size = Some(size),
                Some(first) if first != size => {
                    return Err(ProcessorError::ImageSizeMismatch { first, other: size })
                }
                Some(_) => {}
            }
            pixel_values.extend_from_slice(&values);
            replacements.push(
                self.image_token
                    .repeat(self.num_image_tokens(size.0, size.1)),
            );
        }

        let (text, spans) = expand_placeholders(
            &chat.text,
            &self.image_token,
            &replacements,
            &chat.generation_spans,
        );
        let Tokenized {
            ids: input_ids,
            char_offsets: offsets,
        } = self.tokenize(&text)?;

        // Label every token whose character range overlaps a generation span; zero-width tokens
        // (the `<s>` added by the post-processor) never do.
        let char_spans: Vec<(usize, usize)> = spans
            .iter()
            .map(|r| (char_index(&text, r.start), char_index(&text, r.end)))
            .collect();
        let labels = input_ids
            .iter()
            .zip(&offsets)
            .map(|(&id, &(ts, te))| {
                let labelled = char_spans.iter().any(|&(s, e)| ts < e && te > s);
                if labelled {
                    id
                } else {
                    IGNORE_INDEX
                }
            })
            .collect();

        Ok(Processed {
            input_ids,
            labels,
            pixel_values,
            n_images: chat.images.len(),
            image_size: image_size.unwrap_or((0, 0)),
        })
    }

    /// Tokenises the whole text in one call (Metaspace `prepend_scheme="first"` makes piecewise
    /// tokenisation differ). `apply_chat_template` lets the post-processor add `<s>` unless the
    /// text already starts with it.
    pub fn tokenize(&self, text: &str) -> Result<Tokenized> {
        let add_special = !self
            .bos_token
            .as_deref()
            .is_some_and(|bos| !bos.is_empty() && text.starts_with(bos));
        let enc = self
            .tokenizer
            .encode_char_offsets(text, add_special)
            .map_err(|e| ProcessorError::Tokenize {
                message: e.to_string(),
            })?;
        Ok(Tokenized {
            ids: enc.get_ids().iter().map(|&i| i as i64).collect(),
            char_offsets: enc.get_offsets().to_vec(),
        })
    }
}

/// Token ids with the character range of the text each token came from (`offset_mapping`;
/// tokens added by the post-processor have an empty range).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokenized {
    pub ids: Vec<i64>,
    pub char_offsets: Vec<(usize, usize)>,
}

/// Character index of byte position `byte` in `text`.
fn char_index(text: &str, byte: usize) -> usize {
    text[..byte].chars().count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expand_shifts_spans_past_placeholders() {
        let text = "a<image>b<image>c";
        let reps = vec!["XX".to_string(), "YYYY".to_string()];
        let (out, spans) = expand_placeholders(text, "<image>", &reps, &[8..9, 16..17]);
        assert_eq!(out, "aXXbYYYYc");
        assert_eq!(&out[spans[0].clone()], "b");
        assert_eq!(&out[spans[1].clone()], "c");
    }

    #[test]
    fn resize_output_size_truncates_the_long_edge() {
        let cfg = ImageProcessorConfig {
            size: ResizeTarget::ShortestEdge(30),
            ..Default::default()
        };
        assert_eq!(cfg.resize_output_size(33, 45), (30, 40)); // 40.9 -> 40
        assert_eq!(cfg.resize_output_size(57, 23), (74, 30));
        assert_eq!(cfg.resize_output_size(30, 40), (30, 40));
        assert_eq!(cfg.resize_output_size(64, 64), (30, 30));
    }
}
