#include "backend.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "dtype.hpp"
#include "error.hpp"
#include "release.hpp"

// The host's side of an FmError: plugins create it through the services table.
struct FmError {
  FmErrorCode code;
  std::string message;
};

namespace ferrum {
namespace {

// The name gemm_routed's refusals carry, whichever routing (and the layer's
// check before its one call) raised them.
constexpr const char* kGemmRouted = "gemm_routed";

FmError* host_error_new(FmErrorCode code, const char* message) {
  return new FmError{code, message != nullptr ? message : "(no message)"};
}

void* host_alloc(size_t bytes, size_t alignment) {
  if (alignment < sizeof(void*)) alignment = sizeof(void*);
  void* p = nullptr;
  return posix_memalign(&p, alignment, bytes == 0 ? alignment : bytes) == 0 ? p : nullptr;
}

void host_free(void* p) { std::free(p); }

const FmHostServices kServices = {sizeof(FmHostServices), &host_error_new, &host_alloc, &host_free};

// The table of ABI 1.0 ends with stream_order: a smaller table is truncated.
constexpr size_t kMinApiSize = offsetof(FmBackendApi, stream_order) + sizeof(FmBackendApi::stream_order);

}  // namespace

void raise_error(FmError* error, const std::string& context) {
  FmErrorCode code = error->code;
  std::string message = context.empty() ? error->message : context + ": " + error->message;
  delete error;
  throw Error(code, message);
}

std::shared_ptr<Backend> Backend::load(const FmBackendApi* api) {
  if (api == nullptr) throw Error(FM_ERROR_INTERNAL, "the plugin returned a NULL FmBackendApi table");
  // The name and version precede every function pointer; a table too short to
  // hold them is named by its versions alone.
  const bool named = api->struct_size >= offsetof(FmBackendApi, version) + sizeof(api->version);
  const std::string plugin = std::string("plugin '") + (named && api->name != nullptr ? api->name : "?") + "' " +
                             (named && api->version != nullptr ? api->version : "?") + " (ABI " +
                             std::to_string(api->abi_major) + "." + std::to_string(api->abi_minor) + ")";
  const std::string host = "this ferrum-moe (ABI " + std::to_string(FM_ABI_MAJOR) + "." + std::to_string(FM_ABI_MINOR) + ")";
  if (api->abi_major != FM_ABI_MAJOR) {
    throw Error(FM_ERROR_UNSUPPORTED, plugin + " is incompatible with " + host + ": rebuild the plugin against this ferrum-moe");
  }
  if (api->struct_size < kMinApiSize) {
    throw Error(FM_ERROR_UNSUPPORTED, plugin + " has a function table of " + std::to_string(api->struct_size) +
                                          " bytes; ABI " + std::to_string(FM_ABI_MAJOR) + ".0 needs at least " +
                                          std::to_string(kMinApiSize) + " (" + host + ")");
  }
  std::shared_ptr<Backend> b(new Backend());
  b->api_ = api;
  b->name_ = api->name != nullptr ? api->name : "";
  b->version_ = api->version != nullptr ? api->version : "";
  FmInitArgs init{sizeof(FmInitArgs), &kServices, nullptr};
  if (FmError* e = api->initialize(&init)) raise_error(e, "initialising backend '" + b->name_ + "'");
  if (init.backend == nullptr) throw Error(FM_ERROR_INTERNAL, "backend initialize returned no backend");
  b->handle_ = init.backend;
  FmBackendInfo info{};
  info.struct_size = sizeof(FmBackendInfo);
  if (FmError* e = api->get_info(b->handle_, &info)) raise_error(e, "backend '" + b->name_ + "' get_info");
  b->description_ = info.description != nullptr ? info.description : "";
  b->device_types_.assign(info.device_types, info.device_types + info.num_device_types);
  b->device_count_ = info.device_count;
  return b;
}

Backend::~Backend() {
  if (handle_ == nullptr) return;
  run_release([](void* self) { auto* b = static_cast<Backend*>(self); b->api_->destroy(b->handle_); }, this);
}

std::string Backend::abi_version() const {
  return std::to_string(api_->abi_major) + "." + std::to_string(api_->abi_minor);
}

bool Backend::serves(DLDevice device) const {
  for (int32_t t : device_types_) {
    if (t == device.device_type) return device.device_type == kDLCPU || device.device_id < device_count_;
  }
  return false;
}

void Backend::check_device(const Tensor& t, Arg arg) const {
  if (!serves(t.device())) {
    throw_value_error(std::string(arg.op) + ": " + arg.name + " is on " + device_name(t.device()) +
                      ", which backend '" + name_ + "' does not compute on");
  }
}

std::shared_ptr<Tensor> Backend::empty(DLDevice device, DLDataType dtype, const std::vector<int64_t>& shape,
                                       void* stream, uint32_t flags) {
  // Shapes can come from user input (dispatch rows, routing sizes): a product
  // that overflows would allocate a small buffer and let a kernel run past it.
  int64_t bytes = dtype_bytes(dtype);
  for (int64_t d : shape) {
    if (d < 0 || (d > 0 && bytes > kMaxTensorBytes / d)) {
      throw Error(FM_ERROR_INVALID_ARGUMENT, "cannot allocate " + dtype_name(dtype) + shape_string(shape) +
                                                 ": dimensions must be >= 0 and the tensor under 2^48 bytes");
    }
    bytes *= d;
  }
  const std::string what = dtype_name(dtype) + shape_string(shape) + " on " + device_name(device);
  // Plugins of ABI 1.0 do not know FM_ALLOC_ZEROED: the host zeroes host
  // memory itself, and cannot zero device memory without the plugin.
  const bool zero_here = (flags & FM_ALLOC_ZEROED) != 0 && api_->abi_minor < 1;
  const bool host_memory = device.device_type == kDLCPU || device.device_type == kDLCUDAHost;
  if (zero_here && !host_memory) {
    throw Error(FM_ERROR_UNSUPPORTED, "backend '" + name_ + "' (plugin ABI " + abi_version() +
                                          ") cannot zero-fill a new result on " + device_name(device) + "; pass out=");
  }
  FmTensorAllocArgs args{};
  args.struct_size = sizeof(args);
  args.backend = handle_;
  args.device = device;
  args.dtype = dtype;
  args.ndim = int32_t(shape.size());
  args.shape = shape.data();
  args.stream = stream;
  args.flags = flags;
  if (FmError* e = api_->tensor_alloc(&args)) raise_error(e, "allocating " + what);
  if (args.result == nullptr) throw Error(FM_ERROR_INTERNAL, "backend '" + name_ + "' tensor_alloc returned no tensor for " + what);
  auto t = Tensor::adopt(args.result);
  if (t->shape() != shape || t->dtype() != dtype || t->device().device_type != device.device_type ||
      t->device().device_id != device.device_id || !t->is_compact()) {
    throw Error(FM_ERROR_INTERNAL, "backend '" + name_ + "' tensor_alloc returned " + dtype_name(t->dtype()) +
                                       shape_string(t->shape()) + " on " + device_name(t->device()) +
                                       " (compact: " + (t->is_compact() ? "yes" : "no") + ") for " + what);
  }
  if (zero_here) std::memset(reinterpret_cast<void*>(t->data_ptr()), 0, size_t(bytes));
  t->set_producer(shared_from_this(), stream);
  return t;
}

std::shared_ptr<ExpertStack> Backend::create_stack(const StackSpec& spec, const Tensor& qweight,
                                                   const Tensor& scales, const Tensor* zeros,
                                                   const Tensor* g_idx, void* stream) {
  const char* op = "ExpertStack";
  if (spec.bits != 4 && spec.bits != 8) throw_value_error("ExpertStack: bits must be 4 or 8; got " + std::to_string(spec.bits));
  if (spec.group_size != -1 && spec.group_size < 1) {
    throw_value_error("ExpertStack: group_size must be -1 or positive; got " + std::to_string(spec.group_size));
  }
  if (spec.num_experts < 1 || spec.k < 1 || spec.n_per_expert < 1 || spec.num_experts > kMaxTensorBytes ||
      spec.k > kMaxTensorBytes || spec.n_per_expert > kMaxTensorBytes) {
    throw_value_error("ExpertStack: num_experts, k and n_per_expert must be in [1, 2^48]; got " +
                      std::to_string(spec.num_experts) + ", " + std::to_string(spec.k) + ", " +
                      std::to_string(spec.n_per_expert));
  }
  if (!serves(spec.device)) {
    throw_value_error("ExpertStack: backend '" + name_ + "' cannot hold a stack on " + device_name(spec.device));
  }
  const int64_t e = spec.num_experts, n = spec.n_per_expert, g = spec.num_groups();
  auto on_host_or_device = [&](const Tensor& t, Arg arg) {
    if (t.device().device_type != kDLCPU) expect_device(t, spec.device, arg, "the host or the stack's device");
    expect_compact(t, arg);
  };
  expect_rank(qweight, 3, {op, "qweight"});
  expect_dtype_in(qweight, {kInt32, DLDataType{kDLUInt, 32, 1}}, {op, "qweight"});
  expect_dim(qweight, 0, e, {op, "qweight"}, "num_experts");
  expect_dim(qweight, 1, spec.packed_k(), {op, "qweight"}, "ceil(k / (32 / bits)) packed rows");
  expect_dim(qweight, 2, n, {op, "qweight"}, "n_per_expert");
  on_host_or_device(qweight, {op, "qweight"});
  expect_rank(scales, 3, {op, "scales"});
  expect_dtype(scales, spec.dtype, {op, "scales"}, "scales follow the activation dtype");
  expect_dim(scales, 0, e, {op, "scales"}, "num_experts");
  expect_dim(scales, 1, g, {op, "scales"}, "ceil(k / group_size) groups");
  expect_dim(scales, 2, n, {op, "scales"}, "n_per_expert");
  on_host_or_device(scales, {op, "scales"});
  if (zeros != nullptr) {
    expect_rank(*zeros, 3, {op, "zeros"});
    expect_dtype(*zeros, kUInt8, {op, "zeros"}, "true zero points");
    expect_dim(*zeros, 0, e, {op, "zeros"}, "num_experts");
    expect_dim(*zeros, 1, g, {op, "zeros"}, "ceil(k / group_size) groups");
    expect_dim(*zeros, 2, n, {op, "zeros"}, "n_per_expert");
    on_host_or_device(*zeros, {op, "zeros"});
  }
  if (g_idx != nullptr) {
    expect_rank(*g_idx, 2, {op, "g_idx"});
    expect_dtype(*g_idx, kInt32, {op, "g_idx"});
    expect_dim(*g_idx, 0, e, {op, "g_idx"}, "num_experts");
    expect_dim(*g_idx, 1, spec.k, {op, "g_idx"}, "k");
    on_host_or_device(*g_idx, {op, "g_idx"});
    if (host_readable(g_idx->device())) {
      const auto* v = reinterpret_cast<const int32_t*>(g_idx->data_ptr());
      for (int64_t i = 0; i < g_idx->numel(); ++i) {
        if (v[i] < 0 || v[i] >= g) {
          throw_value_error("ExpertStack: g_idx[" + std::to_string(i / spec.k) + ", " + std::to_string(i % spec.k) +
                            "] = " + std::to_string(v[i]) + " is not a group index in [0, " + std::to_string(g) + ")");
        }
      }
    }
  }
  if (spec.group_size < spec.k && spec.group_size > INT32_MAX) {
    throw_value_error("ExpertStack: group_size " + std::to_string(spec.group_size) + " must be below 2^31 (or at least k " +
                      std::to_string(spec.k) + ": one group)");
  }
  FmStackCreateArgs args{};
  args.struct_size = sizeof(args);
  args.backend = handle_;
  args.device = spec.device;
  args.dtype = spec.dtype;
  args.num_experts = e;
  args.k = spec.k;
  args.n_per_expert = n;
  args.bits = spec.bits;
  // A group at least K long is the single group -1 spells, whatever its size
  // (the ABI's field is 32-bit).
  args.group_size = spec.group_size >= spec.k ? -1 : int32_t(spec.group_size);
  args.qweight = &qweight.dl();
  args.scales = &scales.dl();
  args.zeros = zeros != nullptr ? &zeros->dl() : nullptr;
  args.g_idx = g_idx != nullptr ? &g_idx->dl() : nullptr;
  args.stream = stream;
  if (FmError* e = api_->stack_create(&args)) raise_error(e, "ExpertStack");
  return std::make_shared<ExpertStack>(shared_from_this(), args.stack, spec, zeros != nullptr, g_idx != nullptr);
}

int64_t max_num_tokens_padded(int64_t num_pairs, int64_t num_local_experts, int64_t block_size) {
  const std::string got = "; got " + std::to_string(num_pairs) + " pairs, " + std::to_string(num_local_experts) +
                          " local experts, block_size " + std::to_string(block_size);
  if (num_pairs < 0 || num_local_experts < 0 || block_size < 1 || block_size > kMaxBlockSize) {
    throw_value_error("routing buffers: block_size must be in [1, " + std::to_string(kMaxBlockSize) + "] and counts >= 0" + got);
  }
  // Each term is checked before the sum is formed, so nothing can wrap.
  const int64_t room = kMaxRoutingIndex - std::min(num_pairs, kMaxRoutingIndex);
  if (num_pairs > kMaxRoutingIndex || (block_size > 1 && num_local_experts > room / (block_size - 1))) {
    throw_value_error("routing buffers: num_tokens * top_k + num_local_experts * (block_size - 1) must be at most 2^31 - 1 "
                      "(the routing arrays hold int32 positions)" + got);
  }
  return num_pairs + num_local_experts * (block_size - 1);
}

namespace {

// The checks of an expert_map beside topk_ids (align, pair-routed GEMMs):
// answers the local id bound, its largest entry + 1 when the host can read
// it, else num_experts (a device map is the kernels' to range-check).
int64_t check_expert_map(const char* op, const Tensor* expert_map, int64_t num_experts, const Tensor& topk_ids) {
  if (expert_map == nullptr) return num_experts;
  expect_rank(*expert_map, 1, {op, "expert_map"});
  expect_dtype(*expert_map, kInt32, {op, "expert_map"});
  expect_dim(*expert_map, 0, num_experts, {op, "expert_map"}, "num_experts");
  expect_compact(*expert_map, {op, "expert_map"});
  expect_device(*expert_map, topk_ids.device(), {op, "expert_map"}, "topk_ids' device");
  if (!host_readable(expert_map->device())) return num_experts;
  const auto* m = reinterpret_cast<const int32_t*>(expert_map->data_ptr());
  int64_t max_local = -1;  // + 1 below must not wrap for a map naming 2^31 - 1
  for (int64_t i = 0; i < num_experts; ++i) {
    if (m[i] < -1) {
      throw_value_error(std::string(op) + ": expert_map[" + std::to_string(i) + "] = " + std::to_string(m[i]) +
                        "; entries must be a local expert id >= 0 or -1 (not local)");
    }
    if (m[i] > max_local) max_local = m[i];
  }
  return max_local + 1;
}

void check_num_experts(const char* op, int64_t num_experts) {
  if (num_experts < 1 || num_experts > kMaxRoutingIndex) {
    throw_value_error(std::string(op) + ": num_experts must be in [1, 2^31 - 1] (expert ids are int32); got " +
                      std::to_string(num_experts));
  }
}

}  // namespace

void Backend::moe_align_block_size(const Tensor& topk_ids, int64_t num_experts, int64_t block_size,
                                   const Tensor* expert_map, Tensor& sorted_token_ids, Tensor& expert_ids,
                                   Tensor& num_tokens_post_padded, void* stream) {
  const char* op = "moe_align_block_size";
  if (block_size < 1 || block_size > kMaxBlockSize) {
    throw_value_error("moe_align_block_size: block_size must be in [1, " + std::to_string(kMaxBlockSize) + "]; got " +
                      std::to_string(block_size));
  }
  check_num_experts(op, num_experts);
  expect_rank(topk_ids, 2, {op, "topk_ids"});
  expect_dtype_in(topk_ids, {kInt32, kInt64}, {op, "topk_ids"});
  expect_compact(topk_ids, {op, "topk_ids"});
  check_device(topk_ids, {op, "topk_ids"});
  const int64_t num_local = check_expert_map(op, expert_map, num_experts, topk_ids);
  const int64_t padded = max_num_tokens_padded(topk_ids.numel(), num_local, block_size);
  const int64_t blocks = (padded + block_size - 1) / block_size;
  for (auto [t, name, len] : {std::tuple<Tensor*, const char*, int64_t>{&sorted_token_ids, "sorted_token_ids", padded},
                              {&expert_ids, "expert_ids", blocks},
                              {&num_tokens_post_padded, "num_tokens_post_padded", 1}}) {
    expect_rank(*t, 1, {op, name});
    expect_dtype(*t, kInt32, {op, name});
    expect_dim_at_least(*t, 0, len, {op, name}, "see fm.routing_buffer_sizes");
    expect_compact(*t, {op, name});
    expect_device(*t, topk_ids.device(), {op, name}, "topk_ids' device");
    expect_writable(*t, {op, name});
    expect_disjoint(*t, topk_ids, {op, name}, "topk_ids");
    if (expert_map != nullptr) expect_disjoint(*t, *expert_map, {op, name}, "expert_map");
  }
  expect_disjoint(sorted_token_ids, expert_ids, {op, "sorted_token_ids"}, "expert_ids");
  expect_disjoint(sorted_token_ids, num_tokens_post_padded, {op, "sorted_token_ids"}, "num_tokens_post_padded");
  expect_disjoint(expert_ids, num_tokens_post_padded, {op, "expert_ids"}, "num_tokens_post_padded");
  FmAlignArgs args{};
  args.struct_size = sizeof(args);
  args.backend = handle_;
  args.topk_ids = &topk_ids.dl();
  args.num_experts = num_experts;
  args.block_size = block_size;
  args.expert_map = expert_map != nullptr ? &expert_map->dl() : nullptr;
  args.num_local_experts = num_local;
  args.sorted_token_ids = sorted_token_ids.mutable_dl();
  args.expert_ids = expert_ids.mutable_dl();
  args.num_tokens_post_padded = num_tokens_post_padded.mutable_dl();
  args.stream = stream;
  if (FmError* e = api_->moe_align_block_size(&args)) raise_error(e, op);
}

void Backend::gated_activation(const Tensor& input, Tensor& out, void* stream) {
  const char* op = "gated_activation";
  expect_rank(input, 2, {op, "input"});
  expect_rank(out, 2, {op, "out"});
  check_device(input, {op, "input"});
  expect_device(out, input.device(), {op, "out"}, "the input's device");
  expect_dtype_in(input, {kFloat32, kFloat16, kBFloat16}, {op, "input"});
  expect_dtype(out, input.dtype(), {op, "out"}, "the input's dtype");
  if (input.dim(1) % 2 != 0) throw_value_error("gated_activation: input width " + std::to_string(input.dim(1)) + " must be even ([gate | up])");
  expect_dim(out, 0, input.dim(0), {op, "out"}, "the input's rows");
  expect_dim(out, 1, input.dim(1) / 2, {op, "out"}, "half the input's width");
  expect_rows_contiguous(input, {op, "input"});
  expect_rows_contiguous(out, {op, "out"});
  expect_writable(out, {op, "out"});
  expect_disjoint(out, input, {op, "out"}, "input");
  FmGatedActivationArgs args{sizeof(args), handle_, FM_ACTIVATION_SILU, &input.dl(), out.mutable_dl(), stream};
  if (FmError* e = api_->gated_activation(&args)) raise_error(e, op);
}

void Backend::check_moe_sum(const Tensor& input, const Tensor& topk_ids, int64_t num_experts,
                            const Tensor* expert_map, const Tensor& out) const {
  const char* op = "moe_sum";
  expect_rank(input, 2, {op, "input"});
  expect_rank(topk_ids, 2, {op, "topk_ids"});
  expect_rank(out, 2, {op, "out"});
  check_device(input, {op, "input"});
  expect_device(topk_ids, input.device(), {op, "topk_ids"}, "the input's device");
  expect_device(out, input.device(), {op, "out"}, "the input's device");
  expect_dtype_in(topk_ids, {kInt32, kInt64}, {op, "topk_ids"});
  expect_compact(topk_ids, {op, "topk_ids"});
  expect_dtype_in(out, {kFloat32, kFloat16, kBFloat16}, {op, "out"});
  if (input.dtype() != kFloat32) expect_dtype(input, out.dtype(), {op, "input"}, "float32 or the output's dtype");
  expect_dim(input, 0, topk_ids.numel(), {op, "input"}, "num_tokens * top_k");
  expect_dim(out, 0, topk_ids.dim(0), {op, "out"}, "num_tokens");
  expect_dim(out, 1, input.dim(1), {op, "out"}, "the input's width");
  expect_rows_contiguous(input, {op, "input"});
  expect_rows_contiguous(out, {op, "out"});
  expect_writable(out, {op, "out"});
  expect_disjoint(out, input, {op, "out"}, "input");
  expect_disjoint(out, topk_ids, {op, "out"}, "topk_ids");
  if (expert_map != nullptr) {
    expect_rank(*expert_map, 1, {op, "expert_map"});
    expect_dtype(*expert_map, kInt32, {op, "expert_map"});
    expect_dim(*expert_map, 0, num_experts, {op, "expert_map"}, "num_experts");
    expect_compact(*expert_map, {op, "expert_map"});
    expect_device(*expert_map, input.device(), {op, "expert_map"}, "the input's device");
    expect_disjoint(out, *expert_map, {op, "out"}, "expert_map");
  }
}

void Backend::moe_sum(const Tensor& input, const Tensor& topk_ids, int64_t num_experts, const Tensor* expert_map,
                      Tensor& out, void* stream) {
  const char* op = "moe_sum";
  check_moe_sum(input, topk_ids, num_experts, expert_map, out);
  FmMoeSumArgs args{sizeof(args), handle_, &input.dl(), &topk_ids.dl(), num_experts,
                    expert_map != nullptr ? &expert_map->dl() : nullptr, out.mutable_dl(), stream};
  if (FmError* e = api_->moe_sum(&args)) raise_error(e, op);
}

bool Backend::moe_layer(ExpertStack& w13, ExpertStack& w2, const LayerArgs& layer, void* stream) {
  if (!has_moe_layer()) return false;
  FmMoeLayerArgs args{};
  args.struct_size = sizeof(args);
  args.backend = handle_;
  args.w13 = w13.handle();
  args.w2 = w2.handle();
  args.x = &layer.x->dl();
  args.topk_ids = &layer.topk_ids->dl();
  args.topk_weights = &layer.topk_weights->dl();
  args.weights_on_input = layer.weights_on_input ? 1 : 0;
  args.num_experts = layer.num_experts;
  args.expert_map = layer.expert_map != nullptr ? &layer.expert_map->dl() : nullptr;
  args.activation = static_cast<FmActivation>(layer.activation);
  args.act = layer.act->mutable_dl();
  args.down = layer.down->mutable_dl();
  args.out = layer.out->mutable_dl();
  args.stream = stream;
  if (FmError* e = api_->moe_layer(&args)) raise_error(e, "moe_layer (the plugin's one call)");
  return args.written != 0;
}

void Backend::stream_order(DLDevice device, void* producer, void* consumer) {
  if (FmError* e = api_->stream_order(handle_, device, producer, consumer)) raise_error(e, "ordering DLPack streams");
}

ExpertStack::ExpertStack(std::shared_ptr<Backend> backend, FmStack* handle, const StackSpec& spec, bool has_zeros,
                         bool has_g_idx)
    : backend_(std::move(backend)), handle_(handle), spec_(spec), has_zeros_(has_zeros), has_g_idx_(has_g_idx) {
  props_.struct_size = sizeof(props_);
  props_.column_alignment = 1;
  if (FmError* e = backend_->api().stack_get_properties(handle_, &props_)) raise_error(e, "stack properties");
  if (props_.column_alignment < 1) props_.column_alignment = 1;
}

ExpertStack::~ExpertStack() {
  run_release([](void* self) { auto* s = static_cast<ExpertStack*>(self); s->backend_->api().stack_destroy(s->handle_); },
              this);
}

void ExpertStack::check_column_window(int64_t col_begin, int64_t n, const char* op) const {
  const int64_t npe = spec_.n_per_expert, a = props_.column_alignment;
  const std::string where = std::string(op) + ": offset " + std::to_string(col_begin) + " and n " + std::to_string(n);
  if (n < 1 || col_begin < 0 || col_begin > npe || n > npe - col_begin) {
    throw_value_error(where + " must select columns inside one expert: 0 <= offset, 1 <= n, offset + n <= n_per_expert " +
                      std::to_string(npe));
  }
  if (col_begin % a != 0 || (n % a != 0 && col_begin + n != npe)) {
    throw_value_error(where + " must be multiples of the '" + backend_->name() + "' backend's column alignment " +
                      std::to_string(a));
  }
}

std::vector<ExpertStack::Segment> ExpertStack::view_segments(int64_t offset, int64_t n, const char* op) const {
  const int64_t npe = spec_.n_per_expert, stacked = spec_.num_experts * npe;
  if (offset < 0 || n < 1 || offset > stacked || n > stacked - offset) {
    throw_value_error(std::string(op) + ": offset " + std::to_string(offset) + " + n " + std::to_string(n) +
                      " exceeds the stacked N of " + std::to_string(stacked) + " (" + std::to_string(spec_.num_experts) +
                      " experts x " + std::to_string(npe) + ")");
  }
  const int64_t a = props_.column_alignment;
  const int64_t end = offset + n;
  // Each end of the window is aligned, or is an expert boundary (or the stack's end).
  for (int64_t edge : {offset, end}) {
    if (edge % a != 0 && edge % npe != 0) {
      throw_value_error(std::string(op) + ": offset " + std::to_string(offset) + " and offset + n " + std::to_string(end) +
                        " must be multiples of the '" + backend_->name() + "' backend's column alignment " +
                        std::to_string(a) + " (or expert boundaries, multiples of n_per_expert " + std::to_string(npe) + ")");
    }
  }
  std::vector<Segment> segments;
  for (int64_t c = offset; c < end;) {
    const int64_t expert = c / npe, col = c % npe, len = std::min(npe - col, end - c);
    segments.push_back({expert, col, len, c - offset});
    c += len;
  }
  return segments;
}

void ExpertStack::check_x(const char* op, const Tensor& x) const {
  expect_rank(x, 2, {op, "x"});
  expect_device(x, spec_.device, {op, "x"}, "the stack's device");
  expect_dtype(x, spec_.dtype, {op, "x"}, "the stack's dtype");
  expect_dim(x, 1, spec_.k, {op, "x"}, "the stack's k");
  expect_rows_contiguous(x, {op, "x"});
}

void ExpertStack::check_gemm_io(const char* op, const Tensor& x, int64_t n, const Tensor* bias, const Tensor& out) const {
  check_x(op, x);
  expect_rank(out, 2, {op, "out"});
  expect_device(out, spec_.device, {op, "out"}, "the stack's device");
  expect_dtype_in(out, {spec_.dtype, kFloat32}, {op, "out"});
  expect_dim_at_least(out, 1, n, {op, "out"}, "the output width n");
  expect_rows_contiguous(out, {op, "out"});
  expect_writable(out, {op, "out"});
  if (bias != nullptr) {
    expect_rank(*bias, 1, {op, "bias"});
    expect_device(*bias, spec_.device, {op, "bias"}, "the stack's device");
    expect_dtype(*bias, spec_.dtype, {op, "bias"}, "the stack's dtype");
    expect_dim(*bias, 0, n, {op, "bias"}, "the output width n");
    expect_compact(*bias, {op, "bias"});
    expect_disjoint(out, *bias, {op, "out"}, "bias");
  }
  expect_disjoint(out, x, {op, "out"}, "x");
}

void ExpertStack::check_dispatch_table(const Tensor& dispatches) const {
  const char* op = "gemm_batched";
  expect_rank(dispatches, 2, {op, "dispatches"});
  expect_dim(dispatches, 1, 4, {op, "dispatches"}, "rows (expert, in_row, out_row, m)");
  expect_compact(dispatches, {op, "dispatches"});
  if (host_readable(dispatches.device())) {
    expect_dtype(dispatches, kInt64, {op, "dispatches"});
  } else {
    expect_device(dispatches, spec_.device, {op, "dispatches"}, "the host or the stack's device");
    expect_dtype_in(dispatches, {kInt32, kInt64}, {op, "dispatches"});
    if (backend_->abi_minor() < 1) {
      throw Error(FM_ERROR_UNSUPPORTED, "gemm_batched: backend '" + backend_->name() + "' (plugin ABI " +
                                            backend_->abi_version() +
                                            ") reads dispatch rows on the host; pass dispatches as a host array");
    }
  }
}

int64_t ExpertStack::batched_output_rows(const Tensor& x, const Tensor& dispatches) const {
  check_x("gemm_batched", x);
  check_dispatch_table(dispatches);
  if (!host_readable(dispatches.device())) throw_value_error("gemm_batched: dispatches must be a host array to size a result");
  return check_host_dispatches(dispatches, x.dim(0), -1);
}

int64_t ExpertStack::check_host_dispatches(const Tensor& dispatches, int64_t x_rows, int64_t out_rows) const {
  const auto* d = reinterpret_cast<const int64_t*>(dispatches.data_ptr());
  int64_t rows_needed = 0;
  for (int64_t i = 0; i < dispatches.dim(0); ++i) {
    const int64_t e = d[4 * i], in_row = d[4 * i + 1], out_row = d[4 * i + 2], m = d[4 * i + 3];
    const std::string row = "gemm_batched: dispatches[" + std::to_string(i) + "] = (expert " + std::to_string(e) +
                            ", in_row " + std::to_string(in_row) + ", out_row " + std::to_string(out_row) + ", m " +
                            std::to_string(m) + "): ";
    if (e < 0 || e >= spec_.num_experts) throw_value_error(row + "expert must be in [0, " + std::to_string(spec_.num_experts) + ")");
    if (m < 0) throw_value_error(row + "m must be >= 0");
    // Compared without forming in_row + m, which can overflow for hostile rows.
    if (in_row < 0 || in_row > x_rows || m > x_rows - in_row) {
      throw_value_error(row + "input rows exceed x's " + std::to_string(x_rows) + " rows");
    }
    if (out_rows >= 0 && (out_row < 0 || out_row > out_rows || m > out_rows - out_row)) {
      throw_value_error(row + "output rows exceed out's " + std::to_string(out_rows) + " rows");
    }
    if (out_rows < 0 && (out_row < 0 || out_row > kMaxTensorBytes || m > kMaxTensorBytes - out_row)) {
      throw_value_error(row + "output rows exceed 2^48, the most a new result may hold");
    }
    rows_needed = std::max(rows_needed, out_row + m);  // m = 0 too: every row lies inside the result
  }
  return rows_needed;
}

void ExpertStack::gemm_batched(const Tensor& x, const Tensor& dispatches, int64_t col_begin, int64_t n,
                               const Tensor* bias, Tensor& out, void* stream) {
  const char* op = "gemm_batched";
  check_column_window(col_begin, n, op);
  // The arrays first: a wrong x is reported as x, not as a dispatch problem.
  check_gemm_io(op, x, n, bias, out);
  check_dispatch_table(dispatches);
  expect_disjoint(out, dispatches, {op, "out"}, "dispatches");
  if (host_readable(dispatches.device())) check_host_dispatches(dispatches, x.dim(0), out.dim(0));
  launch_batched(x.dl(), dispatches.dl(), col_begin, n, bias != nullptr ? &bias->dl() : nullptr, *out.mutable_dl(),
                 stream, op);
}

void ExpertStack::linear(const Tensor& x, int64_t offset, int64_t n, const Tensor* bias, Tensor& out, void* stream) {
  const char* op = "Linear";
  const std::vector<Segment> segments = view_segments(offset, n, op);
  check_gemm_io(op, x, n, bias, out);
  const int64_t rows = x.dim(0);
  if (rows == 0) return;
  expect_dim_at_least(out, 0, rows, {op, "out"}, "x's rows");
  // Explicit strides: a narrowed view of a compact tensor is no longer compact.
  int64_t out_strides[2] = {out.strides()[0], out.strides()[1]};
  const int64_t out_bytes = dtype_bytes(out.dtype());
  for (const Segment& s : segments) {
    // One host dispatch row per expert the window touches, its output and bias
    // columns narrowed to the segment's share of the window.
    int64_t row[4] = {s.expert, 0, 0, rows};
    int64_t dispatch_shape[2] = {1, 4};
    DLTensor dispatch{row, DLDevice{kDLCPU, 0}, 2, kInt64, dispatch_shape, nullptr, 0};
    DLTensor out_part = out.dl();
    int64_t out_shape[2] = {out.dim(0), s.n};
    out_part.shape = out_shape;
    out_part.strides = out_strides;
    out_part.byte_offset += uint64_t(s.window_offset * out_strides[1] * out_bytes);
    DLTensor bias_part{};
    int64_t bias_shape[1] = {s.n};
    if (bias != nullptr) {
      bias_part = bias->dl();
      bias_part.shape = bias_shape;
      bias_part.byte_offset += uint64_t(s.window_offset * dtype_bytes(bias->dtype()));
    }
    launch_batched(x.dl(), dispatch, s.col_begin, s.n, bias != nullptr ? &bias_part : nullptr, out_part, stream, op);
  }
}

void ExpertStack::launch_batched(const DLTensor& x, const DLTensor& dispatches, int64_t col_begin, int64_t n,
                                 const DLTensor* bias, DLTensor& out, void* stream, const char* op) {
  FmGemmBatchedArgs args{};
  args.struct_size = sizeof(args);
  args.stack = handle_;
  args.x = &x;
  args.dispatches = &dispatches;
  args.col_begin = col_begin;
  args.n = n;
  args.bias = bias;
  args.out = &out;
  args.stream = stream;
  if (FmError* e = backend_->api().stack_gemm_batched(&args)) raise_error(e, op);
}

// What both routings of gemm_routed check: x, the pair count, topk_weights and
// out. Answers num_tokens.
int64_t ExpertStack::check_routed_io(const char* op, const Tensor& x, int64_t top_k, const Tensor* topk_weights,
                                     Tensor* out, const Gated* gated) const {
  check_x(op, x);
  const int64_t num_tokens = x.dim(0);
  if (num_tokens > kMaxRoutingIndex / top_k) {
    throw_value_error(std::string(op) + ": num_tokens " + std::to_string(num_tokens) + " x top_k " +
                      std::to_string(top_k) + " exceeds 2^31 - 1 (routing ids are int32)");
  }
  if (out == nullptr && gated == nullptr) throw_value_error(std::string(op) + ": out is missing");
  if (topk_weights != nullptr) {
    expect_rank(*topk_weights, 2, {op, "topk_weights"});
    expect_dtype(*topk_weights, kFloat32, {op, "topk_weights"});
    expect_device(*topk_weights, spec_.device, {op, "topk_weights"}, "the stack's device");
    expect_dim(*topk_weights, 0, num_tokens, {op, "topk_weights"}, "num_tokens");
    expect_dim(*topk_weights, 1, top_k, {op, "topk_weights"}, "top_k");
    expect_compact(*topk_weights, {op, "topk_weights"});
  }
  if (gated != nullptr) {
    if (gated->activation != int32_t{FM_ACTIVATION_SILU}) {
      throw_value_error(std::string(op) + ": activation must be FM_ACTIVATION_SILU (0); got " +
                        std::to_string(gated->activation));
    }
    if (spec_.n_per_expert % 2 != 0) {
      throw_value_error(std::string(op) + ": a gated output needs an even n_per_expert ([gate | up]); the stack has " +
                        std::to_string(spec_.n_per_expert));
    }
  }
  // Each output: its shape, and no memory shared with an input or the other output.
  for (const RoutedOutput& o : routed_outputs(out, gated)) {
    const bool plain = o.tensor == out;
    expect_rank(*o.tensor, 2, {op, o.name});
    expect_device(*o.tensor, spec_.device, {op, o.name}, "the stack's device");
    expect_dtype_in(*o.tensor, plain ? std::vector<DLDataType>{spec_.dtype, kFloat32} : std::vector{spec_.dtype},
                    {op, o.name});
    expect_dim(*o.tensor, 0, num_tokens * top_k, {op, o.name}, "num_tokens * top_k");
    expect_dim(*o.tensor, 1, plain ? spec_.n_per_expert : spec_.n_per_expert / 2, {op, o.name},
               plain ? "n_per_expert" : "n_per_expert / 2");
    expect_rows_contiguous(*o.tensor, {op, o.name});
    expect_writable(*o.tensor, {op, o.name});
    if (topk_weights != nullptr) expect_disjoint(*o.tensor, *topk_weights, {op, o.name}, "topk_weights");
    expect_disjoint(*o.tensor, x, {op, o.name}, "x");
    if (!plain && out != nullptr) expect_disjoint(*o.tensor, *out, {op, o.name}, "out");
  }
  return num_tokens;
}

// The outputs of a routed call, named as the caller knows them: the gated
// output is "out" where it is the call's only one.
std::vector<ExpertStack::RoutedOutput> ExpertStack::routed_outputs(Tensor* out, const Gated* gated) {
  std::vector<RoutedOutput> outputs;
  if (out != nullptr) outputs.push_back({out, "out"});
  if (gated != nullptr) outputs.push_back({gated->out, out != nullptr ? "gated_out" : "out"});
  return outputs;
}

bool ExpertStack::launch_routed(FmGemmRoutedArgs& args, const Gated* gated, const char* op) {
  if (gated != nullptr && backend_->has_gated_epilogue()) {
    args.gated_out = gated->out->mutable_dl();
    args.activation = static_cast<FmActivation>(gated->activation);
  }
  if (args.out == nullptr && args.gated_out == nullptr) return false;  // nothing the plugin could write
  if (FmError* e = backend_->api().stack_gemm_routed(&args)) raise_error(e, op);
  return args.gated_out != nullptr && args.gated_written != 0;
}

bool ExpertStack::gemm_routed(const Tensor& x, const Tensor& sorted_token_ids, const Tensor& expert_ids,
                              const Tensor& num_tokens_post_padded, int64_t block_size, int64_t top_k,
                              const Tensor* topk_weights, Tensor* out, void* stream, const Gated* gated) {
  const char* op = kGemmRouted;
  if (block_size < 1 || block_size > kMaxBlockSize || top_k < 1 || top_k > kMaxRoutingIndex) {
    throw_value_error("gemm_routed: block_size must be in [1, " + std::to_string(kMaxBlockSize) +
                      "] and top_k in [1, 2^31 - 1]; got " + std::to_string(block_size) + " and " + std::to_string(top_k));
  }
  check_routed_io(op, x, top_k, topk_weights, out, gated);
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&sorted_token_ids, "sorted_token_ids"},
                         {&expert_ids, "expert_ids"},
                         {&num_tokens_post_padded, "num_tokens_post_padded"}}) {
    expect_rank(*t, 1, {op, name});
    expect_dtype(*t, kInt32, {op, name});
    expect_device(*t, spec_.device, {op, name}, "the stack's device");
    expect_compact(*t, {op, name});
    for (const RoutedOutput& o : routed_outputs(out, gated)) expect_disjoint(*o.tensor, *t, {op, o.name}, name);
  }
  const int64_t blocks = (sorted_token_ids.dim(0) + block_size - 1) / block_size;
  expect_dim_at_least(expert_ids, 0, blocks, {op, "expert_ids"}, "one per block of sorted_token_ids");
  expect_dim(num_tokens_post_padded, 0, 1, {op, "num_tokens_post_padded"}, "a single count");
  FmGemmRoutedArgs args{};
  args.struct_size = sizeof(args);
  args.stack = handle_;
  args.x = &x.dl();
  args.sorted_token_ids = &sorted_token_ids.dl();
  args.expert_ids = &expert_ids.dl();
  args.num_tokens_post_padded = &num_tokens_post_padded.dl();
  args.block_size = block_size;
  args.top_k = top_k;
  args.topk_weights = topk_weights != nullptr ? &topk_weights->dl() : nullptr;
  args.out = out != nullptr ? out->mutable_dl() : nullptr;
  args.stream = stream;
  return launch_routed(args, gated, op);
}

int64_t ExpertStack::check_routed_pairs(const Tensor& x, const Tensor& topk_ids, int64_t num_experts,
                                        const Tensor* expert_map, const Tensor* topk_weights, Tensor* out,
                                        const Gated* gated) const {
  const char* op = kGemmRouted;
  if (!backend_->has_pair_routing()) {
    throw Error(FM_ERROR_UNSUPPORTED, "gemm_routed: backend '" + backend_->name() + "' (ABI " + backend_->abi_version() +
                                          ") has no pair routing (ABI 1.2): route the pairs with moe_align_block_size");
  }
  check_num_experts(op, num_experts);
  expect_rank(topk_ids, 2, {op, "topk_ids"});
  expect_dtype_in(topk_ids, {kInt32, kInt64}, {op, "topk_ids"});
  expect_device(topk_ids, spec_.device, {op, "topk_ids"}, "the stack's device");
  expect_compact(topk_ids, {op, "topk_ids"});
  const int64_t top_k = topk_ids.dim(1);
  if (top_k < 1 || top_k > kMaxRoutingIndex) {
    throw_value_error("gemm_routed: topk_ids must have 1 to 2^31 - 1 columns (top_k); got " + std::to_string(top_k));
  }
  const int64_t num_tokens = check_routed_io(op, x, top_k, topk_weights, out, gated);
  expect_dim(topk_ids, 0, num_tokens, {op, "topk_ids"}, "x's rows");
  check_expert_map(op, expert_map, num_experts, topk_ids);
  for (const RoutedOutput& o : routed_outputs(out, gated)) {
    expect_disjoint(*o.tensor, topk_ids, {op, o.name}, "topk_ids");
    if (expert_map != nullptr) expect_disjoint(*o.tensor, *expert_map, {op, o.name}, "expert_map");
  }
  return top_k;
}

bool ExpertStack::gemm_routed_pairs(const Tensor& x, const Tensor& topk_ids, int64_t num_experts,
                                    const Tensor* expert_map, const Tensor* topk_weights, Tensor* out, void* stream,
                                    const Gated* gated) {
  const int64_t top_k = check_routed_pairs(x, topk_ids, num_experts, expert_map, topk_weights, out, gated);
  FmGemmRoutedArgs args{};
  args.struct_size = sizeof(args);
  args.stack = handle_;
  args.x = &x.dl();
  args.block_size = 1;
  args.top_k = top_k;
  args.topk_weights = topk_weights != nullptr ? &topk_weights->dl() : nullptr;
  args.out = out != nullptr ? out->mutable_dl() : nullptr;
  args.stream = stream;
  args.topk_ids = &topk_ids.dl();
  args.num_experts = num_experts;
  args.expert_map = expert_map != nullptr ? &expert_map->dl() : nullptr;
  return launch_routed(args, gated, kGemmRouted);
}

void ExpertStack::zero_workspace(void* stream) {
  if (FmError* e = backend_->api().stack_zero_workspace(handle_, stream)) raise_error(e, "zero_workspace");
}

}  // namespace ferrum
