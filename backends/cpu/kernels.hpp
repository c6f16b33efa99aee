// The CPU GEMM kernels, one set per instruction set, chosen at run time.
//
// Every kernel computes, for the rows of one job and a range of 64-column
// blocks of one expert,
//   acc[r][c] = sum over units u of  s[g(u)][c] * (sum_{k in u} a[r][k] * (q[k][c] + o) - (z[g(u)][c] + o) * xs[r][u])
// where a is the job's activations packed in the layout's row order
// (layout.hpp), xs[r][u] the sum of a[r] over unit u, q the codes, z the zero
// point and o an offset a kernel may add to every code (the bf16 kernels read
// code q as the bf16 number 128 + q: two instructions per 32 weights). The
// codes are read as integers and each group's scales applied once per unit, so
// the float32 kernels are as exact as float32 accumulation allows.
//
// Two shapes of kernel:
//   stream: a few rows (decode). Codes go from memory to registers once; every
//           row's accumulators stay in registers. Memory-bound by design.
//   tile:   any number of rows (prefill). A unit's codes are expanded once
//           into an L1-resident tile (float32, or bf16 pairs), then a register
//           block of rows x 64 columns runs over it (FMA, vdpbf16ps or AMX).
#pragma once

#include <cstdint>

#include "convert.hpp"
#include "layout.hpp"

namespace ferrum::cpu {

// Activation rows of one job, converted and reordered into the layout's row
// order, zero at padded rows, with their unit sums.
struct PackArgs {
  const PackedWeights* w;
  int64_t expert;
  const void* x;           // the caller's x
  Float x_kind;
  int64_t x_stride;        // elements between rows of x
  const int64_t* rows;     // m row indices into x
  int64_t m;
  void* a;                 // out: [m][w->kpad()] float32 or bf16
  float* xs;               // out: [m][units of the expert]
};

// One work item: rows [0, m) of a job's packed activations against blocks
// [block_begin, block_begin + blocks) of one expert.
struct TileArgs {
  const PackedWeights* w;
  int64_t expert;
  const void* a;           // first row of the item
  const float* xs;         // the item's first row's unit sums; rows num_units apart
  int64_t m;
  int64_t block_begin, blocks;
  float* acc;              // out: [m][blocks * 64], row stride blocks * 64
  void* scratch;           // kTileScratchBytes, 64-byte aligned
};

inline constexpr int64_t kMaxItemBlocks = 4;
// A tile kernel's expanded codes of one unit of one block: 128 rows x 64 columns x 4 bytes.
inline constexpr int64_t kTileScratchBytes = kUnitKGroups * kKGroup * kBlockCols * 4;

// acc rows (scaled, biased, converted) into the caller's out.
struct StoreArgs {
  const float* acc;        // [m][ld]
  int64_t ld;
  int64_t m;
  int64_t c_lo, c_hi;      // expert columns to write; acc column 0 is column c0
  int64_t c0;
  int64_t col_begin;       // out column 0 is expert column col_begin
  const int64_t* out_rows; // m output rows
  const float* row_scale;  // m factors, or nullptr
  const void* bias;        // [n] of bias_kind, indexed by c - col_begin, or nullptr
  Float bias_kind;
  void* out;
  Float out_kind;
  int64_t out_stride;
};

// The kernels of one arithmetic: float32 FMA, or bf16 pair dot products (the
// activations packed as bf16, 4-bit codes only).
struct KernelPath {
  void (*pack)(const PackArgs&);
  void (*stream)(const TileArgs&);  // m <= stream_rows
  void (*tile)(const TileArgs&);    // any m
  int64_t stream_rows;
  int64_t a_bytes;                  // bytes per packed activation
  int64_t row_align;                // packed rows per job padded to a multiple (AMX reads 16-row tiles)
  const char* name;
};

struct KernelSet {
  const char* isa;                  // FERRUM_MOE_CPU_ISA spelling
  KernelPath f32;
  KernelPath bf16;                  // bf16.pack == nullptr: none on this ISA
  void (*store)(const StoreArgs&);
  // The MoE layer's elementwise steps, one row each: out[j] = silu(in[j]) *
  // in[n + j]; out[c] = the sum of rows[i][c] over i, in float32.
  void (*silu_mul)(const void* in, void* out, int64_t n, Float kind);
  void (*sum_rows)(const void* const* rows, int64_t count, Float in_kind, void* out, Float out_kind, int64_t n);
};

// The best set this CPU runs, or the one FERRUM_MOE_CPU_ISA names (an error
// when the CPU lacks it). Requests the AMX tile state from Linux when used.
const KernelSet& select_kernels();

// The kernels of each instruction set (kernels_<isa>.cpp). The driver runs
// the stream kernel for jobs of at most kStreamRows rows, the tile kernel for
// the rest; both take any number of rows.
#define FERRUM_CPU_F32_KERNELS(ns, stream_rows)     \
  namespace ns {                                    \
  inline constexpr int64_t kStreamRows = stream_rows; \
  void pack_f32(const PackArgs& p);                 \
  void stream_f32(const TileArgs& t);               \
  void tile_f32(const TileArgs& t);                 \
  void store(const StoreArgs& s);                   \
  void silu_mul(const void* in, void* out, int64_t n, Float kind); \
  void sum_rows(const void* const* rows, int64_t count, Float in_kind, void* out, Float out_kind, int64_t n); \
  }
FERRUM_CPU_F32_KERNELS(generic, 4)
FERRUM_CPU_F32_KERNELS(avx2, 4)
FERRUM_CPU_F32_KERNELS(avx512, 8)
#undef FERRUM_CPU_F32_KERNELS

namespace avx512bf16 {
inline constexpr int64_t kStreamRows = 8;
void pack_bf16(const PackArgs& p);
void stream_bf16(const TileArgs& t);
void tile_bf16(const TileArgs& t);
}  // namespace avx512bf16

namespace amx {
// AMX tiles take 32 rows a step: an expert with a unit of another length runs
// avx512bf16::tile_bf16 instead.
void tile_bf16(const TileArgs& t);
}  // namespace amx

}  // namespace ferrum::cpu
