// Load-time repack of GPTQ-ordered codes into the GEMM's tile layout.
#ifndef FERRUM_MOE_CUDA_REPACK_HPP_
#define FERRUM_MOE_CUDA_REPACK_HPP_

#include <cuda_runtime.h>

#include <cstdint>

namespace ferrum_moe_cuda {

// One expert: `qweight` int32 [ceil(k / (32 / bits)), n] in GPTQ order (code k
// of column n in word k / (32 / bits) at bit bits * (k % (32 / bits))), on the
// device. Writes n_tiles x k_tiles tiles of gemm::WeightTileLayout<bits> to
// `tiles`. Row k of the tiles takes source row perm[k] (act-order sorting),
// or row k when perm is null; rows >= k and columns >= n get code 0 (their
// x inputs are zero and their outputs are never stored).
cudaError_t launch_repack_expert(const uint32_t* qweight, const int32_t* perm, int bits,
                                 int64_t k, int64_t n, int k_tiles, int n_tiles, uint32_t* tiles,
                                 cudaStream_t stream);

}  // namespace ferrum_moe_cuda

#endif  // FERRUM_MOE_CUDA_REPACK_HPP_
