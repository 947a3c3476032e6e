//! Position logic of Qwen2-VL, following transformers 5.23
//! `models/qwen2_vl/modeling_qwen2_vl.py` and `vision_utils.py`:
//!
//! * [`rope_index`]: the language model's 3-D (M-RoPE) position ids
//!   (`Qwen2VLModel.get_rope_index`): text tokens count up on all three axes;
//!   an image's tokens get t = start, h = start + row, w = start + column over
//!   its merged grid; the text after an image resumes at
//!   `start + max(rows, columns)` (= the image's largest position + 1).
//! * [`vision_positions`]: the (row, column) of every patch in the vision
//!   tower's block-major order (`get_vision_position_ids`).
//! * [`mrope_cos_sin`], [`vision_cos_sin`]: the rotary tables from those positions.
//!
//! The first two are pure functions over plain vectors, tested below against
//! values transformers computed.

use tch::{Device, Kind, Tensor};
use vlmhost_plugin_api::PluginError;

/// An image's grid in patches: (t, h, w) as `image_grid_thw` gives it.
pub type Grid = [i64; 3];

/// Why positions cannot be computed: image tokens and images disagree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RopeError {
    #[error("row {row}: an image starts at token {at} but no image is left (more image tokens than images)")]
    NoImageLeft { row: usize, at: usize },
    #[error("row {row}: image {image} needs {needed} image tokens from token {at} but the run of image tokens is shorter")]
    ShortRun { row: usize, image: usize, at: usize, needed: usize },
    #[error("image {image}: grid {grid:?} is not divisible by the spatial merge size {merge}")]
    BadGrid { image: usize, grid: Grid, merge: i64 },
    #[error("{left} image(s) left over after the last image token (fewer image tokens than images)")]
    ImagesLeft { left: usize },
}

/// M-RoPE position ids for a batch: `[3][batch][seq]` flattened (t, h, w axes),
/// and per row the rope delta (largest position + 1 - number of real tokens),
/// which decoding adds to the token count to continue the positions.
///
/// `input_ids` and `attention_mask` are `[batch][seq]` row-major; padded
/// positions (mask 0) are skipped and get position 0, as in transformers.
/// Images are taken from `grids` in order, row after row (the order the
/// processor concatenates them); each takes `t * h * w / merge^2` tokens.
pub fn rope_index(
    input_ids: &[i64],
    attention_mask: Option<&[i64]>,
    batch: usize,
    image_token_id: i64,
    grids: &[Grid],
    merge: i64,
) -> Result<(Vec<i64>, Vec<i64>), RopeError> {
    let seq = if batch == 0 { 0 } else { input_ids.len() / batch };
    let mut pos = vec![0i64; 3 * batch * seq];
    let mut deltas = Vec::with_capacity(batch);
    let mut images = grids.iter().enumerate();
    for row in 0..batch {
        let ids = &input_ids[row * seq..(row + 1) * seq];
        let real: Vec<usize> = (0..seq).filter(|&i| attention_mask.is_none_or(|m| m[row * seq + i] != 0)).collect();
        let mut set = |i: usize, t: i64, h: i64, w: i64| {
            pos[row * seq + i] = t;
            pos[(batch + row) * seq + i] = h;
            pos[(2 * batch + row) * seq + i] = w;
        };
        let (mut current, mut largest, mut k) = (0i64, -1i64, 0usize);
        while k < real.len() {
            let i = real[k];
            if ids[i] != image_token_id {
                set(i, current, current, current);
                largest = largest.max(current);
                current += 1;
                k += 1;
                continue;
            }
            let (image, grid) = images.next().ok_or(RopeError::NoImageLeft { row, at: i })?;
            let [t, h, w] = *grid;
            if merge <= 0 || h <= 0 || w <= 0 || h % merge != 0 || w % merge != 0 || t <= 0 {
                return Err(RopeError::BadGrid { image, grid: *grid, merge });
            }
            let (lh, lw) = (h / merge, w / merge);
            let needed = (t * lh * lw) as usize;
            if k + needed > real.len() || real[k..k + needed].iter().any(|&j| ids[j] != image_token_id) {
                return Err(RopeError::ShortRun { row, image, at: i, needed });
            }
            let mut n = k;
            for tt in 0..t {
                for hh in 0..lh {
                    for ww in 0..lw {
                        let p = (current + tt, current + hh, current + ww);
                        set(real[n], p.0, p.1, p.2);
                        largest = largest.max(p.0.max(p.1).max(p.2));
                        n += 1;
                    }
                }
            }
            k += needed;
            current += lh.max(lw);
        }
        deltas.push(largest + 1 - real.len() as i64);
    }
    let left = images.count();
    if left > 0 {
        return Err(RopeError::ImagesLeft { left });
    }
    Ok((pos, deltas))
}

/// (row, column) of every patch of every frame, in the vision tower's order:
/// 2x2 (merge x merge) blocks row-major, the patches of a block row-major.
pub fn vision_positions(grids: &[Grid], merge: i64) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    for &[t, h, w] in grids {
        for _ in 0..t {
            for bh in 0..h / merge {
                for bw in 0..w / merge {
                    for mh in 0..merge {
                        for mw in 0..merge {
                            out.push((bh * merge + mh, bw * merge + mw));
                        }
                    }
                }
            }
        }
    }
    out
}

/// `1 / theta^(2i / dim)` for i in 0..dim/2, in float32 as transformers computes it.
fn inv_freq(dim: i64, theta: f64, device: Device) -> Result<Tensor, PluginError> {
    let idx = Tensor::f_arange_start_step(0, dim, 2, (Kind::Int64, device))?.f_to_kind(Kind::Float)?;
    Ok(Tensor::f_pow_scalar(theta, &idx.f_div_scalar(dim as f64)?)?.f_reciprocal()?)
}

/// The text model's rotary tables from M-RoPE positions `[3, batch, seq]`:
/// `cos`, `sin` of shape `[batch, 1, seq, head_dim]` in float32. The frequency
/// dimension (head_dim / 2) is split by `section` and chunk i takes its angles
/// from axis i % 3 (`Qwen2VLRotaryEmbedding`).
pub fn mrope_cos_sin(positions: &Tensor, head_dim: i64, theta: f64, section: &[i64]) -> Result<(Tensor, Tensor), PluginError> {
    let inv = inv_freq(head_dim, theta, positions.device())?;
    // [3, b, l, hd/2]
    let freqs = positions.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?.f_mul(&inv)?;
    let mut chunks = Vec::with_capacity(section.len());
    let mut start = 0;
    for (i, &s) in section.iter().enumerate() {
        chunks.push(freqs.f_select(0, (i % 3) as i64)?.f_narrow(-1, start, s)?);
        start += s;
    }
    let f = Tensor::f_cat(&chunks, -1)?;
    let emb = Tensor::f_cat(&[&f, &f], -1)?.f_unsqueeze(1)?;
    Ok((emb.f_cos()?, emb.f_sin()?))
}

/// The vision tower's rotary tables for patches at `positions` (row, column):
/// `cos`, `sin` of shape `[patches, 1, head_dim]` in float32; the first half of
/// the angles from the row, the second from the column, each over head_dim / 4
/// frequencies of a `head_dim / 2` RoPE (`Qwen2VLVisionRotaryEmbedding`).
pub fn vision_cos_sin(positions: &[(i64, i64)], head_dim: i64, theta: f64, device: Device) -> Result<(Tensor, Tensor), PluginError> {
    let inv = inv_freq(head_dim / 2, theta, device)?;
    let rows: Vec<i64> = positions.iter().map(|p| p.0).collect();
    let cols: Vec<i64> = positions.iter().map(|p| p.1).collect();
    let axis = |v: &[i64]| -> Result<Tensor, PluginError> {
        Ok(Tensor::f_from_slice(v)?.f_to_device(device)?.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?.f_mul(&inv)?)
    };
    let hw = Tensor::f_cat(&[axis(&rows)?, axis(&cols)?], -1)?;
    let emb = Tensor::f_cat(&[&hw, &hw], -1)?.f_unsqueeze(1)?;
    Ok((emb.f_cos()?, emb.f_sin()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMG: i64 = 1;
    const T: i64 = 5;

    fn axes(pos: &[i64], batch: usize, row: usize) -> [Vec<i64>; 3] {
        let seq = pos.len() / 3 / batch;
        std::array::from_fn(|a| pos[(a * batch + row) * seq..(a * batch + row + 1) * seq].to_vec())
    }

    // Expected values: transformers 5.23 `Qwen2VLModel.get_rope_index` on the same inputs
    // (scripts/fixtures/make_qwen2_vl_fixture.py writes them to reference/rope_index.json).

    #[test]
    fn text_only() {
        let (pos, d) = rope_index(&[T; 6], None, 1, IMG, &[], 2).unwrap();
        for a in axes(&pos, 1, 0) {
            assert_eq!(a, [0, 1, 2, 3, 4, 5]);
        }
        assert_eq!(d, [0]);
    }

    /// One unpadded row of `ids` with images `grids` (merge 2): its t, h, w
    /// positions and the rope delta must be `expected`.
    fn check_row(ids: &[i64], grids: &[Grid], expected: [&[i64]; 3], delta: i64) {
        let (pos, d) = rope_index(ids, None, 1, IMG, grids, 2).unwrap();
        assert_eq!(axes(&pos, 1, 0), expected.map(<[i64]>::to_vec));
        assert_eq!(d, [delta]);
    }

    #[test]
    fn one_image() {
        let ids = [T, T, IMG, IMG, IMG, IMG, IMG, IMG, T, T, T];
        let t = [0, 1, 2, 2, 2, 2, 2, 2, 5, 6, 7];
        let h = [0, 1, 2, 2, 2, 3, 3, 3, 5, 6, 7];
        check_row(&ids, &[[1, 4, 6]], [&t, &h, &[0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 7]], -3);
    }

    #[test]
    fn two_images() {
        let ids = [T, IMG, IMG, IMG, IMG, T, IMG, IMG, T, T];
        let t = [0, 1, 1, 1, 1, 3, 4, 4, 6, 7];
        let h = [0, 1, 1, 2, 2, 3, 4, 4, 6, 7];
        check_row(&ids, &[[1, 4, 4], [1, 2, 4]], [&t, &h, &[0, 1, 2, 1, 2, 3, 4, 5, 6, 7]], -2);
    }

    #[test]
    fn text_after_images() {
        let ids = [T, T, T, IMG, IMG, IMG, T, T, T, T, T];
        let t = [0, 1, 2, 3, 3, 3, 6, 7, 8, 9, 10];
        let h = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        check_row(&ids, &[[1, 6, 2]], [&t, &h, &t], 0);
    }

    #[test]
    fn padded_batch_takes_images_row_by_row() {
        let ids = [T, T, IMG, IMG, IMG, IMG, T, T, T, IMG, IMG, T, 0, 0, 0, 0];
        let mask = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0];
        let (pos, d) = rope_index(&ids, Some(&mask), 2, IMG, &[[1, 4, 4], [1, 2, 4]], 2).unwrap();
        let r0 = axes(&pos, 2, 0);
        assert_eq!(r0, [vec![0, 1, 2, 2, 2, 2, 4, 5], vec![0, 1, 2, 2, 3, 3, 4, 5], vec![0, 1, 2, 3, 2, 3, 4, 5]]);
        let r1 = axes(&pos, 2, 1);
        assert_eq!(r1, [vec![0, 1, 1, 3, 0, 0, 0, 0], vec![0, 1, 1, 3, 0, 0, 0, 0], vec![0, 1, 2, 3, 0, 0, 0, 0]]);
        assert_eq!(d, [-2, 0]);
    }

    #[test]
    fn mismatches_are_errors() {
        assert_eq!(rope_index(&[T, IMG, T], None, 1, IMG, &[], 2).unwrap_err(), RopeError::NoImageLeft { row: 0, at: 1 });
        assert!(matches!(rope_index(&[T, IMG, T], None, 1, IMG, &[[1, 4, 4]], 2), Err(RopeError::ShortRun { needed: 4, .. })));
        assert_eq!(rope_index(&[T, T], None, 1, IMG, &[[1, 2, 2]], 2).unwrap_err(), RopeError::ImagesLeft { left: 1 });
        assert!(matches!(rope_index(&[IMG], None, 1, IMG, &[[1, 3, 2]], 2), Err(RopeError::BadGrid { .. })));
    }

    #[test]
    fn vision_positions_are_block_major() {
        // transformers' get_vision_position_ids for grid (1, 4, 4), merge 2.
        let p = vision_positions(&[[1, 4, 4]], 2);
        let rows: Vec<i64> = p.iter().map(|x| x.0).collect();
        let cols: Vec<i64> = p.iter().map(|x| x.1).collect();
        assert_eq!(rows, [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]);
        assert_eq!(cols, [0, 1, 0, 1, 2, 3, 2, 3, 0, 1, 0, 1, 2, 3, 2, 3]);
    }
}
