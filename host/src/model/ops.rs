//! The host's side of a forward pass, as the plugin sees it through the ABI:
//! parameters by index, and linear layers with their LoRA adapters
//! ([`HostOps`]); and a collated batch as the ABI's borrowed [`Batch`].

use super::batch::BatchTensors;
use super::HostModel;
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RResult, RStr, RVec};
use tch::Tensor;
use super::segments;
use vlmhost_plugin_api::model::{Batch, HostOps, HostOpsRef, ModuleKind, NamedTensorRef, Segment};
use vlmhost_plugin_api::{OwnedTensor, PluginError, Role, TensorRef};

/// The host side of a forward pass over `model`.
pub(super) struct Ops<'a> {
    pub model: &'a HostModel,
    pub training: bool,
    /// A checkpointed segment's recomputation in the backward pass: its
    /// segments run plainly.
    pub recompute: bool,
}

impl Ops<'_> {
    /// The ABI's handle on these operations.
    pub fn abi(&self) -> HostOpsRef<'_> {
        vlmhost_plugin_api::model::HostOps_TO::from_ptr(abi_stable::sabi_types::RRef::new(self), TD_Opaque)
    }
}

/// `batch` as the ABI's borrowed batch.
pub(super) fn abi_batch(batch: &BatchTensors) -> Batch<'_> {
    let tensors: RVec<NamedTensorRef<'_>> = batch
        .tensors
        .iter()
        .map(|(n, t)| NamedTensorRef { name: RStr::from(n.as_str()), tensor: TensorRef::new(t) })
        .collect();
    Batch { input_ids: TensorRef::new(&batch.input_ids), attention_mask: TensorRef::new(&batch.attention_mask), tensors }
}

fn torch_err(e: tch::TchError) -> PluginError {
    PluginError::Torch { message: e.to_string().into() }
}

impl Ops<'_> {
    /// `x W^T + b`, plus the adapter's update where LoRA targets the module.
    fn run_linear(&self, index: u32, x: TensorRef<'_>) -> Result<Tensor, PluginError> {
        let m = self
            .model
            .spec()
            .modules
            .get(index as usize)
            .filter(|m| m.kind == ModuleKind::Linear)
            .ok_or_else(|| PluginError::invalid("linear", format!("no linear module {index}")))?;
        let params = self.model.params();
        let x = x.to_tensor();
        let w = &params[m.weight as usize];
        let b = (m.bias != u32::MAX).then(|| &params[m.bias as usize]);
        let mut y = x.f_linear(w, b).map_err(torch_err)?;
        super::flops::count_linear(&x, w, self.model.adapter(index as usize));
        if let Some(a) = self.model.adapter(index as usize) {
            y = y.f_add(&a.delta(&x, self.training).map_err(torch_err)?).map_err(torch_err)?;
        }
        Ok(y)
    }
}

impl Ops<'_> {
    /// The plugin's segment `id` on `inputs`, with these operations.
    pub fn run_segment(&self, id: Segment, inputs: &[Tensor]) -> Result<Vec<Tensor>, PluginError> {
        let out = self.model.model.run_segment(&self.abi(), id, segments::refs(inputs)).into_result()?;
        Ok(out.into_iter().map(|t| t.into_tensor()).collect())
    }

    /// Whether segment `id` on `inputs` runs checkpointed: a training forward
    /// pass (not a recomputation) that records autograd, with checkpointing
    /// on, and a graph to keep: something in the segment's role trains, or
    /// a gradient flows through it (an input requires grad: a frozen LLM
    /// under a training vision tower).
    fn checkpoints(&self, id: Segment, inputs: &[Tensor]) -> bool {
        self.training
            && !self.recompute
            && self.model.gradient_checkpointing
            && segments::grad_enabled()
            && (self.model.plan().role_trains(id.role, self.model.spec()) || inputs.iter().any(Tensor::requires_grad))
    }
}

impl HostOps for Ops<'_> {
    fn param(&self, index: u32) -> RResult<OwnedTensor, PluginError> {
        match self.model.params().get(index as usize) {
            Some(t) => RResult::ROk(OwnedTensor::new(t.shallow_clone())),
            None => RResult::RErr(PluginError::invalid("param", format!("no parameter {index}"))),
        }
    }

    fn linear(&self, index: u32, x: TensorRef<'_>) -> RResult<OwnedTensor, PluginError> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_linear(index, x))) {
            Ok(Ok(y)) => RResult::ROk(OwnedTensor::new(y)),
            Ok(Err(e)) => RResult::RErr(e),
            Err(_) => RResult::RErr(PluginError::Torch { message: "host linear panicked".into() }),
        }
    }

    fn training(&self) -> bool {
        self.training
    }

    fn role_trains(&self, role: Role) -> bool {
        self.model.plan().role_trains(role, self.model.spec())
    }

    fn segment(&self, id: Segment, inputs: RVec<TensorRef<'_>>) -> RResult<RVec<OwnedTensor>, PluginError> {
        let inputs: Vec<Tensor> = inputs.iter().map(|t| t.to_tensor()).collect();
        let run = || if self.checkpoints(id, &inputs) { segments::checkpointed(self, id, inputs) } else { self.run_segment(id, &inputs) };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
            Ok(Ok(out)) => RResult::ROk(out.into_iter().map(OwnedTensor::new).collect()),
            Ok(Err(e)) => RResult::RErr(e),
            Err(_) => RResult::RErr(PluginError::Torch { message: "host segment panicked".into() }),
        }
    }
}
