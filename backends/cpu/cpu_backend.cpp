// The CPU backend: a plugin built only on plugin.hpp, registered through the
// `ferrum_moe.backends` entry point like any third-party backend.
//
// Weights stay packed: the GPTQ words are regrouped into 16-column panels
// ([expert][panel][packed_k][16], the same bytes in another order) so the
// kernel streams each panel's K contiguously; scales become float32 and
// zero points stay uint8. Nothing is dequantized at load.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "convert.hpp"
#include "ferrum_moe/plugin.hpp"
#include "panel_kernel.hpp"

namespace ferrum::cpu {
namespace {

using plugin::data_start;
using plugin::Error;
using plugin::row_stride;

void* tensor_data(const DLTensor* t) { return data_start(*t); }

// One matmul job: rows of x (by index) times one expert's column window,
// written to rows of out, each optionally scaled.
struct Job {
  int64_t expert;
  std::vector<int64_t> in_rows;
  std::vector<int64_t> out_rows;
  std::vector<float> row_scale;  // empty: 1
};

class CpuStack final : public plugin::Stack {
 public:
  CpuStack(const FmStackCreateArgs& a, KernelChoice kernel) : kernel_(kernel) {
    if (a.device.device_type != kDLCPU) {
      throw Error(FM_ERROR_INVALID_ARGUMENT, "the CPU backend holds stacks on the cpu device only");
    }
    dtype_ = float_kind(a.dtype);
    e_ = a.num_experts;
    k_ = a.k;
    n_ = a.n_per_expert;
    bits_ = a.bits;
    group_size_ = a.group_size;
    num_groups_ = group_size_ == -1 ? 1 : (k_ + group_size_ - 1) / group_size_;
    packed_k_ = (k_ + 32 / bits_ - 1) / (32 / bits_);
    panels_ = (n_ + kPanel - 1) / kPanel;
    n_padded_ = panels_ * kPanel;

    // Regroup packed words into panels; padded columns get code 0 and scale 0.
    q_.assign(size_t(e_ * panels_ * packed_k_ * kPanel), 0u);
    const auto* qw = static_cast<const uint32_t*>(tensor_data(a.qweight));
    for (int64_t e = 0; e < e_; ++e)
      for (int64_t w = 0; w < packed_k_; ++w)
        for (int64_t c = 0; c < n_; ++c)
          q_[size_t(((e * panels_ + c / kPanel) * packed_k_ + w) * kPanel + c % kPanel)] =
              qw[(e * packed_k_ + w) * n_ + c];

    scales_.assign(size_t(e_ * num_groups_ * n_padded_), 0.0f);
    const Float sk = float_kind(a.scales->dtype);
    for (int64_t e = 0; e < e_; ++e)
      for (int64_t g = 0; g < num_groups_; ++g)
        for (int64_t c = 0; c < n_; ++c)
          scales_[size_t((e * num_groups_ + g) * n_padded_ + c)] =
              load_float(tensor_data(a.scales), (e * num_groups_ + g) * n_ + c, sk);
    if (a.zeros != nullptr) {
      zeros_.assign(size_t(e_ * num_groups_ * n_padded_), 0);
      const auto* z = static_cast<const uint8_t*>(tensor_data(a.zeros));
      for (int64_t e = 0; e < e_; ++e)
        for (int64_t g = 0; g < num_groups_; ++g)
          std::memcpy(&zeros_[size_t((e * num_groups_ + g) * n_padded_)], z + (e * num_groups_ + g) * n_, size_t(n_));
    }
    group_of_k_.resize(size_t(e_ * k_));
    const auto* gi = a.g_idx != nullptr ? static_cast<const int32_t*>(tensor_data(a.g_idx)) : nullptr;
    for (int64_t e = 0; e < e_; ++e)
      for (int64_t kk = 0; kk < k_; ++kk)
        group_of_k_[size_t(e * k_ + kk)] =
            gi != nullptr ? gi[e * k_ + kk] : (group_size_ == -1 ? 0 : int32_t(kk / group_size_));
  }

  FmStackProperties properties() const override {
    FmStackProperties p{};
    p.column_alignment = kPanel;
    p.resident_bytes = int64_t(q_.size() * 4 + scales_.size() * 4 + zeros_.size() + group_of_k_.size() * 4);
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
    run(*a.x, jobs, a.col_begin, a.n, a.bias, *a.out);
  }

  void gemm_routed(const FmGemmRoutedArgs& a) override {
    const auto* sorted = static_cast<const int32_t*>(tensor_data(a.sorted_token_ids));
    const auto* experts = static_cast<const int32_t*>(tensor_data(a.expert_ids));
    const int64_t capacity = a.sorted_token_ids->shape[0];
    const int64_t num_pairs = a.x->shape[0] * a.top_k;
    // plugin.h: blocks past num_pairs hold no work in moe_align_block_size output.
    const int64_t num_blocks = std::min<int64_t>(a.expert_ids->shape[0], num_pairs);
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
      Job& job = by_expert[size_t(e)];
      job.expert = e;
      job.in_rows.push_back(id / a.top_k);
      job.out_rows.push_back(id);
      if (weights != nullptr) job.row_scale.push_back(weights[id]);
    }
    std::vector<Job> jobs;
    for (Job& j : by_expert)
      if (!j.in_rows.empty()) jobs.push_back(std::move(j));
    run(*a.x, jobs, 0, n_, nullptr, *a.out);
  }

  void zero_workspace(void*) override {}  // the CPU kernels keep no state between calls

 private:
  void run(const DLTensor& x, const std::vector<Job>& jobs, int64_t col_begin, int64_t n, const DLTensor* bias,
           DLTensor& out) const {
    if (jobs.empty()) return;
    // float32 view of x: borrowed when x already is float32, else converted once.
    const int64_t rows = x.shape[0], xs = row_stride(x);
    std::vector<float> converted;
    std::vector<const float*> x_rows(static_cast<size_t>(rows));
    if (dtype_ == Float::f32) {
      for (int64_t r = 0; r < rows; ++r) x_rows[size_t(r)] = static_cast<const float*>(data_start(x)) + r * xs;
    } else {
      converted.resize(size_t(rows * k_));
#pragma omp parallel for schedule(static)
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < k_; ++c) converted[size_t(r * k_ + c)] = load_float(data_start(x), r * xs + c, dtype_);
      for (int64_t r = 0; r < rows; ++r) x_rows[size_t(r)] = converted.data() + r * k_;
    }
    const int64_t first_panel = col_begin / kPanel;
    const int64_t last_panel = (col_begin + n - 1) / kPanel;
    const int64_t window_panels = last_panel - first_panel + 1;
    const int64_t tasks = int64_t(jobs.size()) * window_panels;
    const Float out_kind = float_kind(out.dtype);
    const int64_t os = row_stride(out);
    void* out_data = data_start(out);
    const Float bias_kind = bias != nullptr ? float_kind(bias->dtype) : Float::f32;

#pragma omp parallel
    {
      std::vector<float> wbuf(static_cast<size_t>(kKBlock * kPanel));
      std::vector<float> acc;
      std::vector<const float*> job_rows;
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < tasks; ++task) {
        const Job& job = jobs[size_t(task / window_panels)];
        const int64_t panel = first_panel + task % window_panels;
        const int64_t m = int64_t(job.in_rows.size());
        acc.resize(size_t(m * kPanel));
        job_rows.resize(size_t(m));
        for (int64_t i = 0; i < m; ++i) job_rows[size_t(i)] = x_rows[size_t(job.in_rows[size_t(i)])];
        const int64_t sbase = job.expert * num_groups_ * n_padded_ + panel * kPanel;
        PanelTask t{};
        t.x_rows = job_rows.data();
        t.m = m;
        t.k = k_;
        t.bits = bits_;
        t.q = q_.data() + (job.expert * panels_ + panel) * packed_k_ * kPanel;
        t.scales = scales_.data() + sbase;
        t.zeros = zeros_.empty() ? nullptr : zeros_.data() + sbase;
        t.scale_stride = n_padded_;
        t.group_of_k = group_of_k_.data() + job.expert * k_;
        t.acc = acc.data();
        t.wbuf = wbuf.data();
        kernel_.kernel(t);
        // Epilogue: the panel's columns inside the window, scaled, biased, converted.
        const int64_t c_lo = std::max(panel * kPanel, col_begin);
        const int64_t c_hi = std::min(panel * kPanel + kPanel, col_begin + n);
        for (int64_t i = 0; i < m; ++i) {
          const float s = job.row_scale.empty() ? 1.0f : job.row_scale[size_t(i)];
          const int64_t orow = job.out_rows[size_t(i)];
          for (int64_t c = c_lo; c < c_hi; ++c) {
            float v = acc[size_t(i * kPanel + (c - panel * kPanel))] * s;
            if (bias != nullptr) v += load_float(data_start(*bias), c - col_begin, bias_kind);
            store_float(out_data, orow * os + (c - col_begin), v, out_kind);
          }
        }
      }
    }
  }

  KernelChoice kernel_;
  Float dtype_;
  int64_t e_, k_, n_, bits_, group_size_, num_groups_, packed_k_, panels_, n_padded_;
  std::vector<uint32_t> q_;
  std::vector<float> scales_;
  std::vector<uint8_t> zeros_;
  std::vector<int32_t> group_of_k_;
};

// manager_ctx of a tensor this backend allocates.
struct HostAllocation {
  const FmHostServices* services;
  void* data;
  std::vector<int64_t> shape;
};

class CpuBackend final : public plugin::Backend {
 public:
  explicit CpuBackend(const FmHostServices* services) : plugin::Backend(services), kernel_(select_panel_kernel()) {}

  plugin::BackendInfo info() override {
    plugin::BackendInfo i;
    i.description = std::string(kernel_.isa) + ", " + std::to_string(omp_get_max_threads()) + " OpenMP threads";
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
    return std::make_unique<CpuStack>(a, kernel_);
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
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < n; ++j) {
        const float g = load_float(in, r * is + j, kind), u = load_float(in, r * is + n + j, kind);
        store_float(out, r * os + j, g / (1.0f + std::exp(-g)) * u, kind);
      }
    }
  }

  void moe_sum(const FmMoeSumArgs& a) override {
    const int64_t tokens = a.out->shape[0], h = a.out->shape[1], top_k = a.topk_ids->shape[1];
    const int64_t is = row_stride(*a.input), os = row_stride(*a.out);
    const Float in_kind = float_kind(a.input->dtype), out_kind = float_kind(a.out->dtype);
    const int32_t* map = a.expert_map != nullptr ? static_cast<const int32_t*>(tensor_data(a.expert_map)) : nullptr;
    const void* in = tensor_data(a.input);
    void* out = tensor_data(a.out);
#pragma omp parallel
    {
      std::vector<float> acc(static_cast<size_t>(h));
#pragma omp for schedule(static)
      for (int64_t t = 0; t < tokens; ++t) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t j = 0; j < top_k; ++j) {
          const int64_t g = load_index(*a.topk_ids, t * top_k + j);
          if (g < 0 || g >= a.num_experts || (map != nullptr && map[g] < 0)) continue;
          const int64_t row = (t * top_k + j) * is;
          for (int64_t c = 0; c < h; ++c) acc[size_t(c)] += load_float(in, row + c, in_kind);
        }
        for (int64_t c = 0; c < h; ++c) store_float(out, t * os + c, acc[size_t(c)], out_kind);
      }
    }
  }

 private:
  KernelChoice kernel_;
};

}  // namespace
}  // namespace ferrum::cpu

FM_DEFINE_BACKEND(ferrum::cpu::CpuBackend, "cpu", FERRUM_MOE_VERSION)
