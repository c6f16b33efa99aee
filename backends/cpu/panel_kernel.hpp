// The CPU GEMM's inner kernel: acc[m][kPanel] = x_rows @ W_panel for one
// 16-column panel of one expert, dequantizing the packed weights on the fly.
//
// panel_kernel.inc holds the body; it is compiled once per instruction set
// (generic, AVX2+FMA+F16C, AVX-512) and the best one the CPU supports is
// picked at run time, so one wheel runs everywhere and uses what it finds.
#pragma once

#include <cstdint>

namespace ferrum::cpu {

// Columns per panel: one AVX-512 register, two AVX2 registers of floats.
inline constexpr int kPanel = 16;
// Input rows dequantized per step: 256 x 16 floats = 16 KiB, stays in L1.
inline constexpr int kKBlock = 256;

struct PanelTask {
  const float* const* x_rows;   // m rows of K floats each
  int64_t m;
  int64_t k;
  int bits;                     // 4 or 8
  const uint32_t* q;            // the panel's packed words, [packed_k][kPanel]
  const float* scales;          // [num_groups][scale_stride], already offset to the panel's first column
  const uint8_t* zeros;         // same layout as scales, or nullptr: zero = 2^(bits-1)
  int64_t scale_stride;
  const int32_t* group_of_k;    // [k]
  float* acc;                   // out: [m][kPanel]
  float* wbuf;                  // scratch: [kKBlock][kPanel]
};

using PanelKernel = void (*)(const PanelTask&);

namespace generic { void accumulate_panel(const PanelTask& t); }
namespace avx2 { void accumulate_panel(const PanelTask& t); }
namespace avx512 { void accumulate_panel(const PanelTask& t); }

struct KernelChoice {
  PanelKernel kernel;
  const char* isa;
};

// The fastest kernel this CPU can run.
KernelChoice select_panel_kernel();

}  // namespace ferrum::cpu
