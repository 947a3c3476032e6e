//! Fuyu preprocessing as transformers 5.23's `FuyuProcessor` with the PIL image
//! processor (`FuyuImageProcessorPil`, what transformers uses when torchvision is
//! not installed, as in this project's reference environment), plus the answer
//! and labels, which transformers' processor does not define. Files followed:
//!
//! * `models/fuyu/image_processing_pil_fuyu.py`: `resize` (aspect-preserving
//!   downscale, only when larger than the target, `int()` truncation), padding
//!   bottom/right with `padding_value` on the **uint8** image (so the default 1.0
//!   pads with grey level 1, not white), rescale, normalise, `patchify_image`
//!   (patches row-major, each flattened as `(patch_h, patch_w, channel)`).
//! * `models/fuyu/processing_fuyu.py`: `prepare_inputs_layout` (`|SPEAKER|` +
//!   prompt + `<0x04>`), `_process_images` (crop to whole patches:
//!   `min(padded, ceil(unpadded / patch) * patch)`), `replace_image_token`
//!   (`|SPEAKER|` per patch column and `|NEWLINE|` per row, then `<s>`), and the
//!   tokenisation in `__call__`: the image part and the prompt part are tokenised
//!   separately without special tokens, and the first token of the image part
//!   (the `▁` that fuyu-8b's SentencePiece normaliser puts in front) is dropped.
//!
//! The answer (vlmhost's extension): tokenised on its own without special
//! tokens, followed by `|ENDOFTEXT|`; labels are the answer and that token,
//! -100 everywhere before.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::Tokenizer;
pub use vlmhost_imaging::{load_image, resize, ResampleFilter, RgbImage};
use vlmhost_plugin_api::sample::{Message, Part, Speaker};

/// Label value of positions that do not count in the loss.
pub const IGNORE_INDEX: i64 = -100;
/// The image patch token.
pub const IMAGE_TOKEN: &str = "|SPEAKER|";
/// Ends each row of patches.
pub const NEWLINE_TOKEN: &str = "|NEWLINE|";
/// Follows the image tokens (`replace_image_token` appends it).
pub const BOS_TOKEN: &str = "<s>";
/// Beginning of answer, appended to the prompt.
pub const BOA_TOKEN: &str = "<0x04>";
/// Ends the answer.
pub const END_TOKEN: &str = "|ENDOFTEXT|";

#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    #[error("cannot read {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{0}")]
    Option(String),
    #[error("tokenizer file missing: {0} (the model folder needs the tokenizer.json of the checkpoint)")]
    TokenizerMissing(PathBuf),
    #[error("cannot load tokenizer {path}: {message}")]
    TokenizerLoad { path: PathBuf, message: String },
    #[error("{path}: the token {token:?}, which FuyuProcessor needs, is not in the vocabulary")]
    TokenUnknown { path: PathBuf, token: &'static str },
    #[error("tokenising failed: {0}")]
    Tokenize(String),
    #[error(
        "the tokenizer does not tokenise the image placeholders as FuyuProcessor expects: {0} \
         (FuyuProcessor drops the first token of `|SPEAKER|...|NEWLINE|<s>`, the `▁` that fuyu-8b's \
         normaliser puts in front; a tokenizer without it loses an image token)"
    )]
    Placeholders(String),
    #[error("sample: {0}")]
    Sample(String),
    #[error("image {path}: {message}")]
    Image { path: PathBuf, message: String },
}

impl From<vlmhost_imaging::ImageError> for ProcessorError {
    fn from(e: vlmhost_imaging::ImageError) -> Self {
        ProcessorError::Image { path: e.path().to_path_buf(), message: e.to_string() }
    }
}

type Result<T, E = ProcessorError> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------------------------
// Image processor
// ---------------------------------------------------------------------------------------------

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
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
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
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
        }
    }
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

fn hw(v: &Value) -> Option<(usize, usize)> {
    Some((v.get("height")?.as_u64()? as usize, v.get("width")?.as_u64()? as usize))
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
            let text = std::fs::read_to_string(&path).map_err(|e| ProcessorError::Io { path: path.clone(), message: e.to_string() })?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| ProcessorError::Config { path: path.clone(), message: format!("not valid JSON: {e}") })?;
            let v = if nested { v.get("image_processor").cloned() } else { Some(v) };
            if let Some(v) = v {
                return Self::from_json(&v).map_err(|message| ProcessorError::Config { path, message });
            }
        }
        Ok(Self::default())
    }

    /// Read a (flat) image-processor config; errors name the key.
    pub fn from_json(v: &Value) -> std::result::Result<Self, String> {
        let d = Self::default();
        let flag = |k: &str, def: bool| -> std::result::Result<bool, String> {
            match v.get(k).filter(|x| !x.is_null()) {
                None => Ok(def),
                Some(x) => x.as_bool().ok_or(format!("`{k}` is {x}, expected true or false")),
            }
        };
        let num = |k: &str, def: f64| -> std::result::Result<f64, String> {
            match v.get(k).filter(|x| !x.is_null()) {
                None => Ok(def),
                Some(x) => x.as_f64().ok_or(format!("`{k}` is {x}, expected a number")),
            }
        };
        let pair = |k: &str, def: (usize, usize)| -> std::result::Result<(usize, usize), String> {
            match v.get(k).filter(|x| !x.is_null()) {
                None => Ok(def),
                Some(x) => hw(x).ok_or(format!("`{k}` is {x}, expected {{\"height\": H, \"width\": W}}")),
            }
        };
        let channels = |k: &str, def: [f64; 3]| -> std::result::Result<[f64; 3], String> {
            match v.get(k).filter(|x| !x.is_null()) {
                None => Ok(def),
                Some(Value::Number(n)) => Ok([n.as_f64().unwrap_or(0.0); 3]),
                Some(Value::Array(a)) if a.len() == 3 && a.iter().all(Value::is_number) => {
                    Ok([0, 1, 2].map(|i| a[i].as_f64().unwrap_or(0.0)))
                }
                Some(x) => Err(format!("`{k}` is {x}, expected a number or 3 numbers")),
            }
        };
        let resample = match v.get("resample").filter(|x| !x.is_null()) {
            None => d.resample,
            Some(x) => x
                .as_u64()
                .and_then(|c| ResampleFilter::from_pil(c as u32))
                .ok_or(format!("`resample` {x} is not supported (2 = bilinear, 3 = bicubic)"))?,
        };
        if let Some(mode) = v.get("padding_mode").and_then(Value::as_str) {
            if mode != "constant" {
                return Err(format!("`padding_mode` {mode:?} is not supported (only \"constant\")"));
            }
        }
        let padding_value = num("padding_value", d.padding_value as f64)?;
        if !(0.0..256.0).contains(&padding_value) {
            return Err(format!("`padding_value` {padding_value} does not fit the uint8 image it pads"));
        }
        let std = channels("image_std", d.image_std)?;
        if std.contains(&0.0) {
            return Err("`image_std` contains 0".into());
        }
        let cfg = ImageConfig {
            do_resize: flag("do_resize", d.do_resize)?,
            size: pair("size", d.size)?,
            patch: pair("patch_size", d.patch)?,
            resample,
            do_pad: flag("do_pad", d.do_pad)?,
            padding_value: padding_value as u8,
            do_rescale: flag("do_rescale", d.do_rescale)?,
            rescale_factor: num("rescale_factor", d.rescale_factor)?,
            do_normalize: flag("do_normalize", d.do_normalize)?,
            image_mean: channels("image_mean", d.image_mean)?,
            image_std: std,
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
        let err = |message: String| ProcessorError::Image { path: path.to_path_buf(), message };
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

    /// `rescale` then `normalize` of one uint8 value of channel `c`:
    /// `float32(float64(u8) * factor)`, then `(x - float32(mean)) / float32(std)` in float32.
    fn value(&self, u: u8, c: usize) -> f32 {
        let mut x = if self.do_rescale { (u as f64 * self.rescale_factor) as f32 } else { u as f32 };
        if self.do_normalize {
            x = (x - self.image_mean[c] as f32) / self.image_std[c] as f32;
        }
        x
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
                        patches.push(self.value(u, i % 3));
                    }
                }
            }
        }
        Ok(ProcessedImage { patches, rows, cols, image: img })
    }
}

// ---------------------------------------------------------------------------------------------
// The processor
// ---------------------------------------------------------------------------------------------

/// One sample turned into inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Processed {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    /// True on the `|SPEAKER|` and `|NEWLINE|` tokens.
    pub image_token_mask: Vec<bool>,
    pub image: ProcessedImage,
    /// Tokens of the image part, `<s>`, the prompt and `<0x04>` (unlabelled).
    pub prompt_len: usize,
}

/// What a sample says: one image, the prompt and the answer (none: a prompt
/// to generate from, exactly what `FuyuProcessor` gives, nothing labelled).
#[derive(Clone, Debug, PartialEq)]
pub struct FuyuSample {
    pub image: PathBuf,
    pub prompt: String,
    pub answer: Option<String>,
}

impl FuyuSample {
    /// One user message with exactly one image and optional text, then one
    /// assistant answer: what `FuyuProcessor(images=image, text=prompt)` takes
    /// (it has no chat template, one image per sample). The user's text parts
    /// are joined verbatim; the image always comes first, as Fuyu places it.
    /// A user message alone is a prompt to generate from.
    pub fn from_messages(messages: &[Message]) -> Result<Self> {
        let bad = |m: String| ProcessorError::Sample(m);
        let (user, assistant) = match messages {
            [user] => (user, None),
            [user, assistant] => (user, Some(assistant)),
            _ => {
                return Err(bad(format!(
                    "{} message(s); fuyu takes one user message (one image and a prompt) and one assistant answer \
                     (FuyuProcessor has no chat template: no system message, no further turns)",
                    messages.len()
                )))
            }
        };
        if user.role != Speaker::User || assistant.is_some_and(|a| a.role != Speaker::Assistant) {
            let roles: Vec<Speaker> = messages.iter().map(|m| m.role).collect();
            return Err(bad(format!("roles are {roles:?}; fuyu takes a user message then an assistant answer")));
        }
        let images: Vec<&PathBuf> = user.content.iter().filter_map(|p| if let Part::Image { path } = p { Some(path) } else { None }).collect();
        let [image] = images.as_slice() else {
            return Err(bad(format!(
                "the user message has {} image(s); fuyu takes exactly one image per sample",
                images.len()
            )));
        };
        let prompt: String = user.content.iter().filter_map(|p| if let Part::Text { text } = p { Some(text.as_str()) } else { None }).collect();
        for token in [IMAGE_TOKEN, NEWLINE_TOKEN] {
            if prompt.contains(token) {
                return Err(bad(format!("the prompt contains {token:?}, which stands for image patches; remove it")));
            }
        }
        let answer = match assistant {
            None => None,
            Some(a) => {
                if a.content.iter().any(|p| matches!(p, Part::Image { .. })) {
                    return Err(bad("the assistant message contains an image; answers are text".into()));
                }
                let answer: String = a.content.iter().filter_map(|p| if let Part::Text { text } = p { Some(text.as_str()) } else { None }).collect();
                if answer.trim().is_empty() {
                    return Err(bad("the assistant answer is empty: nothing to train on".into()));
                }
                Some(answer)
            }
        };
        Ok(FuyuSample { image: (*image).clone(), prompt, answer })
    }
}

/// Image processor + tokenizer + the special token ids.
pub struct FuyuProcessor {
    pub image_config: ImageConfig,
    tokenizer: Tokenizer,
    pub image_token_id: i64,
    pub newline_id: i64,
    pub bos_id: i64,
    pub boa_id: i64,
    pub end_id: i64,
}

impl FuyuProcessor {
    /// The processor of a model folder (`tokenizer.json` and the image-processor
    /// config), with the target size overridden by `size` when given.
    pub fn from_dir(dir: &Path, size: Option<(usize, usize)>) -> Result<Self> {
        let mut image_config = ImageConfig::from_dir(dir)?;
        if let Some(size) = size {
            image_config.size = size;
            image_config.check_size().map_err(|e| ProcessorError::Option(format!("processor options target_height/target_width: {e}")))?;
        }
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(ProcessorError::TokenizerMissing(path));
        }
        let load = |e: &dyn std::fmt::Display| ProcessorError::TokenizerLoad { path: path.clone(), message: e.to_string() };
        let mut tokenizer = Tokenizer::from_file(&path).map_err(|e| load(&e))?;
        tokenizer.with_truncation(None).map_err(|e| load(&e))?;
        tokenizer.with_padding(None);
        let id = |token: &'static str| {
            tokenizer.token_to_id(token).map(i64::from).ok_or_else(|| ProcessorError::TokenUnknown { path: path.clone(), token })
        };
        let p = FuyuProcessor {
            image_token_id: id(IMAGE_TOKEN)?,
            newline_id: id(NEWLINE_TOKEN)?,
            bos_id: id(BOS_TOKEN)?,
            boa_id: id(BOA_TOKEN)?,
            end_id: id(END_TOKEN)?,
            image_config,
            tokenizer,
        };
        // Fail at open, not at the first sample, when the tokenizer is not fuyu-like.
        p.image_ids(1, 1)?;
        Ok(p)
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self.tokenizer.encode(text, false).map_err(|e| ProcessorError::Tokenize(e.to_string()))?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// The image part: `replace_image_token`'s text tokenised without special
    /// tokens, minus its first token, checked to be `|SPEAKER|` x cols +
    /// `|NEWLINE|` per row, then `<s>`.
    pub fn image_ids(&self, rows: usize, cols: usize) -> Result<Vec<i64>> {
        let mut text = String::with_capacity(rows * (cols + 1) * IMAGE_TOKEN.len() + BOS_TOKEN.len());
        let mut expected = Vec::with_capacity(rows * (cols + 1) + 1);
        for _ in 0..rows {
            for _ in 0..cols {
                text.push_str(IMAGE_TOKEN);
                expected.push(self.image_token_id);
            }
            text.push_str(NEWLINE_TOKEN);
            expected.push(self.newline_id);
        }
        text.push_str(BOS_TOKEN);
        expected.push(self.bos_id);
        let ids = self.encode(&text)?;
        let ids = ids.get(1..).unwrap_or_default();
        if ids != expected.as_slice() {
            let shown: Vec<String> = ids.iter().take(4).map(|&i| self.tokenizer.id_to_token(i as u32).unwrap_or_default()).collect();
            return Err(ProcessorError::Placeholders(format!(
                "for {rows}x{cols} patches it gives {} tokens after the first, starting {shown:?}; expected {}",
                ids.len(),
                expected.len()
            )));
        }
        Ok(expected)
    }

    /// Process one sample: image tokens, `<s>`, prompt, `<0x04>`, answer, `|ENDOFTEXT|`
    /// (without an answer: up to `<0x04>`, nothing labelled).
    pub fn process(&self, sample: &FuyuSample) -> Result<Processed> {
        let decoded = load_image(&sample.image)?;
        let image = self.image_config.process(&decoded, &sample.image)?;
        let mut input_ids = self.image_ids(image.rows, image.cols)?;
        let n_image = input_ids.len() - 1;
        input_ids.extend(self.encode(&format!("{}{BOA_TOKEN}", sample.prompt))?);
        let prompt_len = input_ids.len();
        let mut labels = vec![IGNORE_INDEX; prompt_len];
        if let Some(answer) = &sample.answer {
            let mut answer = self.encode(answer)?;
            answer.push(self.end_id);
            labels.extend_from_slice(&answer);
            input_ids.extend(answer);
        }
        let image_token_mask = (0..input_ids.len()).map(|i| i < n_image).collect();
        Ok(Processed { input_ids, labels, image_token_mask, image, prompt_len })
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
        assert_eq!((c.size, c.padding_value, c.image_mean), ((60, 90), 1, [0.5; 3]));
    }

    #[test]
    fn a_thin_image_is_explained() {
        let c = cfg(60, 90);
        let e = c.resize_pad_crop(&RgbImage::filled(1, 1000, [0, 0, 0]), Path::new("thin.png")).unwrap_err();
        assert!(e.to_string().contains("thin.png") && e.to_string().contains("too thin"), "{e}");
    }

    fn msg(role: Speaker, content: Vec<Part>) -> Message {
        Message { role, content }
    }

    #[test]
    fn samples_are_one_image_a_prompt_and_an_answer() {
        let img = || Part::Image { path: "a.png".into() };
        let text = |t: &str| Part::Text { text: t.into() };
        let s = FuyuSample::from_messages(&[
            msg(Speaker::User, vec![text("What is "), img(), text("this?")]),
            msg(Speaker::Assistant, vec![text("A cat.")]),
        ])
        .unwrap();
        assert_eq!((s.prompt.as_str(), s.answer.as_deref()), ("What is this?", Some("A cat.")));
        let s = FuyuSample::from_messages(&[msg(Speaker::User, vec![img(), text("Caption:")])]).unwrap();
        assert_eq!(s.answer, None);
        let e = FuyuSample::from_messages(&[msg(Speaker::User, vec![text("hi")]), msg(Speaker::Assistant, vec![text("A")])]).unwrap_err();
        assert!(e.to_string().contains("exactly one image"), "{e}");
        let e = FuyuSample::from_messages(&[msg(Speaker::Assistant, vec![text("A")])]).unwrap_err();
        assert!(e.to_string().contains("roles are [Assistant]"), "{e}");
        let three = [msg(Speaker::System, vec![text("x")]), msg(Speaker::User, vec![img()]), msg(Speaker::Assistant, vec![text("A")])];
        let e = FuyuSample::from_messages(&three).unwrap_err();
        assert!(e.to_string().contains("3 message(s)"), "{e}");
        let e = FuyuSample::from_messages(&[msg(Speaker::User, vec![img(), text("|NEWLINE|")]), msg(Speaker::Assistant, vec![text("A")])]).unwrap_err();
        assert!(e.to_string().contains("\"|NEWLINE|\""), "{e}");
        let e = FuyuSample::from_messages(&[msg(Speaker::User, vec![img()]), msg(Speaker::Assistant, vec![text("  ")])]).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
    }
}
