// A routed pair's token, slot, expert and router weight, read from the
// routing arrays of RoutedParams: shared by the GEMM kernels and the
// act-order gather (gather.cuh).
#ifndef FERRUM_MOE_CUDA_GEMM_PAIRS_CUH_
#define FERRUM_MOE_CUDA_GEMM_PAIRS_CUH_

#include <cstdint>

#include "routing.cuh"
#include "gemm/params.hpp"

namespace ferrum_moe_cuda::gemm {

// A pair's token and slot in topk_ids. Pair numbers and top_k are below 2^31
// (plugin.h; the core checks top_k >= 1), so one 32-bit division finds both
// (a 64-bit one is a long software sequence, here on a tile's path to its
// first copy).
struct PairSlot {
  int64_t token, slot;
};
__device__ __forceinline__ PairSlot pair_slot(int64_t pair, int64_t top_k) {
  const uint32_t k = static_cast<uint32_t>(top_k);
  const uint32_t token = static_cast<uint32_t>(pair) / k;
  return {token, static_cast<uint32_t>(pair) - token * k};
}

// The stack's local expert of the pair at `at` (its number < p.num_pairs),
// read from topk_ids through expert_map; -1 where the pair is dropped.
// kEarly: read before the kernel's wait (routing.cuh).
template <bool kEarly = false>
__device__ __forceinline__ int pair_expert(const RoutedParams& p, PairSlot at) {
  return p.topk_ids_int64
             ? local_expert_of<kEarly>(static_cast<const int64_t*>(p.topk_ids), p.topk_ids_stride0,
                                       p.topk_ids_stride1, at.token, at.slot, p.num_global_experts, p.expert_map,
                                       p.w.num_experts)
             : local_expert_of<kEarly>(static_cast<const int32_t*>(p.topk_ids), p.topk_ids_stride0,
                                       p.topk_ids_stride1, at.token, at.slot, p.num_global_experts, p.expert_map,
                                       p.w.num_experts);
}

// The router weight of the pair at `at`, or 1 where the call passes none.
__device__ __forceinline__ float pair_weight(const RoutedParams& p, PairSlot at) {
  return p.topk_weights != nullptr
             ? p.topk_weights[at.token * p.topk_weights_stride0 + at.slot * p.topk_weights_stride1]
             : 1.0f;
}

}  // namespace ferrum_moe_cuda::gemm

#endif  // FERRUM_MOE_CUDA_GEMM_PAIRS_CUH_
