// moe_align_block_size in one CTA:
//   1. count the pairs of each local expert (shared-memory atomics);
//   2. exclusive scan of the counts padded to block_size -> segment offsets,
//      num_tokens_post_padded, and expert_ids per block (-1 past the end);
//   3. fill sorted_token_ids with the sentinel, then scatter every valid pair
//      into its expert's segment, in increasing pair order.
// Decode (at most one pair per thread): each thread places its pair at its
// rank among the earlier pairs of the same expert, read from shared memory;
// no sort. Otherwise step 3 walks the pairs in chunks; within a chunk a block radix sort of
// (expert, position-in-chunk) keys groups pairs by expert while keeping their
// order (the position makes every key unique, so the sort's stability does
// not matter), and per-expert cursors carry the count across chunks.
#include "routing.hpp"

#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>

#include "routing.cuh"

namespace ferrum_moe_cuda {
namespace {

constexpr int kAlignThreads = 256;
constexpr int kItemsPerThread = 8;
constexpr int kChunk = kAlignThreads * kItemsPerThread;  // pairs sorted per round
constexpr int kChunkBits = 11;                            // bits of a position in a chunk
static_assert((1 << kChunkBits) == kChunk, "key layout: expert << kChunkBits | position");
constexpr int kExpertsPerThread = static_cast<int>(kMaxAlignLocalExperts) / kAlignThreads;
static_assert(kExpertsPerThread * kAlignThreads == kMaxAlignLocalExperts, "even expert split");

// Number of bits needed to hold values 0..value.
__device__ __forceinline__ int bit_width(unsigned value) { return 32 - __clz(value); }

template <class Index>
__global__ void __launch_bounds__(kAlignThreads) moe_align_block_size_kernel(AlignParams p) {
  using Sort = cub::BlockRadixSort<unsigned, kAlignThreads, kItemsPerThread>;
  using Scan = cub::BlockScan<int, kAlignThreads>;
  __shared__ union {
    typename Sort::TempStorage sort;
    typename Scan::TempStorage scan;
  } temp;
  __shared__ int counts[kMaxAlignLocalExperts];
  __shared__ int offsets[kMaxAlignLocalExperts + 1];
  __shared__ int cursor[kMaxAlignLocalExperts];
  __shared__ int segment_start[kMaxAlignLocalExperts];
  __shared__ int sorted_experts[kChunk];

  const auto* topk_ids = static_cast<const Index*>(p.topk_ids);
  const int num_local = p.num_local_experts;
  const int64_t num_pairs = p.num_tokens * p.top_k;
  const int32_t sentinel = static_cast<int32_t>(num_pairs);
  const int tid = threadIdx.x;
  auto expert_of_pair = [&](int64_t pair) {
    return local_expert_of(topk_ids, p.topk_ids_stride0, p.topk_ids_stride1, pair / p.top_k,
                           pair % p.top_k, p.num_experts, p.expert_map, num_local);
  };

  for (int e = tid; e < num_local; e += kAlignThreads) {
    counts[e] = 0;
    cursor[e] = 0;
  }
  __syncthreads();

  for (int64_t pair = tid; pair < num_pairs; pair += kAlignThreads) {
    const int e = expert_of_pair(pair);
    if (e >= 0) atomicAdd(&counts[e], 1);
  }
  __syncthreads();

  int padded[kExpertsPerThread];
  int thread_total = 0;
#pragma unroll
  for (int i = 0; i < kExpertsPerThread; ++i) {
    const int e = tid * kExpertsPerThread + i;
    padded[i] = e < num_local ? (counts[e] + p.block_size - 1) / p.block_size * p.block_size : 0;
    thread_total += padded[i];
  }
  int thread_offset = 0;
  int total = 0;
  Scan(temp.scan).ExclusiveSum(thread_total, thread_offset, total);
#pragma unroll
  for (int i = 0; i < kExpertsPerThread; ++i) {
    const int e = tid * kExpertsPerThread + i;
    if (e < num_local) offsets[e] = thread_offset;
    thread_offset += padded[i];
  }
  if (tid == 0) {
    offsets[num_local] = total;
    *p.num_tokens_post_padded = total;
  }
  __syncthreads();

  for (int64_t q = tid; q < p.sorted_len; q += kAlignThreads) p.sorted_token_ids[q] = sentinel;
  for (int64_t b = tid; b < p.expert_ids_len; b += kAlignThreads) {
    const int64_t position = b * p.block_size;
    int expert = -1;
    if (position < total) {
      // The last expert whose segment starts at or before `position`; empty
      // segments start where the next one does, so this is the non-empty owner.
      int lo = 0, hi = num_local;  // offsets[lo] <= position < offsets[hi]
      while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (offsets[mid] <= position) lo = mid; else hi = mid;
      }
      expert = lo;
    }
    p.expert_ids[b] = expert;
  }
  // Orders the sentinel fill before the scatter below, across threads.
  __syncthreads();

  if (num_pairs <= kAlignThreads) {
    int* expert_of = sorted_experts;  // one entry per pair
    const int e = tid < num_pairs ? expert_of_pair(tid) : -1;
    expert_of[tid] = e;
    __syncthreads();
    if (e >= 0) {
      int rank = 0;
      for (int j = 0; j < tid; ++j) rank += expert_of[j] == e;
      const int64_t destination = static_cast<int64_t>(offsets[e]) + rank;
      if (destination < p.sorted_len) p.sorted_token_ids[destination] = tid;
    }
    return;
  }

  const unsigned invalid_key_expert = static_cast<unsigned>(num_local);
  const int end_bit = kChunkBits + bit_width(invalid_key_expert);
  for (int64_t base = 0; base < num_pairs; base += kChunk) {
    unsigned keys[kItemsPerThread];
#pragma unroll
    for (int i = 0; i < kItemsPerThread; ++i) {
      const int position = tid * kItemsPerThread + i;
      const int64_t pair = base + position;
      const int e = pair < num_pairs ? expert_of_pair(pair) : -1;
      const unsigned expert = e >= 0 ? static_cast<unsigned>(e) : invalid_key_expert;
      keys[i] = (expert << kChunkBits) | static_cast<unsigned>(position);
    }
    Sort(temp.sort).Sort(keys, 0, end_bit);  // blocked: item i of thread t is rank t * 8 + i

#pragma unroll
    for (int i = 0; i < kItemsPerThread; ++i)
      sorted_experts[tid * kItemsPerThread + i] = static_cast<int>(keys[i] >> kChunkBits);
    __syncthreads();

#pragma unroll
    for (int i = 0; i < kItemsPerThread; ++i) {
      const int rank = tid * kItemsPerThread + i;
      const int e = sorted_experts[rank];
      if (e < num_local && (rank == 0 || sorted_experts[rank - 1] != e)) segment_start[e] = rank;
    }
    __syncthreads();

#pragma unroll
    for (int i = 0; i < kItemsPerThread; ++i) {
      const int rank = tid * kItemsPerThread + i;
      const int e = sorted_experts[rank];
      if (e >= num_local) continue;
      const int64_t destination = static_cast<int64_t>(offsets[e]) + cursor[e] + (rank - segment_start[e]);
      if (destination < p.sorted_len)
        p.sorted_token_ids[destination] = static_cast<int32_t>(base + (keys[i] & (kChunk - 1)));
    }
    __syncthreads();

    // The last rank of each expert's run advances that expert's cursor.
#pragma unroll
    for (int i = 0; i < kItemsPerThread; ++i) {
      const int rank = tid * kItemsPerThread + i;
      const int e = sorted_experts[rank];
      if (e < num_local && (rank == kChunk - 1 || sorted_experts[rank + 1] != e))
        cursor[e] += rank - segment_start[e] + 1;
    }
    __syncthreads();
  }
}

}  // namespace

cudaError_t launch_moe_align_block_size(const AlignParams& params, cudaStream_t stream) {
  if (params.topk_ids_int64) {
    moe_align_block_size_kernel<int64_t><<<1, kAlignThreads, 0, stream>>>(params);
  } else {
    moe_align_block_size_kernel<int32_t><<<1, kAlignThreads, 0, stream>>>(params);
  }
  return cudaGetLastError();
}

}  // namespace ferrum_moe_cuda
