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

use crate::clip::{declare_clip, Clip};
use crate::config::DeepseekOcrConfig;
use crate::sam::{declare_sam, Sam};
use crate::text::{declare_layer, Ffn, Layer};
pub use crate::text::{Mlp, Moe};
use tch::{Kind, Tensor};
use vlmhost_plugin_api::builder::{key_rule, role_rule, RmsNormParams};
use vlmhost_plugin_api::ops;
use vlmhost_plugin_api::{BatchInputs, Host, LinearId, ModelSpec, ParamId, ParamKind, PluginError, Role, SpecBuilder};

pub(crate) type R<T = Tensor> = Result<T, PluginError>;

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
    pub(crate) embed_tokens: ParamId,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: RmsNormParams,
    pub(crate) lm_head: LinearId,
}

impl DeepseekOcr {
    pub fn new(config: DeepseekOcrConfig, image_token_id: i64) -> DeepseekOcr {
        let b = SpecBuilder::new();
        let m = b.root() / "model";
        let t = &config.text;
        let d = t.hidden_size;
        let sam = declare_sam(&(&m / "sam_model"), &config.sam);
        let clip = declare_clip(&(&m / "vision_model"), &config.clip);
        let projector = (&m / "projector" / "layers").linear(config.projector_input, d, true);
        let image_newline = m.param("image_newline", &[d], ParamKind::Embedding);
        let view_seperator = m.param("view_seperator", &[d], ParamKind::Embedding);
        let embed_tokens = (&m / "embed_tokens").embedding(t.vocab_size, d);
        let layers = (0..t.num_hidden_layers).map(|i| declare_layer(&(&m / "layers" / i), t, i)).collect();
        let norm = (&m / "norm").rms_norm(d, t.rms_norm_eps);
        let lm_head = if t.tie_word_embeddings {
            (b.root() / "lm_head").linear_tied(d, t.vocab_size, "model.embed_tokens.weight")
        } else {
            (b.root() / "lm_head").linear(d, t.vocab_size, false)
        };
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
            embed_tokens,
            layers,
            norm,
            lm_head,
        }
    }

    /// Projected features of views `[n, 3, S, S]`: `[n, (S/64)^2, hidden]`.
    /// SAM and CLIP run without autograd unless vision trains.
    pub fn encode_views(&self, host: Host<'_, '_>, pixels: &Tensor) -> R {
        let run = || -> R {
            let kind = host.param(self.sam.patch_embed.weight)?.kind();
            let sam = self.sam(host, &pixels.f_to_kind(kind)?)?;
            let clip = self.clip(host, &sam)?;
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
        let embed = host.param(self.embed_tokens)?;
        let x = Tensor::f_embedding(&embed, ids, -1, false, false)?;
        let mask = ids.f_eq(self.image_token_id)?;
        let n_tokens = mask.f_sum(Kind::Int64)?.int64_value(&[]);
        match self.image_embeddings(host, batch)? {
            Some(features) => {
                if features.size()[0] != n_tokens {
                    return Err(PluginError::invalid(
                        "batch",
                        format!("{n_tokens} image tokens in the text but {} image features", features.size()[0]),
                    ));
                }
                Ok(x.f_masked_scatter(&mask.f_unsqueeze(-1)?, &features.f_to_kind(x.kind())?)?)
            }
            None if n_tokens > 0 => Err(PluginError::invalid("batch", format!("{n_tokens} image tokens but no images"))),
            None => Ok(x),
        }
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
        let t = &self.config.text;
        let past_len = past.and_then(|p| p.first()).map_or(0, |k| k.size()[2]);
        // Images belong to the prompt: later decoding steps carry none.
        let mut x = if past_len > 0 {
            Tensor::f_embedding(&host.param(self.embed_tokens)?, &batch.input_ids, -1, false, false)?
        } else {
            self.input_embeddings(host, batch)?
        };
        let (b, l) = (x.size()[0], x.size()[1]);
        let (heads, kv, hd) = (t.num_attention_heads, t.kv_heads(), t.head_dim());
        let (cos, sin) = ops::rope_cos_sin(past_len + l, hd, t.rope_theta, x.device())?;
        let (cos, sin) = (cos.f_narrow(0, past_len, l)?, sin.f_narrow(0, past_len, l)?);
        let mask = match past {
            Some(_) => ops::causal_padding_mask_cached(&batch.attention_mask, l)?,
            None => ops::causal_padding_mask(&batch.attention_mask)?,
        };
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
            let att = ops::attention(&q, &k, &v, Some(&mask), true, (hd as f64).powf(-0.5))?;
            let att = att.f_transpose(1, 2)?.f_reshape([b, l, heads * hd])?;
            x = residual.f_add(&host.linear(layer.o, &att)?)?;
            let y = ops::rms_norm(host, &layer.post_norm, &x)?;
            let y = match &layer.ffn {
                Ffn::Dense(m) => self.mlp(host, m, &y)?,
                Ffn::Moe(moe) => self.moe(host, moe, &y)?,
            };
            x = x.f_add(&y)?;
        }
        let x = ops::rms_norm(host, &self.norm, &x)?;
        Ok((host.linear(self.lm_head, &x)?, cache))
    }

    /// The MoE block of decoder layer `i`, if it has one.
    pub fn moe_of_layer(&self, i: usize) -> Option<&Moe> {
        match &self.layers.get(i)?.ffn {
            Ffn::Moe(m) => Some(m),
            Ffn::Dense(_) => None,
        }
    }
}

