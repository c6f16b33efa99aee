// Device helpers shared by the routing kernel and moe_sum: which local expert
// a (token, slot) pair goes to, with every device-resident index range-checked.
#ifndef FERRUM_MOE_CUDA_ROUTING_CUH_
#define FERRUM_MOE_CUDA_ROUTING_CUH_

#include <cstdint>

namespace ferrum_moe_cuda {

// The local expert of topk_ids[token, slot], or -1 when the id is outside
// [0, num_experts) or expert_map sends it to -1 (another rank's expert) or to
// a value outside [0, num_local_experts).
//
// kEarly: a read before the kernel waits for the one before it
// (dependent_launch.cuh), which may still be writing the routing: it reads
// through L2 only (ld.global.cg), so no stale line stays in the SM's L1 for
// the reads after the wait, which are the ones results depend on.
template <bool kEarly = false, class Index>
__device__ __forceinline__ int local_expert_of(const Index* topk_ids, int64_t stride0,
                                               int64_t stride1, int64_t token, int64_t slot,
                                               int64_t num_experts, const int32_t* expert_map,
                                               int64_t num_local_experts) {
  const Index* id_at = topk_ids + token * stride0 + slot * stride1;
  const int64_t id = static_cast<int64_t>(kEarly ? __ldcg(id_at) : *id_at);
  if (id < 0 || id >= num_experts) return -1;
  const int64_t local = expert_map == nullptr ? id : kEarly ? __ldcg(expert_map + id) : expert_map[id];
  return local >= 0 && local < num_local_experts ? static_cast<int>(local) : -1;
}

}  // namespace ferrum_moe_cuda

#endif  // FERRUM_MOE_CUDA_ROUTING_CUH_
