//! SAM ViT-B as DeepSeek-OCR's `deepencoder.py` builds it (`ImageEncoderViT`
//! with `use_rel_pos`, windowed and global blocks, the neck, and the two
//! stride-2 convolutions `net_2`, `net_3`).

use crate::config::SamConfig;
use tch::{Kind, Tensor};
use vlmhost_plugin_api::builder::{ConvParams, LayerNormParams, SpecPath};
use vlmhost_plugin_api::{ops, Host, LinearId, ParamId, ParamKind, Role, Segment};
use vlmhost_plugin_sdk::decoder::{one_output, segment_error, R};

/// The segment stack of SAM's blocks (the LLM's is `decoder::LLM_STACK`, CLIP's `clip::CLIP_STACK`).
pub const SAM_STACK: u32 = 1;

pub(crate) struct SamBlock {
    pub(crate) norm1: LayerNormParams,
    pub(crate) qkv: LinearId,
    pub(crate) proj: LinearId,
    pub(crate) rel_pos_h: ParamId,
    pub(crate) rel_pos_w: ParamId,
    pub(crate) norm2: LayerNormParams,
    pub(crate) lin1: LinearId,
    pub(crate) lin2: LinearId,
    /// Window size, 0 for global attention.
    pub(crate) window: i64,
}

/// SAM ViT-B: its settings and handles into the spec.
pub struct Sam {
    pub(crate) config: SamConfig,
    pub(crate) patch_embed: ConvParams,
    pub(crate) pos_embed: ParamId,
    pub(crate) blocks: Vec<SamBlock>,
    pub(crate) neck: [ConvParams; 2],
    pub(crate) neck_norm: [LayerNormParams; 2],
    pub(crate) net_2: ConvParams,
    pub(crate) net_3: ConvParams,
}

/// Declare SAM ViT-B under `p` (`model.sam_model`).
pub(crate) fn declare_sam(p: &SpecPath, c: &SamConfig) -> Sam {
    let w = c.width;
    let hd = w / c.heads;
    let patch_embed = (p / "patch_embed" / "proj").conv(&[w, 3, c.patch_size, c.patch_size], true, "Conv2d");
    let pos_embed = p.param("pos_embed", &[1, c.grid, c.grid, w], ParamKind::Embedding);
    let blocks = (0..c.layers)
        .map(|i| {
            let b = p / "blocks" / i;
            let a = &b / "attn";
            let window = if c.global_attn_indexes.contains(&i) { 0 } else { c.window_size };
            let size = if window == 0 { c.grid } else { window };
            SamBlock {
                norm1: (&b / "norm1").layer_norm(w, true, c.eps),
                qkv: (&a / "qkv").linear(w, 3 * w, true),
                proj: (&a / "proj").linear(w, w, true),
                rel_pos_h: a.param("rel_pos_h", &[2 * size - 1, hd], ParamKind::Embedding),
                rel_pos_w: a.param("rel_pos_w", &[2 * size - 1, hd], ParamKind::Embedding),
                norm2: (&b / "norm2").layer_norm(w, true, c.eps),
                lin1: (&b / "mlp" / "lin1").linear(w, c.mlp_dim, true),
                lin2: (&b / "mlp" / "lin2").linear(c.mlp_dim, w, true),
                window,
            }
        })
        .collect();
    let n = c.neck_channels;
    let neck = p / "neck";
    let neck0 = (&neck / 0).conv(&[n, w, 1, 1], false, "Conv2d");
    let norm0 = (&neck / 1).layer_norm(n, true, c.eps);
    let neck2 = (&neck / 2).conv(&[n, n, 3, 3], false, "Conv2d");
    let norm1 = (&neck / 3).layer_norm(n, true, c.eps);
    let [d2, d3] = c.downsample_channels;
    Sam {
        config: c.clone(),
        patch_embed,
        pos_embed,
        blocks,
        neck: [neck0, neck2],
        neck_norm: [norm0, norm1],
        net_2: (p / "net_2").conv(&[d2, n, 3, 3], false, "Conv2d"),
        net_3: (p / "net_3").conv(&[d3, d2, 3, 3], false, "Conv2d"),
    }
}

impl Sam {
    /// SAM ViT-B with neck and the two stride-2 convolutions:
    /// `[n, 3, S, S]` -> `[n, net_3 channels, S/64, S/64]`.
    pub fn forward(&self, host: Host<'_, '_>, pixels: &Tensor) -> R {
        let s = self;
        let x = self.neck(host, pixels)?;
        let x = conv2d(host, &s.net_2, &x, 2, 1)?;
        conv2d(host, &s.net_3, &x, 2, 1)
    }

    /// SAM ViT-B up to its neck: `[n, 3, S, S]` -> `[n, neck channels, S/16, S/16]`.
    pub fn neck(&self, host: Host<'_, '_>, pixels: &Tensor) -> R {
        let (s, c) = (self, &self.config);
        let x = conv2d(host, &s.patch_embed, pixels, c.patch_size, 0)?.f_permute([0, 2, 3, 1])?;
        let grid = x.size()[1];
        let pos = host.param(s.pos_embed)?;
        let pos = if pos.size()[1] != grid {
            let p = pos.f_permute([0, 3, 1, 2])?.f_to_kind(Kind::Float)?;
            let p = p.f_internal_upsample_bicubic2d_aa([grid, grid], false, None, None)?;
            p.f_to_kind(pos.kind())?.f_permute([0, 2, 3, 1])?
        } else {
            pos
        };
        let mut x = x.f_add(&pos)?;
        for i in 0..s.blocks.len() {
            // Each block is a segment: the host may recompute it in backward.
            x = one_output(host.segment(Segment::new(Role::Vision, SAM_STACK, i as u32), &[&x])?)?;
        }
        let mut x = x.f_permute([0, 3, 1, 2])?;
        for (conv, norm) in s.neck.iter().zip(&s.neck_norm) {
            let k = conv_kernel(host, conv)?.size()[2];
            x = conv2d(host, conv, &x, 1, k / 2)?;
            x = layer_norm_2d(host, norm, &x)?;
        }
        Ok(x)
    }

    /// Block `layer` on `x` `[n, h, w, C]` (windowed or global attention, then the MLP).
    fn block(&self, host: Host<'_, '_>, blk: &SamBlock, x: &Tensor) -> R {
        let y = ops::layer_norm(host, &blk.norm1, x)?;
        let y = if blk.window > 0 {
            let (h, w) = (y.size()[1], y.size()[2]);
            let (windows, padded) = window_partition(&y, blk.window)?;
            let out = self.attention(host, blk, &windows)?;
            window_unpartition(&out, blk.window, padded, (h, w))?
        } else {
            self.attention(host, blk, &y)?
        };
        let x = x.f_add(&y)?;
        let y = ops::layer_norm(host, &blk.norm2, &x)?;
        let y = host.linear(blk.lin2, &host.linear(blk.lin1, &y)?.f_gelu("none")?)?;
        Ok(x.f_add(&y)?)
    }

    /// Block `layer` as [`Sam::neck`] marked it a segment.
    pub fn run_segment(&self, host: Host<'_, '_>, layer: u32, inputs: &[Tensor]) -> R<Vec<Tensor>> {
        match (self.blocks.get(layer as usize), inputs) {
            (Some(blk), [x]) => Ok(vec![self.block(host, blk, x)?]),
            _ => Err(segment_error(Segment::new(Role::Vision, SAM_STACK, layer), inputs.len())),
        }
    }

    /// Attention with decomposed relative positions over `[n, h, w, C]`.
    fn attention(&self, host: Host<'_, '_>, blk: &SamBlock, x: &Tensor) -> R {
        let size = x.size();
        let (b, h, w, c) = (size[0], size[1], size[2], size[3]);
        let heads = self.config.heads;
        let hd = c / heads;
        let qkv = host
            .linear(blk.qkv, x)?
            .f_reshape([b, h * w, 3, heads, hd])?
            .f_permute([2, 0, 3, 1, 4])?
            .f_reshape([3, b * heads, h * w, hd])?;
        let (q, k, v) = (qkv.f_get(0)?, qkv.f_get(1)?, qkv.f_get(2)?);
        let rh = rel_pos(h, h, &host.param(blk.rel_pos_h)?)?;
        let rw = rel_pos(w, w, &host.param(blk.rel_pos_w)?)?;
        let rq = q.f_reshape([b * heads, h, w, hd])?;
        let rel_h = Tensor::f_einsum("bhwc,hkc->bhwk", &[&rq, &rh], None::<i64>)?;
        let rel_w = Tensor::f_einsum("bhwc,wkc->bhwk", &[&rq, &rw], None::<i64>)?;
        let bias = rel_h
            .f_unsqueeze(-1)?
            .f_add(&rel_w.f_unsqueeze(-2)?)?
            .f_reshape([b, heads, h * w, h * w])?;
        let view = |t: &Tensor| t.f_view([b, heads, h * w, hd]);
        let out = ops::attention(&view(&q)?, &view(&k)?, &view(&v)?, Some(&bias), false, (hd as f64).powf(-0.5))?;
        let out = out.f_view([b, heads, h, w, hd])?.f_permute([0, 2, 3, 1, 4])?.f_reshape([b, h, w, c])?;
        host.linear(blk.proj, &out)
    }
}

fn conv_kernel(host: Host<'_, '_>, p: &ConvParams) -> R {
    host.param(p.weight)
}

pub(crate) fn conv2d(host: Host<'_, '_>, p: &ConvParams, x: &Tensor, stride: i64, padding: i64) -> R {
    let w = host.param(p.weight)?;
    let b = p.bias.map(|b| host.param(b)).transpose()?;
    Ok(x.f_conv2d(&w, b.as_ref(), [stride, stride], [padding, padding], [1, 1], 1)?)
}

/// SAM's `LayerNorm2d`: normalise over channels of `[n, C, h, w]`.
fn layer_norm_2d(host: Host<'_, '_>, p: &LayerNormParams, x: &Tensor) -> R {
    let w = host.param(p.weight)?.f_view([-1, 1, 1])?;
    let u = x.f_mean_dim(1, true, x.kind())?;
    let centred = x.f_sub(&u)?;
    let s = centred.f_square()?.f_mean_dim(1, true, x.kind())?;
    let y = centred.f_div(&s.f_add_scalar(p.eps)?.f_sqrt()?)?.f_mul(&w)?;
    match p.bias {
        Some(b) => Ok(y.f_add(&host.param(b)?.f_view([-1, 1, 1])?)?),
        None => Ok(y),
    }
}

/// Split `[n, h, w, C]` into `[n * windows, ws, ws, C]`, zero-padding the
/// bottom and right to a multiple of `ws` (the padding is not masked, as in
/// the original). Returns the padded size too.
fn window_partition(x: &Tensor, ws: i64) -> R<(Tensor, (i64, i64))> {
    let size = x.size();
    let (n, h, w, c) = (size[0], size[1], size[2], size[3]);
    let (ph, pw) = ((ws - h % ws) % ws, (ws - w % ws) % ws);
    let x = if ph > 0 || pw > 0 { x.f_constant_pad_nd([0, 0, 0, pw, 0, ph])? } else { x.shallow_clone() };
    let (hp, wp) = (h + ph, w + pw);
    let windows = x
        .f_view([n, hp / ws, ws, wp / ws, ws, c])?
        .f_permute([0, 1, 3, 2, 4, 5])?
        .f_contiguous()?
        .f_view([-1, ws, ws, c])?;
    Ok((windows, (hp, wp)))
}

fn window_unpartition(windows: &Tensor, ws: i64, (hp, wp): (i64, i64), (h, w): (i64, i64)) -> R {
    let n = windows.size()[0] / (hp * wp / ws / ws);
    let x = windows
        .f_view([n, hp / ws, wp / ws, ws, ws, -1])?
        .f_permute([0, 1, 3, 2, 4, 5])?
        .f_contiguous()?
        .f_view([n, hp, wp, -1])?;
    Ok(x.f_narrow(1, 0, h)?.f_narrow(2, 0, w)?)
}

/// Relative position embeddings `[q, k, C]` for query and key lengths, the
/// table resized by linear interpolation when its length does not match.
fn rel_pos(q: i64, k: i64, table: &Tensor) -> R {
    let max_dist = 2 * q.max(k) - 1;
    let table = if table.size()[0] != max_dist {
        let len = table.size()[0];
        table
            .f_to_kind(Kind::Float)?
            .f_reshape([1, len, -1])?
            .f_permute([0, 2, 1])?
            .f_upsample_linear1d([max_dist], false, None)?
            .f_to_kind(table.kind())?
            .f_reshape([-1, max_dist])?
            .f_permute([1, 0])?
    } else {
        table.shallow_clone()
    };
    let (qf, kf) = (q as f64, k as f64);
    let (qs, ks) = ((kf / qf).max(1.0), (qf / kf).max(1.0));
    let idx: Vec<i64> = (0..q)
        .flat_map(|i| (0..k).map(move |j| (i as f64 * qs - j as f64 * ks + (kf - 1.0) * ks) as i64))
        .collect();
    let idx = Tensor::f_from_slice(&idx)?.f_to_device(table.device())?;
    Ok(table.f_index_select(0, &idx)?.f_view([q, k, -1])?)
}

