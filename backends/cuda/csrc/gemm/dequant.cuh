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
// one LOP3 per pair.
template <class T, int kBits>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t word, int pair, uint32_t zero_op,
                                                 uint32_t scale_bits) {
  const uint32_t codes = (word >> (kBits * pair)) & kPairCodeMask<kBits>;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 q = bit_cast_u32<__half2>(codes | kFp16Magic);
    return u32_of(__hmul2(__hsub2(q, bit_cast_u32<__half2>(zero_op)), bit_cast_u32<__half2>(scale_bits)));
  } else if constexpr (kBits == 4) {
    const __nv_bfloat162 q = bit_cast_u32<__nv_bfloat162>(codes | kBf16Magic);
    return u32_of(__hmul2(__hsub2(q, bit_cast_u32<__nv_bfloat162>(zero_op)),
                          bit_cast_u32<__nv_bfloat162>(scale_bits)));
  } else {
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

}  // namespace ferrum_moe_cuda::gemm

#endif  // FERRUM_MOE_CUDA_GEMM_DEQUANT_CUH_
