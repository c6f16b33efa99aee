// moe_align_block_size:
//   1. count the pairs of each local expert (shared-memory atomics);
//   2. exclusive scan of the counts padded to block_size -> segment offsets,
//      num_tokens_post_padded, and expert_ids per block (-1 past the end);
//   3. fill sorted_token_ids with the sentinel, then scatter every valid pair
//      into its expert's segment, in increasing pair order.
// Step 3 goes in chunks of kChunk pairs, each in kItemsPerThread rounds of one
// pair per thread: a pair's rank among the earlier pairs of its expert is the
// count placed before the round (a per-expert cursor), plus those of its
// round in earlier warps (a per-warp histogram), plus those in earlier lanes
// of its warp (__match_any_sync): pair order without a sort. One chunk is
// aligned by one CTA; more are counted and scattered by one CTA each, with one
// CTA between them turning the per-chunk counts into each chunk's per-expert
// start.
#include "routing.hpp"

#include <cub/block/block_scan.cuh>

#include "dependent_launch.cuh"
#include "routing.cuh"

namespace ferrum_moe_cuda {
namespace {

constexpr int kAlignThreads = 256;
constexpr int kItemsPerThread = 8;
constexpr int kChunk = kAlignThreads * kItemsPerThread;  // pairs a CTA places, one per thread and round
constexpr int kAlignWarps = kAlignThreads / 32;
constexpr int kExpertsPerThread = static_cast<int>(kMaxAlignLocalExperts) / kAlignThreads;
static_assert(kExpertsPerThread * kAlignThreads == kMaxAlignLocalExperts, "even expert split");

using Scan = cub::BlockScan<int, kAlignThreads>;

struct AlignShared {
  typename Scan::TempStorage scan;
  int counts[kMaxAlignLocalExperts];
  int offsets[kMaxAlignLocalExperts + 1];  // each expert's segment start in sorted_token_ids
  int cursor[kMaxAlignLocalExperts];       // pairs of the expert placed before this round
  uint8_t warp_counts[kAlignWarps][kMaxAlignLocalExperts];  // a round's pairs per warp and expert (<= 32)
};

template <class Index>
struct Pairs {
  const AlignParams& p;
  __device__ int64_t count() const { return p.num_tokens * p.top_k; }
  __device__ int expert(int64_t pair) const {
    return local_expert_of(static_cast<const Index*>(p.topk_ids), p.topk_ids_stride0, p.topk_ids_stride1,
                           pair / p.top_k, pair % p.top_k, p.num_experts, p.expert_map, p.num_local_experts);
  }
};

// counts[e] = pairs of local expert e among pairs [begin, end), at most one
// chunk: each thread reads all its pairs' experts before counting any (one
// round trip, not one per pair).
template <class Index>
__device__ void count_pairs(const Pairs<Index>& pairs, AlignShared& s, int64_t begin, int64_t end) {
  for (int e = threadIdx.x; e < pairs.p.num_local_experts; e += kAlignThreads) s.counts[e] = 0;
  int experts[kItemsPerThread];
#pragma unroll
  for (int i = 0; i < kItemsPerThread; ++i) {
    const int64_t pair = begin + i * kAlignThreads + threadIdx.x;
    experts[i] = pair < end ? pairs.expert(pair) : -1;
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kItemsPerThread; ++i) {
    if (experts[i] >= 0) atomicAdd(&s.counts[experts[i]], 1);
  }
  __syncthreads();
}

// From every expert's total in s.counts: each segment's start (s.offsets), the
// padded total, and the expert of every routing block (-1 past the end).
__device__ void place_segments(const AlignParams& p, AlignShared& s) {
  const int num_local = p.num_local_experts;
  const int tid = threadIdx.x;
  int padded[kExpertsPerThread];
  int thread_total = 0;
#pragma unroll
  for (int i = 0; i < kExpertsPerThread; ++i) {
    const int e = tid * kExpertsPerThread + i;
    padded[i] = e < num_local ? (s.counts[e] + p.block_size - 1) / p.block_size * p.block_size : 0;
    thread_total += padded[i];
  }
  int thread_offset = 0;
  int total = 0;
  Scan(s.scan).ExclusiveSum(thread_total, thread_offset, total);
#pragma unroll
  for (int i = 0; i < kExpertsPerThread; ++i) {
    const int e = tid * kExpertsPerThread + i;
    if (e < num_local) s.offsets[e] = thread_offset;
    thread_offset += padded[i];
  }
  if (tid == 0) {
    s.offsets[num_local] = total;
    *p.num_tokens_post_padded = total;
  }
  __syncthreads();
  for (int64_t b = tid; b < p.expert_ids_len; b += kAlignThreads) {
    const int64_t position = b * p.block_size;
    int expert = -1;
    if (position < total) {
      // The last expert whose segment starts at or before `position`; empty
      // segments start where the next one does, so this is the non-empty owner.
      int lo = 0, hi = num_local;  // offsets[lo] <= position < offsets[hi]
      while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (s.offsets[mid] <= position) lo = mid; else hi = mid;
      }
      expert = lo;
    }
    p.expert_ids[b] = expert;
  }
}

__device__ void fill_sentinel(const AlignParams& p, int64_t first, int64_t step) {
  const int32_t sentinel = static_cast<int32_t>(p.num_tokens * p.top_k);
  for (int64_t q = first; q < p.sorted_len; q += step) p.sorted_token_ids[q] = sentinel;
}

__device__ void clear_warp_counts(AlignShared& s) {
  auto* words = reinterpret_cast<uint32_t*>(&s.warp_counts[0][0]);
  for (int i = threadIdx.x; i < static_cast<int>(sizeof(s.warp_counts) / 4); i += kAlignThreads) words[i] = 0;
}

// Scatters pairs [base, base + kChunk) into their experts' segments, in
// increasing pair order, after the s.cursor[e] pairs of expert e placed before
// them (the cursors advance; s.warp_counts is zero on entry and on return).
template <class Index>
__device__ void scatter_chunk(const Pairs<Index>& pairs, AlignShared& s, int64_t base) {
  const AlignParams& p = pairs.p;
  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  int experts[kItemsPerThread];  // every round's expert read first: one round trip
#pragma unroll
  for (int i = 0; i < kItemsPerThread; ++i) {
    const int64_t pair = base + i * kAlignThreads + tid;
    experts[i] = pair < pairs.count() ? pairs.expert(pair) : -1;
  }
#pragma unroll
  for (int i = 0; i < kItemsPerThread; ++i) {
    if (base + i * kAlignThreads >= pairs.count()) break;  // the same in every thread: no round left
    const int e = experts[i];
    const unsigned same = __match_any_sync(0xffffffffu, e);  // lanes of this warp with the same expert
    const bool leader = lane == __ffs(same) - 1;
    if (e >= 0 && leader) s.warp_counts[warp][e] = static_cast<uint8_t>(__popc(same));
    __syncthreads();  // the round's histogram (and the last round's cursors) complete
    if (e >= 0) {
      int rank = s.cursor[e] + __popc(same & ((1u << lane) - 1));
      for (int w = 0; w < warp; ++w) rank += s.warp_counts[w][e];
      const int64_t destination = static_cast<int64_t>(s.offsets[e]) + rank;
      const int64_t pair = base + i * kAlignThreads + tid;
      if (destination < p.sorted_len) p.sorted_token_ids[destination] = static_cast<int32_t>(pair);
    }
    __syncthreads();  // every rank read before the cursors move and the histogram clears
    if (e >= 0 && leader) {
      atomicAdd(&s.cursor[e], __popc(same));
      s.warp_counts[warp][e] = 0;
    }
    __syncwarp();  // this warp's clears before its next round's counts
  }
  __syncthreads();
}

// The whole of align in one CTA (up to one chunk of pairs).
template <class Index>
__global__ void __launch_bounds__(kAlignThreads) moe_align_block_size_kernel(AlignParams p) {
  dependent_grid_begin();
  __shared__ AlignShared s;
  const Pairs<Index> pairs{p};
  const int64_t num_pairs = pairs.count();
  const int tid = threadIdx.x;
  count_pairs(pairs, s, 0, num_pairs);
  place_segments(p, s);
  fill_sentinel(p, tid, kAlignThreads);
  for (int e = tid; e < p.num_local_experts; e += kAlignThreads) s.cursor[e] = 0;
  clear_warp_counts(s);
  // Orders the sentinel fill, the cursors and the histogram before the scatter, across threads.
  __syncthreads();
  scatter_chunk(pairs, s, 0);
}

// Many chunks: one CTA per chunk counts its pairs per expert into
// chunk_counts[chunk][e] (and the CTAs fill the sentinel between them)...
template <class Index>
__global__ void __launch_bounds__(kAlignThreads) align_count_kernel(AlignParams p, int32_t* chunk_counts) {
  dependent_grid_begin();
  __shared__ AlignShared s;
  const Pairs<Index> pairs{p};
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kChunk;
  count_pairs(pairs, s, base, min(base + kChunk, pairs.count()));
  for (int e = threadIdx.x; e < p.num_local_experts; e += kAlignThreads)
    chunk_counts[static_cast<int64_t>(blockIdx.x) * p.num_local_experts + e] = s.counts[e];
  fill_sentinel(p, static_cast<int64_t>(blockIdx.x) * kAlignThreads + threadIdx.x,
                static_cast<int64_t>(gridDim.x) * kAlignThreads);
}

// ... one CTA turns the counts into each chunk's per-expert prefix (in place)
// and the experts' segments ...
__global__ void __launch_bounds__(kAlignThreads) align_segments_kernel(AlignParams p, int32_t* chunk_counts,
                                                                       int32_t* offsets, int num_chunks) {
  dependent_grid_begin();
  __shared__ AlignShared s;
  const int num_local = p.num_local_experts;
  for (int e = threadIdx.x; e < num_local; e += kAlignThreads) {
    int running = 0;
    // kItemsPerThread chunks' counts read before any is rewritten: one round
    // trip per group, not per chunk.
    for (int first = 0; first < num_chunks; first += kItemsPerThread) {
      int values[kItemsPerThread];
#pragma unroll
      for (int i = 0; i < kItemsPerThread; ++i)
        values[i] = first + i < num_chunks ? chunk_counts[static_cast<int64_t>(first + i) * num_local + e] : 0;
#pragma unroll
      for (int i = 0; i < kItemsPerThread; ++i) {
        if (first + i < num_chunks) chunk_counts[static_cast<int64_t>(first + i) * num_local + e] = running;
        running += values[i];
      }
    }
    s.counts[e] = running;
  }
  __syncthreads();
  place_segments(p, s);
  __syncthreads();
  for (int e = threadIdx.x; e <= num_local; e += kAlignThreads) offsets[e] = s.offsets[e];
}

// ... and one CTA per chunk places its pairs after the earlier chunks' ones.
template <class Index>
__global__ void __launch_bounds__(kAlignThreads) align_scatter_kernel(AlignParams p, const int32_t* chunk_counts,
                                                                      const int32_t* offsets) {
  dependent_grid_begin();
  __shared__ AlignShared s;
  const Pairs<Index> pairs{p};
  for (int e = threadIdx.x; e < p.num_local_experts; e += kAlignThreads) {
    s.offsets[e] = offsets[e];
    s.cursor[e] = chunk_counts[static_cast<int64_t>(blockIdx.x) * p.num_local_experts + e];
  }
  clear_warp_counts(s);
  __syncthreads();
  scatter_chunk(pairs, s, static_cast<int64_t>(blockIdx.x) * kChunk);
}

template <class Index>
cudaError_t launch_align(const AlignParams& params, cudaStream_t stream) {
  const int64_t num_pairs = params.num_tokens * params.top_k;
  // Up to one chunk of pairs one CTA aligns everything (count_pairs and
  // scatter_chunk cover one chunk); more are counted and scattered by one CTA
  // per chunk. (A single CTA walking its chunks one after another cost ~13 us
  // a chunk: 55 us at 8,192 pairs, vLLM's align 12 us.)
  if (num_pairs <= kChunk) {
    return launch_dependent(moe_align_block_size_kernel<Index>, 1, kAlignThreads, 0, stream, params);
  }
  // num_pairs < 2^31 (plugin.h), so the chunk count fits an int.
  const int num_chunks = static_cast<int>((num_pairs + kChunk - 1) / kChunk);
  const size_t table = static_cast<size_t>(num_chunks) * params.num_local_experts;
  int32_t* workspace = nullptr;
  // Stream-ordered (a graph memory node under capture), freed after the scatter.
  cudaError_t status = cudaMallocAsync(reinterpret_cast<void**>(&workspace),
                                       (table + params.num_local_experts + 1) * sizeof(int32_t), stream);
  if (status != cudaSuccess) return status;
  int32_t* offsets = workspace + table;
  status = launch_dependent(align_count_kernel<Index>, num_chunks, kAlignThreads, 0, stream, params, workspace);
  if (status == cudaSuccess) {
    status = launch_dependent(align_segments_kernel, 1, kAlignThreads, 0, stream, params, workspace, offsets,
                              num_chunks);
  }
  if (status == cudaSuccess) {
    status = launch_dependent(align_scatter_kernel<Index>, num_chunks, kAlignThreads, 0, stream, params, workspace,
                              static_cast<const int32_t*>(offsets));
  }
  const cudaError_t freed = cudaFreeAsync(workspace, stream);
  return status != cudaSuccess ? status : freed;
}

}  // namespace

cudaError_t launch_moe_align_block_size(const AlignParams& params, cudaStream_t stream) {
  return params.topk_ids_int64 ? launch_align<int64_t>(params, stream) : launch_align<int32_t>(params, stream);
}

}  // namespace ferrum_moe_cuda
