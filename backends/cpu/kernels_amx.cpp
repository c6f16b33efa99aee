// The bfloat16 tile kernel on AMX (Intel Sapphire Rapids and later).
//
// NEVER RUN ON HARDWARE: the machines this was written on have no AMX (AMD
// Zen 5, 2026-12). It is selected only where CPUID, XCR0 and Linux's
// ARCH_REQ_XCOMP_PERM all grant AMX. Its addressing is checked against the
// AVX512-BF16 kernel with the tile instructions emulated in C++
// (tests/native/amx_check.cpp); the tile configuration and the instructions
// themselves are not. Everything around the tile multiply is the AVX512-BF16
// code: the same expanded tile (bf16 pairs 128 + q, [pair][64], which is AMX's
// B layout with a 256-byte row stride), the same packed activations (rows
// padded to 16 with zeros: KernelPath::row_align) and the same per-unit scale
// epilogue, applied to the C tiles stored to memory.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "kernels.hpp"

namespace ferrum::cpu::amx {
namespace {

#include "vec_avx512.inc"

}  // namespace

#include "kernels_common.inc"

namespace {

#include "bf16_codes.inc"

// Tiles 0-3: C (16 rows x 16 floats); 4-5: A (16 rows x 32 bf16); 6-7: B (16
// pairs x 16 columns). A register block is 32 rows x 32 columns.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void configure() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.colsb[i] = 64, cfg.rows[i] = 16;
  _tile_loadconfig(&cfg);
}

// c[32][32] = a[rows (16 or 32)][pairs] x tile[pairs][32 columns].
template <bool kTwoSlabs>
void multiply(const uint16_t* a, int64_t lda, const uint32_t* tile, int64_t pairs, float* c) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (kTwoSlabs) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t kp = 0; kp < pairs; kp += 16) {
    _tile_loadd(4, a + 2 * kp, lda * 2);
    _tile_loadd(6, tile + kp * kBlockCols, kBlockCols * 4);
    _tile_loadd(7, tile + kp * kBlockCols + kLanes, kBlockCols * 4);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (kTwoSlabs) {
      _tile_loadd(5, a + 16 * lda + 2 * kp, lda * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, 32 * 4);
  _tile_stored(1, c + kLanes, 32 * 4);
  if constexpr (kTwoSlabs) {
    _tile_stored(2, c + 16 * 32, 32 * 4);
    _tile_stored(3, c + 16 * 32 + kLanes, 32 * 4);
  }
}

}  // namespace

void tile_bf16(const TileArgs& t) {
  const PackedWeights& w = *t.w;
  const Unit* units;
  const int64_t nu = units_of(w, t.expert, &units);
  for (int64_t u = 0; u < nu; ++u) {
    if ((units[u].kg_end - units[u].kg_begin) % 4 != 0) return avx512bf16::tile_bf16(t);
  }
  const int64_t kpad = w.kpad(), ld = t.blocks * kBlockCols;
  auto* tile = static_cast<uint32_t*>(t.scratch);
  alignas(64) float c[32 * 32];
  configure();
  for (int64_t u = 0; u < nu; ++u) {
    const int64_t k0 = int64_t(units[u].kg_begin) * kKGroup;
    const int64_t pairs = int64_t(units[u].kg_end - units[u].kg_begin) * (kKGroup / 2);
    for (int64_t b = 0; b < t.blocks; ++b) {
      expand_unit(w, w.block_codes(t.expert, t.block_begin + b), units[u], tile);
      for (int half = 0; half < 2; ++half) {
        PanelScales ps[2];
        for (int p = 0; p < 2; ++p)
          ps[p] = panel_scales(w, t.expert, t.block_begin + b, units[u].group, 2 * half + p, kCodeOffset);
        for (int64_t r = 0; r < t.m; r += 32) {
          const uint16_t* a = static_cast<const uint16_t*>(t.a) + r * kpad + k0;
          const uint32_t* bt = tile + half * 2 * kLanes;
          const int64_t rows = std::min<int64_t>(32, t.m - r);
          // The packed rows are padded to 16: a second slab only where rows remain.
          if (rows > 16) multiply<true>(a, kpad, bt, pairs, c);
          else multiply<false>(a, kpad, bt, pairs, c);
          for (int64_t i = 0; i < rows; ++i)
            for (int p = 0; p < 2; ++p)
              apply_unit(t.acc + (r + i) * ld + b * kBlockCols + (2 * half + p) * kLanes, ps[p], vload(c + i * 32 + p * kLanes),
                         t.xs[(r + i) * nu + u], u == 0);
        }
      }
    }
  }
  _tile_release();
}

}  // namespace ferrum::cpu::amx
