// CUDA memory statistics of libtorch's caching allocator, for vlmhost's
// metrics: what torch.cuda.max_memory_allocated / max_memory_reserved report.
// Uses c10's device-generic allocator interface (c10/core/
// CachingDeviceAllocator.h), so it compiles against any libtorch, CPU-only
// ones included; without a CUDA allocator the calls answer -1.
#include <c10/core/CachingDeviceAllocator.h>

#include <cstdint>

namespace {
c10::DeviceAllocator* cuda_allocator() {
  auto* allocator = c10::GetAllocator(c10::DeviceType::CUDA);
  return dynamic_cast<c10::DeviceAllocator*>(allocator);
}
}  // namespace

extern "C" {

// Bytes allocated and reserved on CUDA device `device`, now and at their
// peaks since the last reset: out[0] allocated, out[1] peak allocated, out[2]
// reserved, out[3] peak reserved. Returns 0, or -1 (no CUDA allocator, no
// such device, any libtorch error).
int vlmhost_cuda_memory(int device, int64_t* out) {
  try {
    auto* allocator = cuda_allocator();
    if (allocator == nullptr || !allocator->initialized()) {
      return -1;
    }
    auto stats = allocator->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = stats.allocated_bytes[all].current;
    out[1] = stats.allocated_bytes[all].peak;
    out[2] = stats.reserved_bytes[all].current;
    out[3] = stats.reserved_bytes[all].peak;
    return 0;
  } catch (...) {
    return -1;
  }
}

// Start the peaks of vlmhost_cuda_memory anew from the current values.
int vlmhost_cuda_reset_peak_memory(int device) {
  try {
    auto* allocator = cuda_allocator();
    if (allocator == nullptr || !allocator->initialized()) {
      return -1;
    }
    allocator->resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"
