// The CPU GEMM driver: packs each job's activations, cuts the work into items
// (job rows x column blocks) and runs every item of a call, all experts
// together, in one OpenMP parallel region.
#pragma once

#include <mutex>
#include <vector>

#include "kernels.hpp"

namespace ferrum::cpu {

// One matmul job: rows of x (by index) times one expert's column window,
// written to rows of out, each optionally scaled.
struct Job {
  int64_t expert;
  std::vector<int64_t> in_rows;
  std::vector<int64_t> out_rows;
  std::vector<float> row_scale;  // empty: 1
};

// Threads of every parallel region: FERRUM_MOE_NUM_THREADS when set, else
// OpenMP's default (OMP_NUM_THREADS, or one per core). Read once; an invalid
// value is an error.
int compute_threads();

// Threads for a call of `work` (bytes streamed, plus one per 8 multiply-adds):
// one per kWorkPerThread, at most compute_threads(). A call too small to repay
// waking a thread team runs on the calling thread.
int threads_for(int64_t work);

// Held around every parallel region of the backend: calls from several host
// threads run one after another, each with all the threads, instead of
// oversubscribing the cores with one team per caller.
std::unique_lock<std::mutex> exclusive_compute();

void gemm(const KernelSet& kernels, const PackedWeights& w, Float dtype, const DLTensor& x, const std::vector<Job>& jobs,
          int64_t col_begin, int64_t n, const DLTensor* bias, DLTensor& out);

// The gated form (plugin.h, ABI 1.3): out[r, j] = silu(y[r, j]) * y[r, half + j]
// for j < half, y the jobs' rows over all of an expert's 2 * half columns;
// each item computes a gate block and its up block and stores only the
// product. half must be a multiple of kBlockCols.
void gemm_gated(const KernelSet& kernels, const PackedWeights& w, Float dtype, const DLTensor& x,
                const std::vector<Job>& jobs, int64_t half, DLTensor& out);

}  // namespace ferrum::cpu
