//! Gradients summed over the ranks in buckets, as DDP does: the gradients,
//! in a fixed order, are packed into flat buckets of up to [`BUCKET_BYTES`]
//! (one dtype and device each), every bucket's all-reduce is launched, and
//! the sums are copied back. Packing costs one copy each way and saves a
//! collective per tensor (LoRA adapters are many small tensors).
//!
//! Not overlapped with the backward pass: tch exposes no autograd hooks, and
//! gradients arrive from a plugin's forward through the ABI, so the host
//! learns they are final only when `backward` returns. With gradient
//! accumulation the reduction runs once per optimizer step anyway.

use super::group::Group;
use anyhow::Result;
use tch::Tensor;

/// The largest bucket (DDP's default, 25 MiB).
pub const BUCKET_BYTES: usize = 25 << 20;

/// Buckets of tensor indices: consecutive, one kind and device each, at most
/// `limit` bytes unless one tensor alone is larger.
pub fn plan(tensors: &[Tensor], limit: usize) -> Vec<Vec<usize>> {
    let mut buckets: Vec<Vec<usize>> = Vec::new();
    let mut bytes = 0usize;
    for (i, t) in tensors.iter().enumerate() {
        let size = t.numel() * t.kind().elt_size_in_bytes();
        let fits = buckets.last().is_some_and(|b| {
            let first = &tensors[b[0]];
            first.kind() == t.kind() && first.device() == t.device() && bytes + size <= limit
        });
        if fits {
            buckets.last_mut().expect("a bucket").push(i);
            bytes += size;
        } else {
            buckets.push(vec![i]);
            bytes = size;
        }
    }
    buckets
}

/// Sum `grads` (defined, same order and shapes on every rank) over the
/// group, in place.
pub fn all_reduce_sum(group: &Group, grads: &[Tensor], limit: usize) -> Result<()> {
    let _g = tch::no_grad_guard();
    let buckets = plan(grads, limit);
    let flats: Vec<Tensor> = buckets
        .iter()
        .map(|b| {
            if b.len() == 1 && grads[b[0]].is_contiguous() {
                grads[b[0]].shallow_clone()
            } else {
                Tensor::cat(&b.iter().map(|&i| grads[i].reshape([-1])).collect::<Vec<_>>(), 0)
            }
        })
        .collect();
    group.all_reduce_sum(&flats)?;
    for (b, flat) in buckets.iter().zip(&flats) {
        if b.len() == 1 && grads[b[0]].is_contiguous() {
            continue;
        }
        let mut offset = 0i64;
        for &i in b {
            let n = grads[i].numel() as i64;
            grads[i].shallow_clone().copy_(&flat.narrow(0, offset, n).view_as(&grads[i]));
            offset += n;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn buckets_are_bounded_and_keep_the_order() {
        let t = |n: i64, k: Kind| Tensor::zeros([n], (k, tch::Device::Cpu));
        let ts = [t(10, Kind::Float), t(10, Kind::Float), t(100, Kind::Float), t(5, Kind::Double), t(1, Kind::Double)];
        assert_eq!(plan(&ts, 80), vec![vec![0, 1], vec![2], vec![3, 4]]);
        assert_eq!(plan(&ts, 1 << 20), vec![vec![0, 1, 2], vec![3, 4]]);
        assert_eq!(plan(&ts, 1), vec![vec![0], vec![1], vec![2], vec![3], vec![4]]);
    }
}
