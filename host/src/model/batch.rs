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
/// Returns (loss, number of supervised tokens); see [`causal_lm_loss_sum`].
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, i64)> {
    let (sum, n) = causal_lm_loss_sum(logits, labels)?;
    Ok((sum.f_div_scalar(n as f64)?, n))
}

/// Logit values per cross-entropy chunk converted to fp32 at once (64 Mi
/// values, 256 MiB): 441 positions of Qwen2-VL's 151,936-token vocabulary.
const LOSS_CHUNK_VALUES: i64 = 1 << 26;

/// The summed token losses of [`causal_lm_loss`] and the number of supervised
/// tokens, without fp32 copies of whole logits: only the positions whose next
/// token is labelled are scored ([`labelled_rows`]), converted to fp32 a chunk
/// of positions at a time. `logits` are the whole `[batch, seq, vocab]`, or
/// `[1, n, vocab]` at those positions only (a plugin that honoured the batch's
/// `logit_rows`). A batch without a labelled token gives 0 (still connected
/// to the logits).
pub fn causal_lm_loss_sum(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, i64)> {
    let (rows, targets) = labelled_rows(labels)?;
    loss_sum_at_rows(logits, labels.size2()?, &rows, &targets)
}

/// [`causal_lm_loss_sum`] with the batch's [`labelled_rows`] computed already
/// (`shape`: the labels' `[batch, seq]`): training computes them once, for the
/// batch's `logit_rows` and for the loss.
pub fn loss_sum_at_rows(logits: &Tensor, shape: (i64, i64), rows: &Tensor, targets: &Tensor) -> Result<(Tensor, i64)> {
    loss_sum_in_chunks(logits, shape, rows, targets, LOSS_CHUNK_VALUES)
}

/// The positions whose next token is labelled, as rows of the flattened
/// `[batch * seq]` positions (in order: what the batch tensor `logit_rows`
/// holds), and those next tokens.
pub fn labelled_rows(labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let (_, l) = labels.size2()?;
    // Position t predicts the label at t + 1; the last position predicts nothing.
    let next = labels.f_narrow(1, 1, l - 1)?;
    let labelled = next.f_ne(IGNORE_INDEX)?;
    let at = labelled.f_nonzero()?;
    let rows = at.f_select(1, 0)?.f_mul_scalar(l)?.f_add(&at.f_select(1, 1)?)?;
    Ok((rows, next.f_masked_select(&labelled)?))
}

fn loss_sum_in_chunks(logits: &Tensor, (b, l): (i64, i64), rows: &Tensor, targets: &Tensor, chunk_values: i64) -> Result<(Tensor, i64)> {
    let n = targets.size()[0];
    if n == 0 {
        return Ok((logits.f_sum(Kind::Float)?.f_mul_scalar(0.0)?, 0));
    }
    let size = logits.size();
    let v = *size.last().ok_or_else(|| anyhow!("logits without dimensions"))?;
    let picked = if size == [b, l, v] {
        logits.f_reshape([b * l, v])?.f_index_select(0, rows)?
    } else if size == [1, n, v] {
        // Already at the labelled positions (n < b * l, so never mistaken for whole logits).
        logits.f_reshape([n, v])?
    } else {
        return Err(anyhow!("the model returned logits {size:?} for a [{b}, {l}] batch with {n} labelled positions: expected [{b}, {l}, vocab] or [1, {n}, vocab]"));
    };
    let chunk = (chunk_values / v).max(1);
    let mut sum: Option<Tensor> = None;
    for start in (0..n).step_by(chunk as usize) {
        let len = chunk.min(n - start);
        let part = picked.f_narrow(0, start, len)?.f_to_kind(Kind::Float)?.f_cross_entropy_loss::<Tensor>(
            &targets.f_narrow(0, start, len)?,
            None,
            tch::Reduction::Sum,
            IGNORE_INDEX,
            0.0,
        )?;
        sum = Some(match sum {
            None => part,
            Some(s) => s.f_add(&part)?,
        });
    }
    Ok((sum.expect("n > 0 gives a chunk"), n))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers' formula: shift, flatten, fp32, mean cross-entropy.
    fn reference(logits: &Tensor, labels: &Tensor) -> Tensor {
        let (_, l, v) = logits.size3().unwrap();
        let shift_logits = logits.narrow(1, 0, l - 1).reshape([-1, v]).to_kind(Kind::Float);
        let shift_labels = labels.narrow(1, 1, l - 1).reshape([-1]);
        shift_logits.cross_entropy_loss::<Tensor>(&shift_labels, None, tch::Reduction::Mean, IGNORE_INDEX, 0.0)
    }

    #[test]
    fn chunked_loss_over_labelled_positions_equals_transformers_formula() {
        tch::manual_seed(0);
        let (b, l, v) = (3, 9, 11);
        let labels = Tensor::randint(v, [b, l], (Kind::Int64, Device::Cpu));
        // Padding and prompts: unlabelled spans in every sample, the last sample mostly unlabelled.
        let _ = labels.narrow(1, 0, 3).fill_(IGNORE_INDEX);
        let _ = labels.get(2).narrow(0, 3, 5).fill_(IGNORE_INDEX);
        for kind in [Kind::Float, Kind::BFloat16] {
            let mut logits = Tensor::randn([b, l, v], (Kind::Float, Device::Cpu)).to_kind(kind).set_requires_grad(true);
            let want = reference(&logits, &labels);
            want.backward();
            let want_grad = logits.grad().copy();
            logits.zero_grad();
            // Chunks of 2 positions (22 values), of 1, and all at once.
            for chunk_values in [22, 1, 1 << 26] {
                let (rows, targets) = labelled_rows(&labels).unwrap();
                let (got, n) = loss_sum_in_chunks(&logits, (b, l), &rows, &targets, chunk_values).unwrap();
                assert_eq!(n, labels.narrow(1, 1, l - 1).ne(IGNORE_INDEX).sum(Kind::Int64).int64_value(&[]));
                let got = got / n as f64;
                // fp32 sums in another order: a few ulps of the loss (~2.4).
                let diff = (&got - &want).abs().double_value(&[]);
                assert!(diff <= 1e-6 * want.double_value(&[]).abs(), "{kind:?} chunk {chunk_values}: {got:?} vs {want:?}");
                got.backward();
                let g = logits.grad();
                let scale = want_grad.to_kind(Kind::Float).abs().max().double_value(&[]);
                let gdiff = (g.to_kind(Kind::Float) - want_grad.to_kind(Kind::Float)).abs().max().double_value(&[]);
                // bf16 gradients are rounded to 8 bits after the same fp32 arithmetic: one bf16 ulp at most.
                let bound = if kind == Kind::BFloat16 { scale * 2f64.powi(-7) } else { scale * 1e-6 };
                assert!(gdiff <= bound, "{kind:?} chunk {chunk_values}: gradient differs by {gdiff} (scale {scale})");
                logits.zero_grad();
            }
        }
    }

    #[test]
    fn logits_at_the_labelled_rows_only_give_the_same_loss() {
        tch::manual_seed(1);
        let labels = Tensor::from_slice2(&[[-100i64, -100, 3, 4, -100], [-100, 1, 2, -100, -100]]);
        let logits = Tensor::randn([2, 5, 6], (Kind::Float, Device::Cpu));
        let (rows, targets) = labelled_rows(&labels).unwrap();
        // Sample 0 predicts 3 and 4 from positions 1, 2; sample 1 predicts 1, 2 from 0, 1 (rows 5, 6).
        assert_eq!(Vec::<i64>::try_from(&rows).unwrap(), [1, 2, 5, 6]);
        assert_eq!(Vec::<i64>::try_from(&targets).unwrap(), [3, 4, 1, 2]);
        let packed = logits.reshape([10, 6]).index_select(0, &rows).unsqueeze(0);
        let (whole, n) = causal_lm_loss_sum(&logits, &labels).unwrap();
        let (at_rows, m) = causal_lm_loss_sum(&packed, &labels).unwrap();
        assert_eq!((n, m), (4, 4));
        assert_eq!(whole.double_value(&[]), at_rows.double_value(&[]), "the same values in the same order");
        // Any other shape is an error naming both.
        let err = causal_lm_loss_sum(&logits.narrow(1, 0, 4), &labels).unwrap_err().to_string();
        assert!(err.contains("[2, 4, 6]") && err.contains("[1, 4, vocab]"), "{err}");
    }

    #[test]
    fn no_labelled_token_gives_zero() {
        let logits = Tensor::randn([1, 4, 5], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let labels = Tensor::full([1, 4], IGNORE_INDEX, (Kind::Int64, Device::Cpu));
        let (sum, n) = causal_lm_loss_sum(&logits, &labels).unwrap();
        assert_eq!((sum.double_value(&[]), n), (0.0, 0));
        sum.backward();
        assert!(logits.grad().defined());
    }
}
