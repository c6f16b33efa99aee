// accumulate_panel for the avx2 instruction set (flags set in CMakeLists.txt).
#include "panel_kernel.hpp"

namespace ferrum::cpu::avx2 {
#include "panel_kernel.inc"
}  // namespace ferrum::cpu::avx2
