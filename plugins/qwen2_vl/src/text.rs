//! The Qwen2 language model of Qwen2-VL (`model.*`, `lm_head.*`), following
//! transformers 5.23 `models/qwen2_vl/modeling_qwen2_vl.py` (`Qwen2VLTextModel`,
//! `Qwen2VLDecoderLayer`, `Qwen2VLAttention`, `Qwen2MLP`, `Qwen2VLRMSNorm`,
//! `Qwen2VLRotaryEmbedding`): pre-norm decoder layers with grouped-query
//! attention, biases on q/k/v (none on o), SwiGLU MLP, RMSNorm, and
//! multimodal RoPE (M-RoPE) from `[3, batch, seq]` positions.

use crate::config::TextConfig;
use crate::rope::mrope_cos_sin;
use tch::Tensor;
use vlmhost_plugin_api::builder::{RmsNormParams, SpecPath};
use vlmhost_plugin_api::ops::{self, activation};
use vlmhost_plugin_api::{Host, LinearId, ParamId, PluginError};

type R<T = Tensor> = Result<T, PluginError>;

struct Layer {
    q: LinearId,
    k: LinearId,
    v: LinearId,
    o: LinearId,
    gate: LinearId,
    up: LinearId,
    down: LinearId,
    input_norm: RmsNormParams,
    post_norm: RmsNormParams,
}

/// Handles into the spec for `model.*` and `lm_head`.
pub struct Text {
    config: TextConfig,
    embed_tokens: ParamId,
    layers: Vec<Layer>,
    norm: RmsNormParams,
    lm_head: LinearId,
}

impl Text {
    /// Declare `model.*` and `lm_head` (tied to `model.embed_tokens.weight` when `tie`).
    pub fn declare(root: &SpecPath, c: &TextConfig, tie: bool) -> Text {
        let m = root / "model";
        let (d, hd) = (c.hidden_size, c.head_dim());
        let embed_tokens = (&m / "embed_tokens").embedding(c.vocab_size, d);
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = &m / "layers" / i;
                let a = &l / "self_attn";
                let mlp = &l / "mlp";
                Layer {
                    q: (&a / "q_proj").linear(d, c.num_attention_heads * hd, true),
                    k: (&a / "k_proj").linear(d, c.num_key_value_heads * hd, true),
                    v: (&a / "v_proj").linear(d, c.num_key_value_heads * hd, true),
                    o: (&a / "o_proj").linear(c.num_attention_heads * hd, d, false),
                    gate: (&mlp / "gate_proj").linear(d, c.intermediate_size, false),
                    up: (&mlp / "up_proj").linear(d, c.intermediate_size, false),
                    down: (&mlp / "down_proj").linear(c.intermediate_size, d, false),
                    input_norm: (&l / "input_layernorm").rms_norm(d, c.rms_norm_eps),
                    post_norm: (&l / "post_attention_layernorm").rms_norm(d, c.rms_norm_eps),
                }
            })
            .collect();
        let norm = (&m / "norm").rms_norm(d, c.rms_norm_eps);
        let lm_head = if tie {
            (root / "lm_head").linear_tied(d, c.vocab_size, "model.embed_tokens.weight")
        } else {
            (root / "lm_head").linear(d, c.vocab_size, false)
        };
        Text { config: c.clone(), embed_tokens, layers, norm, lm_head }
    }

    /// Token embeddings `[batch, seq, hidden]`.
    pub fn embed(&self, host: Host<'_, '_>, ids: &Tensor) -> R {
        let table = host.param(self.embed_tokens)?;
        Ok(Tensor::f_embedding(&table, ids, -1, false, false)?)
    }

    /// The decoder on `x` `[batch, seq, hidden]` at M-RoPE `positions`
    /// `[3, batch, seq]` with boolean attention `mask` `[batch, 1, seq, keys]`;
    /// with `past` (keys and values per layer, `[batch, kv_heads, past, hd]`)
    /// the new keys and values are appended and returned as the new cache.
    /// Returns the logits `[batch, seq, vocab]`.
    pub fn decode(&self, host: Host<'_, '_>, mut x: Tensor, positions: &Tensor, mask: &Tensor, past: Option<&[Tensor]>) -> R<(Tensor, Vec<Tensor>)> {
        let c = &self.config;
        let (b, l) = (x.size()[0], x.size()[1]);
        let (heads, kv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim());
        let (cos, sin) = mrope_cos_sin(positions, hd, c.rope_theta, &c.mrope_section)?;
        let mut cache = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let residual = x.shallow_clone();
            let y = ops::rms_norm(host, &layer.input_norm, &x)?;
            let q = host.linear(layer.q, &y)?.f_view([b, l, heads, hd])?.f_transpose(1, 2)?;
            let k = host.linear(layer.k, &y)?.f_view([b, l, kv, hd])?.f_transpose(1, 2)?;
            let v = host.linear(layer.v, &y)?.f_view([b, l, kv, hd])?.f_transpose(1, 2)?;
            let q = ops::apply_rope(&q, &cos, &sin)?;
            let k = ops::apply_rope(&k, &cos, &sin)?;
            let (k, v) = ops::cached_kv(past, i, k, v, &mut cache)?;
            let att = ops::attention(&q, &k, &v, Some(mask), true, (hd as f64).powf(-0.5))?;
            let att = att.f_transpose(1, 2)?.f_reshape([b, l, heads * hd])?;
            x = residual.f_add(&host.linear(layer.o, &att)?)?;
            let residual = x.shallow_clone();
            let y = ops::rms_norm(host, &layer.post_norm, &x)?;
            let gate = activation(&c.hidden_act, &host.linear(layer.gate, &y)?)?;
            x = residual.f_add(&host.linear(layer.down, &gate.f_mul(&host.linear(layer.up, &y)?)?)?)?;
        }
        let x = ops::rms_norm(host, &self.norm, &x)?;
        Ok((host.linear(self.lm_head, &x)?, cache))
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
}
