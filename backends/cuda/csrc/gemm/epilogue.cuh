// The GEMM epilogue: fp32 accumulators (+ bias) (* router weight) -> out in
// the compute dtype or float32. Every store is guarded: unused rows and
// columns outside the requested window (N padding included) are never written.
#ifndef FERRUM_MOE_CUDA_GEMM_EPILOGUE_CUH_
#define FERRUM_MOE_CUDA_GEMM_EPILOGUE_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "activation.cuh"
#include "gemm/dequant.cuh"
#include "gemm/layout.hpp"
#include "gemm/params.hpp"
#include "gemm/ptx.cuh"
#include "gemm/traits.cuh"
#include "gemm/wgmma.cuh"

namespace ferrum_moe_cuda::gemm {

template <class T>
__device__ __forceinline__ float raw_to_float(uint16_t bits) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(__ushort_as_half(bits));
  } else {
    return __bfloat162float(__ushort_as_bfloat16(bits));
  }
}

template <class T>
__device__ __forceinline__ T float_to(float value) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(value);
  } else {
    return __float2bfloat16_rn(value);
  }
}

// Two floats as one 32-bit word of the compute dtype (the first in the low half).
template <class T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    return u32_of(__floats2half2_rn(lo, hi));
  } else {
    return u32_of(__floats2bfloat162_rn(lo, hi));
  }
}

// Accumulator r of this thread sits at the tile's row and column that
// AccumulatorLayout (traits.cuh) gives for the mainloop's instruction. `tid`:
// the thread's index among the computing threads.
template <class T, int kRows, bool kWgmma>
__device__ void store_results(const GemmIO& io, const RowTable<kRows>& rows, int n_tile,
                              const typename AccumulatorLayout<kRows, kWgmma>::Flat& acc, int tid) {
  using Layout = AccumulatorLayout<kRows, kWgmma>;
  const int warp = tid / 32;
  const int lane = tid % 32;
#pragma unroll
  for (int r = 0; r < Layout::kCount; ++r) {
    const int row = Layout::row(r, lane);
    const int64_t out_row = rows.out_row[row];
    if (out_row < 0) continue;
    const int64_t j = static_cast<int64_t>(n_tile) * kTileN + Layout::column(r, warp, lane) - io.col_begin;
    if (j < 0 || j >= io.n) continue;
    float value = acc[r];
    if (io.bias != nullptr) value += raw_to_float<T>(io.bias[j]);
    value *= rows.weight[row];
    const int64_t index = out_row * io.out_row_stride + j * io.out_col_stride;
    if (io.out_float32) {
      static_cast<float*>(io.out)[index] = value;
    } else {
      static_cast<T*>(io.out)[index] = float_to<T>(value);
    }
  }
}

// The floats store_results_gated_tiny passes from the up warps to the gate warps.
constexpr int kGatedTinyExchangeFloats = 2 * 32 * AccumulatorLayout<kTinyRowsPerCta, false>::kCount;

// The gated epilogue on the 8-row tiles (GemmIO::gate_up_tiles; mainloop.cuh
// places the warps): warps 2-3 hold the up columns of the gate columns warps
// 0-1 hold, at the same accumulator of the same lane. They pass them through
// `exchange` (kGatedTinyExchangeFloats, laid out [register][warp][lane]: no
// bank conflicts), and warps 0-1 store silu(gate * w) * (up * w) for the
// row's router weight w into out's column of the gate column: CTA tile
// `cta_tile` is half cta_tile % 2 of gate tile cta_tile / 2. Every thread of
// the CTA calls it (one __syncthreads); the caller's next piece begins with
// its own before `exchange` is written again.
template <class T>
__device__ void store_results_gated_tiny(const GemmIO& io, const RowTable<kTinyRowsPerCta>& rows, int cta_tile,
                                         const typename AccumulatorLayout<kTinyRowsPerCta, false>::Flat& acc,
                                         int tid, float* exchange) {
  using Layout = AccumulatorLayout<kTinyRowsPerCta, false>;
  const int warp = tid / 32, lane = tid % 32;
  if (warp >= 2) {
#pragma unroll
    for (int r = 0; r < Layout::kCount; ++r) exchange[(r * 2 + warp - 2) * 32 + lane] = acc[r];
  }
  __syncthreads();
  if (warp >= 2) return;
  const int slot = warp + 2 * (cta_tile % 2);
  const int64_t tile_column = static_cast<int64_t>(cta_tile / 2) * kTileN;
#pragma unroll
  for (int r = 0; r < Layout::kCount; ++r) {
    const int row = Layout::row(r, lane);
    const int64_t out_row = rows.out_row[row];
    if (out_row < 0) continue;
    const float w = rows.weight[row];
    const float gate = acc[r] * w, up = exchange[(r * 2 + warp) * 32 + lane] * w;
    const int64_t j = tile_column + Layout::column(r, slot, lane);
    static_cast<T*>(io.out)[out_row * io.out_row_stride + j * io.out_col_stride] =
        float_to<T>(silu_times(gate, up));
  }
}

// Whether the wgmma tiles' results can leave through store_results_staged:
// unit column stride, a 16-byte aligned base, and rows and a window start on
// 16-byte boundaries (8 columns of the compute dtype, 4 of float32).
__device__ __forceinline__ bool stores_vectors(const GemmIO& io) {
  const int per_chunk = io.out_float32 ? 4 : 8;
  return io.out_col_stride == 1 && io.out_row_stride % per_chunk == 0 && io.col_begin % per_chunk == 0 &&
         reinterpret_cast<uintptr_t>(io.out) % 16 == 0;
}

// Staging for the wgmma tiles' epilogues (v40): a computing warpgroup
// converts its 128-column results (+ bias, * router weight) to the compute
// dtype and stores them transposed into its staging area `tile` with stmatrix
// (token rows of 16-byte chunks, XOR-swizzled by row % 8 so the 8 rows of one
// matrix hit 8 bank groups). `first`: the window column of the warpgroup's
// first column; `t`: the thread's index in its warpgroup.
template <class T, int kRows>
__device__ __forceinline__ void stage_results(const GemmIO& io, const RowTable<kRows>& rows, int64_t first,
                                              const typename AccumulatorLayout<kRows, true>::Flat& acc, int t,
                                              uint8_t* tile) {
  constexpr int kRowBytes = kTileN * static_cast<int>(sizeof(T));
  constexpr int kHalf = kRows / 2;  // accumulators per 64-column wgmma (the flat layout's [h][4j + e])
  const int warp = t / 32, lane = t % 32;
  // The thread's four columns: warp * 32 + h * 16 + b * 8 + lane / 4.
  float bias[2][2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const int64_t j = first + warp * kWarpN + h * 16 + b * 8 + lane / 4;
      bias[h][b] = io.bias != nullptr && j >= 0 && j < io.n ? raw_to_float<T>(io.bias[j]) : 0.0f;
    }
  }
  const uint32_t area = shared_address(tile);
#pragma unroll
  for (int j = 0; j < kRows / 8; ++j) {
    // Token rows 8j + 2 * (lane % 4) and the next: matrix i = 2h + b holds
    // columns warp * 32 + h * 16 + b * 8 .. + 7 of token rows 8j .. 8j + 7.
    const int token = 8 * j + 2 * (lane % 4);
    const float w0 = rows.weight[token], w1 = rows.weight[token + 1];
    uint32_t regs[4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        const int r = h * kHalf + 4 * j + 2 * b;
        regs[2 * h + b] = pack_pair<T>((acc[r] + bias[h][b]) * w0, (acc[r + 1] + bias[h][b]) * w1);
      }
    }
    const int row = 8 * j + lane % 8, chunk = warp * 4 + lane / 8;
    stmatrix_x4_trans(area + row * kRowBytes + ((chunk ^ (row % 8)) * 16), regs);
  }
}

// The staged epilogues' readback: for every used row of `first_row`,
// first_row + kRowsPerPass, ..., the 16 bytes of shared memory at
// chunk_at(row) go to the row's out row at window columns j0 .. j0 + 16 /
// sizeof(Elem) - 1, as one 16-byte store where they lie inside the window,
// element by element at its edges.
template <class Elem, int kRows, int kRowsPerPass, class ChunkAt>
__device__ __forceinline__ void write_staged_rows(const GemmIO& io, const RowTable<kRows>& rows, int first_row,
                                                  int64_t j0, ChunkAt chunk_at) {
  constexpr int kElems = 16 / static_cast<int>(sizeof(Elem));
  const bool whole = j0 >= 0 && j0 + kElems <= io.n;
#pragma unroll 4
  for (int row = first_row; row < kRows; row += kRowsPerPass) {
    const int64_t out_row = rows.out_row[row];
    if (out_row < 0) continue;
    const uint4 v = *reinterpret_cast<const uint4*>(chunk_at(row));
    Elem* dst = static_cast<Elem*>(io.out) + out_row * io.out_row_stride + j0;
    if (whole) {
      *reinterpret_cast<uint4*>(dst) = v;
      continue;
    }
    Elem values[kElems];
    memcpy(values, &v, sizeof(v));
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      if (j0 + e >= 0 && j0 + e < io.n) dst[e] = values[e];
    }
  }
}

// store_results_staged into float32 (the down projection's rows before the
// top-k sum): a warpgroup's 128 x 128 floats are twice its staging area, so
// they leave in two passes, pass h with each warp's columns warp * 32 + h * 16
// .. + 15 (the flat layout's [h][...] half), staged as token rows of 64 floats
// whose 16-byte chunks are XOR-swizzled by (row & 6): the four token rows two
// apart and the 8 columns of one store hit 32 banks, and a row's readback is
// conflict-free. Each used row's pass leaves as 16 16-byte stores, four runs
// of 64 bytes. (store_results takes 128 scalar stores per thread, each with
// its own index math and checks: ~15% of the w2 GEMM's warp samples at
// Qwen3-30B-A3B M = 1024, kernel notes v55.) `first`: the window column of
// the warpgroup's first column; `t`: the thread's index in its warpgroup;
// `barrier`: its named barrier.
template <class T, int kRows>
__device__ void store_results_staged_float32(const GemmIO& io, const RowTable<kRows>& rows, int64_t first,
                                             const typename AccumulatorLayout<kRows, true>::Flat& acc, int t,
                                             int barrier, float* area) {
  constexpr int kRowFloats = kTileN / 2;  // a pass's columns
  constexpr int kChunks = kRowFloats / 4;
  constexpr int kRowsPerPass = kThreads / kChunks;
  constexpr int kHalf = kRows / 2;  // accumulators per 64-column wgmma (the flat layout's [h][4j + e])
  const int warp = t / 32, lane = t % 32;
  const auto at = [](int row, int column) { return row * kRowFloats + (((column / 4) ^ (row & 6)) * 4) + column % 4; };
  const int chunk = t % kChunks;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    // The thread's two columns of the pass: warp * 32 + h * 16 + b * 8 + lane / 4.
    float bias[2];
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const int64_t j = first + warp * kWarpN + h * 16 + b * 8 + lane / 4;
      bias[b] = io.bias != nullptr && j >= 0 && j < io.n ? raw_to_float<T>(io.bias[j]) : 0.0f;
    }
    named_barrier_sync(barrier, kThreads);  // the last readback (this tile's or the previous one's) is done
#pragma unroll
    for (int j = 0; j < kRows / 8; ++j) {
      const int token = 8 * j + 2 * (lane % 4);
      const float w0 = rows.weight[token], w1 = rows.weight[token + 1];
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        const int r = h * kHalf + 4 * j + 2 * b;
        const int column = warp * 16 + b * 8 + lane / 4;
        area[at(token, column)] = (acc[r] + bias[b]) * w0;
        area[at(token + 1, column)] = (acc[r + 1] + bias[b]) * w1;
      }
    }
    named_barrier_sync(barrier, kThreads);
    // Chunk c of a staged row holds columns (c / 4) * 32 + h * 16 + (c % 4) * 4 .. + 3.
    const int64_t j0 = first + (chunk / 4) * kWarpN + h * 16 + (chunk % 4) * 4;
    write_staged_rows<float, kRows, kRowsPerPass>(io, rows, t / kChunks, j0,
                                                  [&](int row) { return area + at(row, chunk * 4); });
  }
}

// The wgmma tiles' epilogue where stores_vectors(io): each warpgroup stages
// its results (stage_results), then writes each used token row's 256 bytes
// with 16-byte stores; float32 output goes through
// store_results_staged_float32. (store_results would take 128 scalar stores
// per thread, with the index math and checks of each: a quarter of the warps'
// samples at Mixtral M = 4096.) `tid`: the thread's index among the computing
// threads; `staging`: GemmTraits::kStagingBytes of shared memory.
template <class T, int kRows>
__device__ void store_results_staged(const GemmIO& io, const RowTable<kRows>& rows, int n_tile,
                                     const typename AccumulatorLayout<kRows, true>::Flat& acc, int tid,
                                     uint8_t* staging) {
  constexpr int kRowBytes = kTileN * static_cast<int>(sizeof(T));
  constexpr int kChunks = kRowBytes / 16;
  const int group = tid / kThreads, t = tid % kThreads;
  uint8_t* tile = staging + group * kRows * kRowBytes;
  // Column (within the window) of this warpgroup's first column.
  const int64_t first = static_cast<int64_t>(n_tile + group) * kTileN - io.col_begin;
  const int barrier = 2 + group;           // 1 is the producer's (kernel.cuh)
  if (io.out_float32) {
    static_assert(kRows * (kTileN / 2) * sizeof(float) <= kRows * kRowBytes, "a float32 pass fits the area");
    store_results_staged_float32<T, kRows>(io, rows, first, acc, t, barrier, reinterpret_cast<float*>(tile));
    return;
  }
  named_barrier_sync(barrier, kThreads);   // the previous tile's readback is done with the area
  stage_results<T, kRows>(io, rows, first, acc, t, tile);
  named_barrier_sync(barrier, kThreads);
  const int chunk = t % kChunks;
  constexpr int kRowsPerPass = kThreads / kChunks;
  write_staged_rows<uint16_t, kRows, kRowsPerPass>(io, rows, t / kChunks, first + chunk * 8, [&](int row) {
    return tile + row * kRowBytes + ((chunk ^ (row % 8)) * 16);
  });
}

// The named barrier of both computing warpgroups in store_results_gated (1 is
// the producer's, 2-3 store_results_staged's, 4 the stream-K reduction's).
constexpr int kGatedEpilogueBarrier = 5;

// The gated epilogue (GemmIO::gate_up_tiles): the first warpgroup holds gate
// tile n_tile, the second its up tile; both stage their results as
// store_results_staged does, then all 256 threads read each used token row's
// gate and up chunks and write silu(gate) * up, computed in fp32 from the
// staged values as the activation kernel computes it from a stored [gate |
// up] row (elementwise.cu), to out's 128 columns of tile n_tile. The window
// is the whole gate half (col_begin 0, n = N / 2, a multiple of kTileN: the
// host's condition), so every chunk is whole; routed launches carry no bias.
template <class T, int kRows>
__device__ void store_results_gated(const GemmIO& io, const RowTable<kRows>& rows, int n_tile,
                                    const typename AccumulatorLayout<kRows, true>::Flat& acc, int tid,
                                    uint8_t* staging) {
  constexpr int kRowBytes = kTileN * static_cast<int>(sizeof(T));
  constexpr int kChunks = kRowBytes / 16;
  constexpr int kConsumers = kWgmmaColumnTilesPerCta * kThreads;
  const int group = tid / kThreads, t = tid % kThreads;
  named_barrier_sync(kGatedEpilogueBarrier, kConsumers);  // the previous tile's readback is done with both areas
  stage_results<T, kRows>(io, rows, static_cast<int64_t>(n_tile) * kTileN, acc, t,
                          staging + group * kRows * kRowBytes);
  named_barrier_sync(kGatedEpilogueBarrier, kConsumers);
  const uint8_t* gate_tile = staging;
  const uint8_t* up_tile = staging + kRows * kRowBytes;
  const int chunk = tid % kChunks;
  const int64_t j0 = static_cast<int64_t>(n_tile) * kTileN + chunk * 8;
  constexpr int kRowsPerPass = kConsumers / kChunks;
#pragma unroll 2
  for (int row = tid / kChunks; row < kRows; row += kRowsPerPass) {
    const int64_t out_row = rows.out_row[row];
    if (out_row < 0) continue;
    const int at = row * kRowBytes + ((chunk ^ (row % 8)) * 16);
    const uint4 g = *reinterpret_cast<const uint4*>(gate_tile + at);
    const uint4 u = *reinterpret_cast<const uint4*>(up_tile + at);
    const uint32_t gate[4] = {g.x, g.y, g.z, g.w}, up[4] = {u.x, u.y, u.z, u.w};
    uint32_t product[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float value[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float gv = raw_to_float<T>(static_cast<uint16_t>(gate[i] >> (16 * e)));
        const float uv = raw_to_float<T>(static_cast<uint16_t>(up[i] >> (16 * e)));
        value[e] = silu_times(gv, uv);
      }
      product[i] = pack_pair<T>(value[0], value[1]);
    }
    *reinterpret_cast<uint4*>(static_cast<uint16_t*>(io.out) + out_row * io.out_row_stride + j0) =
        make_uint4(product[0], product[1], product[2], product[3]);
  }
}

}  // namespace ferrum_moe_cuda::gemm

#endif  // FERRUM_MOE_CUDA_GEMM_EPILOGUE_CUH_
