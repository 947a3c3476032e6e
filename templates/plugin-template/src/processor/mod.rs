//! Samples to model inputs: the image processor, the tokenizer and the chat
//! template, with the labels. This is the part of a plugin that parity tests
//! check first (ids and labels identical to the reference processor's).
//!
//! * [`image`]: images to `pixel_values [3, 32, 32]` in [-1, 1].
//! * [`tokens`]: the byte tokenizer.
//! * **Chat template**: a conversation is rendered by the checkpoint's Jinja
//!   chat template (`chat_template.jinja`, which `vlmhost init` writes from
//!   `assets/chat_template.jinja`; `chat_template.json` or
//!   `tokenizer_config.json`'s `chat_template` also work), or by the user's
//!   (processor option `chat_template`: `chat_template:` in the training
//!   config, `--chat-template FILE`), with the engine every vlmhost family
//!   uses, `vlmhost-chat-template`. A checkpoint without a template gets
//!   `assets/chat_template.jinja`. The default layout: `<bos>`, then every turn
//!   in order: a user (or system) turn is its parts (text as bytes, each image
//!   as `<image>`) followed by `\n`; an assistant turn is its text followed by
//!   `<eos>`. A sample ending with a user turn is a generation prompt (what
//!   `vlmhost generate` sends): it ends with that `\n`, where the answer starts.
//! * **Labels** (docs/plugin-guide.md, "Chat templates and labels"): the
//!   tokens overlapping the output of the template's `{% generation %}` blocks
//!   (transformers' `return_assistant_tokens_mask` rule) or, for a template
//!   without them, each answer found by the prefix rule; each answer closed by
//!   `<eos>` (inserted when the template does not write it); everything else
//!   is -100.
//! * **Images in the text**: each `<image>` the template writes is expanded
//!   into the image's `num_patches` image tokens (never labelled); the
//!   template must write one per image part, in order.

pub mod image;
pub mod tokens;

use image::ImageProcessor;
use std::path::{Path, PathBuf};
use tokens::{BOS_TEXT, EOS_TEXT};
use vlmhost_chat_template::{token_mask, ChatTemplate, ChatTemplateError, RenderOptions, Value};
use vlmhost_plugin_api::sample::{Message, Part, Speaker};
use vlmhost_plugin_api::{ModelOptions, PluginError};

pub use tokens::{BOS, BYTE_OFFSET, EOS, IMAGE_TOKEN, MIN_VOCAB};

/// Labels of tokens the loss ignores (transformers' convention).
pub const IGNORE: i64 = -100;

/// The processor option holding the user's chat template file (the host
/// passes `chat_template:` and `--chat-template FILE` under this key).
pub const CHAT_TEMPLATE_OPTION: &str = "chat_template";

/// The processor options this family accepts (`--processor KEY=VALUE`, or a
/// checkpoint's `vlmhost.json`).
pub const OPTION_KEYS: &[&str] = &["resample", CHAT_TEMPLATE_OPTION];

/// The template of a checkpoint without one, and the one `vlmhost init` writes.
pub const DEFAULT_CHAT_TEMPLATE: &str = include_str!("../../assets/chat_template.jinja");

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
#[derive(Debug)]
pub struct ToyProcessor {
    pub image: ImageProcessor,
    pub tokens_per_image: usize,
    pub template: ChatTemplate,
}

impl ToyProcessor {
    /// The processor of the checkpoint folder `dir`, for `image_size` images
    /// cut into `tokens_per_image` patches, with the user's options. Unknown
    /// keys are refused (with the list of known ones), never ignored.
    pub fn new(dir: &Path, image_size: usize, tokens_per_image: usize, options: &ModelOptions) -> Result<Self, PluginError> {
        options.check_keys(OPTION_KEYS)?;
        let image = ImageProcessor::new(image_size, options)?;
        let user_template = options.string(CHAT_TEMPLATE_OPTION).map(PathBuf::from);
        let template = match ChatTemplate::resolve(dir, user_template.as_deref()).map_err(template_error)? {
            Some(template) => template,
            None => ChatTemplate::from_source(DEFAULT_CHAT_TEMPLATE, "toy_vlm default chat template").map_err(template_error)?,
        };
        // The byte tokenizer's special tokens, for a folder whose tokenizer_config.json does not name them.
        let mut special = template.special_tokens().clone();
        special.entry("bos_token".into()).or_insert_with(|| BOS_TEXT.into());
        special.entry("eos_token".into()).or_insert_with(|| EOS_TEXT.into());
        let template = template.with_special_tokens(special);
        Ok(ToyProcessor { image, tokens_per_image, template })
    }

    /// Render a conversation and label it (see the module documentation).
    pub fn process(&self, messages: &[Message]) -> Result<Processed, PluginError> {
        let images = image_paths(messages)?;
        let prompt = messages.last().is_some_and(|m| m.role != Speaker::Assistant);
        let values = message_values(messages);
        let mut rendered =
            self.template.answer_spans(&values, &RenderOptions::generation_prompt(prompt)).map_err(template_error)?;
        rendered.close_answers(EOS_TEXT);
        let tokens = tokens::encode(&rendered.text);
        let offsets: Vec<(usize, usize)> = tokens.iter().map(|t| (t.chars.start, t.chars.end)).collect();
        let answer = token_mask(&rendered.char_spans(), &offsets);

        let placeholders = tokens.iter().filter(|t| t.id == IMAGE_TOKEN).count();
        if placeholders != images.len() {
            return Err(PluginError::invalid_with_hint(
                "toy_vlm processor",
                format!(
                    "the chat template {} wrote {placeholders} <image> placeholder(s) for the sample's {} image(s)",
                    self.template.name(),
                    images.len()
                ),
                "the template must write one <image> for each image part, in order",
            ));
        }
        let mut p = Processed {
            input_ids: Vec::with_capacity(tokens.len()),
            labels: Vec::with_capacity(tokens.len()),
            image_token_mask: Vec::with_capacity(tokens.len()),
            pixel_values: Vec::new(),
            n_images: images.len(),
        };
        for (token, &learnt) in tokens.iter().zip(&answer) {
            let (id, n) = if token.id == IMAGE_TOKEN { (IMAGE_TOKEN, self.tokens_per_image) } else { (token.id, 1) };
            let label = if learnt == 1 && id != IMAGE_TOKEN { id } else { IGNORE };
            p.input_ids.extend(std::iter::repeat_n(id, n));
            p.labels.extend(std::iter::repeat_n(label, n));
            p.image_token_mask.extend(std::iter::repeat_n(id == IMAGE_TOKEN, n));
        }
        for path in images {
            p.pixel_values.extend(self.image.pixels(path)?);
        }
        Ok(p)
    }
}

/// The image files of a conversation, in order; only user and system
/// messages may hold images.
fn image_paths(messages: &[Message]) -> Result<Vec<&Path>, PluginError> {
    if messages.is_empty() {
        return Err(PluginError::invalid("sample", "the conversation has no message"));
    }
    let mut paths = Vec::new();
    for (index, message) in messages.iter().enumerate() {
        for part in &message.content {
            if let Part::Image { path } = part {
                if message.role == Speaker::Assistant {
                    return Err(PluginError::invalid_with_hint(
                        format!("message {index}"),
                        "an assistant message holds an image",
                        "images belong to user messages",
                    ));
                }
                paths.push(path.as_path());
            }
        }
    }
    Ok(paths)
}

/// A conversation as chat templates see it (transformers' messages): `role`,
/// and `content` as typed parts, `{"type": "text", "text": ...}` and
/// `{"type": "image", "path": ...}`, keys in that order.
fn message_values(messages: &[Message]) -> Vec<Value> {
    // Through JSON text, which keeps the fields' order (a serde_json::Value would sort them).
    let json = serde_json::to_string(messages).expect("a conversation serialises");
    serde_json::from_str(&json).expect("JSON text is a template value")
}

/// A chat-template error (it names the template, and the line where the
/// engine knows it) as the ABI's error.
fn template_error(e: ChatTemplateError) -> PluginError {
    PluginError::invalid("toy_vlm processor", e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(role: Speaker, s: &str) -> Message {
        Message { role, content: vec![Part::Text { text: s.into() }] }
    }

    /// The processor of a folder without a chat template (the default applies).
    fn processor(options: &ModelOptions) -> Result<ToyProcessor, PluginError> {
        ToyProcessor::new(Path::new("/nonexistent/toy_vlm"), 32, 16, options)
    }

    #[test]
    fn labels_cover_the_answer_and_eos() {
        let proc = processor(&ModelOptions::default()).unwrap();
        let p = proc.process(&[text(Speaker::User, "Hi"), text(Speaker::Assistant, "ok")]).unwrap();
        let (h, i, nl, o, k) = (b'H' as i64 + 2, b'i' as i64 + 2, b'\n' as i64 + 2, b'o' as i64 + 2, b'k' as i64 + 2);
        assert_eq!(p.input_ids, vec![BOS, h, i, nl, o, k, EOS]);
        assert_eq!(p.labels, vec![IGNORE, IGNORE, IGNORE, IGNORE, o, k, EOS]);
        assert_eq!(p.n_images, 0);
    }

    #[test]
    fn a_user_turn_alone_is_a_prompt() {
        let proc = processor(&ModelOptions::default()).unwrap();
        let p = proc.process(&[text(Speaker::User, "Hi")]).unwrap();
        assert_eq!(p.input_ids.last(), Some(&(b'\n' as i64 + 2)));
        assert!(p.labels.iter().all(|&l| l == IGNORE));
    }

    #[test]
    fn unknown_options_are_refused() {
        let options = ModelOptions::from_json(r#"{"size": 64}"#).unwrap();
        let err = processor(&options).unwrap_err().to_string();
        assert!(err.contains("unknown option(s) size") && err.contains("resample"), "{err}");
    }
}
