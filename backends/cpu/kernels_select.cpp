// Which kernel set runs: the best the CPU supports (CPUID, and the OS's
// saved register state), or the one FERRUM_MOE_CPU_ISA names.
#include <cstdlib>
#include <string>

#include "ferrum_moe/plugin.hpp"
#include "kernels.hpp"

#if !defined(FERRUM_MOE_NO_X86_KERNELS)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace ferrum::cpu {
namespace {

const KernelSet kGeneric{
    "generic",
    {&generic::pack_f32, &generic::stream_f32, &generic::tile_f32, generic::kStreamRows, 4, 1, "float32 (portable C++)"},
    {},
    &generic::store,
    &generic::silu_mul,
    &generic::sum_rows};

#if !defined(FERRUM_MOE_NO_X86_KERNELS)
const KernelSet kAvx2{
    "avx2",
    {&avx2::pack_f32, &avx2::stream_f32, &avx2::tile_f32, avx2::kStreamRows, 4, 1, "float32 FMA (AVX2)"},
    {},
    &avx2::store,
    &avx2::silu_mul,
    &avx2::sum_rows};
const KernelPath kAvx512F32{&avx512::pack_f32, &avx512::stream_f32, &avx512::tile_f32, avx512::kStreamRows, 4, 1,
                            "float32 FMA (AVX-512)"};
const KernelSet kAvx512{"avx512", kAvx512F32, {}, &avx512::store, &avx512::silu_mul, &avx512::sum_rows};
const KernelSet kAvx512Bf16{
    "avx512bf16",
    kAvx512F32,
    {&avx512bf16::pack_bf16, &avx512bf16::stream_bf16, &avx512bf16::tile_bf16, avx512bf16::kStreamRows, 2, 1,
     "bfloat16 vdpbf16ps (AVX512-BF16)"},
    &avx512::store,
    &avx512::silu_mul,
    &avx512::sum_rows};
const KernelSet kAmx{
    "amx",
    kAvx512F32,
    {&avx512bf16::pack_bf16, &avx512bf16::stream_bf16, &amx::tile_bf16, avx512bf16::kStreamRows, 2, 16,
     "bfloat16 AMX tiles, vdpbf16ps streams (AMX-BF16)"},
    &avx512::store,
    &avx512::silu_mul,
    &avx512::sum_rows};

struct CpuFeatures {
  bool avx2 = false, avx512 = false, avx512bf16 = false, amx = false;
};

uint64_t xcr0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

CpuFeatures detect() {
  CpuFeatures f;
  __builtin_cpu_init();
  unsigned a, b, c, d;
  const bool f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C) != 0;
  // __builtin_cpu_supports checks that the OS saves the AVX and AVX-512 registers.
  f.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
  f.avx512 = f.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  // CPUID leaf 7: sub-leaf 1 EAX bit 5 is AVX512-BF16; sub-leaf 0 EDX bits 22
  // and 24 are AMX-BF16 and AMX-TILE (read directly: not every compiler's
  // __builtin_cpu_supports knows them).
  f.avx512bf16 = f.avx512 && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5)) != 0;
  const bool amx_cpu = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 22)) != 0 && (d & (1u << 24)) != 0;
  // XCR0 bits 17 and 18: the OS manages the tile configuration and tile data.
  f.amx = f.avx512bf16 && amx_cpu && (xcr0() & (3u << 17)) == (3u << 17);
  return f;
}

// Linux hands a process the (8 KiB) AMX tile state only on request.
bool request_amx_state() {
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
#endif

}  // namespace

const KernelSet& select_kernels() {
  const char* env = std::getenv("FERRUM_MOE_CPU_ISA");
  const std::string forced = env != nullptr ? env : "";
  const char* names = "amx, avx512bf16, avx512, avx2, generic";
  if (!forced.empty() && forced != "amx" && forced != "avx512bf16" && forced != "avx512" && forced != "avx2" &&
      forced != "generic") {
    throw plugin::Error(FM_ERROR_INVALID_ARGUMENT,
                        "FERRUM_MOE_CPU_ISA=" + forced + " is not a kernel set; expected one of " + names);
  }
  if (forced == "generic") return kGeneric;
#if !defined(FERRUM_MOE_NO_X86_KERNELS)
  const CpuFeatures f = detect();
  const bool amx = f.amx && (forced.empty() || forced == "amx") && request_amx_state();
  const KernelSet* best = amx ? &kAmx : f.avx512bf16 ? &kAvx512Bf16 : f.avx512 ? &kAvx512 : f.avx2 ? &kAvx2 : &kGeneric;
  if (forced.empty()) return *best;
  for (const KernelSet* s : {&kAmx, &kAvx512Bf16, &kAvx512, &kAvx2}) {
    if (forced != s->isa) continue;
    const bool runs = s == &kAmx ? amx : s == &kAvx512Bf16 ? f.avx512bf16 : s == &kAvx512 ? f.avx512 : f.avx2;
    if (runs) return *s;
  }
  throw plugin::Error(FM_ERROR_UNSUPPORTED, "FERRUM_MOE_CPU_ISA=" + forced + ": this CPU (or its OS) cannot run it; " +
                                                "the best it runs is " + best->isa);
#else
  if (!forced.empty()) {
    throw plugin::Error(FM_ERROR_UNSUPPORTED, "FERRUM_MOE_CPU_ISA=" + forced + ": this build has only the generic kernels");
  }
  return kGeneric;
#endif
}

}  // namespace ferrum::cpu
