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

// The named barrier the warp-specialised tiles' computing threads meet on in
// reduce_stream_k_by_thread (1 is the producer's, 2-3 the staged epilogue's,
// 5 the gated one's: kernel.cuh, epilogue.cuh).
constexpr int kStreamKBarrier = 4;

// reduce_stream_k for the warp-specialised (32-, 64- and 128-row wgmma) tiles: the same
// meeting, among their kComputeThreads computing threads only (`tid` their
// index; the producer warpgroup never reaches it), and each thread's
// accumulators kept in the slot in register order, not by row and column:
// float4 q of thread tid at q * kComputeThreads + tid, so a warp's adds and
// reads are 512 contiguous bytes, four floats per red.add (sm_90). Rows
// without a token add whatever their accumulators hold: they are never
// stored, and the completing CTA zeroes the whole slot.
template <int kCount, int kComputeThreads>
__device__ bool reduce_stream_k_by_thread(const StreamK& schedule, int64_t tile, int slices, int k_tiles,
                                          bool last_range, int tid, float (&acc)[kCount]) {
  static_assert(kCount % 4 == 0, "whole float4s");
  constexpr int kQuads = kCount / 4;
  auto* slot = reinterpret_cast<float4*>(schedule.partials + tile * (kCount * kComputeThreads)) + tid;
  int32_t* counter = schedule.counters + tile;
  if (!last_range) {
#pragma unroll
    for (int q = 0; q < kQuads; ++q) {
      red_add_f32x4(reinterpret_cast<float*>(slot + q * kComputeThreads),
                    make_float4(acc[4 * q], acc[4 * q + 1], acc[4 * q + 2], acc[4 * q + 3]));
    }
    named_barrier_sync(kStreamKBarrier, kComputeThreads);
    if (tid == 0) atomic_add_release(counter, slices);
    return false;
  }
  if (tid == 0) {
    while (load_acquire(counter) != k_tiles - slices) __nanosleep(64);
  }
  named_barrier_sync(kStreamKBarrier, kComputeThreads);
#pragma unroll
  for (int q = 0; q < kQuads; ++q) {
    const float4 other = __ldcg(slot + q * kComputeThreads);
    acc[4 * q] += other.x;
    acc[4 * q + 1] += other.y;
    acc[4 * q + 2] += other.z;
    acc[4 * q + 3] += other.w;
    slot[q * kComputeThreads] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
  if (tid == 0) *counter = 0;
  return true;
}

}  // namespace ferrum_moe_cuda::gemm

#endif  // FERRUM_MOE_CUDA_GEMM_STREAM_K_CUH_
