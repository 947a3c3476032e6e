//! The Fuyu architecture under the hub checkpoint's names, following
//! transformers 5.23 `models/fuyu/modeling_fuyu.py` (patches projected by
//! `vision_embed_tokens` and scattered over the `|SPEAKER|` tokens) and
//! `models/persimmon/modeling_persimmon.py` (the decoder: fused QKV split per
//! head, q/k LayerNorm, partial rotary embeddings, relu2 MLP, biases
//! everywhere, final LayerNorm) with an untied `lm_head`.
//!
//! There is no vision encoder: `vision_embed_tokens` is the whole image path
//! and plays the projector role; everything under `language_model.` is the LLM.

use crate::config::FuyuConfig;
use vlmhost_plugin_sdk::Architecture;
use tch::Tensor;
use vlmhost_plugin_api::builder::{role_rule, LayerNormParams};
use vlmhost_plugin_api::ops::{self, activation};
use vlmhost_plugin_api::{BatchInputs, Host, LinearId, ModelSpec, ParamId, PluginError, Role, Segment, SpecBuilder};

use vlmhost_plugin_sdk::keys::KeyRules;
use vlmhost_plugin_sdk::decoder::{attention_mask, embed, image_tokens, one_output, segment_error, KvCache, Rope, LLM_STACK, R};

struct Layer {
    qkv: LinearId,
    dense: LinearId,
    q_norm: Option<LayerNormParams>,
    k_norm: Option<LayerNormParams>,
    input_norm: LayerNormParams,
    post_norm: LayerNormParams,
    h_to_4h: LinearId,
    four_h_to_h: LinearId,
}

/// The model: the spec and typed handles into it.
pub struct Fuyu {
    pub config: FuyuConfig,
    pub spec: ModelSpec,
    vision_embed_tokens: LinearId,
    embed_tokens: ParamId,
    layers: Vec<Layer>,
    final_norm: LayerNormParams,
    lm_head: LinearId,
}

impl Fuyu {
    pub fn new(config: FuyuConfig) -> Fuyu {
        let b = SpecBuilder::new();
        let root = b.root();
        let t = &config.text;
        let (d, hd, eps) = (t.sizes.hidden_size, t.sizes.head_dim(), t.layer_norm_eps);

        // [patches, p*p*C] -> [patches, hidden]
        let vision_embed_tokens = (&root / "vision_embed_tokens").linear(config.patch_features(), d, true);

        let lm = &root / "language_model";
        let m = &lm / "model";
        let embed_tokens = (&m / "embed_tokens").embedding(t.sizes.vocab_size, d);
        let layers = (0..t.sizes.num_hidden_layers)
            .map(|i| {
                let l = &m / "layers" / i;
                let a = &l / "self_attn";
                let mlp = &l / "mlp";
                Layer {
                    qkv: (&a / "query_key_value").linear(d, 3 * d, true),
                    dense: (&a / "dense").linear(d, d, true),
                    q_norm: t.qk_layernorm.then(|| (&a / "q_layernorm").layer_norm(hd, true, eps)),
                    k_norm: t.qk_layernorm.then(|| (&a / "k_layernorm").layer_norm(hd, true, eps)),
                    h_to_4h: (&mlp / "dense_h_to_4h").linear(d, t.sizes.intermediate_size, true),
                    four_h_to_h: (&mlp / "dense_4h_to_h").linear(t.sizes.intermediate_size, d, true),
                    input_norm: (&l / "input_layernorm").layer_norm(d, true, eps),
                    post_norm: (&l / "post_attention_layernorm").layer_norm(d, true, eps),
                }
            })
            .collect();
        let final_norm = (&m / "final_layernorm").layer_norm(d, true, eps);
        let lm_head = if config.tie_word_embeddings {
            (&lm / "lm_head").linear_tied(d, t.sizes.vocab_size, "language_model.model.embed_tokens.weight")
        } else {
            (&lm / "lm_head").linear(d, t.sizes.vocab_size, false)
        };

        // transformers 5 in memory (FuyuForCausalLM, what PEFT names; and
        // save_pretrained with save_original_format=False).
        let keys = KeyRules::new()
            .in_memory("model.language_model.", "language_model.model.")
            .in_memory("lm_head.", "language_model.lm_head.")
            .in_memory("model.vision_embed_tokens.", "vision_embed_tokens.");
        let roles = vec![
            role_rule(Role::Projector, &["vision_embed_tokens.**"], &[], ""),
            role_rule(Role::Llm, &["language_model.**"], &[], "language_model.model.layers.*"),
        ];
        // The rotary buffer is non-persistent in transformers; ignored should a checkpoint carry it.
        let spec = keys.spec(b, "fuyu", roles, &["**.rotary_emb.inv_freq"], false);
        Fuyu { config, spec, vision_embed_tokens, embed_tokens, layers, final_norm, lm_head }
    }


    /// Token embeddings with the projected patches in place of the `|SPEAKER|`
    /// tokens (`FuyuModel.forward`: `masked_scatter` in batch order).
    fn embeddings(&self, host: Host<'_, '_>, batch: &BatchInputs, first_call: bool) -> R {
        let ids = &batch.input_ids;
        let x = embed(host, self.embed_tokens, ids)?; // [B, L, D]
        let (image_mask, n_tokens) = image_tokens(ids, self.config.image_token_id)?;
        // Images belong to the prompt: later decoding steps carry none.
        let n_tokens = if first_call { n_tokens } else { 0 };
        let patches = batch.get("pixel_values").filter(|p| p.numel() > 0);
        match patches {
            Some(pv) => {
                let size = pv.size();
                if size.len() != 2 || size[1] != self.config.patch_features() {
                    return Err(PluginError::invalid(
                        "batch",
                        format!("pixel_values has shape {size:?}, expected [patches, {}]", self.config.patch_features()),
                    ));
                }
                if size[0] != n_tokens {
                    return Err(PluginError::invalid(
                        "batch",
                        format!("{n_tokens} image tokens (|SPEAKER|) in the text but {} patches", size[0]),
                    ));
                }
                let w = host.param(self.spec_weight(self.vision_embed_tokens))?;
                let features = host.linear(self.vision_embed_tokens, &pv.f_to_kind(w.kind())?)?.f_to_kind(x.kind())?;
                Ok(x.f_masked_scatter(&image_mask.f_unsqueeze(-1)?, &features)?)
            }
            None if n_tokens > 0 => Err(PluginError::invalid("batch", format!("{n_tokens} image tokens but no pixel_values"))),
            None => Ok(x),
        }
    }

    fn spec_weight(&self, id: LinearId) -> ParamId {
        ParamId(self.spec.modules[id.0 as usize].weight)
    }


    /// Persimmon's attention on `y` `[B, L, D]`: fused QKV split per head,
    /// q/k LayerNorm, rotary embeddings on the first `rotary_dim` dimensions
    /// of each head, attention dropout when training.
    fn attention(&self, host: Host<'_, '_>, layer: &Layer, y: &Tensor, rope: &Rope, mask: Option<&Tensor>, cache: &mut KvCache<'_>) -> R {
        let t = &self.config.text;
        let (b, l) = (y.size()[0], y.size()[1]);
        let (heads, hd, rd) = (t.sizes.num_attention_heads, t.sizes.head_dim(), t.rotary_dim());
        // Rotate the first `rd` dimensions of each head, pass the rest through.
        let partial = |v: &Tensor| -> R {
            let rotated = rope.apply(&v.f_narrow(-1, 0, rd)?)?;
            Ok(Tensor::f_cat(&[&rotated, &v.f_narrow(-1, rd, hd - rd)?], -1)?)
        };
        // [B, L, 3D] -> [B, L, heads, 3, hd]: q, k, v interleaved per head.
        let qkv = host.linear(layer.qkv, y)?.f_view([b, l, heads, 3, hd])?;
        let (mut q, mut k, v) = (qkv.f_select(3, 0)?, qkv.f_select(3, 1)?, qkv.f_select(3, 2)?);
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            q = ops::layer_norm(host, qn, &q)?;
            k = ops::layer_norm(host, kn, &k)?;
        }
        // [B, heads, L, hd]
        let q = partial(&q.f_transpose(1, 2)?)?;
        let k = partial(&k.f_transpose(1, 2)?)?;
        let (k, v) = cache.append(k, v.f_transpose(1, 2)?)?;
        let dropout = if host.training() { t.attention_dropout } else { 0.0 };
        let att = Tensor::f_scaled_dot_product_attention(&q, &k, &v, mask, dropout, mask.is_none(), (hd as f64).powf(-0.5), false)?;
        host.linear(layer.dense, &att.f_transpose(1, 2)?.f_reshape([b, l, heads * hd])?)
    }
}

impl Fuyu {
    /// Decoder layer `layer` on `x` `[batch, seq, hidden]`.
    fn layer(&self, host: Host<'_, '_>, layer: &Layer, x: &Tensor, rope: &Rope, mask: Option<&Tensor>, cache: &mut KvCache<'_>) -> R {
        let t = &self.config.text;
        let y = ops::layer_norm(host, &layer.input_norm, x)?;
        let x = x.f_add(&self.attention(host, layer, &y, rope, mask, cache)?)?;
        let y = ops::layer_norm(host, &layer.post_norm, &x)?;
        let y = activation(&t.hidden_act, &host.linear(layer.h_to_4h, &y)?)?;
        let mut y = host.linear(layer.four_h_to_h, &y)?;
        if host.training() && t.hidden_dropout > 0.0 {
            y = y.f_dropout(t.hidden_dropout, true)?;
        }
        Ok(y.f_add(&x)?)
    }
}

impl Architecture for Fuyu {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The forward pass, with a cache when `past` is given (empty: the first
    /// call): logits and the cache (keys and values per layer,
    /// `[batch, heads, seq, head_dim]`, keys after RoPE).
    fn decode(&self, host: Host<'_, '_>, batch: &BatchInputs, past: Option<&[Tensor]>) -> R<(Tensor, Vec<Tensor>)> {
        let want = 2 * self.layers.len();
        if let Some(past) = past.filter(|p| !p.is_empty() && p.len() != want) {
            return Err(PluginError::invalid("cache", format!("{} tensors, expected {want} (keys and values per layer)", past.len())));
        }
        let t = &self.config.text;
        let mut cache = KvCache::new(past);
        let past_len = cache.past_len();
        let mut x = self.embeddings(host, batch, past_len == 0)?;
        let l = batch.input_ids.size()[1];
        let rope = Rope::at(past_len, l, t.rotary_dim(), t.rope_theta, x.device())?;
        let mask = attention_mask(&batch.attention_mask, past.is_some(), l)?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = if past.is_some() {
                self.layer(host, layer, &x, &rope, mask.as_ref(), &mut cache)?
            } else {
                // Without a cache each layer is a segment: the host may recompute it in backward.
                let mut inputs = vec![&x, &rope.cos, &rope.sin];
                inputs.extend(mask.as_ref());
                one_output(host.segment(Segment::new(Role::Llm, LLM_STACK, i as u32), &inputs)?)?
            };
        }
        // The head on the positions the host needs only (training: those whose next token is labelled).
        let x = ops::select_rows(&x, batch.logit_rows())?;
        let x = ops::layer_norm(host, &self.final_norm, &x)?;
        Ok((host.linear(self.lm_head, &x)?, cache.into_next()))
    }

    /// Decoder layer `id.layer` as `decode` marked it a segment, on its
    /// inputs (hidden states, the rotary `cos` and `sin`, the mask if any).
    fn run_segment(&self, host: Host<'_, '_>, id: Segment, inputs: &[Tensor]) -> R<Vec<Tensor>> {
        match (id.role, id.stack, self.layers.get(id.layer as usize), inputs) {
            (Role::Llm, LLM_STACK, Some(layer), [x, cos, sin, mask @ ..]) => {
                let rope = Rope { cos: cos.shallow_clone(), sin: sin.shallow_clone() };
                Ok(vec![self.layer(host, layer, x, &rope, mask.first(), &mut KvCache::new(None))?])
            }
            _ => Err(segment_error(id, inputs.len())),
        }
    }
}
