//! Llama-style decoder blocks, as transformers' `modeling_llama.py` computes
//! them and the families that reuse them (LLaVA's Llama, Qwen2-VL's Qwen2,
//! DeepSeek-OCR's DeepSeek-V2 with `use_mla: false`): pre-norm layers of
//! grouped-query self-attention with rotary embeddings and the key/value
//! cache, then a feed-forward block (the SwiGLU MLP, or the family's own),
//! RMSNorm, a final norm and the head; and the plumbing of their forward
//! passes (masks, default RoPE positions, image features in place of the
//! image tokens). Every op is the one the families ran before, in the same
//! order, so the numbers are the same to the bit.

use tch::{Device, Kind, Tensor};
use vlmhost_plugin_api::builder::{RmsNormParams, SpecPath};
use vlmhost_plugin_api::ops::{self, activation};
use vlmhost_plugin_api::{Host, LinearId, ParamId, PluginError, Role, Segment};

pub type R<T = Tensor> = Result<T, PluginError>;

/// An error about the batch the host passed.
pub fn batch_error(message: impl Into<String>) -> PluginError {
    PluginError::invalid("batch", message)
}

/// Rotary `cos` / `sin` `[seq, rot_dim]` of the positions a forward pass runs at.
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    /// Default RoPE at positions `past..past + len`.
    pub fn at(past: i64, len: i64, rot_dim: i64, theta: f64, device: Device) -> R<Rope> {
        let (cos, sin) = ops::rope_cos_sin(past + len, rot_dim, theta, device)?;
        Ok(Rope { cos: cos.f_narrow(0, past, len)?, sin: sin.f_narrow(0, past, len)? })
    }

    /// Rotate `x` `[batch, heads, seq, dim]` (rotate-half convention).
    pub fn apply(&self, x: &Tensor) -> R {
        ops::apply_rope(x, &self.cos, &self.sin)
    }
}

/// The key/value cache of one forward pass: what the previous call returned
/// (`past`: keys and values per layer, `[batch, kv_heads, seq, head_dim]`;
/// `None` without caching, empty on the first call) and what this one returns.
pub struct KvCache<'a> {
    past: Option<&'a [Tensor]>,
    layer: usize,
    next: Vec<Tensor>,
}

impl<'a> KvCache<'a> {
    pub fn new(past: Option<&'a [Tensor]>) -> Self {
        KvCache { past, layer: 0, next: Vec::new() }
    }

    /// How many tokens the cache already holds.
    pub fn past_len(&self) -> i64 {
        past_len(self.past)
    }

    /// The next layer's keys and values with the cached ones prepended.
    pub fn append(&mut self, k: Tensor, v: Tensor) -> R<(Tensor, Tensor)> {
        let kv = ops::cached_kv(self.past, self.layer, k, v, &mut self.next)?;
        self.layer += 1;
        Ok(kv)
    }

    /// The cache for the next call.
    pub fn into_next(self) -> Vec<Tensor> {
        self.next
    }
}

/// Tokens held by a cache `past` (0 without one, or on the first call).
pub fn past_len(past: Option<&[Tensor]>) -> i64 {
    past.and_then(|p| p.first()).map_or(0, |k| k.size()[2])
}

/// The attention mask for `new` tokens, for [`ops::attention`] with `causal`:
///
/// * `None` (causality alone) for a right-padded batch without a cache, as
///   the host collates training and evaluation batches: a row's padding only
///   follows its real tokens, so no real query can reach a padded key, and
///   without an explicit mask SDPA may take its fastest kernels (on CUDA,
///   flash attention only runs without one). Padded queries then also attend
///   to padded keys; nothing reads their outputs (their labels are -100 and
///   only later padded positions attend to them).
/// * Otherwise the boolean mask, causal and hiding padding, offset by the
///   cached tokens when decoding with a cache.
pub fn attention_mask(attention_mask: &Tensor, cached: bool, new: i64) -> R<Option<Tensor>> {
    if cached {
        return Ok(Some(ops::causal_padding_mask_cached(attention_mask, new)?));
    }
    if is_right_padded(attention_mask)? {
        return Ok(None);
    }
    Ok(Some(ops::causal_padding_mask(attention_mask)?))
}

/// Whether every row of `attention_mask` `[batch, seq]` (1 real, 0 padding)
/// is its real tokens followed by its padding, if any.
pub fn is_right_padded(attention_mask: &Tensor) -> R<bool> {
    let l = attention_mask.size()[1];
    if l < 2 {
        return Ok(true);
    }
    let real = attention_mask.f_ne(0)?;
    // Never real after padding: real[t + 1] implies real[t].
    let ok = real.f_narrow(1, 1, l - 1)?.f_le_tensor(&real.f_narrow(1, 0, l - 1)?)?.f_all()?;
    Ok(ok.int64_value(&[]) != 0)
}

/// Token embeddings `[batch, seq, hidden]` from table `table`.
pub fn embed(host: Host<'_, '_>, table: ParamId, ids: &Tensor) -> R {
    Ok(Tensor::f_embedding(&host.param(table)?, ids, -1, false, false)?)
}

/// The image tokens of `ids` (`[batch, seq]` bool) and how many there are.
pub fn image_tokens(ids: &Tensor, image_token_id: i64) -> R<(Tensor, i64)> {
    let mask = ids.f_eq(image_token_id)?;
    let n = mask.f_sum(Kind::Int64)?.int64_value(&[]);
    Ok((mask, n))
}

/// `x` with `features` (`[n_tokens, hidden]`, in order) in place of the image
/// tokens `mask` (`masked_scatter`, as transformers merges them); an error when
/// the counts differ, `detail` saying more about the images.
pub fn merge_image_features(x: &Tensor, mask: &Tensor, n_tokens: i64, features: &Tensor, detail: &str) -> R {
    let n = features.size()[0];
    if n != n_tokens {
        return Err(batch_error(format!("{n_tokens} image tokens in the text but {n} image features{detail}")));
    }
    Ok(x.f_masked_scatter(&mask.f_unsqueeze(-1)?, &features.f_to_kind(x.kind())?)?)
}

/// Self-attention with grouped-query heads, rotary embeddings and the cache
/// (`LlamaAttention` with `q_proj`, `k_proj`, `v_proj`, `o_proj`).
pub struct Attention {
    pub q: LinearId,
    pub k: LinearId,
    pub v: LinearId,
    pub o: LinearId,
    pub heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
}

impl Attention {
    /// Declare `q_proj`, `k_proj`, `v_proj`, `o_proj` under `p`.
    pub fn declare(p: &SpecPath, hidden: i64, heads: i64, kv_heads: i64, head_dim: i64, qkv_bias: bool, o_bias: bool) -> Self {
        Attention {
            q: (p / "q_proj").linear(hidden, heads * head_dim, qkv_bias),
            k: (p / "k_proj").linear(hidden, kv_heads * head_dim, qkv_bias),
            v: (p / "v_proj").linear(hidden, kv_heads * head_dim, qkv_bias),
            o: (p / "o_proj").linear(heads * head_dim, hidden, o_bias),
            heads,
            kv_heads,
            head_dim,
        }
    }

    /// Causal attention of `y` `[batch, seq, hidden]` under `mask` (`None`:
    /// causality alone, see [`attention_mask`]), keys and values through `cache`.
    pub fn forward(&self, host: Host<'_, '_>, y: &Tensor, rope: &Rope, mask: Option<&Tensor>, cache: &mut KvCache<'_>) -> R {
        let (b, l) = (y.size()[0], y.size()[1]);
        let (heads, kv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let q = host.linear(self.q, y)?.f_view([b, l, heads, hd])?.f_transpose(1, 2)?;
        let k = host.linear(self.k, y)?.f_view([b, l, kv, hd])?.f_transpose(1, 2)?;
        let v = host.linear(self.v, y)?.f_view([b, l, kv, hd])?.f_transpose(1, 2)?;
        let q = rope.apply(&q)?;
        let k = rope.apply(&k)?;
        let (k, v) = cache.append(k, v)?;
        let att = ops::attention(&q, &k, &v, mask, true, (hd as f64).powf(-0.5))?;
        let att = att.f_transpose(1, 2)?.f_reshape([b, l, heads * hd])?;
        host.linear(self.o, &att)
    }
}

/// The SwiGLU MLP: `down(act(gate(x)) * up(x))`.
pub struct SwiGlu {
    pub gate: LinearId,
    pub up: LinearId,
    pub down: LinearId,
}

impl SwiGlu {
    /// Declare `gate_proj`, `up_proj`, `down_proj` under `p`.
    pub fn declare(p: &SpecPath, hidden: i64, inner: i64, bias: bool) -> Self {
        SwiGlu {
            gate: (p / "gate_proj").linear(hidden, inner, bias),
            up: (p / "up_proj").linear(hidden, inner, bias),
            down: (p / "down_proj").linear(inner, hidden, bias),
        }
    }

    pub fn forward(&self, host: Host<'_, '_>, act: &str, x: &Tensor) -> R {
        let gate = activation(act, &host.linear(self.gate, x)?)?;
        host.linear(self.down, &gate.f_mul(&host.linear(self.up, x)?)?)
    }
}

/// One pre-norm decoder layer: `x + attn(norm(x))`, then `x + ffn(norm(x))`.
pub struct LlamaLayer<F = SwiGlu> {
    pub attn: Attention,
    pub ffn: F,
    pub input_norm: RmsNormParams,
    pub post_norm: RmsNormParams,
}

impl<F> LlamaLayer<F> {
    /// The layer on `x` `[batch, seq, hidden]`; `ffn` runs its feed-forward block.
    pub fn forward(&self, host: Host<'_, '_>, x: &Tensor, rope: &Rope, mask: Option<&Tensor>, cache: &mut KvCache<'_>, ffn: impl Fn(&F, &Tensor) -> R) -> R {
        let y = ops::rms_norm(host, &self.input_norm, x)?;
        let x = x.f_add(&self.attn.forward(host, &y, rope, mask, cache)?)?;
        let y = ops::rms_norm(host, &self.post_norm, &x)?;
        Ok(x.f_add(&ffn(&self.ffn, &y)?)?)
    }
}

/// The segment stack ([`Segment::stack`]) of a language model's decoder layers.
pub const LLM_STACK: u32 = 0;

/// Embeddings, decoder layers, final norm and head of a Llama-style language model.
pub struct LlamaText<F = SwiGlu> {
    pub embed_tokens: ParamId,
    pub layers: Vec<LlamaLayer<F>>,
    pub norm: RmsNormParams,
    pub lm_head: LinearId,
}

/// Where a language model's parts are and how large it is.
pub struct TextLayout<'a> {
    /// `…model` (holding `embed_tokens`, `layers`, `norm`).
    pub model: &'a SpecPath,
    /// `…lm_head`.
    pub head: &'a SpecPath,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_layers: i64,
    pub rms_norm_eps: f64,
    /// Tie the head to the embeddings.
    pub tie: bool,
}

impl<F> LlamaText<F> {
    /// Declare `embed_tokens`, the layers (`layer(path, index)`), `norm` and the head.
    pub fn declare(t: &TextLayout<'_>, mut layer: impl FnMut(&SpecPath, i64) -> LlamaLayer<F>) -> Self {
        let (m, d) = (t.model, t.hidden_size);
        let embed_tokens = (m / "embed_tokens").embedding(t.vocab_size, d);
        let layers = (0..t.num_layers).map(|i| layer(&(m / "layers" / i), i)).collect();
        let norm = (m / "norm").rms_norm(d, t.rms_norm_eps);
        let lm_head = if t.tie {
            let tied = format!("{}.weight", (m / "embed_tokens").path());
            t.head.linear_tied(d, t.vocab_size, &tied)
        } else {
            t.head.linear(d, t.vocab_size, false)
        };
        LlamaText { embed_tokens, layers, norm, lm_head }
    }

    /// Token embeddings `[batch, seq, hidden]`.
    pub fn embed(&self, host: Host<'_, '_>, ids: &Tensor) -> R {
        embed(host, self.embed_tokens, ids)
    }

    /// The layers on `x` `[batch, seq, hidden]`, then the final norm and the
    /// head: logits and the next cache. `ffn` runs a layer's feed-forward block.
    /// With `rows` (the host's `BatchInputs::logit_rows`) the head runs on those
    /// positions only: logits `[1, n, vocab]`.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        host: Host<'_, '_>,
        mut x: Tensor,
        rope: &Rope,
        mask: Option<&Tensor>,
        past: Option<&[Tensor]>,
        rows: Option<&Tensor>,
        ffn: impl Fn(&F, &Tensor) -> R,
    ) -> R<(Tensor, Vec<Tensor>)> {
        let mut cache = KvCache::new(past);
        for (i, layer) in self.layers.iter().enumerate() {
            x = if past.is_some() {
                layer.forward(host, &x, rope, mask, &mut cache, &ffn)?
            } else {
                // Without a cache each layer is a segment: the host may recompute it in backward.
                let mut inputs = vec![&x, &rope.cos, &rope.sin];
                inputs.extend(mask);
                one_output(host.segment(Segment::new(Role::Llm, LLM_STACK, i as u32), &inputs)?)?
            };
        }
        let x = ops::select_rows(&x, rows)?;
        let x = ops::rms_norm(host, &self.norm, &x)?;
        Ok((host.linear(self.lm_head, &x)?, cache.into_next()))
    }

    /// Decoder layer `layer` as [`LlamaText::run`] marked it a segment, on its
    /// inputs (hidden states, the rotary `cos` and `sin`, the mask if any).
    pub fn run_segment(&self, host: Host<'_, '_>, layer: u32, inputs: &[Tensor], ffn: impl Fn(&F, &Tensor) -> R) -> R<Vec<Tensor>> {
        let (Some(l), [x, cos, sin, mask @ ..]) = (self.layers.get(layer as usize), inputs) else {
            return Err(segment_error(Segment::new(Role::Llm, LLM_STACK, layer), inputs.len()));
        };
        let rope = Rope { cos: cos.shallow_clone(), sin: sin.shallow_clone() };
        Ok(vec![l.forward(host, x, &rope, mask.first(), &mut KvCache::new(None), ffn)?])
    }
}

/// The single output of a segment.
pub fn one_output(mut outputs: Vec<Tensor>) -> R {
    match outputs.len() {
        1 => Ok(outputs.remove(0)),
        n => Err(PluginError::invalid("segment", format!("expected one output tensor, the host returned {n}"))),
    }
}

/// The error for a segment the model does not have, or called with the wrong inputs.
pub fn segment_error(id: Segment, inputs: usize) -> PluginError {
    PluginError::invalid("segment", format!("no {} segment {} of stack {} taking {inputs} inputs", id.role, id.layer, id.stack))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn mask(rows: &[&[i64]]) -> Tensor {
        Tensor::from_slice2(rows).to_kind(Kind::Int64)
    }

    #[test]
    fn right_padded_batches_attend_causally_without_a_mask() {
        let right = mask(&[&[1, 1, 1, 1], &[1, 1, 0, 0]]);
        let left = mask(&[&[1, 1, 1, 1], &[0, 0, 1, 1]]);
        assert!(is_right_padded(&right).unwrap() && !is_right_padded(&left).unwrap());
        assert!(attention_mask(&right, false, 4).unwrap().is_none());
        assert!(attention_mask(&left, false, 4).unwrap().is_some());
        // With a cache the offset mask stays explicit.
        assert!(attention_mask(&right, true, 1).unwrap().is_some());

        // Causality alone equals the explicit causal + padding mask on every real query.
        tch::manual_seed(0);
        let (q, k, v) = (
            Tensor::randn([2, 2, 4, 8], (Kind::Float, Device::Cpu)),
            Tensor::randn([2, 2, 4, 8], (Kind::Float, Device::Cpu)),
            Tensor::randn([2, 2, 4, 8], (Kind::Float, Device::Cpu)),
        );
        let explicit = ops::causal_padding_mask(&right).unwrap();
        let with_mask = ops::attention(&q, &k, &v, Some(&explicit), true, 0.5).unwrap();
        let causal = ops::attention(&q, &k, &v, None, true, 0.5).unwrap();
        let real = right.to_kind(Kind::Bool).view([2, 1, 4, 1]);
        let diff = (with_mask - causal).abs().f_masked_select(&real).unwrap().max().double_value(&[]);
        // Same keys, same weights, another kernel (flash vs math): rounding only.
        assert!(diff < 1e-5, "{diff}");

        // libtorch's kernel choice (SDPBackend: 0 math, 1 flash attention): without a mask,
        // flash attention. (The CPU's flash kernel also takes masks; CUDA's does not, which is
        // where leaving the mask out pays: scripts/gpu_check.sh.)
        let choice = Tensor::f_internal_fused_sdp_choice(&q, &k, &v, None::<Tensor>, 0.0, true, 0.5, false).unwrap();
        assert_eq!(choice, 1, "SDPA backend without a mask");
    }
}
