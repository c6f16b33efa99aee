// The content of one 32-bit word of the tile layout, as a host/device
// function: the repack kernel writes it, and a host test can check it against
// the mma fragment layout without a GPU.
#ifndef FERRUM_MOE_CUDA_REPACK_CUH_
#define FERRUM_MOE_CUDA_REPACK_CUH_

#include <cstdint>

#include "gemm/layout.hpp"

namespace ferrum_moe_cuda {

// Word `word_in_tile` of tile (k_tile, n_tile); code_at(row, column) returns
// the code of weight row `row`, column `column` of the expert (0 when padding).
template <int kBits, class CodeAt>
FM_HOST_DEVICE uint32_t tile_word(int word_in_tile, int64_t k_tile, int64_t n_tile,
                                  const CodeAt& code_at) {
  using Tile = gemm::WeightTileLayout<kBits>;
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
        word |= code_at(row, column) << shift;
      }
    }
  }
  return word;
}

}  // namespace ferrum_moe_cuda

#endif  // FERRUM_MOE_CUDA_REPACK_CUH_
