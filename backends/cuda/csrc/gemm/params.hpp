// Kernel parameters of the quantized MoE GEMM, and its host launchers. Plain
// structs (no CUDA types) so the host code (stack.cpp) fills them without
// including any kernel; the launchers return cudaError_t and never throw.
#ifndef FERRUM_MOE_CUDA_GEMM_PARAMS_HPP_
#define FERRUM_MOE_CUDA_GEMM_PARAMS_HPP_

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "gemm/layout.hpp"

namespace ferrum_moe_cuda::gemm {

enum class ComputeType { kFloat16, kBFloat16 };

// The repacked weights of one stack, resident on its device.
struct QuantWeights {
  const void* tiles;           // [E, n_tiles, k_tiles] tiles of WeightTileLayout<bits>
  const uint16_t* scales;      // [E, num_groups, n_padded] raw fp16/bf16 bits; padded columns 0
  const uint8_t* zeros;        // [E, num_groups, n_padded] codes, or null: symmetric 2^(bits-1)
  const int32_t* perm;         // act-order: [E, k] source column of x for sorted row k; or null
  const int32_t* row_group;    // [.., k_padded] group of each (sorted) row; null when every
                               // 16-row k-step lies in one group (group = k / group_size)
  int64_t row_group_expert_stride;  // 0 when all experts share one row_group table
  int32_t num_experts;
  int32_t k;                   // true K; x columns >= k read as zero
  int32_t k_tiles;             // k_padded / kTileK
  int32_t n_tiles;             // n_padded / kTileN
  int32_t n_padded;
  int32_t num_groups;
  int32_t group_size;          // rows per group when row_group is null (a multiple of 16)
};

// Activations in, results out, and the column window written.
struct GemmIO {
  const void* x;               // [rows, >= k] compute dtype, unit column stride
  int64_t x_row_stride;        // elements
  bool x_vector_loads;         // x and its rows are 16-byte aligned: cp.async 16-byte loads
  void* out;
  int64_t out_row_stride;      // elements
  int64_t out_col_stride;
  bool out_float32;            // else the compute dtype
  int64_t col_begin;           // expert columns [col_begin, col_begin + n) are written,
  int64_t n;                   // to out columns 0 .. n
  const uint16_t* bias;        // [n] compute dtype, or null
  // The gated epilogue (plugin.h, ABI 1.3; the wgmma tiles with staged
  // stores, the 8-row tiles and the decode GEMV only): 0 for plain results; else the tile
  // distance from a gate tile to its up tile (N / 2 / kTileN). A wgmma
  // CTA's first warpgroup then takes gate tile t, its second up tile
  // t + gate_up_tiles; an 8-row CTA tile y is half y % 2 of gate tile y / 2
  // and of its up tile (mainloop.cuh). The CTA stores silu(gate) * up into
  // out's columns of the gate columns (n = N / 2).
  int32_t gate_up_tiles;
};

// What a launch of the decode GEMV (gemv.cuh) is told beside its routing or
// work items.
struct GemvPlan {
  // Its grid is resident at once, so it lets the next kernel launch at its
  // start (dependent_grid_begin).
  bool one_wave;
  // K slice kt is in group min(kt >> group_shift, groups - 1) (its slices per
  // group a power of two: CudaStack::gemv_group_shift_).
  int32_t group_shift;
};

// One CTA row-slice of a gemm_batched dispatch: up to rows_per_cta rows.
struct BatchedWorkItem {
  int32_t expert;
  int32_t rows;
  int64_t x_row;
  int64_t out_row;
};

// Work items travel in the launch's parameter block (no device buffer, no
// copy to order against other calls); larger dispatch tables take several
// launches. 128 items keep the block under the classic 4 KiB parameter limit.
constexpr int kMaxBatchedWorkItems = 128;

// Which (tile, K range) pairs a CTA computes. Tiles are numbered x-major:
// tile = x * n_tiles + y, x a work item / routed chunk / dispatch chunk, y an
// n tile of the launch. grid = (ctas): the tiles x k_tiles K slices are dealt
// out in tile-major order, CTA c taking slices [c * W / ctas, (c + 1) * W / ctas).
// With ctas = tiles that is one tile per CTA; with ctas = tiles x s (split-K),
// s CTAs per tile whose ranges start at tile boundaries, chosen when that
// fills at least 90% of a wave (CudaStack::plan_schedule). Otherwise, when the
// tiles fit the slots of the workspace (stream-K), ctas is one full wave, and
// every SM streams the same share of the weights whatever the tile count, at
// the cost of CTAs whose range crosses into a second tile. A tile whose slices
// span several CTAs meets in its fp32 slot: each CTA but the one holding the
// tile's last K range adds its partial sum, then its slice count to the tile's
// counter; that one waits for the count, adds the slot to its own sums, stores
// the total through the epilogue and zeroes the slot and the counter, so both
// are zero between launches (graph replays too; stream_k.cuh).
struct StreamK {
  float* partials;    // [slots][rows_per_cta * kTileN], or null: no tile is shared
  int32_t* counters;  // [slots]
  int32_t tiles_x;
  int32_t n_tiles;
  // A routed launch whose routing may fill fewer tile rows than tiles_x (the
  // host's bound) plans again for the live ones (kernel.cuh) over this wave
  // (the host's, at most the grid); 0: it takes the host's plan as it is,
  // without reading the routing first.
  int32_t live_rows_wave;
};

// The workspace of a stack: slots of kStreamKSlotFloats floats (1,024 tiles
// of 8 x 128, 512 of 16 x 128, 256 of 32 x 128, 128 of 64 x 128, or of the
// wgmma tiles' 32, 64 or 128 x 256: 128, 64 or 32; 4 MiB) and their
// counters. Launches with more tiles fill the GPU without sharing one.
constexpr int kStreamKSlotFloats = 512 * 16 * 128;
constexpr int kStreamKCounters = 1024;

// The tiles the workspace holds at once. A wgmma tile spans both
// warpgroups' columns.
inline FM_HOST_DEVICE constexpr int64_t stream_k_slots(CtaTile tile) {
  const int64_t columns = tile.wgmma ? kWgmmaColumnTilesPerCta * kTileN : kTileN;
  const int64_t slots = kStreamKSlotFloats / (tile.rows * columns);
  return slots < kStreamKCounters ? slots : kStreamKCounters;
}

// The fewest K slices a CTA's share of a shared tile gets (a piece's prologue
// and reduction would cost more than a shorter share saves).
constexpr int kStreamKMinSlices = 4;

// What a CTA's extra (tile, K range) piece costs, in K slices of streaming:
// the pipeline refill after the piece boundary (about one memory latency) and
// the partial sums' reduction. v26's first rule (aligned splits only when they
// filled 90% of the wave) sent Qwen3-30B-A3B's M = 4 w2 (448 live tiles of 12
// slices on 512 CTAs) to stream-K, 10.5 slices and two pieces per CTA, and the
// layer took 19% longer than 12 slices and one piece.
constexpr int kStreamKPieceSlices = 4;

// How many CTAs of a wave of `wave` share `tiles` tiles of k_tiles K slices
// (tiles >= 1). A wave or more of tiles: one CTA per tile (the SMs stream
// the weights at their rate whatever the spread: stream-K over 1.5-2 waves
// of DeepSeek-V3 M = 2-4 and Qwen3-30B-A3B M = 8 tiles measured 2-3% slower).
// Fewer: `splits` CTAs per tile on tile-aligned K ranges (one piece per CTA:
// one prologue, at most one reduction), or stream-K's even share of the
// slices over the wave, at least kStreamKMinSlices each (mostly two pieces per
// CTA), whichever leaves the busiest CTA less to do, counting a piece as
// kStreamKPieceSlices slices. The kernel's ranges, total * b / ctas, start at
// tile boundaries when ctas is a multiple of tiles. The host plans the launch
// with it; a routed kernel plans again on the tile rows the routing filled.
inline FM_HOST_DEVICE constexpr int64_t stream_k_ctas(int64_t tiles, int64_t k_tiles, int64_t wave) {
  if (tiles >= wave) return tiles;
  const int64_t most = k_tiles / kStreamKMinSlices;
  const int64_t splits = wave / tiles < most ? wave / tiles : most;
  const int64_t even_share = tiles * k_tiles / kStreamKMinSlices;
  const int64_t even = even_share < 1 ? 1 : even_share > wave ? wave : even_share;
  if (splits >= 1) {
    const int64_t aligned_cost = ceil_div(k_tiles, splits) + kStreamKPieceSlices;
    const int64_t stream_k_cost = ceil_div(tiles * k_tiles, even) + 2 * kStreamKPieceSlices;
    if (aligned_cost <= stream_k_cost) return tiles * splits;
  }
  return even;
}

// Whether `tiles` 128-row (wgmma) tiles of k_tiles slices keep the 128-row
// CTAs on num_sms SMs (one CTA each): where they fit the workspace they share
// K (stream_k_ctas over a wave of num_sms), and the launch keeps them when
// their CTAs fill 3/4 of the SMs; otherwise the 64-row (wgmma) tiles take
// it, which split K more finely or at least fill more SMs. Measured on the H200
// (2026-12-03), Linear 128 x 256 tiles, unshared, against 64-row ones: 16
// tiles (7168 x 2048, M = 256) 187 / 68 us, 32 tiles 309 / 162, 64 tiles (M =
// 1024) 178 / 134; but 128 tiles (14336 x 4096, M = 1024: 97% of the SMs) 311
// / 479. Shared (kernel notes, v43): 16 tiles of 112 slices on 128 CTAs 31 us.
inline FM_HOST_DEVICE constexpr bool wgmma_tiles_fill(int64_t tiles, int64_t k_tiles, int64_t num_sms) {
  const int64_t ctas =
      tiles <= stream_k_slots({kWgmmaRowsPerCta, true}) ? stream_k_ctas(tiles, k_tiles, num_sms) : tiles;
  return ctas * 4 >= num_sms * 3;
}

// Whether a launch of `tiles` 32-row wgmma tiles keeps them on num_sms SMs:
// at most kSmallWgmmaTilesMaxWaves tiles an SM. Where one CTA an SM takes a
// few tiles in turn it ends the launch evenly (Qwen3-30B-A3B and
// DeepSeek-V2-Lite M = 256, 7-12 tiles an SM: 6-9% faster than the 32-row
// mma.sync tiles); over a long grid the mma.sync tiles' 3 CTAs an SM stream
// faster (DeepSeek-V3 M = 1024, 62-109 an SM: 8.5% slower on wgmma; H100,
// 2026-12-07, kernel notes v79 and v80). Measured for routed launches.
constexpr int64_t kSmallWgmmaTilesMaxWaves = 24;

inline FM_HOST_DEVICE constexpr bool small_wgmma_tiles_keep(int64_t tiles, int64_t num_sms) {
  return tiles <= kSmallWgmmaTilesMaxWaves * num_sms;
}

struct BatchedParams {
  QuantWeights w;
  GemmIO io;
  StreamK schedule;
  GemvPlan gemv;  // where the decode GEMV takes the launch (items of up to kGemvBlockRows rows)
  int32_t first_n_tile;
  int32_t num_items;
  BatchedWorkItem items[kMaxBatchedWorkItems];
};

// gemm_batched with the dispatch table in device memory (plugin ABI 1.1): the
// host cannot read it, so the grid covers every dispatch's worst case and the
// kernel reads each row, skipping rows out of range. CTA x handles row chunk
// x % chunks_per_dispatch of dispatch x / chunks_per_dispatch.
struct DeviceDispatchParams {
  QuantWeights w;
  GemmIO io;
  StreamK schedule;
  int32_t first_n_tile;
  const void* table;           // [num_dispatches, 4] (expert, in_row, out_row, m), compact
  bool table_int64;            // else int32
  int64_t num_dispatches;
  int32_t chunks_per_dispatch;  // ceil(min(x_rows, out_rows) / rows_per_cta)
  int64_t x_rows;
  int64_t out_rows;
};

// gemm_routed: CTA (row chunk, n tile). Device-resident routing, guarded in
// the kernel: positions >= *num_tokens_post_padded or >= num_positions, ids
// outside [0, num_pairs), expert ids outside [0, E) are skipped.
struct RoutedParams {
  QuantWeights w;
  GemmIO io;
  StreamK schedule;
  const int32_t* sorted_token_ids;  // null: pair routing (plugin.h, ABI 1.2), from topk_ids below
  int64_t num_positions;       // len(sorted_token_ids)
  const int32_t* expert_ids;   // [num_blocks]
  int64_t num_blocks;
  const int32_t* num_tokens_post_padded;
  int64_t block_size;
  int32_t chunks_per_block;    // ceil(block_size / rows_per_cta)
  int64_t top_k;
  int64_t num_pairs;           // num_tokens * top_k
  const float* topk_weights;   // or null
  int64_t topk_weights_stride0;
  int64_t topk_weights_stride1;
  // Pair routing: routing block x (of one row) is pair x, its expert the
  // stack's local id of topk_ids[x / top_k, x % top_k] (through expert_map).
  const void* topk_ids;
  bool topk_ids_int64;
  int64_t topk_ids_stride0;
  int64_t topk_ids_stride1;
  int64_t num_global_experts;
  const int32_t* expert_map;   // or null
  // Pair routing: the first K slices of each of its pieces a CTA asks L2 for
  // before it waits for the kernel before it (kernel.cuh,
  // prefetch_pair_weights); 0: none.
  int32_t prefetch_slices;
  GemvPlan gemv;
  // x's rows are pairs, not tokens: row p is pair p's (the act-order gather's
  // copy, gather.cuh). Read by the tiles' row tables and the decode GEMV.
  bool x_rows_by_pair;
};

// The decode GEMV (gemv.cuh): CTAs of kGemvWarps warps, each CTA one pair's
// (or one routing block's) kWarpN output columns (a slot) over all of K.
constexpr int kGemvWarps = 8;
constexpr int kGemvThreads = kGemvWarps * 32;
// The most rows of a routing block the GEMV takes: the swapped MMA's token columns.
constexpr int kGemvBlockRows = 8;
// What a unit of a GEMV launch is: a pair (one row), a routing block, or a
// gemm_batched work item (up to kGemvBlockRows rows each).
enum class GemvForm { kPairs, kBlocks, kItems };
constexpr int kNumGemvForms = 3;

// The most GEMV CTAs (units) a launch takes per SM; more go to the 8-row
// tiles. Measured on the H100 (kernel notes, v59): the layer at one token
// with launches of up to 896 units (6.8 an SM) ran 9-14% faster than on the
// 8-row tiles, and at 4 tokens of Qwen3-30B-A3B and DeepSeek-V2-Lite
// (1,056-2,048 units) 12-17% slower: each CTA streams one unit's bytes, and
// past a few waves its prologue and meeting cost more than the 8-row tiles'
// pipeline.
constexpr int kGemvMaxCtasPerSm = 7;
// The same bound for routing blocks, where experts repeat (pairs at least
// half the experts), the host's grid counting blocks the routing may leave
// empty (their CTAs leave at once). Measured on the H100 (kernel notes, v66):
// Mixtral's w13 at M = 2 (13.6 CTAs an SM, 2 blocks of 2 rows filled) 12%
// faster than the 8-row tiles, at M = 4 (27) level, at M = 8 (34) 6% slower;
// blocks of mostly one row (Qwen3-30B-A3B M = 4) 10% slower.
constexpr int kGemvMaxBlockCtasPerSm = 16;
// Whether gemm_batched's dispatches of at most max_rows rows take the GEMV
// (CudaStack::gemm_batched), as work items of up to kGemvBlockRows rows
// (the items of one slot neighbours in the grid), over `ctas` CTAs in
// `waves` waves of resident ones on num_sms SMs: where the CTAs fill 3/4 of
// the SMs (fewer leave SMs idle that the tiles' stream-K would use), for
// items of up to kGemvBlockRows rows at most kGemvMaxCtasPerSm an SM, and
// for taller dispatches (two items a slot, each dequantizing the slot's
// weights) one wave at most. Measured on the H100 (2026-12-07, kernel notes
// v82), the dense Linear against the 8- and 16-row tiles: M = 1-8 on 448 and
// 896 CTAs (4096 x 14336, 8192 x 28672) and 128 (14336 x 4096) 0.83-0.99 of
// the tiles' time, on 64 (7168 x 2048) 1.00-1.08; M = 12-16 on 128 and 256
// CTAs 0.74-0.95, on 896 and 1,792 1.04-1.37.
constexpr int64_t kGemvMaxItemRows = 2 * kGemvBlockRows;

inline FM_HOST_DEVICE constexpr bool gemv_takes_items(int64_t max_rows, int64_t ctas, int64_t waves, int64_t num_sms) {
  if (max_rows > kGemvMaxItemRows || 4 * ctas < 3 * num_sms) return false;
  return max_rows <= kGemvBlockRows ? ctas <= kGemvMaxCtasPerSm * num_sms : waves <= 1;
}

// The longest K the GEMV takes with the gated epilogue: its warps' rounds of
// slices run one after another, so a CTA's time grows with K where the 8-row
// tiles' pipeline keeps several slices in flight, and the gated rounds are
// half as long (two streams). (v59r: DeepSeek-V3 at one token, w13 over
// K = 7,168 on the GEMV, was 4% slower than the 8-row tiles; Mixtral's plain
// w2 over K = 14,336 was faster on the GEMV.)
constexpr int64_t kGemvMaxGatedK = 4096;

// Whether the one-row GEMV reads act-order x through the expert's perm
// (gemv.cuh, kPermutedX) rather than a sorted copy launched first: where
// its waves of CTAs times each warp's rounds of slices (`waves * rounds`) are
// at most kGemvPermutedXMaxRounds. The copy costs the layer a kernel (~4 us
// on the H100); the permuted read a second dependent L2 load before each
// round's token values (~0.9 us a round of each wave). Measured on the H100
// (2026-12-07, kernel notes v81), act-order layers against the copy:
// Qwen3-30B-A3B at one token (1 x 1 and 2 x 1) 5.2 us faster, at four
// tokens (3 x 1 and 8 x 1) 1.9 us slower, Mixtral at one token (4 x 2 and
// 1 x 7) 5.5 us slower.
constexpr int64_t kGemvPermutedXMaxRounds = 2;

inline FM_HOST_DEVICE constexpr bool gemv_reads_x_through_perm(int64_t waves, int64_t rounds) {
  return waves * rounds <= kGemvPermutedXMaxRounds;
}

// Slices of K a GEMV warp loads in one round: 32 words of codes per lane and
// stream (4 INT4 slices, 2 INT8 ones).
inline FM_HOST_DEVICE constexpr int gemv_chunk_slices(int bits) {
  return 32 / (bits == 4 ? WeightTileLayout<4>::kWordsPerLane : WeightTileLayout<8>::kWordsPerLane);
}

// Slots of the output window of n columns from column col_begin.
inline FM_HOST_DEVICE constexpr int gemv_slots(int64_t col_begin, int64_t n) {
  return static_cast<int>((col_begin + n - 1) / kWarpN - col_begin / kWarpN + 1);
}

// Shared memory a GEMV CTA stages its columns' group scales and zero
// operands in (a float and two words a column): `streams` weight slots (2
// with the gated epilogue) of every group.
inline FM_HOST_DEVICE constexpr int64_t gemv_quant_bytes(int64_t num_groups, int streams) {
  return streams * num_groups * kWarpN * (4 + 8);
}
// The most a launch stages (more: the 8-row tiles take the call), and a
// bound on each form's static shared memory beside it (pairs: the token row,
// 4 KiB; blocks: the block's rows, 33 KiB).
constexpr int64_t kGemvMaxQuantBytes = 96 * 1024;
inline FM_HOST_DEVICE constexpr int64_t gemv_static_smem(bool blocks) { return (blocks ? 40 : 8) * 1024; }

// What a GEMV CTA of either form (blocks: routing blocks) may stage on the
// current device: kGemvMaxQuantBytes, or less where a CTA's shared memory is
// smaller (compute capability 8.6, 8.9 and 12.x: 99 KiB).
inline cudaError_t gemv_max_quant_bytes(bool blocks, int64_t* bytes) {
  int device = 0, optin = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  *bytes = status == cudaSuccess ? std::min<int64_t>(kGemvMaxQuantBytes, optin - gemv_static_smem(blocks)) : 0;
  return status;
}

// Raises the kernels' dynamic shared memory limit on the current device (the
// 64-row INT8 variant needs more than the default 48 KiB), the 128-row tiles'
// only where they run (wgmma_tiles_built). Call once per device before
// launching, outside any stream capture.
cudaError_t configure_gemm_kernels(ComputeType type, int bits, bool wgmma_tiles);
// Whether the code loaded for the current device has the wgmma tiles (an sm_90a
// build on compute capability 9.0; a plain sm_90 or PTX build does not).
cudaError_t wgmma_tiles_built(bool* built);
// How many routed CTAs of `tile` one SM holds at once (registers, shared
// memory).
cudaError_t gemm_ctas_per_sm(ComputeType type, int bits, CtaTile tile, int* ctas);

// grid = (ctas), walking params.schedule (StreamK). `tile` is one of
// layout.hpp's kCtaTiles. Routed: tiles_x = routing blocks processed x
// chunks_per_block; blocks past them are not processed (see stack.cpp for
// why none can hold work).
cudaError_t launch_gemm_batched(const BatchedParams& params, ComputeType type, int bits, CtaTile tile, int ctas,
                                cudaStream_t stream);
cudaError_t launch_gemm_device_dispatch(const DeviceDispatchParams& params, ComputeType type, int bits,
                                        CtaTile tile, int ctas, cudaStream_t stream);
cudaError_t launch_gemm_routed(const RoutedParams& params, ComputeType type, int bits, CtaTile tile, int ctas,
                               cudaStream_t stream);
// The decode GEMV (gemv.cuh) over pair routing (form kPairs: `ctas` = one
// CTA per pair and slot of the window, gemv_slots) or routing blocks of up
// to kGemvBlockRows rows (kBlocks: one CTA per block and slot), gated where
// io.gate_up_tiles > 0, staging quant_bytes (gemv_quant_bytes).
cudaError_t launch_gemm_gemv(const RoutedParams& params, ComputeType type, int bits, GemvForm form,
                             int64_t quant_bytes, int ctas, cudaStream_t stream);
// The decode GEMV over gemm_batched's work items (each of up to
// kGemvBlockRows rows): `ctas` = one CTA per item and slot of the window.
cudaError_t launch_gemm_gemv(const BatchedParams& params, ComputeType type, int bits, int64_t quant_bytes, int ctas,
                             cudaStream_t stream);
// How many GEMV CTAs of `form` staging quant_bytes one SM holds at once
// (work items: plain results only).
cudaError_t gemv_ctas_per_sm(ComputeType type, int bits, bool gated, GemvForm form, int64_t quant_bytes, int* ctas);

// Act-order (gather.cuh): x's columns in each row's expert order, into
// x_sorted (16-byte aligned, rows row_stride elements apart: a multiple of 8
// and at least k rounded up to 8). Routed: row p is pair p of params' routing
// (params.w.perm and params.io.x as the GEMM would take them), over
// `positions` routing positions (pairs under pair routing). Rows: x_rows rows
// of x (row stride x_row_stride), all through `perm` (one expert's).
cudaError_t launch_gather_routed(const RoutedParams& params, int64_t positions, void* x_sorted, int64_t row_stride,
                                 cudaStream_t stream);
cudaError_t launch_gather_rows(const int32_t* perm, int k, const void* x, int64_t x_rows, int64_t x_row_stride,
                               void* x_sorted, int64_t row_stride, cudaStream_t stream);

}  // namespace ferrum_moe_cuda::gemm

#endif  // FERRUM_MOE_CUDA_GEMM_PARAMS_HPP_
