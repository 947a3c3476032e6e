//! bf16 autocast, as training on CUDA uses it: matrix products run in
//! bfloat16 while parameters, optimizer state and the loss stay float32.
//! (tch's own `autocast` is CUDA fp16 only; `csrc/autocast.cpp` calls
//! libtorch's device-generic autocast API.)

use tch::Device;

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

/// Run `f` under bf16 autocast on CUDA devices, as it is on the CPU (fp32).
pub fn bf16_on_cuda<T>(device: Device, f: impl FnOnce() -> T) -> T {
    if device.is_cuda() {
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
    use tch::{Kind, Tensor};

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
        // fp32 on the CPU path.
        assert_eq!(bf16_on_cuda(Device::Cpu, || a.linear::<Tensor>(&w, None)).kind(), Kind::Float);
    }
}
