// Act-order stacks (g_idx): the repack sorts each expert's weight rows by
// group, so a GEMM over them needs x's columns in the same order. These
// kernels copy them once per call, x_sorted[row, j] = x[source row,
// perm[e, j]] for j < k (zero up to the next 8 columns), so the GEMM then reads
// its rows as it does without act-order: 16-byte copies, no element gathered
// in the mainloop (kernel notes, "v76").
#ifndef FERRUM_MOE_CUDA_GEMM_GATHER_CUH_
#define FERRUM_MOE_CUDA_GEMM_GATHER_CUH_

#include <cstdint>

#include "dependent_launch.cuh"
#include "gemm/pairs.cuh"
#include "gemm/params.hpp"

namespace ferrum_moe_cuda::gemm {

constexpr int kGatherThreads = 256;

// One row: each thread 8 adjacent columns at a time, a 16-byte store (row
// 16-byte aligned). The loads of x hit one row, which L1 and L2 hold.
__device__ __forceinline__ void gather_row(const uint16_t* __restrict__ x, const int32_t* __restrict__ perm, int k,
                                           uint16_t* __restrict__ row) {
  for (int j = threadIdx.x * 8; j < k; j += kGatherThreads * 8) {
    uint32_t packed[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int a = j + 2 * e, b = a + 1;
      const uint32_t lo = a < k ? __ldg(x + __ldg(perm + a)) : 0;
      const uint32_t hi = b < k ? __ldg(x + __ldg(perm + b)) : 0;
      packed[e] = lo | (hi << 16);
    }
    *reinterpret_cast<uint4*>(row + j) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
  }
}

// gemm_routed: CTA c takes routing position c (pair c under pair routing) and
// copies that pair's token row in its expert's order to row `pair` of
// x_sorted. Positions and pairs the GEMM would skip (kernel.cuh,
// fill_block_row) are skipped here too: their rows are never read.
__global__ void __launch_bounds__(kGatherThreads)
    gather_routed_kernel(const __grid_constant__ RoutedParams p, uint16_t* x_sorted, int64_t row_stride) {
  dependent_grid_begin(false);
  const int64_t position = blockIdx.x;
  int64_t pair = position;
  int expert = -1;
  if (p.sorted_token_ids == nullptr) {
    if (pair < p.num_pairs) expert = pair_expert(p, pair_slot(pair, p.top_k));
  } else {
    const int64_t block = position / p.block_size;
    if (block < p.num_blocks && position < p.num_positions && position < *p.num_tokens_post_padded) {
      expert = p.expert_ids[block];
      pair = p.sorted_token_ids[position];
    }
  }
  if (expert < 0 || expert >= p.w.num_experts || pair < 0 || pair >= p.num_pairs) return;
  const auto* x = static_cast<const uint16_t*>(p.io.x) + pair_slot(pair, p.top_k).token * p.io.x_row_stride;
  gather_row(x, p.w.perm + static_cast<int64_t>(expert) * p.w.k, p.w.k, x_sorted + pair * row_stride);
}

// gemm_batched of a one-expert stack: CTA r copies row r of x.
__global__ void __launch_bounds__(kGatherThreads)
    gather_rows_kernel(const int32_t* perm, int k, const uint16_t* x, int64_t x_row_stride, uint16_t* x_sorted,
                       int64_t row_stride) {
  dependent_grid_begin(false);
  const int64_t row = blockIdx.x;
  gather_row(x + row * x_row_stride, perm, k, x_sorted + row * row_stride);
}

}  // namespace ferrum_moe_cuda::gemm

#endif  // FERRUM_MOE_CUDA_GEMM_GATHER_CUH_
