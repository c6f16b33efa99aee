// The repack kernel: one thread per 32-bit word of the tile layout
// (repack.cuh says what the word holds). Load-time only, so it favours
// obviousness over coalescing.
#include "repack.hpp"

#include <algorithm>

#include "gemm/layout.hpp"
#include "repack.cuh"

namespace ferrum_moe_cuda {
namespace {

constexpr int kRepackThreads = 256;
// Enough blocks to fill any current GPU; the loop covers the rest.
constexpr int64_t kRepackMaxBlocks = 4096;

template <int kBits>
__global__ void __launch_bounds__(kRepackThreads)
    repack_expert_kernel(const uint32_t* qweight, const int32_t* perm, int64_t k, int64_t n,
                         int k_tiles, int n_tiles, uint32_t* tiles) {
  using Tile = gemm::WeightTileLayout<kBits>;
  constexpr int kCodesPerWord = 32 / kBits;
  constexpr uint32_t kCodeMask = (1u << kBits) - 1;
  auto code_at = [&](int64_t row, int64_t column) -> uint32_t {
    if (row >= k || column >= n) return 0;
    const int64_t source_row = perm != nullptr ? perm[row] : row;
    const uint32_t word = qweight[(source_row / kCodesPerWord) * n + column];
    return (word >> (kBits * (source_row % kCodesPerWord))) & kCodeMask;
  };
  const int64_t total = static_cast<int64_t>(n_tiles) * k_tiles * Tile::kWords;
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < total;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t tile = o / Tile::kWords;
    tiles[o] = tile_word<kBits>(static_cast<int>(o % Tile::kWords), tile % k_tiles,
                                tile / k_tiles, code_at);
  }
}

}  // namespace

cudaError_t launch_repack_expert(const uint32_t* qweight, const int32_t* perm, int bits,
                                 int64_t k, int64_t n, int k_tiles, int n_tiles, uint32_t* tiles,
                                 cudaStream_t stream) {
  const int64_t words = static_cast<int64_t>(n_tiles) * k_tiles * gemm::kTileN * gemm::kTileK *
                        bits / 32;
  const int64_t blocks = std::min<int64_t>(gemm::ceil_div(words, kRepackThreads), kRepackMaxBlocks);
  if (blocks == 0) return cudaSuccess;
  if (bits == 4) {
    repack_expert_kernel<4><<<static_cast<unsigned>(blocks), kRepackThreads, 0, stream>>>(
        qweight, perm, k, n, k_tiles, n_tiles, tiles);
  } else if (bits == 8) {
    repack_expert_kernel<8><<<static_cast<unsigned>(blocks), kRepackThreads, 0, stream>>>(
        qweight, perm, k, n, k_tiles, n_tiles, tiles);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace ferrum_moe_cuda
