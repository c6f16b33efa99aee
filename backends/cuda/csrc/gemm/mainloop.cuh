// The GEMM mainloop: a kStages-deep cp.async pipeline over K slices. Per
// slice, every thread copies its own weight codes (16-byte loads, layout.hpp)
// and a share of the A tile; then each warp dequantizes its 32 columns in
// registers and issues mma.sync against ldmatrix'ed A fragments.
#ifndef FERRUM_MOE_CUDA_GEMM_MAINLOOP_CUH_
#define FERRUM_MOE_CUDA_GEMM_MAINLOOP_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "gemm/dequant.cuh"
#include "gemm/layout.hpp"
#include "gemm/params.hpp"
#include "gemm/ptx.cuh"
#include "gemm/traits.cuh"

namespace ferrum_moe_cuda::gemm {

// Zero points and scales for one B register (two consecutive k rows of one
// column), packed the way dequant_pair takes them (zero_operand()).
struct PairQuantParams {
  uint32_t zero_codes;
  uint32_t scale_bits;
};

template <class T, int kBits, int kMTiles>
class Mainloop {
 public:
  using Traits = GemmTraits<T, kBits, kMTiles>;
  using Tile = typename Traits::Tile;
  static constexpr int kRows = Traits::kRows;
  static constexpr int kStages = Traits::kStages;
  // Symmetric quantization stores no zeros: the zero point is mid-range.
  static constexpr uint32_t kSymmetricZero = 1u << (kBits - 1);

  using Accumulators = float[kMTiles][kNFrags][4];

  __device__ Mainloop(const QuantWeights& w, const GemmIO& io, const RowTable<kRows>& rows,
                      int expert, int n_tile, uint8_t* smem)
      : w_(w),
        io_(io),
        rows_(rows),
        expert_(expert),
        n_tile_(n_tile),
        warp_(threadIdx.x / 32),
        lane_(threadIdx.x % 32),
        a_smem_(smem),
        b_smem_(smem + kStages * Traits::kAStageBytes) {
    tiles_ = static_cast<const uint4*>(w.tiles) +
             (static_cast<int64_t>(expert) * w.n_tiles + n_tile) * w.k_tiles * Tile::kUint4s;
    perm_ = w.perm != nullptr ? w.perm + static_cast<int64_t>(expert) * w.k : nullptr;
    // Address math hoisted out of the k-loop (v1 spent most of its issue slots
    // here): the expert's scale/zero planes, and the lane's column in each of
    // its kNFrags fragments, which are the same in every K slice.
    const int64_t plane = static_cast<int64_t>(expert) * w.num_groups * w.n_padded;
    scales_ = w.scales + plane;
    zeros_ = w.zeros != nullptr ? w.zeros + plane : nullptr;
#pragma unroll
    for (int nt = 0; nt < kNFrags; ++nt) column_[nt] = n_tile * kTileN + fragment_n(nt, warp_, lane_);
    steps_per_group_ = w.group_size / kMmaK;
    // ldmatrix x4: lanes 0-15 address rows 0-15 at k 0-7 of a k-step, lanes
    // 16-31 the same rows at k 8-15. Rows 16 apart share a swizzle, so m-tile
    // mt only adds mt * 16 rows to these.
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) a_offset_[ks] = Traits::a_offset(lane_ % 16, ks * 2 + lane_ / 16);
  }

  // Accumulates K slices [kt_begin, kt_end) (all of K, or one split's share).
  __device__ void run(Accumulators& acc, int kt_begin, int kt_end) const {
    for (int mt = 0; mt < kMTiles; ++mt)
      for (int nt = 0; nt < kNFrags; ++nt)
        for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;

    const int k_tiles = kt_end - kt_begin;
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < k_tiles) load_slice(kt_begin + s, s);
      cp_async_commit();
    }
    // Groups of a multiple of kTileK rows (128, 64, -1: the common ones) hold
    // whole slices: the slice's group is tracked here, one division per CTA.
    const bool group_per_slice = w_.row_group == nullptr && steps_per_group_ % kKSteps == 0;
    const int slices_per_group = max(1, steps_per_group_ / kKSteps);
    int slice_group = group_per_slice ? kt_begin / slices_per_group : 0;
    int slice_in_group = group_per_slice ? kt_begin - slice_group * slices_per_group : 0;
    for (int i = 0; i < k_tiles; ++i) {
      const int kt = kt_begin + i;
      // Slice kt has landed once at most kStages-2 later groups are pending;
      // the barrier also tells every thread that slice kt-1's stage, which the
      // next load overwrites, has been consumed by all warps.
      cp_async_wait<kStages - 2>();
      __syncthreads();
      const int next = i + kStages - 1;
      if (next < k_tiles) load_slice(kt_begin + next, next % kStages);
      cp_async_commit();  // empty groups at the tail keep the wait count uniform
      if (group_per_slice) {
        compute_slice_as<GroupMode::kSlice>(kt, i % kStages, slice_group, acc);
        if (++slice_in_group == slices_per_group) {
          slice_in_group = 0;
          ++slice_group;
        }
      } else if (w_.row_group == nullptr) {
        compute_slice_as<GroupMode::kStep>(kt, i % kStages, 0, acc);
      } else {
        compute_slice_as<GroupMode::kRow>(kt, i % kStages, 0, acc);
      }
    }
    cp_async_wait<0>();
  }

 private:
  __device__ void load_slice(int kt, int stage) const {
    load_a(kt, a_smem_ + stage * Traits::kAStageBytes);
    load_b(kt, b_smem_ + stage * Traits::kBStageBytes);
  }

  __device__ void load_b(int kt, uint8_t* stage) const {
    const uint4* src = tiles_ + static_cast<int64_t>(kt) * Tile::kUint4s;
#pragma unroll
    for (int j = 0; j < Tile::kLoadsPerLane; ++j) {
      const int index = Tile::uint4_index(warp_, j, lane_);
      cp_async_16(shared_address(stage + index * 16), src + index, 16);
    }
  }

  // A rows are gathered per row (gemm_routed tokens, dispatch rows). Aligned
  // rows go through cp.async with hardware zero-fill past K and for unused
  // rows; act-order (x columns gathered through perm) and unaligned x take a
  // synchronous element path into the same swizzled layout.
  __device__ void load_a(int kt, uint8_t* stage) const {
    const auto* x = static_cast<const uint16_t*>(io_.x);
    const int k_base = kt * kTileK;
    const bool vector_path = io_.x_vector_loads && perm_ == nullptr;
#pragma unroll
    for (int u = 0; u < Traits::kAChunksPerThread; ++u) {
      const int i = threadIdx.x + u * kThreads;
      const int row = i / Traits::kAChunksPerRow;
      const int chunk = i % Traits::kAChunksPerRow;
      const int k = k_base + chunk * 8;
      const int64_t offset = rows_.x_offset[row];
      uint8_t* dst = stage + Traits::a_offset(row, chunk);
      if (vector_path) {
        const int valid = offset >= 0 ? max(0, min(8, w_.k - k)) : 0;
        const void* src = valid > 0 ? static_cast<const void*>(x + offset + k) : io_.x;
        cp_async_16(shared_address(dst), src, valid * static_cast<int>(sizeof(T)));
      } else {
        uint32_t packed[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) packed[e] = load_x_pair(x, offset, k + 2 * e);
        *reinterpret_cast<uint4*>(dst) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
      }
    }
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

  // Uniform groups: a 16-row k-step never straddles a group boundary
  // (group_size % 16 == 0), so one scale and zero serve a whole fragment, and
  // the lane's kNFrags columns share the group: one load each per group.
  __device__ void load_group_params(int group, PairQuantParams (&q)[kNFrags]) const {
    const int64_t row = static_cast<int64_t>(min(group, w_.num_groups - 1)) * w_.n_padded;
#pragma unroll
    for (int nt = 0; nt < kNFrags; ++nt) {
      const uint32_t s = __ldg(scales_ + row + column_[nt]);
      const uint32_t z = zeros_ != nullptr ? __ldg(zeros_ + row + column_[nt]) : kSymmetricZero;
      q[nt] = {zero_operand<T, kBits>(z | (z << 16)), s | (s << 16)};
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

  // Where a fragment's scale and zero come from: one group for the whole slice
  // (`slice_group`), one per 16-row k-step, or a per-row group table.
  enum class GroupMode { kSlice, kStep, kRow };

  template <GroupMode kMode>
  __device__ void compute_slice_as(int kt, int stage, int slice_group, Accumulators& acc) const {
    const uint8_t* a_stage = a_smem_ + stage * Traits::kAStageBytes;
    const auto* b_stage = reinterpret_cast<const uint4*>(b_smem_ + stage * Traits::kBStageBytes);

    // Each lane reads back exactly the bytes it copied: conflict-free 16-byte reads.
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
    // The group of this slice's first k-step; later steps advance it without
    // dividing again (one division per slice, not one per fragment).
    PairQuantParams q[kNFrags];
    int group = 0, step_in_group = 0;
    if constexpr (kMode == GroupMode::kSlice) {
      load_group_params(slice_group, q);
    } else if constexpr (kMode == GroupMode::kStep) {
      const int first_step = kt * kKSteps;
      group = first_step / steps_per_group_;
      step_in_group = first_step - group * steps_per_group_;
      load_group_params(group, q);
    }
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      if constexpr (kMode == GroupMode::kStep) {
        if (ks > 0 && ++step_in_group == steps_per_group_) {
          step_in_group = 0;
          load_group_params(++group, q);
        }
      }
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
        ldmatrix_x4(a[mt], shared_address(a_stage + a_offset_[ks] + mt * kMmaM * Traits::kARowBytes));
#pragma unroll
      for (int nt = 0; nt < kNFrags; ++nt) {
        const int f = ks * kNFrags + nt;
        const uint32_t word = words[Tile::word_of_fragment(f)];
        uint32_t b[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          PairQuantParams pq;
          if constexpr (kMode != GroupMode::kRow) {
            pq = q[nt];
          } else {
            pq = row_quant_params(k_base + fragment_k(f, lane_, half, 0), column_[nt]);
          }
          b[half] = dequant_pair<T, kBits>(word, Tile::pair_of_fragment(f, half), pq.zero_codes,
                                           pq.scale_bits);
        }
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) mma_16816<T>(acc[mt][nt], a[mt], b);
      }
    }
  }

  const QuantWeights& w_;
  const GemmIO& io_;
  const RowTable<kRows>& rows_;
  const int expert_;
  const int n_tile_;
  const int warp_;
  const int lane_;
  uint8_t* const a_smem_;
  uint8_t* const b_smem_;
  const uint4* tiles_;
  const int32_t* perm_;
  const uint16_t* scales_;
  const uint8_t* zeros_;
  int column_[kNFrags];
  int steps_per_group_;
  int a_offset_[kKSteps];
};

}  // namespace ferrum_moe_cuda::gemm

#endif  // FERRUM_MOE_CUDA_GEMM_MAINLOOP_CUH_
