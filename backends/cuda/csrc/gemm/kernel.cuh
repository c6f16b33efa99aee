// The two GEMM entry points. They differ only in where a CTA's rows come from
// (a dispatch row range, or the routed sorted_token_ids of one block); both
// fill a RowTable, then share the mainloop and the epilogue.
#ifndef FERRUM_MOE_CUDA_GEMM_KERNEL_CUH_
#define FERRUM_MOE_CUDA_GEMM_KERNEL_CUH_

#include <cstdint>

#include "dependent_launch.cuh"
#include "gemm/epilogue.cuh"
#include "gemm/layout.hpp"
#include "gemm/mainloop.cuh"
#include "gemm/pairs.cuh"
#include "gemm/params.hpp"
#include "gemm/stream_k.cuh"
#include "gemm/traits.cuh"
#include "gemm/wgmma.cuh"

namespace ferrum_moe_cuda::gemm {

// Resident CTAs per SM the register allocation must allow: the 8- to 32-row
// tiles are memory-bound and need warps in flight to cover the latency
// (stream-K fills the SMs with them); the 32-row tile's two accumulator sets
// (integer partial sums and scaled sums) spill at 128 registers, not at 168.
// (The 8-row tiles spill 8-24 bytes outside their slice loops at 4 CTAs per
// SM; at 5, 96 registers, they spilled inside them and measured 3% slower
// over the decode rows: kernel notes, v21.)
// (The wgmma tiles: one, their 384 threads at 168 registers, the pool their
// roles' setmaxnreg divides.)
template <int kRows, bool kWgmma>
constexpr int kMinCtasPerSm = kWgmma ? 1 : kRows <= kSmallRowsPerCta ? 4 : kRows == kMediumRowsPerCta ? 3 : 1;

// What fill_rows answers for one tile row: its expert (the same in every
// thread; -1 for none) and whether this thread's table row holds work. The
// tile runs when some thread's does (padding-only chunks do no work).
struct TileRows {
  int expert;
  bool used;
};

// Registers per thread of the warp-specialised tiles' roles after setmaxnreg:
// the producer holds addresses only. The pool is what the launch allocated,
// 384 threads x 168 (65,536 / 384 rounded down to a multiple of 8).
constexpr int kLaunchRegisters = 168;
constexpr int kProducerRegisters = 56;
constexpr int kConsumerRegisters = 224;
static_assert(128 * kProducerRegisters + 256 * kConsumerRegisters <= 384 * kLaunchRegisters,
              "the roles' registers must fit the launch's pool, or setmaxnreg.inc waits forever");

// How the warp-specialised tiles' producer hands each piece's rows to the
// computing warpgroups, double-buffered: the producer fills rows[s] and
// expert[s] (-1: the piece does no work), then every producer thread arrives
// on filled[s]; every computing thread arrives on drained[s] once its
// epilogue is done with rows[s]. Phase p of either barrier of slot s is
// the CTA's piece s + 2p. The roles thus never meet at a CTA barrier inside
// the walk (two branches reaching one barrier is what synccheck reports as
// divergence), and the producer fills the next piece's rows and starts its
// copies while the computing threads still store the last one.
template <int kRows>
struct RowHandoff {
  RowTable<kRows> rows[2];
  int expert[2];
  uint64_t filled[2];
  uint64_t drained[2];

  __device__ void init(int producers, int consumers) {
    for (int s = 0; s < 2; ++s) {
      mbarrier_init(&filled[s], producers);
      mbarrier_init(&drained[s], consumers);
    }
  }
};

// Runs every (tile, K range) this CTA owns under `schedule` (params.hpp,
// StreamK). fill_rows(x, table, r) writes row r of tile row x's row table
// when r < kRows (r: the thread's index among the threads that fill) and
// answers a TileRows; it holds no barrier (the caller's publish the table).
// kSplitsK: the code that meets other CTAs' K ranges of a tile (stream-K) is
// compiled in; without it the launch must share no tile (launch.cuh,
// splits_k).
template <class T, int kBits, int kRows, bool kSplitsK, bool kWgmma, class FillRows, class LiveTileRows>
__device__ __forceinline__ void gemm_tiles(const QuantWeights& w, const GemmIO& io, const StreamK& schedule,
                                           int first_n_tile, FillRows&& fill_rows, LiveTileRows&& live_tile_rows) {
  dependent_grid_begin();
  extern __shared__ uint4 smem_raw[];
  using Loop = Mainloop<T, kBits, kRows, kWgmma>;
  using Traits = GemmTraits<T, kBits, kRows, kWgmma>;
  // Rounded up to kSmemAlignment by offsetting the pointer (not through an
  // integer cast, which would turn every access into a generic one).
  constexpr uint32_t kAlign = Traits::kSmemAlignment;
  uint8_t* smem = reinterpret_cast<uint8_t*>(smem_raw) + (kAlign - shared_address(smem_raw) % kAlign) % kAlign;
  const int64_t k_tiles = w.k_tiles;
  // The tile rows whose work the grid shares, and the CTAs that take it. The
  // host plans for every tile row it launched; a routed launch's rows past
  // what the routing filled (read here, after the wait for the kernel that
  // wrote it) hold nothing. When the host asks for it (live_rows_wave) and
  // the schedule has stream-K slots, the grid plans again on the live rows
  // (stream_k_ctas) instead of leaving their CTAs idle.
  int64_t tiles_x = schedule.tiles_x;
  int64_t ctas = gridDim.x;
  if (kSplitsK && schedule.partials != nullptr && schedule.live_rows_wave > 0) {
    const int64_t live = live_tile_rows();
    if (live < tiles_x) {
      tiles_x = max(live, int64_t{0});
      // At most the grid: a wave or more of live tiles takes one CTA per tile
      // (stream_k_ctas), which is more than a grid planned for an even share
      // of few slices (K under 4 slices) holds; capped, CTAs share tiles.
      const int64_t wave = min(static_cast<int64_t>(schedule.live_rows_wave), ctas);
      ctas = tiles_x > 0 ? min(stream_k_ctas(tiles_x * schedule.n_tiles, k_tiles, wave), ctas) : 0;
    }
  }
  const int64_t total = tiles_x * schedule.n_tiles * k_tiles;
  const int64_t begin = blockIdx.x < ctas ? total * blockIdx.x / ctas : 0;
  const int64_t end = blockIdx.x < ctas ? total * (blockIdx.x + 1) / ctas : 0;
  // Calls piece(tile, kt_begin, kt_end) for every (tile, K range) this CTA
  // owns, last first; every thread walks the same pieces. Under stream-K only
  // a CTA's first range can hold a shared tile's last K range, whose
  // reduction waits for the lower CTAs' parts (stream_k.cuh); walked last, it
  // waits after every part this CTA owes other tiles is counted, so no wait
  // ever waits on another wait.
  auto walk_back = [&](auto&& piece) {
    int64_t at = end;
    while (at > begin) {
      const int64_t tile = (at - 1) / k_tiles;
      const int kt_end = static_cast<int>(at - tile * k_tiles);
      const int kt_begin = static_cast<int>(max(int64_t{0}, kt_end - (at - begin)));
      at -= kt_end - kt_begin;
      piece(tile, kt_begin, kt_end);
    }
  };
  // The warp-specialised tiles' walk. With the meeting, walk_back's ranges.
  // Without it (the wgmma tiles' copy for launches that share no tile) the
  // grid may hold fewer CTAs than tiles (plan_schedule: a wave), and CTA c
  // takes whole tiles c, c + grid, c + 2 grid, ...: the CTAs in flight at
  // once work on neighbouring tiles, as one CTA per tile did, and a CTA's
  // producer fills the stages of its next tile while its computing warpgroups
  // store the last one, where a new CTA would start from empty stages.
  auto walk = [&](auto&& piece) {
    if constexpr (kSplitsK) {
      walk_back(piece);
    } else {
      const int64_t tiles = tiles_x * schedule.n_tiles;
      for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) piece(tile, 0, static_cast<int>(k_tiles));
    }
  };
  // The CTA's first 128-column tile of `tile`; a second warpgroup takes the
  // next one, or with the gated epilogue the up tile of this gate tile
  // (params.hpp, GemmIO::gate_up_tiles).
  const int tiles_per_cta = io.gate_up_tiles > 0 ? 1 : Traits::kWarpgroups;
  auto n_tile_of = [&](int64_t tile) {
    return first_n_tile + tiles_per_cta * static_cast<int>(tile % schedule.n_tiles);
  };
  auto flat_of = [](typename Loop::Accumulators& acc) -> auto& {
    return reinterpret_cast<typename AccumulatorLayout<kRows, Loop::kWgmma>::Flat&>(acc);
  };
  if constexpr (Traits::kWarpSpecialized) {
    constexpr int kConsumerThreads = Traits::kCtaThreads - Traits::kProducerThreads;
    static_assert(kRows <= Traits::kProducerThreads, "the producer fills a whole row table");
    __shared__ typename Loop::Barriers barriers;
    __shared__ RowHandoff<kRows> handoff;
    static_assert(sizeof(barriers) + sizeof(handoff) <= kStaticSmemReserve, "traits.cuh's reserve for these");
    if (threadIdx.x == 0) {
      barriers.init(Traits::kProducerThreads, kConsumerThreads);
      handoff.init(Traits::kProducerThreads, kConsumerThreads);
    }
    __syncthreads();  // publishes the barriers; the last barrier the roles share
    int pipe = 0;     // slices the CTA's pipeline has passed (the stage barriers' phases)
    int piece = 0;    // pieces walked (the handoff's phases)
    // Each role walks the tiles in its own register regime (one setmaxnreg
    // each, so ptxas allocates each branch on its own budget), both the same
    // walk.
    if (threadIdx.x < Traits::kProducerThreads) {
      registers_decrease<kProducerRegisters>();
      walk([&](int64_t tile, int kt_begin, int kt_end) {
        const int s = piece % 2;
        if (piece >= 2) mbarrier_wait(&handoff.drained[s], (piece / 2 - 1) & 1);
        ++piece;
        const TileRows filled = fill_rows(tile / schedule.n_tiles, handoff.rows[s], threadIdx.x);
        const int expert = named_barrier_or<1, Traits::kProducerThreads>(filled.used) ? filled.expert : -1;
        if (threadIdx.x == 0) handoff.expert[s] = expert;
        mbarrier_arrive(&handoff.filled[s]);
        if (expert < 0) return;
        Loop(w, io, handoff.rows[s], expert, n_tile_of(tile), smem).produce(barriers, pipe, kt_begin, kt_end);
        pipe += kt_end - kt_begin;
      });
      // The producer never waits on its copies (produce()): none outlives its
      // thread (committed first: a wait covers committed groups only).
      cp_async_commit();
      cp_async_wait<0>();
    } else {
      registers_increase<kConsumerRegisters>();
      const bool staged = Traits::kStagedStores && stores_vectors(io);  // the same for every tile
      // The host asks for the gated epilogue only where the results can be
      // staged and stored as whole vectors (stack.cpp, gemm_routed_gated:
      // what stores_vectors(io) checks, and N a multiple of 256).
      const bool gated = Traits::kStagedStores && io.gate_up_tiles > 0;
      walk([&](int64_t tile, int kt_begin, int kt_end) {
        const int s = piece % 2;
        mbarrier_wait(&handoff.filled[s], (piece / 2) & 1);
        ++piece;
        const int expert = handoff.expert[s];
        const int n_tile = n_tile_of(tile);
        typename Loop::Accumulators acc;
        bool store = expert >= 0;
        if (store) {
          Loop(w, io, handoff.rows[s], expert, n_tile, smem).run(acc, kt_begin, kt_end, &barriers, pipe);
          pipe += kt_end - kt_begin;
          // A shared tile (few tiles split K: plan_schedule, or the re-plan on
          // the live rows above) meets its other ranges; only the CTA that
          // completes it stores.
          if constexpr (kSplitsK) {
            if (kt_end - kt_begin < k_tiles) {
              store = reduce_stream_k_by_thread<AccumulatorLayout<kRows, true>::kCount, kConsumerThreads>(
                  schedule, tile, kt_end - kt_begin, static_cast<int>(k_tiles), kt_end == k_tiles,
                  Loop::compute_tid(), flat_of(acc));
            }
          }
        }
        if (store) {
          if (gated) {
            if constexpr (Traits::kStagedStores) {
              store_results_gated<T, kRows>(io, handoff.rows[s], n_tile, flat_of(acc), Loop::compute_tid(),
                                            smem + Traits::kStagingOffset);
            }
          } else if (staged) {
            store_results_staged<T, kRows>(io, handoff.rows[s], n_tile, flat_of(acc), Loop::compute_tid(),
                                           smem + Traits::kStagingOffset);
          } else {
            store_results<T, kRows, Loop::kWgmma>(io, handoff.rows[s], n_tile, flat_of(acc), Loop::compute_tid());
          }
        }
        mbarrier_arrive(&handoff.drained[s]);
      });
    }
  } else {
    __shared__ RowTable<kRows> rows;
    // The 8-row tiles' gated epilogue passes the up columns through this.
    __shared__ float exchange[kRows == kTinyRowsPerCta ? kGatedTinyExchangeFloats : 1];
    static_assert(sizeof(rows) + sizeof(exchange) <= kStaticSmemReserve, "traits.cuh's reserve for these");
    walk_back([&](int64_t tile, int kt_begin, int kt_end) {
      __syncthreads();  // the previous piece's epilogue is done with `rows`
      const TileRows filled = fill_rows(tile / schedule.n_tiles, rows, threadIdx.x);
      const int expert = __syncthreads_or(filled.used) ? filled.expert : -1;
      if (expert < 0) return;
      // The 32-row tiles' second m16 tile is empty in an expert's partly
      // filled last block (Mixtral M = 64: ~16 pairs an expert); thread r
      // wrote row r.
      int live_m_tiles = Loop::kMTiles;
      if constexpr (Loop::kMTiles == 2) {
        const bool stores = threadIdx.x < kRows && rows.out_row[threadIdx.x] >= 0;
        live_m_tiles = __syncthreads_or(stores && threadIdx.x >= kMmaM) ? 2 : 1;
      }
      const int n_tile = n_tile_of(tile);
      typename Loop::Accumulators acc;
      Loop(w, io, rows, expert, n_tile, smem).run(acc, kt_begin, kt_end, nullptr, 0, live_m_tiles);
      auto& flat = flat_of(acc);
      if (kSplitsK && kt_end - kt_begin < k_tiles &&
          !reduce_stream_k<kRows, Loop::kWgmma>(schedule, tile, kt_end - kt_begin, static_cast<int>(k_tiles),
                                                 kt_end == k_tiles, rows, flat)) {
        return;
      }
      if constexpr (kRows == kTinyRowsPerCta) {
        if (io.gate_up_tiles > 0) {
          store_results_gated_tiny<T>(io, rows, n_tile, flat, static_cast<int>(threadIdx.x), exchange);
          return;
        }
      }
      store_results<T, kRows, Loop::kWgmma>(io, rows, n_tile, flat, static_cast<int>(threadIdx.x));
    });
  }
}

// Host dispatch rows, split into work items of up to kRows rows on the host.
template <class T, int kBits, int kRows, bool kSplitsK, bool kWgmma>
__global__ void __launch_bounds__(GemmTraits<T, kBits, kRows, kWgmma>::kCtaThreads, kMinCtasPerSm<kRows, kWgmma>)
    gemm_batched_kernel(const __grid_constant__ BatchedParams p) {
  gemm_tiles<T, kBits, kRows, kSplitsK, kWgmma>(p.w, p.io, p.schedule, p.first_n_tile,
                              [&](int64_t x, RowTable<kRows>& table, int r) {
    const BatchedWorkItem& item = p.items[x];
    if (r < kRows) {
      const bool used = r < item.rows;
      table.x_offset[r] = used ? (item.x_row + r) * p.io.x_row_stride : -1;
      table.out_row[r] = used ? item.out_row + r : -1;
      table.weight[r] = 1.0f;
    }
    return TileRows{static_cast<int>(item.expert), true};  // the host makes items of 1+ rows
  }, [&] { return int64_t{p.schedule.tiles_x}; });
}

// A dispatch table in device memory the host never read: a row whose expert,
// rows or m are out of range is skipped, compared without forming sums that
// could overflow. Tile row x is chunk x % chunks_per_dispatch of dispatch
// x / chunks_per_dispatch.
template <class T, int kBits, int kRows, bool kSplitsK, bool kWgmma>
__global__ void __launch_bounds__(GemmTraits<T, kBits, kRows, kWgmma>::kCtaThreads, kMinCtasPerSm<kRows, kWgmma>)
    gemm_device_dispatch_kernel(const __grid_constant__ DeviceDispatchParams p) {
  gemm_tiles<T, kBits, kRows, kSplitsK, kWgmma>(p.w, p.io, p.schedule, p.first_n_tile,
                              [&](int64_t x, RowTable<kRows>& table, int r) {
    const int64_t d = x / p.chunks_per_dispatch;
    const int64_t first = (x % p.chunks_per_dispatch) * kRows;
    int64_t field[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      field[c] = p.table_int64 ? static_cast<const int64_t*>(p.table)[4 * d + c]
                               : static_cast<const int32_t*>(p.table)[4 * d + c];
    }
    const int64_t expert = field[0], in_row = field[1], out_row = field[2], m = field[3];
    const bool valid = expert >= 0 && expert < p.w.num_experts && m > 0 && in_row >= 0 &&
                       in_row <= p.x_rows && m <= p.x_rows - in_row && out_row >= 0 &&
                       out_row <= p.out_rows && m <= p.out_rows - out_row && first < m;
    if (valid && r < kRows) {
      const int64_t row = first + r;
      const bool used = row < m;
      table.x_offset[r] = used ? (in_row + row) * p.io.x_row_stride : -1;
      table.out_row[r] = used ? out_row + row : -1;
      table.weight[r] = 1.0f;
    }
    return TileRows{valid ? static_cast<int>(expert) : -1, valid};  // a valid chunk holds row `first`
  }, [&] { return int64_t{p.schedule.tiles_x}; });
}

// Row r of chunk `chunk` (kRows rows) of routing block `block`, from align's
// arrays: table row r (r < kRows) and, in every thread, the block's expert
// (-1 past the padded count or the block list; an expert out of range fills
// no row). Every index read from device memory is range-checked before use:
// the host never saw these arrays. The block's expert and the row's pair are
// read beside the padded count, not after it (each within its array's
// length, which the host knows): one dependent global read fewer before the
// CTA's first copies (kernel notes, v31). Entries past the padded count are
// read and then dropped.
template <int kRows>
__device__ __forceinline__ TileRows fill_block_row(const RoutedParams& p, int64_t block, int64_t chunk,
                                                   RowTable<kRows>& table, int r) {
  const int64_t block_start = block * p.block_size;
  const int64_t in_block = chunk * kRows + r;
  const int64_t position = block_start + in_block;
  const int32_t listed_expert = block < p.num_blocks ? p.expert_ids[block] : -1;
  const bool in_table = r < kRows && in_block < p.block_size && position < p.num_positions;
  const int32_t listed_id = in_table ? p.sorted_token_ids[position] : -1;
  const int64_t padded_tokens = *p.num_tokens_post_padded;
  const int32_t expert = block_start < padded_tokens ? listed_expert : -1;
  bool used = false;
  if (r < kRows && expert >= 0 && expert < p.w.num_experts) {
    const int64_t id = position < padded_tokens ? listed_id : -1;
    used = id >= 0 && id < p.num_pairs;
    const PairSlot at = pair_slot(used ? id : 0, p.top_k);
    table.x_offset[r] = used ? (p.x_rows_by_pair ? id : at.token) * p.io.x_row_stride : -1;
    table.out_row[r] = used ? id : -1;
    table.weight[r] = used ? pair_weight(p, at) : 1.0f;
  }
  return TileRows{expert, used};
}

// Pair routing (v51): before the CTA waits for the kernel before it (the
// layer's activation, while the first GEMM may still run), it asks L2 for the
// first p.prefetch_slices K slices of each piece it will compute, and their
// group scales. Every address is a pair's routed expert, read from topk_ids:
// nothing in the layer writes them, but the kernel before the first GEMM (the
// caller's router) may, so that read races with it there; a stale read only
// prefetches the wrong lines (a prefetch is a hint, never a result; the read
// goes through L2 only, so the reads after the wait see the settled ids), and
// ids out of range are skipped as fill_rows skips them. The pieces are
// walk_back's ranges of the host's plan (pair routing asks for no re-plan on
// live rows).
template <int kBits>
__device__ __forceinline__ void prefetch_pair_weights(const RoutedParams& p) {
  using Tile = WeightTileLayout<kBits>;
  constexpr int kLine = 128;
  const int64_t k_tiles = p.w.k_tiles;
  const int64_t total = static_cast<int64_t>(p.schedule.tiles_x) * p.schedule.n_tiles * k_tiles;
  const int64_t begin = total * blockIdx.x / gridDim.x, end = total * (blockIdx.x + 1) / gridDim.x;
  const auto* tiles = static_cast<const uint8_t*>(p.w.tiles);
  for (int64_t at = begin; at < end;) {
    const int64_t tile = at / k_tiles;
    const int64_t kt_begin = at - tile * k_tiles;
    const int64_t kt_end = min(k_tiles, kt_begin + (end - at));
    at += kt_end - kt_begin;
    const int64_t pair = tile / p.schedule.n_tiles;
    const int64_t n_tile = tile % p.schedule.n_tiles;
    if (pair >= p.num_pairs) continue;
    const int expert = pair_expert<true>(p, pair_slot(pair, p.top_k));
    if (expert < 0) continue;
    const int64_t slices = min(kt_end - kt_begin, static_cast<int64_t>(p.prefetch_slices));
    const uint8_t* first = tiles + ((static_cast<int64_t>(expert) * p.w.n_tiles + n_tile) * k_tiles + kt_begin) *
                                       Tile::kBytes;
    for (int64_t b = threadIdx.x * kLine; b < slices * Tile::kBytes; b += blockDim.x * kLine) prefetch_l2(first + b);
    // The group scales of those slices: 128 columns of 2 bytes per group row.
    // (Stacks whose rows name their groups, a row table, prefetch none.)
    if (p.w.row_group == nullptr) {
      const int64_t last_group = min(((kt_begin + slices) * kTileK - 1) / p.w.group_size,
                                     static_cast<int64_t>(p.w.num_groups - 1));
      for (int64_t group = kt_begin * kTileK / p.w.group_size + threadIdx.x / 2; group <= last_group;
           group += blockDim.x / 2) {
        prefetch_l2(p.w.scales + (static_cast<int64_t>(expert) * p.w.num_groups + group) * p.w.n_padded +
                    n_tile * kTileN + (threadIdx.x % 2) * (kLine / 2));
      }
    }
  }
}

// Tile row x is chunk x % chunks_per_block of routing block x / chunks_per_block.
// Every index read from device memory is range-checked before use: the host
// never saw these arrays.
template <class T, int kBits, int kRows, bool kSplitsK, bool kWgmma>
__global__ void __launch_bounds__(GemmTraits<T, kBits, kRows, kWgmma>::kCtaThreads, kMinCtasPerSm<kRows, kWgmma>)
    gemm_routed_kernel(const __grid_constant__ RoutedParams p) {
  if (p.sorted_token_ids == nullptr && p.prefetch_slices > 0) {
    dependent_grid_release();  // the next kernel need not wait for the prefetches
    prefetch_pair_weights<kBits>(p);
  }
  gemm_tiles<T, kBits, kRows, kSplitsK, kWgmma>(p.w, p.io, p.schedule, 0, [&](int64_t x, RowTable<kRows>& table, int r) {
    if (p.sorted_token_ids == nullptr) {
      // Pair routing: tile row x is pair x alone (blocks of one row, one chunk).
      const bool listed = x < p.num_pairs;
      const PairSlot at = pair_slot(listed ? x : 0, p.top_k);
      const int expert = listed ? pair_expert(p, at) : -1;
      const bool used = r == 0 && expert >= 0;
      if (r < kRows) {
        table.x_offset[r] = used ? (p.x_rows_by_pair ? x : at.token) * p.io.x_row_stride : -1;
        table.out_row[r] = used ? x : -1;
        table.weight[r] = used ? pair_weight(p, at) : 1.0f;
      }
      return TileRows{expert, used};
    }
    // Padding-only chunks (all sentinels) and bad experts do no work.
    return fill_block_row(p, x / p.chunks_per_block, x % p.chunks_per_block, table, r);
  }, [&] {
    // The blocks that start below num_tokens_post_padded; the host launched
    // fm_routed_blocks_read's bound (plugin.h), usually more. (Pair routing
    // fills every block it launches: the host asks for no re-plan.)
    if (p.num_tokens_post_padded == nullptr) return int64_t{p.schedule.tiles_x};
    const int64_t padded = *p.num_tokens_post_padded;
    const int64_t blocks = padded > 0 ? (padded - 1) / p.block_size + 1 : 0;
    return blocks * p.chunks_per_block;
  });
}

}  // namespace ferrum_moe_cuda::gemm

#endif  // FERRUM_MOE_CUDA_GEMM_KERNEL_CUH_
