//! The CLIP-L part of DeepSeek-OCR's `deepencoder.py` (`VitModel`): fed with
//! SAM's features instead of its own patch embedding, position embeddings
//! interpolated to the grid, fused `qkv_proj`, quick_gelu, no final norm.

use crate::config::ClipConfig;
use tch::{Kind, Tensor};
use vlmhost_plugin_api::builder::{LayerNormParams, SpecPath};
use vlmhost_plugin_api::ops::{self, activation};
use vlmhost_plugin_api::{Host, LinearId, ParamId, ParamKind, Role, Segment};
use vlmhost_plugin_sdk::decoder::{one_output, segment_error, R};

/// The segment stack of CLIP's layers (SAM's is `sam::SAM_STACK`).
pub const CLIP_STACK: u32 = 2;

pub(crate) struct ClipLayer {
    pub(crate) ln1: LayerNormParams,
    pub(crate) qkv: LinearId,
    pub(crate) out: LinearId,
    pub(crate) ln2: LayerNormParams,
    pub(crate) fc1: LinearId,
    pub(crate) fc2: LinearId,
}

/// The CLIP-L part: its settings and handles into the spec.
pub struct Clip {
    pub(crate) config: ClipConfig,
    pub(crate) class_embedding: ParamId,
    pub(crate) position_embedding: ParamId,
    pub(crate) pre_layrnorm: LayerNormParams,
    pub(crate) layers: Vec<ClipLayer>,
}

pub(crate) fn declare_clip(p: &SpecPath, c: &ClipConfig) -> Clip {
    let w = c.width;
    let emb = p / "embeddings";
    let class_embedding = emb.param("class_embedding", &[w], ParamKind::Embedding);
    // In the checkpoint, never used: CLIP's patch tokens are SAM's features.
    (&emb / "patch_embedding").conv(&[w, 3, c.patch_size, c.patch_size], false, "Conv2d (unused by the model)");
    let position_embedding = (&emb / "position_embedding").embedding(c.grid * c.grid + 1, w);
    let layers = (0..c.layers)
        .map(|i| {
            let l = p / "transformer" / "layers" / i;
            ClipLayer {
                ln1: (&l / "layer_norm1").layer_norm(w, true, c.eps),
                qkv: (&l / "self_attn" / "qkv_proj").linear(w, 3 * w, true),
                out: (&l / "self_attn" / "out_proj").linear(w, w, true),
                ln2: (&l / "layer_norm2").layer_norm(w, true, c.eps),
                fc1: (&l / "mlp" / "fc1").linear(w, c.mlp_dim, true),
                fc2: (&l / "mlp" / "fc2").linear(c.mlp_dim, w, true),
            }
        })
        .collect();
    let pre_layrnorm = (p / "pre_layrnorm").layer_norm(w, true, c.eps);
    Clip { config: c.clone(), class_embedding, position_embedding, pre_layrnorm, layers }
}

impl Clip {
    /// The CLIP-L part on SAM's features `[n, W, g, g]`: `[n, 1 + g*g, W]`.
    pub fn forward(&self, host: Host<'_, '_>, sam_features: &Tensor) -> R {
        let (c, cfg) = (self, &self.config);
        let patches = sam_features.f_flatten(2, 3)?.f_transpose(1, 2)?;
        let (n, tokens, width) = (patches.size()[0], patches.size()[1], patches.size()[2]);
        let class = host.param(c.class_embedding)?.f_expand([n, 1, width], false)?;
        let x = Tensor::f_cat(&[&class, &patches], 1)?;
        let table = host.param(c.position_embedding)?;
        let src = cfg.grid;
        let tgt = (tokens as f64).sqrt() as i64;
        let pos = if src != tgt {
            let cls = table.f_narrow(0, 0, 1)?;
            let grid = table
                .f_narrow(0, 1, src * src)?
                .f_view([1, src, src, width])?
                .f_permute([0, 3, 1, 2])?
                .f_to_kind(Kind::Float)?
                .f_internal_upsample_bicubic2d_aa([tgt, tgt], false, None, None)?
                .f_to_kind(table.kind())?
                .f_permute([0, 2, 3, 1])?
                .f_reshape([tgt * tgt, width])?;
            Tensor::f_cat(&[&cls, &grid], 0)?
        } else {
            table
        };
        let x = ops::layer_norm(host, &c.pre_layrnorm, &x.f_add(&pos.f_unsqueeze(0)?)?)?;
        self.run_layers(host, x)
    }

    /// CLIP's transformer layers on `[n, tokens, W]` (fused `qkv_proj`, quick_gelu, no final norm).
    pub fn run_layers(&self, host: Host<'_, '_>, mut x: Tensor) -> R {
        for i in 0..self.layers.len() {
            // Each layer is a segment: the host may recompute it in backward.
            x = one_output(host.segment(Segment::new(Role::Vision, CLIP_STACK, i as u32), &[&x])?)?;
        }
        Ok(x)
    }

    /// Layer `layer` as [`Clip::run_layers`] marked it a segment.
    pub fn run_segment(&self, host: Host<'_, '_>, layer: u32, inputs: &[Tensor]) -> R<Vec<Tensor>> {
        match (self.layers.get(layer as usize), inputs) {
            (Some(l), [x]) => Ok(vec![self.layer(host, l, x)?]),
            _ => Err(segment_error(Segment::new(Role::Vision, CLIP_STACK, layer), inputs.len())),
        }
    }

    /// One transformer layer on `x` `[n, tokens, W]`.
    fn layer(&self, host: Host<'_, '_>, layer: &ClipLayer, x: &Tensor) -> R {
        let size = x.size();
        let (n, l, width) = (size[0], size[1], size[2]);
        let heads = self.config.heads;
        let hd = width / heads;
        let y = ops::layer_norm(host, &layer.ln1, x)?;
        let qkv = host.linear(layer.qkv, &y)?.f_view([n, l, 3, heads, hd])?;
        let part = |i: i64| qkv.f_select(2, i)?.f_permute([0, 2, 1, 3]);
        let att = ops::attention(&part(0)?, &part(1)?, &part(2)?, None, false, (hd as f64).powf(-0.5))?;
        let att = att.f_permute([0, 2, 1, 3])?.f_reshape([n, l, width])?;
        let h = x.f_add(&host.linear(layer.out, &att)?)?;
        let y = ops::layer_norm(host, &layer.ln2, &h)?;
        let y = host.linear(layer.fc2, &activation("quick_gelu", &host.linear(layer.fc1, &y)?)?)?;
        Ok(h.f_add(&y)?)
    }
}
