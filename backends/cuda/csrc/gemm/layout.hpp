// The GEMM's tile shape and the repacked weight layout: the one place that
// says which quantized code sits in which bit of which word. The repack kernel
// (writer) and the mainloop (reader) both use these functions, so the two
// cannot drift apart. Plain constexpr math, usable from host and device.
#ifndef FERRUM_MOE_CUDA_GEMM_LAYOUT_HPP_
#define FERRUM_MOE_CUDA_GEMM_LAYOUT_HPP_

#include <cstdint>

#ifdef __CUDACC__
#define FM_HOST_DEVICE __host__ __device__
#else
#define FM_HOST_DEVICE
#endif

namespace ferrum_moe_cuda::gemm {

// mma.sync.m16n8k16: A is 16 tokens x 16 k, B is 16 k x 8 columns.
constexpr int kMmaM = 16;
constexpr int kMmaN = 8;
constexpr int kMmaK = 16;

// A mma.sync CTA computes (8, 16, 32 or 64 tokens) x kTileN columns,
// streaming K in kTileK slices. 4 warps split the columns, 32 each, and all of
// them walk the same K slice, so one A tile in shared memory feeds every warp
// (the wgmma tiles: two warpgroups of kTileN columns each, CtaTile below).
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kWarpN = 32;
constexpr int kTileN = kWarps * kWarpN;  // 128
constexpr int kTileK = 64;
constexpr int kKSteps = kTileK / kMmaK;     // 4 mma k-steps per K slice
constexpr int kNFrags = kWarpN / kMmaN;     // 4 n8 fragments per warp
constexpr int kFragsPerWarp = kKSteps * kNFrags;  // 16 B fragments per warp per K slice

// Rows of A one CTA multiplies: 8 tokens (the weights as the MMA's 16-row
// operand, the tokens as its 8 columns: decode), 1, 2 or 4 mma tiles of 16
// tokens, or 32, 64 or 128 tokens in the Hopper warpgroups' wgmma tiles
// (compute capability 9.0 only).
constexpr int kTinyRowsPerCta = 8;
// Whether a tile of `rows` rows swaps mma.sync's operands (the 8-row tiles).
FM_HOST_DEVICE constexpr bool swaps_mma_operands(int rows) { return rows == kTinyRowsPerCta; }
constexpr int kSmallRowsPerCta = 16;
constexpr int kMediumRowsPerCta = 32;
constexpr int kLargeRowsPerCta = 64;
constexpr int kWgmmaRowsPerCta = 128;
// A wgmma CTA runs one warpgroup per 128-column tile on two adjacent tiles,
// so the host counts its column tiles in pairs.
constexpr int kWgmmaColumnTilesPerCta = 2;

// The CTA tile a launch runs: its token rows, and whether it is the
// warp-specialised wgmma tile (sm_90a builds on compute capability 9.0: 128
// rows always, and 64 and 32 on the same machinery, kernel notes "v77",
// "v78") or the mma.sync one (8 to 64 rows).
struct CtaTile {
  int rows;
  bool wgmma;
};
constexpr CtaTile kCtaTiles[] = {{kTinyRowsPerCta, false},   {kSmallRowsPerCta, false}, {kMediumRowsPerCta, false},
                                 {kLargeRowsPerCta, false},  {kMediumRowsPerCta, true}, {kLargeRowsPerCta, true},
                                 {kWgmmaRowsPerCta, true}};
constexpr int kNumCtaTiles = sizeof(kCtaTiles) / sizeof(kCtaTiles[0]);
// A tile's place in kCtaTiles (the host names only the tiles listed there).
constexpr int cta_tile_index(CtaTile tile) {
  int i = 0;
  while (i + 1 < kNumCtaTiles && (kCtaTiles[i].rows != tile.rows || kCtaTiles[i].wgmma != tile.wgmma)) ++i;
  return i;
}

// Each lane holds 4 codes of every B fragment (k = 2t, 2t+1, 2t+8, 2t+9 for
// t = lane % 4, column = lane / 4), so a warp's K slice is 16 fragments x 4
// codes per lane. The repack stores them so a lane fetches exactly its own
// codes with 16-byte loads, consecutive lanes at consecutive addresses
// (coalesced), and never needs a shuffle.
template <int kBits>
struct WeightTileLayout {
  static_assert(kBits == 4 || kBits == 8, "INT4 or INT8 codes");
  static constexpr int kCodesPerFragLane = 4;
  static constexpr int kWordsPerLane = kFragsPerWarp * kCodesPerFragLane * kBits / 32;  // 8 | 16
  static constexpr int kLoadsPerLane = kWordsPerLane / 4;  // 16-byte loads per lane: 2 | 4
  static constexpr int kFragsPerWord = 32 / (kCodesPerFragLane * kBits);  // 2 | 1
  static constexpr int kBytes = kTileN * kTileK * kBits / 8;  // 4 KiB | 8 KiB per tile
  static constexpr int kWords = kBytes / 4;
  static constexpr int kUint4s = kBytes / 16;

  // Index (in 16-byte units within a tile) of a lane's load `j`: warp-major,
  // then load, then lane, so each load of a warp is 512 contiguous bytes.
  static FM_HOST_DEVICE constexpr int uint4_index(int warp, int j, int lane) {
    return (warp * kLoadsPerLane + j) * 32 + lane;
  }

  // Lane-local word `w` (0 .. kWordsPerLane) holds fragments
  // w * kFragsPerWord ..; fragment f covers k-step f / kNFrags, n8 block f % kNFrags.
  static FM_HOST_DEVICE constexpr int word_of_fragment(int f) { return f / kFragsPerWord; }

  // A word holds pairs of codes, one pair per B register (`half` 0: k = 2t, 2t+1;
  // half 1: k = 2t+8, 2t+9). Pair p keeps its lower-k code at bit kBits * p and
  // its higher-k code at bit kBits * p + 16, so one shift and one AND leave both
  // codes in the low bits of the two 16-bit halves: the half2 the MMA wants.
  // INT4 interleaves nibbles (0,4) (1,5) (2,6) (3,7); INT8 bytes (0,2) (1,3).
  static FM_HOST_DEVICE constexpr int pair_of_fragment(int f, int half) {
    return (f % kFragsPerWord) * 2 + half;
  }
  static FM_HOST_DEVICE constexpr int low_code_shift(int pair) { return kBits * pair; }
  static FM_HOST_DEVICE constexpr int high_code_shift(int pair) { return kBits * pair + 16; }
};

// Row (k) and column (n) inside the tile of the code a lane holds for
// fragment f, register half `half`, element `elem` (0 = lower k).
FM_HOST_DEVICE constexpr int fragment_k(int f, int lane, int half, int elem) {
  return (f / kNFrags) * kMmaK + 2 * (lane % 4) + 8 * half + elem;
}
FM_HOST_DEVICE constexpr int fragment_n(int f, int warp, int lane) {
  return warp * kWarpN + (f % kNFrags) * kMmaN + lane / 4;
}

inline FM_HOST_DEVICE constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace ferrum_moe_cuda::gemm

#endif  // FERRUM_MOE_CUDA_GEMM_LAYOUT_HPP_
