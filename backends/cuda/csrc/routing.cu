// moe_align_block_size, in chunks of kChunk pairs, one CTA per chunk:
//   1. rank every pair among the earlier pairs of its expert in its warp's
//      run of consecutive pairs (runs of as few 32-pair rounds as let the
//      warps cover the chunk, up to kWarpPairs each):
//      rounds of one pair per lane, each round's lanes of one expert found by
//      one ballot per bit of the expert ids, a per-warp histogram advanced
//      with warp barriers only;
//   2. each expert's count (the warps' histograms summed, over every chunk),
//      padded to block_size and scanned -> segment offsets,
//      num_tokens_post_padded, and expert_ids per block (-1 past the end);
//   3. every pair goes to its segment's start + the expert's pairs in earlier
//      chunks + in earlier warps of its chunk + its rank: increasing pair
//      order without a sort. The sentinel goes where no pair does, each
//      segment's padding and the tail.
// One chunk is aligned by one CTA, with three CTA barriers besides the scan's.
// More are counted by one CTA each, then scattered by one CTA each, every
// scatter CTA summing the chunks' counts itself; past kMaxScanningChunks one
// CTA between the two turns the counts into each chunk's starts instead.
#include "routing.hpp"

#include <cub/block/block_scan.cuh>

#include "dependent_launch.cuh"
#include "routing.cuh"

namespace ferrum_moe_cuda {
namespace {

constexpr int kAlignThreads = 512;
constexpr int kAlignWarps = kAlignThreads / 32;
constexpr int kRounds = 4;                            // pairs per lane, at most
constexpr int kWarpPairs = 32 * kRounds;              // consecutive pairs a warp ranks, at most
constexpr int kChunk = kAlignWarps * kWarpPairs;      // pairs a CTA places, at most
constexpr int kMaxScanningChunks = 16;                // each scatter CTA reads every chunk's counts up to this
constexpr int kCountsInFlight = 8;                    // chunk counts a thread reads before adding any
constexpr int kExpertsPerThread = static_cast<int>(kMaxAlignLocalExperts) / kAlignThreads;
static_assert(kExpertsPerThread * kAlignThreads == kMaxAlignLocalExperts, "even expert split");
static_assert(kChunk <= 65535, "a warp's start within its chunk fits uint16_t");
constexpr int kMaxExpertBits = 10;  // local expert ids below kMaxAlignLocalExperts
static_assert(kMaxAlignLocalExperts <= (1 << kMaxExpertBits), "every local id in kMaxExpertBits bits");

using Scan = cub::BlockScan<int, kAlignThreads>;

struct AlignShared {
  typename Scan::TempStorage scan;
  int counts[kMaxAlignLocalExperts];        // the expert's pairs, all chunks
  int offsets[kMaxAlignLocalExperts + 1];   // its segment's start in sorted_token_ids
  int chunk_start[kMaxAlignLocalExperts];   // its pairs in earlier chunks
  // Warp w's pairs of expert e while ranking; then those of warps before w.
  uint16_t warp_counts[kAlignWarps][kMaxAlignLocalExperts];
};

// A pair is topk_ids' entry (pair / top_k, pair % top_k); pair numbers are
// below 2^31 (plugin.h), so one 32-bit division finds both.
template <class Index>
struct Pairs {
  const AlignParams& p;
  uint32_t count;
  __device__ int expert(uint32_t pair) const {
    const uint32_t top_k = static_cast<uint32_t>(p.top_k);
    const uint32_t token = pair / top_k;
    return local_expert_of(static_cast<const Index*>(p.topk_ids), p.topk_ids_stride0, p.topk_ids_stride1, token,
                           pair - token * top_k, p.num_experts, p.expert_map, p.num_local_experts);
  }
};

// This thread's pairs of the chunk at `base`. The chunk's pairs are dealt to
// the warps in runs of `rounds` x 32 (rounds: the fewest with which the warps
// cover the chunk; a small chunk fills as many warps as it needs, up to
// every warp at one round each): warp w's run starts at
// base + w * rounds * 32, lane l's pair of round i is the run's i * 32 + l.
// Their experts are read before anything else (one round trip).
struct ChunkPairs {
  uint32_t first;                // round 0's pair
  int rounds;
  int experts[kRounds];          // -1: past the last pair, or dropped
  int ranks[kRounds];            // among the warp's earlier pairs of its expert
};

template <class Index>
__device__ void read_experts(const Pairs<Index>& pairs, uint32_t base, ChunkPairs& c) {
  const uint32_t in_chunk = min(pairs.count - base, static_cast<uint32_t>(kChunk));
  c.rounds = static_cast<int>((in_chunk + kAlignThreads - 1) / kAlignThreads);
  c.first = base + threadIdx.x / 32 * c.rounds * 32 + threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < kRounds; ++i) {
    const uint32_t pair = c.first + i * 32;
    c.experts[i] = i < c.rounds && pair < pairs.count ? pairs.expert(pair) : -1;
  }
}

// The lanes of this warp whose expert is this lane's (for e >= 0): one ballot
// per bit of the expert ids (`bits` of them, unrolled: the ballots do not wait
// on each other). __match_any_sync gives the same mask, but its time grows
// with the distinct values among the lanes: with 256 experts it cost align
// ~1 us per round of every warp (kernel notes, "v57 measured").
__device__ __forceinline__ unsigned lanes_with_expert(int e, int bits) {
  unsigned lanes = __ballot_sync(0xffffffffu, e >= 0);
#pragma unroll
  for (int b = 0; b < kMaxExpertBits; ++b) {
    if (b == bits) break;  // the same in every lane
    const bool set = (e >> b) & 1;
    const unsigned with_bit = __ballot_sync(0xffffffffu, set);
    lanes &= set ? with_bit : ~with_bit;
  }
  return lanes;
}

__device__ void clear_warp_counts(const AlignParams& p, AlignShared& s) {
  for (int i = threadIdx.x; i < kAlignWarps * p.num_local_experts; i += kAlignThreads)
    s.warp_counts[i / p.num_local_experts][i % p.num_local_experts] = 0;
}

// Ranks this warp's pairs (c.ranks) and leaves its histogram in
// s.warp_counts[warp] (zero on entry): one warp's work, warp barriers only.
__device__ void rank_in_warp(const AlignParams& p, uint32_t count, AlignShared& s, ChunkPairs& c) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const unsigned earlier_lanes = (1u << lane) - 1;
  const int bits = p.num_local_experts > 1 ? 32 - __clz(p.num_local_experts - 1) : 0;
#pragma unroll
  for (int i = 0; i < kRounds; ++i) {
    // The same in every lane: the warp's run has ended.
    if (i == c.rounds || c.first - lane + i * 32 >= count) break;
    const int e = c.experts[i];
    const unsigned same = lanes_with_expert(e, bits);  // lanes of this round with the same expert
    const int before = e >= 0 ? s.warp_counts[warp][e] : 0;
    c.ranks[i] = before + __popc(same & earlier_lanes);
    __syncwarp();  // every lane has read its count before the round's leaders advance it
    if (e >= 0 && lane == __ffs(same) - 1) s.warp_counts[warp][e] = static_cast<uint16_t>(before + __popc(same));
    __syncwarp();
  }
}

// Reads the chunk at `base` (read_experts), runs `meanwhile()` (work that needs
// no histogram, in the shadow of those reads), then ranks it: every warp's
// histogram is in s.warp_counts for the whole CTA on return.
template <class Index, class Meanwhile>
__device__ void rank_chunk(const AlignParams& p, const Pairs<Index>& pairs, uint32_t base, AlignShared& s,
                           ChunkPairs& c, Meanwhile&& meanwhile) {
  read_experts(pairs, base, c);
  clear_warp_counts(p, s);
  meanwhile();
  __syncthreads();
  rank_in_warp(p, pairs.count, s, c);
  __syncthreads();
}

// Calls take(chunk, count) with every chunk's count of expert e, in chunk
// order, the counts read kCountsInFlight at a time (one round trip per group,
// not per chunk; take may rewrite the group's entries).
template <class Take>
__device__ void for_each_chunk_count(const int32_t* chunk_counts, int num_chunks, int num_local, int e,
                                     Take&& take) {
  for (int first = 0; first < num_chunks; first += kCountsInFlight) {
    int values[kCountsInFlight];
#pragma unroll
    for (int i = 0; i < kCountsInFlight; ++i)
      values[i] = first + i < num_chunks ? chunk_counts[static_cast<int64_t>(first + i) * num_local + e] : 0;
#pragma unroll
    for (int i = 0; i < kCountsInFlight; ++i) {
      if (first + i < num_chunks) take(first + i, values[i]);
    }
  }
}

// Every expert e = threadIdx.x, + kAlignThreads, ...: the warps' histograms
// become each warp's start within the chunk (all read before any is
// rewritten), and `chunk_total(e, pairs)` is handed the chunk's pairs of e.
template <class Total>
__device__ void scan_warps(const AlignParams& p, AlignShared& s, Total&& chunk_total) {
  for (int e = threadIdx.x; e < p.num_local_experts; e += kAlignThreads) {
    int n[kAlignWarps];
#pragma unroll
    for (int w = 0; w < kAlignWarps; ++w) n[w] = s.warp_counts[w][e];
    int running = 0;
#pragma unroll
    for (int w = 0; w < kAlignWarps; ++w) {
      s.warp_counts[w][e] = static_cast<uint16_t>(running);
      running += n[w];
    }
    chunk_total(e, running);
  }
}

// From every expert's total in s.counts (visible to this thread): each
// segment's start (s.offsets) and the padded total (s.offsets[num_local]),
// visible to the whole CTA on return.
__device__ void place_segments(const AlignParams& p, AlignShared& s) {
  const int num_local = p.num_local_experts;
  int padded[kExpertsPerThread];
  int thread_total = 0;
#pragma unroll
  for (int i = 0; i < kExpertsPerThread; ++i) {
    const int e = threadIdx.x * kExpertsPerThread + i;
    padded[i] = e < num_local ? (s.counts[e] + p.block_size - 1) / p.block_size * p.block_size : 0;
    thread_total += padded[i];
  }
  int thread_offset = 0;
  int total = 0;
  Scan(s.scan).ExclusiveSum(thread_total, thread_offset, total);
#pragma unroll
  for (int i = 0; i < kExpertsPerThread; ++i) {
    const int e = threadIdx.x * kExpertsPerThread + i;
    if (e < num_local) s.offsets[e] = thread_offset;
    thread_offset += padded[i];
  }
  if (threadIdx.x == 0) s.offsets[num_local] = total;
  __syncthreads();
}

// expert_ids[b] for b = first, first + step, ...: the expert whose segment
// holds routing block b, -1 past the padded total.
__device__ void write_expert_ids(const AlignParams& p, const AlignShared& s, int64_t first, int64_t step) {
  const int num_local = p.num_local_experts;
  const int total = s.offsets[num_local];
  for (int64_t b = first; b < p.expert_ids_len; b += step) {
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

// This thread's pairs into their segments (s.offsets, s.chunk_start and the
// warps' starts in s.warp_counts complete).
__device__ void scatter(const AlignParams& p, const AlignShared& s, const ChunkPairs& c) {
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < kRounds; ++i) {
    const int e = c.experts[i];
    if (e < 0) continue;
    const int64_t destination =
        static_cast<int64_t>(s.offsets[e]) + s.chunk_start[e] + s.warp_counts[warp][e] + c.ranks[i];
    if (destination < p.sorted_len) p.sorted_token_ids[destination] = static_cast<int32_t>(c.first + i * 32);
  }
}

// The sentinel (the pair count) where no pair goes: the padding of segments
// warp_index, warp_index + warps, ... (a warp each) and the tail past the
// padded total (positions thread_index, + threads, ...).
__device__ void fill_padding(const AlignParams& p, const AlignShared& s, int warp_index, int warps,
                             int64_t thread_index, int64_t threads) {
  const int32_t sentinel = static_cast<int32_t>(p.num_tokens * p.top_k);
  const int lane = threadIdx.x % 32;
  for (int e = warp_index; e < p.num_local_experts; e += warps) {
    const int64_t end = min(static_cast<int64_t>(s.offsets[e + 1]), p.sorted_len);
    for (int64_t q = static_cast<int64_t>(s.offsets[e]) + s.counts[e] + lane; q < end; q += 32)
      p.sorted_token_ids[q] = sentinel;
  }
  for (int64_t q = s.offsets[p.num_local_experts] + thread_index; q < p.sorted_len; q += threads)
    p.sorted_token_ids[q] = sentinel;
}

template <class Index>
__device__ Pairs<Index> pairs_of(const AlignParams& p) {
  return Pairs<Index>{p, static_cast<uint32_t>(p.num_tokens * p.top_k)};
}

// The whole of align in one CTA (up to one chunk of pairs).
template <class Index>
__global__ void __launch_bounds__(kAlignThreads) moe_align_block_size_kernel(AlignParams p) {
  dependent_grid_begin();
  __shared__ AlignShared s;
  const Pairs<Index> pairs = pairs_of<Index>(p);
  ChunkPairs c;
  rank_chunk(p, pairs, 0, s, c, [] {});
  scan_warps(p, s, [&](int e, int n) {
    s.counts[e] = n;
    s.chunk_start[e] = 0;
  });
  __syncthreads();  // the counts, for place_segments' blocked order
  place_segments(p, s);
  if (threadIdx.x == 0) *p.num_tokens_post_padded = s.offsets[p.num_local_experts];
  write_expert_ids(p, s, threadIdx.x, kAlignThreads);
  scatter(p, s, c);
  fill_padding(p, s, threadIdx.x / 32, kAlignWarps, threadIdx.x, kAlignThreads);
}

// Many chunks: one CTA per chunk counts its pairs per expert into
// chunk_counts[chunk][e] ...
template <class Index>
__global__ void __launch_bounds__(kAlignThreads) align_count_kernel(AlignParams p, int32_t* chunk_counts) {
  dependent_grid_begin();
  __shared__ AlignShared s;
  const Pairs<Index> pairs = pairs_of<Index>(p);
  ChunkPairs c;
  rank_chunk(p, pairs, blockIdx.x * kChunk, s, c, [] {});
  scan_warps(p, s, [&](int e, int n) { chunk_counts[static_cast<int64_t>(blockIdx.x) * p.num_local_experts + e] = n; });
}

// ... past kMaxScanningChunks, one CTA turns them into each chunk's starts (in
// place) and the experts' totals (row num_chunks) ...
__global__ void __launch_bounds__(kAlignThreads) align_prefix_kernel(AlignParams p, int32_t* chunk_counts,
                                                                     int num_chunks) {
  dependent_grid_begin();
  const int num_local = p.num_local_experts;
  for (int e = threadIdx.x; e < num_local; e += kAlignThreads) {
    int running = 0;
    for_each_chunk_count(chunk_counts, num_chunks, num_local, e, [&](int chunk, int count) {
      chunk_counts[static_cast<int64_t>(chunk) * num_local + e] = running;
      running += count;
    });
    chunk_counts[static_cast<int64_t>(num_chunks) * num_local + e] = running;
  }
}

// ... and one CTA per chunk places its pairs after the earlier chunks' ones,
// each CTA writing its share of expert_ids and of the sentinel. `prefixed`:
// the prefix kernel ran; otherwise each CTA sums the counts itself.
template <class Index>
__global__ void __launch_bounds__(kAlignThreads) align_scatter_kernel(AlignParams p, const int32_t* chunk_counts,
                                                                      int num_chunks, bool prefixed) {
  dependent_grid_begin();
  __shared__ AlignShared s;
  const Pairs<Index> pairs = pairs_of<Index>(p);
  const int num_local = p.num_local_experts;
  const int chunk = blockIdx.x;
  ChunkPairs c;
  // Each expert's start in this chunk and total, in place_segments' blocked
  // order, read while the chunk's experts are.
  rank_chunk(p, pairs, chunk * kChunk, s, c, [&] {
#pragma unroll
    for (int i = 0; i < kExpertsPerThread; ++i) {
      const int e = threadIdx.x * kExpertsPerThread + i;
      if (e >= num_local) break;
      int before = 0, total = 0;
      if (prefixed) {
        before = chunk_counts[static_cast<int64_t>(chunk) * num_local + e];
        total = chunk_counts[static_cast<int64_t>(num_chunks) * num_local + e];
      } else {
        for_each_chunk_count(chunk_counts, num_chunks, num_local, e, [&](int earlier, int count) {
          before += earlier < chunk ? count : 0;
          total += count;
        });
      }
      s.chunk_start[e] = before;
      s.counts[e] = total;
    }
  });
  scan_warps(p, s, [](int, int) {});
  place_segments(p, s);
  if (chunk == 0 && threadIdx.x == 0) *p.num_tokens_post_padded = s.offsets[num_local];
  const int64_t thread_index = static_cast<int64_t>(chunk) * kAlignThreads + threadIdx.x;
  const int64_t threads = static_cast<int64_t>(gridDim.x) * kAlignThreads;
  write_expert_ids(p, s, thread_index, threads);
  scatter(p, s, c);
  fill_padding(p, s, chunk * kAlignWarps + threadIdx.x / 32, gridDim.x * kAlignWarps, thread_index, threads);
}

template <class Index>
cudaError_t launch_align(const AlignParams& params, cudaStream_t stream) {
  const int64_t num_pairs = params.num_tokens * params.top_k;
  if (num_pairs <= kChunk) {
    return launch_dependent(moe_align_block_size_kernel<Index>, 1, kAlignThreads, 0, stream, params);
  }
  // num_pairs < 2^31 (plugin.h), so the chunk count fits an int.
  const int num_chunks = static_cast<int>((num_pairs + kChunk - 1) / kChunk);
  const bool prefixed = num_chunks > kMaxScanningChunks;
  const size_t table = static_cast<size_t>(num_chunks + (prefixed ? 1 : 0)) * params.num_local_experts;
  int32_t* chunk_counts = nullptr;
  // Stream-ordered (a graph memory node under capture), freed after the scatter.
  cudaError_t status = cudaMallocAsync(reinterpret_cast<void**>(&chunk_counts), table * sizeof(int32_t), stream);
  if (status != cudaSuccess) return status;
  status = launch_dependent(align_count_kernel<Index>, num_chunks, kAlignThreads, 0, stream, params, chunk_counts);
  if (status == cudaSuccess && prefixed) {
    status = launch_dependent(align_prefix_kernel, 1, kAlignThreads, 0, stream, params, chunk_counts, num_chunks);
  }
  if (status == cudaSuccess) {
    status = launch_dependent(align_scatter_kernel<Index>, num_chunks, kAlignThreads, 0, stream, params,
                              static_cast<const int32_t*>(chunk_counts), num_chunks, prefixed);
  }
  const cudaError_t freed = cudaFreeAsync(chunk_counts, stream);
  return status != cudaSuccess ? status : freed;
}

}  // namespace

cudaError_t launch_moe_align_block_size(const AlignParams& params, cudaStream_t stream) {
  return params.topk_ids_int64 ? launch_align<int64_t>(params, stream) : launch_align<int32_t>(params, stream);
}

}  // namespace ferrum_moe_cuda
