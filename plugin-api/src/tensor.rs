//! Opaque tensor handles and the rule for who frees what.
//!
//! A handle is the `at::Tensor*` that tch's C wrapper allocates
//! (`torch_sys::C_tensor`). Host and plugin link the same libtorch (the
//! manifest's version check enforces the release), so the storage behind a
//! handle is valid on both sides. The ownership rule:
//!
//! 1. **Arguments are borrowed.** A [`TensorRef`] passed into a call is valid
//!    for that call only. The callee never frees it; to keep the tensor beyond
//!    the call, take [`TensorRef::to_tensor`], a shallow clone (a new handle on
//!    the same storage, which the callee then owns).
//! 2. **Results are moved.** An [`OwnedTensor`] returned from a call belongs to
//!    the receiver, which turns it into a `tch::Tensor` with
//!    [`OwnedTensor::into_tensor`] (or drops it, which frees the handle).
//!    The sender must not touch it after returning it.
//! 3. **No `VarStore`, no autograd state is owned across the line.** Autograd
//!    graphs live in libtorch and are shared naturally: a tensor computed by a
//!    plugin from host parameters back-propagates into them.

use abi_stable::StableAbi;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use tch::Tensor;

/// A borrowed tensor handle, valid for the duration of one call.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy)]
pub struct TensorRef<'a> {
    ptr: *mut c_void,
    _borrow: PhantomData<&'a ()>,
}

impl<'a> TensorRef<'a> {
    /// Borrow `tensor` for a call.
    pub fn new(tensor: &'a Tensor) -> Self {
        TensorRef { ptr: tensor.as_ptr() as *mut c_void, _borrow: PhantomData }
    }

    /// A new handle on the same storage (a shallow clone), owned by the caller.
    pub fn to_tensor(&self) -> Tensor {
        // SAFETY: `ptr` came from a live `&'a Tensor` (rule 1); shallow-cloning
        // creates a fresh `at::Tensor*` that we own.
        unsafe { Tensor::clone_from_ptr(self.ptr as *mut torch_sys::C_tensor) }
    }
}

/// A tensor handle whose ownership moves to the receiver.
#[repr(transparent)]
#[derive(StableAbi)]
pub struct OwnedTensor {
    ptr: *mut c_void,
}

impl OwnedTensor {
    /// Give up `tensor`'s handle so it can be returned across the boundary.
    pub fn new(tensor: Tensor) -> Self {
        let tensor = ManuallyDrop::new(tensor);
        OwnedTensor { ptr: tensor.as_ptr() as *mut c_void }
    }

    /// Take ownership of the handle as a `tch::Tensor`.
    pub fn into_tensor(self) -> Tensor {
        let this = ManuallyDrop::new(self);
        // SAFETY: the handle was produced by `OwnedTensor::new` from a Tensor
        // whose drop was suppressed; we are now its only owner (rule 2).
        unsafe { Tensor::from_ptr(this.ptr as *mut torch_sys::C_tensor) }
    }
}

impl Drop for OwnedTensor {
    fn drop(&mut self) {
        // SAFETY: as in `into_tensor`; dropping the Tensor frees the handle once.
        drop(unsafe { Tensor::from_ptr(self.ptr as *mut torch_sys::C_tensor) });
    }
}

// A handle is a pointer to a reference-counted libtorch tensor, which may be
// used from any thread (libtorch tensors are thread-safe for such hand-offs).
unsafe impl Send for OwnedTensor {}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn borrowed_handles_shallow_clone() {
        let t = Tensor::arange(6, (Kind::Float, tch::Device::Cpu));
        let r = TensorRef::new(&t);
        let mut copy = r.to_tensor();
        let _ = copy.fill_(1.0);
        // Same storage: the original sees the write.
        assert_eq!(t.sum(Kind::Float).double_value(&[]), 6.0);
    }

    #[test]
    fn owned_handles_round_trip() {
        let t = Tensor::ones([2, 3], (Kind::Float, tch::Device::Cpu));
        let owned = OwnedTensor::new(t);
        let back = owned.into_tensor();
        assert_eq!(back.size(), vec![2, 3]);
        // Dropping an OwnedTensor frees it without touching anything else.
        drop(OwnedTensor::new(back.shallow_clone()));
        assert_eq!(back.sum(Kind::Float).double_value(&[]), 6.0);
    }
}
