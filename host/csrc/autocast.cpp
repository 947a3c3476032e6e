// bf16 autocast for vlmhost. tch exposes only CUDA autocast with libtorch's
// default dtype (fp16); training wants bf16, which needs at::autocast's
// device-generic calls. Autocast state is thread-local in libtorch, so
// plugin code running on this thread sees it too.
#include <ATen/autocast_mode.h>

namespace {
at::DeviceType device_type(int cuda) { return cuda ? at::kCUDA : at::kCPU; }
}  // namespace

extern "C" {

// Enable bf16 autocast on the CUDA (cuda != 0) or CPU device type; returns
// whether it was enabled before (for vlmhost_autocast_exit), or -1 on error.
int vlmhost_autocast_enter(int cuda) {
  try {
    auto dt = device_type(cuda);
    bool previous = at::autocast::is_autocast_enabled(dt);
    at::autocast::set_autocast_dtype(dt, at::kBFloat16);
    at::autocast::set_autocast_enabled(dt, true);
    at::autocast::increment_nesting();
    return previous ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

// Leave an autocast region entered with vlmhost_autocast_enter.
int vlmhost_autocast_exit(int cuda, int previous) {
  try {
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(device_type(cuda), previous != 0);
    return 0;
  } catch (...) {
    return -1;
  }
}

// Whether autocast is on for the device type.
int vlmhost_autocast_is_enabled(int cuda) {
  try {
    return at::autocast::is_autocast_enabled(device_type(cuda)) ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"
