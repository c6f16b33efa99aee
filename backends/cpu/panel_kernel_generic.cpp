// accumulate_panel for the generic instruction set (flags set in CMakeLists.txt).
#include "panel_kernel.hpp"

namespace ferrum::cpu::generic {
#include "panel_kernel.inc"
}  // namespace ferrum::cpu::generic
