// Compile-time shape of one GEMM specialisation, and the per-CTA row table
// the kernels fill before the mainloop runs.
#ifndef FERRUM_MOE_CUDA_GEMM_TRAITS_CUH_
#define FERRUM_MOE_CUDA_GEMM_TRAITS_CUH_

#include <cstdint>

#include "gemm/layout.hpp"

namespace ferrum_moe_cuda::gemm {

// Shared memory a CTA may hold on sm_90 (static and dynamic together), and
// what the kernels' static barriers and row tables take of it (kernel.cuh,
// with room to spare).
constexpr int kMaxSmemPerCta = 227 * 1024;
constexpr int kStaticSmemReserve = 8 * 1024;

// kWgmmaTile: the warp-specialised wgmma tile of kTileRows tokens (128, 64 or
// 32 on Hopper: the host's CudaStack::tile_for), else the mma.sync tile.
template <class T, int kBits, int kTileRows, bool kWgmmaTile = kTileRows == kWgmmaRowsPerCta>
struct GemmTraits {
  static_assert(sizeof(T) == 2, "fp16 or bf16 activations");
  static_assert(kWgmmaTile == (kTileRows == kWgmmaRowsPerCta) ||
                    (kWgmmaTile && (kTileRows == kLargeRowsPerCta || kTileRows == kMediumRowsPerCta)),
                "wgmma tiles of 128, 64 or 32 rows; 128 rows only on wgmma");
  using Tile = WeightTileLayout<kBits>;

  static constexpr int kRows = kTileRows;
  static constexpr bool kWgmma = kWgmmaTile;
  // The 8-row tiles swap the MMA's operands: the dequantized weights are its
  // 16-row A operand (16 columns), the tokens its 8 B columns (mainloop.cuh).
  static constexpr bool kSwapped = swaps_mma_operands(kRows);
  // The wgmma tiles run two warpgroups of 4 warps, each on its own 128
  // columns, both on one token tile: the token copy per FLOP halves.
  static constexpr int kWarpgroups = kWgmma ? kWgmmaColumnTilesPerCta : 1;
  // The wgmma tiles are warp-specialised: a third warpgroup (the first 128
  // threads) only copies, the two computing ones only dequantize and issue
  // wgmma (mainloop.cuh). The other tiles copy with all their threads.
  static constexpr bool kWarpSpecialized = kWgmma;
  static constexpr int kProducerThreads = kWarpSpecialized ? kThreads : 0;
  static constexpr int kCtaThreads = kProducerThreads + kWarpgroups * kThreads;
  static constexpr int kCopyThreads = kWarpSpecialized ? kProducerThreads : kCtaThreads;
  // 4 stages: three K slices in flight while the fourth is computed, enough
  // to cover global-memory latency at this tile size.
  // The wgmma tiles keep one stage more: a stage is released only once the
  // wgmma reading it has retired, a k-step into the next slice (mainloop.cuh,
  // PipelineBarriers). (Their registers allow one CTA per SM.)
  static constexpr int kStages = kWgmma ? 5 : 4;

  // A tile in shared memory: kRows rows of kTileK elements (128 bytes), stored
  // as 16-byte chunks XOR-swizzled by row % 8 so the 8 row addresses of one
  // ldmatrix phase hit 8 different bank groups.
  static constexpr int kARowBytes = kTileK * static_cast<int>(sizeof(T));
  static constexpr int kAChunksPerRow = kARowBytes / 16;
  static constexpr int kAStageBytes = kRows * kARowBytes;
  // Threads that copy A chunks: all of them, but only the first 64 of the
  // 8-row tiles (one chunk each).
  static constexpr int kACopyThreads = kRows * kAChunksPerRow < kCopyThreads ? kRows * kAChunksPerRow : kCopyThreads;
  static constexpr int kAChunksPerThread = kRows * kAChunksPerRow / kACopyThreads;
  static_assert(kAChunksPerRow == 8, "the swizzle assumes 8 chunks per row");
  static_assert(kAChunksPerThread * kACopyThreads == kRows * kAChunksPerRow, "even A split");

  static constexpr int kBStageBytes = Tile::kBytes * kWarpgroups;
  // wgmma reads the A tile through a 128-byte-swizzle descriptor, whose
  // pattern is anchored at 1024-byte boundaries: the stages start aligned
  // (the dynamic shared memory base is rounded up, hence the slack); the
  // mma.sync tiles need 16 bytes.
  static constexpr int kSmemAlignment = kWgmma ? 1024 : 16;
  // Warp-specialised tiles: next to each slice, its group's scales (fp16/bf16
  // bits) and zero codes for both weight tiles, copied by the producer, so
  // the computing warps never wait on global memory (kernel notes, v19).
  static constexpr int kQuantStageBytes = kWarpSpecialized ? kWarpgroups * kTileN * 3 : 0;
  // Warp-specialised tiles: each computing warpgroup's results, converted to
  // the compute dtype, pass through their own kRows x kTileN area on the way
  // out (epilogue.cuh, store_results_staged), apart from the stages that the
  // producer is already filling with the next tile's slices.
  // Only where it fits: the 8-bit tiles' stages (twice the weight bytes) leave
  // no room, and they keep store_results.
  static constexpr int kStagingOffset = kStages * (kAStageBytes + kBStageBytes + kQuantStageBytes);
  static constexpr int kFullStagingBytes = kWarpgroups * kRows * kTileN * static_cast<int>(sizeof(T));
  static constexpr bool kStagedStores =
      kWarpSpecialized && kStagingOffset + kFullStagingBytes + kSmemAlignment + kStaticSmemReserve <= kMaxSmemPerCta;
  static constexpr int kStagingBytes = kStagedStores ? kFullStagingBytes : 0;
  static constexpr int kSmemBytes = kStagingOffset + kStagingBytes + kSmemAlignment;
  static_assert(kSmemBytes + kStaticSmemReserve <= kMaxSmemPerCta, "a CTA's shared memory past sm_90's limit");

  static __device__ __forceinline__ int a_offset(int row, int chunk) {
    return row * kARowBytes + ((chunk ^ (row % 8)) * 16);
  }
};

// A thread's fp32 accumulators of the CTA's kRows x kTileN tile, seen as one
// flat array (the mainloop keeps them as float[kRows / 16][kNFrags][4] for
// mma.sync, float[2][4] for the 8-row tiles' swapped mma.sync, or
// float[2][kRows / 2] for wgmma, all contiguous): register r sits at row(r),
// column(r) of the tile. The epilogue and the stream-K reduction walk this,
// so they serve every instruction.
template <int kRows, bool kWgmma>
struct AccumulatorLayout {
  static constexpr int kCount = kRows * kTileN / kThreads;  // per warpgroup's 128 columns
  using Flat = float[kCount];

  // mma.m16n8k16 C fragments: (mt, nt, i) -> row mt*16 + lane/4 (+8 for
  // i >= 2), column warp*32 + nt*8 + 2*(lane%4) + i%2.
  // Swapped (8 rows; the D rows are weight columns): [h][i] -> token row
  // 2*(lane%4) + i%2, column warp*32 + h*16 + lane/4 (+8 for i >= 2).
  // wgmma m64nN D (rows = weight columns): [h][4j + e] -> token row
  // 8j + 2*(lane%4) + e%2, column warp*32 + h*16 + lane/4 (+8 for e >= 2).
  static constexpr bool kSwapped = swaps_mma_operands(kRows);
  static __device__ __forceinline__ int row(int r, int lane) {
    if constexpr (kSwapped) {
      return 2 * (lane % 4) + r % 2;
    } else if constexpr (kWgmma) {
      const int e = r % 4, j = (r % (kRows / 2)) / 4;
      return 8 * j + 2 * (lane % 4) + e % 2;
    } else {
      const int i = r % 4, mt = r / (4 * kNFrags);
      return mt * kMmaM + lane / 4 + (i / 2) * 8;
    }
  }
  static __device__ __forceinline__ int column(int r, int warp, int lane) {
    if constexpr (kSwapped) {
      return warp * kWarpN + (r / 4) * 16 + lane / 4 + ((r % 4) / 2) * 8;
    } else if constexpr (kWgmma) {
      const int e = r % 4, h = r / (kRows / 2);
      return warp * kWarpN + h * 16 + lane / 4 + (e / 2) * 8;
    } else {
      const int i = r % 4, nt = (r / 4) % kNFrags;
      return warp * kWarpN + nt * kMmaN + 2 * (lane % 4) + i % 2;
    }
  }
};

// Where each of a CTA's rows comes from and goes to; -1 marks an unused row
// (its A row may hold anything: its results are neither stored nor reduced).
template <int kRows>
struct RowTable {
  int64_t x_offset[kRows];  // element offset of the row in x
  int64_t out_row[kRows];
  float weight[kRows];      // router weight folded into the epilogue (1 if none)
};

}  // namespace ferrum_moe_cuda::gemm

#endif  // FERRUM_MOE_CUDA_GEMM_TRAITS_CUH_
