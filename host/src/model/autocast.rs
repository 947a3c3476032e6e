//! bf16 autocast, as mixed-precision training uses it (`precision: bf16`):
//! matrix products run in bfloat16 while the trainable tensors, the optimizer
//! state and the loss stay float32.
//! (tch's own `autocast` is CUDA fp16 only; `csrc/autocast.cpp` calls
//! libtorch's device-generic autocast API.)

use tch::{Device, Kind};

extern "C" {
    fn vlmhost_autocast_enter(cuda: i32) -> i32;
    fn vlmhost_autocast_exit(cuda: i32, previous: i32) -> i32;
    fn vlmhost_autocast_is_enabled(cuda: i32) -> i32;
}

/// Run `f` with bf16 autocast for `device`'s type (CUDA or CPU).
pub fn bf16<T>(device: Device, f: impl FnOnce() -> T) -> T {
    let cuda = i32::from(device.is_cuda());
    // SAFETY: plain calls into libtorch's thread-local autocast state.
    let previous = unsafe { vlmhost_autocast_enter(cuda) };
    struct Exit(i32, i32);
    impl Drop for Exit {
        fn drop(&mut self) {
            if self.1 >= 0 {
                // SAFETY: as above; restores the state entered.
                unsafe { vlmhost_autocast_exit(self.0, self.1) };
            }
        }
    }
    let _exit = Exit(cuda, previous);
    f()
}

/// Run `f` as a model whose base weights are stored in `kind` computes on
/// `device`: under bf16 autocast for bf16 weights (mixed precision: products
/// in bf16, the fp32 trainable tensors cast on the fly, their gradients fp32),
/// in the weights' own precision otherwise.
pub fn for_weights<T>(kind: Kind, device: Device, f: impl FnOnce() -> T) -> T {
    if kind == Kind::BFloat16 {
        bf16(device, f)
    } else {
        f()
    }
}

/// Whether autocast is on for `device`'s type on this thread.
pub fn is_enabled(device: Device) -> bool {
    // SAFETY: a read of thread-local state.
    unsafe { vlmhost_autocast_is_enabled(i32::from(device.is_cuda())) == 1 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    #[test]
    fn bf16_autocast_runs_matmuls_in_bf16_and_restores_state() {
        let a = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([3, 8], (Kind::Float, Device::Cpu));
        assert!(!is_enabled(Device::Cpu));
        let y = bf16(Device::Cpu, || {
            assert!(is_enabled(Device::Cpu));
            a.linear::<Tensor>(&w, None)
        });
        assert_eq!(y.kind(), Kind::BFloat16);
        assert!(!is_enabled(Device::Cpu));
        assert_eq!(a.linear::<Tensor>(&w, None).kind(), Kind::Float);
        // The CUDA flag can be toggled without a GPU; nothing runs there.
        bf16(Device::Cuda(0), || assert!(is_enabled(Device::Cuda(0))));
        assert!(!is_enabled(Device::Cuda(0)));
        // By the weights' dtype: autocast for bf16 weights only.
        assert_eq!(for_weights(Kind::Float, Device::Cpu, || a.linear::<Tensor>(&w, None)).kind(), Kind::Float);
        assert_eq!(for_weights(Kind::BFloat16, Device::Cpu, || a.linear::<Tensor>(&w, None)).kind(), Kind::BFloat16);
    }
}
