// The cross-CTA reduction of stream-K (params.hpp, StreamK): partial sums of
// one tile meet in its fp32 slot; the CTA that completes the tile's K slices
// takes the total.
#ifndef FERRUM_MOE_CUDA_GEMM_STREAM_K_CUH_
#define FERRUM_MOE_CUDA_GEMM_STREAM_K_CUH_

#include <cstdint>

#include "gemm/layout.hpp"
#include "gemm/params.hpp"
#include "gemm/ptx.cuh"
#include "gemm/traits.cuh"

namespace ferrum_moe_cuda::gemm {

// Adds this CTA's accumulators (`slices` of the tile's k_tiles K slices) into
// the tile's slot. Returns true in the CTA that completes the tile, with `acc`
// replaced by the total and the slot and counter reset; false in the others,
// which then store nothing.
template <int kRows, bool kWgmma>
__device__ bool reduce_stream_k(const StreamK& schedule, int64_t tile, int slices, int k_tiles,
                               const RowTable<kRows>& rows, typename AccumulatorLayout<kRows, kWgmma>::Flat& acc) {
  using Layout = AccumulatorLayout<kRows, kWgmma>;
  __shared__ int is_last;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  float* slot = schedule.partials + tile * (kRows * kTileN);
  // Visits the accumulators of rows that hold a token (the others stay zero).
  auto for_each_used = [&](auto&& visit) {
#pragma unroll
    for (int r = 0; r < Layout::kCount; ++r) {
      const int row = Layout::row(r, lane);
      if (rows.out_row[row] >= 0) visit(acc[r], slot + row * kTileN + Layout::column(r, warp, lane));
    }
  };
  for_each_used([](float value, float* p) { atomicAdd(p, value); });
  // One thread publishes the CTA's adds (the CTA barrier orders them before
  // its release) and learns whether it completes the tile (its acquire),
  // the split-K semaphore pattern: no fence in every thread, each of which
  // waited for its own adds to land (7% of the decode GEMMs' stall samples).
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomic_add_acq_rel(schedule.counters + tile, slices) + slices == k_tiles;
  __syncthreads();
  if (!is_last) return false;
  // The other CTAs' adds, read from L2 (ld.cg), not a stale L1 line.
  for_each_used([](float& value, float* p) {
    value = __ldcg(p);
    *p = 0.0f;
  });
  if (threadIdx.x == 0) schedule.counters[tile] = 0;
  return true;
}

}  // namespace ferrum_moe_cuda::gemm

#endif  // FERRUM_MOE_CUDA_GEMM_STREAM_K_CUH_
