//! LLaVA-1.5 preprocessing: the [`LlavaProcessor`] of a model folder and what
//! it makes of a conversation. Its parts: [`image`] (the CLIP image
//! processor), [`prompt`] (the chat template and tokenisation), [`labels`]
//! (which conversations train).
//!
//! Mirrors transformers 5.23 with the PIL image-processor backend (`CLIPImageProcessorPil`),
//! which is what transformers picks when torchvision is not installed. Files followed:
//!
//! * `transformers/image_utils.py` `load_image`: EXIF transpose, then `convert("RGB")` (alpha
//!   dropped); Pillow 13's resampling is ported in the shared `vlmhost-imaging` crate.
//! * `transformers/models/llava/processing_llava.py` `LlavaProcessor.replace_image_token`:
//!   the number of image tokens per image.
//! * `transformers/processing_utils.py` `ProcessorMixin.apply_chat_template` and
//!   `_adjust_assistant_masks_indices`: BOS handling and the assistant (label) mask.
//! * the chat template: the checkpoint's (`chat_template.jinja`, `chat_template.json`,
//!   `tokenizer_config.json`) or the user's (processor option `chat_template`), rendered by
//!   `vlmhost_plugin_sdk::chat` (minijinja, as transformers renders it), each answer closed by
//!   `</s>`; a checkpoint without one gets [`render_chat`], the llava-1.5-hf template with the
//!   answer and `</s>` inside `{% generation %}`, rendered natively (see [`prompt`]).
//!
//! Outputs are plain `Vec<f32>` / `Vec<i64>`; nothing here depends on libtorch.
//!
//! Parity: PNG inputs give bit-identical pixel values. JPEG inputs do not: the `image` crate
//! decodes with zune-jpeg, whose IDCT and chroma upsampling differ from the libjpeg-turbo inside
//! Pillow by up to about 3-4 levels of 255 before resizing.

pub mod image;
pub mod labels;
pub mod prompt;

use image::RawProcessorConfig;
use serde::Deserialize;
use std::path::Path;
use tokenizers::Tokenizer;
use vlmhost_plugin_api::sample::Message;
use vlmhost_plugin_sdk::chat::{self, ChatTemplate};
use vlmhost_plugin_sdk::files::read_json_or_default;
use vlmhost_plugin_sdk::labels::{expand_placeholders, is_prompt, LabelledIds, RenderedChat};
use vlmhost_plugin_sdk::tokens::{special_token, tokenizer_config, Tokens};

pub use image::{ImageProcessorConfig, ResizeTarget};
pub use prompt::{render_chat, tokenize, Tokenized, IMAGE_PLACEHOLDER};
pub use vlmhost_imaging::{center_crop, expand_to_square, load_image, resize, ResampleFilter, RgbImage};
pub use vlmhost_plugin_api::sample::{Part, Speaker};
pub use vlmhost_plugin_sdk::{ProcessorError, IGNORE_INDEX};

use vlmhost_plugin_sdk::error::Result;

/// Model inputs of one sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Processed {
    /// `[L]` token ids: `<s>`, then the rendered conversation with each `<image>` expanded;
    /// labelled: the answer tokens and their `</s>`.
    pub ids: LabelledIds,
    /// `[n_images, 3, H, W]` flattened, images in placeholder order.
    pub pixel_values: Vec<f32>,
    pub n_images: usize,
    /// (H, W) of each image in `pixel_values`; (0, 0) when there is no image.
    pub image_size: (usize, usize),
}

impl Processed {
    /// `[L]` attention mask of this unpadded sequence: all ones.
    pub fn attention_mask(&self) -> Vec<i64> {
        vec![1; self.ids.input_ids.len()]
    }
}

/// LLaVA-1.5 processor: image processor + chat template + tokenizer + labels.
pub struct LlavaProcessor {
    pub image_config: ImageProcessorConfig,
    tokens: Tokens,
    pub image_token: String,
    pub image_token_id: u32,
    pub patch_size: usize,
    pub vision_feature_select_strategy: String,
    pub num_additional_image_tokens: usize,
    pub bos_token: Option<String>,
    pub eos_token: String,
    /// The chat template (the user's or the checkpoint's); `None`: [`render_chat`].
    pub template: Option<ChatTemplate>,
}

/// Fallback for folders without processor_config.json: `config.json`'s vision settings.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawModelConfig {
    vision_feature_select_strategy: Option<String>,
    vision_config: Option<RawVisionConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawVisionConfig {
    patch_size: Option<usize>,
}

impl LlavaProcessor {
    /// Loads the processor of a model folder: image-processor config (see
    /// [`ImageProcessorConfig::from_dir`]), `processor_config.json` (patch size, feature
    /// strategy, extra tokens; falling back to `config.json`), `tokenizer.json` and the special
    /// tokens of `tokenizer_config.json`, and the checkpoint's chat template.
    pub fn from_dir(model_dir: &Path) -> Result<Self> {
        Self::from_dir_with(model_dir, None)
    }

    /// [`from_dir`](Self::from_dir), with the user's chat template file (processor option
    /// `chat_template`) instead of the checkpoint's when given.
    pub fn from_dir_with(model_dir: &Path, chat_template: Option<&Path>) -> Result<Self> {
        let image_config = ImageProcessorConfig::from_dir(model_dir)?;
        let processor_path = model_dir.join("processor_config.json");
        let proc_cfg: RawProcessorConfig = read_json_or_default(&processor_path)?;
        let model_cfg: RawModelConfig = read_json_or_default(&model_dir.join("config.json"))?;
        let invalid = |reason: &str| ProcessorError::ImageConfigInvalid { path: processor_path.clone(), reason: reason.into() };
        let patch_size = proc_cfg
            .patch_size
            .or_else(|| model_cfg.vision_config.as_ref().and_then(|v| v.patch_size))
            .ok_or_else(|| invalid("no `patch_size` in processor_config.json nor vision_config.patch_size in config.json"))?;
        if patch_size == 0 {
            return Err(invalid("`patch_size` is 0"));
        }
        let image_token = proc_cfg.image_token.unwrap_or_else(|| IMAGE_PLACEHOLDER.to_string());
        let tokens = Tokens::from_dir(model_dir)?;
        let image_token_id = tokens.id(&image_token, "LlavaProcessor")? as u32;
        let tok_cfg = tokenizer_config(model_dir)?;
        Ok(Self {
            image_config,
            tokens,
            image_token,
            image_token_id,
            patch_size,
            vision_feature_select_strategy: proc_cfg
                .vision_feature_select_strategy
                .or(model_cfg.vision_feature_select_strategy)
                .unwrap_or_else(|| "default".to_string()),
            // transformers' LlavaProcessor defaults this to 0, but every LLaVA-1.5 checkpoint
            // pairs a CLIP tower (one CLS token) with it, and the hub processor configs say 1:
            // with 0 the `default` strategy would drop a patch token and the model would reject
            // the sample.
            num_additional_image_tokens: proc_cfg.num_additional_image_tokens.unwrap_or(1),
            // Llama's special tokens when tokenizer_config.json does not name them.
            bos_token: special_token(&tok_cfg, "bos_token").or_else(|| Some("<s>".into())),
            eos_token: special_token(&tok_cfg, "eos_token").unwrap_or_else(|| "</s>".into()),
            template: chat::load_template(model_dir, chat_template)?,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokens.tokenizer
    }

    /// Image tokens for a processed image of `height` x `width`
    /// (`LlavaProcessor.replace_image_token`): patches + additional tokens, minus the CLS token
    /// that the `default` strategy drops.
    pub fn num_image_tokens(&self, height: usize, width: usize) -> usize {
        let mut n = (height / self.patch_size) * (width / self.patch_size) + self.num_additional_image_tokens;
        if self.vision_feature_select_strategy == "default" {
            n = n.saturating_sub(1);
        }
        n
    }

    /// Renders a conversation with the chat template (see [`chat::render`]: answers by its
    /// `{% generation %}` blocks or the prefix rule, each closed by the eos token `</s>`), or
    /// without one by [`render_chat`]. A conversation that ends with a user message is a prompt
    /// to generate from: it gets the generation prompt, as
    /// `apply_chat_template(add_generation_prompt=True)` renders it.
    pub fn render(&self, messages: &[Message]) -> Result<RenderedChat> {
        match &self.template {
            Some(template) => chat::render(template, messages, is_prompt(messages), &self.eos_token),
            None => Ok(render_chat(messages, &self.eos_token, is_prompt(messages))),
        }
    }

    /// Tokenises a rendered text as `apply_chat_template` does ([`tokenize`]).
    pub fn tokenize(&self, text: &str) -> Result<Tokenized> {
        tokenize(&self.tokens, self.bos_token.as_deref(), text)
    }

    /// Processes one training conversation into model inputs.
    pub fn process(&self, messages: &[Message]) -> Result<Processed> {
        labels::check(messages)?;
        let chat = self.render(messages)?;
        // As transformers checks: every image token in the prompt takes one image. A text part
        // that itself contains `<image>` would otherwise shift all images by one.
        let placeholders = chat.text.matches(self.image_token.as_str()).count();
        if placeholders != chat.images.len() {
            return Err(ProcessorError::sample(format!(
                "{placeholders} `<image>` placeholder(s) but {} image(s): each placeholder takes exactly one image, \
                 in order, in the rendered conversation (does a text part contain `<image>`?)",
                chat.images.len()
            )));
        }
        let (pixel_values, replacements, image_size) = self.images(&chat)?;
        let (text, spans) = expand_placeholders(&chat.text, &self.image_token, &replacements, &chat.generation_spans);
        let Tokenized { ids, char_offsets } = self.tokenize(&text)?;
        Ok(Processed {
            ids: LabelledIds::from_spans(&text, &spans, ids, &char_offsets),
            pixel_values,
            n_images: chat.images.len(),
            image_size: image_size.unwrap_or((0, 0)),
        })
    }

    /// The images of a rendered chat, in placeholder order: their pixel values,
    /// the image tokens each placeholder becomes, and their common size.
    fn images(&self, chat: &RenderedChat) -> Result<(Vec<f32>, Vec<String>, Option<(usize, usize)>)> {
        let mut pixel_values = Vec::new();
        let mut replacements = Vec::with_capacity(chat.images.len());
        let mut image_size: Option<(usize, usize)> = None;
        for path in &chat.images {
            let (values, size) = self.image_config.preprocess(&load_image(path)?);
            match image_size {
                Some(first) if first != size => {
                    return Err(ProcessorError::sample(format!(
                        "images of one sample have different processed sizes ({first:?} and {size:?} as HxW): \
                         enable do_center_crop or use a fixed `size`"
                    )))
                }
                _ => image_size = Some(size),
            }
            pixel_values.extend_from_slice(&values);
            replacements.push(self.image_token.repeat(self.num_image_tokens(size.0, size.1)));
        }
        Ok((pixel_values, replacements, image_size))
    }
}
