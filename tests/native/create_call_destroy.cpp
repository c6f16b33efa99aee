// A create/call/destroy loop over the core and a backend plugin, with no
// Python in the process: run under LeakSanitizer (scripts/sanitize.sh), every
// leak it reports is ferrum-moe's. Each round loads the plugin, builds a
// stack, runs every operation once, provokes a refusal in the host and an
// error inside the plugin, and drops everything.
//   create_call_destroy PLUGIN.so [ROUNDS]
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "../../src/cpp/core/backend.hpp"
#include "../../src/cpp/core/dtype.hpp"
#include "../../src/cpp/core/error.hpp"

namespace {

using ferrum::Tensor;

// A host tensor that owns a copy of `values`, adopted the way a DLPack import is.
template <class T>
std::shared_ptr<Tensor> host_tensor(const std::vector<T>& values, std::vector<int64_t> shape, DLDataType dtype) {
  struct Owner {
    std::vector<T> values;
    std::vector<int64_t> shape;
  };
  auto* owner = new Owner{values, std::move(shape)};
  auto* m = new DLManagedTensorVersioned{};
  m->version = {DLPACK_MAJOR_VERSION, DLPACK_MINOR_VERSION};
  m->manager_ctx = owner;
  m->deleter = [](DLManagedTensorVersioned* self) {
    delete static_cast<Owner*>(self->manager_ctx);
    delete self;
  };
  m->dl_tensor = {owner->values.data(), {kDLCPU, 0}, int32_t(owner->shape.size()), dtype, owner->shape.data(), nullptr, 0};
  return Tensor::adopt(m);
}

bool raises(const std::function<void()>& call) {
  try {
    call();
  } catch (const ferrum::Error&) {
    return true;
  }
  return false;
}

void round_trip(const FmBackendApi* api) {
  using namespace ferrum;
  const DLDevice cpu{kDLCPU, 0};
  auto backend = Backend::load(api);
  const int64_t e = 3, k = 64, n = 32, tokens = 5, top_k = 2, inter = n / 2;
  StackSpec spec;
  spec.device = cpu;
  spec.dtype = kFloat32;
  spec.num_experts = e;
  spec.k = k;
  spec.n_per_expert = n;
  spec.bits = 4;
  spec.group_size = 32;
  std::vector<int32_t> qweight(size_t(e * (k / 8) * n), 0x76543210);
  std::vector<float> scales(size_t(e * 2 * n), 0.01f);
  std::vector<uint8_t> zeros(size_t(e * 2 * n), 7);
  auto w13 = backend->create_stack(spec, *host_tensor(qweight, {e, k / 8, n}, kInt32), *host_tensor(scales, {e, 2, n}, kFloat32),
                                   host_tensor(zeros, {e, 2, n}, kUInt8).get(), nullptr, nullptr);
  spec.k = inter;
  spec.n_per_expert = k;
  std::vector<int32_t> qweight2(size_t(e * (inter / 8) * k), 0x12345678);
  std::vector<float> scales2(size_t(e * 1 * k), 0.02f);
  auto w2 = backend->create_stack(spec, *host_tensor(qweight2, {e, inter / 8, k}, kInt32),
                                  *host_tensor(scales2, {e, 1, k}, kFloat32), nullptr, nullptr, nullptr);

  auto x = host_tensor(std::vector<float>(size_t(tokens * k), 0.5f), {tokens, k}, kFloat32);
  auto out = backend->empty(cpu, kFloat32, {tokens, n}, nullptr, FM_ALLOC_ZEROED);
  w13->gemm_batched(*x, *host_tensor(std::vector<int64_t>{2, 0, 0, tokens}, {1, 4}, kInt64), 0, n, nullptr, *out, nullptr);
  w13->linear(*x, 16, 48, nullptr, *backend->empty(cpu, kFloat32, {tokens, 48}, nullptr), nullptr);

  auto ids = host_tensor(std::vector<int32_t>{0, 1, 2, 0, 1, 2, -1, 5, 1, 1}, {tokens, top_k}, kInt32);
  const int64_t padded = max_num_tokens_padded(tokens * top_k, e, 4);
  auto sorted_ids = backend->empty(cpu, kInt32, {padded}, nullptr, FM_ALLOC_TEMPORARY);
  auto expert_ids = backend->empty(cpu, kInt32, {(padded + 3) / 4}, nullptr, FM_ALLOC_TEMPORARY);
  auto post = backend->empty(cpu, kInt32, {1}, nullptr, FM_ALLOC_TEMPORARY);
  backend->moe_align_block_size(*ids, e, 4, nullptr, *sorted_ids, *expert_ids, *post, nullptr);
  auto gate_up = backend->empty(cpu, kFloat32, {tokens * top_k, n}, nullptr, FM_ALLOC_ZEROED);
  w13->gemm_routed(*x, *sorted_ids, *expert_ids, *post, 4, top_k, nullptr, gate_up.get(), nullptr);
  auto act = backend->empty(cpu, kFloat32, {tokens * top_k, inter}, nullptr);
  backend->gated_activation(*gate_up, *act, nullptr);
  auto down = backend->empty(cpu, kFloat32, {tokens * top_k, k}, nullptr, FM_ALLOC_ZEROED);
  w2->gemm_routed(*act, *sorted_ids, *expert_ids, *post, 4, 1, nullptr, down.get(), nullptr);
  backend->moe_sum(*down, *ids, e, nullptr, *backend->empty(cpu, kFloat32, {tokens, k}, nullptr), nullptr);
  // The gated epilogue (ABI 1.3) of a [gate | up] stack whose halves are whole 64-column blocks.
  spec.k = k;
  spec.n_per_expert = 128;
  std::vector<int32_t> qweight3(size_t(e * (k / 8) * 128), 0x01234567);
  std::vector<float> scales3(size_t(e * 2 * 128), 0.01f);
  auto gate_up_stack = backend->create_stack(spec, *host_tensor(qweight3, {e, k / 8, 128}, kInt32),
                                             *host_tensor(scales3, {e, 2, 128}, kFloat32), nullptr, nullptr, nullptr);
  auto gated_out = backend->empty(cpu, kFloat32, {tokens * top_k, 64}, nullptr, FM_ALLOC_ZEROED);
  const ExpertStack::Gated gated{FM_ACTIVATION_SILU, gated_out.get()};
  const bool epilogue = gate_up_stack->gemm_routed(*x, *sorted_ids, *expert_ids, *post, 4, top_k, nullptr, nullptr,
                                                   nullptr, &gated);

  // A refusal in the host, and errors made by the plugin (FmError objects the host frees).
  const bool refused = raises([&] {
    w13->gemm_batched(*x, *host_tensor(std::vector<int64_t>{9, 0, 0, 1}, {1, 4}, kInt64), 0, n, nullptr, *out, nullptr);
  });
  const bool plugin_error = raises([&] { backend->empty(DLDevice{kDLCUDA, 0}, kFloat32, {2}, nullptr); });
  const bool exported = [&] {
    DLManagedTensorVersioned* m = out->export_versioned();
    m->deleter(m);
    return true;
  }();
  if (!refused || !plugin_error || !exported || !epilogue) {
    std::fprintf(stderr, "create_call_destroy: an expected error did not happen\n");
    std::exit(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s PLUGIN.so [ROUNDS]\n", argv[0]);
    return 2;
  }
  void* library = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) {
    std::fprintf(stderr, "cannot load %s: %s\n", argv[1], dlerror());
    return 2;
  }
  auto get_api = reinterpret_cast<FmBackendGetApiFn>(dlsym(library, FM_BACKEND_ENTRY_SYMBOL));
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 200;
  for (int i = 0; i < rounds; ++i) round_trip(get_api());
  std::printf("create_call_destroy: %d rounds\n", rounds);
  return 0;  // the library stays loaded: LeakSanitizer reports at exit
}
