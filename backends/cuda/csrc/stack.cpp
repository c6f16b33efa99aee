#include "stack.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "gemm/layout.hpp"
#include "repack.hpp"
#include "tensor_checks.hpp"

namespace ferrum_moe_cuda {
namespace {

using gemm::ceil_div;
using gemm::kTileK;
using gemm::kTileN;

// The K slices of each piece a pair-routed CTA prefetches into L2 where the
// launch's weights would not fit half of it (gemm/kernel.cuh,
// prefetch_pair_weights): the first copies of its pipeline (4 stages).
constexpr int64_t kPrefetchSlices = 4;

// The uniform-group fast path needs every 16-row mma k-step inside one group.
constexpr int64_t kUniformGroupMultiple = gemm::kMmaK;
// Kernel indices of K and N are 32-bit; N tiles also index gridDim.y.
constexpr int64_t kMaxDim = std::numeric_limits<int32_t>::max() - kTileN;
constexpr int64_t kMaxNTiles = 65535;
constexpr int kMinComputeCapabilityMajor = 8;  // mma.sync bf16, cp.async, ldmatrix

std::string shape_string(const DLTensor& t) {
  std::string s = "[";
  for (int i = 0; i < t.ndim; ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
  return s + "]";
}

void require_shape(const DLTensor& t, std::vector<int64_t> expected, const char* arg) {
  bool ok = t.ndim == static_cast<int32_t>(expected.size());
  for (size_t i = 0; ok && i < expected.size(); ++i) ok = t.shape[i] == expected[i];
  if (!ok) {
    std::string want = "[";
    for (size_t i = 0; i < expected.size(); ++i) want += (i ? ", " : "") + std::to_string(expected[i]);
    throw Error(FM_ERROR_INVALID_ARGUMENT, std::string("stack_create: ") + arg + " has shape " +
                                               shape_string(t) + ", expected " + want + "]");
  }
}

// Load-time inputs may be host memory or memory of the stack's device.
void require_readable_from(const DLTensor& t, int device, const char* arg) {
  const auto type = t.device.device_type;
  if (type == kDLCPU || type == kDLCUDAHost) return;
  if (type == kDLCUDA && t.device.device_id == device) return;
  throw Error(FM_ERROR_INVALID_ARGUMENT,
              std::string("stack_create: ") + arg + " is on " + device_name(t.device) +
                  "; the CUDA backend loads from host memory or from the stack's device cuda:" +
                  std::to_string(device));
}

cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

// g_idx [E, K] on the host, whether it lives there or on the device.
std::vector<int32_t> read_g_idx(const DLTensor& g_idx, cudaStream_t stream) {
  std::vector<int32_t> host(static_cast<size_t>(numel(g_idx)));
  const size_t bytes = host.size() * sizeof(int32_t);
  if (g_idx.device.device_type == kDLCUDA) {
    check_cuda(cudaMemcpyAsync(host.data(), data_ptr(g_idx), bytes, cudaMemcpyDeviceToHost, stream),
               "stack_create: copying g_idx to the host");
    check_cuda(cudaStreamSynchronize(stream), "stack_create: copying g_idx to the host");
  } else if (bytes > 0) {
    std::memcpy(host.data(), data_ptr(g_idx), bytes);
  }
  return host;
}

template <class T>
DeviceBuffer upload(const std::vector<T>& host, cudaStream_t stream, const char* what) {
  DeviceBuffer buffer(host.size() * sizeof(T), what);
  check_cuda(cudaMemcpyAsync(buffer.get(), host.data(), buffer.bytes(), cudaMemcpyHostToDevice,
                             stream),
             std::string("stack_create: uploading ") + what);
  // The host vector dies with this function; the copy must be done first.
  check_cuda(cudaStreamSynchronize(stream), std::string("stack_create: uploading ") + what);
  return buffer;
}

}  // namespace

CudaStack::CudaStack(const FmStackCreateArgs& args)
    : device_(args.device.device_id),
      dtype_(args.dtype),
      bits_(args.bits),
      num_experts_(args.num_experts),
      k_(args.k),
      n_(args.n_per_expert),
      group_size_(args.group_size) {
  if (args.device.device_type != kDLCUDA) {
    throw Error(FM_ERROR_UNSUPPORTED, "the CUDA backend places stacks on CUDA devices; got " +
                                          device_name(args.device));
  }
  if (is_float16(dtype_)) {
    compute_type_ = gemm::ComputeType::kFloat16;
  } else if (is_bfloat16(dtype_)) {
    compute_type_ = gemm::ComputeType::kBFloat16;
  } else {
    throw Error(FM_ERROR_UNSUPPORTED,
                "the CUDA backend computes in float16 or bfloat16; got " + dtype_name(dtype_));
  }
  if (bits_ != 4 && bits_ != 8) {
    throw Error(FM_ERROR_UNSUPPORTED,
                "the CUDA backend supports 4- and 8-bit weights; got bits=" + std::to_string(bits_));
  }
  int device_count = 0;
  check_cuda(cudaGetDeviceCount(&device_count), "cudaGetDeviceCount");
  if (device_ < 0 || device_ >= device_count) {
    throw Error(FM_ERROR_INVALID_ARGUMENT, "stack_create: device cuda:" + std::to_string(device_) +
                                               " does not exist; " + std::to_string(device_count) +
                                               " CUDA device(s) are visible");
  }
  DeviceGuard guard(device_);
  cudaDeviceProp prop{};
  check_cuda(cudaGetDeviceProperties(&prop, device_), "cudaGetDeviceProperties");
  num_sms_ = prop.multiProcessorCount;
  l2_bytes_ = prop.l2CacheSize;
  if (prop.major < kMinComputeCapabilityMajor) {
    throw Error(FM_ERROR_UNSUPPORTED, "the CUDA backend needs compute capability 8.0 or newer; cuda:" +
                                          std::to_string(device_) + " (" + prop.name + ") is " +
                                          std::to_string(prop.major) + "." +
                                          std::to_string(prop.minor));
  }

  // The wgmma tiles exist only in an sm_90a build (gemm/wgmma.cuh): asked
  // of the code loaded for this device, not of its compute capability.
  if (prop.major == 9 && prop.minor == 0) check_cuda(gemm::wgmma_tiles_built(&wgmma_tiles_), "wgmma probe");

  num_groups_ = group_size_ > 0 ? ceil_div(k_, group_size_) : 1;
  k_padded_ = ceil_div(k_, kTileK) * kTileK;
  n_padded_ = ceil_div(n_, kTileN) * kTileN;
  if (k_padded_ > kMaxDim) {
    throw Error(FM_ERROR_UNSUPPORTED, "stack_create: k=" + std::to_string(k_) +
                                          " exceeds the CUDA backend's limit of " +
                                          std::to_string(kMaxDim));
  }
  if (n_padded_ / kTileN > kMaxNTiles) {
    throw Error(FM_ERROR_UNSUPPORTED, "stack_create: n_per_expert=" + std::to_string(n_) +
                                          " exceeds the CUDA backend's limit of " +
                                          std::to_string(kMaxNTiles * kTileN));
  }
  if (num_experts_ > std::numeric_limits<int32_t>::max()) {
    throw Error(FM_ERROR_UNSUPPORTED, "stack_create: too many experts for the CUDA backend: " +
                                          std::to_string(num_experts_));
  }

  const cudaStream_t stream = as_stream(args.stream);
  load_weights(args, stream);
  load_scales_and_zeros(args, stream);
  stream_k_partials_ = DeviceBuffer(size_t(gemm::kStreamKSlotFloats) * sizeof(float), "stream-K partials");
  stream_k_counters_ = DeviceBuffer(size_t(gemm::kStreamKCounters) * sizeof(int32_t), "stream-K counters");
  zero_workspace(args.stream);
  check_cuda(gemm::configure_gemm_kernels(compute_type_, bits_, wgmma_tiles_), "configuring the GEMM kernels");
  // Stream-K fills every SM with as many CTAs as fit at once: one wave, as
  // many loads in flight as the SM holds, no tail.
  for (int i = 0; i < gemm::kNumCtaTiles; ++i) {
    ctas_per_sm_[i] = 1;  // (the tiles the loaded code lacks: never launched)
    if (gemm::kCtaTiles[i].wgmma && !wgmma_tiles_) continue;
    check_cuda(gemm::gemm_ctas_per_sm(compute_type_, bits_, gemm::kCtaTiles[i], &ctas_per_sm_[i]),
               "querying the GEMM kernels' occupancy");
  }
  check_cuda(cudaStreamSynchronize(stream), "stack_create: finishing the load");

  weights_.tiles = tiles_.get();
  weights_.scales = scales_.get<uint16_t>();
  weights_.zeros = zeros_.get<uint8_t>();
  weights_.perm = perm_.get<int32_t>();
  weights_.row_group = row_group_.get<int32_t>();
  weights_.num_experts = static_cast<int32_t>(num_experts_);
  weights_.k = static_cast<int32_t>(k_);
  weights_.k_tiles = static_cast<int32_t>(k_padded_ / kTileK);
  weights_.n_tiles = static_cast<int32_t>(n_padded_ / kTileN);
  weights_.n_padded = static_cast<int32_t>(n_padded_);
  weights_.num_groups = static_cast<int32_t>(num_groups_);
  // group_size -1 is one group over K: any divisor >= k_padded maps every row to group 0.
  weights_.group_size = static_cast<int32_t>(group_size_ > 0 ? group_size_ : k_padded_);

  // The decode GEMV takes this stack's pair routing and small routing blocks
  // where its layout holds (gemm/gemv.cuh): uniform groups of whole K slices
  // (act-order too, where its sorted groups are: its x is copied in order
  // first, sort_x_columns, or with pair routing read through perm), K up to
  // kGemvMaxGatedK with the gated epilogue, and the CTA's group scales within
  // what the device lets each form stage;
  // gemv_ctas_per_sm_ stays 0 elsewhere.
  // Its slices per group must be a power of two (the group of a slice is a
  // shift), or the one group of a channelwise stack (a shift past any slice
  // index: every slice in group 0).
  constexpr int32_t kOneGroupShift = 30;
  const int64_t slices_per_group = std::max<int64_t>(weights_.group_size / kTileK, 1);
  const bool group_shift = num_groups_ == 1 || (slices_per_group & (slices_per_group - 1)) == 0;
  gemv_group_shift_ = num_groups_ == 1 ? kOneGroupShift : __builtin_ctzll(static_cast<uint64_t>(slices_per_group));
  if (weights_.row_group == nullptr && weights_.group_size % kTileK == 0 && group_shift) {
    for (gemm::GemvForm form : {gemm::GemvForm::kPairs, gemm::GemvForm::kBlocks, gemm::GemvForm::kItems}) {
      int64_t max_quant_bytes = 0;
      check_cuda(gemm::gemv_max_quant_bytes(form != gemm::GemvForm::kPairs, &max_quant_bytes),
                 "sizing the decode GEMV");
      for (bool gated : {false, true}) {
        const int64_t quant_bytes = gemv_quant_bytes(gated);
        if (quant_bytes > max_quant_bytes || (gated && k_padded_ > gemm::kGemvMaxGatedK)) continue;
        if (gated && form == gemm::GemvForm::kItems) continue;  // (gemm_batched has no gated form)
        check_cuda(gemm::gemv_ctas_per_sm(compute_type_, bits_, gated, form, quant_bytes,
                                          &gemv_ctas_per_sm_[static_cast<int>(form)][gated]),
                   "querying the decode GEMV's occupancy");
      }
    }
  }
}

// Codes are repacked one expert at a time through a one-expert scratch
// buffer, so loading needs only that much memory beyond the stack itself.
void CudaStack::load_weights(const FmStackCreateArgs& args, cudaStream_t stream) {
  const DLTensor& qweight = *args.qweight;
  const int64_t codes_per_word = 32 / bits_;
  const int64_t k_words = ceil_div(k_, codes_per_word);
  require_readable_from(qweight, device_, "qweight");
  require_compact(qweight, "stack_create", "qweight");
  require_shape(qweight, {num_experts_, k_words, n_}, "qweight");

  // Act-order: sort each expert's rows by group (stably), so the kernel sees
  // contiguous groups; x columns are gathered through the same permutation.
  std::vector<int32_t> perm;
  std::vector<int32_t> row_group;
  int64_t row_group_expert_stride = 0;
  if (args.g_idx != nullptr) {
    const DLTensor& g_idx = *args.g_idx;
    require_readable_from(g_idx, device_, "g_idx");
    require_compact(g_idx, "stack_create", "g_idx");
    require_shape(g_idx, {num_experts_, k_}, "g_idx");
    const std::vector<int32_t> groups = read_g_idx(g_idx, stream);
    bool trivial = true;
    for (int64_t e = 0; e < num_experts_; ++e) {
      for (int64_t k = 0; k < k_; ++k) {
        const int32_t g = groups[e * k_ + k];
        if (g < 0 || g >= num_groups_) {
          throw Error(FM_ERROR_INVALID_ARGUMENT,
                      "stack_create: g_idx[" + std::to_string(e) + ", " + std::to_string(k) +
                          "] = " + std::to_string(g) + " is outside [0, " +
                          std::to_string(num_groups_) + ")");
        }
        trivial = trivial && g == (group_size_ > 0 ? k / group_size_ : 0);
      }
    }
    if (!trivial) {
      perm.resize(static_cast<size_t>(num_experts_ * k_));
      row_group.resize(static_cast<size_t>(num_experts_ * k_padded_));
      row_group_expert_stride = k_padded_;
      for (int64_t e = 0; e < num_experts_; ++e) {
        int32_t* p = perm.data() + e * k_;
        const int32_t* g = groups.data() + e * k_;
        std::iota(p, p + k_, 0);
        std::stable_sort(p, p + k_, [g](int32_t a, int32_t b) { return g[a] < g[b]; });
        int32_t* rg = row_group.data() + e * k_padded_;
        for (int64_t k = 0; k < k_padded_; ++k) rg[k] = g[p[std::min(k, k_ - 1)]];
      }
      // GPTQ's act-order gives every group group_size rows (the last the
      // rest): sorted, row k is in group k / group_size, as without act-order,
      // and the kernels take the groups' uniform paths (no row table).
      bool uniform = group_size_ > 0;
      for (int64_t e = 0; uniform && e < num_experts_; ++e) {
        const int32_t* rg = row_group.data() + e * k_padded_;
        for (int64_t k = 0; uniform && k < k_padded_; ++k) {
          uniform = rg[k] == std::min(k / group_size_, num_groups_ - 1);
        }
      }
      if (uniform) {
        row_group.clear();
        row_group_expert_stride = 0;
      }
    }
  }
  if (row_group.empty() && group_size_ > 0 && group_size_ % kUniformGroupMultiple != 0) {
    // Groups straddle 16-row k-steps: one table of row -> group, shared by all experts.
    row_group.resize(static_cast<size_t>(k_padded_));
    for (int64_t k = 0; k < k_padded_; ++k)
      row_group[k] = static_cast<int32_t>(std::min(k / group_size_, num_groups_ - 1));
  }
  if (!perm.empty()) perm_ = upload(perm, stream, "act-order permutation");
  if (!row_group.empty()) row_group_ = upload(row_group, stream, "row groups");
  weights_.row_group_expert_stride = row_group_expert_stride;

  const int k_tiles = static_cast<int>(k_padded_ / kTileK);
  const int n_tiles = static_cast<int>(n_padded_ / kTileN);
  const size_t expert_tile_bytes =
      static_cast<size_t>(k_tiles) * n_tiles * kTileN * kTileK * bits_ / 8;
  tiles_ = DeviceBuffer(expert_tile_bytes * num_experts_, "weight tiles");
  const size_t expert_source_bytes = static_cast<size_t>(k_words * n_ * sizeof(int32_t));
  DeviceBuffer scratch(expert_source_bytes, "qweight scratch");
  const char* source = data_ptr<const char>(qweight);
  for (int64_t e = 0; e < num_experts_; ++e) {
    check_cuda(cudaMemcpyAsync(scratch.get(), source + e * expert_source_bytes, expert_source_bytes,
                               cudaMemcpyDefault, stream),
               "stack_create: copying qweight");
    check_cuda(launch_repack_expert(scratch.get<const uint32_t>(),
                                    perm.empty() ? nullptr : perm_.get<const int32_t>() + e * k_,
                                    bits_, k_, n_, k_tiles, n_tiles,
                                    reinterpret_cast<uint32_t*>(tiles_.get<char>() + e * expert_tile_bytes),
                                    stream),
               "stack_create: repack kernel");
  }
  // `scratch` is freed on return; cudaFree waits for the kernels using it.
  check_cuda(cudaStreamSynchronize(stream), "stack_create: repacking qweight");
}

// [E, G, N] -> [E, G, n_padded]; padded columns get scale 0 (and zero code 0),
// so they dequantize to exactly 0.
void CudaStack::load_scales_and_zeros(const FmStackCreateArgs& args, cudaStream_t stream) {
  const size_t rows = static_cast<size_t>(num_experts_ * num_groups_);
  auto load = [&](const DLTensor& t, size_t element_bytes, const char* arg) {
    require_readable_from(t, device_, arg);
    require_compact(t, "stack_create", arg);
    require_shape(t, {num_experts_, num_groups_, n_}, arg);
    DeviceBuffer buffer(rows * n_padded_ * element_bytes, arg);
    const std::string what = std::string("stack_create: copying ") + arg;
    check_cuda(cudaMemsetAsync(buffer.get(), 0, buffer.bytes(), stream), what);
    check_cuda(cudaMemcpy2DAsync(buffer.get(), n_padded_ * element_bytes, data_ptr(t),
                                 n_ * element_bytes, n_ * element_bytes, rows, cudaMemcpyDefault,
                                 stream),
               what);
    return buffer;
  };
  scales_ = load(*args.scales, sizeof(uint16_t), "scales");
  if (args.zeros != nullptr) zeros_ = load(*args.zeros, sizeof(uint8_t), "zeros");
}

FmStackProperties CudaStack::properties() const {
  FmStackProperties props{};
  props.struct_size = sizeof(props);
  // Any column window works: the epilogue masks columns outside it.
  props.column_alignment = 1;
  props.resident_bytes = static_cast<int64_t>(tiles_.bytes() + scales_.bytes() + zeros_.bytes() +
                                               perm_.bytes() + row_group_.bytes());
  props.workspace_bytes = static_cast<int64_t>(stream_k_partials_.bytes() + stream_k_counters_.bytes());
  return props;
}

void CudaStack::zero_workspace(void* stream) {
  DeviceGuard guard(device_);
  check_cuda(cudaMemsetAsync(stream_k_partials_.get(), 0, stream_k_partials_.bytes(), as_stream(stream)),
             "zero_workspace: stream-K partials");
  check_cuda(cudaMemsetAsync(stream_k_counters_.get(), 0, stream_k_counters_.bytes(), as_stream(stream)),
             "zero_workspace: stream-K counters");
}

// The CTA tile for `rows` rows. On Hopper the 32- and 64-row tiles are the
// warp-specialised wgmma ones too (kernel notes, v77 and v78), and 128-row
// tiles take blocks taller than 64 rows; elsewhere the 64-row mma.sync tiles
// are the prefill tile.
gemm::CtaTile CudaStack::tile_for(int64_t rows) const {
  if (rows <= gemm::kTinyRowsPerCta) return {gemm::kTinyRowsPerCta, false};
  if (rows <= gemm::kSmallRowsPerCta) return {gemm::kSmallRowsPerCta, false};
  if (rows <= gemm::kMediumRowsPerCta) return {gemm::kMediumRowsPerCta, wgmma_tiles_};
  if (rows <= gemm::kLargeRowsPerCta || !wgmma_tiles_) return {gemm::kLargeRowsPerCta, wgmma_tiles_};
  return {gemm::kWgmmaRowsPerCta, true};
}

// gemm/params.hpp, wgmma_tiles_fill: 128-row tiles where they (split or not)
// fill the GPU, else the 64-row wgmma tiles: twice the tiles, whose stream-K
// slots are twice as many too (the 64-row mma.sync tiles, 2 CTAs an SM of 128
// columns, took the dense Linear's fallback rows 1.6x as long: kernel notes,
// v83).
// small_wgmma_tiles_keep: 32-row wgmma tiles over a short grid, else the
// 32-row mma.sync tiles (3 CTAs an SM: kernel notes, v80).
gemm::CtaTile CudaStack::fill_the_gpu(gemm::CtaTile tile, RowTiles row_tiles, int64_t n_tiles) const {
  const int64_t column_pairs = ceil_div(n_tiles, int64_t{gemm::kWgmmaColumnTilesPerCta});
  if (tile.wgmma && tile.rows == gemm::kMediumRowsPerCta) {
    if (gemm::small_wgmma_tiles_keep(row_tiles.of_32 * column_pairs, num_sms_)) return tile;
    return {gemm::kMediumRowsPerCta, false};
  }
  if (tile.rows != gemm::kWgmmaRowsPerCta) return tile;
  if (gemm::wgmma_tiles_fill(row_tiles.of_128 * column_pairs, k_padded_ / kTileK, num_sms_)) return tile;
  return {gemm::kLargeRowsPerCta, true};
}

int CudaStack::plan_schedule(int64_t tiles_x, int64_t n_tiles, gemm::CtaTile tile, gemm::StreamK& schedule,
                             bool live_rows, bool skipped_rows_between) const {
  if (tile.wgmma) n_tiles = ceil_div(n_tiles, int64_t{gemm::kWgmmaColumnTilesPerCta});
  schedule = {nullptr, nullptr, static_cast<int32_t>(tiles_x), static_cast<int32_t>(n_tiles), 0};
  const int64_t tiles = tiles_x * n_tiles;
  constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
  if (tiles > kMaxGridX) {
    throw Error(FM_ERROR_UNSUPPORTED, std::to_string(tiles) + " output tiles exceed the CUDA grid limit");
  }
  const int64_t wave = std::max<int64_t>(int64_t(ctas_per_sm_[gemm::cta_tile_index(tile)]) * num_sms_, 1);
  if (tiles > gemm::stream_k_slots(tile) || tiles == 0) {
    // Unshared: one CTA per tile, except the wgmma tiles, whose CTAs take
    // whole tiles in turn over at most a wave (kernel.cuh, walk): the next
    // tile's copies start during the last one's epilogue. Their live tiles
    // come first (host tables: all live; routed: the blocks the routing
    // filled, but for an expert's last block's chunks past its rows where
    // blocks are taller than a tile), or they keep a CTA each
    // (skipped_rows_between).
    const bool in_turn = tile.wgmma && !skipped_rows_between;
    return static_cast<int>(in_turn ? std::min(tiles, wave) : tiles);
  }
  // The slots go with every launch that fits them, split or not: a routed
  // launch's kernel may spread fewer live tiles over its grid (kernel.cuh).
  schedule.partials = stream_k_partials_.get<float>();
  schedule.counters = stream_k_counters_.get<int32_t>();
  if (live_rows) schedule.live_rows_wave = static_cast<int32_t>(wave);
  return static_cast<int>(gemm::stream_k_ctas(tiles, k_padded_ / kTileK, wave));
}

gemm::GemmIO CudaStack::make_io(const DLTensor& x, DLTensor& out, const char* op) const {
  require_on_device(x, device_, op, "x");
  require_on_device(out, device_, op, "out");
  require_unit_last_stride(x, op, "x");
  gemm::GemmIO io{};
  io.x = data_ptr<const void>(x);
  io.x_row_stride = stride(x, 0);
  // cp.async moves 16 bytes: both the base and every row start must be aligned.
  constexpr int64_t kVectorBytes = 16;
  constexpr int64_t kVectorElements = kVectorBytes / 2;
  io.x_vector_loads = reinterpret_cast<uintptr_t>(io.x) % kVectorBytes == 0 &&
                      (x.shape[0] <= 1 || io.x_row_stride % kVectorElements == 0);
  if (is_float32(out.dtype)) {
    io.out_float32 = true;
  } else if (out.dtype.code == dtype_.code && out.dtype.bits == dtype_.bits &&
             out.dtype.lanes == dtype_.lanes) {
    io.out_float32 = false;
  } else {
    throw Error(FM_ERROR_TYPE, std::string(op) + ": out must be " + dtype_name(dtype_) +
                                   " or float32; got " + dtype_name(out.dtype));
  }
  io.out = data_ptr(out);
  io.out_row_stride = stride(out, 0);
  io.out_col_stride = stride(out, 1);
  return io;
}

void CudaStack::gemm_batched(const FmGemmBatchedArgs& args) {
  constexpr const char* kOp = "gemm_batched";
  DeviceGuard guard(device_);
  gemm::BatchedParams params{};
  params.w = weights_;
  params.io = make_io(*args.x, *args.out, kOp);
  params.io.col_begin = args.col_begin;
  params.io.n = args.n;
  if (args.bias != nullptr) {
    require_on_device(*args.bias, device_, kOp, "bias");
    require_unit_last_stride(*args.bias, kOp, "bias");
    params.io.bias = data_ptr<const uint16_t>(*args.bias);
  }

  const DLTensor& dispatches = *args.dispatches;
  const int64_t num_dispatches = dispatches.shape[0];
  if (num_dispatches == 0 || args.n == 0) return;
  const cudaStream_t stream = as_stream(args.stream);
  if (dispatches.device.device_type == kDLCUDA) {
    require_on_device(dispatches, device_, kOp, "dispatches");
    gemm_batched_device_table(args, params);
    return;
  }
  if (dispatches.device.device_type != kDLCPU && dispatches.device.device_type != kDLCUDAHost) {
    throw Error(FM_ERROR_INVALID_ARGUMENT, std::string(kOp) + ": dispatches must be on the host or on cuda:" +
                                               std::to_string(device_) + "; got " + device_name(dispatches.device));
  }
  const auto* table = data_ptr<const int64_t>(dispatches);
  const int64_t s0 = stride(dispatches, 0);
  const int64_t s1 = stride(dispatches, 1);
  auto field = [&](int64_t d, int c) { return table[d * s0 + c * s1]; };

  // Row tiles: of 128 rows over the table; of 32 and of 8 rows (the
  // GEMV's items), the slices of one launch at most (kMaxBatchedWorkItems:
  // its grid, not the table's).
  int64_t max_rows = 0;
  RowTiles row_tiles{0, 0};
  int64_t gemv_items = 0;
  bool one_expert = true;
  for (int64_t d = 0; d < num_dispatches; ++d) {
    max_rows = std::max(max_rows, field(d, 3));
    row_tiles.of_128 += ceil_div(field(d, 3), int64_t{gemm::kWgmmaRowsPerCta});
    row_tiles.of_32 = std::min<int64_t>(row_tiles.of_32 + ceil_div(field(d, 3), int64_t{gemm::kMediumRowsPerCta}),
                                        gemm::kMaxBatchedWorkItems);
    gemv_items = std::min<int64_t>(gemv_items + ceil_div(field(d, 3), int64_t{gemm::kGemvBlockRows}),
                                   gemm::kMaxBatchedWorkItems);
    one_expert = one_expert && field(d, 0) == field(0, 0);
  }
  if (max_rows == 0) return;
  const StreamBuffer x_sorted = sort_x_columns(*args.x, one_expert ? field(0, 0) : -1, params.w, params.io, stream);
  const int64_t first_n_tile = args.col_begin / kTileN;
  const int64_t num_n_tiles = (args.col_begin + args.n - 1) / kTileN - first_n_tile + 1;
  // Dispatches of a few rows (the dense Linear's decode) on the decode GEMV,
  // as work items of up to kGemvBlockRows rows, where its grid suits it
  // (gemm/params.hpp, gemv_takes_items); the tiles elsewhere.
  const bool on_gemv = gemv_takes(gemm::GemvForm::kItems, params.w, params.io, gemv_items, gemm::kGemvMaxCtasPerSm) &&
                       gemm::gemv_takes_items(max_rows, gemv_ctas(params.io, gemv_items),
                                              gemv_waves(gemm::GemvForm::kItems, params.io, gemv_items), num_sms_);
  const gemm::CtaTile tile = fill_the_gpu(tile_for(max_rows), row_tiles, num_n_tiles);
  const int64_t item_rows = on_gemv ? gemm::kGemvBlockRows : tile.rows;
  params.first_n_tile = static_cast<int32_t>(first_n_tile);

  auto flush = [&] {
    if (params.num_items == 0) return;
    if (on_gemv) {
      params.gemv = gemv_plan(gemm::GemvForm::kItems, params.io, params.num_items);
      check_cuda(gemm::launch_gemm_gemv(params, compute_type_, bits_, gemv_quant_bytes(false),
                                        static_cast<int>(gemv_ctas(params.io, params.num_items)), stream),
                 "gemm_batched kernel launch");
    } else {
      const int ctas = plan_schedule(params.num_items, num_n_tiles, tile, params.schedule);
      check_cuda(gemm::launch_gemm_batched(params, compute_type_, bits_, tile, ctas, stream),
                 "gemm_batched kernel launch");
    }
    params.num_items = 0;
  };
  for (int64_t d = 0; d < num_dispatches; ++d) {
    const int64_t expert = field(d, 0), in_row = field(d, 1), out_row = field(d, 2), m = field(d, 3);
    for (int64_t r = 0; r < m; r += item_rows) {
      gemm::BatchedWorkItem& item = params.items[params.num_items++];
      item.expert = static_cast<int32_t>(expert);
      item.rows = static_cast<int32_t>(std::min<int64_t>(item_rows, m - r));
      item.x_row = in_row + r;
      item.out_row = out_row + r;
      if (params.num_items == gemm::kMaxBatchedWorkItems) flush();
    }
  }
  flush();
}

// Dispatch rows in device memory: sized by the worst case (every dispatch as
// tall as x and out allow), read and range-checked by the kernel. Nothing here
// reads the table, so a captured call replays with new table contents.
void CudaStack::gemm_batched_device_table(const FmGemmBatchedArgs& args, const gemm::BatchedParams& batched) {
  const DLTensor& dispatches = *args.dispatches;
  if (!is_int32(dispatches.dtype) && !is_int64(dispatches.dtype)) {
    throw Error(FM_ERROR_TYPE, "gemm_batched: dispatches must be int32 or int64; got " + dtype_name(dispatches.dtype));
  }
  gemm::DeviceDispatchParams params{};
  params.w = batched.w;
  params.io = batched.io;
  params.table = data_ptr<const void>(dispatches);
  params.table_int64 = is_int64(dispatches.dtype);
  params.num_dispatches = dispatches.shape[0];
  params.x_rows = args.x->shape[0];
  params.out_rows = args.out->shape[0];
  const int64_t max_rows = std::min(params.x_rows, params.out_rows);
  if (max_rows == 0) return;
  // The expected height of one dispatch picks the tile: decode tables (a row or
  // a few per dispatch) get 8- or 16-row CTAs and stream-K; 128-row tiles only
  // where the grid's worst case of them fills the GPU, as for host tables.
  const int64_t first_n_tile = args.col_begin / kTileN;
  const int64_t num_n_tiles = (args.col_begin + args.n - 1) / kTileN - first_n_tile + 1;
  // (Row tiles capped at the grid limit, which the check below enforces: the
  // product stays far inside int64 whatever the table's and x's sizes.)
  constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
  // At 32 rows, the tiles the rows can fill (each dispatch's last tile
  // partly): the grid's other CTAs leave at once.
  const int64_t row_tiles = std::min(params.num_dispatches, kMaxGridX) *
                            std::min(ceil_div(max_rows, int64_t{gemm::kWgmmaRowsPerCta}), kMaxGridX);
  const int64_t live_tiles_of_32 =
      std::min(ceil_div(max_rows, int64_t{gemm::kMediumRowsPerCta}) + std::min(params.num_dispatches, kMaxGridX),
               kMaxGridX);
  const gemm::CtaTile tile = fill_the_gpu(tile_for(ceil_div(max_rows, params.num_dispatches)),
                                          {std::min(row_tiles, kMaxGridX), live_tiles_of_32}, num_n_tiles);
  const int64_t chunks = ceil_div(max_rows, int64_t{tile.rows});
  if (chunks > kMaxGridX / params.num_dispatches) {
    throw Error(FM_ERROR_UNSUPPORTED, "gemm_batched: " + std::to_string(params.num_dispatches) +
                                          " device dispatches over " + std::to_string(max_rows) +
                                          " rows exceed the CUDA grid limit");
  }
  params.chunks_per_dispatch = static_cast<int32_t>(chunks);
  params.first_n_tile = static_cast<int32_t>(first_n_tile);
  const int ctas = plan_schedule(params.num_dispatches * chunks, num_n_tiles, tile, params.schedule, false, true);
  const cudaStream_t stream = as_stream(args.stream);
  const StreamBuffer x_sorted = sort_x_columns(*args.x, num_experts_ == 1 ? 0 : -1, params.w, params.io, stream);
  check_cuda(gemm::launch_gemm_device_dispatch(params, compute_type_, bits_, tile, ctas, stream),
             "gemm_batched kernel launch");
}

void CudaStack::gemm_routed(const FmGemmRoutedArgs& args) { launch_routed(args, *args.out, false); }

bool CudaStack::gemm_routed_gated(const FmGemmRoutedArgs& args) {
  // Both tile kinds pair whole 128-column gate tiles with their up tiles (N
  // a multiple of 256) and store the compute dtype.
  if (args.activation != FM_ACTIVATION_SILU || n_ % (2 * kTileN) != 0 || is_float32(args.gated_out->dtype)) {
    return false;
  }
  return launch_routed(args, *args.gated_out, true);
}

// The 8-row tiles (scalar stores: any layout), and the 4-bit wgmma tiles
// into an output their staged 16-byte stores can write (epilogue.cuh,
// stores_vectors). The 8-bit 128-row tile has no staging area; the 8-bit 32-
// and 64-row ones have, but keep the plain GEMM (kernel notes, v79).
bool CudaStack::gated_epilogue_for(gemm::CtaTile tile, const DLTensor& out) const {
  if (tile.rows == gemm::kTinyRowsPerCta) return true;
  return tile.wgmma && bits_ == 4 && (out.shape[1] <= 1 || stride(out, 1) == 1) &&
         reinterpret_cast<uintptr_t>(data_ptr<const void>(out)) % 16 == 0 &&
         (out.shape[0] <= 1 || stride(out, 0) % 8 == 0);
}

int64_t CudaStack::gemv_quant_bytes(bool gated) const {
  return gemm::gemv_quant_bytes(num_groups_, gated ? 2 : 1);
}

bool CudaStack::launch_routed(const FmGemmRoutedArgs& args, DLTensor& out, bool gated) {
  constexpr const char* kOp = "gemm_routed";
  DeviceGuard guard(device_);
  gemm::RoutedParams params{};
  params.w = weights_;
  params.io = make_io(*args.x, out, kOp);
  params.io.col_begin = 0;
  params.io.n = gated ? n_ / 2 : n_;
  params.io.gate_up_tiles = gated ? static_cast<int32_t>(n_ / 2 / kTileN) : 0;

  params.top_k = args.top_k;
  params.num_pairs = args.x->shape[0] * args.top_k;
  if (args.topk_weights != nullptr) {
    require_on_device(*args.topk_weights, device_, kOp, "topk_weights");
    params.topk_weights = data_ptr<const float>(*args.topk_weights);
    params.topk_weights_stride0 = stride(*args.topk_weights, 0);
    params.topk_weights_stride1 = stride(*args.topk_weights, 1);
  }
  if (args.sorted_token_ids == nullptr) {
    gemm_routed_pairs(args, params);
    return true;
  }
  const DLTensor& sorted_token_ids = *args.sorted_token_ids;
  const DLTensor& expert_ids = *args.expert_ids;
  const DLTensor& num_tokens_post_padded = *args.num_tokens_post_padded;
  require_on_device(sorted_token_ids, device_, kOp, "sorted_token_ids");
  require_on_device(expert_ids, device_, kOp, "expert_ids");
  require_on_device(num_tokens_post_padded, device_, kOp, "num_tokens_post_padded");
  require_unit_last_stride(sorted_token_ids, kOp, "sorted_token_ids");
  require_unit_last_stride(expert_ids, kOp, "expert_ids");
  params.sorted_token_ids = data_ptr<const int32_t>(sorted_token_ids);
  params.num_positions = sorted_token_ids.shape[0];
  params.expert_ids = data_ptr<const int32_t>(expert_ids);
  params.num_blocks = expert_ids.shape[0];
  params.num_tokens_post_padded = data_ptr<const int32_t>(num_tokens_post_padded);
  params.block_size = args.block_size;
  if (params.num_blocks == 0 || params.num_pairs == 0) return true;  // no pair to write

  // Routing blocks of up to 8 rows run on 8-row CTAs, up to 16 on 16-row
  // ones, up to 63 on 32-row ones (one weight stream per 32 tokens; a 64-row
  // mma.sync tile would leave half of a block of 32 padding: 20% slower at
  // DeepSeek-V3 M = 1024), larger ones as tile_for says.
  // plugin.h: only the blocks moe_align_block_size can fill are read, so the
  // grid follows the token count rather than every expert's worst-case padding.
  const int64_t grid_blocks =
      fm_routed_blocks_read(params.num_blocks, params.num_pairs, args.block_size, num_experts_);
  // Blocks of up to 8 rows on the decode GEMV where experts repeat, each
  // expert's weights read once for the block's rows (blocks the routing does
  // not fill leave at once).
  const cudaStream_t stream = as_stream(args.stream);
  const int64_t positions = std::min(params.num_positions, grid_blocks * args.block_size);
  if (args.block_size <= gemm::kGemvBlockRows && params.num_pairs * 2 >= num_experts_ &&
      gemv_takes(gemm::GemvForm::kBlocks, params.w, params.io, grid_blocks, gemm::kGemvMaxBlockCtasPerSm)) {
    const StreamBuffer x_sorted = sort_x_columns(params, positions, stream);
    launch_gemv(params, gemm::GemvForm::kBlocks, grid_blocks, stream);
    return true;
  }
  const int64_t block_rows = args.block_size < gemm::kLargeRowsPerCta
                                 ? std::min<int64_t>(args.block_size, gemm::kMediumRowsPerCta)
                                 : args.block_size;
  const gemm::CtaTile tile = fill_the_gpu(
      tile_for(block_rows),
      {grid_blocks * ceil_div(args.block_size, int64_t{gemm::kWgmmaRowsPerCta}),
       grid_blocks * ceil_div(args.block_size, int64_t{gemm::kMediumRowsPerCta})},
      weights_.n_tiles);
  // The gated epilogue pairs each gate tile with its up tile in one wgmma
  // CTA (as many CTA tiles as the plain launch's pairs of adjacent tiles), or
  // each half of a gate tile with the same half of its up tile in one 8-row
  // CTA (as many as the plain launch's tiles).
  if (gated && !gated_epilogue_for(tile, out)) return false;
  params.chunks_per_block = static_cast<int32_t>(ceil_div(args.block_size, int64_t{tile.rows}));
  constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
  if (grid_blocks * params.chunks_per_block > kMaxGridX) {
    throw Error(FM_ERROR_UNSUPPORTED,
                "gemm_routed: " + std::to_string(grid_blocks) + " routing blocks of " +
                    std::to_string(args.block_size) + " rows exceed the CUDA grid limit");
  }
  // With pairs enough for experts to repeat, the bound (one block per pair,
  // capped) counts blocks the routing does not fill (Mixtral M = 2: 4 planned,
  // 2 filled in the benchmark), and the kernel plans again for the filled
  // ones. With fewer, the bound is nearly exact, and reading the routing
  // before the first copy costs the kernel more than the spread saves
  // (Qwen3-30B-A3B M = 4, 32 pairs of 128 experts: 5% slower; kernel notes, v26).
  const bool experts_repeat = params.num_pairs * 2 >= num_experts_;
  const int ctas =
      plan_schedule(grid_blocks * params.chunks_per_block, weights_.n_tiles, tile, params.schedule, experts_repeat);
  const StreamBuffer x_sorted = sort_x_columns(params, positions, stream);  // (after every refusal above)
  check_cuda(gemm::launch_gemm_routed(params, compute_type_, bits_, tile, ctas, stream),
             "gemm_routed kernel launch");
  return true;
}

// Pair routing (plugin.h, ABI 1.2): one routing block of one row per pair, on
// the decode GEMV or the 8-row tiles; every block the grid holds is filled, so
// no re-plan.
void CudaStack::gemm_routed_pairs(const FmGemmRoutedArgs& args, gemm::RoutedParams& params) {
  constexpr const char* kOp = "gemm_routed";
  const DLTensor& topk_ids = *args.topk_ids;
  require_on_device(topk_ids, device_, kOp, "topk_ids");
  params.topk_ids = data_ptr<const void>(topk_ids);
  params.topk_ids_int64 = topk_ids.dtype.bits == 64;
  params.topk_ids_stride0 = stride(topk_ids, 0);
  params.topk_ids_stride1 = stride(topk_ids, 1);
  params.num_global_experts = args.num_experts;
  if (args.expert_map != nullptr) {
    require_on_device(*args.expert_map, device_, kOp, "expert_map");
    params.expert_map = data_ptr<const int32_t>(*args.expert_map);
  }
  params.block_size = 1;
  params.num_blocks = params.num_pairs;
  params.chunks_per_block = 1;
  if (params.num_pairs == 0) return;
  const cudaStream_t stream = as_stream(args.stream);
  if (gemv_takes(gemm::GemvForm::kPairs, params.w, params.io, params.num_pairs, gemm::kGemvMaxCtasPerSm)) {
    // Act-order x: a sorted copy first, or where the launch is short, read
    // through the expert's perm (gemv.cuh, kPermutedX; kernel notes, v81).
    const StreamBuffer x_sorted =
        gemv_permutes_x(params, params.num_pairs) ? StreamBuffer{} : sort_x_columns(params, params.num_pairs, stream);
    launch_gemv(params, gemm::GemvForm::kPairs, params.num_pairs, stream);
    return;
  }
  constexpr gemm::CtaTile tile{gemm::kTinyRowsPerCta, false};
  const int ctas = plan_schedule(params.num_pairs, weights_.n_tiles, tile, params.schedule);
  // The weights the launch streams (at most: pairs may share an expert):
  // where half of L2 holds them, each CTA asks for all of its pieces before
  // it waits for the kernel before it; otherwise for the first slices of each
  // (the pipeline's first copies), so the prefetches never evict each other.
  const int64_t tile_bytes = int64_t{gemm::kTileN} * kTileK * bits_ / 8;
  const int64_t k_tiles = k_padded_ / kTileK;
  const bool fits = params.num_pairs <= l2_bytes_ / 2 / (tile_bytes * weights_.n_tiles * k_tiles);
  params.prefetch_slices = static_cast<int32_t>(fits ? k_tiles : std::min<int64_t>(k_tiles, kPrefetchSlices));
  const StreamBuffer x_sorted = sort_x_columns(params, params.num_pairs, stream);
  check_cuda(gemm::launch_gemm_routed(params, compute_type_, bits_, tile, ctas, stream),
             "gemm_routed kernel launch");
}

// The act-order copy of `rows` rows of k_padded_ two-byte elements, for a
// gather of `ctas` CTAs (one a row or routing position, `what`); an error
// where the bytes overflow or the grid exceeds CUDA's limit.
StreamBuffer CudaStack::sorted_x_buffer(int64_t rows, int64_t ctas, const char* what, cudaStream_t stream) const {
  if (ctas > std::numeric_limits<int32_t>::max()) {
    throw Error(FM_ERROR_UNSUPPORTED,
                "act-order: " + std::to_string(ctas) + " " + what + " exceed the CUDA grid limit");
  }
  if (rows > std::numeric_limits<int64_t>::max() / 2 / k_padded_) {
    throw Error(FM_ERROR_OUT_OF_MEMORY, "act-order: " + std::to_string(rows) + " rows of " +
                                            std::to_string(k_padded_) + " columns overflow a buffer size");
  }
  return StreamBuffer(static_cast<size_t>(rows * k_padded_ * 2), stream, "act-order x");
}

// The launch reads the copy: aligned rows, no permutation.
void CudaStack::read_sorted_x(const StreamBuffer& copy, gemm::QuantWeights& w, gemm::GemmIO& io) const {
  w.perm = nullptr;
  io.x = copy.get();
  io.x_row_stride = k_padded_;
  io.x_vector_loads = true;
}

StreamBuffer CudaStack::sort_x_columns(gemm::RoutedParams& params, int64_t positions, cudaStream_t stream) const {
  if (params.w.perm == nullptr || params.num_pairs == 0) return {};
  StreamBuffer copy = sorted_x_buffer(params.num_pairs, positions, "routing positions", stream);
  check_cuda(gemm::launch_gather_routed(params, positions, copy.get(), k_padded_, stream),
             "act-order gather launch");
  read_sorted_x(copy, params.w, params.io);
  params.x_rows_by_pair = true;
  return copy;
}

StreamBuffer CudaStack::sort_x_columns(const DLTensor& x, int64_t expert, gemm::QuantWeights& w, gemm::GemmIO& io,
                                       cudaStream_t stream) const {
  const int64_t rows = x.shape[0];
  if (w.perm == nullptr || expert < 0 || rows == 0) return {};
  StreamBuffer copy = sorted_x_buffer(rows, rows, "rows of x", stream);
  check_cuda(gemm::launch_gather_rows(w.perm + expert * k_, w.k, io.x, rows, io.x_row_stride, copy.get(),
                                      k_padded_, stream),
             "act-order gather launch");
  read_sorted_x(copy, w, io);
  return copy;
}

bool CudaStack::gemv_takes(gemm::GemvForm form, const gemm::QuantWeights& w, const gemm::GemmIO& io, int64_t units,
                           int max_ctas_per_sm) const {
  // Routed act-order x is copied aligned first (sort_x_columns), or read by
  // element through perm (the one-row GEMV's permuted form); work items read
  // x in order (gemm_batched sorts the columns of one expert's rows first).
  const bool aligned =
      form == gemm::GemvForm::kItems ? io.x_vector_loads && w.perm == nullptr : io.x_vector_loads || w.perm != nullptr;
  return gemv_resident(form, io) != 0 && aligned && gemv_ctas(io, units) <= int64_t{max_ctas_per_sm} * num_sms_;
}

int CudaStack::gemv_resident(gemm::GemvForm form, const gemm::GemmIO& io) const {
  return gemv_ctas_per_sm_[static_cast<int>(form)][io.gate_up_tiles > 0];
}

int64_t CudaStack::gemv_ctas(const gemm::GemmIO& io, int64_t units) const {
  return int64_t{gemm::gemv_slots(io.col_begin, io.n)} * units;
}

int64_t CudaStack::gemv_waves(gemm::GemvForm form, const gemm::GemmIO& io, int64_t units) const {
  const int64_t wave = int64_t{gemv_resident(form, io)} * num_sms_;
  return ceil_div(gemv_ctas(io, units), std::max<int64_t>(wave, 1));
}

// gemm/params.hpp, gemv_reads_x_through_perm: the one-row launch's waves
// times each warp's rounds of K slices.
bool CudaStack::gemv_permutes_x(const gemm::RoutedParams& params, int64_t units) const {
  if (params.w.perm == nullptr) return false;
  const int64_t slices_per_warp = ceil_div(k_padded_ / kTileK, int64_t{gemm::kGemvWarps});
  const int64_t rounds = ceil_div(slices_per_warp, int64_t{gemm::gemv_chunk_slices(bits_)});
  return gemm::gemv_reads_x_through_perm(gemv_waves(gemm::GemvForm::kPairs, params.io, units), rounds);
}

gemm::GemvPlan CudaStack::gemv_plan(gemm::GemvForm form, const gemm::GemmIO& io, int64_t units) const {
  return {gemv_waves(form, io, units) <= 1, gemv_group_shift_};
}

void CudaStack::launch_gemv(gemm::RoutedParams& params, gemm::GemvForm form, int64_t units, cudaStream_t stream) {
  params.gemv = gemv_plan(form, params.io, units);
  check_cuda(gemm::launch_gemm_gemv(params, compute_type_, bits_, form, gemv_quant_bytes(params.io.gate_up_tiles > 0),
                                    static_cast<int>(gemv_ctas(params.io, units)), stream),
             "gemm_routed kernel launch");
}

}  // namespace ferrum_moe_cuda
