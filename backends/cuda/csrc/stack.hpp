// CudaStack: one expert stack resident on a CUDA device, repacked at load into
// the GEMM's tile layout (gemm/layout.hpp); gemm_batched and gemm_routed
// validate what only this backend knows, then launch one kernel per call
// (gemm_batched: one per kMaxBatchedWorkItems row slices).
#ifndef FERRUM_MOE_CUDA_STACK_HPP_
#define FERRUM_MOE_CUDA_STACK_HPP_

#include <cstdint>

#include "cuda_check.hpp"
#include "ferrum_moe/plugin.hpp"
#include "gemm/params.hpp"

namespace ferrum_moe_cuda {

class CudaStack final : public ferrum::plugin::Stack {
 public:
  // Copies and repacks the GPTQ tensors of `args` (host or device), then
  // synchronises `args.stream`, so the caller may free its inputs on return.
  explicit CudaStack(const FmStackCreateArgs& args);

  FmStackProperties properties() const override;
  void gemm_batched(const FmGemmBatchedArgs& args) override;
  void gemm_routed(const FmGemmRoutedArgs& args) override;
  // The gated epilogue (plugin.h, ABI 1.3) of a stack whose gate half is
  // whole 128-column tiles: on the 8-row tiles (pair routing, blocks of up to
  // 8 rows; gemm/epilogue.cuh, store_results_gated_tiny) and the 4-bit
  // wgmma tiles into a gated_out the staged stores can write
  // (store_results_gated). Other calls answer false having launched nothing
  // (the host runs the activation after the plain GEMM).
  bool gemm_routed_gated(const FmGemmRoutedArgs& args) override;
  // Zeroes the stream-K slots and counters (they are zero after every launch
  // that completes; this recovers from one that did not).
  void zero_workspace(void* stream) override;

 private:
  void load_scales_and_zeros(const FmStackCreateArgs& args, cudaStream_t stream);
  void load_weights(const FmStackCreateArgs& args, cudaStream_t stream);
  gemm::GemmIO make_io(const DLTensor& x, DLTensor& out, const char* op) const;
  void gemm_batched_device_table(const FmGemmBatchedArgs& args, const gemm::BatchedParams& batched);
  // Both forms of gemm_routed: y into `out`, or (gated) silu(gate) * up into
  // it where the plan's tiles have the epilogue (gated_epilogue_for; pair
  // routing always takes 8-row tiles); answers whether it launched (the
  // plain form always does).
  bool launch_routed(const FmGemmRoutedArgs& args, DLTensor& out, bool gated);
  // Whether a gated launch of `tile`s into `out` has its epilogue.
  bool gated_epilogue_for(gemm::CtaTile tile, const DLTensor& out) const;
  // gemm_routed's pair routing (plugin.h, ABI 1.2); `params` holds the rest.
  // The decode GEMV (gemm/gemv.cuh) takes it where its layout holds, the
  // 8-row tiles elsewhere.
  void gemm_routed_pairs(const FmGemmRoutedArgs& args, gemm::RoutedParams& params);
  // Whether the decode GEMV takes a launch of `form` over `units` pairs,
  // routing blocks or work items (gemv_ctas_per_sm_, 16-byte aligned token
  // rows, at most max_ctas_per_sm CTAs an SM), and the routed launch itself.
  bool gemv_takes(gemm::GemvForm form, const gemm::QuantWeights& w, const gemm::GemmIO& io, int64_t units,
                  int max_ctas_per_sm) const;
  // Its resident CTAs an SM for `io`'s results (plain or gated), its CTAs
  // over `units` units (a slot of io's window each), their waves, and what
  // the launch is told of them.
  int gemv_resident(gemm::GemvForm form, const gemm::GemmIO& io) const;
  int64_t gemv_ctas(const gemm::GemmIO& io, int64_t units) const;
  int64_t gemv_waves(gemm::GemvForm form, const gemm::GemmIO& io, int64_t units) const;
  gemm::GemvPlan gemv_plan(gemm::GemvForm form, const gemm::GemmIO& io, int64_t units) const;
  // Whether the one-row GEMV over `units` pairs reads act-order x through
  // perm, with no sorted copy first (gemm/params.hpp, gemv_reads_x_through_perm).
  bool gemv_permutes_x(const gemm::RoutedParams& params, int64_t units) const;
  void launch_gemv(gemm::RoutedParams& params, gemm::GemvForm form, int64_t units, cudaStream_t stream);
  // Act-order stacks (gemm/gather.cuh): x's columns copied once into each
  // row's expert order, and the launch pointed at the copy, so the GEMM reads
  // its rows as it does without act-order (kernel notes, v76). Returns the
  // copy (freed in stream order when it goes out of scope, after the GEMM
  // was queued), or nothing for a stack without act-order. Called after
  // every check that may refuse the call, so a refused call queues nothing.
  // Routed: rows by pair, over `positions` routing positions (pairs under
  // pair routing). Batched: every row of x through `expert`'s order, rows
  // keeping their numbers, where all dispatches name that expert (a host
  // table naming several, or a device table of a stack of several, -1,
  // keeps the GEMM's gather per element).
  StreamBuffer sort_x_columns(gemm::RoutedParams& params, int64_t positions, cudaStream_t stream) const;
  StreamBuffer sort_x_columns(const DLTensor& x, int64_t expert, gemm::QuantWeights& w, gemm::GemmIO& io,
                              cudaStream_t stream) const;
  StreamBuffer sorted_x_buffer(int64_t rows, int64_t ctas, const char* what, cudaStream_t stream) const;
  void read_sorted_x(const StreamBuffer& copy, gemm::QuantWeights& w, gemm::GemmIO& io) const;
  // The group scales and zero codes a GEMV CTA stages (gemm::gemv_quant_bytes).
  int64_t gemv_quant_bytes(bool gated) const;
  // Fills the launch's schedule (gemm/params.hpp, StreamK) for tiles_x x
  // n_tiles output tiles; returns the grid's CTA count. live_rows: a routed
  // launch whose kernel plans again for the tile rows its routing filled.
  // skipped_rows_between: tile rows the kernel skips may lie between live ones
  // (a device-resident dispatch table, planned for its longest dispatch), so
  // unshared wgmma tiles keep a CTA each: a skipped one frees its SM at
  // once, where CTAs taking tiles in turn would pile the live ones on some.
  int plan_schedule(int64_t tiles_x, int64_t n_tiles, gemm::CtaTile tile, gemm::StreamK& schedule,
                    bool live_rows = false, bool skipped_rows_between = false) const;
  // The CTA tile for blocks of `rows` rows: 8, 16, 32, 64 or 128 (Hopper)
  // rows; on Hopper (wgmma_tiles_) the 32-, 64- and 128-row tiles are the
  // warp-specialised wgmma ones.
  gemm::CtaTile tile_for(int64_t rows) const;
  // A launch's row tiles at 128 rows and at 32 rows (times its n tiles: its
  // CTA tiles of either height).
  struct RowTiles {
    int64_t of_128;
    int64_t of_32;
  };
  // `tile`, or the 64-row wgmma tile where 128-row tiles would fill under
  // 3/4 of the SMs even sharing K (gemm/params.hpp, wgmma_tiles_fill), or the
  // 32-row mma.sync tile where 32-row wgmma tiles would run more than
  // kSmallWgmmaTilesMaxWaves an SM (small_wgmma_tiles_keep); n_tiles columns.
  gemm::CtaTile fill_the_gpu(gemm::CtaTile tile, RowTiles row_tiles, int64_t n_tiles) const;

  int device_;
  DLDataType dtype_;
  gemm::ComputeType compute_type_;
  int bits_;
  int64_t num_experts_;
  int64_t k_;
  int64_t n_;
  int64_t group_size_;  // as given: -1 or >= 1
  int64_t num_groups_;
  int64_t k_padded_;
  int64_t n_padded_;

  DeviceBuffer tiles_;
  DeviceBuffer scales_;
  DeviceBuffer zeros_;
  DeviceBuffer perm_;
  DeviceBuffer row_group_;
  gemm::QuantWeights weights_{};
  int num_sms_ = 0;
  int64_t l2_bytes_ = 0;
  bool wgmma_tiles_ = false;  // the loaded code has the wgmma tiles (sm_90a)
  // Resident CTAs per SM of each of gemm::kCtaTiles (occupancy; 1 for the
  // tiles the loaded code lacks): a stream-K wave.
  int ctas_per_sm_[gemm::kNumCtaTiles] = {};
  // Resident GEMV CTAs per SM, [form][gated]: over pair routing, routing
  // blocks or work items of up to gemm::kGemvBlockRows rows, plain and gated
  // (0: the GEMV does not take this stack's launches of that form).
  int gemv_ctas_per_sm_[gemm::kNumGemvForms][2] = {};
  int32_t gemv_group_shift_ = 0;  // gemm::GemvPlan::group_shift
  // Stream-K workspace (gemm/params.hpp, StreamK, stream_k_slots): tile slots
  // and their counters. Calls on one stack from concurrently
  // running streams would share it: a stack's GEMMs must be stream-ordered.
  DeviceBuffer stream_k_partials_;
  DeviceBuffer stream_k_counters_;
};

}  // namespace ferrum_moe_cuda

#endif  // FERRUM_MOE_CUDA_STACK_HPP_
