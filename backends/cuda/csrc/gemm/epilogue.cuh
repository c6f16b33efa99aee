// The GEMM epilogue: fp32 accumulators (+ bias) (* router weight) -> out in
// the compute dtype or float32. Every store is guarded: unused rows and
// columns outside the requested window (N padding included) are never written.
#ifndef FERRUM_MOE_CUDA_GEMM_EPILOGUE_CUH_
#define FERRUM_MOE_CUDA_GEMM_EPILOGUE_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "gemm/layout.hpp"
#include "gemm/params.hpp"
#include "gemm/traits.cuh"

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

// Accumulator element i of fragment (mt, nt) sits at row mt*16 + lane/4
// (+8 for i >= 2) and column nt*8 + 2*(lane%4) + i%2 of the warp's columns.
template <class T, int kMTiles>
__device__ void store_results(const GemmIO& io, const RowTable<kMTiles * kMmaM>& rows, int n_tile,
                              const float (&acc)[kMTiles][kNFrags][4]) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = mt * kMmaM + lane / 4 + (i / 2) * 8;
      const int64_t out_row = rows.out_row[row];
      if (out_row < 0) continue;
      const float weight = rows.weight[row];
#pragma unroll
      for (int nt = 0; nt < kNFrags; ++nt) {
        const int64_t column =
            static_cast<int64_t>(n_tile) * kTileN + warp * kWarpN + nt * kMmaN + 2 * (lane % 4) + i % 2;
        const int64_t j = column - io.col_begin;
        if (j < 0 || j >= io.n) continue;
        float value = acc[mt][nt][i];
        if (io.bias != nullptr) value += raw_to_float<T>(io.bias[j]);
        value *= weight;
        const int64_t index = out_row * io.out_row_stride + j * io.out_col_stride;
        if (io.out_float32) {
          static_cast<float*>(io.out)[index] = value;
        } else {
          static_cast<T*>(io.out)[index] = float_to<T>(value);
        }
      }
    }
  }
}

// The 128-token wgmma tiles hold C^T: accumulator [h][4i + e] of lane l in
// warp w is weight column w*32 + h*16 + l/4 (+8 for e >= 2) of the tile, token
// row 8i + 2(l%4) + e%2 (the wgmma m64nN D layout, rows = weight columns).
template <class T>
__device__ void store_results_wgmma(const GemmIO& io, const RowTable<kWgmmaRowsPerCta>& rows, int n_tile,
                                    const float (&acc)[2][64]) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t column = static_cast<int64_t>(n_tile) * kTileN + warp * kWarpN + h * 16 + lane / 4 + (e / 2) * 8;
      const int64_t j = column - io.col_begin;
      if (j < 0 || j >= io.n) continue;
      const float bias = io.bias != nullptr ? raw_to_float<T>(io.bias[j]) : 0.0f;
#pragma unroll
      for (int i = 0; i < kWgmmaRowsPerCta / 8; ++i) {
        const int row = 8 * i + 2 * (lane % 4) + e % 2;
        const int64_t out_row = rows.out_row[row];
        if (out_row < 0) continue;
        const float value = (acc[h][4 * i + e] + bias) * rows.weight[row];
        const int64_t index = out_row * io.out_row_stride + j * io.out_col_stride;
        if (io.out_float32) {
          static_cast<float*>(io.out)[index] = value;
        } else {
          static_cast<T*>(io.out)[index] = float_to<T>(value);
        }
      }
    }
  }
}

}  // namespace ferrum_moe_cuda::gemm

#endif  // FERRUM_MOE_CUDA_GEMM_EPILOGUE_CUH_
