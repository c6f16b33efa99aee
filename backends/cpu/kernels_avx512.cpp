// The float32 kernels for AVX-512 (F, BW, DQ, VL; flags in CMakeLists.txt):
// one zmm per 16-column panel.
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "kernels.hpp"

namespace ferrum::cpu::avx512 {
namespace {

#include "vec_avx512.inc"

constexpr int kStreamChunk = 4, kStreamPanels = 4;
constexpr int kMicroRows = 6, kMicroPanels = 4;

}  // namespace

#include "kernels_common.inc"
#include "kernels_f32.inc"
#include "kernels_elementwise.inc"

}  // namespace ferrum::cpu::avx512
