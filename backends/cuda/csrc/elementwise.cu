// Elementwise kernels: one thread per output element over a grid-stride loop,
// consecutive threads on consecutive columns (coalesced), float32 math.
#include "elementwise.hpp"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "dependent_launch.cuh"
#include "routing.cuh"

namespace ferrum_moe_cuda {
namespace {

constexpr int kElementwiseThreads = 256;
// Caps the grid; the grid-stride loop covers larger outputs.
constexpr int64_t kElementwiseMaxBlocks = 65535;
// moe_sum has no local-expert bound: any non-negative expert_map entry is local.
constexpr int64_t kNoLocalExpertBound = INT64_MAX;

template <class T>
__device__ __forceinline__ float load_float(const T* ptr) {
  if constexpr (std::is_same_v<T, float>) {
    return *ptr;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(*ptr);
  } else {
    return __bfloat162float(*ptr);
  }
}

template <class T>
__device__ __forceinline__ void store_float(T* ptr, float value) {
  if constexpr (std::is_same_v<T, float>) {
    *ptr = value;
  } else if constexpr (std::is_same_v<T, __half>) {
    *ptr = __float2half_rn(value);
  } else {
    *ptr = __float2bfloat16_rn(value);
  }
}

template <class In, class Out>
__global__ void __launch_bounds__(kElementwiseThreads)
    gated_silu_kernel(GatedActivationParams p) {
  dependent_grid_begin();
  const auto* input = static_cast<const In*>(p.input);
  auto* out = static_cast<Out*>(p.out);
  const int64_t total = p.rows * p.n;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / p.n;
    const int64_t j = i % p.n;
    const In* row = input + r * p.input_row_stride;
    const float gate = load_float(row + j);
    const float up = load_float(row + p.n + j);
    // silu(g) = g * sigmoid(g); for very negative g, expf overflows to inf and
    // the quotient is (-)0, the correct limit.
    const float silu = gate / (1.0f + expf(-gate));
    store_float(out + r * p.out_row_stride + j, silu * up);
  }
}

template <class In, class Out, class Index>
__global__ void __launch_bounds__(kElementwiseThreads) moe_sum_kernel(MoeSumParams p) {
  dependent_grid_begin();
  const auto* input = static_cast<const In*>(p.input);
  const auto* topk_ids = static_cast<const Index*>(p.topk_ids);
  auto* out = static_cast<Out*>(p.out);
  const int64_t total = p.num_tokens * p.hidden;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / p.hidden;
    const int64_t h = i % p.hidden;
    float sum = 0.0f;
    for (int64_t slot = 0; slot < p.top_k; ++slot) {
      // Pairs of invalid or non-local experts were never computed (their rows
      // may hold garbage): skip them rather than add them.
      const int local = local_expert_of(topk_ids, p.topk_ids_stride0, p.topk_ids_stride1, t, slot,
                                        p.num_experts, p.expert_map, kNoLocalExpertBound);
      if (local < 0) continue;
      sum += load_float(input + (t * p.top_k + slot) * p.input_row_stride + h);
    }
    store_float(out + t * p.out_row_stride + h, sum);
  }
}

// Calls body(T{}) with the C++ type of `type` (a null pointer of it).
template <class Body>
cudaError_t with_scalar_type(ScalarType type, Body&& body) {
  switch (type) {
    case ScalarType::kFloat16: return body(static_cast<__half*>(nullptr));
    case ScalarType::kBFloat16: return body(static_cast<__nv_bfloat16*>(nullptr));
    case ScalarType::kFloat32: return body(static_cast<float*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

unsigned grid_for(int64_t total) {
  return static_cast<unsigned>(
      std::clamp<int64_t>((total + kElementwiseThreads - 1) / kElementwiseThreads, 1,
                          kElementwiseMaxBlocks));
}

}  // namespace

cudaError_t launch_gated_silu(const GatedActivationParams& params, cudaStream_t stream) {
  const int64_t total = params.rows * params.n;
  if (total == 0) return cudaSuccess;
  return with_scalar_type(params.input_type, [&](auto* in_tag) {
    return with_scalar_type(params.out_type, [&](auto* out_tag) {
      using In = std::remove_pointer_t<decltype(in_tag)>;
      using Out = std::remove_pointer_t<decltype(out_tag)>;
      return launch_dependent(gated_silu_kernel<In, Out>, grid_for(total), kElementwiseThreads, 0, stream, params);
    });
  });
}

cudaError_t launch_moe_sum(const MoeSumParams& params, cudaStream_t stream) {
  const int64_t total = params.num_tokens * params.hidden;
  if (total == 0) return cudaSuccess;
  return with_scalar_type(params.input_type, [&](auto* in_tag) {
    return with_scalar_type(params.out_type, [&](auto* out_tag) {
      using In = std::remove_pointer_t<decltype(in_tag)>;
      using Out = std::remove_pointer_t<decltype(out_tag)>;
      return params.topk_ids_int64
                 ? launch_dependent(moe_sum_kernel<In, Out, int64_t>, grid_for(total), kElementwiseThreads, 0, stream,
                                    params)
                 : launch_dependent(moe_sum_kernel<In, Out, int32_t>, grid_for(total), kElementwiseThreads, 0, stream,
                                    params);
    });
  });
}

}  // namespace ferrum_moe_cuda
