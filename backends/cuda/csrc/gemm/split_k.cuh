// The cross-CTA reduction of split-K (params.hpp, SplitK): partial sums meet
// in an fp32 slot per output tile; the last CTA of the tile takes the total.
#ifndef FERRUM_MOE_CUDA_GEMM_SPLIT_K_CUH_
#define FERRUM_MOE_CUDA_GEMM_SPLIT_K_CUH_

#include <cstdint>

#include "gemm/layout.hpp"
#include "gemm/params.hpp"
#include "gemm/traits.cuh"

namespace ferrum_moe_cuda::gemm {

// Adds this CTA's accumulators into the tile's slot. Returns true in the last
// CTA of the tile, with `acc` replaced by the total and the slot and counter
// reset; false in the others, which then store nothing.
template <int kMTiles>
__device__ bool reduce_split_k(const SplitK& split, const RowTable<kMTiles * kMmaM>& rows,
                               float (&acc)[kMTiles][kNFrags][4]) {
  static_assert(kMTiles * kMmaM == kSmallRowsPerCta, "split-K slots hold small (decode) tiles");
  __shared__ int is_last;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y;
  float* slot = split.partials + tile * (kSmallRowsPerCta * kTileN);
  // Accumulator element i of fragment (mt, nt): row mt*16 + lane/4 (+8 for i >= 2),
  // column warp*32 + nt*8 + 2*(lane%4) + i%2 (the mma.m16n8 C layout).
  auto index = [&](int mt, int nt, int i) {
    const int row = mt * kMmaM + lane / 4 + (i / 2) * 8;
    return row * kTileN + warp * kWarpN + nt * kMmaN + 2 * (lane % 4) + i % 2;
  };
  // Visits the accumulators of rows that hold a token (the others stay zero).
  auto for_each_used = [&](auto&& visit) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (rows.out_row[mt * kMmaM + lane / 4 + (i / 2) * 8] >= 0)
#pragma unroll
          for (int nt = 0; nt < kNFrags; ++nt) visit(acc[mt][nt][i], slot + index(mt, nt, i));
  };
  for_each_used([](float value, float* p) { atomicAdd(p, value); });
  // Release: every thread's adds are visible device-wide before the count.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(split.counters + tile, 1) == static_cast<int>(gridDim.z) - 1;
  __syncthreads();
  if (!is_last) return false;
  // Acquire: the other CTAs' adds, read from L2 (ld.cg), not a stale L1 line.
  __threadfence();
  for_each_used([](float& value, float* p) {
    value = __ldcg(p);
    *p = 0.0f;
  });
  if (threadIdx.x == 0) split.counters[tile] = 0;
  return true;
}

}  // namespace ferrum_moe_cuda::gemm

#endif  // FERRUM_MOE_CUDA_GEMM_SPLIT_K_CUH_
