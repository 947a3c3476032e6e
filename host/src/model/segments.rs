//! Segments and activation checkpointing (`train.gradient_checkpointing`).
//!
//! A plugin marks its layers as segments ([`HostOps::segment`]): the host
//! runs each through the plugin's `run_segment`, and decides how:
//!
//! * plainly, keeping the segment's activations for the backward pass;
//! * checkpointed (training with gradient checkpointing on, autograd
//!   recording, the segment's role training): through the custom autograd
//!   function of `csrc/checkpoint.cpp`, which runs the segment without
//!   recording, keeps only its inputs (and the RNG and autocast state), and
//!   in the backward pass runs it again ("recompute") and back-propagates
//!   through that.
//!
//! The recomputation needs the model (its parameters, adapters and plugin)
//! after the forward pass has returned. The autograd graph holds only the
//! model's id; [`HostModel::backward`] lends the model to the recomputations
//! for the duration of the backward pass (a registry of the models in
//! backward). A backward pass of a checkpointed graph outside it fails with
//! an error saying so, never touches a model that is gone.
//!
//! [`HostOps::segment`]: vlmhost_plugin_api::model::HostOps::segment

use super::ops::Ops;
use super::HostModel;
use abi_stable::std_types::RVec;
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use tch::Tensor;
use torch_sys::C_tensor;
use vlmhost_plugin_api::model::Segment;
use vlmhost_plugin_api::{PluginError, TensorRef};

type RunFn = unsafe extern "C" fn(state: *mut c_void, live: *const c_void, inputs: *mut *mut C_tensor, n: usize, out: *mut c_void);
type DropFn = unsafe extern "C" fn(state: *mut c_void);

extern "C" {
    fn vlmhost_checkpoint(
        state: *mut c_void,
        run: RunFn,
        drop: DropFn,
        live: *const c_void,
        inputs: *const *mut C_tensor,
        n: usize,
        outputs: *mut *mut *mut C_tensor,
        n_outputs: *mut usize,
    ) -> *mut c_char;
    fn vlmhost_segment_push(out: *mut c_void, t: *const C_tensor);
    fn vlmhost_segment_fail(out: *mut c_void, message: *const c_char, len: usize);
    fn vlmhost_grad_enabled() -> i32; // csrc/ops_observer.cpp
}

/// Whether autograd records operations on this thread.
pub fn grad_enabled() -> bool {
    // SAFETY: a read of libtorch's thread-local grad mode.
    unsafe { vlmhost_grad_enabled() == 1 }
}

/// A new model id, for [`HostModel::backward`]'s registry.
pub(super) fn next_model_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The models in a backward pass, by id, as addresses (a `&HostModel` each,
/// valid while registered: [`Lent`] removes it before the borrow ends).
fn lent() -> &'static Mutex<HashMap<u64, usize>> {
    static LENT: OnceLock<Mutex<HashMap<u64, usize>>> = OnceLock::new();
    LENT.get_or_init(Default::default)
}

/// `model` lent to recomputations until dropped.
pub(super) struct Lent<'a> {
    id: u64,
    _model: std::marker::PhantomData<&'a HostModel>,
}

impl<'a> Lent<'a> {
    pub fn new(model: &'a HostModel) -> Lent<'a> {
        lent().lock().unwrap_or_else(|e| e.into_inner()).insert(model.id, model as *const HostModel as usize);
        Lent { id: model.id, _model: std::marker::PhantomData }
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        lent().lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

/// What a checkpointed segment keeps in the graph.
struct State {
    model: u64,
    segment: Segment,
}

/// Run `segment` on `inputs` checkpointed, for `ops`'s forward pass.
pub(super) fn checkpointed(ops: &Ops<'_>, segment: Segment, mut inputs: Vec<Tensor>) -> Result<Vec<Tensor>, PluginError> {
    // Without an input that requires grad the function would not enter the
    // graph, and the parameters inside would get no gradient (PyTorch's
    // reentrant checkpoint has the same trap): the first floating input
    // then requires grad (its gradient is computed and dropped).
    if !inputs.iter().any(Tensor::requires_grad) {
        if let Some(t) = inputs.iter_mut().find(|t| t.defined() && t.is_floating_point()) {
            *t = t.detach().set_requires_grad(true);
        }
    }
    let state = Box::into_raw(Box::new(State { model: ops.model.id, segment })) as *mut c_void;
    let ptrs: Vec<*mut C_tensor> = inputs.iter().map(|t| t.as_ptr() as *mut C_tensor).collect();
    let mut outputs: *mut *mut C_tensor = std::ptr::null_mut();
    let mut n = 0usize;
    // SAFETY: `state` is a `State` the C++ side frees through `drop_state`;
    // `ptrs` are borrowed for the call; `ops` outlives it (the forward pass).
    let err = unsafe {
        vlmhost_checkpoint(state, run_state, drop_state, ops as *const Ops<'_> as *const c_void, ptrs.as_ptr(), ptrs.len(), &mut outputs, &mut n)
    };
    if !err.is_null() {
        // SAFETY: a NUL-terminated message malloc'ed by the C++ side.
        let message = unsafe { CStr::from_ptr(err).to_string_lossy().into_owned() };
        unsafe { libc_free(err as *mut c_void) };
        return Err(PluginError::Torch { message: message.into() });
    }
    // SAFETY: `n` new tensor handles in a malloc'ed array, ours now.
    let tensors = unsafe {
        let v = (0..n).map(|i| Tensor::from_ptr(*outputs.add(i))).collect();
        libc_free(outputs as *mut c_void);
        v
    };
    Ok(tensors)
}

extern "C" {
    #[link_name = "free"]
    fn libc_free(p: *mut c_void);
}

unsafe extern "C" fn drop_state(state: *mut c_void) {
    // SAFETY: made by `Box::into_raw` in `checkpointed`, dropped once.
    drop(unsafe { Box::from_raw(state as *mut State) });
}

/// The segment call of `csrc/checkpoint.cpp`: in the forward pass (`live`,
/// the forward's [`Ops`]) and in the backward pass (`live` null: the model
/// lent by [`HostModel::backward`], its operations without checkpointing).
unsafe extern "C" fn run_state(state: *mut c_void, live: *const c_void, inputs: *mut *mut C_tensor, n: usize, out: *mut c_void) {
    // SAFETY: the C++ side passes `n` new handles, ours to own.
    let inputs: Vec<Tensor> = (0..n).map(|i| unsafe { Tensor::from_ptr(*inputs.add(i)) }).collect();
    // SAFETY: `state` is the `State` of `checkpointed`, alive in the graph.
    let state = unsafe { &*(state as *const State) };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if !live.is_null() {
            // SAFETY: the forward pass's `Ops`, alive for the call.
            let ops = unsafe { &*(live as *const Ops<'_>) };
            return ops.run_segment(state.segment, &inputs);
        }
        let registry = lent().lock().unwrap_or_else(|e| e.into_inner());
        let Some(&address) = registry.get(&state.model) else {
            return Err(PluginError::invalid(
                "activation checkpointing",
                "a checkpointed segment is recomputed outside HostModel::backward (the model is not lent to the backward pass)",
            ));
        };
        drop(registry);
        // SAFETY: registered by `Lent` for the borrow of the backward pass now running.
        let model = unsafe { &*(address as *const HostModel) };
        model.recomputed[state.segment.role as usize].fetch_add(1, Ordering::Relaxed);
        // Model FLOPs count the forward once; its recomputation is not the model's work.
        let _pause = super::flops::pause();
        Ops { model, training: true, recompute: true }.run_segment(state.segment, &inputs)
    }));
    let result = result.unwrap_or_else(|_| Err(PluginError::Torch { message: "a segment panicked in the host".into() }));
    match result {
        Ok(outputs) => {
            for t in &outputs {
                // SAFETY: `out` is the C++ side's collector; it copies the handle.
                unsafe { vlmhost_segment_push(out, t.as_ptr()) };
            }
        }
        Err(e) => {
            let message = format!("segment {}[{}] ({} role): {e}", state.segment.stack, state.segment.layer, state.segment.role);
            // SAFETY: as above; the message is copied.
            unsafe { vlmhost_segment_fail(out, message.as_ptr() as *const c_char, message.len()) };
        }
    }
}

/// The ABI's form of segment inputs.
pub(super) fn refs(inputs: &[Tensor]) -> RVec<TensorRef<'_>> {
    inputs.iter().map(TensorRef::new).collect()
}
