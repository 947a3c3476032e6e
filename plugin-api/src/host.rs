//! The plugin's view of the host during a forward pass: parameters and
//! linear layers as plain `tch::Tensor`s, with errors as `PluginError`.

use crate::builder::{LinearId, ParamId};
use crate::model::{HostOpsRef, Role, Segment};
use abi_stable::std_types::RVec;
use crate::tensor::TensorRef;
use crate::PluginError;
use tch::Tensor;

/// The host's operations, wrapped for plugin code.
#[derive(Clone, Copy)]
pub struct Host<'a, 'b> {
    ops: &'a HostOpsRef<'b>,
}

impl<'a, 'b> Host<'a, 'b> {
    pub fn new(ops: &'a HostOpsRef<'b>) -> Self {
        Host { ops }
    }

    /// The host's parameter (a handle on the same storage; gradients reach it).
    pub fn param(&self, id: ParamId) -> Result<Tensor, PluginError> {
        self.ops.param(id.0).into_result().map(|t| t.into_tensor())
    }

    /// Run a linear layer: `x W^T + b` (+ LoRA where the host applied one).
    pub fn linear(&self, id: LinearId, x: &Tensor) -> Result<Tensor, PluginError> {
        self.ops.linear(id.0, TensorRef::new(x)).into_result().map(|t| t.into_tensor())
    }

    /// Whether this forward is for training (dropout on).
    pub fn training(&self) -> bool {
        self.ops.training()
    }

    /// Whether anything in `role` trains (run it without autograd if not).
    pub fn role_trains(&self, role: Role) -> bool {
        self.ops.role_trains(role)
    }

    /// Run segment `id` (a decoder layer, a vision block) on `inputs` through
    /// the host, which calls back [`crate::FamilyModel::run_segment`] with
    /// them: directly, or with activation checkpointing on, keeping only
    /// `inputs` and recomputing the segment in the backward pass. Everything
    /// the segment reads besides the host's parameters must be in `inputs`
    /// (hidden states, rotary tables, masks) or in the model itself.
    pub fn segment(&self, id: Segment, inputs: &[&Tensor]) -> Result<Vec<Tensor>, PluginError> {
        let inputs: RVec<TensorRef<'_>> = inputs.iter().map(|t| TensorRef::new(t)).collect();
        self.ops.segment(id, inputs).into_result().map(|v| v.into_iter().map(|t| t.into_tensor()).collect())
    }
}
