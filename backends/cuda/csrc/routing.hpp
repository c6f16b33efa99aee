// moe_align_block_size on the device (plugin.h FmAlignArgs): one CTA, or for
// many pairs one CTA per chunk of pairs (a stream-ordered workspace); no host
// synchronisation, so it can be captured in a CUDA graph.
#ifndef FERRUM_MOE_CUDA_ROUTING_HPP_
#define FERRUM_MOE_CUDA_ROUTING_HPP_

#include <cuda_runtime.h>

#include <cstdint>

namespace ferrum_moe_cuda {

// Per-expert counters live in shared memory; more local experts than this
// are refused with a clear error by the caller.
constexpr int64_t kMaxAlignLocalExperts = 1024;

struct AlignParams {
  const void* topk_ids;         // [num_tokens, top_k] int32 or int64
  bool topk_ids_int64;
  int64_t topk_ids_stride0;
  int64_t topk_ids_stride1;
  int64_t num_tokens;
  int64_t top_k;
  int64_t num_experts;
  const int32_t* expert_map;    // [num_experts] global -> local or -1; or null
  int32_t num_local_experts;
  int32_t block_size;
  int32_t* sorted_token_ids;    // [sorted_len]
  int64_t sorted_len;
  int32_t* expert_ids;          // [expert_ids_len]
  int64_t expert_ids_len;
  int32_t* num_tokens_post_padded;  // [1]
};

cudaError_t launch_moe_align_block_size(const AlignParams& params, cudaStream_t stream);

}  // namespace ferrum_moe_cuda

#endif  // FERRUM_MOE_CUDA_ROUTING_HPP_
