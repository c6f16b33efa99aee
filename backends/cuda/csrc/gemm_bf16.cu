// bf16 specialisations of the quantized GEMM.
#include <cuda_bf16.h>

#include "gemm/launch.cuh"

namespace ferrum_moe_cuda::gemm {

template cudaError_t configure_gemm_kernels_for<__nv_bfloat16>(int, bool);
template cudaError_t gemm_ctas_per_sm_for<__nv_bfloat16>(int, CtaTile, int*);
template cudaError_t launch_gemm_batched_for<__nv_bfloat16>(const BatchedParams&, int, CtaTile, int, cudaStream_t);
template cudaError_t launch_gemm_device_dispatch_for<__nv_bfloat16>(const DeviceDispatchParams&, int, CtaTile, int,
                                                              cudaStream_t);
template cudaError_t launch_gemm_routed_for<__nv_bfloat16>(const RoutedParams&, int, CtaTile, int, cudaStream_t);
template cudaError_t launch_gemm_gemv_for<__nv_bfloat16>(const RoutedParams&, int, GemvForm, int64_t, int, cudaStream_t);
template cudaError_t launch_gemm_gemv_for<__nv_bfloat16>(const BatchedParams&, int, int64_t, int, cudaStream_t);
template cudaError_t gemv_ctas_per_sm_for<__nv_bfloat16>(int, bool, GemvForm, int64_t, int*);

}  // namespace ferrum_moe_cuda::gemm
