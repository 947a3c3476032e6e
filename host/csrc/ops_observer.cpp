// Which scaled-dot-product-attention kernel libtorch runs, and the FLOPs of
// the attention calls, seen through RecordFunction (what torch.profiler is
// built on). The observer is one process-global callback, so it sees the ops
// the family plugins call through their own copy of tch as well as the
// host's, on every thread (autograd's backward threads included).
//
// Nothing is registered until vlmhost_observer_enable(1): no overhead
// otherwise. While registered, the callback asks for op inputs (it reads the
// shapes of the SDPA entry op's query, key and value); counts are kept only
// while the window is open (vlmhost_observer_count(1)), and FLOPs only while
// not paused (vlmhost_flops_pause: activation checkpointing's recomputation).
// libtorch's release build defines NDEBUG, and RecordFunction's layout and its
// inputs() check depend on it: match it.
#ifndef NDEBUG
#define NDEBUG
#endif
#include <ATen/record_function.h>
#include <ATen/core/ivalue.h>
#include <c10/core/GradMode.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>

namespace {

// The kernels, in the order vlmhost_attention_kernels writes them.
enum Kernel : int {
  kEntry = 0,      // aten::scaled_dot_product_attention (every call)
  kFlash,          // aten::_scaled_dot_product_flash_attention (CUDA)
  kFlashCpu,       // aten::_scaled_dot_product_flash_attention_for_cpu
  kEfficient,      // aten::_scaled_dot_product_efficient_attention
  kCudnn,          // aten::_scaled_dot_product_cudnn_attention
  kMath,           // aten::_scaled_dot_product_attention_math
  kOther,          // aten::_scaled_dot_product_fused_attention_overrideable, math_for_mps
  kKernels,
};

std::atomic<int64_t> g_counts[kKernels];
std::atomic<int64_t> g_forward_flops{0};
std::atomic<int64_t> g_backward_flops{0};
std::atomic<bool> g_counting{false};
std::atomic<int> g_paused{0};
std::mutex g_mutex;
at::CallbackHandle g_handle = 0;
// SDPA entry calls open on this thread: autocast re-dispatches the entry op
// with cast inputs, and that inner call is the same attention, not another.
thread_local int t_entry_depth = 0;
// When non-zero, only calls on the thread with this key count (tests, whose
// neighbours in other threads run attention too); 0: every thread.
std::atomic<uint64_t> g_only_thread{0};

uint64_t this_thread_key() {
  static std::atomic<uint64_t> next{1};
  thread_local uint64_t key = next.fetch_add(1);
  return key;
}

// The kernel an op name names, or -1. Forward kernels only: the backward
// ops (`..._backward`) are not counted.
int kernel_of(const char* name) {
  static const char kPrefix[] = "aten::";
  if (std::strncmp(name, kPrefix, sizeof(kPrefix) - 1) != 0) {
    return -1;
  }
  const char* n = name + sizeof(kPrefix) - 1;
  if (n[0] != '_' && n[0] != 's') {
    return -1;
  }
  if (std::strcmp(n, "scaled_dot_product_attention") == 0) return kEntry;
  if (std::strncmp(n, "_scaled_dot_product_", 20) != 0) return -1;
  const char* k = n + 20;
  if (std::strcmp(k, "flash_attention") == 0) return kFlash;
  if (std::strcmp(k, "flash_attention_for_cpu") == 0) return kFlashCpu;
  if (std::strcmp(k, "efficient_attention") == 0) return kEfficient;
  if (std::strcmp(k, "cudnn_attention") == 0) return kCudnn;
  if (std::strcmp(k, "attention_math") == 0) return kMath;
  if (std::strcmp(k, "fused_attention_overrideable") == 0 || std::strcmp(k, "attention_math_for_mps") == 0) return kOther;
  return -1;
}

// The FLOPs of one SDPA call from its inputs (query, key, value, attn_mask,
// dropout_p, is_causal, ...): 2*B*H*L*S*(E + Ev) (the two matrix products),
// halved when causal without a mask; backward 2x that when grad mode is on
// and any of q, k, v requires grad.
void count_attention_flops(const at::RecordFunction& fn) {
  auto inputs = fn.inputs();
  if (inputs.size() < 6 || !inputs[0].isTensor() || !inputs[1].isTensor() || !inputs[2].isTensor()) {
    return;
  }
  const auto& q = inputs[0].toTensor();
  const auto& k = inputs[1].toTensor();
  const auto& v = inputs[2].toTensor();
  if (q.dim() < 2 || k.dim() < 2 || v.dim() < 2) {
    return;
  }
  // q [..., H, L, E], k [..., Hk, S, E], v [..., Hk, S, Ev]: every leading dim of q is a batch of products.
  const int64_t L = q.size(-2), E = q.size(-1), S = k.size(-2), Ev = v.size(-1);
  int64_t batch = 1;
  for (int64_t d = 0; d < q.dim() - 2; ++d) batch *= q.size(d);
  double flops = 2.0 * static_cast<double>(batch) * L * S * static_cast<double>(E + Ev);
  const bool masked = !inputs[3].isNone();
  const bool causal = inputs[5].isBool() && inputs[5].toBool();
  if (causal && !masked) {
    flops /= 2.0;
  }
  g_forward_flops.fetch_add(static_cast<int64_t>(flops), std::memory_order_relaxed);
  if (c10::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad())) {
    g_backward_flops.fetch_add(static_cast<int64_t>(2.0 * flops), std::memory_order_relaxed);
  }
}

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
  if (!g_counting.load(std::memory_order_relaxed)) {
    return nullptr;
  }
  // (The window opens and closes between steps, never inside an attention call.)
  const uint64_t only = g_only_thread.load(std::memory_order_relaxed);
  if (only != 0 && only != this_thread_key()) {
    return nullptr;
  }
  const int k = kernel_of(fn.name());
  if (k < 0) {
    return nullptr;
  }
  if (k == kEntry && t_entry_depth++ > 0) {
    return nullptr;  // autocast's inner call of the same attention
  }
  g_counts[k].fetch_add(1, std::memory_order_relaxed);
  if (k == kEntry && g_paused.load(std::memory_order_relaxed) == 0) {
    count_attention_flops(fn);
  }
  return nullptr;
}

void on_end(const at::RecordFunction& fn, at::ObserverContext*) {
  if (t_entry_depth > 0 && kernel_of(fn.name()) == kEntry) {
    --t_entry_depth;
  }
}

}  // namespace

extern "C" {

// Register (on != 0) or remove the observer. Idempotent. 0, or -1 on a libtorch error.
int vlmhost_observer_enable(int on) {
  try {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (on && g_handle == 0) {
      g_handle = at::addGlobalCallback(
          at::RecordFunctionCallback(&on_start, &on_end).needsInputs(true).scopes({at::RecordScope::FUNCTION}));
    } else if (!on && g_handle != 0) {
      at::removeCallback(g_handle);
      g_handle = 0;
    }
    return 0;
  } catch (...) {
    return -1;
  }
}

// Open (on != 0) or close the counting window.
void vlmhost_observer_count(int on) { g_counting.store(on != 0); }

// Count only the calls on this thread (on != 0), or on every thread again.
void vlmhost_observer_only_this_thread(int on) { g_only_thread.store(on ? this_thread_key() : 0); }

// Pause (delta = 1) or resume (delta = -1) the FLOP counts; nested pauses add up.
void vlmhost_flops_pause(int delta) { g_paused.fetch_add(delta); }

// Whether FLOPs are being counted (no pause open).
int vlmhost_flops_paused() { return g_paused.load() != 0; }

// out[0..7]: calls of the entry op, flash (CUDA), flash for CPU, efficient,
// cuDNN, math, other fused kernels. With reset != 0 the counts restart at zero.
void vlmhost_attention_kernels(int64_t* out, int reset) {
  for (int i = 0; i < kKernels; ++i) {
    out[i] = reset ? g_counts[i].exchange(0) : g_counts[i].load();
  }
}

// out[0] forward, out[1] backward FLOPs of the attention calls; with reset != 0 restarted at zero.
void vlmhost_attention_flops(int64_t* out, int reset) {
  out[0] = reset ? g_forward_flops.exchange(0) : g_forward_flops.load();
  out[1] = reset ? g_backward_flops.exchange(0) : g_backward_flops.load();
}

// Whether autograd records operations on this thread (c10::GradMode).
int vlmhost_grad_enabled() { return c10::GradMode::is_enabled() ? 1 : 0; }

}  // extern "C"
