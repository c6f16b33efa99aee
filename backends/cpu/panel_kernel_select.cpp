#include "panel_kernel.hpp"

namespace ferrum::cpu {

KernelChoice select_panel_kernel() {
#if !defined(FERRUM_MOE_NO_X86_KERNELS) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) return {&avx512::accumulate_panel, "AVX-512"};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return {&avx2::accumulate_panel, "AVX2+FMA"};
#endif
  return {&generic::accumulate_panel, "generic"};
}

}  // namespace ferrum::cpu
