// The plugin host: wraps a backend's C function table (plugin.h) into C++
// objects, validates every argument before it crosses into the plugin, and
// turns the plugin's FmError objects back into ferrum::Error exceptions.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ferrum_moe/plugin.h"
#include "tensor.hpp"

namespace ferrum {

class ExpertStack;

// What describes a stack's quantized weights, independent of where they live.
struct StackSpec {
  DLDevice device{kDLCPU, 0};
  DLDataType dtype{};
  int64_t num_experts = 0;
  int64_t k = 0;
  int64_t n_per_expert = 0;
  int32_t bits = 4;
  int64_t group_size = 128;  // -1 (or any size >= k): one group over K
  int64_t num_groups() const { return group_size == -1 || group_size >= k ? 1 : (k + group_size - 1) / group_size; }
  int64_t packed_k() const { return (k + (32 / bits) - 1) / (32 / bits); }
};

class Backend : public std::enable_shared_from_this<Backend> {
 public:
  // Checks the table's version and size, then initialises the plugin. Throws
  // ferrum::Error with the reason when the plugin cannot be used.
  static std::shared_ptr<Backend> load(const FmBackendApi* api);
  ~Backend();

  const std::string& name() const { return name_; }
  const std::string& version() const { return version_; }
  const std::string& description() const { return description_; }
  const std::vector<int32_t>& device_types() const { return device_types_; }
  int32_t device_count() const { return device_count_; }
  std::string abi_version() const;
  uint32_t abi_minor() const { return api_->abi_minor; }
  // Whether stack_gemm_routed takes pair routing (ABI 1.2, plugin.h).
  bool has_pair_routing() const { return api_->abi_minor >= 2; }
  // Whether stack_gemm_routed may apply the gated activation itself (ABI 1.3).
  bool has_gated_epilogue() const { return api_->abi_minor >= 3; }
  // Whether the plugin offers the whole layer in one call (ABI 1.4, plugin.h:
  // a non-NULL moe_layer in a table that holds it).
  bool has_moe_layer() const {
    return api_->abi_minor >= 4 && FM_STRUCT_HAS(api_, moe_layer) && api_->moe_layer != nullptr;
  }
  bool serves(DLDevice device) const;

  // A new tensor from the backend's allocator; `flags` are FmAllocFlags
  // (FM_ALLOC_TEMPORARY, FM_ALLOC_ZEROED).
  std::shared_ptr<Tensor> empty(DLDevice device, DLDataType dtype, const std::vector<int64_t>& shape,
                                void* stream, uint32_t flags = 0);
  std::shared_ptr<ExpertStack> create_stack(const StackSpec& spec, const Tensor& qweight,
                                            const Tensor& scales, const Tensor* zeros,
                                            const Tensor* g_idx, void* stream);
  void moe_align_block_size(const Tensor& topk_ids, int64_t num_experts, int64_t block_size,
                            const Tensor* expert_map, Tensor& sorted_token_ids, Tensor& expert_ids,
                            Tensor& num_tokens_post_padded, void* stream);
  void gated_activation(const Tensor& input, Tensor& out, void* stream);
  void moe_sum(const Tensor& input, const Tensor& topk_ids, int64_t num_experts,
               const Tensor* expert_map, Tensor& out, void* stream);
  // moe_sum's checks alone.
  void check_moe_sum(const Tensor& input, const Tensor& topk_ids, int64_t num_experts, const Tensor* expert_map,
                     const Tensor& out) const;
  // The whole layer in one plugin call (plugin.h, FmMoeLayerArgs), its
  // arguments already checked as the steps check them (core/moe.cpp). Answers
  // whether the plugin queued it; false, with nothing queued, where the
  // plugin declines or has no such call.
  struct LayerArgs {
    const Tensor* x;
    const Tensor* topk_ids;
    const Tensor* topk_weights;
    bool weights_on_input;
    int64_t num_experts;
    const Tensor* expert_map;
    int32_t activation;  // an FmActivation
    Tensor* act;
    Tensor* down;
    Tensor* out;
  };
  bool moe_layer(ExpertStack& w13, ExpertStack& w2, const LayerArgs& layer, void* stream);
  void stream_order(DLDevice device, void* producer, void* consumer);

  const FmBackendApi& api() const { return *api_; }
  FmBackend* handle() const { return handle_; }

 private:
  Backend() = default;
  void check_device(const Tensor& t, Arg arg) const;

  const FmBackendApi* api_ = nullptr;
  FmBackend* handle_ = nullptr;
  std::string name_, version_, description_;
  std::vector<int32_t> device_types_;
  int32_t device_count_ = 0;
};

// Throws the ferrum::Error an FmError carries (and frees it), its message
// prefixed with `context`.
[[noreturn]] void raise_error(FmError* error, const std::string& context);

// Limits that keep size arithmetic far from overflow (int64 and 32-bit kernel indices).
inline constexpr int64_t kMaxTensorBytes = int64_t(1) << 48;
inline constexpr int64_t kMaxBlockSize = 1 << 16;
// Routing arrays are int32: every position and pair index must fit.
inline constexpr int64_t kMaxRoutingIndex = INT32_MAX;

// The number of sorted-id slots moe_align_block_size may fill:
// every (token, k) pair, plus up to block_size - 1 padding slots per local expert.
// Refuses counts whose positions would not fit the int32 routing arrays.
int64_t max_num_tokens_padded(int64_t num_pairs, int64_t num_local_experts, int64_t block_size);

class ExpertStack {
 public:
  ExpertStack(std::shared_ptr<Backend> backend, FmStack* handle, const StackSpec& spec,
              bool has_zeros, bool has_g_idx);
  ~ExpertStack();
  ExpertStack(const ExpertStack&) = delete;
  ExpertStack& operator=(const ExpertStack&) = delete;

  const StackSpec& spec() const { return spec_; }
  const std::shared_ptr<Backend>& backend() const { return backend_; }
  bool has_zeros() const { return has_zeros_; }
  bool has_g_idx() const { return has_g_idx_; }
  int64_t column_alignment() const { return props_.column_alignment; }
  int64_t resident_bytes() const { return props_.resident_bytes; }
  int64_t workspace_bytes() const { return props_.workspace_bytes; }

  // Validates a Linear view's window [offset, offset + n) of the stacked N;
  // `op` names the caller in the message.
  void check_view(int64_t offset, int64_t n, const char* op) const { view_segments(offset, n, op); }

  // The rows a new gemm_batched result needs, max(out_row + m), after checking
  // x and every host dispatch row against x: a bad row is named before
  // anything is allocated for it.
  int64_t batched_output_rows(const Tensor& x, const Tensor& dispatches) const;

  // `dispatches` on the host (int64, every row checked) or on the stack's
  // device (int32/int64, rows checked by the kernels: plugin.h).
  void gemm_batched(const Tensor& x, const Tensor& dispatches, int64_t col_begin, int64_t n,
                    const Tensor* bias, Tensor& out, void* stream);
  // out[:, :n] = x @ W_stacked[:, offset:offset + n] (+ bias): a Linear view
  // of columns of the stacked N (num_experts x n_per_expert); the window may
  // cross expert boundaries.
  void linear(const Tensor& x, int64_t offset, int64_t n, const Tensor* bias, Tensor& out, void* stream);
  // The gated epilogue of a routed GEMM (plugin.h, ABI 1.3): out [pairs, N / 2]
  // may receive act(y[:, :N/2]) * y[:, N/2:] from the plugin.
  struct Gated {
    int32_t activation;  // an FmActivation, checked before it is passed on
    Tensor* out;
  };
  // y into `out`; with `gated`, the plugin may write gated->out instead, and
  // the answer says whether it did (`out` then holds scratch). `out` may be
  // null with `gated`: a plugin that does not write gated->out then queues
  // nothing. A plugin before ABI 1.3 is not asked: the answer is false.
  bool gemm_routed(const Tensor& x, const Tensor& sorted_token_ids, const Tensor& expert_ids,
                   const Tensor& num_tokens_post_padded, int64_t block_size, int64_t top_k,
                   const Tensor* topk_weights, Tensor* out, void* stream, const Gated* gated = nullptr);
  // gemm_routed with pair routing (plugin.h): every (token, k) pair its own
  // block, its expert read from topk_ids (through expert_map); no align.
  bool gemm_routed_pairs(const Tensor& x, const Tensor& topk_ids, int64_t num_experts, const Tensor* expert_map,
                         const Tensor* topk_weights, Tensor* out, void* stream, const Gated* gated = nullptr);
  // gemm_routed_pairs' checks alone; answers top_k.
  int64_t check_routed_pairs(const Tensor& x, const Tensor& topk_ids, int64_t num_experts, const Tensor* expert_map,
                             const Tensor* topk_weights, Tensor* out, const Gated* gated = nullptr) const;
  FmStack* handle() const { return handle_; }
  void zero_workspace(void* stream);

 private:
  // The part of a stacked column window that lies in one expert.
  struct Segment {
    int64_t expert;
    int64_t col_begin;      // inside the expert
    int64_t n;
    int64_t window_offset;  // where the segment starts inside the window
  };
  std::vector<Segment> view_segments(int64_t offset, int64_t n, const char* op) const;
  // A column window [col_begin, col_begin + n) inside one expert.
  void check_column_window(int64_t col_begin, int64_t n, const char* op) const;
  void check_x(const char* op, const Tensor& x) const;
  int64_t check_routed_io(const char* op, const Tensor& x, int64_t top_k, const Tensor* topk_weights,
                          Tensor* out, const Gated* gated) const;
  struct RoutedOutput {
    Tensor* tensor;
    const char* name;
  };
  static std::vector<RoutedOutput> routed_outputs(Tensor* out, const Gated* gated);
  // Sends a routed call's args, with `gated` where the plugin takes it;
  // answers whether the plugin wrote gated->out.
  bool launch_routed(FmGemmRoutedArgs& args, const Gated* gated, const char* op);
  void check_gemm_io(const char* op, const Tensor& x, int64_t n, const Tensor* bias, const Tensor& out) const;
  void check_dispatch_table(const Tensor& dispatches) const;
  // Checks every row against x's rows and, when out_rows >= 0, out's; returns
  // max(out_row + m).
  int64_t check_host_dispatches(const Tensor& dispatches, int64_t x_rows, int64_t out_rows) const;
  void launch_batched(const DLTensor& x, const DLTensor& dispatches, int64_t col_begin, int64_t n,
                      const DLTensor* bias, DLTensor& out, void* stream, const char* op);

  std::shared_ptr<Backend> backend_;
  FmStack* handle_;
  StackSpec spec_;
  bool has_zeros_, has_g_idx_;
  FmStackProperties props_{};
};

}  // namespace ferrum
