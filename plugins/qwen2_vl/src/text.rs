//! The Qwen2 language model of Qwen2-VL (`model.*`, `lm_head.*`), following
//! transformers 5.23 `models/qwen2_vl/modeling_qwen2_vl.py` (`Qwen2VLTextModel`,
//! `Qwen2VLDecoderLayer`, `Qwen2VLAttention`, `Qwen2MLP`, `Qwen2VLRMSNorm`,
//! `Qwen2VLRotaryEmbedding`): the SDK's Llama-style decoder with biases on
//! q/k/v (none on o) and multimodal RoPE (M-RoPE) from `[3, batch, seq]`
//! positions ([`crate::rope`]).

use crate::config::TextConfig;
use crate::rope::mrope_cos_sin;
use tch::Tensor;
use vlmhost_plugin_api::builder::SpecPath;
use vlmhost_plugin_api::Host;
use vlmhost_plugin_sdk::decoder::{Attention, LlamaLayer, LlamaText, Rope, SwiGlu, TextLayout, R};

/// Handles into the spec for `model.*` and `lm_head`.
pub struct Text {
    config: TextConfig,
    llama: LlamaText,
}

impl Text {
    /// Declare `model.*` and `lm_head` (tied to `model.embed_tokens.weight` when `tie`).
    pub fn declare(root: &SpecPath, c: &TextConfig, tie: bool) -> Text {
        let layout = TextLayout {
            model: &(root / "model"),
            head: &(root / "lm_head"),
            vocab_size: c.sizes.vocab_size,
            hidden_size: c.sizes.hidden_size,
            num_layers: c.sizes.num_hidden_layers,
            rms_norm_eps: c.rms_norm_eps,
            tie,
        };
        let (d, hd) = (c.sizes.hidden_size, c.sizes.head_dim());
        let llama = LlamaText::declare(&layout, |l, _| LlamaLayer {
            attn: Attention::declare(&(l / "self_attn"), d, c.sizes.num_attention_heads, c.num_key_value_heads, hd, true, false),
            ffn: SwiGlu::declare(&(l / "mlp"), d, c.sizes.intermediate_size, false),
            input_norm: (l / "input_layernorm").rms_norm(d, c.rms_norm_eps),
            post_norm: (l / "post_attention_layernorm").rms_norm(d, c.rms_norm_eps),
        });
        Text { config: c.clone(), llama }
    }

    /// Token embeddings `[batch, seq, hidden]`.
    pub fn embed(&self, host: Host<'_, '_>, ids: &Tensor) -> R {
        self.llama.embed(host, ids)
    }

    /// The decoder on `x` `[batch, seq, hidden]` at M-RoPE `positions`
    /// `[3, batch, seq]` with boolean attention `mask` `[batch, 1, seq, keys]`
    /// (`None`: causal attention alone, `decoder::attention_mask`);
    /// with `past` (keys and values per layer, `[batch, kv_heads, past, hd]`)
    /// the new keys and values are appended and returned as the new cache.
    /// Returns the logits `[batch, seq, vocab]` (with `rows`, the host's
    /// `logit_rows`: `[1, n, vocab]` for those positions only).
    pub fn decode(&self, host: Host<'_, '_>, x: Tensor, positions: &Tensor, mask: Option<&Tensor>, past: Option<&[Tensor]>, rows: Option<&Tensor>) -> R<(Tensor, Vec<Tensor>)> {
        let c = &self.config;
        let (cos, sin) = mrope_cos_sin(positions, c.sizes.head_dim(), c.rope_theta, &c.mrope_section)?;
        let rope = Rope { cos, sin };
        self.llama.run(host, x, &rope, mask, past, rows, |mlp, y| mlp.forward(host, &c.hidden_act, y))
    }

    /// Decoder layer `layer` as a segment (see `LlamaText::run_segment`).
    pub fn run_segment(&self, host: Host<'_, '_>, layer: u32, inputs: &[Tensor]) -> R<Vec<Tensor>> {
        self.llama.run_segment(host, layer, inputs, |mlp, y| mlp.forward(host, &self.config.hidden_act, y))
    }

    pub fn num_layers(&self) -> usize {
        self.llama.layers.len()
    }
}
