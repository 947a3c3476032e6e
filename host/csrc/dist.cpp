// Data-parallel collectives for vlmhost over PyTorch's c10d: a TCPStore
// rendezvous, then the Gloo backend (CPU tensors) or, when built with
// VLMHOST_NCCL, the NCCL backend (CUDA tensors). The Rust side
// (src/dist/) reads the launcher's environment and calls these; every entry
// point catches C++ exceptions and returns their message, so nothing throws
// across the FFI boundary.
//
// Tensors come in as tch's `C_tensor*`, which is an `at::Tensor*`.
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstring>
#include <string>
#include <vector>

#ifdef VLMHOST_NCCL
// csrc/dist_nccl.cpp
c10::intrusive_ptr<c10d::Backend> vlmhost_make_nccl(const c10::intrusive_ptr<c10d::Store>& store, int rank, int world, int cuda_device,
                                                    std::chrono::milliseconds timeout);
#endif

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

void set_error(char* err, size_t len, const std::string& msg) {
  if (err == nullptr || len == 0) return;
  std::strncpy(err, msg.c_str(), len - 1);
  err[len - 1] = '\0';
}

// Run `f`, turning any exception into -1 and its message.
template <typename F>
int guarded(char* err, size_t len, F f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    set_error(err, len, e.what());
  } catch (...) {
    set_error(err, len, "unknown C++ exception");
  }
  return -1;
}

}  // namespace

extern "C" {

// Whether this build can create the NCCL backend.
int vlmhost_dist_has_nccl() {
#ifdef VLMHOST_NCCL
  return 1;
#else
  return 0;
#endif
}

// Join the group: the TCPStore at master_addr:port (hosted by rank 0 unless
// `agent_store`, torchrun's own store, is there already), under `prefix`,
// then the backend ("gloo" or "nccl"; NCCL binds `cuda_device`). Every wait
// (the store, each collective) gives up after timeout_ms. Returns the group
// or null with the reason in `err`.
void* vlmhost_dist_init(const char* backend, const char* master_addr, int port, int agent_store, const char* prefix,
                        int rank, int world, int cuda_device, int64_t timeout_ms, char* err, size_t err_len) {
  Group* group = nullptr;
  int rc = guarded(err, err_len, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = !agent_store && rank == 0;
    opts.numWorkers = agent_store ? std::nullopt : std::optional<std::size_t>(world);
    opts.waitWorkers = !agent_store;
    opts.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(master_addr), opts);
    c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    std::string name(backend);
    c10::intrusive_ptr<c10d::Backend> b;
    if (name == "gloo") {
      auto o = c10d::ProcessGroupGloo::Options::create_default(timeout);
      b = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, o);
    } else if (name == "nccl") {
#ifdef VLMHOST_NCCL
      b = vlmhost_make_nccl(store, rank, world, cuda_device, timeout);
#else
      (void)cuda_device;
      throw std::runtime_error("this vlmhost was built without NCCL (no nccl.h and CUDA headers at build time)");
#endif
    } else {
      throw std::runtime_error("unknown backend " + name);
    }
    group = new Group{store, b, timeout};
  });
  return rc == 0 ? group : nullptr;
}

// Sum each tensor over the group, in place. All collectives are launched
// before the first wait, so the buckets pipeline in the backend's threads.
int vlmhost_dist_allreduce_sum(void* g, void** tensors, size_t n, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto* group = static_cast<Group*>(g);
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    opts.timeout = group->timeout;
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    works.reserve(n);
    std::vector<std::vector<at::Tensor>> inputs(n);
    for (size_t i = 0; i < n; ++i) {
      inputs[i].push_back(*static_cast<at::Tensor*>(tensors[i]));
      works.push_back(group->backend->allreduce(inputs[i], opts));
    }
    for (auto& w : works) {
      w->wait(group->timeout);
    }
  });
}

// Wait until every rank is here.
int vlmhost_dist_barrier(void* g, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto* group = static_cast<Group*>(g);
    c10d::BarrierOptions opts;
    opts.timeout = group->timeout;
    group->backend->barrier(opts)->wait(group->timeout);
  });
}

// Store `len` bytes under `key`.
int vlmhost_dist_store_set(void* g, const char* key, const uint8_t* data, size_t len, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto* group = static_cast<Group*>(g);
    group->store->set(std::string(key), std::vector<uint8_t>(data, data + len));
  });
}

// The bytes under `key`, waiting for them up to the timeout; `*out` is
// malloc'd (free it with vlmhost_dist_free).
int vlmhost_dist_store_get(void* g, const char* key, uint8_t** out, size_t* len, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto* group = static_cast<Group*>(g);
    group->store->wait({std::string(key)}, group->timeout);
    auto v = group->store->get(std::string(key));
    *out = static_cast<uint8_t*>(std::malloc(v.size() > 0 ? v.size() : 1));
    if (*out == nullptr) throw std::bad_alloc();
    std::memcpy(*out, v.data(), v.size());
    *len = v.size();
  });
}

void vlmhost_dist_free(uint8_t* p) { std::free(p); }

// Leave the group (shutting the NCCL communicators down first).
void vlmhost_dist_destroy(void* g) {
  auto* group = static_cast<Group*>(g);
  if (group == nullptr) return;
  try {
    group->backend->shutdown();
  } catch (...) {
  }
  delete group;
}

}  // extern "C"
