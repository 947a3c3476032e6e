//! Evaluation of a model on records: the loss over every supervised token and
//! each sample's, one sample at a time (no padding effects); and, when asked
//! for, each answer generated greedily from the sample's prompt and scored
//! against its reference ([`crate::report::ocr`]). `vlmhost eval` and a
//! run's validation share it.

use super::dataset::Record;
use super::micro_batch;
use crate::model::generate::{greedy, stop_tokens, warn_without_stop_tokens, Detokenizer};
use crate::model::HostModel;
use crate::report::ocr::{OcrMetrics, OcrScore};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use vlmhost_plugin_api::sample::{Part, Sample, Speaker};

/// One sample's loss: the mean over its supervised tokens.
#[derive(Debug, Clone, Serialize)]
pub struct SampleLoss {
    pub index: usize,
    pub loss: f64,
    pub tokens: i64,
}

/// Evaluate `records` one sample at a time: the mean loss over all
/// supervised tokens, and each sample's own.
pub fn evaluate(model: &HostModel, records: &[Record]) -> Result<(f64, Vec<SampleLoss>)> {
    let _g = tch::no_grad_guard();
    let mut total = 0f64;
    let mut count = 0i64;
    let mut per = Vec::with_capacity(records.len());
    for r in records {
        let samples = micro_batch::prepare(model, &[r])?;
        let l = micro_batch::loss(model, &samples, false)?;
        let (sum, n) = (l.sum.double_value(&[]), l.supervised);
        total += sum;
        count += n;
        per.push(SampleLoss { index: r.origin.index, loss: if n > 0 { sum / n as f64 } else { f64::NAN }, tokens: n });
    }
    Ok((if count > 0 { total / count as f64 } else { f64::NAN }, per))
}

/// An evaluation of a data set: the loss and, when asked for, each answer
/// generated greedily and scored against the sample's.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// Mean loss over every supervised token.
    pub loss: f64,
    pub samples: Vec<SampleLoss>,
    pub generation: Option<(OcrMetrics, Vec<OcrScore>)>,
}

impl Evaluation {
    /// Evaluate `records`; with `max_new_tokens`, also generate and score.
    pub fn run(model: &HostModel, records: &[Record], max_new_tokens: Option<usize>) -> Result<Evaluation> {
        let (loss, samples) = evaluate(model, records)?;
        let generation = max_new_tokens.map(|n| evaluate_generation(model, records, n)).transpose()?;
        Ok(Evaluation { loss, samples, generation })
    }

    /// What `vlmhost eval --json` prints and a run's `eval.json` holds:
    /// `loss`, `samples` (per sample) and with generation `cer`, `wer`,
    /// `exact_match`, `generated`.
    pub fn to_json(&self) -> Result<serde_json::Value> {
        let mut out = serde_json::json!({"loss": self.loss, "samples": self.samples});
        if let Some((metrics, scores)) = &self.generation {
            out["cer"] = metrics.cer.into();
            out["wer"] = metrics.wer.into();
            out["exact_match"] = metrics.exact_match.into();
            out["generated"] = serde_json::to_value(scores)?;
        }
        Ok(out)
    }
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

/// Generate an answer for every record's prompt and score it against the
/// record's last assistant message.
pub fn evaluate_generation(
    model: &HostModel,
    records: &[Record],
    max_new_tokens: usize,
) -> Result<(OcrMetrics, Vec<OcrScore>)> {
    let detok = Detokenizer::from_dir(model.model_dir())?;
    let stop = stop_tokens(model.model_dir());
    warn_without_stop_tokens(model.model_dir(), &stop);
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
    use vlmhost_plugin_api::sample::Message;

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
