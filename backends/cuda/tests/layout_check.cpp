// Host-only check that the repack writer (tile_word) and the mainloop's reader
// agree, and that every lane reads the B-fragment elements the PTX ISA assigns
// to it for mma.m16n8k16 (b0: k = 2 * (lane % 4) + {0, 1}, b1: k + 8;
// column = lane / 4). Needs no GPU: build with -DFERRUM_MOE_CUDA_BUILD_TESTS=ON
// and run ctest.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "gemm/layout.hpp"
#include "repack.cuh"

namespace {

using namespace ferrum_moe_cuda;
using namespace ferrum_moe_cuda::gemm;

template <int kBits>
int check_layout() {
  using Tile = WeightTileLayout<kBits>;
  // Deliberately ragged: K and N are not tile multiples, so padding is read too.
  constexpr int kK = 3 * kTileK - 5;
  constexpr int kN = 2 * kTileN - 7;
  constexpr int kKTiles = 3;
  constexpr int kNTiles = 2;
  constexpr uint32_t kPairMask = kBits == 4 ? 0x000F000Fu : 0x00FF00FFu;

  std::mt19937 rng(kBits);
  std::vector<uint32_t> codes(kK * kN);
  for (auto& c : codes) c = rng() & ((1u << kBits) - 1);
  auto code_at = [&](int64_t row, int64_t column) -> uint32_t {
    return row < kK && column < kN ? codes[row * kN + column] : 0;
  };

  std::vector<uint32_t> tiles(static_cast<size_t>(kNTiles) * kKTiles * Tile::kWords);
  for (size_t o = 0; o < tiles.size(); ++o) {
    const int64_t tile = static_cast<int64_t>(o / Tile::kWords);
    tiles[o] = tile_word<kBits>(static_cast<int>(o % Tile::kWords), tile % kKTiles, tile / kKTiles,
                                code_at);
  }

  int errors = 0;
  int64_t checked = 0;
  for (int n_tile = 0; n_tile < kNTiles; ++n_tile) {
    for (int k_tile = 0; k_tile < kKTiles; ++k_tile) {
      const uint32_t* tile = tiles.data() + (static_cast<size_t>(n_tile) * kKTiles + k_tile) * Tile::kWords;
      for (int warp = 0; warp < kWarps; ++warp) {
        for (int lane = 0; lane < 32; ++lane) {
          uint32_t words[Tile::kWordsPerLane];
          for (int j = 0; j < Tile::kLoadsPerLane; ++j)
            for (int w = 0; w < 4; ++w) words[4 * j + w] = tile[Tile::uint4_index(warp, j, lane) * 4 + w];
          for (int f = 0; f < kFragsPerWarp; ++f) {
            for (int half = 0; half < 2; ++half) {
              const uint32_t pair =
                  (words[Tile::word_of_fragment(f)] >> (kBits * Tile::pair_of_fragment(f, half))) & kPairMask;
              for (int elem = 0; elem < 2; ++elem) {
                const uint32_t got = elem == 0 ? pair & 0xFFFFu : pair >> 16;
                const int k = k_tile * kTileK + (f / kNFrags) * kMmaK + 2 * (lane % 4) + 8 * half + elem;
                const int n = n_tile * kTileN + warp * kWarpN + (f % kNFrags) * kMmaN + lane / 4;
                ++checked;
                if (got != code_at(k, n) && errors++ < 5)
                  std::printf("INT%d: k %d n %d holds %u, expected %u\n", kBits, k, n, got, code_at(k, n));
              }
            }
          }
        }
      }
    }
  }
  const int64_t expected = static_cast<int64_t>(kNTiles) * kKTiles * kTileK * kTileN;
  if (checked != expected) {
    std::printf("INT%d: read %lld codes, expected %lld\n", kBits, static_cast<long long>(checked),
                static_cast<long long>(expected));
    ++errors;
  }
  std::printf("INT%d layout: %s\n", kBits, errors == 0 ? "ok" : "FAILED");
  return errors;
}

}  // namespace

int main() { return check_layout<4>() + check_layout<8>() == 0 ? 0 : 1; }
