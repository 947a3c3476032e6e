//! DeepSeek-OCR's language model, `modeling_deepseekv2.py` with
//! `use_mla: false`: the dense SwiGLU MLP and the MoE block (softmax router
//! over the routed experts, top-k, plus shared experts).

use crate::config::TextConfig;
use tch::{Kind, Tensor};
use vlmhost_plugin_api::builder::SpecPath;
use vlmhost_plugin_api::{Host, ParamId, ParamKind};
use vlmhost_plugin_sdk::decoder::{Attention, LlamaLayer, SwiGlu, R};

/// A SwiGLU MLP (`down(act(gate(x)) * up(x))`), without biases.
pub type Mlp = SwiGlu;

/// The MoE block of one decoder layer.
pub struct Moe {
    /// The router, `[n_routed_experts, hidden]`: a bare parameter, never a LoRA target.
    pub gate: ParamId,
    pub experts: Vec<Mlp>,
    pub shared: Option<Mlp>,
}

/// A decoder layer's feed-forward block.
pub enum Ffn {
    Dense(Mlp),
    Moe(Moe),
}

/// One decoder layer: Llama's attention and norms around [`Ffn`].
pub type Layer = LlamaLayer<Ffn>;

fn declare_mlp(p: &SpecPath, hidden: i64, inner: i64) -> Mlp {
    SwiGlu::declare(p, hidden, inner, false)
}

/// Declare decoder layer `i` under `p`, its feed-forward block first (the checkpoint's order).
pub(crate) fn declare_layer(p: &SpecPath, t: &TextConfig, i: i64) -> Layer {
    let (d, hd) = (t.sizes.hidden_size, t.sizes.head_dim());
    let mlp = p / "mlp";
    LlamaLayer {
        ffn: if t.is_moe_layer(i) {
            let n = t.n_routed_experts.unwrap_or(0);
            Ffn::Moe(Moe {
                gate: (&mlp / "gate").param("weight", &[n, d], ParamKind::Weight),
                experts: (0..n).map(|e| declare_mlp(&(&mlp / "experts" / e), d, t.moe_intermediate_size)).collect(),
                shared: t
                    .n_shared_experts
                    .filter(|&s| s > 0)
                    .map(|s| declare_mlp(&(&mlp / "shared_experts"), d, t.moe_intermediate_size * s)),
            })
        } else {
            Ffn::Dense(declare_mlp(&mlp, d, t.sizes.intermediate_size))
        },
        attn: Attention::declare(&(p / "self_attn"), d, t.sizes.num_attention_heads, t.kv_heads(), hd, t.attention_bias, t.attention_bias),
        input_norm: (p / "input_layernorm").rms_norm(d, t.rms_norm_eps),
        post_norm: (p / "post_attention_layernorm").rms_norm(d, t.rms_norm_eps),
    }
}

impl Ffn {
    /// The block on `x` `[batch, seq, hidden]`.
    pub fn forward(&self, t: &TextConfig, host: Host<'_, '_>, x: &Tensor) -> R {
        match self {
            Ffn::Dense(m) => m.forward(host, &t.hidden_act, x),
            Ffn::Moe(moe) => moe.forward(t, host, x),
        }
    }
}

impl Moe {

    /// The router: expert indices and weights `[tokens, k]` for `x` `[tokens, hidden]`.
    pub fn route(&self, t: &TextConfig, host: Host<'_, '_>, x: &Tensor) -> R<(Tensor, Tensor)> {
        let moe = self;
        let k = t.num_experts_per_tok.unwrap_or(1);
        let w = host.param(moe.gate)?;
        let logits = x.f_to_kind(Kind::Float)?.f_linear(&w.f_to_kind(Kind::Float)?, None::<&Tensor>)?;
        let scores = logits.f_softmax(-1, Kind::Float)?;
        let (weights, idx) = if t.topk_method == "group_limited_greedy" {
            let n = scores.size()[0];
            let groups = t.n_group.unwrap_or(1).max(1);
            let e = scores.size()[1];
            let group_scores = scores.f_view([n, groups, e / groups])?.f_amax([-1i64].as_slice(), false)?;
            let (_, group_idx) = group_scores.f_topk(t.topk_group.unwrap_or(1), -1, true, false)?;
            let group_mask = group_scores.f_zeros_like()?.f_scatter_value(1, &group_idx, 1.0)?;
            let score_mask = group_mask.f_unsqueeze(-1)?.f_expand([n, groups, e / groups], false)?.f_reshape([n, e])?;
            scores.f_mul(&score_mask)?.f_topk(k, -1, true, false)?
        } else {
            scores.f_topk(k, -1, true, false)?
        };
        let weights = if k > 1 && t.norm_topk_prob {
            weights.f_div(&weights.f_sum_dim_intlist(-1, true, Kind::Float)?.f_add_scalar(1e-20)?)?
        } else {
            weights
        };
        Ok((idx, weights.f_mul_scalar(t.routed_scaling_factor)?))
    }

    /// The MoE block on `x` `[batch, seq, hidden]`: tokens grouped by expert
    /// (one sort, one gather), each expert run once on its tokens, results
    /// weighted and summed back with one `index_add`; plus the shared experts.
    pub fn forward(&self, t: &TextConfig, host: Host<'_, '_>, x: &Tensor) -> R {
        let moe = self;
        let shape = x.size();
        let d = shape[2];
        let flat = x.f_reshape([-1, d])?;
        let (idx, weights) = self.route(t, host, &flat)?;
        let k = idx.size()[1];
        let flat_idx = idx.f_reshape([-1])?;
        let order = flat_idx.f_argsort(0, false)?;
        let token_of = order.f_floor_divide_scalar(k)?;
        let counts = Vec::<i64>::try_from(flat_idx.f_bincount(None::<&Tensor>, moe.experts.len() as i64)?.f_to_device(tch::Device::Cpu)?)?;
        let sorted = flat.f_index_select(0, &token_of)?;
        let mut outs = Vec::new();
        let mut start = 0;
        for (expert, &n) in moe.experts.iter().zip(&counts) {
            if n > 0 {
                outs.push(expert.forward(host, &t.hidden_act, &sorted.f_narrow(0, start, n)?)?);
                start += n;
            }
        }
        let outs = Tensor::f_cat(&outs, 0)?;
        let w = weights.f_reshape([-1])?.f_index_select(0, &order)?.f_unsqueeze(-1)?;
        let routed = flat
            .f_zeros_like()?
            .f_to_kind(Kind::Float)?
            .f_index_add(0, &token_of, &outs.f_to_kind(Kind::Float)?.f_mul(&w)?)?
            .f_to_kind(x.kind())?
            .f_view(shape.as_slice())?;
        match &moe.shared {
            Some(shared) => Ok(routed.f_add(&shared.forward(host, &t.hidden_act, x)?)?),
            None => Ok(routed),
        }
    }
}
