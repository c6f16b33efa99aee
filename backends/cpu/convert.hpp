// Scalar conversions between the activation dtypes and float32.
#pragma once

#include <cstdint>
#include <cstring>

#include "ferrum_moe/dlpack.h"

namespace ferrum::cpu {

enum class Float { f32, f16, bf16 };

inline Float float_kind(DLDataType t) {
  if (t.code == kDLBfloat) return Float::bf16;
  return t.bits == 16 ? Float::f16 : Float::f32;
}

inline int64_t float_bytes(Float kind) { return kind == Float::f32 ? 4 : 2; }

// Element i of an array of `kind`.
inline const void* float_at(const void* base, int64_t i, Float kind) {
  return static_cast<const char*>(base) + i * float_bytes(kind);
}
inline void* float_at(void* base, int64_t i, Float kind) { return static_cast<char*>(base) + i * float_bytes(kind); }

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40u);  // keep NaN a NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
  return uint16_t(bits >> 16);
}

inline float load_float(const void* base, int64_t i, Float kind) {
  switch (kind) {
    case Float::f32: return static_cast<const float*>(base)[i];
    case Float::f16: return float(static_cast<const _Float16*>(base)[i]);
    case Float::bf16: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  }
  return 0.0f;
}

inline void store_float(void* base, int64_t i, float v, Float kind) {
  switch (kind) {
    case Float::f32: static_cast<float*>(base)[i] = v; break;
    case Float::f16: static_cast<_Float16*>(base)[i] = _Float16(v); break;
    case Float::bf16: static_cast<uint16_t*>(base)[i] = float_to_bf16(v); break;
  }
}

inline int64_t load_index(const DLTensor& t, int64_t i) {
  const void* p = static_cast<const char*>(t.data) + t.byte_offset;
  return t.dtype.bits == 64 ? static_cast<const int64_t*>(p)[i] : static_cast<const int32_t*>(p)[i];
}

}  // namespace ferrum::cpu
