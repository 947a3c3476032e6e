//! The toy_vlm architecture: declared under its checkpoint names (the spec),
//! then run with the host's parameters (the forward pass).
//!
//! ```text
//! pixel_values [n, 3, 32, 32]
//!   -> 16 patches of 8x8x3 -> vision_model.embeddings.patch_embedding (Linear 192 -> 32) + position_embedding
//!   -> vision_model.encoder.layers.0 (pre-norm: LayerNorm, attention, LayerNorm, GELU MLP)
//!   -> vision_model.post_layernorm
//!   -> multi_modal_projector.linear (Linear 32 -> 64)            [n * 16, 64]
//! input_ids [b, l] -> language_model.model.embed_tokens; <image> positions replaced by the projected patches
//!   -> language_model.model.layers.{0,1} (pre-norm: RMSNorm, GQA attention with RoPE, RMSNorm, SwiGLU MLP)
//!   -> language_model.model.norm -> language_model.lm_head       logits [b, l, 512]
//! ```
//!
//! The division of work with the host:
//! * every parameter is declared here, under the name it has in
//!   `model.safetensors`; the host creates, loads, freezes and saves them;
//! * every Linear is run by the host (`host.linear`), which adds the LoRA
//!   update when the rules put an adapter there; a plugin never multiplies by
//!   a Linear's weight itself, or LoRA would silently miss that layer;
//! * norms, embeddings, attention and RoPE are plugin code, on parameters
//!   fetched with `host.param` (handles on the host's tensors: gradients
//!   flow back to them).

use crate::config::ToyConfig;
use tch::{Kind, Tensor};
use vlmhost_plugin_api::builder::{key_rule, role_rule, LayerNormParams, RmsNormParams};
use vlmhost_plugin_api::ops::{self, activation};
use vlmhost_plugin_api::{BatchInputs, Host, LinearId, ModelSpec, ParamId, PluginError, Role, Segment, SpecBuilder};

type R<T = Tensor> = Result<T, PluginError>;

/// The segment stacks ([`Segment::stack`]): the decoder layers, the vision blocks.
const LLM_STACK: u32 = 0;
const VISION_STACK: u32 = 1;

/// The one output of a segment.
fn one(mut outputs: Vec<Tensor>) -> R {
    match outputs.len() {
        1 => Ok(outputs.remove(0)),
        n => Err(PluginError::invalid("segment", format!("one output expected, {n} returned"))),
    }
}

/// One pre-norm ViT block.
struct VisionBlock {
    norm1: LayerNormParams,
    q: LinearId,
    k: LinearId,
    v: LinearId,
    out: LinearId,
    norm2: LayerNormParams,
    fc1: LinearId,
    fc2: LinearId,
}

struct Vision {
    patch_embedding: LinearId,
    position_embedding: ParamId,
    blocks: Vec<VisionBlock>,
    post_layernorm: LayerNormParams,
}

/// One Llama-style decoder layer.
struct DecoderLayer {
    input_norm: RmsNormParams,
    q: LinearId,
    k: LinearId,
    v: LinearId,
    o: LinearId,
    post_norm: RmsNormParams,
    gate: LinearId,
    up: LinearId,
    down: LinearId,
}

struct Text {
    embed_tokens: ParamId,
    layers: Vec<DecoderLayer>,
    norm: RmsNormParams,
    lm_head: LinearId,
}

/// The model: the spec (what the host needs) and typed handles into it (what
/// the forward pass needs).
pub struct ToyVlm {
    pub config: ToyConfig,
    pub spec: ModelSpec,
    vision: Vision,
    projector: LinearId,
    text: Text,
}

impl ToyVlm {
    pub fn new(config: ToyConfig) -> ToyVlm {
        let b = SpecBuilder::new();
        let root = b.root();
        let vc = &config.vision_config;
        let tc = &config.text_config;

        // --- vision encoder: `vision_model.*` -------------------------------
        // Paths are built segment by segment, so names are the checkpoint's
        // keys by construction (`vision_model.encoder.layers.0.self_attn.q_proj.weight`).
        let vm = &root / "vision_model";
        let emb = &vm / "embeddings";
        let h = vc.hidden_size;
        // The patch embedding is a Conv2d(3, h, 8, stride 8) in spirit, run as a
        // Linear over flattened patches (weight [h, 3*8*8], the conv kernel
        // reshaped). `linear_with(.., lora: false, ..)`: the host runs it, but
        // LoRA never targets it (as PEFT leaves a Conv2d alone).
        let patch_embedding = (&emb / "patch_embedding").linear_with(
            vc.patch_dim(),
            h,
            true,
            false,
            "Linear over flattened 8x8x3 patches",
        );
        let position_embedding = (&emb / "position_embedding").embedding(vc.num_patches(), h);
        let blocks = (0..vc.num_hidden_layers)
            .map(|i| {
                let l = &vm / "encoder" / "layers" / i;
                let a = &l / "self_attn";
                let eps = vc.layer_norm_eps;
                VisionBlock {
                    norm1: (&l / "layer_norm1").layer_norm(h, true, eps),
                    q: (&a / "q_proj").linear(h, h, true),
                    k: (&a / "k_proj").linear(h, h, true),
                    v: (&a / "v_proj").linear(h, h, true),
                    out: (&a / "out_proj").linear(h, h, true),
                    norm2: (&l / "layer_norm2").layer_norm(h, true, eps),
                    fc1: (&l / "mlp" / "fc1").linear(h, vc.intermediate_size, true),
                    fc2: (&l / "mlp" / "fc2").linear(vc.intermediate_size, h, true),
                }
            })
            .collect();
        let post_layernorm = (&vm / "post_layernorm").layer_norm(h, true, vc.layer_norm_eps);
        let vision = Vision { patch_embedding, position_embedding, blocks, post_layernorm };

        // --- projector: `multi_modal_projector.*` ----------------------------
        let projector = (&root / "multi_modal_projector" / "linear").linear(h, tc.hidden_size, true);

        // --- language model: `language_model.*` -------------------------------
        let lm = &root / "language_model";
        let m = &lm / "model";
        let (d, hd) = (tc.hidden_size, tc.head_dim());
        let (heads, kv) = (tc.num_attention_heads, tc.num_key_value_heads);
        let embed_tokens = (&m / "embed_tokens").embedding(tc.vocab_size, d);
        let layers = (0..tc.num_hidden_layers)
            .map(|i| {
                let l = &m / "layers" / i;
                let a = &l / "self_attn";
                let mlp = &l / "mlp";
                DecoderLayer {
                    input_norm: (&l / "input_layernorm").rms_norm(d, tc.rms_norm_eps),
                    q: (&a / "q_proj").linear(d, heads * hd, false),
                    k: (&a / "k_proj").linear(d, kv * hd, false),
                    v: (&a / "v_proj").linear(d, kv * hd, false),
                    o: (&a / "o_proj").linear(heads * hd, d, false),
                    post_norm: (&l / "post_attention_layernorm").rms_norm(d, tc.rms_norm_eps),
                    gate: (&mlp / "gate_proj").linear(d, tc.intermediate_size, false),
                    up: (&mlp / "up_proj").linear(d, tc.intermediate_size, false),
                    down: (&mlp / "down_proj").linear(tc.intermediate_size, d, false),
                }
            })
            .collect();
        let norm = (&m / "norm").rms_norm(d, tc.rms_norm_eps);
        // A head tied to the embeddings would be `linear_tied(d, vocab, "language_model.model.embed_tokens.weight")`.
        let lm_head = (&lm / "lm_head").linear(d, tc.vocab_size, false);
        let text = Text { embed_tokens, layers, norm, lm_head };

        let mut spec = b.build(
            "toy_vlm",
            // Roles: every parameter must match exactly one role (the host
            // refuses the spec otherwise, listing the strays). Patterns are
            // segment-wise and anchored: `*` one segment, `**` any number.
            // `layers` is where the repeated layers are, with `*` for the
            // index: "train only the last k layers" counts them there.
            vec![
                role_rule(Role::Vision, &["vision_model.**"], &[], "vision_model.encoder.layers.*"),
                role_rule(Role::Projector, &["multi_modal_projector.**"], &[], ""),
                role_rule(Role::Llm, &["language_model.**"], &[], "language_model.model.layers.*"),
            ],
            // Key rules: other checkpoint layouts mapped onto these names, by
            // prefix, first match wins (a key no rule matches is kept as it
            // is). Here: a layout that wraps everything in `model.` and keeps
            // the head at the top, as transformers >= 4.52 saves VLMs.
            vec![
                key_rule("model.vision_model.", "vision_model."),
                key_rule("model.multi_modal_projector.", "multi_modal_projector."),
                key_rule("model.language_model.", "language_model.model."),
                key_rule("lm_head.", "language_model.lm_head."),
            ],
            // Checkpoint keys that are not parameters (buffers some exporters
            // write), as role-style patterns: skipped, not reported as unused.
            vec!["**.rotary_emb.inv_freq".into()],
            // There is a vision encoder (an encoder-free family, Fuyu-like,
            // says false and declares no vision role).
            true,
        );
        // The names a transformers port would use in memory, which PEFT
        // writes adapters under (after `base_model.model.`): prefix rewrites
        // from the names above. Without them the host trains but writes no
        // PEFT adapter. toy_vlm has no transformers port: identity.
        spec.transformers_names = vec![
            key_rule("vision_model.", "vision_model."),
            key_rule("multi_modal_projector.", "multi_modal_projector."),
            key_rule("language_model.", "language_model."),
        ]
        .into();
        ToyVlm { config, spec, vision, projector, text }
    }

    /// Projected image features `[n_images * patches, text_hidden]`.
    fn image_features(&self, host: Host<'_, '_>, pixel_values: &Tensor) -> R {
        let vc = &self.config.vision_config;
        let v = &self.vision;
        let run = || -> R {
            let (p, g) = (vc.patch_size, vc.grid());
            let n = pixel_values.size()[0];
            // The host may run in another dtype (bf16 on CUDA): follow the weights.
            let kind = host.param(v.position_embedding)?.kind();
            // [n, 3, g*p, g*p] -> [n, g*g, 3*p*p], each patch flattened as
            // (channel, row, column): the layout of a Conv2d kernel.
            let patches = pixel_values
                .f_to_kind(kind)?
                .f_reshape([n, vc.num_channels, g, p, g, p])?
                .f_permute([0, 2, 4, 1, 3, 5])?
                .f_reshape([n, g * g, vc.patch_dim()])?;
            let pos = host.param(v.position_embedding)?;
            let mut x = host.linear(v.patch_embedding, &patches)?.f_add(&pos.f_unsqueeze(0)?)?; // [n, 16, h]
            // Each block is a segment: the host runs it back through `run_segment`, and with
            // `train.gradient_checkpointing` keeps only its input and recomputes it in backward.
            for i in 0..v.blocks.len() {
                x = one(host.segment(Segment::new(Role::Vision, VISION_STACK, i as u32), &[&x])?)?;
            }
            ops::layer_norm(host, &v.post_layernorm, &x)
        };
        // A frozen vision encoder needs no autograd graph: cheaper, same values.
        let features = if host.role_trains(Role::Vision) { run()? } else { tch::no_grad(run)? };
        let y = host.linear(self.projector, &features)?; // [n, 16, text_hidden]
        let hidden = y.size()[2];
        Ok(y.f_reshape([-1, hidden])?)
    }

    /// Vision block `block` on `x` `[n, patches, hidden]`.
    fn vision_block(&self, host: Host<'_, '_>, block: &VisionBlock, x: &Tensor) -> R {
        let vc = &self.config.vision_config;
        let heads = vc.num_attention_heads;
        let hd = vc.hidden_size / heads;
        let y = ops::layer_norm(host, &block.norm1, x)?;
        let (b, l) = (y.size()[0], y.size()[1]);
        let split = |t: Tensor| -> R { Ok(t.f_view([b, l, heads, hd])?.f_transpose(1, 2)?) }; // [b, heads, l, hd]
        let q = split(host.linear(block.q, &y)?)?;
        let k = split(host.linear(block.k, &y)?)?;
        let val = split(host.linear(block.v, &y)?)?;
        // Bidirectional attention over the patches of one image.
        let att = ops::attention(&q, &k, &val, None, false, (hd as f64).powf(-0.5))?;
        let att = att.f_transpose(1, 2)?.f_reshape([b, l, vc.hidden_size])?;
        let x = x.f_add(&host.linear(block.out, &att)?)?;
        let y = ops::layer_norm(host, &block.norm2, &x)?;
        let y = activation(&vc.hidden_act, &host.linear(block.fc1, &y)?)?;
        Ok(x.f_add(&host.linear(block.fc2, &y)?)?)
    }

    /// Decoder layer `layer` on `x` `[b, l, hidden]` at rotary `cos`/`sin`, with the
    /// cache when decoding (`(past, layer index, the next cache)`).
    #[allow(clippy::too_many_arguments)]
    fn text_layer(
        &self,
        host: Host<'_, '_>,
        layer: &DecoderLayer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<(Option<&[Tensor]>, usize, &mut Vec<Tensor>)>,
    ) -> R {
        let tc = &self.config.text_config;
        let (b, l) = (x.size()[0], x.size()[1]);
        let (heads, kv, hd) = (tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim());
        let y = ops::rms_norm(host, &layer.input_norm, x)?;
        let q = host.linear(layer.q, &y)?.f_view([b, l, heads, hd])?.f_transpose(1, 2)?; // [b, heads, l, hd]
        let k = host.linear(layer.k, &y)?.f_view([b, l, kv, hd])?.f_transpose(1, 2)?; // [b, kv, l, hd]
        let v = host.linear(layer.v, &y)?.f_view([b, l, kv, hd])?.f_transpose(1, 2)?;
        let q = ops::apply_rope(&q, cos, sin)?;
        let k = ops::apply_rope(&k, cos, sin)?;
        // With a cache: the earlier tokens' keys and values first, [b, kv, past + l, hd].
        let (k, v) = match cache {
            Some((past, i, next)) => ops::cached_kv(past, i, k, v, next)?,
            None => (k, v),
        };
        // kv < heads: grouped-query attention.
        let att = ops::attention(&q, &k, &v, mask, true, (hd as f64).powf(-0.5))?;
        let att = att.f_transpose(1, 2)?.f_reshape([b, l, heads * hd])?;
        let x = x.f_add(&host.linear(layer.o, &att)?)?;
        let y = ops::rms_norm(host, &layer.post_norm, &x)?;
        // SwiGLU: down(act(gate(y)) * up(y)).
        let gate = activation(&tc.hidden_act, &host.linear(layer.gate, &y)?)?;
        let y = gate.f_mul(&host.linear(layer.up, &y)?)?;
        Ok(x.f_add(&host.linear(layer.down, &y)?)?)
    }

    /// A segment the forward pass marked, on the inputs it passed: the host calls this
    /// (once; twice with activation checkpointing, the second time in the backward pass).
    pub fn run_segment(&self, host: Host<'_, '_>, id: Segment, inputs: &[Tensor]) -> R<Vec<Tensor>> {
        let layer = id.layer as usize;
        match (id.role, id.stack, inputs) {
            (Role::Vision, VISION_STACK, [x]) if layer < self.vision.blocks.len() => {
                Ok(vec![self.vision_block(host, &self.vision.blocks[layer], x)?])
            }
            (Role::Llm, LLM_STACK, [x, cos, sin]) if layer < self.text.layers.len() => {
                Ok(vec![self.text_layer(host, &self.text.layers[layer], x, cos, sin, None, None)?])
            }
            _ => Err(PluginError::invalid("segment", format!("toy_vlm has no segment {id:?} taking {} inputs", inputs.len()))),
        }
    }

    /// Logits `[batch, seq, vocab]` of a whole batch (`[1, n, vocab]` at the
    /// host's `logit_rows`, when it names them).
    pub fn forward(&self, host: Host<'_, '_>, batch: &BatchInputs) -> R {
        Ok(self.decode(host, batch, None)?.0)
    }

    /// Incremental decoding (`vlmhost generate`): logits of the new tokens and
    /// the cache for the next call. The cache layout is this plugin's choice:
    /// here keys and values per layer, `[k0, v0, k1, v1, ...]`, each
    /// `[batch, kv_heads, seq, head_dim]`; the host only passes it back.
    pub fn forward_cached(&self, host: Host<'_, '_>, batch: &BatchInputs, past: &[Tensor]) -> R<(Tensor, Vec<Tensor>)> {
        self.decode(host, batch, Some(past))
    }

    /// The language model, with a cache when `past` is given (empty on the first call).
    fn decode(&self, host: Host<'_, '_>, batch: &BatchInputs, past: Option<&[Tensor]>) -> R<(Tensor, Vec<Tensor>)> {
        let tc = &self.config.text_config;
        let ids = &batch.input_ids; // [b, l]
        let past_len = past.and_then(|p| p.first()).map_or(0, |k| k.size()[2]);
        let embed = host.param(self.text.embed_tokens)?;
        let mut x = Tensor::f_embedding(&embed, ids, -1, false, false)?; // [b, l, d]

        // Images: the prepared `pixel_values` of every sample, concatenated
        // along dim 0 by the host ([0, 3, 32, 32] when there are none). Their
        // features replace the <image> tokens' embeddings, in order. Later
        // decoding steps carry no image (a generated <image> id is then just a token).
        let image_mask = ids.f_eq(self.config.image_token_id)?;
        let n_image_tokens = if past_len > 0 { 0 } else { image_mask.f_sum(Kind::Int64)?.int64_value(&[]) };
        match batch.get("pixel_values") {
            Some(pv) if pv.size()[0] > 0 => {
                let features = self.image_features(host, pv)?.f_to_kind(x.kind())?;
                if features.size()[0] != n_image_tokens {
                    return Err(PluginError::invalid(
                        "batch",
                        format!("{n_image_tokens} image tokens in the text but {} image features", features.size()[0]),
                    ));
                }
                x = x.f_masked_scatter(&image_mask.f_unsqueeze(-1)?, &features)?;
            }
            _ if n_image_tokens > 0 => {
                return Err(PluginError::invalid("batch", format!("{n_image_tokens} image tokens but no pixel_values")))
            }
            _ => {}
        }

        let l = ids.size()[1];
        let hd = tc.head_dim();
        // Positions past_len..past_len+l (right padding: real tokens start at 0).
        let (cos, sin) = ops::rope_cos_sin(past_len + l, hd, tc.rope_theta, x.device())?;
        let (cos, sin) = (cos.f_narrow(0, past_len, l)?, sin.f_narrow(0, past_len, l)?);
        // Without a cache: causality alone. Batches are right-padded, so a padded key
        // only follows its row's real tokens and no real query reaches it; without an
        // explicit mask SDPA may take its fastest kernels (flash attention on CUDA).
        // With a cache: causal with the offset, padded keys hidden (`attention_mask`
        // covers past + new tokens).
        let mask = match past {
            Some(_) => Some(ops::causal_padding_mask_cached(&batch.attention_mask, l)?),
            None => None,
        };
        let mut cache = Vec::new();
        for (i, layer) in self.text.layers.iter().enumerate() {
            x = match past {
                // Decoding with a cache: the layer directly, its keys and values into the cache.
                Some(_) => self.text_layer(host, layer, &x, &cos, &sin, mask.as_ref(), Some((past, i, &mut cache)))?,
                // Training and evaluation: each layer is a segment, its inputs the hidden states
                // and the rotary tables (a segment reads nothing else but the host's parameters).
                None => one(host.segment(Segment::new(Role::Llm, LLM_STACK, i as u32), &[&x, &cos, &sin])?)?,
            };
        }
        // When the host names the positions it needs (training: those whose next token is
        // labelled), the head runs on them only: logits [1, n, vocab] instead of [b, l, vocab].
        let x = ops::select_rows(&x, batch.logit_rows())?;
        let x = ops::rms_norm(host, &self.text.norm, &x)?;
        Ok((host.linear(self.text.lm_head, &x)?, cache))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_names_are_checkpoint_keys() {
        let m = ToyVlm::new(ToyConfig::default());
        let names: Vec<&str> = m.spec.params.iter().map(|p| p.name.as_str()).collect();
        assert!(names.contains(&"vision_model.embeddings.patch_embedding.weight"));
        assert!(names.contains(&"vision_model.encoder.layers.0.self_attn.q_proj.weight"));
        assert!(names.contains(&"multi_modal_projector.linear.bias"));
        assert!(names.contains(&"language_model.model.layers.1.mlp.down_proj.weight"));
        assert!(names.contains(&"language_model.lm_head.weight"));
        let patch = m.spec.modules.iter().find(|m| m.name == "vision_model.embeddings.patch_embedding").unwrap();
        assert!(!patch.lora, "the patch embedding must not take LoRA");
        assert_eq!((patch.in_features, patch.out_features), (192, 32));
    }
}
