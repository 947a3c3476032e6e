// The NCCL backend for csrc/dist.cpp, in its own file: ProcessGroupNCCL.hpp
// needs the CUDA runtime and NCCL headers (host/build.rs finds them in the
// nvidia-* wheels beside torch and defines VLMHOST_NCCL), and compiling it is
// slow. The code that runs is ProcessGroupNCCL in libtorch_cuda.so, which
// vlmhost links with --no-as-needed (vlmhost-build).
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include <chrono>

c10::intrusive_ptr<c10d::Backend> vlmhost_make_nccl(const c10::intrusive_ptr<c10d::Store>& store, int rank, int world, int cuda_device,
                                                    std::chrono::milliseconds timeout) {
  auto o = c10d::ProcessGroupNCCL::Options::create();
  o->timeout = timeout;
  auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, o);
  // The communicator is created at the first collective, on this device.
  nccl->setBoundDeviceId(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(cuda_device)));
  return nccl;
}
