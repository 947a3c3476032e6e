//! The LLaVA-1.5 architecture under the hub checkpoint's names, following
//! transformers 5.23 `models/llava/modeling_llava.py` (feature selection, the
//! projector, merging image features into the text embeddings),
//! `models/clip/modeling_clip.py` (the vision tower) and
//! `models/llama/modeling_llama.py` (the language model).

use crate::config::{LlavaConfig, TextConfig, VisionConfig};
use vlmhost_plugin_sdk::Architecture;
use tch::Tensor;
use vlmhost_plugin_api::builder::{role_rule, LayerNormParams, SpecPath};
use vlmhost_plugin_api::ops::{self, activation};
use vlmhost_plugin_api::{BatchInputs, Host, LinearId, ModelSpec, ParamId, ParamKind, Role, Segment, SpecBuilder};
use vlmhost_plugin_sdk::keys::KeyRules;
use vlmhost_plugin_sdk::decoder::{
    attention_mask, batch_error, image_tokens, merge_image_features, one_output, past_len, segment_error, Attention,
    LlamaLayer, LlamaText, Rope, SwiGlu, TextLayout, LLM_STACK, R,
};

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

impl ClipLayer {
    /// The CLIP encoder layer on `x` `[images, tokens, hidden]`.
    fn forward(&self, host: Host<'_, '_>, vc: &VisionConfig, x: &Tensor) -> R {
        let heads = vc.num_attention_heads;
        let hd = vc.hidden_size / heads;
        let y = ops::layer_norm(host, &self.ln1, x)?;
        let (b, l) = (y.size()[0], y.size()[1]);
        let split = |t: Tensor| -> R { Ok(t.f_view([b, l, heads, hd])?.f_transpose(1, 2)?) };
        let q = split(host.linear(self.q, &y)?)?;
        let k = split(host.linear(self.k, &y)?)?;
        let val = split(host.linear(self.v, &y)?)?;
        let att = ops::attention(&q, &k, &val, None, false, (hd as f64).powf(-0.5))?;
        let att = att.f_transpose(1, 2)?.f_reshape([b, l, vc.hidden_size])?;
        let x = x.f_add(&host.linear(self.out, &att)?)?;
        let y = ops::layer_norm(host, &self.ln2, &x)?;
        let y = activation(&vc.hidden_act, &host.linear(self.fc1, &y)?)?;
        Ok(x.f_add(&host.linear(self.fc2, &y)?)?)
    }
}

/// The segment stack of the CLIP layers (the LLM's is [`LLM_STACK`]).
const VISION_STACK: u32 = 1;

struct Vision {
    class_embedding: ParamId,
    patch_embedding: ParamId,
    position_embedding: ParamId,
    pre_layrnorm: LayerNormParams,
    layers: Vec<ClipLayer>,
}

/// The model: the spec and typed handles into it.
pub struct Llava {
    pub config: LlavaConfig,
    pub spec: ModelSpec,
    vision: Vision,
    projector: (LinearId, LinearId),
    text: LlamaText,
}

fn declare_vision(root: &SpecPath, vc: &VisionConfig) -> Vision {
    let vm = root / "vision_tower" / "vision_model";
    let emb = &vm / "embeddings";
    let (h, p, eps) = (vc.hidden_size, vc.patch_size, vc.layer_norm_eps);
    let class_embedding = emb.param("class_embedding", &[h], ParamKind::Embedding);
    let patch_embedding = (&emb / "patch_embedding").conv(&[h, vc.num_channels, p, p], false, "Conv2d").weight;
    let position_embedding = (&emb / "position_embedding").embedding(vc.num_positions(), h);
    let pre_layrnorm = (&vm / "pre_layrnorm").layer_norm(h, true, eps);
    let layers = (0..vc.num_hidden_layers)
        .map(|i| {
            let l = &vm / "encoder" / "layers" / i;
            let a = &l / "self_attn";
            ClipLayer {
                k: (&a / "k_proj").linear(h, h, true),
                v: (&a / "v_proj").linear(h, h, true),
                q: (&a / "q_proj").linear(h, h, true),
                out: (&a / "out_proj").linear(h, h, true),
                ln1: (&l / "layer_norm1").layer_norm(h, true, eps),
                fc1: (&l / "mlp" / "fc1").linear(h, vc.intermediate_size, true),
                fc2: (&l / "mlp" / "fc2").linear(vc.intermediate_size, h, true),
                ln2: (&l / "layer_norm2").layer_norm(h, true, eps),
            }
        })
        .collect();
    // Declared for checkpoint fidelity; the `default` LLaVA path never uses it.
    (&vm / "post_layernorm").layer_norm(h, true, eps);
    Vision { class_embedding, patch_embedding, position_embedding, pre_layrnorm, layers }
}

fn declare_text(root: &SpecPath, tc: &TextConfig, tie: bool) -> LlamaText {
    let lm = root / "language_model";
    let layout = TextLayout {
        model: &(&lm / "model"),
        head: &(&lm / "lm_head"),
        vocab_size: tc.sizes.vocab_size,
        hidden_size: tc.sizes.hidden_size,
        num_layers: tc.sizes.num_hidden_layers,
        rms_norm_eps: tc.rms_norm_eps,
        tie,
    };
    let (d, hd, bias) = (tc.sizes.hidden_size, tc.head_dim(), tc.attention_bias);
    LlamaText::declare(&layout, |l, _| LlamaLayer {
        attn: Attention::declare(&(l / "self_attn"), d, tc.sizes.num_attention_heads, tc.kv_heads(), hd, bias, bias),
        ffn: SwiGlu::declare(&(l / "mlp"), d, tc.sizes.intermediate_size, tc.mlp_bias),
        input_norm: (l / "input_layernorm").rms_norm(d, tc.rms_norm_eps),
        post_norm: (l / "post_attention_layernorm").rms_norm(d, tc.rms_norm_eps),
    })
}

/// The spec: roles, the key layouts accepted, the names transformers 5 uses in memory.
fn build_spec(b: SpecBuilder) -> ModelSpec {
    // transformers >= 4.52 (in memory and in files it writes with
    // save_original_format=False); transformers 5's in-memory names
    // (LlavaForConditionalGeneration, what PEFT names) are the `in_memory` ones.
    let keys = KeyRules::new()
        .in_memory("model.language_model.", "language_model.model.")
        .in_memory("lm_head.", "language_model.lm_head.")
        .in_memory("model.multi_modal_projector.", "multi_modal_projector.")
        .also("model.vision_tower.vision_model.", "vision_tower.vision_model.")
        .in_memory("model.vision_tower.", "vision_tower.vision_model.")
        // the hub layout, kept as it is
        .also("vision_tower.vision_model.", "vision_tower.vision_model.")
        // transformers 5 save_original_format: no `vision_model.` segment
        .also("vision_tower.", "vision_tower.vision_model.");
    let roles = vec![
        role_rule(Role::Vision, &["vision_tower.**"], &[], "vision_tower.vision_model.encoder.layers.*"),
        role_rule(Role::Projector, &["multi_modal_projector.**"], &[], ""),
        role_rule(Role::Llm, &["language_model.**"], &[], "language_model.model.layers.*"),
    ];
    keys.spec(b, "llava", roles, &["**.position_ids"], true)
}

impl Llava {
    pub fn new(config: LlavaConfig) -> Llava {
        let b = SpecBuilder::new();
        let root = b.root();
        let (vc, tc) = (&config.vision, &config.text);
        let vision = declare_vision(&root, vc);
        let proj = &root / "multi_modal_projector";
        let feat = vc.hidden_size * config.vision_feature_layers.len() as i64;
        let bias = config.multimodal_projector_bias;
        let projector =
            ((&proj / "linear_1").linear(feat, tc.sizes.hidden_size, bias), (&proj / "linear_2").linear(tc.sizes.hidden_size, tc.sizes.hidden_size, bias));
        let text = declare_text(&root, tc, config.tie_word_embeddings);
        Llava { spec: build_spec(b), config, vision, projector, text }
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
        for i in 0..needed.min(v.layers.len()) {
            // Each CLIP layer is a segment: the host may recompute it in backward.
            x = one_output(host.segment(Segment::new(Role::Vision, VISION_STACK, i as u32), &[&x])?)?;
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

}

impl Architecture for Llava {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The forward pass, with a cache when `past` is given (empty: the first
    /// call): logits and the cache (keys and values per layer,
    /// `[batch, kv_heads, seq, head_dim]`).
    fn decode(&self, host: Host<'_, '_>, batch: &BatchInputs, past: Option<&[Tensor]>) -> R<(Tensor, Vec<Tensor>)> {
        let tc = &self.config.text;
        let ids = &batch.input_ids;
        let past_len = past_len(past);
        let x = self.text.embed(host, ids)?;
        let (image_mask, n_image_tokens) = image_tokens(ids, self.config.image_token_index)?;
        // Images belong to the prompt: later decoding steps carry none.
        let n_image_tokens = if past_len > 0 { 0 } else { n_image_tokens };
        let x = match batch.get("pixel_values") {
            Some(pv) if pv.size()[0] > 0 => {
                let features = self.image_features(host, pv)?.f_to_kind(x.kind())?;
                merge_image_features(&x, &image_mask, n_image_tokens, &features, &format!(" ({} images)", pv.size()[0]))?
            }
            _ if n_image_tokens > 0 => return Err(batch_error(format!("{n_image_tokens} image tokens but no pixel_values"))),
            _ => x,
        };
        let l = ids.size()[1];
        let rope = Rope::at(past_len, l, tc.head_dim(), self.config.rope_theta, x.device())?;
        let mask = attention_mask(&batch.attention_mask, past.is_some(), l)?;
        self.text.run(host, x, &rope, mask.as_ref(), past, batch.logit_rows(), |mlp, y| mlp.forward(host, &tc.hidden_act, y))
    }

    fn run_segment(&self, host: Host<'_, '_>, id: Segment, inputs: &[Tensor]) -> R<Vec<Tensor>> {
        let act = &self.config.text.hidden_act;
        match (id.role, id.stack, self.vision.layers.get(id.layer as usize), inputs) {
            (Role::Llm, LLM_STACK, ..) => self.text.run_segment(host, id.layer, inputs, |mlp, y| mlp.forward(host, act, y)),
            (Role::Vision, VISION_STACK, Some(layer), [x]) => Ok(vec![layer.forward(host, &self.config.vision, x)?]),
            _ => Err(segment_error(id, inputs.len())),
        }
    }
}
