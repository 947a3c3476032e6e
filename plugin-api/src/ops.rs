//! Building blocks shared by family plugins, as transformers computes them.
//! Every op is fallible (`f_*`): a shape error comes back as a
//! [`PluginError`](crate::PluginError), never a panic.

use crate::builder::{LayerNormParams, RmsNormParams};
use crate::host::Host;
use crate::PluginError;
use tch::{Kind, Tensor};

type R = Result<Tensor, PluginError>;

/// `LayerNorm` over the last dimension.
pub fn layer_norm(host: Host<'_, '_>, p: &LayerNormParams, x: &Tensor) -> R {
    let w = host.param(p.weight)?;
    let b = p.bias.map(|b| host.param(b)).transpose()?;
    let dim = *x.size().last().unwrap_or(&0);
    Ok(x.f_layer_norm([dim], Some(&w), b.as_ref(), p.eps, true)?)
}

/// Llama's `RMSNorm`: normalise in float32, scale in the input's dtype.
pub fn rms_norm(host: Host<'_, '_>, p: &RmsNormParams, x: &Tensor) -> R {
    let w = host.param(p.weight)?;
    let kind = x.kind();
    let xf = x.f_to_kind(Kind::Float)?;
    let var = xf.f_square()?.f_mean_dim(-1, true, Kind::Float)?;
    let normed = xf.f_mul(&var.f_add_scalar(p.eps)?.f_rsqrt()?)?.f_to_kind(kind)?;
    Ok(normed.f_mul(&w)?)
}

/// Activation functions by their transformers name.
pub fn activation(name: &str, x: &Tensor) -> R {
    Ok(match name {
        "gelu" => x.f_gelu("none")?,
        "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => x.f_gelu("tanh")?,
        "quick_gelu" => x.f_mul(&x.f_mul_scalar(1.702)?.f_sigmoid()?)?,
        "silu" | "swish" => x.f_silu()?,
        "relu" => x.f_relu()?,
        "relu2" => x.f_relu()?.f_square()?,
        other => return Err(PluginError::unsupported(format!("activation function {other:?}"))),
    })
}

/// Whether [`activation`] knows `name`.
pub fn known_activation(name: &str) -> bool {
    matches!(
        name,
        "gelu" | "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" | "quick_gelu" | "silu" | "swish" | "relu" | "relu2"
    )
}

/// Rotary embeddings (rotate-half convention): `cos`, `sin` of shape
/// `[seq, rot_dim]` for positions `0..seq`, computed in float32 as
/// transformers' default RoPE does (`inv_freq = 1 / theta^(2i/rot_dim)`).
pub fn rope_cos_sin(seq: i64, rot_dim: i64, theta: f64, device: tch::Device) -> Result<(Tensor, Tensor), PluginError> {
    let idx = Tensor::f_arange_start_step(0, rot_dim, 2, (Kind::Int64, device))?.f_to_kind(Kind::Float)?;
    let inv_freq = Tensor::f_pow_scalar(theta, &idx.f_div_scalar(rot_dim as f64)?)?.f_reciprocal()?;
    let pos = Tensor::f_arange(seq, (Kind::Float, device))?;
    let freqs = pos.f_outer(&inv_freq)?;
    let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?;
    Ok((emb.f_cos()?, emb.f_sin()?))
}

/// `x * cos + rotate_half(x) * sin` over the last dimension, for `x` of shape
/// `[batch, heads, seq, dim]` and `cos`/`sin` of shape `[seq, dim]`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> R {
    let d = *x.size().last().unwrap_or(&0);
    let x1 = x.f_narrow(-1, 0, d / 2)?;
    let x2 = x.f_narrow(-1, d / 2, d - d / 2)?;
    let rotated = Tensor::f_cat(&[&x2.f_neg()?, &x1], -1)?;
    let kind = x.kind();
    Ok(x.f_mul(&cos.f_to_kind(kind)?)?.f_add(&rotated.f_mul(&sin.f_to_kind(kind)?)?)?)
}

/// A boolean attention mask `[batch, 1, seq, seq]`: causal and hiding padded
/// keys (`attention_mask` `[batch, seq]`, 1 for real tokens).
pub fn causal_padding_mask(attention_mask: &Tensor) -> R {
    let size = attention_mask.size();
    let (b, l) = (size[0], size[1]);
    let device = attention_mask.device();
    let causal = Tensor::f_ones([l, l], (Kind::Bool, device))?.f_tril(0)?;
    let keys = attention_mask.f_ne(0)?.f_view([b, 1, 1, l])?;
    Ok(causal.f_view([1, 1, l, l])?.f_logical_and(&keys)?)
}

/// The boolean mask `[batch, 1, new, past + new]` for `new` query tokens that
/// follow `past` cached ones: causal with the offset, hiding padded keys
/// (`attention_mask` `[batch, past + new]`, 1 for real tokens).
pub fn causal_padding_mask_cached(attention_mask: &Tensor, new: i64) -> R {
    let size = attention_mask.size();
    let (b, total) = (size[0], size[1]);
    let past = total - new;
    let device = attention_mask.device();
    let causal = Tensor::f_ones([new, total], (Kind::Bool, device))?.f_tril(past)?;
    let keys = attention_mask.f_ne(0)?.f_view([b, 1, 1, total])?;
    Ok(causal.f_view([1, 1, new, total])?.f_logical_and(&keys)?)
}

/// Append the new keys (or values) `[batch, heads, new, dim]` to the cached
/// ones along the sequence (dimension 2); the result is the next cache entry.
pub fn append_cache(past: Option<&Tensor>, new: &Tensor) -> R {
    match past {
        Some(p) => Ok(Tensor::f_cat(&[p, new], 2)?),
        None => Ok(new.shallow_clone()),
    }
}

/// Keys and values of decoder layer `layer` with the cache: when `past` is
/// given (incremental decoding), the layer's cached entries (`past[2 * layer]`,
/// `past[2 * layer + 1]`; none on the first call) are prepended and the
/// results pushed onto `cache`, the next call's cache; without `past`, `k`
/// and `v` as they are.
pub fn cached_kv(
    past: Option<&[Tensor]>,
    layer: usize,
    k: Tensor,
    v: Tensor,
    cache: &mut Vec<Tensor>,
) -> Result<(Tensor, Tensor), PluginError> {
    match past {
        Some(p) => {
            let k = append_cache(p.get(2 * layer), &k)?;
            let v = append_cache(p.get(2 * layer + 1), &v)?;
            cache.extend([k.shallow_clone(), v.shallow_clone()]);
            Ok((k, v))
        }
        None => Ok((k, v)),
    }
}

/// Scaled dot-product attention over `[batch, heads, seq, dim]` tensors;
/// `kv_heads < heads` is grouped-query attention.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, causal: bool, scale: f64) -> R {
    let gqa = q.size()[1] != k.size()[1];
    Ok(Tensor::f_scaled_dot_product_attention(q, k, v, mask, 0.0, causal && mask.is_none(), scale, gqa)?)
}

/// The hidden states `x` `[batch, seq, hidden]` at `rows` (the host's
/// [`crate::BatchInputs::logit_rows`]: rows of the flattened `[batch * seq]`
/// positions) as `[1, n, hidden]`, for a head that runs on those positions
/// only; `x` itself without `rows`.
pub fn select_rows(x: &Tensor, rows: Option<&Tensor>) -> R {
    match rows {
        None => Ok(x.shallow_clone()),
        Some(rows) => {
            let size = x.size();
            let (b, l, d) = (size[0], size[1], size[2]);
            Ok(x.f_reshape([b * l, d])?.f_index_select(0, rows)?.f_unsqueeze(0)?)
        }
    }
}
