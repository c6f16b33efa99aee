// The bfloat16 kernels for AVX512-BF16 (4-bit stacks with bfloat16
// activations): vdpbf16ps multiplies 16 columns x one k pair per instruction.
// The codes become bf16 pairs in two instructions per 32 weights
// (bf16_codes.inc).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "kernels.hpp"

namespace ferrum::cpu::avx512bf16 {
namespace {

#include "vec_avx512.inc"

constexpr int kMicroRows = 6;

}  // namespace

#include "kernels_common.inc"

namespace {

#include "bf16_codes.inc"

// A bf16 pair of packed activations as the 32-bit broadcast operand.
inline __m512bh pair_at(const uint16_t* a) {
  uint32_t v;
  std::memcpy(&v, a, 4);
  return (__m512bh)_mm512_set1_epi32(int(v));
}

// Rows [r0, r0 + MR) of an item over unit u of block b, added to acc. (Two
// passes of two panels for 8 rows, the broadcasts reloaded, measured 25%
// slower than two chunks of 4 rows: docs/cpu-kernels.md.)
template <int MR>
void stream_unit(const TileArgs& t, int64_t b, int64_t u, int64_t r0) {
  const PackedWeights& w = *t.w;
  const Unit& unit = w.units[size_t(w.unit_begin[size_t(t.expert)] + u)];
  const int64_t nu = w.unit_begin[size_t(t.expert) + 1] - w.unit_begin[size_t(t.expert)];
  const int64_t kpad = w.kpad(), ld = t.blocks * kBlockCols, kgw = w.kgroup_words();
  const uint32_t* codes = w.block_codes(t.expert, t.block_begin + b);
  const uint16_t* a = static_cast<const uint16_t*>(t.a) + r0 * kpad;
  float* acc = t.acc + r0 * ld + b * kBlockCols;
  // Too few rows leave too few independent dot-product chains to hide their
  // latency: split the accumulators by pair parity while registers allow.
  constexpr int S = MR <= 2 ? 2 : 1;
  __m512 c[S][MR][kPanels];
  for (auto& cs : c)
    for (auto& cr : cs)
      for (__m512& v : cr) v = _mm512_setzero_ps();
  for (int64_t kg = unit.kg_begin; kg < unit.kg_end; ++kg) {
    const uint32_t* line = codes + kg * kgw;
    // The first pass over a unit's codes reads them from memory.
    if (r0 == 0)
      for (int64_t l = 0; l < kgw; l += kLanes) prefetch(line + kPrefetchKGroups * kgw + l);
    const uint16_t* x = a + kg * kKGroup;
#pragma GCC unroll 4
    for (int p = 0; p < kPanels; ++p) {
      const __m512i q = _mm512_load_si512(line + p * kLanes);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        const __m512bh v = code_pairs(q, unsigned(i));
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r) c[i % S][r][p] = _mm512_dpbf16_ps(c[i % S][r][p], v, pair_at(x + r * kpad + 2 * i));
      }
    }
  }
  for (int p = 0; p < kPanels; ++p) {
    const PanelScales ps = panel_scales(w, t.expert, t.block_begin + b, unit.group, p, kCodeOffset);
    for (int r = 0; r < MR; ++r) {
      __m512 sum = c[0][r][p];
      if constexpr (S == 2) sum = _mm512_add_ps(sum, c[S - 1][r][p]);
      apply_unit(acc + r * ld + p * kLanes, ps, VF{sum}, t.xs[(r0 + r) * nu + u], u == 0);
    }
  }
}

// MR rows x 64 columns over one unit of an expanded tile, applied to acc.
template <int MR, bool kFirst>
void micro(const uint16_t* a, int64_t lda, const uint32_t* tile, int64_t pairs, const PanelScales* ps, const float* xs,
           int64_t xs_stride, float* acc, int64_t ld) {
  __m512 c[MR][kPanels];
  for (auto& cr : c)
    for (__m512& v : cr) v = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < pairs; ++kp) {
    __m512bh bv[kPanels];
#pragma GCC unroll 4
    for (int p = 0; p < kPanels; ++p) bv[p] = (__m512bh)_mm512_load_si512(tile + kp * kBlockCols + p * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = pair_at(a + r * lda + 2 * kp);
#pragma GCC unroll 4
      for (int p = 0; p < kPanels; ++p) c[r][p] = _mm512_dpbf16_ps(c[r][p], av, bv[p]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < kPanels; ++p) apply_unit(acc + r * ld + p * kLanes, ps[p], VF{c[r][p]}, xs[r * xs_stride], kFirst);
}

// The first MR rows of a block's unit, dequantizing its codes as they go
// and storing the pairs into `tile` for the later rows' passes (micro): the
// expansion's shifts, logic ops and stores issue beside this pass's dot
// products instead of in a loop of their own, where they took 19% of the
// tile kernel's time at 16 rows (docs/cpu-kernels.md).
template <int MR, bool kFirst>
void micro_expanding(const uint16_t* a, int64_t lda, const PackedWeights& w, const uint32_t* codes, const Unit& unit,
                     uint32_t* tile, const PanelScales* ps, const float* xs, int64_t xs_stride, float* acc, int64_t ld) {
  __m512 c[MR][kPanels];
  for (auto& cr : c)
    for (__m512& v : cr) v = _mm512_setzero_ps();
  const int64_t kgw = w.kgroup_words();
  for (int64_t kg = unit.kg_begin; kg < unit.kg_end; ++kg) {
    const uint32_t* line = codes + kg * kgw;
    for (int64_t l = 0; l < kgw; l += kLanes) prefetch(line + kPrefetchKGroups * kgw + l);
    const int64_t kp0 = (kg - unit.kg_begin) * (kKGroup / 2);
#pragma GCC unroll 4
    for (int i = 0; i < kKGroup / 2; ++i) {
      __m512bh bv[kPanels];
#pragma GCC unroll 4
      for (int p = 0; p < kPanels; ++p) {
        bv[p] = code_pairs(_mm512_load_si512(line + p * kLanes), unsigned(i));
        _mm512_store_si512(tile + (kp0 + i) * kBlockCols + p * kLanes, (__m512i)bv[p]);
      }
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512bh av = pair_at(a + r * lda + 2 * (kp0 + i));
#pragma GCC unroll 4
        for (int p = 0; p < kPanels; ++p) c[r][p] = _mm512_dpbf16_ps(c[r][p], av, bv[p]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < kPanels; ++p) apply_unit(acc + r * ld + p * kLanes, ps[p], VF{c[r][p]}, xs[r * xs_stride], kFirst);
}

// Sums of one packed bf16 row over each unit.
void unit_sums(const Unit* units, int64_t nu, const uint16_t* row, float* xs) {
  for (int64_t u = 0; u < nu; ++u) {
    int64_t k = int64_t(units[u].kg_begin) * kKGroup;
    const int64_t end = int64_t(units[u].kg_end) * kKGroup;
    VF s = vzero();
    for (; k + kLanes <= end; k += kLanes) s = vadd(s, vload_kind(row + k, Float::bf16));
    float total = vsum(s);
    for (; k < end; ++k) total += bf16_to_float(row[k]);
    xs[u] = total;
  }
}

}  // namespace

void pack_bf16(const PackArgs& p) {
  const PackedWeights& w = *p.w;
  const Unit* units;
  const int64_t nu = units_of(w, p.expert, &units), kpad = w.kpad();
  const int32_t* order = w.source_row.empty() ? nullptr : w.source_row.data() + p.expert * kpad;
  for (int64_t i = 0; i < p.m; ++i) {
    const auto* src = static_cast<const uint16_t*>(p.x) + p.rows[i] * p.x_stride;
    uint16_t* dst = static_cast<uint16_t*>(p.a) + i * kpad;
    if (order == nullptr) {
      std::memcpy(dst, src, size_t(w.k) * 2);
      std::memset(dst + w.k, 0, size_t(kpad - w.k) * 2);
    } else {
      for (int64_t k = 0; k < kpad; ++k) dst[k] = order[k] >= 0 ? src[order[k]] : uint16_t(0);
    }
    unit_sums(units, nu, dst, p.xs + i * nu);
  }
}

void stream_bf16(const TileArgs& t) {
  const int64_t nu = t.w->unit_begin[size_t(t.expert) + 1] - t.w->unit_begin[size_t(t.expert)];
  for (int64_t b = 0; b < t.blocks; ++b) {
    for (int64_t u = 0; u < nu; ++u) {
      // Row chunks inside the unit: its 4 KiB of codes stay in L1 between them.
      for (int64_t r = 0; r < t.m; r += 4) {
        switch (std::min<int64_t>(t.m - r, 4)) {
          case 1: stream_unit<1>(t, b, u, r); break;
          case 2: stream_unit<2>(t, b, u, r); break;
          case 3: stream_unit<3>(t, b, u, r); break;
          default: stream_unit<4>(t, b, u, r); break;
        }
      }
    }
  }
}

void tile_bf16(const TileArgs& t) {
  const PackedWeights& w = *t.w;
  const Unit* units;
  const int64_t nu = units_of(w, t.expert, &units);
  const int64_t kpad = w.kpad(), ld = t.blocks * kBlockCols;
  auto* tile = static_cast<uint32_t*>(t.scratch);
  for (int64_t u = 0; u < nu; ++u) {
    const int64_t k0 = int64_t(units[u].kg_begin) * kKGroup;
    const int64_t pairs = int64_t(units[u].kg_end - units[u].kg_begin) * (kKGroup / 2);
    for (int64_t b = 0; b < t.blocks; ++b) {
      // One block's unit at a time: its expanded tile (16 KiB) stays in L1,
      // written by the first rows' pass.
      PanelScales ps[kPanels];
      for (int p = 0; p < kPanels; ++p) ps[p] = panel_scales(w, t.expert, t.block_begin + b, units[u].group, p, kCodeOffset);
      const uint16_t* a = static_cast<const uint16_t*>(t.a) + k0;
      const uint32_t* codes = w.block_codes(t.expert, t.block_begin + b);
      float* acc = t.acc + b * kBlockCols;
      with_rows<kMicroRows>(std::min<int64_t>(kMicroRows, t.m), u == 0, [&](auto mr, auto first) {
        micro_expanding<decltype(mr)::value, decltype(first)::value>(a, kpad, w, codes, units[u], tile, ps, t.xs + u, nu, acc, ld);
      });
      for (int64_t r = kMicroRows; r < t.m; r += kMicroRows) {
        with_rows<kMicroRows>(std::min<int64_t>(kMicroRows, t.m - r), u == 0, [&](auto mr, auto first) {
          micro<decltype(mr)::value, decltype(first)::value>(a + r * kpad, kpad, tile, pairs, ps, t.xs + r * nu + u, nu, acc + r * ld, ld);
        });
      }
    }
  }
}

}  // namespace ferrum::cpu::avx512bf16
