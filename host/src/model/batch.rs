//! A padded batch of prepared samples, and the causal-LM loss over a batch's
//! logits as transformers computes it.

use anyhow::{anyhow, Result};
use tch::{Device, Kind, Tensor};
use vlmhost_plugin_api::PreparedSample;

/// The label of a token that does not count in the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// A padded batch.
pub struct BatchTensors {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub labels: Tensor,
    pub tensors: Vec<(String, Tensor)>,
}

/// Right-pad samples into a batch (`pad_id` where the mask is 0, labels -100)
/// and concatenate their other tensors along dimension 0.
pub fn collate(samples: &[&PreparedSample], pad_id: i64, device: Device) -> Result<BatchTensors> {
    let len = samples.iter().map(|s| s.input_ids.len()).max().unwrap_or(0);
    let b = samples.len();
    let mut ids = vec![pad_id; b * len];
    let mut mask = vec![0i64; b * len];
    let mut labels = vec![IGNORE_INDEX; b * len];
    for (i, s) in samples.iter().enumerate() {
        let n = s.input_ids.len();
        ids[i * len..i * len + n].copy_from_slice(&s.input_ids);
        labels[i * len..i * len + n].copy_from_slice(&s.labels);
        mask[i * len..i * len + n].fill(1);
    }
    let shape = [b as i64, len as i64];
    let t = |v: &[i64]| Tensor::from_slice(v).view(shape).to_device(device);
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    if let Some(first) = samples.first() {
        for (name, _) in &first.tensors {
            let parts: Vec<&Tensor> = samples
                .iter()
                .map(|s| s.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t))
                .collect::<Option<_>>()
                .ok_or_else(|| anyhow!("samples of one batch differ in their tensors ({name} missing)"))?;
            tensors.push((name.clone(), Tensor::f_cat(&parts, 0)?.f_to_device(device)?));
        }
    }
    Ok(BatchTensors { input_ids: t(&ids), attention_mask: t(&mask), labels: t(&labels), tensors })
}

/// Causal-LM loss as transformers computes it: logits at position t predict
/// the label at t+1; mean over positions whose shifted label is not -100.
/// Returns (loss, number of supervised tokens).
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, i64)> {
    let v = logits.size()[2];
    let l = logits.size()[1];
    let shift_logits = logits.f_narrow(1, 0, l - 1)?.f_reshape([-1, v])?.f_to_kind(Kind::Float)?;
    let shift_labels = labels.f_narrow(1, 1, l - 1)?.f_reshape([-1])?;
    let n = shift_labels.f_ne(IGNORE_INDEX)?.f_sum(Kind::Int64)?.int64_value(&[]);
    let loss = shift_logits.f_cross_entropy_loss::<Tensor>(&shift_labels, None, tch::Reduction::Mean, IGNORE_INDEX, 0.0)?;
    Ok((loss, n))
}
