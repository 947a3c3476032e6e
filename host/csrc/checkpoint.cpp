// Activation checkpointing for vlmhost (docs/plugin-guide.md, "Segments and
// activation checkpointing"). libtorch's C++ API has no torch.utils.checkpoint,
// so this is its reentrant form as a custom autograd function:
//
// * forward: run the segment (a callback into the host, which calls the
//   plugin's run_segment) on detached inputs and keep none of its activations
//   (its graph goes with it); save its inputs, the CPU (and the inputs' CUDA
//   device's) RNG state and the autocast state;
// * backward: with the saved RNG and autocast state and autograd on, run the
//   segment again on detached copies of the inputs, back-propagate the
//   incoming gradients through that recomputed graph (which accumulates the
//   parameters' gradients, as the outer backward would have), and return the
//   inputs' gradients.
//
// The segment lives in the autograd graph as an IValue capsule holding the
// host's callbacks and its state; the graph's destruction drops it.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/ivalue.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

extern "C" {
// The host's segment call: run the segment `state` stands for on the `n`
// tensors `inputs` (each a new at::Tensor the callee takes ownership of);
// `live` is the forward pass's context (null when recomputing in backward).
// Results go to `out` through vlmhost_segment_push / vlmhost_segment_fail.
typedef void (*vlmhost_segment_run)(void* state, const void* live, at::Tensor** inputs, size_t n, void* out);
// Frees `state`.
typedef void (*vlmhost_segment_drop)(void* state);
}

namespace {

struct Outputs {
  std::vector<at::Tensor> tensors;
  std::optional<std::string> error;
};

// The segment in the graph: the host's state and callbacks.
struct Segment : torch::CustomClassHolder {
  void* state;
  vlmhost_segment_run run;
  vlmhost_segment_drop drop;

  Segment(void* s, vlmhost_segment_run r, vlmhost_segment_drop d) : state(s), run(r), drop(d) {}
  ~Segment() override { drop(state); }

  std::vector<at::Tensor> call(const void* live, const std::vector<at::Tensor>& inputs) const {
    std::vector<at::Tensor*> handles;
    handles.reserve(inputs.size());
    for (const auto& t : inputs) handles.push_back(new at::Tensor(t));
    Outputs out;
    run(state, live, handles.data(), handles.size(), &out);
    if (out.error) throw std::runtime_error(*out.error);
    return std::move(out.tensors);
  }
};

// Autocast's thread-local state for the CPU and CUDA device types.
struct AutocastState {
  bool cpu, cuda;
  at::ScalarType cpu_dtype, cuda_dtype;

  static AutocastState current() {
    return {at::autocast::is_autocast_enabled(at::kCPU), at::autocast::is_autocast_enabled(at::kCUDA),
            at::autocast::get_autocast_dtype(at::kCPU), at::autocast::get_autocast_dtype(at::kCUDA)};
  }

  void apply() const {
    at::autocast::set_autocast_enabled(at::kCPU, cpu);
    at::autocast::set_autocast_enabled(at::kCUDA, cuda);
    at::autocast::set_autocast_dtype(at::kCPU, cpu_dtype);
    at::autocast::set_autocast_dtype(at::kCUDA, cuda_dtype);
  }

  void save(torch::autograd::AutogradContext* ctx) const {
    ctx->saved_data["autocast_cpu"] = cpu;
    ctx->saved_data["autocast_cuda"] = cuda;
    ctx->saved_data["autocast_cpu_dtype"] = static_cast<int64_t>(cpu_dtype);
    ctx->saved_data["autocast_cuda_dtype"] = static_cast<int64_t>(cuda_dtype);
  }

  static AutocastState saved(torch::autograd::AutogradContext* ctx) {
    auto& d = ctx->saved_data;
    return {d["autocast_cpu"].toBool(), d["autocast_cuda"].toBool(),
            static_cast<at::ScalarType>(d["autocast_cpu_dtype"].toInt()),
            static_cast<at::ScalarType>(d["autocast_cuda_dtype"].toInt())};
  }
};

// Enters a saved autocast state (as torch.autocast's __enter__ does, nesting
// counted so the cast cache is cleared on leaving) and restores the thread's.
class AutocastScope {
 public:
  explicit AutocastScope(const AutocastState& s) : previous_(AutocastState::current()) {
    s.apply();
    at::autocast::increment_nesting();
  }
  ~AutocastScope() {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    previous_.apply();
  }

 private:
  AutocastState previous_;
};

at::Generator cpu_generator() { return at::detail::getDefaultCPUGenerator(); }

at::Tensor generator_state(at::Generator g) {
  std::lock_guard<std::mutex> lock(g.mutex());
  return g.get_state();
}

void set_generator_state(at::Generator& g, const at::Tensor& state) {
  std::lock_guard<std::mutex> lock(g.mutex());
  g.set_state(state);
}

// The CUDA device of the first CUDA input, or -1.
int64_t cuda_device(const std::vector<at::Tensor>& inputs) {
  for (const auto& t : inputs) {
    if (t.defined() && t.is_cuda()) return t.get_device();
  }
  return -1;
}

at::Generator cuda_generator(int64_t device) {
  return at::globalContext().defaultGenerator(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device)));
}

// Runs with the RNG states of a segment's forward and restores the current
// ones afterwards (torch.random.fork_rng), so dropout draws the same masks.
class RngScope {
 public:
  explicit RngScope(torch::autograd::AutogradContext* ctx) : cpu_(cpu_generator()), device_(ctx->saved_data["cuda_device"].toInt()) {
    cpu_state_ = generator_state(cpu_);
    set_generator_state(cpu_, ctx->saved_data["cpu_rng"].toTensor());
    if (device_ >= 0) {
      cuda_ = cuda_generator(device_);
      cuda_state_ = generator_state(*cuda_);
      set_generator_state(*cuda_, ctx->saved_data["cuda_rng"].toTensor());
    }
  }
  ~RngScope() {
    set_generator_state(cpu_, cpu_state_);
    if (cuda_) set_generator_state(*cuda_, cuda_state_);
  }

 private:
  at::Generator cpu_;
  int64_t device_;
  std::optional<at::Generator> cuda_;
  at::Tensor cpu_state_, cuda_state_;
};

// Leaves with the values and requires-grad flags of `tensors`.
std::vector<at::Tensor> detached_like(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) {
    if (!t.defined()) {
      out.push_back(t);
      continue;
    }
    auto d = t.detach();
    if (t.requires_grad()) d.set_requires_grad(true);
    out.push_back(d);
  }
  return out;
}

struct Checkpoint : torch::autograd::Function<Checkpoint> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, c10::intrusive_ptr<Segment> segment,
                                                const void* live, at::TensorList input_list) {
    // A TensorList (not a vector, which apply would not see as tensors): one autograd input per tensor.
    torch::autograd::variable_list inputs = input_list.vec();
    ctx->set_materialize_grads(false);
    ctx->saved_data["segment"] = c10::IValue::make_capsule(segment);
    AutocastState::current().save(ctx);
    ctx->saved_data["cpu_rng"] = generator_state(cpu_generator());
    int64_t device = cuda_device(inputs);
    ctx->saved_data["cuda_device"] = device;
    if (device >= 0) ctx->saved_data["cuda_rng"] = generator_state(cuda_generator(device));
    ctx->save_for_backward(inputs);
    // The segment runs as its recomputation will (on detached inputs, recording autograd; the
    // graph is dropped with the outputs' detached copies), not in the no-grad mode custom
    // functions run their forward in: some kernels choose their path by whether a tensor
    // requires grad (matmul's folding of batched products), and the forward's values must be
    // those the backward differentiates, to the bit.
    std::vector<at::Tensor> outputs;
    {
      at::AutoGradMode grad(true);
      outputs = segment->call(live, detached_like(inputs));
    }
    for (auto& o : outputs) {
      if (o.defined()) o = o.detach();
    }
    torch::autograd::variable_list constant;
    for (const auto& o : outputs) {
      if (o.defined() && !at::isFloatingType(o.scalar_type()) && !at::isComplexType(o.scalar_type())) constant.push_back(o);
    }
    if (!constant.empty()) ctx->mark_non_differentiable(constant);
    return outputs;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::variable_list grads) {
    auto segment = c10::static_intrusive_pointer_cast<Segment>(ctx->saved_data["segment"].toCapsule());
    auto inputs = detached_like(ctx->get_saved_variables());
    std::vector<at::Tensor> outputs;
    {
      RngScope rng(ctx);
      AutocastScope autocast(AutocastState::saved(ctx));
      at::AutoGradMode grad(true);
      outputs = segment->call(nullptr, inputs);
    }
    if (outputs.size() != grads.size()) {
      throw std::runtime_error("activation checkpointing: the recomputed segment returned " + std::to_string(outputs.size()) +
                               " tensors, its forward " + std::to_string(grads.size()));
    }
    torch::autograd::variable_list roots, root_grads;
    for (size_t i = 0; i < outputs.size(); ++i) {
      if (outputs[i].defined() && outputs[i].requires_grad() && grads[i].defined()) {
        roots.push_back(outputs[i]);
        root_grads.push_back(grads[i]);
      }
    }
    if (!roots.empty()) torch::autograd::backward(roots, root_grads);
    // One gradient per forward argument: none for the segment and the context.
    torch::autograd::variable_list result{at::Tensor(), at::Tensor()};
    for (const auto& t : inputs) result.push_back(t.defined() && t.requires_grad() ? t.grad() : at::Tensor());
    return result;
  }
};

char* copy_message(const char* what) {
  size_t n = std::strlen(what);
  char* s = static_cast<char*>(std::malloc(n + 1));
  if (s) std::memcpy(s, what, n + 1);
  return s;
}

}  // namespace

extern "C" {

void vlmhost_segment_push(void* out, const at::Tensor* t) { static_cast<Outputs*>(out)->tensors.push_back(*t); }

void vlmhost_segment_fail(void* out, const char* message, size_t len) {
  static_cast<Outputs*>(out)->error = std::string(message, len);
}

// Run a segment checkpointed: `state` (freed with `drop`, now or when the
// graph goes) and `run` as above, on the `n` tensors `inputs` (borrowed).
// On success returns null and sets `*outputs` to a malloc'ed array of
// `*n_outputs` new at::Tensor handles (the caller owns them and the array);
// on failure returns a malloc'ed message.
char* vlmhost_checkpoint(void* state, vlmhost_segment_run run, vlmhost_segment_drop drop, const void* live, at::Tensor* const* inputs,
                         size_t n, at::Tensor*** outputs, size_t* n_outputs) {
  c10::intrusive_ptr<Segment> segment;
  try {
    segment = c10::make_intrusive<Segment>(state, run, drop);
  } catch (...) {
    drop(state);
    return copy_message("activation checkpointing: out of memory");
  }
  try {
    torch::autograd::variable_list in;
    in.reserve(n);
    for (size_t i = 0; i < n; ++i) in.push_back(*inputs[i]);
    auto out = Checkpoint::apply(segment, live, at::TensorList(in));
    auto** array = static_cast<at::Tensor**>(std::malloc(sizeof(at::Tensor*) * (out.size() ? out.size() : 1)));
    if (!array) return copy_message("activation checkpointing: out of memory");
    for (size_t i = 0; i < out.size(); ++i) array[i] = new at::Tensor(std::move(out[i]));
    *outputs = array;
    *n_outputs = out.size();
    return nullptr;
  } catch (const c10::Error& e) {
    return copy_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return copy_message(e.what());
  }
}

}  // extern "C"
