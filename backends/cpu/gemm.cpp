#include "gemm.hpp"

#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "ferrum_moe/plugin.hpp"

namespace ferrum::cpu {
namespace {

// Rows of one tile item: a multiple of the micro-kernels' 6 rows and of AMX's
// 16; 144 measured a few percent above 48, 96 and 240 (docs/cpu-kernels.md).
constexpr int64_t kItemRows = 144;
// Least work for which a call takes one more thread (threads_for): about
// 10 us of one core. 8 multiply-adds count as one byte: the rate ratio of the
// tile and stream kernels.
constexpr int64_t kWorkPerThread = 256 << 10;
// Rows packed by one task of the packing phase (a multiple of every row_align).
constexpr int64_t kPackRows = 32;

struct Item {
  int64_t job, row_begin, rows, block_begin, blocks;
};
struct PackTask {
  int64_t job, row_begin, rows;
};

// Buffers of the one call running at a time (exclusive_compute): kept and
// grown between calls, so a warm backend allocates nothing per call.
struct CallState {
  std::mutex mutex;
  AlignedBuffer arena;
  std::vector<Item> items;
  std::vector<PackTask> packs;
  std::vector<int64_t> a_offset, xs_offset;  // per job, in bytes and floats
};

CallState& state() {
  static CallState s;
  return s;
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// The gated form's store of one item (whole gate blocks: gemm_gated): per
// row, [gate | up] times the row's router weight, silu(gate) * up, then the
// plain store of that one row (`row`: room for 3 x the item's columns).
void store_gated(const KernelSet& kernels, const Item& it, const Job& job, const float* gate, const float* up,
                 float* row, const StoreArgs& base) {
  const int64_t cols = it.blocks * kBlockCols, c0 = it.block_begin * kBlockCols;
  float* product = row + 2 * cols;
  for (int64_t r = 0; r < it.rows; ++r) {
    const float scale = job.row_scale.empty() ? 1.0f : job.row_scale[size_t(it.row_begin + r)];
    for (int64_t c = 0; c < cols; ++c) {
      row[c] = gate[r * cols + c] * scale;
      row[cols + c] = up[r * cols + c] * scale;
    }
    kernels.silu_mul(row, product, cols, Float::f32);
    StoreArgs st = base;
    st.acc = product;
    st.ld = cols;
    st.m = 1;
    st.c0 = c0;
    st.c_lo = c0;
    st.c_hi = c0 + cols;
    st.out_rows = job.out_rows.data() + it.row_begin + r;
    st.row_scale = nullptr;
    kernels.store(st);
  }
}

}  // namespace

int compute_threads() {
  static const int threads = [] {
    const char* env = std::getenv("FERRUM_MOE_NUM_THREADS");
    if (env == nullptr || *env == '\0') return omp_get_max_threads();
    char* end = nullptr;
    const long v = std::strtol(env, &end, 10);
    if (*end != '\0' || v < 1 || v > 4096) {
      throw plugin::Error(FM_ERROR_INVALID_ARGUMENT,
                          std::string("FERRUM_MOE_NUM_THREADS=") + env + ": expected a thread count from 1 to 4096");
    }
    return int(v);
  }();
  return threads;
}

int threads_for(int64_t work) { return int(std::clamp<int64_t>(work / kWorkPerThread, 1, compute_threads())); }

std::unique_lock<std::mutex> exclusive_compute() { return std::unique_lock<std::mutex>(state().mutex); }

namespace {

// Both forms: `half` 0 computes columns [col_begin, col_begin + n) into out
// (+ bias); half > 0 the gated form over gate columns [0, half).
void run_gemm(const KernelSet& kernels, const PackedWeights& w, Float dtype, const DLTensor& x,
              const std::vector<Job>& jobs, int64_t col_begin, int64_t n, const DLTensor* bias, DLTensor& out,
              int64_t half) {
  if (jobs.empty()) return;
  const auto lock = exclusive_compute();
  CallState& s = state();
  const bool bf16 = kernels.bf16.pack != nullptr && w.bits == 4 && dtype == Float::bf16;
  const KernelPath& path = bf16 ? kernels.bf16 : kernels.f32;
  const int64_t kpad = w.kpad();
  const int64_t first_block = col_begin / kBlockCols, last_block = (col_begin + n - 1) / kBlockCols;

  // Where each job's packed rows and unit sums go, and the work items.
  s.items.clear();
  s.packs.clear();
  s.a_offset.clear();
  s.xs_offset.clear();
  int64_t a_bytes = 0, xs_floats = 0, max_item_rows = 1;
  for (size_t j = 0; j < jobs.size(); ++j) {
    const int64_t m = int64_t(jobs[j].in_rows.size()), e = jobs[j].expert;
    s.a_offset.push_back(a_bytes);
    s.xs_offset.push_back(xs_floats);
    a_bytes += round_up(round_up(m, path.row_align) * kpad * path.a_bytes, 64);
    xs_floats += m * (w.unit_begin[size_t(e) + 1] - w.unit_begin[size_t(e)]);
    for (int64_t r = 0; r < m; r += kPackRows) s.packs.push_back({int64_t(j), r, std::min(kPackRows, m - r)});
    if (m <= path.stream_rows) {
      for (int64_t b = first_block; b <= last_block; ++b) s.items.push_back({int64_t(j), 0, m, b, 1});
      max_item_rows = std::max(max_item_rows, m);
      continue;
    }
    for (int64_t r = 0; r < m; r += kItemRows)
      for (int64_t b = first_block; b <= last_block; b += kMaxItemBlocks)
        s.items.push_back({int64_t(j), r, std::min(kItemRows, m - r), b, std::min(kMaxItemBlocks, last_block + 1 - b)});
    max_item_rows = std::max(max_item_rows, std::min(kItemRows, m));
  }
  if (s.items.empty()) return;
  const int64_t passes = half > 0 ? 2 : 1;  // the gated form computes each gate block and its up block
  int64_t work = 0;
  bool streams_only = true;
  for (const Item& it : s.items) {
    work += passes * it.blocks * kBlockCols * kpad * (w.bits + it.rows) / 8;
    streams_only = streams_only && it.rows <= path.stream_rows;
  }
  const int threads = int(std::min<int64_t>(threads_for(work), int64_t(s.items.size())));
  const int64_t acc_bytes = round_up(max_item_rows * kMaxItemBlocks * kBlockCols * 4, 64);
  // The gated form's second accumulators, and a row of [gate | up] and its product.
  constexpr int64_t kGatedRowBytes = 3 * kMaxItemBlocks * kBlockCols * 4;
  const int64_t scratch_bytes = passes * acc_bytes + kTileScratchBytes + (half > 0 ? kGatedRowBytes : 0);
  const int64_t xs_at = round_up(a_bytes, 64), scratch_at = xs_at + round_up(xs_floats * 4, 64);
  const int64_t total = scratch_at + threads * scratch_bytes;
  if (int64_t(s.arena.bytes()) < total) s.arena = AlignedBuffer(size_t(total));
  char* arena = s.arena.as<char>();
  auto* xs = reinterpret_cast<float*>(arena + xs_at);

  const void* x_data = plugin::data_start(x);
  const int64_t x_stride = plugin::row_stride(x);
  const StoreArgs store_base{nullptr, 0, 0, 0, 0, 0, col_begin, nullptr, nullptr,
                             bias != nullptr ? plugin::data_start(*bias) : nullptr,
                             bias != nullptr ? float_kind(bias->dtype) : Float::f32, plugin::data_start(out),
                             float_kind(out.dtype), plugin::row_stride(out)};

#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < s.packs.size(); ++i) {
      const PackTask& p = s.packs[i];
      const Job& job = jobs[size_t(p.job)];
      const int64_t nu = w.unit_begin[size_t(job.expert) + 1] - w.unit_begin[size_t(job.expert)];
      const int64_t m = int64_t(job.in_rows.size());
      char* a = arena + s.a_offset[size_t(p.job)] + p.row_begin * kpad * path.a_bytes;
      path.pack({&w, job.expert, x_data, dtype, x_stride, job.in_rows.data() + p.row_begin, p.rows, a,
                 xs + s.xs_offset[size_t(p.job)] + p.row_begin * nu});
      // Rows past m up to row_align: zeros, read by AMX's 16-row tiles and never stored.
      const int64_t padded = round_up(m, path.row_align);
      if (p.row_begin + p.rows == m && padded > m) std::fill_n(a + p.rows * kpad * path.a_bytes, (padded - m) * kpad * path.a_bytes, char(0));
    }
    char* scratch = arena + scratch_at + omp_get_thread_num() * scratch_bytes;
    auto* acc = reinterpret_cast<float*>(scratch);
    auto* up_acc = reinterpret_cast<float*>(scratch + acc_bytes);
    char* tile_scratch = scratch + passes * acc_bytes;
    auto* gated_row = reinterpret_cast<float*>(tile_scratch + kTileScratchBytes);
    auto run = [&](const Item& it) {
      const Job& job = jobs[size_t(it.job)];
      const int64_t nu = w.unit_begin[size_t(job.expert) + 1] - w.unit_begin[size_t(job.expert)];
      TileArgs t{&w,
                 job.expert,
                 arena + s.a_offset[size_t(it.job)] + it.row_begin * kpad * path.a_bytes,
                 xs + s.xs_offset[size_t(it.job)] + it.row_begin * nu,
                 it.rows,
                 it.block_begin,
                 it.blocks,
                 acc,
                 tile_scratch};
      const auto kernel = it.rows <= path.stream_rows ? path.stream : path.tile;
      kernel(t);
      if (half > 0) {
        t.block_begin += half / kBlockCols;
        t.acc = up_acc;
        kernel(t);
        store_gated(kernels, it, job, acc, up_acc, gated_row, store_base);
        return;
      }
      StoreArgs st = store_base;
      st.acc = acc;
      st.ld = it.blocks * kBlockCols;
      st.m = it.rows;
      st.c0 = it.block_begin * kBlockCols;
      st.c_lo = std::max(st.c0, col_begin);
      st.c_hi = std::min(st.c0 + st.ld, col_begin + n);
      st.out_rows = job.out_rows.data() + it.row_begin;
      st.row_scale = job.row_scale.empty() ? nullptr : job.row_scale.data() + it.row_begin;
      kernels.store(st);
    };
    if (streams_only) {
      // Equal items, each thread a contiguous run of them: one stream through
      // memory per thread, which its prefetches carry from item to item.
#pragma omp for schedule(static)
      for (size_t i = 0; i < s.items.size(); ++i) run(s.items[i]);
    } else {
#pragma omp for schedule(dynamic, 1)
      for (size_t i = 0; i < s.items.size(); ++i) run(s.items[i]);
    }
  }
}

}  // namespace

void gemm(const KernelSet& kernels, const PackedWeights& w, Float dtype, const DLTensor& x, const std::vector<Job>& jobs,
          int64_t col_begin, int64_t n, const DLTensor* bias, DLTensor& out) {
  run_gemm(kernels, w, dtype, x, jobs, col_begin, n, bias, out, 0);
}

void gemm_gated(const KernelSet& kernels, const PackedWeights& w, Float dtype, const DLTensor& x,
                const std::vector<Job>& jobs, int64_t half, DLTensor& out) {
  if (half <= 0 || half % kBlockCols != 0) {
    throw plugin::Error(FM_ERROR_INTERNAL, "gemm_gated: the gate's half must be whole column blocks");
  }
  run_gemm(kernels, w, dtype, x, jobs, 0, half, nullptr, out, half);
}

}  // namespace ferrum::cpu
