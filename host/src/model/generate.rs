//! Greedy decoding with the plugin's key/value cache, and the text side of it:
//! stop tokens and detokenising from the checkpoint's files, the prompt of a
//! one-turn request.

use super::batch::{collate, BatchTensors, IGNORE_INDEX};
use super::{HostModel, PreparedSample};
use anyhow::Result;
use serde::Serialize;
use std::path::Path;
use tch::{Kind, Tensor};
use tokenizers::Tokenizer;
use vlmhost_plugin_api::sample::{Message, Part, Sample, Speaker};

/// The ids that end generation, as transformers' `generate` takes them:
/// `generation_config.json`'s `eos_token_id` (a number or a list), else
/// `config.json`'s (top level, then `text_config`).
pub fn stop_tokens(model_dir: &Path) -> Vec<i64> {
    let read = |name: &str| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(model_dir.join(name)).ok()?).ok()
    };
    let ids = |v: &serde_json::Value| -> Option<Vec<i64>> {
        match v.get("eos_token_id")? {
            serde_json::Value::Number(n) => n.as_i64().map(|n| vec![n]),
            serde_json::Value::Array(a) => Some(a.iter().filter_map(|x| x.as_i64()).collect()),
            _ => None,
        }
    };
    read("generation_config.json")
        .as_ref()
        .and_then(ids)
        .or_else(|| {
            let c = read("config.json")?;
            ids(&c).or_else(|| c.get("text_config").and_then(ids))
        })
        .unwrap_or_default()
}

/// Say so when the checkpoint names no end-of-sequence token: generation
/// then always runs to `max_new_tokens`.
pub fn warn_without_stop_tokens(model_dir: &Path, stop: &[i64]) {
    if stop.is_empty() {
        eprintln!(
            "warning: neither {} nor config.json names an eos_token_id: generation runs to --max-new-tokens",
            model_dir.join("generation_config.json").display()
        );
    }
}

/// Token ids to text with the checkpoint's `tokenizer.json` (special tokens
/// left out), for streaming and for the metrics.
pub struct Detokenizer {
    tokenizer: Tokenizer,
}

impl Detokenizer {
    pub fn from_dir(model_dir: &Path) -> Result<Self> {
        let path = model_dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| anyhow::anyhow!("{}: {e} (generation needs the checkpoint's tokenizer.json)", path.display()))?;
        Ok(Detokenizer { tokenizer })
    }

    /// Ids the tokenizer does not know (a model's vocabulary may be larger
    /// than its tokenizer's) decode to nothing.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        self.decode_ids(ids, true)
    }

    /// As [`Detokenizer::decode`], special tokens (a template's markers) included.
    pub fn decode_with_special(&self, ids: &[i64]) -> Result<String> {
        self.decode_ids(ids, false)
    }

    fn decode_ids(&self, ids: &[i64], skip_special: bool) -> Result<String> {
        let ids: Vec<u32> =
            ids.iter().map(|&i| i as u32).filter(|&i| self.tokenizer.id_to_token(i).is_some()).collect();
        self.tokenizer.decode(&ids, skip_special).map_err(|e| anyhow::anyhow!("decoding tokens: {e}"))
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// A stop token was produced (it is included in the tokens).
    Eos,
    /// `max_new_tokens` were produced.
    MaxNewTokens,
}

/// Greedy decoding from a prepared prompt (batch of one), `on_token` called
/// with each new token as it comes. Returns the new tokens (a final stop
/// token included) and why it stopped. Equal, token for token, to
/// transformers' `generate(do_sample=False)`.
pub fn greedy(
    model: &HostModel,
    prompt: &PreparedSample,
    max_new_tokens: usize,
    stop: &[i64],
    mut on_token: impl FnMut(i64) -> Result<()>,
) -> Result<(Vec<i64>, StopReason)> {
    let _g = tch::no_grad_guard();
    let device = model.device();
    let mut batch = collate(&[prompt], 0, device)?;
    let mut cache: Vec<Tensor> = Vec::new();
    let mut tokens = Vec::new();
    let mut total = prompt.input_ids.len() as i64;
    while tokens.len() < max_new_tokens {
        let (logits, next_cache) =
            model.autocast(|| model.forward_cached(&batch, &cache))?;
        cache = next_cache;
        let last = logits.f_get(0)?.f_get(-1)?;
        let next = last.f_to_kind(Kind::Float)?.f_argmax(0, false)?.int64_value(&[]);
        tokens.push(next);
        on_token(next)?;
        if stop.contains(&next) {
            return Ok((tokens, StopReason::Eos));
        }
        total += 1;
        batch = BatchTensors {
            input_ids: Tensor::from_slice(&[next]).view([1, 1]).to_device(device),
            attention_mask: Tensor::ones([1, total], (Kind::Int64, device)),
            labels: Tensor::from_slice(&[IGNORE_INDEX]).view([1, 1]).to_device(device),
            tensors: Vec::new(),
        };
    }
    Ok((tokens, StopReason::MaxNewTokens))
}

/// The prompt of a one-turn request: the user's image (if any), then the text.
pub fn prompt_sample(image: Option<&Path>, text: &str) -> Sample {
    let mut content = Vec::new();
    if let Some(path) = image {
        content.push(Part::Image { path: path.to_path_buf() });
    }
    content.push(Part::Text { text: text.to_owned() });
    Sample { messages: vec![Message { role: Speaker::User, content }] }
}
