// The two GEMM entry points. They differ only in where a CTA's rows come from
// (a dispatch row range, or the routed sorted_token_ids of one block); both
// fill a RowTable, then share the mainloop and the epilogue.
#ifndef FERRUM_MOE_CUDA_GEMM_KERNEL_CUH_
#define FERRUM_MOE_CUDA_GEMM_KERNEL_CUH_

#include <cstdint>

#include "gemm/epilogue.cuh"
#include "gemm/layout.hpp"
#include "gemm/mainloop.cuh"
#include "gemm/params.hpp"
#include "gemm/split_k.cuh"
#include "gemm/traits.cuh"

namespace ferrum_moe_cuda::gemm {

template <class T, int kBits, int kMTiles>
__device__ __forceinline__ void gemm_cta(const QuantWeights& w, const GemmIO& io, const SplitK& split,
                                         const RowTable<kMTiles * kMmaM>& rows, int expert,
                                         int n_tile) {
  extern __shared__ uint4 smem[];
  typename Mainloop<T, kBits, kMTiles>::Accumulators acc;
  const int kt_begin = static_cast<int>(blockIdx.z) * split.k_tiles_per_split;
  const int kt_end = min(w.k_tiles, kt_begin + split.k_tiles_per_split);
  Mainloop<T, kBits, kMTiles>(w, io, rows, expert, n_tile, reinterpret_cast<uint8_t*>(smem))
      .run(acc, kt_begin, kt_end);
  if constexpr (kMTiles * kMmaM == kSmallRowsPerCta) {
    if (gridDim.z > 1 && !reduce_split_k<kMTiles>(split, rows, acc)) return;
  }
  store_results<T, kMTiles>(io, rows, n_tile, acc);
}

// grid = (work items, n tiles of the column window, splits).
template <class T, int kBits, int kMTiles>
__global__ void __launch_bounds__(kThreads)
    gemm_batched_kernel(const __grid_constant__ BatchedParams p) {
  constexpr int kRows = kMTiles * kMmaM;
  __shared__ RowTable<kRows> rows;
  const BatchedWorkItem& item = p.items[blockIdx.x];
  if (threadIdx.x < kRows) {
    const int r = threadIdx.x;
    const bool used = r < item.rows;
    rows.x_offset[r] = used ? (item.x_row + r) * p.io.x_row_stride : -1;
    rows.out_row[r] = used ? item.out_row + r : -1;
    rows.weight[r] = 1.0f;
  }
  __syncthreads();
  gemm_cta<T, kBits, kMTiles>(p.w, p.io, p.split, rows, item.expert, p.first_n_tile + blockIdx.y);
}

// grid = (dispatches x chunks per dispatch, n tiles, splits). The table lives
// in device memory the host never read: a row whose expert, rows or m are out
// of range is skipped, compared without forming sums that could overflow.
template <class T, int kBits, int kMTiles>
__global__ void __launch_bounds__(kThreads)
    gemm_device_dispatch_kernel(const __grid_constant__ DeviceDispatchParams p) {
  constexpr int kRows = kMTiles * kMmaM;
  __shared__ RowTable<kRows> rows;
  const int64_t d = blockIdx.x / p.chunks_per_dispatch;
  const int64_t first = static_cast<int64_t>(blockIdx.x % p.chunks_per_dispatch) * kRows;
  int64_t field[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    field[c] = p.table_int64 ? static_cast<const int64_t*>(p.table)[4 * d + c]
                             : static_cast<const int32_t*>(p.table)[4 * d + c];
  }
  const int64_t expert = field[0], in_row = field[1], out_row = field[2], m = field[3];
  const bool valid = expert >= 0 && expert < p.w.num_experts && m > 0 && in_row >= 0 &&
                     in_row <= p.x_rows && m <= p.x_rows - in_row && out_row >= 0 &&
                     out_row <= p.out_rows && m <= p.out_rows - out_row;
  if (!valid || first >= m) return;  // the same for every split of this tile
  if (threadIdx.x < kRows) {
    const int64_t r = first + threadIdx.x;
    const bool used = r < m;
    rows.x_offset[threadIdx.x] = used ? (in_row + r) * p.io.x_row_stride : -1;
    rows.out_row[threadIdx.x] = used ? out_row + r : -1;
    rows.weight[threadIdx.x] = 1.0f;
  }
  __syncthreads();
  gemm_cta<T, kBits, kMTiles>(p.w, p.io, p.split, rows, static_cast<int>(expert), p.first_n_tile + blockIdx.y);
}

// grid = (routing blocks x chunks per block, n tiles, splits). Every index read from
// device memory is range-checked before use: the host never saw these arrays.
template <class T, int kBits, int kMTiles>
__global__ void __launch_bounds__(kThreads)
    gemm_routed_kernel(const __grid_constant__ RoutedParams p) {
  constexpr int kRows = kMTiles * kMmaM;
  __shared__ RowTable<kRows> rows;
  const int64_t block = blockIdx.x / p.chunks_per_block;
  const int64_t chunk = blockIdx.x % p.chunks_per_block;
  const int64_t block_start = block * p.block_size;
  const int64_t padded_tokens = *p.num_tokens_post_padded;
  if (block_start >= padded_tokens) return;  // the grid covers the worst case
  const int32_t expert = p.expert_ids[block];
  if (expert < 0 || expert >= p.w.num_experts) return;

  bool used = false;
  if (threadIdx.x < kRows) {
    const int r = threadIdx.x;
    const int64_t in_block = chunk * kRows + r;
    const int64_t position = block_start + in_block;
    int64_t id = -1;
    if (in_block < p.block_size && position < p.num_positions && position < padded_tokens)
      id = p.sorted_token_ids[position];
    used = id >= 0 && id < p.num_pairs;
    const int64_t token = used ? id / p.top_k : 0;
    rows.x_offset[r] = used ? token * p.io.x_row_stride : -1;
    rows.out_row[r] = used ? id : -1;
    rows.weight[r] = used && p.topk_weights != nullptr
                         ? p.topk_weights[token * p.topk_weights_stride0 +
                                          (id % p.top_k) * p.topk_weights_stride1]
                         : 1.0f;
  }
  // Padding-only chunks (all sentinels) do no work.
  if (!__syncthreads_or(used)) return;
  gemm_cta<T, kBits, kMTiles>(p.w, p.io, p.split, rows, expert, blockIdx.y);
}

}  // namespace ferrum_moe_cuda::gemm

#endif  // FERRUM_MOE_CUDA_GEMM_KERNEL_CUH_
