// Device helpers shared by the routing kernel and moe_sum: which local expert
// a (token, slot) pair goes to, with every device-resident index range-checked.
#ifndef FERRUM_MOE_CUDA_ROUTING_CUH_
#define FERRUM_MOE_CUDA_ROUTING_CUH_

#include <cstdint>

namespace ferrum_moe_cuda {

// The local expert of topk_ids[token, slot], or -1 when the id is outside
// [0, num_experts) or expert_map sends it to -1 (another rank's expert) or to
// a value outside [0, num_local_experts).
template <class Index>
__device__ __forceinline__ int local_expert_of(const Index* topk_ids, int64_t stride0,
                                               int64_t stride1, int64_t token, int64_t slot,
                                               int64_t num_experts, const int32_t* expert_map,
                                               int64_t num_local_experts) {
  const int64_t id = static_cast<int64_t>(topk_ids[token * stride0 + slot * stride1]);
  if (id < 0 || id >= num_experts) return -1;
  const int64_t local = expert_map != nullptr ? expert_map[id] : id;
  return local >= 0 && local < num_local_experts ? static_cast<int>(local) : -1;
}

}  // namespace ferrum_moe_cuda

#endif  // FERRUM_MOE_CUDA_ROUTING_CUH_
