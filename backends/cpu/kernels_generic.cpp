// The float32 kernels in portable C++ (any CPU; the compiler vectorizes the
// 16-lane loops for the baseline instruction set).
#include <algorithm>
#include <cmath>

#include "kernels.hpp"

namespace ferrum::cpu::generic {
namespace {

struct VF {
  float v[kLanes];
};
struct VU {
  uint32_t v[kLanes];
};

template <class F>
inline VF map(F f) {
  VF r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = f(i);
  return r;
}
inline VF vzero() { return map([](int) { return 0.0f; }); }
inline VF vset(float f) { return map([f](int) { return f; }); }
inline VF vload(const float* p) { return map([p](int i) { return p[i]; }); }
inline void vstore(float* p, VF a) {
  for (int i = 0; i < kLanes; ++i) p[i] = a.v[i];
}
inline VF vadd(VF a, VF b) { return map([&](int i) { return a.v[i] + b.v[i]; }); }
inline VF vmul(VF a, VF b) { return map([&](int i) { return a.v[i] * b.v[i]; }); }
inline VF vfma(VF a, VF b, VF c) { return map([&](int i) { return a.v[i] * b.v[i] + c.v[i]; }); }
inline VF vfnma(VF a, VF b, VF c) { return map([&](int i) { return c.v[i] - a.v[i] * b.v[i]; }); }
inline VF vdiv(VF a, VF b) { return map([&](int i) { return a.v[i] / b.v[i]; }); }
inline VF vmin(VF a, VF b) { return map([&](int i) { return a.v[i] < b.v[i] ? a.v[i] : b.v[i]; }); }
inline VF vmax(VF a, VF b) { return map([&](int i) { return a.v[i] > b.v[i] ? a.v[i] : b.v[i]; }); }
inline VF vround(VF a) { return map([&](int i) { return std::nearbyint(a.v[i]); }); }
inline VF vldexp(VF a, VF n) { return map([&](int i) { return std::ldexp(a.v[i], int(n.v[i])); }); }
inline float vsum(VF a) {
  float s = 0.0f;
  for (float x : a.v) s += x;
  return s;
}
inline VU uload(const uint32_t* p) {
  VU r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = p[i];
  return r;
}
inline VF ucode(VU w, unsigned shift, uint32_t mask) { return map([&](int i) { return float((w.v[i] >> shift) & mask); }); }
inline VF vload_u8(const uint8_t* p) { return map([p](int i) { return float(p[i]); }); }
inline VF vload_kind(const void* p, Float kind) { return map([&](int i) { return load_float(p, i, kind); }); }
inline void vstore_kind(void* p, Float kind, VF a) {
  for (int i = 0; i < kLanes; ++i) store_float(p, i, a.v[i], kind);
}
inline void prefetch(const void* p) { __builtin_prefetch(p); }

constexpr int kStreamChunk = 4, kStreamPanels = 4;
constexpr int kMicroRows = 4, kMicroPanels = 4;

}  // namespace

#include "kernels_common.inc"
#include "kernels_f32.inc"
#include "kernels_elementwise.inc"

}  // namespace ferrum::cpu::generic
