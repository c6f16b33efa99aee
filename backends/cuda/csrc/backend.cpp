// The CUDA backend object: device discovery, tensor allocation, and the
// backend-level operations (routing and elementwise). Stacks live in
// stack.cpp. Exported as the C table `fm_backend_get_api` (plugin.hpp).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "cuda_check.hpp"
#include "elementwise.hpp"
#include "ferrum_moe/plugin.hpp"
#include "routing.hpp"
#include "stack.hpp"
#include "tensor_checks.hpp"

#ifndef FERRUM_MOE_CUDA_VERSION
#define FERRUM_MOE_CUDA_VERSION "0.0.0"
#endif

namespace ferrum_moe_cuda {
namespace {

constexpr int kMinComputeCapabilityMajor = 8;  // mma.sync bf16, cp.async, ldmatrix

cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

ScalarType scalar_type(DLDataType t, const char* op, const char* arg) {
  if (is_float16(t)) return ScalarType::kFloat16;
  if (is_bfloat16(t)) return ScalarType::kBFloat16;
  if (is_float32(t)) return ScalarType::kFloat32;
  throw Error(FM_ERROR_TYPE, std::string(op) + ": " + arg +
                                 " must be float16, bfloat16 or float32; got " + dtype_name(t));
}

// The CUDA device all of an operation's tensors share (the first one's).
int operation_device(const DLTensor& first, const char* op, const char* arg) {
  if (first.device.device_type != kDLCUDA) {
    throw Error(FM_ERROR_INVALID_ARGUMENT, std::string(op) + ": " + arg + " is on " +
                                               device_name(first.device) +
                                               "; the CUDA backend computes on CUDA devices");
  }
  return first.device.device_id;
}

// manager_ctx of the tensors tensor_alloc hands out.
struct Allocation {
  std::vector<int64_t> shape;
  int device;
  // Temporaries (FM_ALLOC_TEMPORARY) are stream-ordered: freed on the stream
  // they were allocated on, which the caller keeps alive until it drops them.
  bool stream_ordered;
  cudaStream_t stream;
};

// Runs when the consumer drops the tensor, on any thread, maybe after the
// CUDA runtime has shut down: failures here cannot be reported and are ignored.
void delete_allocation(DLManagedTensorVersioned* self) {
  auto* allocation = static_cast<Allocation*>(self->manager_ctx);
  int previous = -1;
  const bool have_previous = cudaGetDevice(&previous) == cudaSuccess;
  if (cudaSetDevice(allocation->device) == cudaSuccess) {
    if (allocation->stream_ordered) {
      cudaFreeAsync(self->dl_tensor.data, allocation->stream);
    } else {
      // A buffer may be dropped while another thread captures a graph: relaxed
      // mode keeps this thread's cudaFree from invalidating that capture.
      cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
      cudaThreadExchangeStreamCaptureMode(&mode);
      cudaFree(self->dl_tensor.data);
      cudaThreadExchangeStreamCaptureMode(&mode);
    }
  }
  if (have_previous) cudaSetDevice(previous);
  cudaGetLastError();
  delete allocation;
  delete self;
}

class CudaBackend final : public ferrum::plugin::Backend {
 public:
  explicit CudaBackend(const FmHostServices* services) : Backend(services) {
    const cudaError_t status = cudaGetDeviceCount(&device_count_);
    if (status != cudaSuccess) {
      cudaGetLastError();
      throw Error(FM_ERROR_UNSUPPORTED, std::string("no CUDA device: ") + cudaGetErrorString(status));
    }
    if (device_count_ == 0) {
      throw Error(FM_ERROR_UNSUPPORTED, "no CUDA device: cudaGetDeviceCount found none");
    }
    cudaDeviceProp prop{};
    check_cuda(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
    if (prop.major < kMinComputeCapabilityMajor) {
      throw Error(FM_ERROR_UNSUPPORTED,
                  std::string("the CUDA backend needs compute capability 8.0 or newer; cuda:0 (") +
                      prop.name + ") is " + std::to_string(prop.major) + "." +
                      std::to_string(prop.minor));
    }
    description_ = "CUDA sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ", " +
                   prop.name + ", " + std::to_string(prop.multiProcessorCount) + " SMs";
    if (device_count_ > 1) description_ += ", " + std::to_string(device_count_) + " devices";
  }

  ferrum::plugin::BackendInfo info() override {
    ferrum::plugin::BackendInfo info;
    info.description = description_;
    info.device_types = {kDLCUDA};
    info.device_count = device_count_;
    return info;
  }

  // Temporaries come from the device's stream-ordered pool (a stream capture
  // records them as graph memory nodes, so an operation captures on its first
  // call). Everything else may outlive the call and be used on any stream:
  // plain cudaMalloc, freed by cudaFree (which waits for the device), taken in
  // relaxed capture mode so that a first call inside a capture can still
  // allocate the buffers a layer keeps.
  DLManagedTensorVersioned* tensor_alloc(const FmTensorAllocArgs& args) override {
    if (args.device.device_type != kDLCUDA || args.device.device_id < 0 ||
        args.device.device_id >= device_count_) {
      throw Error(FM_ERROR_INVALID_ARGUMENT, "tensor_alloc: the CUDA backend allocates on cuda:0.." +
                                                 std::to_string(device_count_ - 1) + "; got " +
                                                 device_name(args.device));
    }
    const int64_t element_bits = static_cast<int64_t>(args.dtype.bits) * args.dtype.lanes;
    int64_t elements = 1;
    for (int i = 0; i < args.ndim; ++i) {
      if (args.shape[i] < 0) {
        throw Error(FM_ERROR_INVALID_ARGUMENT, "tensor_alloc: negative dimension " +
                                                   std::to_string(args.shape[i]));
      }
      if (args.shape[i] != 0 && elements > std::numeric_limits<int64_t>::max() / 8 / args.shape[i]) {
        throw Error(FM_ERROR_OUT_OF_MEMORY, "tensor_alloc: tensor size overflows");
      }
      elements *= args.shape[i];
    }
    // Zero-size tensors still get a distinct, valid pointer.
    const size_t bytes = std::max<size_t>(1, static_cast<size_t>((elements * element_bits + 7) / 8));
    const uint32_t flags = FM_STRUCT_HAS(&args, flags) ? args.flags : 0u;
    const cudaStream_t stream = as_stream(args.stream);

    DeviceGuard guard(args.device.device_id);
    auto allocation = std::make_unique<Allocation>();
    allocation->shape.assign(args.shape, args.shape + args.ndim);
    allocation->device = args.device.device_id;
    allocation->stream_ordered = (flags & FM_ALLOC_TEMPORARY) != 0;
    allocation->stream = stream;
    void* data = nullptr;
    if (allocation->stream_ordered) {
      check_cuda(cudaMallocAsync(&data, bytes, stream), "tensor_alloc: cudaMallocAsync");
    } else {
      cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
      check_cuda(cudaThreadExchangeStreamCaptureMode(&mode), "tensor_alloc: capture mode");
      const cudaError_t status = cudaMalloc(&data, bytes);
      cudaThreadExchangeStreamCaptureMode(&mode);
      check_cuda(status, "tensor_alloc: cudaMalloc");
    }
    if ((flags & FM_ALLOC_ZEROED) != 0) {
      const cudaError_t status = cudaMemsetAsync(data, 0, bytes, stream);
      if (status != cudaSuccess) {
        allocation->stream_ordered ? cudaFreeAsync(data, stream) : cudaFree(data);
        check_cuda(status, "tensor_alloc: zeroing");
      }
    }

    auto* tensor = new DLManagedTensorVersioned{};
    tensor->version = {DLPACK_MAJOR_VERSION, DLPACK_MINOR_VERSION};
    tensor->deleter = &delete_allocation;
    tensor->flags = 0;
    tensor->dl_tensor.data = data;
    tensor->dl_tensor.device = args.device;
    tensor->dl_tensor.ndim = args.ndim;
    tensor->dl_tensor.dtype = args.dtype;
    tensor->dl_tensor.shape = allocation->shape.data();
    tensor->dl_tensor.strides = nullptr;
    tensor->dl_tensor.byte_offset = 0;
    tensor->manager_ctx = allocation.release();
    return tensor;
  }

  std::unique_ptr<ferrum::plugin::Stack> create_stack(const FmStackCreateArgs& args) override {
    return std::make_unique<CudaStack>(args);
  }

  void moe_align_block_size(const FmAlignArgs& args) override {
    constexpr const char* kOp = "moe_align_block_size";
    const DLTensor& topk_ids = *args.topk_ids;
    const int device = operation_device(topk_ids, kOp, "topk_ids");
    require_on_device(*args.sorted_token_ids, device, kOp, "sorted_token_ids");
    require_on_device(*args.expert_ids, device, kOp, "expert_ids");
    require_on_device(*args.num_tokens_post_padded, device, kOp, "num_tokens_post_padded");
    require_unit_last_stride(*args.sorted_token_ids, kOp, "sorted_token_ids");
    require_unit_last_stride(*args.expert_ids, kOp, "expert_ids");
    if (args.num_local_experts > kMaxAlignLocalExperts) {
      throw Error(FM_ERROR_UNSUPPORTED, std::string(kOp) + ": the CUDA backend supports up to " +
                                            std::to_string(kMaxAlignLocalExperts) +
                                            " local experts; got " +
                                            std::to_string(args.num_local_experts));
    }
    const int64_t sorted_len = args.sorted_token_ids->shape[0];
    if (sorted_len > std::numeric_limits<int32_t>::max() ||
        args.block_size > std::numeric_limits<int32_t>::max()) {
      throw Error(FM_ERROR_UNSUPPORTED, std::string(kOp) + ": " + std::to_string(sorted_len) +
                                            " padded positions exceed the int32 range of "
                                            "sorted_token_ids");
    }
    AlignParams params{};
    params.topk_ids = data_ptr<const void>(topk_ids);
    params.topk_ids_int64 = is_int64(topk_ids.dtype);
    params.topk_ids_stride0 = stride(topk_ids, 0);
    params.topk_ids_stride1 = stride(topk_ids, 1);
    params.num_tokens = topk_ids.shape[0];
    params.top_k = topk_ids.shape[1];
    params.num_experts = args.num_experts;
    if (args.expert_map != nullptr) {
      require_on_device(*args.expert_map, device, kOp, "expert_map");
      require_unit_last_stride(*args.expert_map, kOp, "expert_map");
      params.expert_map = data_ptr<const int32_t>(*args.expert_map);
    }
    params.num_local_experts = static_cast<int32_t>(args.num_local_experts);
    params.block_size = static_cast<int32_t>(args.block_size);
    params.sorted_token_ids = data_ptr<int32_t>(*args.sorted_token_ids);
    params.sorted_len = sorted_len;
    params.expert_ids = data_ptr<int32_t>(*args.expert_ids);
    params.expert_ids_len = args.expert_ids->shape[0];
    params.num_tokens_post_padded = data_ptr<int32_t>(*args.num_tokens_post_padded);

    DeviceGuard guard(device);
    check_cuda(launch_moe_align_block_size(params, as_stream(args.stream)),
               "moe_align_block_size kernel launch");
  }

  void gated_activation(const FmGatedActivationArgs& args) override {
    constexpr const char* kOp = "gated_activation";
    if (args.activation != FM_ACTIVATION_SILU) {
      throw Error(FM_ERROR_UNSUPPORTED, std::string(kOp) + ": activation " +
                                            std::to_string(args.activation) +
                                            " is not implemented by the CUDA backend");
    }
    const DLTensor& input = *args.input;
    const DLTensor& out = *args.out;
    const int device = operation_device(input, kOp, "input");
    require_on_device(out, device, kOp, "out");
    require_unit_last_stride(input, kOp, "input");
    require_unit_last_stride(out, kOp, "out");
    GatedActivationParams params{};
    params.input = data_ptr<const void>(input);
    params.input_row_stride = stride(input, 0);
    params.input_type = scalar_type(input.dtype, kOp, "input");
    params.out = data_ptr(out);
    params.out_row_stride = stride(out, 0);
    params.out_type = scalar_type(out.dtype, kOp, "out");
    params.rows = out.shape[0];
    params.n = out.shape[1];

    DeviceGuard guard(device);
    check_cuda(launch_gated_silu(params, as_stream(args.stream)), "gated_activation kernel launch");
  }

  void moe_sum(const FmMoeSumArgs& args) override {
    constexpr const char* kOp = "moe_sum";
    const DLTensor& input = *args.input;
    const DLTensor& topk_ids = *args.topk_ids;
    const DLTensor& out = *args.out;
    const int device = operation_device(input, kOp, "input");
    require_on_device(topk_ids, device, kOp, "topk_ids");
    require_on_device(out, device, kOp, "out");
    require_unit_last_stride(input, kOp, "input");
    require_unit_last_stride(out, kOp, "out");
    MoeSumParams params{};
    params.input = data_ptr<const void>(input);
    params.input_row_stride = stride(input, 0);
    params.input_type = scalar_type(input.dtype, kOp, "input");
    params.topk_ids = data_ptr<const void>(topk_ids);
    params.topk_ids_int64 = is_int64(topk_ids.dtype);
    params.topk_ids_stride0 = stride(topk_ids, 0);
    params.topk_ids_stride1 = stride(topk_ids, 1);
    params.num_experts = args.num_experts;
    if (args.expert_map != nullptr) {
      require_on_device(*args.expert_map, device, kOp, "expert_map");
      require_unit_last_stride(*args.expert_map, kOp, "expert_map");
      params.expert_map = data_ptr<const int32_t>(*args.expert_map);
    }
    params.out = data_ptr(out);
    params.out_row_stride = stride(out, 0);
    params.out_type = scalar_type(out.dtype, kOp, "out");
    params.num_tokens = out.shape[0];
    params.top_k = topk_ids.shape[1];
    params.hidden = out.shape[1];

    DeviceGuard guard(device);
    check_cuda(launch_moe_sum(params, as_stream(args.stream)), "moe_sum kernel launch");
  }

  // plugin.h: a result handed through DLPack to a consumer on another stream
  // (JAX's, or a caller's second stream) must not be read before the work
  // queued on its producing stream is done.
  void stream_order(DLDevice device, void* producer, void* consumer) override {
    if (producer == consumer) return;
    DeviceGuard guard(device.device_id);
    cudaEvent_t done = nullptr;
    check_cuda(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "stream_order: cudaEventCreate");
    cudaError_t status = cudaEventRecord(done, as_stream(producer));
    if (status == cudaSuccess) status = cudaStreamWaitEvent(as_stream(consumer), done, 0);
    cudaEventDestroy(done);  // released once the wait is satisfied
    check_cuda(status, "stream_order: ordering the consumer's stream after the producer's");
  }

 private:
  int device_count_ = 0;
  std::string description_;
};

}  // namespace
}  // namespace ferrum_moe_cuda

FM_DEFINE_BACKEND(ferrum_moe_cuda::CudaBackend, "cuda", FERRUM_MOE_CUDA_VERSION)
