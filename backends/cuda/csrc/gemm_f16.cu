// fp16 specialisations of the quantized GEMM.
#include <cuda_fp16.h>

#include "gemm/launch.cuh"

namespace ferrum_moe_cuda::gemm {

template cudaError_t configure_gemm_kernels_for<__half>(int, bool);
template cudaError_t gemm_ctas_per_sm_for<__half>(int, CtaTile, int*);
template cudaError_t launch_gemm_batched_for<__half>(const BatchedParams&, int, CtaTile, int, cudaStream_t);
template cudaError_t launch_gemm_device_dispatch_for<__half>(const DeviceDispatchParams&, int, CtaTile, int,
                                                              cudaStream_t);
template cudaError_t launch_gemm_routed_for<__half>(const RoutedParams&, int, CtaTile, int, cudaStream_t);
template cudaError_t launch_gemm_gemv_for<__half>(const RoutedParams&, int, GemvForm, int64_t, int, cudaStream_t);
template cudaError_t launch_gemm_gemv_for<__half>(const BatchedParams&, int, int64_t, int, cudaStream_t);
template cudaError_t gemv_ctas_per_sm_for<__half>(int, bool, GemvForm, int64_t, int*);

}  // namespace ferrum_moe_cuda::gemm
