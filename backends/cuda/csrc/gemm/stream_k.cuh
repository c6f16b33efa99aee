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

// Meets the tile's other K ranges in its slot. The CTA with the tile's last K
// range (`last_range`) completes it: it waits until the others' slices are
// counted, then takes their sums from the slot and adds its own accumulators
// (returns true, `acc` the total, slot and counter reset). The others add
// their accumulators into the slot and count their slices (return false: they
// store nothing). The completing CTA neither adds nor counts: one fence and
// one atomic round trip fewer on the chain that ends the launch (v32).
// Waiting cannot deadlock: the ranges before a tile's last belong to CTAs of
// lower index (params.hpp, StreamK), which the GPU dispatches first, and a
// CTA only ever waits for lower ones. Nor do waits chain: a CTA walks its
// pieces last first (kernel.cuh), so its one wait comes after its other parts
// are counted (walked first, the first v32 measured up to 4.8x slower: a CTA
// waited on its lower neighbour, which was itself waiting, across the grid).
template <int kRows, bool kWgmma>
__device__ bool reduce_stream_k(const StreamK& schedule, int64_t tile, int slices, int k_tiles, bool last_range,
                               const RowTable<kRows>& rows, typename AccumulatorLayout<kRows, kWgmma>::Flat& acc) {
  using Layout = AccumulatorLayout<kRows, kWgmma>;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  float* slot = schedule.partials + tile * (kRows * kTileN);
  int32_t* counter = schedule.counters + tile;
  // Visits the accumulators of rows that hold a token (the others stay zero).
  auto for_each_used = [&](auto&& visit) {
#pragma unroll
    for (int r = 0; r < Layout::kCount; ++r) {
      const int row = Layout::row(r, lane);
      if (rows.out_row[row] >= 0) visit(acc[r], slot + row * kTileN + Layout::column(r, warp, lane));
    }
  };
  if (!last_range) {
    for_each_used([](float value, float* p) { atomicAdd(p, value); });
    // One thread publishes the CTA's adds (the CTA barrier orders them before
    // its release): the split-K semaphore pattern, no fence in every thread.
    __syncthreads();
    if (threadIdx.x == 0) atomic_add_release(counter, slices);
    return false;
  }
  // One thread waits for the other ranges (acquire: their adds are visible
  // after it), the CTA barrier passes that on.
  if (threadIdx.x == 0) {
    while (load_acquire(counter) != k_tiles - slices) __nanosleep(64);
  }
  __syncthreads();
  // The other CTAs' adds, read from L2 (ld.cg), not a stale L1 line.
  for_each_used([](float& value, float* p) {
    value += __ldcg(p);
    *p = 0.0f;
  });
  if (threadIdx.x == 0) *counter = 0;
  return true;
}

}  // namespace ferrum_moe_cuda::gemm

#endif  // FERRUM_MOE_CUDA_GEMM_STREAM_K_CUH_
