//! The Qwen2.5-VL vision tower (`visual.*`) and its patch merger, following
//! transformers 5.23 `models/qwen2_5_vl/modeling_qwen2_5_vl.py`
//! (`Qwen2_5_VisionPatchEmbed`, `Qwen2_5_VLVisionBlock`,
//! `Qwen2_5_VLVisionAttention`, `Qwen2_5_VLMLP`, `Qwen2_5_VLPatchMerger`,
//! `Qwen2_5_VisionTransformerPretrainedModel`) and `vision_utils.py`
//! (`get_vision_window_index`).
//!
//! What differs from Qwen2-VL's tower ([`crate::vision`]):
//!
//! * RMSNorm (eps 1e-6) instead of LayerNorm in the blocks and the merger's `ln_q`;
//! * a gated MLP with biases (`gate_proj`, `up_proj`, `down_proj`, SiLU);
//! * windowed attention: the patches are reordered window by window
//!   ([`window_index`]: windows of `window_size / merge / patch` merged
//!   tokens per side, row-major over each frame, edge windows smaller), the
//!   blocks named in `fullatt_block_indexes` attend over each whole frame
//!   (transformers' `cu_seqlens`), the others within each window
//!   (`cu_window_seqlens`), and after the blocks the patches go back to their
//!   order (transformers applies the reverse index after the merger, which
//!   acts on each group of merge x merge patches alone: the same).
//!
//! Attention runs without a mask: all segments (windows or frames) of one
//! length go through one batched attention call, gathered from wherever they
//! lie and put back after (`grouped_attention`), so an image of full
//! windows and smaller edge windows costs one call per window size.
//!
//! The patch embedding is the same Conv3d run as one matrix product as in
//! Qwen2-VL, and never takes LoRA.

use crate::config::{VisionConfig, WindowConfig};
use crate::rope::{vision_cos_sin, vision_positions, Grid};
use crate::vision::{embed_patches, rotated_qkv, VISION_STACK};
use tch::Tensor;
use vlmhost_plugin_api::builder::{ConvParams, RmsNormParams, SpecPath};
use vlmhost_plugin_api::ops;
use vlmhost_plugin_api::{Host, LinearId, PluginError, Role, Segment};
use vlmhost_plugin_sdk::decoder::{one_output, segment_error, SwiGlu};

type R<T = Tensor> = Result<T, PluginError>;

/// RMSNorm epsilon of the vision blocks and the merger (hard-coded in transformers).
const RMS_EPS: f64 = 1e-6;

struct Block {
    norm1: RmsNormParams,
    norm2: RmsNormParams,
    qkv: LinearId,
    proj: LinearId,
    mlp: SwiGlu,
    /// Attention over each whole frame (`fullatt_block_indexes`), else within windows.
    full: bool,
}

impl Block {
    /// The block on `x` `[patches, embed]` (window order), attention within `segments`.
    fn forward(&self, host: Host<'_, '_>, c: &VisionConfig, x: &Tensor, cos: &Tensor, sin: &Tensor, segments: &Segments) -> R {
        let (n, hd, heads) = (x.size()[0], c.head_dim(), c.num_heads);
        let y = ops::rms_norm(host, &self.norm1, x)?;
        let (q, k, v) = rotated_qkv(host, self.qkv, &y, heads, hd, cos, sin)?;
        let att = segments.attention(&q, &k, &v, (hd as f64).powf(-0.5))?;
        let x = x.f_add(&host.linear(self.proj, &att.f_reshape([n, c.embed_dim])?)?)?;
        let y = ops::rms_norm(host, &self.norm2, &x)?;
        Ok(x.f_add(&self.mlp.forward(host, &c.hidden_act, &y)?)?)
    }
}

/// Handles into the spec for `visual.*` (Qwen2.5-VL).
pub struct Vision25 {
    config: VisionConfig,
    window: WindowConfig,
    patch_embed: ConvParams,
    blocks: Vec<Block>,
    ln_q: RmsNormParams,
    merger: (LinearId, LinearId),
}

/// The window order of a batch of images: `order[i]` is the merged token
/// (group of merge x merge consecutive patches, in the processor's order)
/// that comes i-th, and `windows` the length in patches of each non-empty
/// window, in that order (transformers' `get_vision_window_index`:
/// `window_index` and the differences of `cu_window_seqlens`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowOrder {
    pub order: Vec<i64>,
    pub windows: Vec<i64>,
}

/// Windows of `side` x `side` merged tokens over each frame of each image,
/// row-major, tokens row-major inside a window; windows at the bottom and
/// right edges hold what is left of the grid.
pub fn window_index(grids: &[Grid], merge: i64, side: i64) -> WindowOrder {
    let unit = merge * merge;
    let (mut order, mut windows) = (Vec::new(), Vec::new());
    let mut base = 0i64;
    for &[t, h, w] in grids {
        let (lh, lw) = (h / merge, w / merge);
        for frame in 0..t {
            let start = base + frame * lh * lw;
            for wh in (0..lh).step_by(side as usize) {
                for ww in (0..lw).step_by(side as usize) {
                    let (rows, cols) = (side.min(lh - wh), side.min(lw - ww));
                    for r in wh..wh + rows {
                        for c in ww..ww + cols {
                            order.push(start + r * lw + c);
                        }
                    }
                    windows.push(rows * cols * unit);
                }
            }
        }
        base += t * lh * lw;
    }
    WindowOrder { order, windows }
}

/// The inverse of a permutation of `0..n`.
fn inverse(order: &[i64]) -> Vec<i64> {
    let mut inv = vec![0i64; order.len()];
    for (i, &o) in order.iter().enumerate() {
        inv[o as usize] = i as i64;
    }
    inv
}

impl Vision25 {
    /// Declare `visual.*` under `visual`.
    pub fn declare(visual: &SpecPath, c: &VisionConfig, window: &WindowConfig) -> Vision25 {
        let e = c.embed_dim;
        let kernel = [e, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size];
        let patch_embed = (visual / "patch_embed" / "proj").conv(&kernel, false, "Conv3d run as Linear");
        let blocks = (0..c.depth)
            .map(|i| {
                let b = visual / "blocks" / i;
                Block {
                    norm1: (&b / "norm1").rms_norm(e, RMS_EPS),
                    norm2: (&b / "norm2").rms_norm(e, RMS_EPS),
                    qkv: (&b / "attn" / "qkv").linear(e, 3 * e, true),
                    proj: (&b / "attn" / "proj").linear(e, e, true),
                    mlp: SwiGlu::declare(&(&b / "mlp"), e, window.intermediate_size, true),
                    full: window.fullatt_block_indexes.contains(&i),
                }
            })
            .collect();
        let m = visual / "merger";
        let ln_q = (&m / "ln_q").rms_norm(e, RMS_EPS);
        let merged = c.merged_dim();
        let merger = ((&m / "mlp" / 0).linear(merged, merged, true), (&m / "mlp" / 2).linear(merged, c.hidden_size, true));
        Vision25 { config: c.clone(), window: window.clone(), patch_embed, blocks, ln_q, merger }
    }

    /// The encoder's output before the merger, `[patches, embed_dim]` in the
    /// processor's patch order, for `pixel_values` `[patches, C*T*P*P]` of
    /// images with `grids`.
    pub fn encode(&self, host: Host<'_, '_>, pixel_values: &Tensor, grids: &[Grid]) -> R {
        let c = &self.config;
        let x = embed_patches(host, c, &self.patch_embed, pixel_values, grids)?;
        let n = x.size()[0];
        let merge = c.spatial_merge_size;
        let unit = merge * merge;
        let device = pixel_values.device();
        // Into window order, whole merged tokens (merge x merge consecutive patches) at a time.
        let win = window_index(grids, merge, self.window.merged_window(c));
        let order = Tensor::f_from_slice(&win.order)?.f_to_device(device)?;
        let permute = |t: &Tensor, order: &Tensor| -> R {
            let d = t.size()[1];
            Ok(t.f_reshape([n / unit, unit, d])?.f_index_select(0, order)?.f_reshape([n, d])?)
        };
        let mut x = permute(&x, &order)?;
        let hd = c.head_dim();
        let positions = vision_positions(grids, merge);
        let positions: Vec<(i64, i64)> =
            win.order.iter().flat_map(|&u| positions[(u * unit) as usize..((u + 1) * unit) as usize].iter().copied()).collect();
        let (cos, sin) = vision_cos_sin(&positions, hd, c.rope_theta, device)?;
        // Attention segments: each frame (h * w patches, contiguous in window order too) or each window.
        let frames: Vec<i64> = grids.iter().flat_map(|g| std::iter::repeat_n(g[1] * g[2], g[0] as usize)).collect();
        // Each block is a segment (the host may recompute it in backward): its inputs the
        // hidden states, the rotary tables and its attention segments' lengths, frames or windows.
        let (frames, windows) = (Tensor::f_from_slice(&frames)?, Tensor::f_from_slice(&win.windows)?);
        for (i, b) in self.blocks.iter().enumerate() {
            let lengths = if b.full { &frames } else { &windows };
            x = one_output(host.segment(Segment::new(Role::Vision, VISION_STACK, i as u32), &[&x, &cos, &sin, lengths])?)?;
        }
        // Back to the processor's order.
        let back = Tensor::f_from_slice(&inverse(&win.order))?.f_to_device(device)?;
        permute(&x, &back)
    }

    /// Block `layer` as [`Vision25::encode`] marked it a segment, on its inputs
    /// (hidden states in window order, the rotary `cos` and `sin`, the lengths
    /// of the frames or windows it attends within).
    pub fn run_segment(&self, host: Host<'_, '_>, layer: u32, inputs: &[Tensor]) -> R<Vec<Tensor>> {
        let (Some(b), [x, cos, sin, lengths]) = (self.blocks.get(layer as usize), inputs) else {
            return Err(segment_error(Segment::new(Role::Vision, VISION_STACK, layer), inputs.len()));
        };
        let segments = Segments::new(&Vec::<i64>::try_from(lengths)?, x.device())?;
        Ok(vec![b.forward(host, &self.config, x, cos, sin, &segments)?])
    }

    /// The merger (projector role): `[patches, embed]` -> `[patches / merge^2, hidden]`.
    pub fn merge(&self, host: Host<'_, '_>, encoded: &Tensor) -> R {
        let y = ops::rms_norm(host, &self.ln_q, encoded)?.f_reshape([-1, self.config.merged_dim()])?;
        let y = host.linear(self.merger.0, &y)?.f_gelu("none")?;
        host.linear(self.merger.1, &y)
    }
}

/// A partition of the rows into consecutive segments (the block-diagonal
/// attention of transformers' `cu_seqlens`), grouped by length: one batched
/// attention call per length. A length whose segments form one run of
/// consecutive rows is taken as a view; otherwise its rows are gathered.
struct Segments {
    /// Per length: (length, number of segments, the rows' first index if one run, else the rows).
    groups: Vec<(i64, i64, Gather)>,
    /// Where each output row goes, when the groups do not simply follow each other.
    back: Option<Tensor>,
}

enum Gather {
    Run(i64),
    Rows(Tensor),
}

impl Segments {
    fn new(lengths: &[i64], device: tch::Device) -> R<Segments> {
        // Lengths in order of first appearance, each with its segments' starts.
        let mut by_len: Vec<(i64, Vec<i64>)> = Vec::new();
        let mut start = 0i64;
        for &len in lengths {
            match by_len.iter_mut().find(|(l, _)| *l == len) {
                Some((_, starts)) => starts.push(start),
                None => by_len.push((len, vec![start])),
            }
            start += len;
        }
        let mut groups = Vec::with_capacity(by_len.len());
        let mut rows_in_output_order: Vec<i64> = Vec::new();
        let mut in_order = true;
        let mut expected = 0i64;
        for (len, starts) in &by_len {
            let run = starts.windows(2).all(|p| p[1] == p[0] + len);
            in_order &= run && starts[0] == expected;
            expected += len * starts.len() as i64;
            let rows: Vec<i64> = starts.iter().flat_map(|&s| s..s + len).collect();
            let gather = if run { Gather::Run(starts[0]) } else { Gather::Rows(Tensor::f_from_slice(&rows)?.f_to_device(device)?) };
            rows_in_output_order.extend_from_slice(&rows);
            groups.push((*len, starts.len() as i64, gather));
        }
        let back = if in_order { None } else { Some(Tensor::f_from_slice(&inverse(&rows_in_output_order))?.f_to_device(device)?) };
        Ok(Segments { groups, back })
    }

    /// Attention within each segment, `[n, heads, hd]` in and out.
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> R {
        let (heads, hd) = (q.size()[1], q.size()[2]);
        let mut outs = Vec::with_capacity(self.groups.len());
        for (len, count, gather) in &self.groups {
            let rows = len * count;
            // [rows, heads, hd] -> [count, heads, len, hd]
            let split = |t: &Tensor| -> R {
                let t = match gather {
                    Gather::Run(start) => t.f_narrow(0, *start, rows)?,
                    Gather::Rows(idx) => t.f_index_select(0, idx)?,
                };
                Ok(t.f_reshape([*count, *len, heads, hd])?.f_transpose(1, 2)?)
            };
            let o = ops::attention(&split(q)?, &split(k)?, &split(v)?, None, false, scale)?;
            outs.push(o.f_transpose(1, 2)?.f_reshape([rows, heads, hd])?);
        }
        let out = Tensor::f_cat(&outs, 0)?;
        Ok(match &self.back {
            None => out,
            Some(back) => out.f_index_select(0, back)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    // Expected values: transformers 5.23 `get_vision_window_index` (vision_utils.py) on the same
    // grids; scripts/fixtures/make_qwen2_5_vl_fixture.py writes more cases to
    // reference/window_index.json, checked by tests/window_index.rs.

    #[test]
    fn a_grid_that_divides_into_windows() {
        // grid (1, 8, 8), merge 2 -> 4x4 merged tokens; windows of 2x2.
        let w = window_index(&[[1, 8, 8]], 2, 2);
        assert_eq!(w.order, [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]);
        assert_eq!(w.windows, [16, 16, 16, 16]);
    }

    #[test]
    fn edge_windows_are_smaller_and_images_follow_each_other() {
        // (1, 6, 4): 3x2 merged tokens, windows of 2x2: a full window, then the bottom row.
        // (1, 2, 6): 1x3, after the first image's 6 tokens: windows of 1x2 and 1x1.
        let w = window_index(&[[1, 6, 4], [1, 2, 6]], 2, 2);
        assert_eq!(w.order, [0, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(w.windows, [16, 8, 8, 4]);
        let w = window_index(&[[1, 6, 6]], 2, 2);
        assert_eq!(w.order, [0, 1, 3, 4, 2, 5, 6, 7, 8]);
        assert_eq!(w.windows, [16, 8, 8, 4]);
    }

    #[test]
    fn segments_group_equal_lengths_and_keep_the_order() {
        let _g = tch::no_grad_guard();
        let lengths = [4, 2, 4, 2, 1];
        let n: i64 = lengths.iter().sum();
        let q = Tensor::randn([n, 2, 4], (Kind::Float, tch::Device::Cpu));
        let k = Tensor::randn([n, 2, 4], (Kind::Float, tch::Device::Cpu));
        let v = Tensor::randn([n, 2, 4], (Kind::Float, tch::Device::Cpu));
        let s = Segments::new(&lengths, tch::Device::Cpu).unwrap();
        assert_eq!(s.groups.len(), 3);
        let ours = s.attention(&q, &k, &v, 0.5).unwrap();
        // One segment at a time.
        let mut start = 0;
        for len in lengths {
            let part = |t: &Tensor| t.narrow(0, start, len).transpose(0, 1).unsqueeze(0);
            let o = ops::attention(&part(&q), &part(&k), &part(&v), None, false, 0.5).unwrap();
            let o = o.squeeze_dim(0).transpose(0, 1);
            assert!(o.allclose(&ours.narrow(0, start, len), 1e-6, 1e-6, false), "segment at {start}");
            start += len;
        }
        // Already in order: no gather, no permutation back.
        let s = Segments::new(&[4, 4, 2, 1], tch::Device::Cpu).unwrap();
        assert!(s.back.is_none() && s.groups.iter().all(|g| matches!(g.2, Gather::Run(_))));
    }
}
