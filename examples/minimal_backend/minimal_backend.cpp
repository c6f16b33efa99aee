// A minimal ferrum-moe backend, built only from the installed headers: the
// least a plugin must implement, in plain loops. float32 activations, batched
// GEMMs and Linear views; routing, the fused layer's elementwise steps and
// routed GEMMs are refused with FM_ERROR_UNSUPPORTED, which ferrum-moe reports
// to the user as NotImplementedError ("unsupported" in a conformance run).
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "ferrum_moe/plugin.hpp"

namespace {

using ferrum::plugin::data_start;
using ferrum::plugin::Error;
using ferrum::plugin::row_stride;

// Weights exactly as the host hands them over (GPTQ layout, host memory):
// a plugin owns copies, the host's arrays die after stack_create.
class MinimalStack final : public ferrum::plugin::Stack {
 public:
  explicit MinimalStack(const FmStackCreateArgs& a)
      : k_(a.k), n_(a.n_per_expert), bits_(a.bits), groups_(a.group_size == -1 ? 1 : (a.k + a.group_size - 1) / a.group_size),
        group_size_(a.group_size) {
    auto copy = [](const DLTensor* t, size_t element_bytes) {
      std::vector<uint8_t> v;
      if (t == nullptr) return v;
      size_t n = element_bytes;
      for (int i = 0; i < t->ndim; ++i) n *= size_t(t->shape[i]);
      v.resize(n);
      std::memcpy(v.data(), data_start(*t), n);
      return v;
    };
    qweight_ = copy(a.qweight, 4);
    scales_ = copy(a.scales, 4);
    zeros_ = copy(a.zeros, 1);
    g_idx_ = copy(a.g_idx, 4);
  }

  FmStackProperties properties() const override {
    FmStackProperties p{};
    p.column_alignment = 1;
    p.resident_bytes = int64_t(qweight_.size() + scales_.size() + zeros_.size() + g_idx_.size());
    return p;
  }

  void gemm_batched(const FmGemmBatchedArgs& a) override {
    const auto* d = static_cast<const int64_t*>(data_start(*a.dispatches));
    const auto* x = static_cast<const float*>(data_start(*a.x));
    auto* out = static_cast<float*>(data_start(*a.out));
    const auto* bias = a.bias != nullptr ? static_cast<const float*>(data_start(*a.bias)) : nullptr;
    const int64_t xs = row_stride(*a.x), os = row_stride(*a.out);
    for (int64_t i = 0; i < a.dispatches->shape[0]; ++i) {
      const int64_t e = d[4 * i], in_row = d[4 * i + 1], out_row = d[4 * i + 2], m = d[4 * i + 3];
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = 0; j < a.n; ++j) {
          double sum = bias != nullptr ? bias[j] : 0.0;
          for (int64_t kk = 0; kk < k_; ++kk) sum += double(x[(in_row + r) * xs + kk]) * weight(e, kk, a.col_begin + j);
          out[(out_row + r) * os + j] = float(sum);
        }
    }
  }

  void gemm_routed(const FmGemmRoutedArgs&) override {
    throw Error(FM_ERROR_UNSUPPORTED, "the minimal example backend has no routed GEMM");
  }

  void zero_workspace(void*) override {}

 private:
  // W[k, n] = (q - z) * s, read straight from the GPTQ words.
  double weight(int64_t e, int64_t k, int64_t n) const {
    const int64_t per_word = 32 / bits_, packed_k = (k_ + per_word - 1) / per_word;
    uint32_t word;
    std::memcpy(&word, &qweight_[size_t(((e * packed_k + k / per_word) * n_ + n) * 4)], 4);
    const uint32_t code = (word >> (bits_ * (k % per_word))) & ((1u << bits_) - 1);
    int32_t g = int32_t(group_size_ == -1 ? 0 : k / group_size_);
    if (!g_idx_.empty()) std::memcpy(&g, &g_idx_[size_t((e * k_ + k) * 4)], 4);
    const size_t q = size_t((e * groups_ + g) * n_ + n);
    float s;
    std::memcpy(&s, &scales_[q * 4], 4);
    const double z = zeros_.empty() ? double(1 << (bits_ - 1)) : double(zeros_[q]);
    return (double(code) - z) * s;
  }

  int64_t k_, n_, bits_, groups_, group_size_;
  std::vector<uint8_t> qweight_, scales_, zeros_, g_idx_;
};

struct Allocation {
  std::vector<float> data;
  std::vector<int64_t> shape;
};

class MinimalBackend final : public ferrum::plugin::Backend {
 public:
  using Backend::Backend;

  ferrum::plugin::BackendInfo info() override { return {"float32 reference loops (example plugin)", {kDLCPU}, 1}; }

  DLManagedTensorVersioned* tensor_alloc(const FmTensorAllocArgs& a) override {
    auto* alloc = new Allocation{{}, {a.shape, a.shape + a.ndim}};
    int64_t numel = 1;
    for (int64_t d : alloc->shape) numel *= d;
    // Every dtype ferrum-moe asks for fits in float-sized elements.
    alloc->data.resize(size_t(numel) + 1);
    auto* m = new DLManagedTensorVersioned{};
    m->version = {DLPACK_MAJOR_VERSION, DLPACK_MINOR_VERSION};
    m->manager_ctx = alloc;
    m->deleter = [](DLManagedTensorVersioned* self) {
      delete static_cast<Allocation*>(self->manager_ctx);
      delete self;
    };
    m->dl_tensor = {alloc->data.data(), a.device, a.ndim, a.dtype, alloc->shape.data(), nullptr, 0};
    return m;
  }

  std::unique_ptr<ferrum::plugin::Stack> create_stack(const FmStackCreateArgs& a) override {
    if (a.dtype.code != kDLFloat || a.dtype.bits != 32) {
      throw Error(FM_ERROR_UNSUPPORTED, "the minimal example backend computes in float32 only");
    }
    return std::make_unique<MinimalStack>(a);
  }

  void moe_align_block_size(const FmAlignArgs&) override {
    throw Error(FM_ERROR_UNSUPPORTED, "the minimal example backend has no routing");
  }
  void gated_activation(const FmGatedActivationArgs&) override {
    throw Error(FM_ERROR_UNSUPPORTED, "the minimal example backend has no activation");
  }
  void moe_sum(const FmMoeSumArgs&) override {
    throw Error(FM_ERROR_UNSUPPORTED, "the minimal example backend has no top-k sum");
  }
};

}  // namespace

FM_DEFINE_BACKEND(MinimalBackend, "minimal", "0.1.0")
