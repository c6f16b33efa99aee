// The CPU backend: a plugin built only on plugin.hpp, registered through the
// `ferrum_moe.backends` entry point like any third-party backend.
//
// Weights stay packed, regrouped at load into the layout of layout.hpp;
// nothing is dequantized. The GEMM kernels (kernels.hpp) are chosen per
// instruction set at run time; gemm.cpp runs them.
#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "convert.hpp"
#include "ferrum_moe/plugin.hpp"
#include "gemm.hpp"
#include "kernels.hpp"
#include "layout.hpp"

namespace ferrum::cpu {
namespace {

using plugin::data_start;
using plugin::Error;
using plugin::row_stride;

void* tensor_data(const DLTensor* t) { return data_start(*t); }

class CpuStack final : public plugin::Stack {
 public:
  CpuStack(const FmStackCreateArgs& a, const KernelSet& kernels) : kernels_(kernels) {
    if (a.device.device_type != kDLCPU) {
      throw Error(FM_ERROR_INVALID_ARGUMENT, "the CPU backend holds stacks on the cpu device only");
    }
    dtype_ = float_kind(a.dtype);
    e_ = a.num_experts;
    n_ = a.n_per_expert;
    w_ = pack_weights(a);
  }

  FmStackProperties properties() const override {
    FmStackProperties p{};
    p.column_alignment = kLanes;
    p.resident_bytes = w_.resident_bytes();
    p.workspace_bytes = 0;
    return p;
  }

  void gemm_batched(const FmGemmBatchedArgs& a) override {
    const auto* d = static_cast<const int64_t*>(tensor_data(a.dispatches));
    std::vector<Job> jobs;
    for (int64_t i = 0; i < a.dispatches->shape[0]; ++i) {
      const int64_t m = d[4 * i + 3];
      if (m == 0) continue;
      Job job{d[4 * i], {}, {}, {}};
      for (int64_t r = 0; r < m; ++r) {
        job.in_rows.push_back(d[4 * i + 1] + r);
        job.out_rows.push_back(d[4 * i + 2] + r);
      }
      jobs.push_back(std::move(job));
    }
    gemm(kernels_, w_, dtype_, *a.x, jobs, a.col_begin, a.n, a.bias, *a.out);
  }

  void gemm_routed(const FmGemmRoutedArgs& a) override {
    std::vector<Job> jobs = routed_jobs(a);
    gemm(kernels_, w_, dtype_, *a.x, jobs, 0, n_, nullptr, *a.out);
  }

  // Each item computes a gate block and its up block (gemm_gated), so the
  // gate's half must be whole blocks; otherwise the host runs the activation.
  bool gemm_routed_gated(const FmGemmRoutedArgs& a) override {
    const int64_t half = n_ / 2;
    if (a.activation != FM_ACTIVATION_SILU || n_ % 2 != 0 || half % kBlockCols != 0) return false;
    std::vector<Job> jobs = routed_jobs(a);
    gemm_gated(kernels_, w_, dtype_, *a.x, jobs, half, *a.gated_out);
    return true;
  }

  void zero_workspace(void*) override {}  // the CPU kernels keep no state between calls

 private:
  // The jobs of the experts that got pairs: from align's blocks, or from
  // topk_ids under pair routing.
  std::vector<Job> routed_jobs(const FmGemmRoutedArgs& a) const {
    if (a.sorted_token_ids == nullptr) return pair_jobs(a);
    const auto* sorted = static_cast<const int32_t*>(tensor_data(a.sorted_token_ids));
    const auto* experts = static_cast<const int32_t*>(tensor_data(a.expert_ids));
    const int64_t capacity = a.sorted_token_ids->shape[0];
    const int64_t num_pairs = a.x->shape[0] * a.top_k;
    // plugin.h: the blocks moe_align_block_size can fill, each expert's whole
    // but at most one; past them no block holds work.
    const int64_t num_blocks = fm_routed_blocks_read(a.expert_ids->shape[0], num_pairs, a.block_size, e_);
    // Host-visible indices: every out-of-range entry is skipped, never followed.
    const int64_t post = std::clamp<int64_t>(*static_cast<const int32_t*>(tensor_data(a.num_tokens_post_padded)), 0, capacity);
    const float* weights = a.topk_weights != nullptr ? static_cast<const float*>(tensor_data(a.topk_weights)) : nullptr;
    std::vector<Job> by_expert(static_cast<size_t>(e_));
    for (int64_t p = 0; p < post; ++p) {
      const int64_t b = p / a.block_size;
      if (b >= num_blocks) break;
      const int64_t e = experts[b];
      const int64_t id = sorted[p];
      if (e < 0 || e >= e_ || id < 0 || id >= num_pairs) continue;
      add_pair(by_expert[size_t(e)], e, id, a.top_k, weights);
    }
    return nonempty(by_expert);
  }

  // Pair routing (plugin.h, ABI 1.2): pair p's expert from topk_ids, through
  // expert_map; ids or local ids out of range are skipped.
  std::vector<Job> pair_jobs(const FmGemmRoutedArgs& a) const {
    const int64_t num_pairs = a.x->shape[0] * a.top_k;
    const int32_t* map = a.expert_map != nullptr ? static_cast<const int32_t*>(tensor_data(a.expert_map)) : nullptr;
    const float* weights = a.topk_weights != nullptr ? static_cast<const float*>(tensor_data(a.topk_weights)) : nullptr;
    std::vector<Job> by_expert(static_cast<size_t>(e_));
    for (int64_t p = 0; p < num_pairs; ++p) {
      const int64_t g = load_index(*a.topk_ids, p);
      if (g < 0 || g >= a.num_experts) continue;
      const int64_t e = map != nullptr ? map[g] : g;
      if (e < 0 || e >= e_) continue;
      add_pair(by_expert[size_t(e)], e, p, a.top_k, weights);
    }
    return nonempty(by_expert);
  }

  // Pair `id` (token id / top_k) as a row of expert e's job.
  static void add_pair(Job& job, int64_t e, int64_t id, int64_t top_k, const float* weights) {
    job.expert = e;
    job.in_rows.push_back(id / top_k);
    job.out_rows.push_back(id);
    if (weights != nullptr) job.row_scale.push_back(weights[id]);
  }

  // The jobs of the experts that got pairs.
  static std::vector<Job> nonempty(std::vector<Job>& by_expert) {
    std::vector<Job> jobs;
    for (Job& j : by_expert)
      if (!j.in_rows.empty()) jobs.push_back(std::move(j));
    return jobs;
  }

  const KernelSet& kernels_;
  Float dtype_;
  int64_t e_, n_;
  PackedWeights w_;
};

// manager_ctx of a tensor this backend allocates.
struct HostAllocation {
  const FmHostServices* services;
  void* data;
  std::vector<int64_t> shape;
};

class CpuBackend final : public plugin::Backend {
 public:
  explicit CpuBackend(const FmHostServices* services)
      : plugin::Backend(services), kernels_(select_kernels()), threads_(compute_threads()) {}

  plugin::BackendInfo info() override {
    plugin::BackendInfo i;
    i.description = std::string(kernels_.isa) + ": " + (kernels_.bf16.pack != nullptr ? kernels_.bf16.name + std::string(", ") : "") +
                    kernels_.f32.name + "; " + std::to_string(threads_) + (threads_ == 1 ? " thread" : " threads");
    i.device_types = {kDLCPU};
    i.device_count = 1;
    return i;
  }

  DLManagedTensorVersioned* tensor_alloc(const FmTensorAllocArgs& a) override {
    if (a.device.device_type != kDLCPU) throw Error(FM_ERROR_INVALID_ARGUMENT, "the CPU backend allocates on the cpu device only");
    // The host keeps shapes under 2^48 bytes; checked again because a wrapped
    // size would hand the caller a buffer smaller than its shape.
    int64_t bytes = (a.dtype.bits * a.dtype.lanes + 7) / 8;
    for (int i = 0; i < a.ndim; ++i) {
      if (a.shape[i] < 0 || __builtin_mul_overflow(bytes, a.shape[i], &bytes)) {
        throw Error(FM_ERROR_INVALID_ARGUMENT, "tensor_alloc: the shape's size is negative or overflows");
      }
    }
    auto* ctx = new HostAllocation{services(), services()->host_alloc(size_t(bytes), 64), {a.shape, a.shape + a.ndim}};
    if (ctx->data == nullptr) {
      delete ctx;
      throw std::bad_alloc();
    }
    if (FM_STRUCT_HAS(&a, flags) && (a.flags & FM_ALLOC_ZEROED) != 0) std::memset(ctx->data, 0, size_t(bytes));
    auto* m = new DLManagedTensorVersioned{};
    m->version = {DLPACK_MAJOR_VERSION, DLPACK_MINOR_VERSION};
    m->manager_ctx = ctx;
    m->deleter = [](DLManagedTensorVersioned* self) {
      auto* c = static_cast<HostAllocation*>(self->manager_ctx);
      c->services->host_free(c->data);
      delete c;
      delete self;
    };
    m->dl_tensor.data = ctx->data;
    m->dl_tensor.device = {kDLCPU, 0};
    m->dl_tensor.ndim = a.ndim;
    m->dl_tensor.dtype = a.dtype;
    m->dl_tensor.shape = ctx->shape.data();
    return m;
  }

  std::unique_ptr<plugin::Stack> create_stack(const FmStackCreateArgs& a) override {
    for (const DLTensor* t : {a.qweight, a.scales, a.zeros, a.g_idx}) {
      if (t != nullptr && t->device.device_type != kDLCPU && t->device.device_type != kDLCUDAHost) {
        throw Error(FM_ERROR_INVALID_ARGUMENT, "the CPU backend reads stack weights from host memory only");
      }
    }
    return std::make_unique<CpuStack>(a, kernels_);
  }

  void moe_align_block_size(const FmAlignArgs& a) override {
    const int64_t pairs = a.topk_ids->shape[0] * a.topk_ids->shape[1];
    const int64_t bs = a.block_size;
    const int32_t* map = a.expert_map != nullptr ? static_cast<const int32_t*>(tensor_data(a.expert_map)) : nullptr;
    // (local expert, pair) of every routed pair, sorted: memory follows the
    // pairs, not the expert count, so any num_experts the host allows fits.
    std::vector<std::pair<int64_t, int64_t>> routed;
    routed.reserve(size_t(pairs));
    for (int64_t p = 0; p < pairs; ++p) {
      const int64_t g = load_index(*a.topk_ids, p);
      if (g < 0 || g >= a.num_experts) continue;
      const int64_t e = map != nullptr ? map[g] : g;
      if (e >= 0 && e < a.num_local_experts) routed.emplace_back(e, p);
    }
    std::sort(routed.begin(), routed.end());
    auto* sorted = static_cast<int32_t*>(tensor_data(a.sorted_token_ids));
    auto* expert_ids = static_cast<int32_t*>(tensor_data(a.expert_ids));
    std::fill(sorted, sorted + a.sorted_token_ids->shape[0], int32_t(pairs));
    std::fill(expert_ids, expert_ids + a.expert_ids->shape[0], -1);
    // The host sized the buffers for every pair plus block_size - 1 padding
    // slots per local expert, so `filled` stays inside them.
    int64_t filled = 0;
    for (size_t i = 0; i < routed.size();) {
      const int64_t e = routed[i].first;
      size_t j = i;
      for (; j < routed.size() && routed[j].first == e; ++j) sorted[filled + int64_t(j - i)] = int32_t(routed[j].second);
      const int64_t padded = (int64_t(j - i) + bs - 1) / bs * bs;
      for (int64_t b = filled / bs; b < (filled + padded) / bs; ++b) expert_ids[b] = int32_t(e);
      filled += padded;
      i = j;
    }
    *static_cast<int32_t*>(tensor_data(a.num_tokens_post_padded)) = int32_t(filled);
  }

  void gated_activation(const FmGatedActivationArgs& a) override {
    const int64_t rows = a.input->shape[0], n = a.out->shape[1];
    const int64_t is = row_stride(*a.input), os = row_stride(*a.out);
    const Float kind = float_kind(a.input->dtype);
    const void* in = tensor_data(a.input);
    void* out = tensor_data(a.out);
    const auto lock = exclusive_compute();
#pragma omp parallel for schedule(static) num_threads(threads_for(rows * n * 3 * float_bytes(kind)))
    for (int64_t r = 0; r < rows; ++r) kernels_.silu_mul(float_at(in, r * is, kind), float_at(out, r * os, kind), n, kind);
  }

  void moe_sum(const FmMoeSumArgs& a) override {
    const int64_t tokens = a.out->shape[0], h = a.out->shape[1], top_k = a.topk_ids->shape[1];
    const int64_t is = row_stride(*a.input), os = row_stride(*a.out);
    const Float in_kind = float_kind(a.input->dtype), out_kind = float_kind(a.out->dtype);
    const int32_t* map = a.expert_map != nullptr ? static_cast<const int32_t*>(tensor_data(a.expert_map)) : nullptr;
    const void* in = tensor_data(a.input);
    void* out = tensor_data(a.out);
    const auto lock = exclusive_compute();
#pragma omp parallel num_threads(threads_for(tokens * top_k * h * float_bytes(in_kind)))
    {
      std::vector<const void*> rows(static_cast<size_t>(top_k));
#pragma omp for schedule(static)
      for (int64_t t = 0; t < tokens; ++t) {
        int64_t count = 0;
        for (int64_t j = 0; j < top_k; ++j) {
          const int64_t g = load_index(*a.topk_ids, t * top_k + j);
          if (g < 0 || g >= a.num_experts || (map != nullptr && map[g] < 0)) continue;
          rows[size_t(count++)] = float_at(in, (t * top_k + j) * is, in_kind);
        }
        kernels_.sum_rows(rows.data(), count, in_kind, float_at(out, t * os, out_kind), out_kind, h);
      }
    }
  }

 private:
  const KernelSet& kernels_;
  int threads_;
};

}  // namespace
}  // namespace ferrum::cpu

FM_DEFINE_BACKEND(ferrum::cpu::CpuBackend, "cpu", FERRUM_MOE_VERSION)
