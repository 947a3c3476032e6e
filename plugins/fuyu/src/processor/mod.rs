//! Fuyu preprocessing as transformers 5.23's `FuyuProcessor` with the PIL image
//! processor (`FuyuImageProcessorPil`, what transformers uses when torchvision is
//! not installed, as in this project's reference environment), plus the answer
//! and labels, which transformers' processor does not define. Its parts:
//! [`image`] (the image processor), [`prompt`] (what a sample is, the layout's
//! tokens); here the tokenisation in `FuyuProcessor.__call__`: the image part
//! and the prompt part are tokenised separately without special tokens, and
//! the first token of the image part (the `▁` that fuyu-8b's SentencePiece
//! normaliser puts in front) is dropped.
//!
//! The answer (vlmhost's extension): tokenised on its own without special
//! tokens, followed by `|ENDOFTEXT|`; labels are the answer and that token,
//! -100 everywhere before.

pub mod image;
pub mod prompt;

use std::path::Path;
use tokenizers::Tokenizer;
use vlmhost_plugin_sdk::labels::LabelledIds;
use vlmhost_plugin_sdk::tokens::Tokens;

pub use image::{ImageConfig, ProcessedImage};
pub use prompt::{FuyuSample, BOA_TOKEN, BOS_TOKEN, END_TOKEN, IMAGE_TOKEN, NEWLINE_TOKEN};
pub use vlmhost_imaging::{load_image, resize, ResampleFilter, RgbImage};
pub use vlmhost_plugin_sdk::ProcessorError;

use vlmhost_plugin_sdk::error::Result;

/// One sample turned into inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Processed {
    /// Labelled: the answer and `|ENDOFTEXT|`.
    pub ids: LabelledIds,
    /// True on the `|SPEAKER|` and `|NEWLINE|` tokens.
    pub image_token_mask: Vec<bool>,
    pub image: ProcessedImage,
    /// Tokens of the image part, `<s>`, the prompt and `<0x04>` (unlabelled).
    pub prompt_len: usize,
}

/// Image processor + tokenizer + the special token ids.
pub struct FuyuProcessor {
    pub image_config: ImageConfig,
    tokens: Tokens,
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
            image_config
                .check_size()
                .map_err(|reason| ProcessorError::Option { key: "target_height/target_width".into(), reason })?;
        }
        let tokens = Tokens::from_dir(dir)?;
        let id = |token: &'static str| tokens.id(token, "FuyuProcessor");
        let p = FuyuProcessor {
            image_token_id: id(IMAGE_TOKEN)?,
            newline_id: id(NEWLINE_TOKEN)?,
            bos_id: id(BOS_TOKEN)?,
            boa_id: id(BOA_TOKEN)?,
            end_id: id(END_TOKEN)?,
            image_config,
            tokens,
        };
        // Fail at open, not at the first sample, when the tokenizer is not fuyu-like.
        p.image_ids(1, 1)?;
        Ok(p)
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokens.tokenizer
    }

    fn encode(&self, text: &str) -> Result<Vec<i64>> {
        self.tokens.encode(text, false)
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
            let shown: Vec<String> =
                ids.iter().take(4).map(|&i| self.tokenizer().id_to_token(i as u32).unwrap_or_default()).collect();
            return Err(ProcessorError::sample(format!(
                "the tokenizer does not tokenise the image placeholders as FuyuProcessor expects: for {rows}x{cols} \
                 patches it gives {} tokens after the first, starting {shown:?}; expected {} (FuyuProcessor drops the \
                 first token of `|SPEAKER|...|NEWLINE|<s>`, the `▁` that fuyu-8b's normaliser puts in front; a \
                 tokenizer without it loses an image token)",
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
        let mut ids = LabelledIds::default();
        ids.push(&self.image_ids(image.rows, image.cols)?, false);
        let n_image = ids.input_ids.len() - 1;
        ids.push(&self.encode(&format!("{}{BOA_TOKEN}", sample.prompt))?, false);
        let prompt_len = ids.input_ids.len();
        if let Some(answer) = &sample.answer {
            let mut answer = self.encode(answer)?;
            answer.push(self.end_id);
            ids.push(&answer, true);
        }
        let image_token_mask = (0..ids.input_ids.len()).map(|i| i < n_image).collect();
        Ok(Processed { ids, image_token_mask, image, prompt_len })
    }
}

