//! DeepSeek-OCR preprocessing: the [`DeepseekOcrProcessor`] of a model folder
//! and what it makes of a conversation. Its parts: [`image`] (modes, views,
//! normalisation, token counts), [`tiles`] (`dynamic_preprocess`), [`prompt`]
//! (the "plain" format); here the token layout and the labels.
//!
//! Follows the original remote code of deepseek-ai/DeepSeek-OCR (the files and blob ids listed in
//! the shared fixture's README): `modeling_deepseekocr.py` `DeepseekOCRForCausalLM.infer`,
//! `dynamic_preprocess`, `find_closest_aspect_ratio`, `text_encode`, `load_pil_images`,
//! `BasicImageTransform`, and `conversation.py`'s "plain" template, extended to training the
//! way the shared fixture's README describes: the answer and eos follow the prompt and are the
//! only labelled tokens. The original hard-codes the tile size 640 (Gundam's `image_size`) in
//! two places (the no-tiling test and `dynamic_preprocess`'s default); here both use
//! [`ImageOptions::image_size`], which is the same for every official mode.
//!
//! Outputs are plain vectors; nothing here depends on libtorch.

pub mod image;
pub mod prompt;
pub mod tiles;

use std::path::Path;
use tokenizers::Tokenizer;
use vlmhost_imaging::RgbImage;
use vlmhost_plugin_api::sample::{Message, Speaker};
use vlmhost_plugin_sdk::files::read_value;
use vlmhost_plugin_sdk::labels::LabelledIds;
use vlmhost_plugin_sdk::tokens::Tokens;

pub use image::{image_views, normalize, num_image_tokens, round_bf16, ImageOptions, ImageViews, ProcessedImage, PAD_FILL};
pub use prompt::{python_strip, IMAGE_TOKEN};
pub use tiles::{candidate_grids, cut_tiles, find_closest_grid, tile_grid, MAX_TILES, MIN_TILES};
pub use vlmhost_plugin_sdk::{ProcessorError, IGNORE_INDEX};

use vlmhost_plugin_sdk::error::Result;

/// DeepSeek's bos / eos tokens (ids 0 and 1 in the real tokenizer).
pub const BOS_TOKEN: &str = "<｜begin▁of▁sentence｜>";
pub const EOS_TOKEN: &str = "<｜end▁of▁sentence｜>";

/// Model inputs of one conversation.
#[derive(Clone, Debug, PartialEq)]
pub struct Processed {
    /// `[L]`: bos, then the messages (image tokens in place of the images);
    /// labelled: the answer tokens and their eos.
    pub ids: LabelledIds,
    /// `[L]`: true at image tokens.
    pub images_seq_mask: Vec<bool>,
    /// In the order of the image parts.
    pub images: Vec<ProcessedImage>,
}

/// The sequence being built: ids, labels and the image-token mask, side by side.
struct Sequence<'a>(&'a mut Processed);

impl Sequence<'_> {
    fn push(&mut self, ids: &[i64], labelled: bool, image: bool) {
        self.0.ids.push(ids, labelled);
        self.0.images_seq_mask.extend(std::iter::repeat_n(image, ids.len()));
    }
}

/// DeepSeek-OCR processor: tokenizer + image options.
pub struct DeepseekOcrProcessor {
    tokens: Tokens,
    image_token_id: i64,
    bos_id: i64,
    eos_id: i64,
    options: ImageOptions,
}

impl DeepseekOcrProcessor {
    /// Reads `tokenizer.json` in `dir` (error naming the file if missing); image token = the
    /// tokenizer's "<image>" token; bos/eos = the tokenizer's "<｜begin▁of▁sentence｜>" /
    /// "<｜end▁of▁sentence｜>" if present, else config.json's bos_token_id/eos_token_id (0 and 1
    /// by default, as `text_encode` hard-codes).
    pub fn from_dir(dir: &Path, options: ImageOptions) -> Result<Self> {
        let options = options.validate()?;
        let tokens = Tokens::from_dir(dir)?;
        let image_token_id = tokens.id(IMAGE_TOKEN, "DeepSeek-OCR (it must define it as an added token)")?;
        let config_path = dir.join("config.json");
        let config = if config_path.is_file() { read_value(&config_path)? } else { serde_json::Value::Null };
        let special = |token: &str, key: &str, default: i64| match tokens.tokenizer.token_to_id(token) {
            Some(id) => id as i64,
            None => config.get(key).and_then(serde_json::Value::as_i64).unwrap_or(default),
        };
        let bos_id = special(BOS_TOKEN, "bos_token_id", 0);
        let eos_id = special(EOS_TOKEN, "eos_token_id", 1);
        Ok(Self { tokens, image_token_id, bos_id, eos_id, options })
    }

    pub fn image_token_id(&self) -> i64 {
        self.image_token_id
    }

    pub fn eos_id(&self) -> i64 {
        self.eos_id
    }

    pub fn bos_id(&self) -> i64 {
        self.bos_id
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokens.tokenizer
    }

    pub fn options(&self) -> ImageOptions {
        self.options
    }

    /// The 8-bit views of `image` with this processor's options ([`image_views`]).
    pub fn image_views(&self, image: &RgbImage) -> ImageViews {
        image_views(image, self.options)
    }

    /// One image as infer processes it, sizes from the options.
    pub fn process_image(&self, image: &RgbImage) -> ProcessedImage {
        let views = self.image_views(image);
        let tiled = !views.tiles.is_empty();
        let mut tiles = Vec::new();
        for t in &views.tiles {
            tiles.extend(normalize(t));
        }
        ProcessedImage {
            global: normalize(&views.global),
            global_size: views.global.width,
            tiles,
            tile_size: self.options.image_size,
            n_tiles: views.tiles.len(),
            grid: views.grid,
            num_tokens: num_image_tokens(self.options, tiled.then_some(views.grid)),
        }
    }

    /// Token ids of a text piece, without special tokens (`text_encode(..., bos=False)`).
    fn encode(&self, text: &str, index: usize) -> Result<Vec<i64>> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        self.tokens.encode(text, false).map_err(|e| ProcessorError::Tokenize { message: format!("message {index}: {e}") })
    }

    /// One conversation through the "plain" template ([`prompt`]): bos; each user message's
    /// text pieces tokenized without special tokens and its images replaced by their image
    /// tokens; each answer tokenized, then eos, and labelled. Messages follow each other with
    /// no separator. A conversation without an answer is a prompt (nothing labelled).
    pub fn process(&self, messages: &[Message]) -> Result<Processed> {
        let mut out = Processed { ids: LabelledIds::default(), images_seq_mask: Vec::new(), images: Vec::new() };
        let mut seq = Sequence(&mut out);
        seq.push(&[self.bos_id], false, false);
        for (index, m) in messages.iter().enumerate() {
            match m.role {
                Speaker::System => {
                    return Err(ProcessorError::sample(format!(
                        "message {index} is a system message, but DeepSeek-OCR's \"plain\" template has no system turn: \
                         put its text at the start of the first user message"
                    )))
                }
                Speaker::Assistant => {
                    let mut ids = self.encode(&prompt::answer_text(index, m)?, index)?;
                    ids.push(self.eos_id);
                    seq.push(&ids, true, false);
                }
                Speaker::User => self.user_turn(index, m, &mut seq)?,
            }
        }
        Ok(out)
    }

    /// User message `index`: its text pieces and, between them, its images' tokens.
    fn user_turn(&self, index: usize, m: &Message, seq: &mut Sequence<'_>) -> Result<()> {
        let (pieces, images) = prompt::user_pieces(index, m)?;
        seq.push(&self.encode(&pieces[0], index)?, false, false);
        for ((part, path), piece) in images.into_iter().zip(&pieces[1..]) {
            let img = vlmhost_imaging::load_image(&path)
                .map_err(|source| ProcessorError::sample(format!("message {index}, part {part}: {source}")))?;
            let processed = self.process_image(&img);
            seq.push(&vec![self.image_token_id; processed.num_tokens], false, true);
            seq.0.images.push(processed);
            seq.push(&self.encode(piece, index)?, false, false);
        }
        Ok(())
    }
}
