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

}  // namespace ferrum_moe_cuda::gemm

#endif  // FERRUM_MOE_CUDA_GEMM_EPILOGUE_CUH_
