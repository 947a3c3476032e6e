//! Samples to model inputs: the image processor, the tokenizer and the prompt
//! format, with the labels. This is the part of a plugin that parity tests
//! check first (ids and labels identical to the reference processor's).
//!
//! * **Images**: loaded as Pillow does (`vlmhost_imaging::load_image`: EXIF
//!   orientation, `convert("RGB")`), resized to `image_size` x `image_size`
//!   (bilinear by default; processor option `resample=bicubic`), scaled to
//!   [-1, 1] (`x / 127.5 - 1`), channels first: `pixel_values [3, 32, 32]`.
//! * **Tokenizer**: bytes. `<bos>` 0, `<eos>` 1, byte `b` -> `b + 2`,
//!   `<image>` 300; the same ids as `assets/byte_tokenizer.json`, which
//!   `vlmhost init` writes as the checkpoint's `tokenizer.json` (the host
//!   decodes generated tokens with it).
//! * **Prompt format**: `<bos>`, then every turn in order: a user (or system)
//!   turn is its parts (text as bytes, each image as `num_patches` `<image>`
//!   tokens) followed by `\n`; an assistant turn is its text followed by
//!   `<eos>`. Labels are the assistant's tokens and their `<eos>`; everything
//!   else is -100. A sample ending with a user turn is a generation prompt
//!   (what `vlmhost generate` sends): it ends with that `\n`, where the answer
//!   starts.

use std::path::Path;
use vlmhost_imaging::{load_image, resize, ResampleFilter};
use vlmhost_plugin_api::sample::{Message, Part, Speaker};
use vlmhost_plugin_api::{ModelOptions, PluginError};

pub const BOS: i64 = 0;
pub const EOS: i64 = 1;
pub const BYTE_OFFSET: i64 = 2;
pub const IMAGE_TOKEN: i64 = 300;
/// The smallest vocabulary holding every id above.
pub const MIN_VOCAB: i64 = IMAGE_TOKEN + 1;
/// Labels of tokens the loss ignores (transformers' convention).
pub const IGNORE: i64 = -100;
/// Ends a user turn; the answer follows.
const TURN_END: u8 = b'\n';

/// The processor options this family accepts (`--processor KEY=VALUE`, or a
/// checkpoint's `vlmhost.json`).
pub const OPTION_KEYS: &[&str] = &["resample"];

/// One sample as token ids, labels and pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct Processed {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    pub image_token_mask: Vec<bool>,
    /// `[n_images, 3, size, size]`, flattened.
    pub pixel_values: Vec<f32>,
    pub n_images: usize,
}

/// The processor of one checkpoint.
#[derive(Debug, Clone)]
pub struct ToyProcessor {
    pub image_size: usize,
    pub tokens_per_image: usize,
    pub resample: ResampleFilter,
}

impl ToyProcessor {
    /// The processor for `image_size` images cut into `tokens_per_image`
    /// patches, with the user's options. Unknown keys are refused (with the
    /// list of known ones), never ignored.
    pub fn new(image_size: usize, tokens_per_image: usize, options: &ModelOptions) -> Result<Self, PluginError> {
        options.check_keys(OPTION_KEYS)?;
        let resample = match options.string("resample").as_deref() {
            None | Some("bilinear") => ResampleFilter::Bilinear,
            Some("bicubic") => ResampleFilter::Bicubic,
            Some(other) => {
                return Err(PluginError::invalid_with_hint(
                    "processor option resample",
                    format!("unknown filter {other:?}"),
                    "use bilinear or bicubic",
                ))
            }
        };
        Ok(ToyProcessor { image_size, tokens_per_image, resample })
    }

    /// An image file as `[3, size, size]` values in [-1, 1].
    pub fn pixels(&self, path: &Path) -> Result<Vec<f32>, PluginError> {
        let image = load_image(path).map_err(|e| PluginError::Io {
            path: path.display().to_string().into(),
            message: e.to_string().into(),
        })?;
        let image = resize(&image, self.image_size, self.image_size, self.resample);
        Ok(image.to_chw().into_iter().map(|v| v as f32 / 127.5 - 1.0).collect())
    }

    /// Render a conversation (see the module documentation).
    pub fn process(&self, messages: &[Message]) -> Result<Processed, PluginError> {
        if messages.is_empty() {
            return Err(PluginError::invalid("sample", "the conversation has no message"));
        }
        let mut p = Processed {
            input_ids: vec![BOS],
            labels: vec![IGNORE],
            image_token_mask: vec![false],
            pixel_values: Vec::new(),
            n_images: 0,
        };
        for (index, message) in messages.iter().enumerate() {
            match message.role {
                Speaker::System | Speaker::User => {
                    for part in &message.content {
                        match part {
                            Part::Text { text } => push_text(&mut p, text, false),
                            Part::Image { path } => {
                                p.pixel_values.extend(self.pixels(path)?);
                                p.n_images += 1;
                                let n = self.tokens_per_image;
                                p.input_ids.extend(std::iter::repeat_n(IMAGE_TOKEN, n));
                                p.labels.extend(std::iter::repeat_n(IGNORE, n));
                                p.image_token_mask.extend(std::iter::repeat_n(true, n));
                            }
                        }
                    }
                    push_bytes(&mut p, &[TURN_END], false);
                }
                Speaker::Assistant => {
                    for part in &message.content {
                        match part {
                            Part::Text { text } => push_text(&mut p, text, true),
                            Part::Image { .. } => {
                                return Err(PluginError::invalid_with_hint(
                                    format!("message {index}"),
                                    "an assistant message holds an image",
                                    "images belong to user messages",
                                ))
                            }
                        }
                    }
                    p.input_ids.push(EOS);
                    p.labels.push(EOS);
                    p.image_token_mask.push(false);
                }
            }
        }
        Ok(p)
    }
}

fn push_text(p: &mut Processed, text: &str, labelled: bool) {
    push_bytes(p, text.as_bytes(), labelled)
}

fn push_bytes(p: &mut Processed, bytes: &[u8], labelled: bool) {
    for &b in bytes {
        let id = b as i64 + BYTE_OFFSET;
        p.input_ids.push(id);
        p.labels.push(if labelled { id } else { IGNORE });
        p.image_token_mask.push(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(role: Speaker, s: &str) -> Message {
        Message { role, content: vec![Part::Text { text: s.into() }] }
    }

    #[test]
    fn labels_cover_the_answer_and_eos() {
        let proc = ToyProcessor::new(32, 16, &ModelOptions::default()).unwrap();
        let p = proc.process(&[text(Speaker::User, "Hi"), text(Speaker::Assistant, "ok")]).unwrap();
        let (h, i, nl, o, k) = (b'H' as i64 + 2, b'i' as i64 + 2, b'\n' as i64 + 2, b'o' as i64 + 2, b'k' as i64 + 2);
        assert_eq!(p.input_ids, vec![BOS, h, i, nl, o, k, EOS]);
        assert_eq!(p.labels, vec![IGNORE, IGNORE, IGNORE, IGNORE, o, k, EOS]);
        assert_eq!(p.n_images, 0);
    }

    #[test]
    fn a_user_turn_alone_is_a_prompt() {
        let proc = ToyProcessor::new(32, 16, &ModelOptions::default()).unwrap();
        let p = proc.process(&[text(Speaker::User, "Hi")]).unwrap();
        assert_eq!(p.input_ids.last(), Some(&(b'\n' as i64 + 2)));
        assert!(p.labels.iter().all(|&l| l == IGNORE));
    }

    #[test]
    fn unknown_options_are_refused() {
        let options = ModelOptions::from_json(r#"{"size": 64}"#).unwrap();
        let err = ToyProcessor::new(32, 16, &options).unwrap_err().to_string();
        assert!(err.contains("unknown option(s) size") && err.contains("resample"), "{err}");
    }
}
