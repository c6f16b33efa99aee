// The float32 kernels for AVX2 + FMA + F16C (flags in CMakeLists.txt): two
// ymm per 16-column panel; sixteen ymm registers bound the register blocks.
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "kernels.hpp"

namespace ferrum::cpu::avx2 {
namespace {

struct VF {
  __m256 lo, hi;
};
struct VU {
  __m256i lo, hi;
};

inline VF vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline VF vset(float f) { return {_mm256_set1_ps(f), _mm256_set1_ps(f)}; }
inline VF vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void vstore(float* p, VF a) { _mm256_storeu_ps(p, a.lo), _mm256_storeu_ps(p + 8, a.hi); }
inline VF vadd(VF a, VF b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline VF vmul(VF a, VF b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline VF vfma(VF a, VF b, VF c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline VF vfnma(VF a, VF b, VF c) { return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)}; }
inline VF vdiv(VF a, VF b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline VF vmin(VF a, VF b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
inline VF vmax(VF a, VF b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline VF vround(VF a) {
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.lo, kNearest), _mm256_round_ps(a.hi, kNearest)};
}
// a * 2^n for integral n in [-252, 254], as a * 2^(n/2) * 2^(n - n/2): each
// factor's exponent fits the exponent bits, and the product over- or
// underflows as it should.
inline __m256 ldexp8(__m256 a, __m256 n) {
  const __m256i n1 = _mm256_srai_epi32(_mm256_cvtps_epi32(n), 1);
  const __m256i n2 = _mm256_sub_epi32(_mm256_cvtps_epi32(n), n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(a, f1), f2);
}
inline VF vldexp(VF a, VF n) { return {ldexp8(a.lo, n.lo), ldexp8(a.hi, n.hi)}; }
inline float vsum(VF a) {
  const __m256 s = _mm256_add_ps(a.lo, a.hi);
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}
inline VU uload(const uint32_t* p) {
  return {_mm256_load_si256(reinterpret_cast<const __m256i*>(p)), _mm256_load_si256(reinterpret_cast<const __m256i*>(p + 8))};
}
inline VF ucode(VU w, unsigned shift, uint32_t mask) {
  const __m256i m = _mm256_set1_epi32(int(mask));
  return {_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w.lo, int(shift)), m)),
          _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(w.hi, int(shift)), m))};
}
inline VF vload_u8(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)))};
}
inline VF vload_kind(const void* p, Float kind) {
  switch (kind) {
    case Float::f32: return vload(static_cast<const float*>(p));
    case Float::f16: {
      const auto* h = static_cast<const __m128i*>(p);
      return {_mm256_cvtph_ps(_mm_loadu_si128(h)), _mm256_cvtph_ps(_mm_loadu_si128(h + 1))};
    }
    case Float::bf16: break;
  }
  const auto* h = static_cast<const __m128i*>(p);
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(h)), 16)),
          _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(h + 1)), 16))};
}
// Eight floats to bf16, rounded to nearest even, NaN kept a NaN.
inline __m128i to_bf16(__m256 a) {
  const __m256i bits = _mm256_castps_si256(a);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40)), nan);
  // 32 -> 16 bits: values are below 2^16, so the unsigned saturating pack is exact.
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
inline void vstore_kind(void* p, Float kind, VF a) {
  auto* h = static_cast<__m128i*>(p);
  switch (kind) {
    case Float::f32: vstore(static_cast<float*>(p), a); return;
    case Float::f16:
      _mm_storeu_si128(h, _mm256_cvtps_ph(a.lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      _mm_storeu_si128(h + 1, _mm256_cvtps_ph(a.hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      return;
    case Float::bf16: break;
  }
  _mm_storeu_si128(h, to_bf16(a.lo));
  _mm_storeu_si128(h + 1, to_bf16(a.hi));
}
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

constexpr int kStreamChunk = 2, kStreamPanels = 2;
constexpr int kMicroRows = 6, kMicroPanels = 1;

}  // namespace

#include "kernels_common.inc"
#include "kernels_f32.inc"
#include "kernels_elementwise.inc"

}  // namespace ferrum::cpu::avx2
