// Host-only check of the split-K plan (gemm/params.hpp, stream_k_ctas;
// wgmma_tiles_fill for the 128-row tiles, small_wgmma_tiles_keep for the
// 32-row ones; gemv_reads_x_through_perm) that the host's launches and the
// routed kernel's re-plan share: its invariants over a
// sweep of tile counts, K lengths and waves, and the plans the H200
// measurements chose (kernel notes, v26). Needs no GPU: build with
// -DFERRUM_MOE_CUDA_BUILD_TESTS=ON and run ctest.
#include <cstdint>
#include <cstdio>

#include "gemm/params.hpp"

namespace {

using ferrum_moe_cuda::gemm::gemv_chunk_slices;
using ferrum_moe_cuda::gemm::gemv_reads_x_through_perm;
using ferrum_moe_cuda::gemm::gemv_slots;
using ferrum_moe_cuda::gemm::gemv_takes_items;
using ferrum_moe_cuda::gemm::kLargeRowsPerCta;
using ferrum_moe_cuda::gemm::kMediumRowsPerCta;
using ferrum_moe_cuda::gemm::kStreamKMinSlices;
using ferrum_moe_cuda::gemm::kTinyRowsPerCta;
using ferrum_moe_cuda::gemm::kWgmmaRowsPerCta;
using ferrum_moe_cuda::gemm::small_wgmma_tiles_keep;
using ferrum_moe_cuda::gemm::stream_k_ctas;
using ferrum_moe_cuda::gemm::stream_k_slots;
using ferrum_moe_cuda::gemm::wgmma_tiles_fill;

int errors = 0;

void expect(bool ok, const char* what, int64_t tiles, int64_t k_tiles, int64_t wave, int64_t got) {
  if (ok) return;
  if (errors++ < 10)
    std::printf("stream_k_ctas(%lld, %lld, %lld) = %lld: %s\n", static_cast<long long>(tiles),
                static_cast<long long>(k_tiles), static_cast<long long>(wave), static_cast<long long>(got), what);
}

void check_invariants(int64_t tiles, int64_t k_tiles, int64_t wave) {
  const int64_t ctas = stream_k_ctas(tiles, k_tiles, wave);
  expect(ctas >= 1, "at least one CTA", tiles, k_tiles, wave, ctas);
  if (tiles >= wave) {
    expect(ctas == tiles, "a wave or more of tiles: one CTA per tile", tiles, k_tiles, wave, ctas);
    return;
  }
  expect(ctas <= wave, "at most a wave when the tiles are fewer", tiles, k_tiles, wave, ctas);
  if (ctas % tiles == 0 && ctas > tiles) {
    expect(k_tiles / (ctas / tiles) >= kStreamKMinSlices, "aligned splits of at least kStreamKMinSlices slices",
           tiles, k_tiles, wave, ctas);
  }
  if (ctas % tiles != 0) {
    expect(ctas == 1 || tiles * k_tiles / ctas >= kStreamKMinSlices || tiles * k_tiles < kStreamKMinSlices,
           "stream-K shares of at least kStreamKMinSlices slices", tiles, k_tiles, wave, ctas);
  }
}

// `layer` names the plan the H200 measured best (`expected` CTAs).
void check_plan(int64_t tiles, int64_t k_tiles, int64_t wave, int64_t expected, const char* layer) {
  const int64_t ctas = stream_k_ctas(tiles, k_tiles, wave);
  expect(ctas == expected, layer, tiles, k_tiles, wave, ctas);
}

}  // namespace

int main() {
  int64_t cases = 0;
  for (int64_t tiles = 1; tiles <= 1100; tiles += tiles < 64 ? 1 : 7) {
    for (int64_t k_tiles : {1, 2, 3, 4, 5, 8, 12, 22, 32, 64, 112, 224, 448}) {
      for (int64_t wave : {1, 132, 264, 396, 512, 528, 660, 896}) {
        check_invariants(tiles, k_tiles, wave);
        ++cases;
      }
    }
  }
  // Plans the H200 measured best (2026-12-04, 8-row tiles, 4 CTAs per SM).
  check_plan(448, 12, 512, 448, "Qwen3-30B-A3B M = 4 w2, 448 live tiles on a 512-CTA grid: one piece each");
  check_plan(64, 224, 512, 512, "Mixtral M = 2 w2, 64 live tiles: 8 aligned splits");
  check_plan(448, 64, 528, 528, "Mixtral M = 1 w13: stream-K over the wave");
  check_plan(96, 32, 528, 480, "Qwen3-30B-A3B M = 1 w13: 5 aligned splits");
  check_plan(768, 32, 528, 768, "Qwen3-30B-A3B M = 8 w13: a wave or more, one CTA per tile");
  // The 128-row (wgmma) tiles, one CTA per SM of 132 (kernel notes, v43): the
  // workspace's slots, which launches keep them, and their splits.
  expect(stream_k_slots({kTinyRowsPerCta, false}) == 1024 && stream_k_slots({kLargeRowsPerCta, false}) == 128 &&
             stream_k_slots({kMediumRowsPerCta, true}) == 128 && stream_k_slots({kLargeRowsPerCta, true}) == 64 &&
             stream_k_slots({kWgmmaRowsPerCta, true}) == 32,
         "4 MiB of slots: 1,024 of 8 x 128, 128 of 64 x 128, 128 of 32 x 256, 64 of 64 x 256, 32 of 128 x 256", 0, 0, 0,
         stream_k_slots({kWgmmaRowsPerCta, true}));
  check_plan(16, 112, 132, 128, "Linear 7168 x 2048 M = 256: 8 aligned splits of 14 slices");
  check_plan(32, 224, 132, 128, "Linear 14336 x 4096 M = 256: 4 aligned splits of 56 slices");
  check_plan(16, 64, 132, 128, "the split test's 256 x 4096 x 2048: 8 aligned splits of 8 slices");
  check_plan(27, 97, 132, 132, "the stream-K test's 300 x 6208 x 2304: ranges cross tiles");
  expect(wgmma_tiles_fill(16, 112, 132) && wgmma_tiles_fill(32, 224, 132) && wgmma_tiles_fill(128, 64, 132),
         "128-row tiles kept where they fill the SMs, split or not", 16, 112, 132, 0);
  expect(!wgmma_tiles_fill(16, 12, 132), "16 tiles of 12 slices: 48 CTAs, the 64-row tiles take it", 16, 12, 132, 0);
  expect(!wgmma_tiles_fill(64, 112, 132), "64 tiles, past the slots: unshared, the 64-row tiles take it", 64, 112,
         132, 0);
  // The 32-row wgmma tiles over short grids only (kernel notes, v80): the
  // small layers' M = 256 keep them, DeepSeek-V3 M = 1024 takes mma.sync.
  expect(small_wgmma_tiles_keep(192 * 6, 132) && small_wgmma_tiles_keep(112 * 11, 132),
         "Qwen3-30B-A3B and DeepSeek-V2-Lite M = 256 (7-12 tiles an SM) keep the 32-row wgmma tiles", 192 * 6, 0, 132,
         0);
  expect(small_wgmma_tiles_keep(24 * 132, 132) && !small_wgmma_tiles_keep(24 * 132 + 1, 132),
         "the rule's edge: 24 tiles an SM", 24 * 132, 0, 132, 0);
  expect(!small_wgmma_tiles_keep(512 * 16, 132) && !small_wgmma_tiles_keep(512 * 28, 132),
         "DeepSeek-V3 M = 1024 (62-109 tiles an SM) takes the 32-row mma.sync tiles", 512 * 16, 0, 132, 0);
  expect(!small_wgmma_tiles_keep(63 * 66, 132), "the mid-M test's long grid (63 blocks x 66 pairs) takes mma.sync",
         63 * 66, 0, 132, 0);
  // The one-row GEMV's act-order read (kernel notes, "v80, v81 and v81b measured"): waves x
  // rounds of the launches measured.
  expect(gemv_chunk_slices(4) == 4 && gemv_chunk_slices(8) == 2, "a GEMV round: 4 INT4 slices, 2 INT8 ones", 0, 0, 0,
         gemv_chunk_slices(4));
  expect(gemv_reads_x_through_perm(1, 1) && gemv_reads_x_through_perm(2, 1),
         "Qwen3-30B-A3B at one token (1 x 1, 2 x 1): read through perm", 0, 0, 0, 0);
  expect(!gemv_reads_x_through_perm(3, 1) && !gemv_reads_x_through_perm(8, 1) && !gemv_reads_x_through_perm(4, 2) &&
             !gemv_reads_x_through_perm(1, 7),
         "Qwen3-30B-A3B at four tokens, Mixtral at one: the sorted copy", 0, 0, 0, 0);
  // The GEMV's slots of a window: from the one holding its first column to the
  // one holding its last.
  expect(gemv_slots(0, 384) == 12 && gemv_slots(8, 429) == 14 && gemv_slots(32, 32) == 1 && gemv_slots(31, 2) == 2,
         "a window's 32-column slots", 0, 0, 0, gemv_slots(8, 429));
  // gemm_batched on the GEMV (kernel notes, v82): the dense Linear's measured launches on 132 SMs
  // at 2 CTAs an SM.
  expect(gemv_takes_items(1, 448, 2, 132) && gemv_takes_items(8, 896, 4, 132) && gemv_takes_items(4, 128, 1, 132),
         "M = 1-8 on 448, 896 and 128 CTAs: the GEMV", 1, 448, 132, 0);
  expect(!gemv_takes_items(8, 64, 1, 132), "M = 1-8 on 64 CTAs (half the SMs): the tiles", 8, 64, 132, 0);
  expect(gemv_takes_items(16, 256, 1, 132) && gemv_takes_items(12, 128, 1, 132),
         "M = 12-16 in one wave: the GEMV", 16, 256, 132, 0);
  expect(!gemv_takes_items(16, 896, 4, 132) && !gemv_takes_items(12, 1792, 7, 132) && !gemv_takes_items(17, 128, 1, 132),
         "M = 12-16 over several waves, and M = 17: the tiles", 16, 896, 132, 0);
  expect(!gemv_takes_items(1, 7 * 132 + 1, 4, 132), "more than kGemvMaxCtasPerSm an SM: the tiles", 1, 7 * 132 + 1, 132, 0);
  std::printf("schedule: %lld plans checked: %s\n", static_cast<long long>(cases), errors == 0 ? "ok" : "FAILED");
  return errors == 0 ? 0 : 1;
}
