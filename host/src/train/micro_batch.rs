//! One micro-batch: records prepared by the plugin (cut as the data check
//! decided), collated, run forward (bf16 autocast for bf16 weights) and scored with
//! the causal-LM loss, summed over its supervised tokens.

use super::dataset::Record;
use crate::model::{collate, labelled_rows, loss_sum_at_rows, HostModel, PreparedSample};
use vlmhost_plugin_api::LOGIT_ROWS;
use anyhow::Result;
use tch::Tensor;

/// Prepare records with the plugin (truncated as checked) into samples.
pub fn prepare(model: &HostModel, records: &[&Record]) -> Result<Vec<PreparedSample>> {
    records
        .iter()
        .map(|r| {
            let json = serde_json::to_string(&r.sample)?;
            let mut p = model.prepare(&json).map_err(|e| anyhow::anyhow!("{}: {e}", r.origin))?;
            if let Some(n) = r.truncate_to {
                p.input_ids.truncate(n);
                p.labels.truncate(n);
                p.image_token_mask.truncate(n);
            }
            Ok(p)
        })
        .collect()
}

/// The summed loss of a micro-batch.
pub struct MicroBatchLoss {
    /// Sum of the token losses (a scalar tensor, differentiable when training).
    pub sum: Tensor,
    /// Supervised tokens.
    pub supervised: i64,
    /// All tokens.
    pub tokens: usize,
}

/// Sum of token losses and supervised tokens of one micro-batch.
pub fn loss(model: &HostModel, samples: &[PreparedSample], training: bool) -> Result<MicroBatchLoss> {
    let refs: Vec<&PreparedSample> = samples.iter().collect();
    let mut batch = collate(&refs, 0, model.device())?;
    // The positions the loss needs: a plugin that reads `logit_rows` runs its head there only.
    let (rows, targets) = labelled_rows(&batch.labels)?;
    batch.tensors.push((LOGIT_ROWS.to_owned(), rows.shallow_clone()));
    // In the model's precision (bf16 autocast for bf16 weights); the loss is computed in fp32.
    let logits = model.autocast(|| model.forward(&batch, training))?;
    let (sum, n) = loss_sum_at_rows(&logits, batch.labels.size2()?, &rows, &targets)?;
    let tokens = samples.iter().map(|s| s.input_ids.len()).sum();
    Ok(MicroBatchLoss { sum, supervised: n, tokens })
}
