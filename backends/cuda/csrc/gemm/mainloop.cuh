// The GEMM mainloop: a kStages-deep cp.async pipeline over K slices. Per
// slice, every thread copies its own weight codes (16-byte loads, layout.hpp)
// and a share of the A tile; then each warp dequantizes its 32 columns in
// registers and issues mma.sync against ldmatrix'ed token fragments. The
// wgmma tiles (Hopper: 32, 64 or 128 rows) are warp-specialised instead: a
// producer warpgroup copies (produce()), two computing warpgroups dequantize
// and issue wgmma, and the stages pass between them through mbarriers
// (PipelineBarriers).
#ifndef FERRUM_MOE_CUDA_GEMM_MAINLOOP_CUH_
#define FERRUM_MOE_CUDA_GEMM_MAINLOOP_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "gemm/dequant.cuh"
#include "gemm/layout.hpp"
#include "gemm/params.hpp"
#include "gemm/ptx.cuh"
#include "gemm/traits.cuh"
#include "gemm/wgmma.cuh"

namespace ferrum_moe_cuda::gemm {

// Zero points and scales for one B register (two consecutive k rows of one
// column), packed the way dequant_pair takes them (zero_operand()).
struct PairQuantParams {
  uint32_t zero_codes;
  uint32_t scale_bits;
};

// The warp-specialised tiles' stage handshake (slices counted over all the
// CTA's tiles): full[s] completes when the producer's copies of the slice in
// stage s have landed (one arrival per producer thread, made when its own
// copies land: mbarrier_arrive_on_copies); phase p of full[s] is slice s + p * kStages.
// empty[(j - 1) % kStages] completes when every computing thread, in slice
// j, is done with slice j - 1: each slice releases the one before it without
// a branch, so the CTA's first "releases slice -1", an extra first phase of
// empty[kStages - 1] (empty_parity counts it), which the producer waits for
// before slice kStages - 1 as for any other release: every phase a
// computing thread arrives on after its first was waited for.
template <int kStages>
struct PipelineBarriers {
  uint64_t full[kStages];
  uint64_t empty[kStages];

  // Parity of the phase of empty[slice % kStages] that releases slice
  // slice - kStages (slice >= kStages - 1): phase (slice + 1) / kStages - 1
  // (one more than the plain count for the last stage, whose first phase
  // is slice -1's).
  static __device__ __forceinline__ uint32_t empty_parity(int slice) {
    return static_cast<uint32_t>((slice + 1) / kStages + 1) & 1;
  }

  __device__ void init(int producers, int consumers) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&full[s], producers);
      mbarrier_init(&empty[s], consumers);
    }
  }
};

template <class T, int kBits, int kTileRows, bool kWgmmaTile = kTileRows == kWgmmaRowsPerCta>
class Mainloop {
 public:
  using Traits = GemmTraits<T, kBits, kTileRows, kWgmmaTile>;
  using Tile = typename Traits::Tile;
  static constexpr int kRows = Traits::kRows;
  static constexpr int kStages = Traits::kStages;
  // Symmetric quantization stores no zeros: the zero point is mid-range.
  static constexpr uint32_t kSymmetricZero = 1u << (kBits - 1);

  // wgmma tiles (Hopper, sm_90a; 128, 64 or 32 tokens): the warpgroup's weights
  // are wgmma's register A operand (C^T = W^T X^T), the A tile of tokens its
  // shared-memory B operand; two m64nNk16 (N the tile's tokens) per k-step
  // (the warp's n8 blocks 0-1 and 2-3), accumulators in the wgmma D layout.
  // (64-token tiles on wgmma without warp specialisation measured no faster
  // than on mma.sync: kernel-notes v12; v77 is the warp-specialised one.)
  static constexpr bool kWgmma = Traits::kWgmma;
  static_assert(kWgmma == Traits::kWarpSpecialized,
                "the wgmma tiles are the warp-specialised ones: the copying tiles' pipeline below has no wgmma");
  // 8-token tiles (decode) swap mma.sync's operands the same way: the
  // dequantized weights are the m16 A operand (16 columns), the tokens the n8
  // B operand, so one MMA covers 16 columns instead of 8 and idle token rows
  // cost half the MMAs, ldmatrix reads and accumulators of a 16-row tile.
  static constexpr bool kSwapped = Traits::kSwapped;
  static constexpr int kMTiles = kRows / kMmaM;  // m16 token tiles of the other mma.sync tiles
  // (The mma.sync shape's extent is a placeholder where kMTiles is 0: the
  // swapped tiles take the middle type.)
  using Accumulators =
      std::conditional_t<kWgmma, float[2][kRows / 2],
                         std::conditional_t<kSwapped, float[2][4], float[kMTiles > 0 ? kMTiles : 1][kNFrags][4]>>;
  // The 8- to 32-row mma.sync tiles accumulate exact integer weights per
  // group and scale the partial sums once per group: there the dequant, not
  // the MMA, bounds the rate. 64-row tiles spread one scaled dequant over four
  // MMAs and keep a single accumulator set (registers); the wgmma tiles, 32
  // rows too, scale before (their accumulators are wgmma's).
  static constexpr bool kScaleAfter = kRows <= kMediumRowsPerCta && !Traits::kWgmma;
  // Slices the copying tiles load ahead of the one computed (the
  // warp-specialised producer is paced by the stages' empty barriers alone).
  static constexpr int kLoadAhead = kStages - 1;
  // wgmma groups (one per k-step) left in flight while the next k-step's
  // weights are dequantized: each holds its own registers until it completes.
  static constexpr int kWgmmaInFlight = 1;
  using Barriers = PipelineBarriers<kStages>;

  // This thread's index among the computing threads (the warp-specialised
  // tiles' copying warpgroup comes first; its threads get 0 here, unused).
  static __device__ __forceinline__ int compute_tid() {
    if constexpr (Traits::kWarpSpecialized) return max(static_cast<int>(threadIdx.x) - Traits::kProducerThreads, 0);
    return static_cast<int>(threadIdx.x);
  }

  // Tiles from the CTA's first 128-column tile to its second warpgroup's:
  // the next one, or the gated epilogue's up tile.
  static __device__ __forceinline__ int second_tile_step(const GemmIO& io) {
    return io.gate_up_tiles > 0 ? io.gate_up_tiles : 1;
  }

  __device__ Mainloop(const QuantWeights& w, const GemmIO& io, const RowTable<kRows>& rows,
                      int expert, int cta_n_tile, uint8_t* smem)
      : w_(w),
        io_(io),
        rows_(rows),
        expert_(expert),
        warp_((compute_tid() % kThreads) / 32),
        lane_(threadIdx.x % 32),
        a_smem_(smem),
        b_smem_(smem + kStages * Traits::kAStageBytes + (compute_tid() / kThreads) * Tile::kBytes),
        quant_smem_(smem + kStages * (Traits::kAStageBytes + Traits::kBStageBytes)) {
    // A second warpgroup takes the next 128 columns (clamped to the stack's
    // last tile: columns past the window are never stored), or the gated
    // epilogue's up tile (params.hpp, GemmIO::gate_up_tiles).
    const int second = Traits::kWarpgroups > 1 ? second_tile_step(io) : 1;
    int n_tile = min(cta_n_tile + (compute_tid() / kThreads) * second, w.n_tiles - 1);
    // The warp's 32-column slot of tile n_tile. The gated epilogue on the
    // 8-row tiles (params.hpp, GemmIO::gate_up_tiles): CTA tile y is half
    // y % 2 of gate tile y / 2; warps 0-1 take that half's two slots of the
    // gate tile, warps 2-3 the same slots of its up tile (epilogue.cuh,
    // store_results_gated_tiny). The slot places the warp's weights, scales
    // and columns; its shared-memory area stays warp_'s.
    int slot = warp_;
    if constexpr (kSwapped) {
      if (io.gate_up_tiles > 0) {
        slot = warp_ % 2 + 2 * (cta_n_tile % 2);
        n_tile = min(cta_n_tile / 2 + (warp_ >= 2 ? io.gate_up_tiles : 0), w.n_tiles - 1);
      }
    }
    // The lane's first 16-byte load of K slice 0; slice kt is kt * kUint4s on.
    // (The warp-specialised producer copies both warpgroups' tiles whole.)
    const auto* tiles = static_cast<const uint4*>(w.tiles);
    if constexpr (Traits::kWarpSpecialized) {
      b_src_ = tiles + (static_cast<int64_t>(expert) * w.n_tiles + min(cta_n_tile, w.n_tiles - 1)) * w.k_tiles *
                           Tile::kUint4s + threadIdx.x;
      b_src_second_ = tiles + (static_cast<int64_t>(expert) * w.n_tiles +
                               min(cta_n_tile + second_tile_step(io), w.n_tiles - 1)) *
                                  w.k_tiles * Tile::kUint4s + threadIdx.x;
    } else {
      b_src_ = tiles + (static_cast<int64_t>(expert) * w.n_tiles + n_tile) * w.k_tiles * Tile::kUint4s +
               Tile::uint4_index(slot, 0, lane_);
    }
    perm_ = w.perm != nullptr ? w.perm + static_cast<int64_t>(expert) * w.k : nullptr;
    // Address math hoisted out of the k-loop (v1 spent most of its issue slots
    // here): the expert's scale/zero planes, and the lane's column in each of
    // its kNFrags fragments, which are the same in every K slice.
    const int64_t plane = static_cast<int64_t>(expert) * w.num_groups * w.n_padded;
    scales_ = w.scales + plane;
    zeros_ = w.zeros != nullptr ? w.zeros + plane : nullptr;
    column_ = n_tile * kTileN + fragment_n(0, slot, lane_);
    c_column_ = n_tile * kTileN + slot * kWarpN + 2 * (lane_ % 4);
    steps_per_group_ = w.group_size / kMmaK;
    first_n_tile_ = cta_n_tile;
    a_chunk_ = threadIdx.x % Traits::kAChunksPerRow;
    a_dst_ = Traits::a_offset(threadIdx.x / Traits::kAChunksPerRow, a_chunk_);
    if constexpr (kCacheRowOffsets) {
#pragma unroll
      for (int u = 0; u < Traits::kAChunksPerThread; ++u) a_row_offset_[u] = row_offset(u);
    }
    // ldmatrix x4: lanes 0-15 address rows 0-15 at k 0-7 of a k-step, lanes
    // 16-31 the same rows at k 8-15. Rows 16 apart share a swizzle, so m-tile
    // mt only adds mt * 16 rows to these. Swapped (8 rows): lanes 8j-8j+7
    // address the 8 rows at chunk 4p + j, the B fragments of k-steps 2p and
    // 2p + 1 (entry p).
#pragma unroll
    for (int ks = 0; ks < (kSwapped ? kKSteps / 2 : kKSteps); ++ks) {
      a_offset_[ks] = kSwapped ? Traits::a_offset(lane_ % 8, 4 * ks + lane_ / 8)
                               : Traits::a_offset(lane_ % 16, ks * 2 + lane_ / 16);
    }
  }

  // The warp-specialised producer: copies slices [kt_begin, kt_end) into the
  // stages, slice i once the computing threads have released slice
  // i - kStages. It never waits on its own copies: each thread's arrival on
  // the slice's full barrier is made by the hardware once its copies have
  // landed (mbarrier_arrive_on_copies), so up to kStages - 1 slices are in
  // flight and a consumer waits for its slice's bytes, not for the producer's
  // next issue. `pipe`: slices the CTA's pipeline passed before this tile.
  __device__ void produce(Barriers& barriers, int pipe, int kt_begin, int kt_end) const {
    const int k_tiles = kt_end - kt_begin;
    // The producer issues every copy of the CTA, one warp per scheduler: at
    // the generic copy's ~20 instructions per chunk it, not the tensor cores,
    // set the pace (kernel notes, v17). Whole aligned slices take a copy of
    // two or three instructions: the row's source in 16-byte units from x
    // (32 bits: register room), kept from the tile's start, and a cp.async
    // whose byte count zero-fills unused rows (harmless: their results are
    // never stored) instead of branching; their source is row 0, which every
    // slice of the fast path has.
    constexpr int kA = Traits::kAChunksPerThread;
    constexpr int kRowsPerPass = Traits::kCopyThreads / Traits::kAChunksPerRow;
    constexpr int kChunksPerSlice = kTileK * static_cast<int>(sizeof(T)) / 16;
    // load_a's element path (act-order, unaligned x) stores A with st.shared,
    // not cp.async: its slices wait for their copies and arrive themselves.
    const bool stores_a = !(io_.x_vector_loads && perm_ == nullptr);
    bool fast = !stores_a;
    const auto* x_chunks = static_cast<const uint4*>(io_.x);
    uint32_t a_unit[kA];
    uint32_t used_rows = 0;
#pragma unroll
    for (int u = 0; u < kA; ++u) {
      const int64_t offset = row_offset(u);
      used_rows |= static_cast<uint32_t>(offset >= 0) << u;
      const int64_t unit = (max(offset, int64_t{0}) + a_chunk_ * 8) / 8;
      fast = fast && unit + w_.k / 8 <= UINT32_MAX;  // an x past 64 GiB takes the generic copy
      a_unit[u] = static_cast<uint32_t>(unit);
    }
    // Groups of whole slices (the computing warps' GroupMode::kSlice): each
    // slice's group scales and zeros go into its stage (the slice's group,
    // counted without a division per slice).
    const GroupCopy group_src = slice_groups() ? group_copy() : GroupCopy{nullptr, 0, 0};
    const int slices_per_group = max(steps_per_group_ / kKSteps, 1);
    int group = kt_begin / slices_per_group;
    int group_slices_left = slices_per_group - kt_begin % slices_per_group;
    for (int i = 0; i < k_tiles; ++i) {
      const int slice = pipe + i;
      const int kt = kt_begin + i;
      if (slice >= kStages - 1) mbarrier_wait(&barriers.empty[slice % kStages], Barriers::empty_parity(slice));
      if (group_src.src != nullptr) {
        cp_async_16(shared_address(quant_smem_ + (slice % kStages) * Traits::kQuantStageBytes) + group_src.dst,
                    group_src.src + static_cast<int64_t>(min(group, w_.num_groups - 1)) * group_src.stride);
      }
      if (--group_slices_left == 0) {
        ++group;
        group_slices_left = slices_per_group;
      }
      // The weights first: on the element path their copies land while this
      // thread gathers the A tile, so its wait below finds them there.
      load_b(kt, b_smem_ + (slice % kStages) * Traits::kBStageBytes);
      uint8_t* a_stage = a_smem_ + (slice % kStages) * Traits::kAStageBytes;
      if (fast && (kt + 1) * kTileK <= w_.k) {
        const uint32_t dst = shared_address(a_stage) + a_dst_;
        const uint4* src = x_chunks + static_cast<uint32_t>(kt * kChunksPerSlice);
#pragma unroll
        for (int u = 0; u < kA; ++u)
          cp_async_16(dst + u * kRowsPerPass * Traits::kARowBytes, src + a_unit[u], ((used_rows >> u) & 1) * 16);
      } else {
        load_a(kt, a_stage);
      }
      if (stores_a) {
        // load_a's element path stored the A tile itself: the arrival must
        // release those stores, so this slice waits for its copies first
        // (committed: a wait covers committed groups only).
        cp_async_commit();
        cp_async_wait<0>();
        fence_proxy_async_shared();  // the writer's fence (the readers fence too)
        mbarrier_arrive(&barriers.full[slice % kStages]);
      } else {
        mbarrier_arrive_on_copies(&barriers.full[slice % kStages]);
      }
    }
  }

  // Whether every K slice lies in one quantization group (GroupMode::kSlice).
  __device__ bool slice_groups() const { return w_.row_group == nullptr && steps_per_group_ % kKSteps == 0; }

  // The warp-specialised producer's share of a slice's quantization area:
  // one 16-byte chunk of a weight tile's group scales (threads 0-31) or zero
  // codes (32-47, asymmetric weights), from the tile's start on.
  struct GroupCopy {
    const uint8_t* src;  // the chunk in group 0 (null: this thread copies none)
    uint32_t stride;     // bytes from one group's row to the next
    uint32_t dst;        // byte offset in a stage's area
  };

  __device__ GroupCopy group_copy() const {
    constexpr int kScaleChunksPerTile = kTileN * 2 / 16;
    constexpr int kZeroChunksPerTile = kTileN / 16;
    constexpr int kScaleChunks = Traits::kWarpgroups * kScaleChunksPerTile;
    const int t = static_cast<int>(threadIdx.x);
    if (t < kScaleChunks) {
      const int tile = t / kScaleChunksPerTile, chunk = t % kScaleChunksPerTile;
      const int64_t column = static_cast<int64_t>(min(first_n_tile_ + tile * second_tile_step(io_), w_.n_tiles - 1)) * kTileN +
                             chunk * 8;
      return {reinterpret_cast<const uint8_t*>(scales_ + column), static_cast<uint32_t>(w_.n_padded * 2),
              static_cast<uint32_t>((tile * kTileN + chunk * 8) * 2)};
    }
    if (zeros_ != nullptr && t < kScaleChunks + Traits::kWarpgroups * kZeroChunksPerTile) {
      const int tile = (t - kScaleChunks) / kZeroChunksPerTile, chunk = (t - kScaleChunks) % kZeroChunksPerTile;
      const int64_t column = static_cast<int64_t>(min(first_n_tile_ + tile * second_tile_step(io_), w_.n_tiles - 1)) * kTileN +
                             chunk * 16;
      return {zeros_ + column, static_cast<uint32_t>(w_.n_padded),
              static_cast<uint32_t>(Traits::kWarpgroups * kTileN * 2 + tile * kTileN + chunk * 16)};
    }
    return {nullptr, 0, 0};
  }

  // Accumulates K slices [kt_begin, kt_end) (all of K, or a stream-K share).
  // Warp-specialised tiles take their slices from the producer through
  // `barriers` (`pipe` as for produce()); the others copy them themselves.
  // live_m_tiles: the 32-row mma.sync tiles' m16 tiles up to the last that
  // holds a used row; at 1 (an expert's last block, partly filled) the slice
  // loop runs without the second one's ldmatrix and MMAs, chosen here once
  // per tile (v48's branch per m-tile inside the k-step cost more than it
  // saved).
  __device__ void run(Accumulators& acc, int kt_begin, int kt_end, Barriers* barriers = nullptr, int pipe = 0,
                      int live_m_tiles = kMTiles) const {
    zero(acc);
    const int k_tiles = kt_end - kt_begin;
    if constexpr (!Traits::kWarpSpecialized) {
#pragma unroll
      for (int s = 0; s < kLoadAhead; ++s) {
        if (s < k_tiles) load_slice(kt_begin + s, s);
        cp_async_commit();
      }
    }
    if constexpr (kMTiles == 2 && !kWgmma) {
      if (live_m_tiles < 2) {
        group_modes<1>(acc, kt_begin, k_tiles, barriers, pipe);
      } else {
        group_modes<2>(acc, kt_begin, k_tiles, barriers, pipe);
      }
    } else {
      group_modes<kMTiles>(acc, kt_begin, k_tiles, barriers, pipe);
    }
    if constexpr (Traits::kWarpSpecialized) {
      wgmma_wait_group<0>();
      // The tile's last slice is released by the next tile's first.
    } else {
      cp_async_wait<0>();
    }
  }

 private:
  // The slice loop for the weights' group layout, on the first kLiveMTiles
  // m16 tiles (the non-swapped mma.sync tiles; the others ignore it). Groups
  // of a multiple of kTileK rows (128, 64, -1: the common ones) hold whole
  // slices and are tracked per slice; other multiples of 16 per k-step;
  // anything else (act-order, odd group sizes) per row through row_group.
  template <int kLiveMTiles>
  __device__ void group_modes(Accumulators& acc, int kt_begin, int k_tiles, Barriers* barriers, int pipe) const {
    if (w_.row_group != nullptr) {
      slices<GroupMode::kRow, kLiveMTiles>(acc, kt_begin, k_tiles, barriers, pipe);
    } else if (slice_groups()) {
      slices<GroupMode::kSlice, kLiveMTiles>(acc, kt_begin, k_tiles, barriers, pipe);
    } else {
      slices<GroupMode::kStep, kLiveMTiles>(acc, kt_begin, k_tiles, barriers, pipe);
    }
  }

  // Where the copying tiles' next slice comes from and goes to, kept from
  // slice to slice (v22): the weight source and the A sources advance by one
  // slice and the stage turns, so a whole slice's copies are the cp.async
  // themselves and a few adds (v21 recomputed both addresses, 64-bit, per
  // slice: ~25 instructions per warp and slice at the decode tiles).
  struct CopyCursor {
    const uint4* b;                                      // the lane's weight chunks of slice kt
    const uint16_t* a[Traits::kAChunksPerThread];        // its A chunks' sources (x itself: unused row)
    uint32_t used_rows;                                  // bit u: A chunk u is a token's
    uint32_t a_base;                                     // shared address of its A chunk 0 in stage 0
    uint32_t b_base;                                     // and of its weight chunk 0
    int kt;
    int stage;
    int fast_end;  // slices before it are whole, of aligned x without act-order: the sources above
  };

  __device__ CopyCursor copy_cursor(int kt, int stage) const {
    CopyCursor c{};
    if constexpr (!Traits::kWarpSpecialized) {
      const auto* x = static_cast<const uint16_t*>(io_.x);
      c.b = b_src_ + static_cast<int64_t>(kt) * Tile::kUint4s;
#pragma unroll
      for (int u = 0; u < Traits::kAChunksPerThread; ++u) {
        const int64_t offset = x_offset(u);
        c.used_rows |= static_cast<uint32_t>(offset >= 0) << u;
        c.a[u] = offset >= 0 ? x + offset + static_cast<int64_t>(kt) * kTileK + a_chunk_ * 8 : x;
      }
      c.a_base = shared_address(a_smem_) + a_dst_;
      c.b_base = shared_address(b_smem_) + Tile::uint4_index(warp_, 0, lane_) * 16;
      c.kt = kt;
      c.stage = stage;
      c.fast_end = io_.x_vector_loads && perm_ == nullptr ? w_.k / kTileK : 0;
    }
    return c;
  }

  // Issues slice c.kt's copies into stage c.stage and advances c by a slice.
  // Whole slices of aligned x without act-order take the cursor's sources;
  // the rest the generic load_a.
  __device__ void copy_next(CopyCursor& c) const {
    constexpr int kRowsPerPass = Traits::kCopyThreads / Traits::kAChunksPerRow;
    if (c.kt < c.fast_end) {
      const uint32_t dst = c.a_base + c.stage * Traits::kAStageBytes;
#pragma unroll
      for (int u = 0; u < Traits::kAChunksPerThread; ++u) {
        if ((c.used_rows >> u) & 1) cp_async_16(dst + u * kRowsPerPass * Traits::kARowBytes, c.a[u]);
      }
    } else {
      load_a(c.kt, a_smem_ + c.stage * Traits::kAStageBytes);
    }
    const uint32_t b_dst = c.b_base + c.stage * Traits::kBStageBytes;
#pragma unroll
    for (int j = 0; j < Tile::kLoadsPerLane; ++j) cp_async_16(b_dst + j * 32 * 16, c.b + j * 32, 16);
#pragma unroll
    for (int u = 0; u < Traits::kAChunksPerThread; ++u) c.a[u] += kTileK;
    c.b += Tile::kUint4s;
    ++c.kt;
    c.stage = c.stage + 1 == kStages ? 0 : c.stage + 1;
  }

  __device__ void load_slice(int kt, int stage) const {
    load_a(kt, a_smem_ + stage * Traits::kAStageBytes);
    load_b(kt, b_smem_ + stage * Traits::kBStageBytes);
  }

  // A lane's loads j sit 32 uint4s apart (layout.hpp, uint4_index). The
  // warp-specialised producer copies both warpgroups' tiles in their order.
  __device__ void load_b(int kt, uint8_t* stage) const {
    if constexpr (Traits::kWarpSpecialized) {
      const int64_t slice = static_cast<int64_t>(kt) * Tile::kUint4s;
      const uint32_t dst = shared_address(stage) + threadIdx.x * 16;
      constexpr int kPerThread = Tile::kUint4s / Traits::kProducerThreads;
      static_assert(kPerThread * Traits::kProducerThreads == Tile::kUint4s, "even B split");
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        const int q = j * Traits::kProducerThreads;
        cp_async_16(dst + q * 16, b_src_ + slice + q);
        cp_async_16(dst + Tile::kBytes + q * 16, b_src_second_ + slice + q);
      }
      return;
    }
    const uint4* src = b_src_ + static_cast<int64_t>(kt) * Tile::kUint4s;
    const uint32_t dst = shared_address(stage) + Tile::uint4_index(warp_, 0, lane_) * 16;
#pragma unroll
    for (int j = 0; j < Tile::kLoadsPerLane; ++j) cp_async_16(dst + j * 32 * 16, src + j * 32, 16);
  }

  // A rows are gathered per row (gemm_routed tokens, dispatch rows). Aligned
  // rows go through cp.async with hardware zero-fill past K and for unused
  // rows; act-order (x columns gathered through perm) and unaligned x take a
  // synchronous element path into the same swizzled layout. A thread copies
  // chunk a_chunk_ of rows threadIdx.x / 8 + 16u: the same chunk and swizzle
  // for every u, so only the rows' x offsets differ (read once per CTA).
  __device__ void load_a(int kt, uint8_t* stage) const {
    if (!copies_a()) return;
    const auto* x = static_cast<const uint16_t*>(io_.x);
    const int k = kt * kTileK + a_chunk_ * 8;
    constexpr int kRowsPerPass = Traits::kCopyThreads / Traits::kAChunksPerRow;
    const uint32_t dst = shared_address(stage) + a_dst_;
    if (io_.x_vector_loads && perm_ == nullptr) {
      // Rows that hold no token are not copied at all: row i of the product
      // depends only on row i of A, and unused rows are never stored or
      // reduced, so whatever their shared memory holds is harmless (at decode
      // that leaves most warps without a copy). Used rows past K are
      // zero-filled: the padded weight rows are not zero in the integer
      // (scale-after) dequant. Only the last slice of a K that is not a
      // multiple of kTileK counts its valid columns.
      const bool whole = (kt + 1) * kTileK <= w_.k;
      if (whole) {  // the common case, kept to an address add per copy
#pragma unroll
        for (int u = 0; u < Traits::kAChunksPerThread; ++u) {
          const int64_t offset = x_offset(u);
          if (offset >= 0) cp_async_16(dst + u * kRowsPerPass * Traits::kARowBytes, x + offset + k);
        }
        return;
      }
      const int tail_bytes = max(0, min(8, w_.k - k)) * static_cast<int>(sizeof(T));
#pragma unroll
      for (int u = 0; u < Traits::kAChunksPerThread; ++u) {
        const int64_t offset = x_offset(u);
        if (offset < 0) continue;
        const void* src = tail_bytes > 0 ? static_cast<const void*>(x + offset + k) : io_.x;
        cp_async_16(dst + u * kRowsPerPass * Traits::kARowBytes, src, tail_bytes);
      }
      return;
    }
#pragma unroll
    for (int u = 0; u < Traits::kAChunksPerThread; ++u) {
      uint32_t packed[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) packed[e] = load_x_pair(x, x_offset(u), k + 2 * e);
      *reinterpret_cast<uint4*>(stage + a_dst_ + u * kRowsPerPass * Traits::kARowBytes) =
          make_uint4(packed[0], packed[1], packed[2], packed[3]);
    }
  }

  // x offset of the u-th row this thread copies (-1: unused): from registers,
  // or the row table (kCacheRowOffsets).
  __device__ __forceinline__ int64_t x_offset(int u) const {
    if constexpr (kCacheRowOffsets) return a_row_offset_[u];
    return row_offset(u);
  }
  // Whether this thread copies A chunks (all do, but the first 64 of the 8-row tiles).
  static __device__ __forceinline__ bool copies_a() {
    return Traits::kACopyThreads == Traits::kCopyThreads || threadIdx.x < Traits::kACopyThreads;
  }
  __device__ __forceinline__ int64_t row_offset(int u) const {
    if (!copies_a()) return -1;
    return rows_.x_offset[threadIdx.x / Traits::kAChunksPerRow + u * (Traits::kCopyThreads / Traits::kAChunksPerRow)];
  }

  // x[row, k] and x[row, k + 1] as one 32-bit word (lower k in the low half),
  // zero past K or for an unused row.
  __device__ uint32_t load_x_pair(const uint16_t* x, int64_t offset, int k) const {
    uint32_t pair = 0;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int kk = k + e;
      if (offset >= 0 && kk < w_.k) {
        const int column = perm_ != nullptr ? __ldg(perm_ + kk) : kk;
        pair |= static_cast<uint32_t>(__ldg(x + offset + column)) << (16 * e);
      }
    }
    return pair;
  }

  // Where a fragment's scale and zero come from: one group for the whole slice,
  // one per 16-row k-step, or a per-row group table.
  enum class GroupMode { kSlice, kStep, kRow };

  // One group's parameters for the lane's kNFrags fragments. Scale-after: the
  // zero operands of its B columns and the scales of its two C-fragment
  // columns (fp32; in the swapped 8-row tiles a D row is the B column itself:
  // .x only); scale-before: zero operand and scale of its B columns.
  struct AfterParams {
    IntZeros zeros[kNFrags];
    float2 scale[kNFrags];
  };
  struct BeforeParams {
    PairQuantParams q[kNFrags];
  };
  using GroupParams = std::conditional_t<kScaleAfter, AfterParams, BeforeParams>;

  // A group's raw scales and zero codes for the lane's fragments, fetched a
  // group ahead (fetch_group) so that the switch to it (decode_group) never
  // waits on global memory: v8 stalled every warp on these loads at each
  // group boundary.
  struct RawGroup {
    uint32_t scale[kNFrags];  // scale-after mma.sync: the two C-fragment columns; else the B column
    uint32_t zero[kNFrags];   // zero codes (asymmetric weights only)
  };

  // Uniform groups: a 16-row k-step never straddles a group boundary
  // (group_size % 16 == 0), so one scale and zero serve a whole fragment.
  // The lane's columns in its fragments are kMmaN apart: one address per
  // group, the fragments at constant offsets from it.
  __device__ void fetch_group(int group, RawGroup& raw) const {
    const int64_t row = static_cast<int64_t>(min(group, w_.num_groups - 1)) * w_.n_padded;
    // Scale-after mma.sync tiles scale two adjacent C columns per fragment;
    // the others (the swapped tiles too) the fragment's one B column.
    constexpr bool kColumnPair = kScaleAfter && !kSwapped;
    const uint16_t* scales = scales_ + row + (kColumnPair ? c_column_ : column_);
    // Asymmetric weights only: one uniform branch around the zero codes, not
    // a predicate on each of their instructions (issued even when off).
    if (zeros_ != nullptr) {
      const uint8_t* zeros = zeros_ + row + column_;
#pragma unroll
      for (int nt = 0; nt < kNFrags; ++nt) raw.zero[nt] = __ldg(zeros + nt * kMmaN);
    }
#pragma unroll
    for (int nt = 0; nt < kNFrags; ++nt) {
      if constexpr (kColumnPair) {
        // Two adjacent columns, one 4-byte load (n_padded and the column are even).
        raw.scale[nt] = __ldg(reinterpret_cast<const uint32_t*>(scales + nt * kMmaN));
      } else {
        raw.scale[nt] = __ldg(scales + nt * kMmaN);
      }
    }
  }

  // A computing thread's raw group parameters from the stage's quantization
  // area (what fetch_group reads from global memory for the other tiles).
  __device__ void stage_group(int stage, RawGroup& raw) const {
    const uint8_t* area = quant_smem_ + stage * Traits::kQuantStageBytes;
    const int first_column = (compute_tid() / kThreads) * kTileN;
#pragma unroll
    for (int nt = 0; nt < kNFrags; ++nt) {
      const int column = first_column + fragment_n(nt, warp_, lane_);
      raw.scale[nt] = reinterpret_cast<const uint16_t*>(area)[column];
      raw.zero[nt] = zeros_ != nullptr ? area[Traits::kWarpgroups * kTileN * 2 + column] : kSymmetricZero;
    }
  }

  // `first`: the CTA's first group, where symmetric zero operands are set up
  // (they never change afterwards).
  __device__ void decode_group(const RawGroup& raw, GroupParams& gp, bool first) const {
    if constexpr (kScaleAfter) {
      if (zeros_ != nullptr || first) {
#pragma unroll
        for (int nt = 0; nt < kNFrags; ++nt)
          gp.zeros[nt] = int_zero_operands<T, kBits>(zeros_ != nullptr ? raw.zero[nt] : kSymmetricZero);
      }
    }
#pragma unroll
    for (int nt = 0; nt < kNFrags; ++nt) {
      if constexpr (kScaleAfter && kSwapped) {
        gp.scale[nt].x = scales_to_float2(raw.scale[nt]).x;  // one column: the low half
      } else if constexpr (kScaleAfter) {
        gp.scale[nt] = scales_to_float2(raw.scale[nt]);
      } else {
        const uint32_t z = zeros_ != nullptr ? raw.zero[nt] : kSymmetricZero;
        gp.q[nt] = {zero_operand<T, kBits>(z | (z << 16)), raw.scale[nt] | (raw.scale[nt] << 16)};
      }
    }
  }

  static __device__ __forceinline__ float2 scales_to_float2(uint32_t pair) {
    if constexpr (std::is_same_v<T, __half>) {
      return __half22float2(bit_cast_u32<__half2>(pair));
    } else {
      return __bfloat1622float2(bit_cast_u32<__nv_bfloat162>(pair));
    }
  }

  // acc += part * the group's column scales; part starts the next group at 0.
  __device__ static void flush_group(Accumulators& part, const GroupParams& gp, Accumulators& acc) {
    if constexpr (kScaleAfter && kSwapped) {
      // [h][i] holds column h * 16 + lane / 4 (+ 8 for i >= 2): n8 block 2h + i / 2.
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[h][i] += part[h][i] * gp.scale[2 * h + i / 2].x;
      zero(part);
    } else if constexpr (kScaleAfter) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int nt = 0; nt < kNFrags; ++nt) {
          acc[mt][nt][0] += part[mt][nt][0] * gp.scale[nt].x;
          acc[mt][nt][1] += part[mt][nt][1] * gp.scale[nt].y;
          acc[mt][nt][2] += part[mt][nt][2] * gp.scale[nt].x;
          acc[mt][nt][3] += part[mt][nt][3] * gp.scale[nt].y;
        }
      }
      zero(part);
    }
  }

  // Per-row groups (act-order, or group_size not a multiple of 16): each of
  // the two rows looks its group up.
  __device__ PairQuantParams row_quant_params(int k_row, int column) const {
    const int32_t* groups = w_.row_group + expert_ * w_.row_group_expert_stride;
    const int64_t lo = static_cast<int64_t>(__ldg(groups + k_row)) * w_.n_padded + column;
    const int64_t hi = static_cast<int64_t>(__ldg(groups + k_row + 1)) * w_.n_padded + column;
    const uint32_t z_lo = zeros_ != nullptr ? __ldg(zeros_ + lo) : kSymmetricZero;
    const uint32_t z_hi = zeros_ != nullptr ? __ldg(zeros_ + hi) : kSymmetricZero;
    return {zero_operand<T, kBits>(z_lo | (z_hi << 16)),
            __ldg(scales_ + lo) | (static_cast<uint32_t>(__ldg(scales_ + hi)) << 16)};
  }

  // The pipeline over k_tiles slices from kt_begin, with the group tracked as
  // kMode says. Scale-after tiles accumulate a group's integer products in
  // `part` and fold them into `acc` at each group boundary.
  template <GroupMode kMode, int kLiveMTiles>
  __device__ void slices(Accumulators& acc, int kt_begin, int k_tiles, Barriers* barriers, int pipe) const {
    constexpr bool kAfter = kScaleAfter && kMode != GroupMode::kRow;
    Accumulators part;
    if constexpr (kAfter) zero(part);
    GroupParams gp;
    RawGroup upcoming;  // the next group's, in flight
    // The group of the next k-step and how many of its steps are done: one
    // division per CTA, then counting.
    int group = 0, step_in_group = 0;
    // The copying tiles' next copy (slice kt_begin + kLoadAhead on).
    CopyCursor cursor = copy_cursor(kt_begin + kLoadAhead, kLoadAhead % kStages);
    // Warp-specialised tiles with whole-slice groups read each group's
    // parameters from the stage that holds its first slice.
    constexpr bool kStaged = Traits::kWarpSpecialized && kMode == GroupMode::kSlice;
    if constexpr (kMode != GroupMode::kRow) {
      const int first_step = kt_begin * kKSteps;
      group = first_step / steps_per_group_;
      step_in_group = first_step - group * steps_per_group_;
      if constexpr (!kStaged) {
        fetch_group(group, upcoming);
        decode_group(upcoming, gp, true);
        fetch_group(group + 1, upcoming);
      }
    }
    for (int i = 0; i < k_tiles; ++i) {
      const int kt = kt_begin + i;
      const int slice = Traits::kWarpSpecialized ? pipe + i : i;
      if constexpr (Traits::kWarpSpecialized) {
        mbarrier_wait(&barriers->full[slice % kStages], (slice / kStages) & 1);
        fence_proxy_async_shared();  // the copies landed in the generic proxy; wgmma reads through the async one
      } else {
        // Slice kt has landed once at most kLoadAhead-1 later groups are pending;
        // the barrier also tells every thread that the stage the next load
        // overwrites (slice kt-1's) has been consumed by all warps.
        cp_async_wait<kLoadAhead - 1>();
        __syncthreads();
      }
      const int next = i + kLoadAhead;
      // The tiles that copy for themselves issue slice `next`'s copies; the
      // warp-specialised ones hand the previous slice's stage back to the
      // producer once the first k-step's wgmma wait has returned (its groups
      // are then all done).
      auto advance_pipeline = [&] {
        if constexpr (Traits::kWarpSpecialized) {
          // Unconditional: any branch between the wgmmas in flight and the
          // next k-step's dequant makes ptxas serialize every wgmma (C7513).
          // The CTA's first slice "releases slice -1" (PipelineBarriers).
          mbarrier_arrive(&barriers->empty[(slice + kStages - 1) % kStages]);
        } else {
          if (next < k_tiles) copy_next(cursor);
          cp_async_commit();  // empty groups at the tail keep the wait count uniform
        }
      };
      // mma.sync tiles copy before computing; wgmma tiles advance from inside
      // compute_slice, after the first k-step.
      if constexpr (!kWgmma) advance_pipeline();
      if constexpr (kStaged) {
        if (i == 0 || step_in_group == steps_per_group_) {
          step_in_group = i == 0 ? step_in_group : 0;
          RawGroup raw;
          stage_group(slice % kStages, raw);
          decode_group(raw, gp, i == 0);
        }
        step_in_group += kKSteps;
      } else if constexpr (kMode == GroupMode::kSlice) {
        if (step_in_group == steps_per_group_) next_group(group, step_in_group, gp, upcoming, part, acc);
        step_in_group += kKSteps;
      }
      compute_slice<kMode, kLiveMTiles>(kt, slice % kStages, group, step_in_group, gp, upcoming, kAfter ? part : acc, acc,
                           advance_pipeline);
    }
    if constexpr (kAfter) flush_group(part, gp, acc);
  }

  template <bool kAfter = kScaleAfter>
  __device__ void next_group(int& group, int& step_in_group, GroupParams& gp, RawGroup& upcoming,
                             Accumulators& part, Accumulators& acc) const {
    if constexpr (kAfter) flush_group(part, gp, acc);
    ++group;
    step_in_group = 0;
    decode_group(upcoming, gp, false);
    fetch_group(group + 1, upcoming);
  }

  // One K slice: B codes from shared memory (each lane reads back exactly the
  // bytes it copied: conflict-free 16-byte reads), token fragments by ldmatrix,
  // then per k-step and fragment: dequantize two registers, one MMA per m-tile
  // (the swapped 8-row tiles: one MMA per 16 columns)
  // into `sums` (the group's partial sums, or acc itself when scaling before).
  // wgmma tiles call advance_pipeline() after the first k-step's wgmma wait;
  // mma.sync tiles have called it before.
  template <GroupMode kMode, int kLiveMTiles, class AdvancePipeline>
  __device__ void compute_slice(int kt, int stage, int& group, int& step_in_group, GroupParams& gp,
                                RawGroup& upcoming, Accumulators& sums, Accumulators& acc,
                                AdvancePipeline&& advance_pipeline) const {
    constexpr bool kAfter = kScaleAfter && kMode != GroupMode::kRow;
    const uint8_t* a_stage = a_smem_ + stage * Traits::kAStageBytes;
    const auto* b_stage = reinterpret_cast<const uint4*>(b_smem_ + stage * Traits::kBStageBytes);
    uint32_t words[Tile::kWordsPerLane];
#pragma unroll
    for (int j = 0; j < Tile::kLoadsPerLane; ++j) {
      const uint4 v = b_stage[Tile::uint4_index(warp_, j, lane_)];
      words[4 * j + 0] = v.x;
      words[4 * j + 1] = v.y;
      words[4 * j + 2] = v.z;
      words[4 * j + 3] = v.w;
    }
    const int k_base = kt * kTileK;
    uint32_t tokens[4];  // swapped: the B fragments of k-steps ks and ks + 1 (ks even)
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      if constexpr (kMode == GroupMode::kStep) {
        if (step_in_group == steps_per_group_) next_group<kAfter>(group, step_in_group, gp, upcoming, sums, acc);
        ++step_in_group;
      }
      if constexpr (kWgmma) {
        uint32_t a[2][4];
        dequant_column_pairs<kMode, kAfter>(words, ks, k_base, gp, a);
        // Issued as soon as dequantized; the warp goes on to the next k-step
        // while the tensor cores work (at most kWgmmaInFlight groups behind).
        const uint64_t desc = smem_descriptor_sw128(shared_address(a_stage) + ks * kMmaK * static_cast<int>(sizeof(T)));
        wgmma_fence();
        wgmma_m64nNk16_rs<T, kRows>(sums[0], a[0], desc);
        wgmma_m64nNk16_rs<T, kRows>(sums[1], a[1], desc);
        wgmma_commit_group();
        wgmma_wait_group<kWgmmaInFlight>();
        if (ks == 0) advance_pipeline();
      } else if constexpr (kSwapped) {
        // The weights as the A operand, composed as for wgmma; ldmatrix of
        // the token rows gives b0, b1 (k 2t.., token lane / 4) of two k-steps.
        if (ks % 2 == 0) ldmatrix_x4(tokens, shared_address(a_stage + a_offset_[ks / 2]));
        uint32_t a[2][4];
        dequant_column_pairs<kMode, kAfter>(words, ks, k_base, gp, a);
        const uint32_t b[2] = {tokens[2 * (ks % 2)], tokens[2 * (ks % 2) + 1]};
        mma_16816<T>(sums[0], a[0], b);
        mma_16816<T>(sums[1], a[1], b);
      } else {
        static_assert(kLiveMTiles >= 1 && kLiveMTiles <= kMTiles, "live m-tiles of the tile's");
        uint32_t a[kLiveMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kLiveMTiles; ++mt)
          ldmatrix_x4(a[mt], shared_address(a_stage + a_offset_[ks] + mt * kMmaM * Traits::kARowBytes));
#pragma unroll
        for (int nt = 0; nt < kNFrags; ++nt) {
          const int f = ks * kNFrags + nt;
          const uint32_t word = words[Tile::word_of_fragment(f)];
          uint32_t b[2];
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            if constexpr (kAfter) {
              b[half] = dequant_pair_int<T, kBits>(word, Tile::pair_of_fragment(f, half), gp.zeros[nt]);
            } else {
              b[half] = dequant_scaled<kMode>(word, f, half, k_base, gp);
            }
          }
#pragma unroll
          for (int mt = 0; mt < kLiveMTiles; ++mt) mma_16816<T>(sums[mt][nt], a[mt], b);
        }
      }
    }
  }

  // k-step ks's weights as two m16 A fragments (wgmma's register operand, and
  // the swapped 8-row tiles' mma.sync A): {b0(nt), b0(nt + 1), b1(nt),
  // b1(nt + 1)} is the fragment of the 16 weight columns of n8 blocks nt and
  // nt + 1. kAfter: exact integers (scaled per group later); else scaled.
  template <GroupMode kMode, bool kAfter>
  __device__ __forceinline__ void dequant_column_pairs(const uint32_t (&words)[Tile::kWordsPerLane], int ks,
                                                       int k_base, const GroupParams& gp, uint32_t (&a)[2][4]) const {
    if constexpr (kAfter) {
      int_column_pairs<T, kBits>(words, ks, gp.zeros, a);
    } else {
#pragma unroll
      for (int nt = 0; nt < kNFrags; ++nt) {
        const int f = ks * kNFrags + nt;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          a[nt / 2][2 * half + nt % 2] = dequant_scaled<kMode>(words[Tile::word_of_fragment(f)], f, half, k_base, gp);
        }
      }
    }
  }

  // One B register (two k rows of one column) dequantized and scaled, from
  // the slice's group (kSlice, kStep) or each row's group (kRow).
  template <GroupMode kMode>
  __device__ __forceinline__ uint32_t dequant_scaled(uint32_t word, int f, int half, int k_base,
                                                     const GroupParams& gp) const {
    PairQuantParams pq;
    if constexpr (kMode == GroupMode::kRow) {
      pq = row_quant_params(k_base + fragment_k(f, lane_, half, 0), column_ + (f % kNFrags) * kMmaN);
    } else {
      pq = gp.q[f % kNFrags];
    }
    return dequant_pair<T, kBits>(word, Tile::pair_of_fragment(f, half), pq.zero_codes, pq.scale_bits);
  }

  // Every instruction's accumulators are one contiguous float array.
  static __device__ __forceinline__ void zero(Accumulators& a) {
    constexpr int kCount = sizeof(Accumulators) / sizeof(float);
    auto& flat = reinterpret_cast<float(&)[kCount]>(a);
#pragma unroll
    for (int i = 0; i < kCount; ++i) flat[i] = 0.0f;
  }

  const QuantWeights& w_;
  const GemmIO& io_;
  const RowTable<kRows>& rows_;
  const int expert_;
  const int warp_;
  const int lane_;
  uint8_t* const a_smem_;
  uint8_t* const b_smem_;
  uint8_t* const quant_smem_;  // warp-specialised: per stage, the slice's group scales and zeros
  const uint4* b_src_;
  const uint4* b_src_second_;  // the warp-specialised producer's second tile
  const int32_t* perm_;
  const uint16_t* scales_;
  const uint8_t* zeros_;
  int column_;    // the lane's B-fragment column in n8 block 0 (block nt: + nt * kMmaN)
  int c_column_;  // the first of its two C-fragment columns in block 0
  int steps_per_group_;
  int first_n_tile_;  // the CTA's first 128-column tile
  int a_offset_[kKSteps];
  int a_chunk_;                                        // the 8-column chunk of K this thread copies
  int a_dst_;                                          // its byte offset in an A stage
  // x offsets of its rows (-1: unused), kept in registers for up to 4 rows
  // by the mma.sync tiles' threads (the warp-specialised producer keeps them
  // as 16-byte units in produce() and reads the row table only for the
  // generic copy; its consumers copy nothing).
  static constexpr bool kCacheRowOffsets = !Traits::kWarpSpecialized && Traits::kAChunksPerThread <= 4;
  int64_t a_row_offset_[kCacheRowOffsets ? Traits::kAChunksPerThread : 1];
};

}  // namespace ferrum_moe_cuda::gemm

#endif  // FERRUM_MOE_CUDA_GEMM_MAINLOOP_CUH_
