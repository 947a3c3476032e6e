//! Qwen2-VL preprocessing: the [`Qwen2VlProcessor`] of a model folder and what
//! it makes of a conversation. Its parts: [`image`] (smart resize, patches),
//! [`prompt`] (the default ChatML template), [`labels`] (which conversations train).
//!
//! The chat template is the checkpoint's (`chat_template.jinja`, `chat_template.json`,
//! `tokenizer_config.json`) or the user's (processor option `chat_template`), rendered by
//! `vlmhost_plugin_sdk::chat` (minijinja, as transformers renders it; answers by its
//! `{% generation %}` blocks or, as for the official Qwen2-VL-Instruct template, by the prefix
//! rule; each closed by `<|im_end|>`); a checkpoint without one gets [`render_chat`].
//!
//! Mirrors transformers 5.23 with the PIL image-processor backend, which is what
//! `AutoImageProcessor` selects when torchvision is not installed (this project's
//! reference environment): `image_processing_backends.py` `PilBackend`,
//! `image_transforms.py`, `image_utils.load_image` through the shared
//! `vlmhost-imaging` crate (a bit-exact port of Pillow 13's resampling);
//! `models/qwen2_vl/processing_qwen2_vl.py` (`replace_image_token`: each
//! `<|image_pad|>` becomes `t * h * w / merge^2` copies); labels on each
//! assistant answer and its `<|im_end|>`, as `apply_chat_template`'s assistant
//! mask (`processing_utils._adjust_assistant_masks_indices`: tokens overlapping
//! the span).
//!
//! Nothing here depends on libtorch.

pub mod image;
pub mod labels;
pub mod prompt;

use std::path::Path;
use tokenizers::Tokenizer;
use vlmhost_imaging::load_image;
use vlmhost_plugin_api::sample::Message;
use vlmhost_plugin_sdk::chat::{self, ChatTemplate};
use vlmhost_plugin_sdk::labels::{expand_placeholders, is_prompt, LabelledIds, RenderedChat};
use vlmhost_plugin_sdk::tokens::{special_token, tokenizer_config, Tokens};

pub use image::{smart_resize, ImageConfig, PixelOptions, ProcessedImage, DEFAULT_MAX_PIXELS};
pub use prompt::{render_chat, DEFAULT_SYSTEM, IMAGE_PAD, IM_END, IM_START, VISION_END, VISION_START};
pub use vlmhost_plugin_sdk::{ProcessorError, IGNORE_INDEX};

use vlmhost_plugin_sdk::error::Result;

/// Model inputs of one sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Processed {
    /// Labelled: the answer tokens and their `<|im_end|>`.
    pub ids: LabelledIds,
    /// `[patches, C*T*P*P]` of all images, in order.
    pub pixel_values: Vec<f32>,
    /// `image_grid_thw`, one (t, h, w) per image.
    pub grids: Vec<[i64; 3]>,
}

/// Qwen2-VL processor: image processor + chat template + tokenizer + labels.
pub struct Qwen2VlProcessor {
    pub image_config: ImageConfig,
    tokens: Tokens,
    pub image_token_id: i64,
    pub vision_start_id: i64,
    pub vision_end_id: i64,
    pub pad_token_id: Option<i64>,
    /// The chat template (the user's or the checkpoint's); `None`: [`render_chat`].
    pub template: Option<ChatTemplate>,
}

impl Qwen2VlProcessor {
    /// Loads the processor of a model folder: the image processor config (see
    /// [`ImageConfig::from_dir`]), `tokenizer.json`, the pad token of `tokenizer_config.json`
    /// and the checkpoint's chat template.
    pub fn from_dir(dir: &Path, options: PixelOptions) -> Result<Self> {
        Self::from_dir_with(dir, options, None)
    }

    /// [`from_dir`](Self::from_dir), with the user's chat template file (processor option
    /// `chat_template`) instead of the checkpoint's when given.
    pub fn from_dir_with(dir: &Path, options: PixelOptions, chat_template: Option<&Path>) -> Result<Self> {
        let image_config = ImageConfig::from_dir(dir, options)?;
        let tokens = Tokens::from_dir(dir)?;
        let id = |token: &str| tokens.id(token, "Qwen2-VL's template");
        id(IM_START)?;
        id(IM_END)?;
        let (image_token_id, vision_start_id, vision_end_id) = (id(IMAGE_PAD)?, id(VISION_START)?, id(VISION_END)?);
        let pad = special_token(&tokenizer_config(dir)?, "pad_token");
        let pad_token_id =
            pad.as_deref().or(Some("<|endoftext|>")).and_then(|p| tokens.tokenizer.token_to_id(p)).map(i64::from);
        let template = chat::load_template(dir, chat_template)?;
        Ok(Qwen2VlProcessor { image_config, tokens, image_token_id, vision_start_id, vision_end_id, pad_token_id, template })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokens.tokenizer
    }

    /// Renders a conversation with the chat template (see [`chat::render`]: answers by its
    /// `{% generation %}` blocks or the prefix rule, each closed by `<|im_end|>`), or without one
    /// by [`render_chat`]; a prompt (ending with the user's turn) gets the generation prompt.
    pub fn render(&self, messages: &[Message]) -> Result<RenderedChat> {
        match &self.template {
            Some(template) => chat::render(template, messages, is_prompt(messages), IM_END),
            None => Ok(render_chat(messages, is_prompt(messages))),
        }
    }

    /// Processes one conversation. A conversation that ends with a user
    /// message is a prompt: it gets the generation prompt and needs no answer.
    pub fn process(&self, messages: &[Message]) -> Result<Processed> {
        let prompt = is_prompt(messages);
        labels::check(messages, !prompt)?;
        let chat = self.render(messages)?;
        // Every image takes one `<|image_pad|>` of the rendered text, in order.
        let placeholders = chat.text.matches(IMAGE_PAD).count();
        if placeholders != chat.images.len() {
            return Err(ProcessorError::sample(format!(
                "the chat template wrote {placeholders} {IMAGE_PAD:?} for {} image(s): each image part must render exactly one",
                chat.images.len()
            )));
        }
        let mut pixel_values = Vec::new();
        let mut grids = Vec::new();
        let mut replacements = Vec::new();
        for path in &chat.images {
            let p = self.image_config.preprocess(&load_image(path)?, path)?;
            replacements.push(IMAGE_PAD.repeat(self.image_config.num_tokens(p.grid)));
            pixel_values.extend_from_slice(&p.patches);
            grids.push(p.grid);
        }
        let (text, spans) = expand_placeholders(&chat.text, IMAGE_PAD, &replacements, &chat.generation_spans);
        let (ids, offsets) = self.tokens.encode_with_offsets(&text, true)?;
        Ok(Processed { ids: LabelledIds::from_spans(&text, &spans, ids, &offsets), pixel_values, grids })
    }
}
