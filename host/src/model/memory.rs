//! Memory as the tools users know report it: on CUDA, libtorch's caching
//! allocator's counters (`csrc/memory.cpp`; what `torch.cuda.memory_allocated`,
//! `max_memory_allocated` and `max_memory_reserved` say), and on every
//! device the process's peak resident set (Linux `VmHWM`).

use tch::Device;

extern "C" {
    fn vlmhost_cuda_memory(device: i32, out: *mut i64) -> i32;
    fn vlmhost_cuda_reset_peak_memory(device: i32) -> i32;
}

/// Bytes on one CUDA device, as its caching allocator counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaMemory {
    /// Held by tensors now.
    pub allocated: i64,
    /// The most held by tensors since the last [`reset_cuda_peak`].
    pub peak_allocated: i64,
    /// Reserved by the allocator now (tensors and its cache).
    pub reserved: i64,
    /// The most reserved since the last [`reset_cuda_peak`].
    pub peak_reserved: i64,
}

/// The allocator's counters of `device`; `None` on the CPU or without CUDA.
pub fn cuda_memory(device: Device) -> Option<CudaMemory> {
    let Device::Cuda(index) = device else { return None };
    let mut out = [0i64; 4];
    // SAFETY: `out` holds the four values the function writes.
    let rc = unsafe { vlmhost_cuda_memory(index as i32, out.as_mut_ptr()) };
    (rc == 0).then(|| CudaMemory { allocated: out[0], peak_allocated: out[1], reserved: out[2], peak_reserved: out[3] })
}

/// Start `device`'s peaks anew from the current values (a no-op on the CPU).
pub fn reset_cuda_peak(device: Device) {
    if let Device::Cuda(index) = device {
        // SAFETY: a call into libtorch's allocator; errors come back as -1 and are ignored here.
        let _ = unsafe { vlmhost_cuda_reset_peak_memory(index as i32) };
    }
}

/// This process's peak resident set size in bytes (Linux), if known.
pub fn peak_rss() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes in MiB.
pub fn mib(bytes: i64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_has_no_cuda_counters_and_a_peak_rss() {
        assert_eq!(cuda_memory(Device::Cpu), None);
        reset_cuda_peak(Device::Cpu);
        if !tch::Cuda::is_available() {
            // No CUDA allocator here: the shim answers -1 rather than failing.
            assert_eq!(cuda_memory(Device::Cuda(0)), None);
        }
        let rss = peak_rss().expect("Linux reports VmHWM");
        assert!(rss > 1 << 20, "peak RSS {rss} bytes");
    }
}
