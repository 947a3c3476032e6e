//! LoRA on linear layers, run by the host: `y = x W^T + b + s * B A dropout(x)`
//! with a frozen base, `A` initialised Kaiming-uniform as PEFT does
//! (`a = sqrt(5)`, i.e. U(-1/sqrt(in), 1/sqrt(in))), `B` zeros, and
//! `s = alpha / r` (or `alpha / sqrt(r)` with rsLoRA). Dropout acts only while
//! training.

use tch::{Device, Kind, Tensor};

/// The adapter of one linear layer.
#[derive(Debug)]
pub struct LoraAdapter {
    /// `[r, in_features]`
    pub a: Tensor,
    /// `[out_features, r]`
    pub b: Tensor,
    pub scaling: f64,
    pub dropout: f64,
}

impl LoraAdapter {
    /// A fresh adapter, trainable, as PEFT initialises it.
    pub fn new(in_features: i64, out_features: i64, r: i64, scaling: f64, dropout: f64, kind: Kind, device: Device) -> Self {
        let bound = 1.0 / (in_features as f64).sqrt();
        let a = Tensor::empty([r, in_features], (kind, device)).uniform_(-bound, bound).set_requires_grad(true);
        let b = Tensor::zeros([out_features, r], (kind, device)).set_requires_grad(true);
        LoraAdapter { a, b, scaling, dropout }
    }

    /// The adapter's contribution for input `x` (`[..., in]` -> `[..., out]`).
    pub fn delta(&self, x: &Tensor, training: bool) -> Result<Tensor, tch::TchError> {
        let x = if training && self.dropout > 0.0 { x.f_dropout(self.dropout, true)? } else { x.shallow_clone() };
        x.f_linear::<&Tensor>(&self.a, None)?.f_linear::<&Tensor>(&self.b, None)?.f_mul_scalar(self.scaling)
    }

    /// Number of trainable values.
    pub fn numel(&self) -> i64 {
        (self.a.numel() + self.b.numel()) as i64
    }

    /// `W + s * B A`, for merging.
    pub fn merged_weight(&self, weight: &Tensor) -> Result<Tensor, tch::TchError> {
        let _g = tch::no_grad_guard();
        weight.f_add(&self.b.f_matmul(&self.a)?.f_mul_scalar(self.scaling)?.f_to_kind(weight.kind())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_and_zero_delta() {
        let l = LoraAdapter::new(16, 8, 4, 2.0, 0.0, Kind::Float, Device::Cpu);
        assert_eq!(l.a.size(), [4, 16]);
        assert_eq!(l.b.size(), [8, 4]);
        assert!(l.a.abs().max().double_value(&[]) <= 0.25);
        assert!(l.a.requires_grad() && l.b.requires_grad());
        let x = Tensor::randn([3, 16], (Kind::Float, Device::Cpu));
        assert_eq!(l.delta(&x, true).unwrap().abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert_eq!(l.numel(), 4 * 16 + 8 * 4);
    }

    #[test]
    fn delta_is_scaled_product() {
        let mut l = LoraAdapter::new(3, 2, 1, 2.0, 0.5, Kind::Float, Device::Cpu);
        l.a = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).view([1, 3]);
        l.b = Tensor::from_slice(&[1.0f32, -1.0]).view([2, 1]);
        let x = Tensor::from_slice(&[1.0f32, 1.0, 1.0]).view([1, 3]);
        // Eval: no dropout. (1+2+3) * [1, -1] * 2
        let d = l.delta(&x, false).unwrap();
        assert_eq!(Vec::<f32>::try_from(d.view([-1])).unwrap(), vec![12.0, -12.0]);
        let w = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
        let merged = l.merged_weight(&w).unwrap();
        assert_eq!(Vec::<f32>::try_from(merged.view([-1])).unwrap(), vec![2.0, 4.0, 6.0, -2.0, -4.0, -6.0]);
    }
}
