// The MoE layer's elementwise steps: gated activation between the two GEMMs,
// and the float32 top-k sum after the second.
#ifndef FERRUM_MOE_CUDA_ELEMENTWISE_HPP_
#define FERRUM_MOE_CUDA_ELEMENTWISE_HPP_

#include <cuda_runtime.h>

#include <cstdint>

namespace ferrum_moe_cuda {

enum class ScalarType { kFloat16, kBFloat16, kFloat32 };

// out[r, j] = silu(input[r, j]) * input[r, n + j], computed in float32.
struct GatedActivationParams {
  const void* input;  // [rows, 2n], unit column stride
  int64_t input_row_stride;
  ScalarType input_type;
  void* out;          // [rows, n], unit column stride
  int64_t out_row_stride;
  ScalarType out_type;
  int64_t rows;
  int64_t n;
};

// out[t, :] = sum over slots j whose expert is valid and local of
// input[t * top_k + j, :], accumulated in float32.
struct MoeSumParams {
  const void* input;  // [num_tokens * top_k, hidden], unit column stride
  int64_t input_row_stride;
  ScalarType input_type;
  const void* topk_ids;  // [num_tokens, top_k] int32 or int64
  bool topk_ids_int64;
  int64_t topk_ids_stride0;
  int64_t topk_ids_stride1;
  int64_t num_experts;
  const int32_t* expert_map;  // or null
  void* out;          // [num_tokens, hidden], unit column stride
  int64_t out_row_stride;
  ScalarType out_type;
  int64_t num_tokens;
  int64_t top_k;
  int64_t hidden;
};

cudaError_t launch_gated_silu(const GatedActivationParams& params, cudaStream_t stream);
cudaError_t launch_moe_sum(const MoeSumParams& params, cudaStream_t stream);

}  // namespace ferrum_moe_cuda

#endif  // FERRUM_MOE_CUDA_ELEMENTWISE_HPP_
