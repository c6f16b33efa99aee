// The decode GEMV: pair routing (one token row per pair), routing blocks of
// up to 8 rows, or gemm_batched's work items of up to 8 rows (the dense
// Linear's few rows), without a pipeline or a K split across CTAs. A CTA
// computes one pair's (or block's) 32 output columns (a warp slot of the
// weight layout, layout.hpp) over the whole of K: its 8 warps split K, each
// issues the 16-byte weight loads of several K slices at once into registers
// (no shared-memory stages, no per-slice barrier; each slice's registers take
// the next round's slice as soon as its MMAs have read them), multiplies them by the
// token rows on the swapped mma.sync (the weights the 16-row A operand, the
// pair's token the one stored column of B (the other seven copies of it), or a block's rows its 8 columns),
// and the warps' sums meet in shared memory at the end. The scales and zero codes of the CTA's columns
// are staged in shared memory while the first weights are in flight. With the
// gated epilogue (GemmIO::gate_up_tiles) the CTA also streams the same slot
// of the up columns and stores silu(gate) * up.
//
// Against the 8-row tiles' stream-K walk at one token (kernel notes, v59):
// there each CTA waits for its first copies, then per slice for a stage and a
// CTA barrier, and a tile split over several CTAs meets through global memory.
// Here the only dependent steps are the routing read, one round of loads per
// chunk of slices and one CTA barrier.
//
// With pair routing, the routing read, the first round of weight loads and
// the scale staging come before the CTA waits for the kernel before it
// (dependent_launch.cuh), so a CTA placed while that kernel finishes has its
// weights in flight, and after the wait only reads the routing again (kept
// when it is unchanged) and its token values. Routing blocks are written by
// the layer's align step just before: that form does all of it after the wait.
// Work items travel in the launch's parameters: that form issues its weights
// and stages its scales before the wait too, and reads x after it.
#ifndef FERRUM_MOE_CUDA_GEMM_GEMV_CUH_
#define FERRUM_MOE_CUDA_GEMM_GEMV_CUH_

#include <cstdint>
#include <type_traits>

#include "dependent_launch.cuh"
#include "gemm/dequant.cuh"
#include "gemm/epilogue.cuh"
#include "gemm/kernel.cuh"
#include "gemm/layout.hpp"
#include "gemm/params.hpp"
#include "gemm/ptx.cuh"

namespace ferrum_moe_cuda::gemm {

// kStreams 1: plain results of the CTA's slot; 2: the gated epilogue (the
// gate slot, then the same slot of its up tile). kRows 1: pair routing (unit
// u of the grid is pair u); kGemvBlockRows: routing blocks of up to that many
// rows (unit u is block u, its rows the MMA's token columns, so the expert's
// weights are read once for all of them), or with Params = BatchedParams
// gemm_batched's work items of up to that many rows (unit u is item u; units
// of one slot are neighbours in the grid, so that the items of one tall
// dispatch read its weights from DRAM once). kPermutedX (one row only): an
// act-order stack's x as the caller gave it, each value read through the
// expert's perm (no sorted copy launched first, where the launch is short:
// params.hpp, gemv_reads_x_through_perm; kernel notes v81); its own kernel,
// so that the plain one's registers stay as they are.
template <class T, int kBits, int kStreams, int kRows, bool kPermutedX, class Params>
__global__ void __launch_bounds__(kGemvThreads, 2) gemv_kernel(const __grid_constant__ Params p) {
  constexpr bool kItems = std::is_same_v<Params, BatchedParams>;
  static_assert(kItems || std::is_same_v<Params, RoutedParams>, "routed or batched");
  static_assert(kRows == 1 || kRows == kGemvBlockRows, "one token column, or all eight");
  static_assert(!kPermutedX || kRows == 1, "blocks read the sorted copy");
  static_assert(!kItems || (kRows > 1 && kStreams == 1), "work items: plain results of up to eight rows");
  using Tile = WeightTileLayout<kBits>;
  constexpr int kChunk = gemv_chunk_slices(kBits);  // slices a round
  constexpr int kLoads = Tile::kLoadsPerLane;
  constexpr int kWarpSlots = kTileN / kWarpN;
  // Each warp's token rows of a round: kChunk slices of kTileK values, then 8
  // more (padding, so that ldmatrix's 8 rows of a matrix fall in different
  // banks). After the loop the warp's region holds its sums.
  constexpr int kXChunk = kChunk * kTileK;
  constexpr int kXStride = kXChunk + 8;
  __shared__ alignas(16) uint16_t x_chunk[kGemvWarps][kRows][kXStride];
  // kRows > 1: each row's token offset in x (-1: no pair), output row and
  // router weight (fill_block_row, or the work item's rows with weight 1).
  __shared__ RowTable<kRows> rows;
  extern __shared__ uint4 quant_raw[];
  static_assert(sizeof(x_chunk) + sizeof(rows) <= gemv_static_smem(kRows > 1), "params.hpp's bound");
  static_assert(kStreams * kRows * kWarpN * sizeof(float) <= sizeof(x_chunk[0]), "a warp's sums fit its rows");

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const QuantWeights& w = p.w;
  const GemmIO& io = p.io;
  // The window's slots, from the one holding column io.col_begin.
  const int first_slot = static_cast<int>(io.col_begin / kWarpN);
  const int slots = gemv_slots(io.col_begin, io.n);
  int64_t unit;
  int slot;
  if constexpr (kItems) {
    slot = static_cast<int>(blockIdx.x / p.num_items);
    unit = blockIdx.x - int64_t{slot} * p.num_items;
  } else {
    unit = blockIdx.x / slots;
    slot = static_cast<int>(blockIdx.x - unit * slots);
  }
  PairSlot at{};  // (one row: the unit's pair)
  if constexpr (!kItems && kRows == 1) at = pair_slot(unit, p.top_k);
  const int k_tiles = w.k_tiles;
  const int kt_begin = k_tiles * warp / kGemvWarps, kt_end = k_tiles * (warp + 1) / kGemvWarps;
  const int groups = w.num_groups;
  // [stream][group][column]: the zero operands (int_zero_operands, the
  // symmetric ones where the stack has no zeros), then the scales as floats.
  auto* zero_table = reinterpret_cast<uint2*>(quant_raw);
  auto* scale_table = reinterpret_cast<float*>(zero_table + kStreams * groups * kWarpN);
  constexpr uint32_t kSymmetricZero = 1u << (kBits - 1);
  const IntZeros symmetric = int_zero_operands<T, kBits>(kSymmetricZero);

  // The CTA's columns in each stream: slot `slot` of the output, and with the
  // gated epilogue the same slot gate_up_tiles tiles on.
  const auto* tiles = static_cast<const uint4*>(w.tiles);
  const uint4* src[kStreams];
  int first_column[kStreams];
#pragma unroll
  for (int s = 0; s < kStreams; ++s) first_column[s] = (first_slot + slot) * kWarpN + s * io.gate_up_tiles * kTileN;

  // One round of codes: slices kt .. kt + kChunk - 1 (those below kt_end),
  // slice kt + c in codes[.][c].
  uint4 codes[kStreams][kChunk][kLoads];
  auto load_slice = [&](int kt, int c) {
#pragma unroll
    for (int s = 0; s < kStreams; ++s)
#pragma unroll
      for (int j = 0; j < kLoads; ++j)
        codes[s][c][j] = load_streaming_16(src[s] + (kt - kt_begin + c) * Tile::kUint4s + j * 32);
  };
  auto load_codes = [&](int kt) {
#pragma unroll
    for (int c = 0; c < kChunk; ++c) {
      if (kt + c >= kt_end) break;
      load_slice(kt, c);
    }
  };
  // Expert e's first round, and the scales and zero operands of the CTA's
  // columns in every group staged in shared memory while those loads are in
  // flight (the loop then reads them ready, with no conversion and no branch
  // on the stack's zeros). Each thread stages its own entries, so a thread
  // that read other routing before the wait than after it stages again alone.
  auto start_expert = [&](int e) {
#pragma unroll
    for (int s = 0; s < kStreams; ++s) {
      const int64_t n_tile = first_column[s] / kTileN;
      src[s] = tiles + ((static_cast<int64_t>(e) * w.n_tiles + n_tile) * k_tiles + kt_begin) * Tile::kUint4s +
               Tile::uint4_index((first_column[s] / kWarpN) % kWarpSlots, 0, lane);
    }
    if (kt_begin < kt_end) load_codes(kt_begin);
    // Four columns an entry (one 8-byte load of their scales, one 4-byte
    // load of their zero codes), unrolled so that several entries' loads are
    // in flight at once: at Mixtral's w2 (112 groups) a thread stages 4
    // entries, and one load after another cost 10% of the layer (v65).
    constexpr int kQuads = kWarpN / 4;
    const int64_t plane = static_cast<int64_t>(e) * groups * w.n_padded;
#pragma unroll 4
    for (int i = threadIdx.x; i < kStreams * groups * kQuads; i += kGemvThreads) {
      const int s = i / (groups * kQuads), g = (i / kQuads) % groups, quad = i % kQuads;
      const int64_t at = plane + static_cast<int64_t>(g) * w.n_padded + first_column[s] + 4 * quad;
      const uint2 raw = __ldg(reinterpret_cast<const uint2*>(w.scales + at));
      const uint32_t codes4 = w.zeros != nullptr ? __ldg(reinterpret_cast<const uint32_t*>(w.zeros + at)) : 0;
      const uint16_t scale_bits[4] = {static_cast<uint16_t>(raw.x), static_cast<uint16_t>(raw.x >> 16),
                                      static_cast<uint16_t>(raw.y), static_cast<uint16_t>(raw.y >> 16)};
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const IntZeros z =
            w.zeros != nullptr ? int_zero_operands<T, kBits>((codes4 >> (8 * c)) & 0xFFu) : symmetric;
        scale_table[4 * i + c] = raw_to_float<T>(scale_bits[c]);
        zero_table[4 * i + c] = make_uint2(z.even, z.odd);
      }
    }
  };

  if (p.gemv.one_wave) dependent_grid_release();
  int expert = -1;
  if constexpr (kItems) {
    // The item is the launch's own: its expert's first round and scales
    // before the wait, x (the kernel before may write it) after.
    const BatchedWorkItem& item = p.items[unit];
    expert = item.expert;
    if (threadIdx.x < kRows) {
      const int r = static_cast<int>(threadIdx.x);
      rows.x_offset[r] = r < item.rows ? (item.x_row + r) * io.x_row_stride : -1;
      rows.out_row[r] = r < item.rows ? item.out_row + r : -1;
      rows.weight[r] = 1.0f;
    }
    start_expert(expert);
    dependent_grid_begin(false);
  } else if constexpr (kRows == 1) {
    // Before the wait for the kernel before this one: nothing the weights
    // depend on is written in the layer, so the CTA reads its routing early
    // (through L2 only, routing.cuh), issues that expert's first round and
    // stages its scales, all under the previous kernel's tail.
    expert = pair_expert<true>(p, at);
    if (expert >= 0) start_expert(expert);
    dependent_grid_begin(false);
    // The routing the results use, read after the wait: the kernel before the
    // layer's first one (the caller's router) may have changed it since.
    const int settled = pair_expert(p, at);
    if (settled != expert) {
      expert = settled;
      if (expert >= 0) start_expert(expert);
    }
    if (expert < 0) return;  // dropped: its row stays as it was (the whole CTA leaves)
  } else {
    // Blocks are written by the layer's align step, just before: read after
    // the wait, as gemm_routed_kernel reads them (one chunk: the whole block).
    dependent_grid_begin(false);
    expert = fill_block_row(p, unit, 0, rows, static_cast<int>(threadIdx.x)).expert;
    if (expert < 0 || expert >= w.num_experts) return;  // padding past the count, or a skipped block
    start_expert(expert);
  }

  // Lane l's 8 token values of slice kt + l / 8 in a round from kt: one row
  // through registers (loaded while the round before computes), or each of
  // the block's rows copied straight to shared memory, zeros past K and for
  // rows without a pair. kPermutedX: sorted row k's value is x's column
  // perm[k] (perm and the row from L1 / L2).
  int64_t x_row = 0;  // (one row: unit is the pair)
  if constexpr (kRows == 1) x_row = p.x_rows_by_pair ? unit : at.token;
  const auto* x = static_cast<const uint16_t*>(io.x) + x_row * io.x_row_stride;
  const int32_t* perm = kPermutedX ? w.perm + static_cast<int64_t>(expert) * w.k : nullptr;
  uint4 x_part = make_uint4(0, 0, 0, 0);
  auto load_x = [&](int kt) {
    const int first_k = (kt + lane / 8) * kTileK + 8 * (lane % 8);
    x_part = make_uint4(0, 0, 0, 0);
    if (lane < kChunk * 8 && kt + lane / 8 < kt_end) {
      if constexpr (kPermutedX) {
        uint16_t v[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = first_k + i < w.k ? x[__ldg(perm + first_k + i)] : 0;
        memcpy(&x_part, v, sizeof(v));
      } else if (first_k + 8 <= w.k) {
        x_part = *reinterpret_cast<const uint4*>(x + first_k);
      } else {
        uint16_t v[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = first_k + i < w.k ? x[first_k + i] : 0;  // columns past K read as 0
        memcpy(&x_part, v, sizeof(v));
      }
    }
  };
  auto copy_x = [&](int kt) {
    const int first_k = (kt + lane / 8) * kTileK + 8 * (lane % 8);
    const int bytes = kt + lane / 8 < kt_end ? 2 * max(0, min(8, w.k - first_k)) : 0;
    if (lane < kChunk * 8) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int64_t row = rows.x_offset[r];
        const bool live = row >= 0 && bytes > 0;
        cp_async_16(shared_address(&x_chunk[warp][r][8 * lane]), live ? x + row + first_k : x, live ? bytes : 0);
      }
    }
    cp_async_commit();
  };
  if constexpr (kRows == 1) {
    if (kt_begin < kt_end) load_x(kt_begin);
  }
  __syncthreads();  // the staged scales (and kRows > 1: the rows)
  if constexpr (kRows > 1) {
    if (kt_begin < kt_end) copy_x(kt_begin);
  }

  // ldmatrix: lane 8j + i gives matrix j's row i, token row i of chunk 4p + j
  // of the slice's pair of k-steps p. One row: every lane gives the token's
  // row, so the MMA's seven other token columns are copies of it, whose sums
  // are never stored (only rows below kRows are), and each matrix's address
  // is this lane's base plus a constant (no per-chunk address registers).
  const uint32_t lane_row = shared_address(&x_chunk[warp][kRows > 1 ? lane % 8 : 0][0]) + (lane / 8) * 16;
  // The lane's column in n8 block nt is lane / 4 + 8 nt (layout.hpp, fragment_n).
  const int column = lane / 4;

  float acc[kStreams][2][4] = {};
  for (int kt = kt_begin; kt < kt_end; kt += kChunk) {
    const bool more = kt + kChunk < kt_end;
    if constexpr (kRows == 1) {
      __syncwarp();  // the last round's token fragments are read
      if (lane < kChunk * 8) *reinterpret_cast<uint4*>(&x_chunk[warp][0][8 * lane]) = x_part;
      if (more) load_x(kt + kChunk);  // x_part is free again: the next round's values in flight
    } else {
      cp_async_wait<0>();
    }
    __syncwarp();
#pragma unroll
    for (int c = 0; c < kChunk; ++c) {
      if (kt + c >= kt_end) break;
      uint32_t tokens[2][4];
#pragma unroll
      for (int pk = 0; pk < 2; ++pk) {
        ldmatrix_x4(tokens[pk], lane_row + (c * kTileK + 4 * pk * 8) * 2);
      }
      const int group = min((kt + c) >> p.gemv.group_shift, groups - 1);
#pragma unroll
      for (int s = 0; s < kStreams; ++s) {
        uint32_t words[Tile::kWordsPerLane];
#pragma unroll
        for (int j = 0; j < kLoads; ++j) {
          words[4 * j + 0] = codes[s][c][j].x;
          words[4 * j + 1] = codes[s][c][j].y;
          words[4 * j + 2] = codes[s][c][j].z;
          words[4 * j + 3] = codes[s][c][j].w;
        }
        const int quant_row = (s * groups + group) * kWarpN + column;
        IntZeros zero_ops[kNFrags];
        float scale[kNFrags];
#pragma unroll
        for (int nt = 0; nt < kNFrags; ++nt) {
          const uint2 z = zero_table[quant_row + 8 * nt];
          zero_ops[nt] = {z.x, z.y};
          scale[nt] = scale_table[quant_row + 8 * nt];
        }
        float part[2][4] = {};
#pragma unroll
        for (int ks = 0; ks < kKSteps; ++ks) {
          uint32_t a[2][4];
          int_column_pairs<T, kBits>(words, ks, zero_ops, a);
          const uint32_t b[2] = {tokens[ks / 2][2 * (ks % 2)], tokens[ks / 2][2 * (ks % 2) + 1]};
          mma_16816<T>(part[0], a[0], b);
          mma_16816<T>(part[1], a[1], b);
        }
        // [h][i]: column h * 16 + lane / 4 (+ 8 for i >= 2), n8 block 2h + i / 2.
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[s][h][i] += part[h][i] * scale[2 * h + i / 2];
      }
      // Slice c's registers are free: the next round's slice c in flight
      // while this round computes on.
      if (kt + kChunk + c < kt_end) load_slice(kt + kChunk, c);
    }
    if constexpr (kRows > 1) {
      if (more) {
        __syncwarp();  // this round's token fragments are read
        copy_x(kt + kChunk);
      }
    }
  }

  // acc[s][h][i] is token column 2 (lane % 4) + i % 2 (AccumulatorLayout's
  // swapped rows): the warp's sums go to its own rows' region, [s][row][column].
  __syncwarp();
  auto* own = reinterpret_cast<float*>(&x_chunk[warp][0][0]);
#pragma unroll
  for (int s = 0; s < kStreams; ++s)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = 2 * (lane % 4) + i % 2;
        if (row < kRows) own[(s * kRows + row) * kWarpN + h * 16 + column + 8 * (i / 2)] = acc[s][h][i];
      }
  __syncthreads();
  // Warp r meets row r's sums over the warps.
  static_assert(kRows <= kGemvWarps, "a warp per row");
  if (warp >= kRows) return;
  const int64_t out_row = kRows == 1 ? unit : rows.out_row[warp];
  const int64_t j = first_column[0] + lane - io.col_begin;
  if (out_row < 0 || j < 0 || j >= io.n) return;
  float total[kStreams];
#pragma unroll
  for (int s = 0; s < kStreams; ++s) {
    total[s] = 0.0f;
#pragma unroll
    for (int v = 0; v < kGemvWarps; ++v) {
      total[s] += reinterpret_cast<const float*>(&x_chunk[v][0][0])[(s * kRows + warp) * kWarpN + lane];
    }
  }
  float weight;
  if constexpr (kRows == 1) {
    weight = pair_weight(p, at);
  } else {
    weight = rows.weight[warp];
  }
  const int64_t index = out_row * io.out_row_stride + j * io.out_col_stride;
  if constexpr (kStreams == 2) {
    // As store_results_gated_tiny: silu(gate * w) * (up * w).
    const float gate = total[0] * weight, up = total[1] * weight;
    static_cast<T*>(io.out)[index] = float_to<T>(silu_times(gate, up));
  } else {
    // As the tiles' epilogue: (sum + bias) * w.
    const float value = (total[0] + (io.bias != nullptr ? raw_to_float<T>(io.bias[j]) : 0.0f)) * weight;
    if (io.out_float32) {
      static_cast<float*>(io.out)[index] = value;
    } else {
      static_cast<T*>(io.out)[index] = float_to<T>(value);
    }
  }
}

}  // namespace ferrum_moe_cuda::gemm

#endif  // FERRUM_MOE_CUDA_GEMM_GEMV_CUH_
