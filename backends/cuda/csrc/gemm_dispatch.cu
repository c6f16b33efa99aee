// ComputeType -> the per-type launchers of gemm_f16.cu / gemm_bf16.cu, and the
// act-order gathers (both types alike: 2-byte elements).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dependent_launch.cuh"
#include "gemm/gather.cuh"
#include "gemm/launch.hpp"
#include "gemm/params.hpp"
#include "gemm/wgmma.cuh"

namespace ferrum_moe_cuda::gemm {

namespace {
__global__ void wgmma_probe_kernel(int* built) { *built = kHasWgmma ? 1 : 0; }
}  // namespace

cudaError_t wgmma_tiles_built(bool* built) {
  *built = false;
  int* flag = nullptr;
  cudaError_t status = cudaMalloc(&flag, sizeof(int));
  if (status != cudaSuccess) return status;
  int value = 0;
  wgmma_probe_kernel<<<1, 1>>>(flag);
  status = cudaGetLastError();
  if (status == cudaSuccess) status = cudaMemcpy(&value, flag, sizeof(int), cudaMemcpyDeviceToHost);
  cudaFree(flag);
  *built = value == 1;
  return status;
}

cudaError_t configure_gemm_kernels(ComputeType type, int bits, bool wgmma_tiles) {
  return type == ComputeType::kFloat16 ? configure_gemm_kernels_for<__half>(bits, wgmma_tiles)
                                       : configure_gemm_kernels_for<__nv_bfloat16>(bits, wgmma_tiles);
}

cudaError_t gemm_ctas_per_sm(ComputeType type, int bits, CtaTile tile, int* ctas) {
  return type == ComputeType::kFloat16 ? gemm_ctas_per_sm_for<__half>(bits, tile, ctas)
                                       : gemm_ctas_per_sm_for<__nv_bfloat16>(bits, tile, ctas);
}

cudaError_t launch_gemm_batched(const BatchedParams& params, ComputeType type, int bits, CtaTile tile,
                                int ctas, cudaStream_t stream) {
  return type == ComputeType::kFloat16
             ? launch_gemm_batched_for<__half>(params, bits, tile, ctas, stream)
             : launch_gemm_batched_for<__nv_bfloat16>(params, bits, tile, ctas, stream);
}

cudaError_t launch_gemm_device_dispatch(const DeviceDispatchParams& params, ComputeType type, int bits,
                                        CtaTile tile, int ctas, cudaStream_t stream) {
  return type == ComputeType::kFloat16
             ? launch_gemm_device_dispatch_for<__half>(params, bits, tile, ctas, stream)
             : launch_gemm_device_dispatch_for<__nv_bfloat16>(params, bits, tile, ctas, stream);
}

cudaError_t launch_gemm_routed(const RoutedParams& params, ComputeType type, int bits, CtaTile tile, int ctas,
                               cudaStream_t stream) {
  return type == ComputeType::kFloat16
             ? launch_gemm_routed_for<__half>(params, bits, tile, ctas, stream)
             : launch_gemm_routed_for<__nv_bfloat16>(params, bits, tile, ctas, stream);
}

cudaError_t launch_gemm_gemv(const RoutedParams& params, ComputeType type, int bits, GemvForm form, int64_t quant_bytes,
                             int ctas, cudaStream_t stream) {
  return type == ComputeType::kFloat16
             ? launch_gemm_gemv_for<__half>(params, bits, form, quant_bytes, ctas, stream)
             : launch_gemm_gemv_for<__nv_bfloat16>(params, bits, form, quant_bytes, ctas, stream);
}

cudaError_t launch_gemm_gemv(const BatchedParams& params, ComputeType type, int bits, int64_t quant_bytes, int ctas,
                             cudaStream_t stream) {
  return type == ComputeType::kFloat16 ? launch_gemm_gemv_for<__half>(params, bits, quant_bytes, ctas, stream)
                                       : launch_gemm_gemv_for<__nv_bfloat16>(params, bits, quant_bytes, ctas, stream);
}

cudaError_t gemv_ctas_per_sm(ComputeType type, int bits, bool gated, GemvForm form, int64_t quant_bytes, int* ctas) {
  return type == ComputeType::kFloat16 ? gemv_ctas_per_sm_for<__half>(bits, gated, form, quant_bytes, ctas)
                                       : gemv_ctas_per_sm_for<__nv_bfloat16>(bits, gated, form, quant_bytes, ctas);
}

cudaError_t launch_gather_routed(const RoutedParams& params, int64_t positions, void* x_sorted, int64_t row_stride,
                                 cudaStream_t stream) {
  if (positions == 0) return cudaSuccess;
  return launch_dependent(gather_routed_kernel, dim3(static_cast<unsigned>(positions)), kGatherThreads, 0, stream,
                          params, static_cast<uint16_t*>(x_sorted), row_stride);
}

cudaError_t launch_gather_rows(const int32_t* perm, int k, const void* x, int64_t x_rows, int64_t x_row_stride,
                               void* x_sorted, int64_t row_stride, cudaStream_t stream) {
  if (x_rows == 0) return cudaSuccess;
  return launch_dependent(gather_rows_kernel, dim3(static_cast<unsigned>(x_rows)), kGatherThreads, 0, stream, perm,
                          k, static_cast<const uint16_t*>(x), x_row_stride, static_cast<uint16_t*>(x_sorted),
                          row_stride);
}

}  // namespace ferrum_moe_cuda::gemm
