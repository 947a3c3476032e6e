//! Greedy decoding with the plugin's key/value cache, the text side of it
//! (stop tokens and detokenising from the checkpoint's files), and the OCR
//! metrics `vlmhost eval --generate` reports.

use crate::model::{collate, BatchTensors, HostModel, PreparedSample};
use anyhow::{bail, Context, Result};
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
        let ids: Vec<u32> =
            ids.iter().map(|&i| i as u32).filter(|&i| self.tokenizer.id_to_token(i).is_some()).collect();
        self.tokenizer.decode(&ids, true).map_err(|e| anyhow::anyhow!("decoding tokens: {e}"))
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
    let device = model.device;
    let mut batch = collate(&[prompt], 0, device)?;
    let mut cache: Vec<Tensor> = Vec::new();
    let mut tokens = Vec::new();
    let mut total = prompt.input_ids.len() as i64;
    while tokens.len() < max_new_tokens {
        let (logits, next_cache) =
            crate::autocast::bf16_on_cuda(device, || model.forward_cached(&batch, &cache))?;
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
            labels: Tensor::from_slice(&[-100i64]).view([1, 1]).to_device(device),
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

/// Split a training sample into its prompt (everything before the last
/// assistant message) and that message's text, the reference answer.
pub fn split_last_answer(sample: &Sample) -> Option<(Sample, String)> {
    let last = sample.messages.iter().rposition(|m| m.role == Speaker::Assistant)?;
    let answer: Vec<&str> = sample.messages[last]
        .content
        .iter()
        .filter_map(|p| match p {
            Part::Text { text } => Some(text.as_str()),
            Part::Image { .. } => None,
        })
        .collect();
    let prompt = Sample { messages: sample.messages[..last].to_vec() };
    // A prompt to answer ends with the user's turn.
    if prompt.messages.last().is_none_or(|m| m.role != Speaker::User) {
        return None;
    }
    // The processors join an answer's text parts with nothing between them.
    Some((prompt, answer.concat()))
}

/// Levenshtein distance between two sequences.
pub fn edit_distance<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, x) in a.iter().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, y) in b.iter().enumerate() {
            let next = (diag + usize::from(x != y)).min(row[j] + 1).min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// OCR scores of one answer against its reference. Both are compared after
/// trimming; CER counts Unicode scalar values, WER whitespace-separated words.
#[derive(Debug, Clone, Serialize)]
pub struct OcrScore {
    pub index: usize,
    pub reference: String,
    pub generated: String,
    pub char_errors: usize,
    pub chars: usize,
    pub word_errors: usize,
    pub words: usize,
    pub exact_match: bool,
    pub new_tokens: usize,
    pub stopped: StopReason,
}

impl OcrScore {
    pub fn new(index: usize, reference: &str, generated: &str, new_tokens: usize, stopped: StopReason) -> Self {
        let (r, g) = (reference.trim(), generated.trim());
        let rc: Vec<char> = r.chars().collect();
        let gc: Vec<char> = g.chars().collect();
        let rw: Vec<&str> = r.split_whitespace().collect();
        let gw: Vec<&str> = g.split_whitespace().collect();
        OcrScore {
            index,
            reference: r.to_owned(),
            generated: g.to_owned(),
            char_errors: edit_distance(&rc, &gc),
            chars: rc.len(),
            word_errors: edit_distance(&rw, &gw),
            words: rw.len(),
            exact_match: r == g,
            new_tokens,
            stopped,
        }
    }
}

/// Corpus-level scores: errors summed over samples, divided by the
/// reference's length summed (as jiwer computes CER and WER).
#[derive(Debug, Clone, Serialize)]
pub struct OcrMetrics {
    pub cer: f64,
    pub wer: f64,
    pub exact_match: f64,
    pub samples: usize,
}

impl OcrMetrics {
    pub fn of(scores: &[OcrScore]) -> OcrMetrics {
        let sum = |f: fn(&OcrScore) -> usize| scores.iter().map(f).sum::<usize>() as f64;
        let ratio = |e: f64, n: f64| if n > 0.0 { e / n } else if e > 0.0 { 1.0 } else { 0.0 };
        OcrMetrics {
            cer: ratio(sum(|s| s.char_errors), sum(|s| s.chars)),
            wer: ratio(sum(|s| s.word_errors), sum(|s| s.words)),
            exact_match: if scores.is_empty() { 0.0 } else { scores.iter().filter(|s| s.exact_match).count() as f64 / scores.len() as f64 },
            samples: scores.len(),
        }
    }
}

/// Generate an answer for every record's prompt and score it against the
/// record's last assistant message.
pub fn evaluate_generation(
    model: &HostModel,
    records: &[crate::dataset::Record],
    max_new_tokens: usize,
) -> Result<(OcrMetrics, Vec<OcrScore>)> {
    let detok = Detokenizer::from_dir(&model.model_dir)?;
    let stop = stop_tokens(&model.model_dir);
    warn_without_stop_tokens(&model.model_dir, &stop);
    let mut scores = Vec::new();
    for r in records {
        let Some((prompt, reference)) = split_last_answer(&r.sample) else {
            bail!(
                "sample {} ({}): no assistant answer right after a user turn to compare a generated answer with",
                r.origin.index,
                r.origin
            );
        };
        let json = serde_json::to_string(&prompt)?;
        let prepared = model
            .prepare(&json)
            .map_err(|e| anyhow::anyhow!("sample {}: preparing the prompt: {e}", r.origin.index))?;
        let (tokens, stopped) = greedy(model, &prepared, max_new_tokens, &stop, |_| Ok(()))
            .with_context(|| format!("sample {}: generating", r.origin.index))?;
        let text = detok.decode(&tokens)?;
        scores.push(OcrScore::new(r.origin.index, &reference, &text, tokens.len(), stopped));
    }
    Ok((OcrMetrics::of(&scores), scores))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_insertions_deletions_substitutions() {
        let c = |s: &str| s.chars().collect::<Vec<_>>();
        assert_eq!(edit_distance(&c("kitten"), &c("sitting")), 3);
        assert_eq!(edit_distance(&c(""), &c("abc")), 3);
        assert_eq!(edit_distance(&c("abc"), &c("abc")), 0);
        assert_eq!(edit_distance(&["a", "b"], &["b"]), 1);
    }

    #[test]
    fn metrics_are_corpus_level() {
        let a = OcrScore::new(0, "HELLO 42", "HELLO 43", 3, StopReason::Eos);
        let b = OcrScore::new(1, "abc", "abc", 2, StopReason::Eos);
        assert_eq!((a.char_errors, a.chars, a.word_errors, a.words), (1, 8, 1, 2));
        let m = OcrMetrics::of(&[a, b]);
        assert!((m.cer - 1.0 / 11.0).abs() < 1e-12);
        assert!((m.wer - 1.0 / 3.0).abs() < 1e-12);
        assert!((m.exact_match - 0.5).abs() < 1e-12);
    }

    #[test]
    fn the_last_answer_is_split_off() {
        let s = Sample {
            messages: vec![
                Message { role: Speaker::User, content: vec![Part::Text { text: "q".into() }] },
                Message { role: Speaker::Assistant, content: vec![Part::Text { text: "a".into() }] },
            ],
        };
        let (p, a) = split_last_answer(&s).unwrap();
        assert_eq!(p.messages.len(), 1);
        assert_eq!(a, "a");
    }
}
