// Codes -> B-fragment registers, in registers, without int->float conversion
// instructions: w = (code - zero) * scale for two codes at once.
//
// The magic-number trick: a 16-bit float whose exponent makes the mantissa's
// unit exactly 1.0 turns "OR a small integer into the mantissa" into
// "add that integer". Subtracting (magic | zero) the same way gives code - zero
// exactly, so the only rounding is the final multiply by the scale.
#ifndef FERRUM_MOE_CUDA_GEMM_DEQUANT_CUH_
#define FERRUM_MOE_CUDA_GEMM_DEQUANT_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "gemm/layout.hpp"

namespace ferrum_moe_cuda::gemm {

// fp16 1024.0 in both halves: mantissa unit 1 for [1024, 2048), so any code
// < 1024 (INT4 and INT8 alike) ORs in exactly.
constexpr uint32_t kFp16Magic = 0x64006400u;
// bf16 128.0 in both halves: mantissa unit 1 for [128, 256), exact for codes
// < 128, i.e. INT4. INT8 codes do not fit a bf16 mantissa, see below.
constexpr uint32_t kBf16Magic = 0x43004300u;
// fp32 2^23: mantissa unit 1, exact for any 8-bit code (bf16 INT8 path).
constexpr uint32_t kFp32Magic = 0x4B000000u;

template <int kBits>
constexpr uint32_t kPairCodeMask = kBits == 4 ? 0x000F000Fu : 0x00FF00FFu;

template <class To>
__device__ __forceinline__ To bit_cast_u32(uint32_t bits) {
  static_assert(sizeof(To) == sizeof(uint32_t), "32-bit type");
  To value;
  memcpy(&value, &bits, sizeof(value));
  return value;
}
template <class From>
__device__ __forceinline__ uint32_t u32_of(From value) {
  static_assert(sizeof(From) == sizeof(uint32_t), "32-bit type");
  uint32_t bits;
  memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// (value & mask) | magic in one LOP3. Written as PTX because with two
// immediate operands nvcc emits an AND and an OR (a LOP3 takes one immediate;
// here ptxas keeps the other in a register, loaded once outside the loop).
template <uint32_t kMask, uint32_t kMagic>
__device__ __forceinline__ uint32_t mask_or(uint32_t value) {
  uint32_t out;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(out) : "r"(value), "n"(kMask), "n"(kMagic));
  return out;
}

// The two codes of pair `pair` in the low bits of each half, ORed into `kMagic`.
template <int kBits, uint32_t kMagic>
__device__ __forceinline__ uint32_t pair_codes(uint32_t word, int pair) {
  return mask_or<kPairCodeMask<kBits>, kMagic>(word >> (kBits * pair));
}

// The subtrahend dequant_pair takes for zero points `zero_codes` (low code |
// high code << 16): magic + zero in each half, computed once per group rather
// than once per fragment.
template <class T, int kBits>
__device__ __forceinline__ uint32_t zero_operand(uint32_t zero_codes) {
  if constexpr (std::is_same_v<T, __half>) {
    return zero_codes | kFp16Magic;
  } else if constexpr (kBits == 4) {
    return zero_codes | kBf16Magic;
  } else {
    return zero_codes;  // bf16 INT8 subtracts in fp32 (below)
  }
}

// One B register: the two codes of pair `pair` in `word` (layout.hpp), with
// their zero points as zero_operand() made them and scales `scale_bits` (two
// raw fp16/bf16 values, low k in the low half). Shift + AND + OR compile to
// one SHF and one LOP3 per pair.
template <class T, int kBits>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t word, int pair, uint32_t zero_op,
                                                 uint32_t scale_bits) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 q = bit_cast_u32<__half2>(pair_codes<kBits, kFp16Magic>(word, pair));
    return u32_of(__hmul2(__hsub2(q, bit_cast_u32<__half2>(zero_op)), bit_cast_u32<__half2>(scale_bits)));
  } else if constexpr (kBits == 4) {
    const __nv_bfloat162 q = bit_cast_u32<__nv_bfloat162>(pair_codes<kBits, kBf16Magic>(word, pair));
    return u32_of(__hmul2(__hsub2(q, bit_cast_u32<__nv_bfloat162>(zero_op)),
                          bit_cast_u32<__nv_bfloat162>(scale_bits)));
  } else {
    const uint32_t codes = (word >> (kBits * pair)) & kPairCodeMask<kBits>;
    const uint32_t zero_codes = zero_op;
    // bf16 INT8: code - zero is exact in fp32, then one rounding to bf16.
    const float q_lo = __uint_as_float(kFp32Magic | (codes & 0xFFFFu));
    const float q_hi = __uint_as_float(kFp32Magic | (codes >> 16));
    const float z_lo = __uint_as_float(kFp32Magic | (zero_codes & 0xFFFFu));
    const float z_hi = __uint_as_float(kFp32Magic | (zero_codes >> 16));
    const float2 s = __bfloat1622float2(bit_cast_u32<__nv_bfloat162>(scale_bits));
    return u32_of(__floats2bfloat162_rn((q_lo - z_lo) * s.x, (q_hi - z_hi) * s.y));
  }
}

// The scale-after path (the 16-row decode tiles): B registers hold code -
// zero as exact small integers (|code - zero| <= 255 is exact in fp16 and
// bf16), the MMA accumulates them against the activations in fp32, and the
// group's scale multiplies the partial sums once per group and column
// (Mainloop::flush_group) instead of once per weight. What each pair
// subtracts, per group and column (one zero code in both halves):
struct IntZeros {
  uint32_t even;  // magic + zero: pairs whose codes sit in the low bits
  uint32_t odd;   // fp16 INT4 only: -(64 + zero), for pairs read 16x too large (below)
};

// fp16 1/16 in both halves.
constexpr uint32_t kFp16Sixteenth = 0x2C002C00u;

template <class T, int kBits>
__device__ __forceinline__ IntZeros int_zero_operands(uint32_t zero) {
  const uint32_t both = zero | (zero << 16);
  if constexpr (std::is_same_v<T, __half> && kBits == 4) {
    const __half odd = __float2half_rn(-(64.0f + static_cast<float>(zero)));
    return {both | kFp16Magic, u32_of(__halves2half2(odd, odd))};
  } else {
    return {zero_operand<T, kBits>(both), 0u};
  }
}

// Register `pair` of `word` as two exact integers code - zero (layout.hpp's
// pair order). fp16 INT4 skips half the shifts: an odd pair is masked in place
// (bits 4-7 and 20-23), which ORed into the magic reads as 1024 + 16 * code,
// and one HFMA2 by 1/16 minus (64 + zero) leaves code - zero exactly.
template <class T, int kBits>
__device__ __forceinline__ uint32_t dequant_pair_int(uint32_t word, int pair, IntZeros zeros) {
  if constexpr (std::is_same_v<T, __half> && kBits == 4) {
    const uint32_t src = pair >= 2 ? word >> 8 : word;
    if (pair % 2 == 0) {
      const __half2 q = bit_cast_u32<__half2>(mask_or<0x000F000Fu, kFp16Magic>(src));
      return u32_of(__hsub2(q, bit_cast_u32<__half2>(zeros.even)));
    }
    const __half2 q = bit_cast_u32<__half2>(mask_or<0x00F000F0u, kFp16Magic>(src));
    return u32_of(__hfma2(q, bit_cast_u32<__half2>(kFp16Sixteenth), bit_cast_u32<__half2>(zeros.odd)));
  } else {
    if constexpr (std::is_same_v<T, __half>) {
      return u32_of(__hsub2(bit_cast_u32<__half2>(pair_codes<kBits, kFp16Magic>(word, pair)),
                            bit_cast_u32<__half2>(zeros.even)));
    } else if constexpr (kBits == 4) {
      return u32_of(__hsub2(bit_cast_u32<__nv_bfloat162>(pair_codes<kBits, kBf16Magic>(word, pair)),
                            bit_cast_u32<__nv_bfloat162>(zeros.even)));
    } else {
      const uint32_t codes = (word >> (kBits * pair)) & kPairCodeMask<kBits>;
      // bf16 INT8: code - zero in fp32 (exact), then exactly to bf16 (|.| <= 255).
      const float lo = static_cast<float>(static_cast<int>(codes & 0xFFFFu) - static_cast<int>(zeros.even & 0xFFFFu));
      const float hi = static_cast<float>(static_cast<int>(codes >> 16) - static_cast<int>(zeros.even >> 16));
      return u32_of(__floats2bfloat162_rn(lo, hi));
    }
  }
}

// k-step ks of a warp's 32-column slice as two m16 A fragments of exact
// integers code - zero (wgmma's register operand, and the swapped 8-row tiles'
// and the decode GEMV's mma.sync A): {b0(nt), b0(nt + 1), b1(nt), b1(nt + 1)}
// is the fragment of the 16 weight columns of n8 blocks nt and nt + 1;
// zeros[nt] are n8 block nt's (int_zero_operands).
template <class T, int kBits>
__device__ __forceinline__ void int_column_pairs(const uint32_t (&words)[WeightTileLayout<kBits>::kWordsPerLane],
                                                 int ks, const IntZeros (&zeros)[kNFrags], uint32_t (&a)[2][4]) {
  using Tile = WeightTileLayout<kBits>;
#pragma unroll
  for (int nt = 0; nt < kNFrags; ++nt) {
    const int f = ks * kNFrags + nt;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      a[nt / 2][2 * half + nt % 2] =
          dequant_pair_int<T, kBits>(words[Tile::word_of_fragment(f)], Tile::pair_of_fragment(f, half), zeros[nt]);
    }
  }
}

}  // namespace ferrum_moe_cuda::gemm

#endif  // FERRUM_MOE_CUDA_GEMM_DEQUANT_CUH_
