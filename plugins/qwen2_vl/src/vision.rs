//! The Qwen2-VL vision tower (`visual.*`) and the patch merger, following
//! transformers 5.23 `models/qwen2_vl/modeling_qwen2_vl.py`
//! (`PatchEmbed`, `Qwen2VLVisionBlock`, `VisionAttention`, `PatchMerger`,
//! `Qwen2VisionTransformerPretrainedModel`).
//!
//! * The patch embedding is a Conv3d whose kernel equals its stride and its
//!   input (`[C, T, P, P]` per patch row): it is declared under the
//!   checkpoint's name and 5-D shape, and run as one matrix product of the
//!   `[patches, 1176]` rows with the kernel viewed as `[embed, 1176]`, equal
//!   to the convolution and much faster. It never takes LoRA.
//! * Attention is confined to each image (each frame): transformers'
//!   `cu_seqlens`, a block-diagonal mask, computed here image by image, with
//!   runs of equally sized images batched into one attention call.
//! * The merger (`visual.merger.*`) is the projector role: LayerNorm, then
//!   each 2x2 group of neighbouring patches (consecutive rows, by the
//!   processor's patch order) concatenated and sent through Linear, GELU, Linear.

use crate::config::VisionConfig;
use crate::rope::{vision_cos_sin, vision_positions, Grid};
use tch::{Kind, Tensor};
use vlmhost_plugin_api::builder::{ConvParams, LayerNormParams, SpecPath};
use vlmhost_plugin_api::ops::{self, activation};
use vlmhost_plugin_api::{Host, LinearId, PluginError, Role, Segment};
use vlmhost_plugin_sdk::decoder::{one_output, segment_error};

type R<T = Tensor> = Result<T, PluginError>;

struct Block {
    norm1: LayerNormParams,
    norm2: LayerNormParams,
    qkv: LinearId,
    proj: LinearId,
    fc1: LinearId,
    fc2: LinearId,
}

impl Block {
    /// The block on `x` `[patches, embed]`, attention confined to frames of `segments` patches.
    fn forward(&self, host: Host<'_, '_>, c: &VisionConfig, x: &Tensor, cos: &Tensor, sin: &Tensor, segments: &[i64]) -> R {
        let (n, hd, heads) = (x.size()[0], c.head_dim(), c.num_heads);
        let y = ops::layer_norm(host, &self.norm1, x)?;
        let (q, k, v) = rotated_qkv(host, self.qkv, &y, heads, hd, cos, sin)?;
        let att = segment_attention(&q, &k, &v, segments, (hd as f64).powf(-0.5))?;
        let x = x.f_add(&host.linear(self.proj, &att.f_reshape([n, c.embed_dim])?)?)?;
        let y = ops::layer_norm(host, &self.norm2, &x)?;
        let y = activation(&c.hidden_act, &host.linear(self.fc1, &y)?)?;
        Ok(x.f_add(&host.linear(self.fc2, &y)?)?)
    }
}

/// The segment stack of the vision blocks (the LLM's is `decoder::LLM_STACK`).
pub const VISION_STACK: u32 = 1;

/// Handles into the spec for `visual.*`.
pub struct Vision {
    config: VisionConfig,
    patch_embed: ConvParams,
    blocks: Vec<Block>,
    ln_q: LayerNormParams,
    merger: (LinearId, LinearId),
}

/// LayerNorm epsilon of the vision blocks and the merger (hard-coded in transformers).
const LN_EPS: f64 = 1e-6;

impl Vision {
    /// Declare `visual.*` under `visual`.
    pub fn declare(visual: &SpecPath, c: &VisionConfig) -> Vision {
        let e = c.embed_dim;
        let kernel = [e, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size];
        let patch_embed = (visual / "patch_embed" / "proj").conv(&kernel, false, "Conv3d run as Linear");
        let blocks = (0..c.depth)
            .map(|i| {
                let b = visual / "blocks" / i;
                Block {
                    norm1: (&b / "norm1").layer_norm(e, true, LN_EPS),
                    norm2: (&b / "norm2").layer_norm(e, true, LN_EPS),
                    qkv: (&b / "attn" / "qkv").linear(e, 3 * e, true),
                    proj: (&b / "attn" / "proj").linear(e, e, true),
                    fc1: (&b / "mlp" / "fc1").linear(e, c.mlp_hidden(), true),
                    fc2: (&b / "mlp" / "fc2").linear(c.mlp_hidden(), e, true),
                }
            })
            .collect();
        let m = visual / "merger";
        let ln_q = (&m / "ln_q").layer_norm(e, true, LN_EPS);
        let merged = c.merged_dim();
        let merger = ((&m / "mlp" / 0).linear(merged, merged, true), (&m / "mlp" / 2).linear(merged, c.hidden_size, true));
        Vision { config: c.clone(), patch_embed, blocks, ln_q, merger }
    }

    /// The encoder's output before the merger, `[patches, embed_dim]`, for
    /// `pixel_values` `[patches, C*T*P*P]` of images with `grids`.
    pub fn encode(&self, host: Host<'_, '_>, pixel_values: &Tensor, grids: &[Grid]) -> R {
        let c = &self.config;
        let mut x = embed_patches(host, c, &self.patch_embed, pixel_values, grids)?;
        let hd = c.head_dim();
        let (cos, sin) = vision_cos_sin(&vision_positions(grids, c.spatial_merge_size), hd, c.rope_theta, x.device())?;
        // Attention segments: one per frame (h * w patches).
        let segments: Vec<i64> = grids.iter().flat_map(|g| std::iter::repeat_n(g[1] * g[2], g[0] as usize)).collect();
        // The frames' sizes travel with each block's inputs, as a tensor.
        let frames = Tensor::f_from_slice(&segments)?;
        for i in 0..self.blocks.len() {
            // Each block is a segment: the host may recompute it in backward.
            x = one_output(host.segment(Segment::new(Role::Vision, VISION_STACK, i as u32), &[&x, &cos, &sin, &frames])?)?;
        }
        Ok(x)
    }

    /// Block `layer` as [`Vision::encode`] marked it a segment, on its inputs
    /// (hidden states, the rotary `cos` and `sin`, the frames' sizes).
    pub fn run_segment(&self, host: Host<'_, '_>, layer: u32, inputs: &[Tensor]) -> R<Vec<Tensor>> {
        let (Some(b), [x, cos, sin, frames]) = (self.blocks.get(layer as usize), inputs) else {
            return Err(segment_error(Segment::new(Role::Vision, VISION_STACK, layer), inputs.len()));
        };
        let frames = Vec::<i64>::try_from(frames)?;
        Ok(vec![b.forward(host, &self.config, x, cos, sin, &frames)?])
    }

    /// The merger (projector role): `[patches, embed]` -> `[patches / merge^2, hidden]`.
    pub fn merge(&self, host: Host<'_, '_>, encoded: &Tensor) -> R {
        let y = ops::layer_norm(host, &self.ln_q, encoded)?.f_reshape([-1, self.config.merged_dim()])?;
        let y = host.linear(self.merger.0, &y)?.f_gelu("none")?;
        host.linear(self.merger.1, &y)
    }
}

/// The patch embedding of `pixel_values` `[patches, C*T*P*P]` of images with
/// `grids`: `[patches, embed]`. The Conv3d's kernel equals its stride and the
/// whole patch, so it is one matrix product. (Qwen2-VL and Qwen2.5-VL.)
pub fn embed_patches(host: Host<'_, '_>, c: &VisionConfig, conv: &ConvParams, pixel_values: &Tensor, grids: &[Grid]) -> R {
    let n: i64 = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
    let size = pixel_values.size();
    if size.len() != 2 || size[0] != n || size[1] != c.patch_dim() {
        return Err(PluginError::invalid(
            "batch: pixel_values",
            format!("shape {size:?}, but image_grid_thw {grids:?} needs [{n}, {}]", c.patch_dim()),
        ));
    }
    let w = host.param(conv.weight)?;
    Ok(pixel_values.f_to_kind(w.kind())?.f_matmul(&w.f_reshape([c.embed_dim, -1])?.f_transpose(0, 1)?)?)
}

/// The fused `qkv` projection of `y` `[n, embed]` split into queries, keys and
/// values `[n, heads, hd]`, queries and keys rotated ([`rope_f32`]).
pub fn rotated_qkv(host: Host<'_, '_>, qkv: LinearId, y: &Tensor, heads: i64, hd: i64, cos: &Tensor, sin: &Tensor) -> R<(Tensor, Tensor, Tensor)> {
    let n = y.size()[0];
    // [n, 3, heads, hd] -> 3 x [n, heads, hd]
    let qkv = host.linear(qkv, y)?.f_reshape([n, 3, heads, hd])?;
    let q = rope_f32(&qkv.f_select(1, 0)?, cos, sin)?;
    let k = rope_f32(&qkv.f_select(1, 1)?, cos, sin)?;
    Ok((q, k, qkv.f_select(1, 2)?))
}

/// `apply_rotary_pos_emb_vision`: rotate in float32, back to the input's kind.
/// `x` `[n, heads, hd]`, `cos`/`sin` `[n, 1, hd]`.
pub(crate) fn rope_f32(x: &Tensor, cos: &Tensor, sin: &Tensor) -> R {
    let kind = x.kind();
    Ok(ops::apply_rope(&x.f_to_kind(Kind::Float)?, cos, sin)?.f_to_kind(kind)?)
}

/// Attention within each segment of consecutive rows (the block-diagonal mask
/// of `cu_seqlens`), `[n, heads, hd]` in and out; runs of equal-length
/// segments go through one batched call.
fn segment_attention(q: &Tensor, k: &Tensor, v: &Tensor, segments: &[i64], scale: f64) -> R {
    let (heads, hd) = (q.size()[1], q.size()[2]);
    let mut outs = Vec::new();
    let (mut start, mut i) = (0i64, 0usize);
    while i < segments.len() {
        let len = segments[i];
        let mut count = 1;
        while i + count < segments.len() && segments[i + count] == len {
            count += 1;
        }
        let rows = len * count as i64;
        // [rows, heads, hd] -> [count, heads, len, hd]
        let split = |t: &Tensor| -> R { Ok(t.f_narrow(0, start, rows)?.f_reshape([count as i64, len, heads, hd])?.f_transpose(1, 2)?) };
        let o = ops::attention(&split(q)?, &split(k)?, &split(v)?, None, false, scale)?;
        outs.push(o.f_transpose(1, 2)?.f_reshape([rows, heads, hd])?);
        start += rows;
        i += count;
    }
    Ok(Tensor::f_cat(&outs, 0)?)
}
