//! The DeepSeek-OCR architecture under the real checkpoint's parameter names,
//! following the original remote code (`deepencoder.py`: SAM ViT-B, the CLIP-L
//! part, the linear projector; `modeling_deepseekocr.py`: how image features
//! are laid out and merged; `modeling_deepseekv2.py`: the MoE language model,
//! whose attention with `use_mla: false` is transformers' `LlamaAttention`).
//!
//! Unlike the original, which runs the whole image path under `no_grad`, the
//! vision side builds an autograd graph whenever vision trains, so modes
//! `vision` and `both` really fine-tune SAM and CLIP; when it is frozen it
//! runs without one. The projector (with `image_newline` and
//! `view_seperator`) always trains.

use crate::clip::{declare_clip, Clip, CLIP_STACK};
use crate::config::DeepseekOcrConfig;
use crate::sam::{declare_sam, Sam, SAM_STACK};
use crate::text::{declare_layer, Ffn};
pub use crate::text::{Mlp, Moe};
use vlmhost_plugin_sdk::Architecture;
use tch::Tensor;
use vlmhost_plugin_api::builder::{key_rule, role_rule};
use vlmhost_plugin_api::{BatchInputs, Host, LinearId, ModelSpec, ParamId, ParamKind, PluginError, Role, Segment, SpecBuilder};
use vlmhost_plugin_sdk::decoder::{
    attention_mask, batch_error, embed, image_tokens, merge_image_features, past_len, segment_error, LlamaText, Rope, TextLayout,
    LLM_STACK, R,
};

/// The model: the spec and typed handles into it.
pub struct DeepseekOcr {
    pub config: DeepseekOcrConfig,
    pub spec: ModelSpec,
    /// The id of `<image>` in the text.
    pub image_token_id: i64,
    pub(crate) sam: Sam,
    pub(crate) clip: Clip,
    pub(crate) projector: LinearId,
    pub(crate) image_newline: ParamId,
    pub(crate) view_seperator: ParamId,
    pub(crate) text: LlamaText<Ffn>,
}

impl DeepseekOcr {
    pub fn new(config: DeepseekOcrConfig, image_token_id: i64) -> DeepseekOcr {
        let b = SpecBuilder::new();
        let m = b.root() / "model";
        let t = &config.text;
        let d = t.sizes.hidden_size;
        let sam = declare_sam(&(&m / "sam_model"), &config.sam);
        let clip = declare_clip(&(&m / "vision_model"), &config.clip);
        let projector = (&m / "projector" / "layers").linear(config.projector_input, d, true);
        let image_newline = m.param("image_newline", &[d], ParamKind::Embedding);
        let view_seperator = m.param("view_seperator", &[d], ParamKind::Embedding);
        let layout = TextLayout {
            model: &m,
            head: &(b.root() / "lm_head"),
            vocab_size: t.sizes.vocab_size,
            hidden_size: d,
            num_layers: t.sizes.num_hidden_layers,
            rms_norm_eps: t.rms_norm_eps,
            tie: t.tie_word_embeddings,
        };
        let text = LlamaText::declare(&layout, |p, i| declare_layer(p, t, i));
        let spec = b.build(
            "deepseek_ocr",
            vec![
                role_rule(
                    Role::Vision,
                    &["model.sam_model.**", "model.vision_model.**"],
                    &[],
                    "model.vision_model.transformer.layers.*",
                ),
                role_rule(Role::Projector, &["model.projector.**", "model.image_newline", "model.view_seperator"], &[], ""),
                role_rule(
                    Role::Llm,
                    &["model.embed_tokens.**", "model.layers.**", "model.norm.**", "lm_head.**"],
                    &[],
                    "model.layers.*",
                ),
            ],
            // The checkpoint's names are this plugin's names; the remote code
            // names them the same in memory (what PEFT saves under).
            vec![],
            vec!["model.vision_model.embeddings.position_ids".into()],
            true,
        );
        let mut spec = spec;
        // The remote code names parameters as the checkpoint does (what PEFT saves under).
        spec.transformers_names = vec![key_rule("model.", "model."), key_rule("lm_head.", "lm_head.")].into();
        DeepseekOcr {
            config,
            spec,
            image_token_id,
            sam,
            clip,
            projector,
            image_newline,
            view_seperator,
            text,
        }
    }

    /// Projected features of views `[n, 3, S, S]`: `[n, (S/64)^2, hidden]`.
    /// SAM and CLIP run without autograd unless vision trains.
    pub fn encode_views(&self, host: Host<'_, '_>, pixels: &Tensor) -> R {
        let run = || -> R {
            let kind = host.param(self.sam.patch_embed.weight)?.kind();
            let sam = self.sam.forward(host, &pixels.f_to_kind(kind)?)?;
            let clip = self.clip.forward(host, &sam)?;
            let tokens = clip.size()[1] - 1;
            let clip = clip.f_narrow(1, 1, tokens)?;
            Ok(Tensor::f_cat(&[&clip, &sam.f_flatten(2, 3)?.f_permute([0, 2, 1])?], -1)?)
        };
        let features = if host.role_trains(Role::Vision) { run()? } else { tch::no_grad(run)? };
        host.linear(self.projector, &features)
    }

    /// The image-token embeddings of a batch, in text order: per image, the
    /// tiles' map (one `image_newline` per row), the global view's map (one
    /// `image_newline` per row), then `view_seperator`.
    pub fn image_embeddings(&self, host: Host<'_, '_>, batch: &BatchInputs) -> R<Option<Tensor>> {
        let Some(global) = batch.get("images_ori").filter(|t| t.size()[0] > 0) else {
            return Ok(None);
        };
        let n_images = global.size()[0];
        let grids = Vec::<i64>::try_from(batch.tensor("images_spatial_crop")?.f_reshape([-1])?)?;
        if grids.len() as i64 != 2 * n_images {
            return Err(PluginError::invalid("batch", format!("images_spatial_crop has {} entries for {n_images} images", grids.len() / 2)));
        }
        let global = self.encode_views(host, global)?;
        let local = match batch.get("images_crop").filter(|t| t.size()[0] > 0) {
            Some(tiles) => Some(self.encode_views(host, tiles)?),
            None => None,
        };
        let newline = host.param(self.image_newline)?;
        let sep = host.param(self.view_seperator)?;
        let d = newline.size()[0];
        let with_newlines = |map: &Tensor| -> R {
            let rows = map.size()[0];
            let col = newline.f_view([1, 1, d])?.f_expand([rows, 1, d], false)?.f_to_kind(map.kind())?;
            Ok(Tensor::f_cat(&[map, &col], 1)?.f_reshape([-1, d])?)
        };
        let side = |tokens: i64| (tokens as f64).sqrt().round() as i64;
        let mut parts = Vec::new();
        let mut tile = 0;
        for i in 0..n_images {
            let (wc, hc) = (grids[2 * i as usize], grids[2 * i as usize + 1]);
            if wc > 1 || hc > 1 {
                let local = local.as_ref().ok_or_else(|| {
                    PluginError::invalid("batch", format!("image {i} is tiled {wc}x{hc} but the batch has no images_crop"))
                })?;
                let n = wc * hc;
                if tile + n > local.size()[0] {
                    return Err(PluginError::invalid("batch", "images_spatial_crop asks for more tiles than images_crop holds"));
                }
                let s = side(local.size()[1]);
                let map = local
                    .f_narrow(0, tile, n)?
                    .f_view([hc, wc, s, s, d])?
                    .f_permute([0, 2, 1, 3, 4])?
                    .f_reshape([hc * s, wc * s, d])?;
                parts.push(with_newlines(&map)?);
                tile += n;
            }
            let s = side(global.size()[1]);
            parts.push(with_newlines(&global.f_get(i)?.f_view([s, s, d])?)?);
            parts.push(sep.f_view([1, d])?.f_to_kind(global.kind())?);
        }
        if let Some(local) = &local {
            if tile != local.size()[0] {
                return Err(PluginError::invalid("batch", format!("{} tiles in images_crop but images_spatial_crop uses {tile}", local.size()[0])));
            }
        }
        Ok(Some(Tensor::f_cat(&parts, 0)?))
    }

    /// Token embeddings with the image positions filled: `[batch, seq, hidden]`.
    pub fn input_embeddings(&self, host: Host<'_, '_>, batch: &BatchInputs) -> R {
        let ids = &batch.input_ids;
        let x = self.text.embed(host, ids)?;
        let (mask, n_tokens) = image_tokens(ids, self.image_token_id)?;
        match self.image_embeddings(host, batch)? {
            Some(features) => merge_image_features(&x, &mask, n_tokens, &features, ""),
            None if n_tokens > 0 => Err(batch_error(format!("{n_tokens} image tokens but no images"))),
            None => Ok(x),
        }
    }


    /// SAM ViT-B with neck and the two stride-2 convolutions:
    /// `[n, 3, S, S]` -> `[n, net_3 channels, S/64, S/64]`.
    pub fn sam(&self, host: Host<'_, '_>, pixels: &Tensor) -> R {
        self.sam.forward(host, pixels)
    }

    /// SAM ViT-B up to its neck: `[n, 3, S, S]` -> `[n, neck channels, S/16, S/16]`.
    pub fn sam_neck(&self, host: Host<'_, '_>, pixels: &Tensor) -> R {
        self.sam.neck(host, pixels)
    }

    /// The CLIP-L part on SAM's features `[n, W, g, g]`: `[n, 1 + g*g, W]`.
    pub fn clip(&self, host: Host<'_, '_>, sam_features: &Tensor) -> R {
        self.clip.forward(host, sam_features)
    }

    /// CLIP's transformer layers on `[n, tokens, W]`.
    pub fn clip_layers(&self, host: Host<'_, '_>, x: Tensor) -> R {
        self.clip.run_layers(host, x)
    }

    /// The router of `moe`: expert indices and weights `[tokens, k]` for `x` `[tokens, hidden]`.
    pub fn route(&self, host: Host<'_, '_>, moe: &Moe, x: &Tensor) -> R<(Tensor, Tensor)> {
        moe.route(&self.config.text, host, x)
    }

    /// The MoE block `moe` on `x` `[batch, seq, hidden]`.
    pub fn moe(&self, host: Host<'_, '_>, moe: &Moe, x: &Tensor) -> R {
        moe.forward(&self.config.text, host, x)
    }

    /// The MoE block of decoder layer `i`, if it has one.
    pub fn moe_of_layer(&self, i: usize) -> Option<&Moe> {
        match &self.text.layers.get(i)?.ffn {
            Ffn::Moe(m) => Some(m),
            Ffn::Dense(_) => None,
        }
    }
}

impl Architecture for DeepseekOcr {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The forward pass, with a cache when `past` is given (empty: the first
    /// call): logits and the cache (keys and values per layer,
    /// `[batch, kv_heads, seq, head_dim]`).
    fn decode(&self, host: Host<'_, '_>, batch: &BatchInputs, past: Option<&[Tensor]>) -> R<(Tensor, Vec<Tensor>)> {
        let t = &self.config.text;
        let past_len = past_len(past);
        // Images belong to the prompt: later decoding steps carry none.
        let x = if past_len > 0 { embed(host, self.text.embed_tokens, &batch.input_ids)? } else { self.input_embeddings(host, batch)? };
        let l = x.size()[1];
        let rope = Rope::at(past_len, l, t.sizes.head_dim(), t.rope_theta, x.device())?;
        let mask = attention_mask(&batch.attention_mask, past.is_some(), l)?;
        self.text.run(host, x, &rope, mask.as_ref(), past, batch.logit_rows(), |ffn, y| ffn.forward(t, host, y))
    }

    fn run_segment(&self, host: Host<'_, '_>, id: Segment, inputs: &[Tensor]) -> R<Vec<Tensor>> {
        let t = &self.config.text;
        match (id.role, id.stack) {
            (Role::Llm, LLM_STACK) => self.text.run_segment(host, id.layer, inputs, |ffn, y| ffn.forward(t, host, y)),
            (Role::Vision, SAM_STACK) => self.sam.run_segment(host, id.layer, inputs),
            (Role::Vision, CLIP_STACK) => self.clip.run_segment(host, id.layer, inputs),
            _ => Err(segment_error(id, inputs.len())),
        }
    }
}
