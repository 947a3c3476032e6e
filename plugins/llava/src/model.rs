//! The LLaVA-1.5 architecture under the hub checkpoint's names, following
//! transformers 5.23 `models/llava/modeling_llava.py` (feature selection, the
//! projector, merging image features into the text embeddings),
//! `models/clip/modeling_clip.py` (the vision tower) and
//! `models/llama/modeling_llama.py` (the language model).

use crate::config::LlavaConfig;
use tch::{Kind, Tensor};
use vlmhost_plugin_api::builder::{key_rule, role_rule, LayerNormParams, RmsNormParams};
use vlmhost_plugin_api::ops::{self, activation};
use vlmhost_plugin_api::{BatchInputs, Host, LinearId, ModelSpec, ParamId, PluginError, Role, SpecBuilder};

type R<T = Tensor> = Result<T, PluginError>;

struct ClipLayer {
    q: LinearId,
    k: LinearId,
    v: LinearId,
    out: LinearId,
    ln1: LayerNormParams,
    ln2: LayerNormParams,
    fc1: LinearId,
    fc2: LinearId,
}

struct Vision {
    class_embedding: ParamId,
    patch_embedding: ParamId,
    position_embedding: ParamId,
    pre_layrnorm: LayerNormParams,
    layers: Vec<ClipLayer>,
}

struct LlamaLayer {
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

struct Text {
    embed_tokens: ParamId,
    layers: Vec<LlamaLayer>,
    norm: RmsNormParams,
    lm_head: LinearId,
}

/// The model: the spec and typed handles into it.
pub struct Llava {
    pub config: LlavaConfig,
    pub spec: ModelSpec,
    vision: Vision,
    projector: (LinearId, LinearId),
    text: Text,
}

impl Llava {
    pub fn new(config: LlavaConfig) -> Llava {
        let b = SpecBuilder::new();
        let root = b.root();
        let vc = &config.vision;
        let tc = &config.text;

        let vm = &root / "vision_tower" / "vision_model";
        let emb = &vm / "embeddings";
        let (h, p) = (vc.hidden_size, vc.patch_size);
        let class_embedding = emb.param("class_embedding", &[h], vlmhost_plugin_api::ParamKind::Embedding);
        let patch_embedding = (&emb / "patch_embedding").conv(&[h, vc.num_channels, p, p], false, "Conv2d").weight;
        let position_embedding = (&emb / "position_embedding").embedding(vc.num_positions(), h);
        let pre_layrnorm = (&vm / "pre_layrnorm").layer_norm(h, true, vc.layer_norm_eps);
        let layers = (0..vc.num_hidden_layers)
            .map(|i| {
                let l = &vm / "encoder" / "layers" / i;
                let a = &l / "self_attn";
                ClipLayer {
                    k: (&a / "k_proj").linear(h, h, true),
                    v: (&a / "v_proj").linear(h, h, true),
                    q: (&a / "q_proj").linear(h, h, true),
                    out: (&a / "out_proj").linear(h, h, true),
                    ln1: (&l / "layer_norm1").layer_norm(h, true, vc.layer_norm_eps),
                    fc1: (&l / "mlp" / "fc1").linear(h, vc.intermediate_size, true),
                    fc2: (&l / "mlp" / "fc2").linear(vc.intermediate_size, h, true),
                    ln2: (&l / "layer_norm2").layer_norm(h, true, vc.layer_norm_eps),
                }
            })
            .collect();
        // Declared for checkpoint fidelity; the `default` LLaVA path never uses it.
        (&vm / "post_layernorm").layer_norm(h, true, vc.layer_norm_eps);
        let vision = Vision { class_embedding, patch_embedding, position_embedding, pre_layrnorm, layers };

        let proj = &root / "multi_modal_projector";
        let feat = h * config.vision_feature_layers.len() as i64;
        let bias = config.multimodal_projector_bias;
        let projector =
            ((&proj / "linear_1").linear(feat, tc.hidden_size, bias), (&proj / "linear_2").linear(tc.hidden_size, tc.hidden_size, bias));

        let lm = &root / "language_model";
        let m = &lm / "model";
        let (d, hd) = (tc.hidden_size, tc.head_dim());
        let embed_tokens = (&m / "embed_tokens").embedding(tc.vocab_size, d);
        let layers = (0..tc.num_hidden_layers)
            .map(|i| {
                let l = &m / "layers" / i;
                let a = &l / "self_attn";
                let mlp = &l / "mlp";
                LlamaLayer {
                    q: (&a / "q_proj").linear(d, tc.num_attention_heads * hd, tc.attention_bias),
                    k: (&a / "k_proj").linear(d, tc.kv_heads() * hd, tc.attention_bias),
                    v: (&a / "v_proj").linear(d, tc.kv_heads() * hd, tc.attention_bias),
                    o: (&a / "o_proj").linear(tc.num_attention_heads * hd, d, tc.attention_bias),
                    gate: (&mlp / "gate_proj").linear(d, tc.intermediate_size, tc.mlp_bias),
                    up: (&mlp / "up_proj").linear(d, tc.intermediate_size, tc.mlp_bias),
                    down: (&mlp / "down_proj").linear(tc.intermediate_size, d, tc.mlp_bias),
                    input_norm: (&l / "input_layernorm").rms_norm(d, tc.rms_norm_eps),
                    post_norm: (&l / "post_attention_layernorm").rms_norm(d, tc.rms_norm_eps),
                }
            })
            .collect();
        let norm = (&m / "norm").rms_norm(d, tc.rms_norm_eps);
        let lm_head = if config.tie_word_embeddings {
            (&lm / "lm_head").linear_tied(d, tc.vocab_size, "language_model.model.embed_tokens.weight")
        } else {
            (&lm / "lm_head").linear(d, tc.vocab_size, false)
        };
        let text = Text { embed_tokens, layers, norm, lm_head };

        let spec = b.build(
            "llava",
            vec![
                role_rule(Role::Vision, &["vision_tower.**"], &[], "vision_tower.vision_model.encoder.layers.*"),
                role_rule(Role::Projector, &["multi_modal_projector.**"], &[], ""),
                role_rule(Role::Llm, &["language_model.**"], &[], "language_model.model.layers.*"),
            ],
            vec![
                // transformers >= 4.52 (in memory and in files it writes with save_original_format=False)
                key_rule("model.language_model.", "language_model.model."),
                key_rule("lm_head.", "language_model.lm_head."),
                key_rule("model.multi_modal_projector.", "multi_modal_projector."),
                key_rule("model.vision_tower.vision_model.", "vision_tower.vision_model."),
                key_rule("model.vision_tower.", "vision_tower.vision_model."),
                // the hub layout, kept as it is
                key_rule("vision_tower.vision_model.", "vision_tower.vision_model."),
                // transformers 5 save_original_format: no `vision_model.` segment
                key_rule("vision_tower.", "vision_tower.vision_model."),
            ],
            vec!["**.position_ids".into()],
            true,
        );
        let mut spec = spec;
        // transformers 5 in memory (LlavaForConditionalGeneration): what PEFT names.
        spec.transformers_names = vec![
            key_rule("language_model.model.", "model.language_model."),
            key_rule("language_model.lm_head.", "lm_head."),
            key_rule("multi_modal_projector.", "model.multi_modal_projector."),
            key_rule("vision_tower.vision_model.", "model.vision_tower."),
        ]
        .into();
        Llava { config, spec, vision, projector, text }
    }

    /// CLIP hidden states 0..=needed (0: embeddings after pre_layrnorm).
    fn vision_hidden_states(&self, host: Host<'_, '_>, pixel_values: &Tensor, needed: usize) -> R<Vec<Tensor>> {
        let vc = &self.config.vision;
        let v = &self.vision;
        let w = host.param(v.patch_embedding)?;
        let pixel_values = pixel_values.f_to_kind(w.kind())?;
        // [n, hidden, grid, grid] -> [n, grid*grid, hidden]
        let patches = pixel_values
            .f_conv2d(&w, None::<&Tensor>, [vc.patch_size, vc.patch_size], [0, 0], [1, 1], 1)?
            .f_flatten(2, 3)?
            .f_transpose(1, 2)?;
        let n = patches.size()[0];
        let class = host.param(v.class_embedding)?.f_expand([n, 1, vc.hidden_size], false)?;
        let pos = host.param(v.position_embedding)?;
        let mut x = Tensor::f_cat(&[&class, &patches], 1)?.f_add(&pos.f_unsqueeze(0)?)?;
        x = ops::layer_norm(host, &v.pre_layrnorm, &x)?;
        let mut states = vec![x.shallow_clone()];
        let heads = vc.num_attention_heads;
        let hd = vc.hidden_size / heads;
        for layer in v.layers.iter().take(needed) {
            let residual = x.shallow_clone();
            let y = ops::layer_norm(host, &layer.ln1, &x)?;
            let (b, l) = (y.size()[0], y.size()[1]);
            let split = |t: Tensor| -> R { Ok(t.f_view([b, l, heads, hd])?.f_transpose(1, 2)?) };
            let q = split(host.linear(layer.q, &y)?)?;
            let k = split(host.linear(layer.k, &y)?)?;
            let val = split(host.linear(layer.v, &y)?)?;
            let att = ops::attention(&q, &k, &val, None, false, (hd as f64).powf(-0.5))?;
            let att = att.f_transpose(1, 2)?.f_reshape([b, l, vc.hidden_size])?;
            x = residual.f_add(&host.linear(layer.out, &att)?)?;
            let residual = x.shallow_clone();
            let y = ops::layer_norm(host, &layer.ln2, &x)?;
            let y = activation(&vc.hidden_act, &host.linear(layer.fc1, &y)?)?;
            x = residual.f_add(&host.linear(layer.fc2, &y)?)?;
            states.push(x.shallow_clone());
        }
        Ok(states)
    }

    /// Projected image features `[n_images * tokens, text_hidden]`.
    fn image_features(&self, host: Host<'_, '_>, pixel_values: &Tensor) -> R {
        let indices: Vec<usize> =
            self.config.vision_feature_layers.iter().map(|&l| self.config.hidden_state_index(l)).collect();
        let needed = *indices.iter().max().unwrap_or(&0);
        let run = || -> R<Tensor> {
            let states = self.vision_hidden_states(host, pixel_values, needed)?;
            let picked: Vec<Tensor> = indices
                .iter()
                .map(|&i| {
                    let s = &states[i];
                    if self.config.vision_feature_select_strategy == "default" {
                        s.f_narrow(1, 1, s.size()[1] - 1)
                    } else {
                        Ok(s.shallow_clone())
                    }
                })
                .collect::<Result<_, _>>()?;
            Ok(Tensor::f_cat(&picked, -1)?)
        };
        // A frozen vision tower needs no autograd graph.
        let features = if host.role_trains(Role::Vision) { run()? } else { tch::no_grad(run)? };
        let y = host.linear(self.projector.0, &features)?;
        let y = activation(&self.config.projector_hidden_act, &y)?;
        let y = host.linear(self.projector.1, &y)?;
        let hidden = y.size()[2];
        Ok(y.f_reshape([-1, hidden])?)
    }

    /// Logits `[batch, seq, vocab]`.
    pub fn forward(&self, host: Host<'_, '_>, batch: &BatchInputs) -> R {
        Ok(self.decode(host, batch, None)?.0)
    }

    /// Incremental decoding: logits of the new tokens and the cache (keys and
    /// values per layer, `[batch, kv_heads, seq, head_dim]`).
    pub fn forward_cached(&self, host: Host<'_, '_>, batch: &BatchInputs, past: &[Tensor]) -> R<(Tensor, Vec<Tensor>)> {
        self.decode(host, batch, Some(past))
    }

    /// The forward pass, with a cache when `past` is given (empty: the first call).
    fn decode(&self, host: Host<'_, '_>, batch: &BatchInputs, past: Option<&[Tensor]>) -> R<(Tensor, Vec<Tensor>)> {
        let tc = &self.config.text;
        let ids = &batch.input_ids;
        let past_len = past.and_then(|p| p.first()).map_or(0, |k| k.size()[2]);
        let embed = host.param(self.text.embed_tokens)?;
        let mut x = Tensor::f_embedding(&embed, ids, -1, false, false)?;
        let image_mask = ids.f_eq(self.config.image_token_index)?;
        // Images belong to the prompt: later decoding steps carry none.
        let n_image_tokens = if past_len > 0 { 0 } else { image_mask.f_sum(Kind::Int64)?.int64_value(&[]) };
        match batch.get("pixel_values") {
            Some(pv) if pv.size()[0] > 0 => {
                let features = self.image_features(host, pv)?.f_to_kind(x.kind())?;
                if features.size()[0] != n_image_tokens {
                    return Err(PluginError::invalid(
                        "batch",
                        format!(
                            "{} image tokens in the text but {} image features ({} images)",
                            n_image_tokens,
                            features.size()[0],
                            pv.size()[0]
                        ),
                    ));
                }
                x = x.f_masked_scatter(&image_mask.f_unsqueeze(-1)?, &features)?;
            }
            _ if n_image_tokens > 0 => {
                return Err(PluginError::invalid("batch", format!("{n_image_tokens} image tokens but no pixel_values")))
            }
            _ => {}
        }
        let (b, l) = (ids.size()[0], ids.size()[1]);
        let (heads, kv, hd) = (tc.num_attention_heads, tc.kv_heads(), tc.head_dim());
        let (cos, sin) = ops::rope_cos_sin(past_len + l, hd, self.config.rope_theta, x.device())?;
        let (cos, sin) = (cos.f_narrow(0, past_len, l)?, sin.f_narrow(0, past_len, l)?);
        let mask = match past {
            Some(_) => ops::causal_padding_mask_cached(&batch.attention_mask, l)?,
            None => ops::causal_padding_mask(&batch.attention_mask)?,
        };
        let mut cache = Vec::new();
        for (i, layer) in self.text.layers.iter().enumerate() {
            let residual = x.shallow_clone();
            let y = ops::rms_norm(host, &layer.input_norm, &x)?;
            let q = host.linear(layer.q, &y)?.f_view([b, l, heads, hd])?.f_transpose(1, 2)?;
            let k = host.linear(layer.k, &y)?.f_view([b, l, kv, hd])?.f_transpose(1, 2)?;
            let v = host.linear(layer.v, &y)?.f_view([b, l, kv, hd])?.f_transpose(1, 2)?;
            let q = ops::apply_rope(&q, &cos, &sin)?;
            let k = ops::apply_rope(&k, &cos, &sin)?;
            let (k, v) = ops::cached_kv(past, i, k, v, &mut cache)?;
            let att = ops::attention(&q, &k, &v, Some(&mask), true, (hd as f64).powf(-0.5))?;
            let att = att.f_transpose(1, 2)?.f_reshape([b, l, heads * hd])?;
            x = residual.f_add(&host.linear(layer.o, &att)?)?;
            let residual = x.shallow_clone();
            let y = ops::rms_norm(host, &layer.post_norm, &x)?;
            let gate = activation(&tc.hidden_act, &host.linear(layer.gate, &y)?)?;
            let y = gate.f_mul(&host.linear(layer.up, &y)?)?;
            x = residual.f_add(&host.linear(layer.down, &y)?)?;
        }
        let x = ops::rms_norm(host, &self.text.norm, &x)?;
        Ok((host.linear(self.text.lm_head, &x)?, cache))
    }
}
