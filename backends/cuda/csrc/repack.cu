// The repack kernel: one thread per 32-bit word of the tile layout, which
// gathers the codes gemm::WeightTileLayout says the word holds. Load-time
// only, so it favours obviousness over coalescing.
#include "repack.hpp"

#include <algorithm>

#include "gemm/layout.hpp"

namespace ferrum_moe_cuda {
namespace {

constexpr int kRepackThreads = 256;
// Enough blocks to fill any current GPU; the loop covers the rest.
constexpr int64_t kRepackMaxBlocks = 4096;

template <int kBits>
__device__ uint32_t read_code(const uint32_t* qweight, const int32_t* perm, int64_t k, int64_t n,
                              int64_t row, int64_t column) {
  constexpr int kCodesPerWord = 32 / kBits;
  constexpr uint32_t kCodeMask = (1u << kBits) - 1;
  if (row >= k || column >= n) return 0;
  const int64_t source_row = perm != nullptr ? perm[row] : row;
  const uint32_t word = qweight[(source_row / kCodesPerWord) * n + column];
  return (word >> (kBits * (source_row % kCodesPerWord))) & kCodeMask;
}

template <int kBits>
__global__ void __launch_bounds__(kRepackThreads)
    repack_expert_kernel(const uint32_t* qweight, const int32_t* perm, int64_t k, int64_t n,
                         int k_tiles, int n_tiles, uint32_t* tiles) {
  using Tile = gemm::WeightTileLayout<kBits>;
  const int64_t total = static_cast<int64_t>(n_tiles) * k_tiles * Tile::kWords;
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < total;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int word_in_tile = static_cast<int>(o % Tile::kWords);
    const int64_t tile = o / Tile::kWords;
    const int64_t k_tile = tile % k_tiles;
    const int64_t n_tile = tile / k_tiles;
    // Inverse of uint4_index(): word_in_tile = uint4_index(warp, j, lane) * 4 + word_in_load.
    const int word_in_load = word_in_tile % 4;
    const int lane = (word_in_tile / 4) % 32;
    const int warp_load = word_in_tile / 128;
    const int j = warp_load % Tile::kLoadsPerLane;
    const int warp = warp_load / Tile::kLoadsPerLane;
    const int lane_word = 4 * j + word_in_load;

    uint32_t word = 0;
    for (int slot = 0; slot < Tile::kFragsPerWord; ++slot) {
      const int f = lane_word * Tile::kFragsPerWord + slot;
      const int64_t column = n_tile * gemm::kTileN + gemm::fragment_n(f, warp, lane);
      for (int half = 0; half < 2; ++half) {
        const int pair = Tile::pair_of_fragment(f, half);
        for (int elem = 0; elem < 2; ++elem) {
          const int64_t row = k_tile * gemm::kTileK + gemm::fragment_k(f, lane, half, elem);
          const int shift = elem == 0 ? Tile::low_code_shift(pair) : Tile::high_code_shift(pair);
          word |= read_code<kBits>(qweight, perm, k, n, row, column) << shift;
        }
      }
    }
    tiles[o] = word;
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
