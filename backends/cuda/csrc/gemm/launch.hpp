// Per-activation-type GEMM launchers, explicitly instantiated in gemm_f16.cu
// and gemm_bf16.cu (one translation unit per type so the two build in
// parallel); dispatch.cu picks one from the ComputeType.
#ifndef FERRUM_MOE_CUDA_GEMM_LAUNCH_HPP_
#define FERRUM_MOE_CUDA_GEMM_LAUNCH_HPP_

#include <cuda_runtime.h>

#include "gemm/params.hpp"

namespace ferrum_moe_cuda::gemm {

template <class T>
cudaError_t configure_gemm_kernels_for(int bits, bool wgmma_tiles);
template <class T>
cudaError_t gemm_ctas_per_sm_for(int bits, CtaTile tile, int* ctas);
template <class T>
cudaError_t launch_gemm_batched_for(const BatchedParams& params, int bits, CtaTile tile, int ctas,
                                    cudaStream_t stream);
template <class T>
cudaError_t launch_gemm_device_dispatch_for(const DeviceDispatchParams& params, int bits, CtaTile tile, int ctas,
                                            cudaStream_t stream);
template <class T>
cudaError_t launch_gemm_routed_for(const RoutedParams& params, int bits, CtaTile tile, int ctas,
                                   cudaStream_t stream);
template <class T>
cudaError_t launch_gemm_gemv_for(const RoutedParams& params, int bits, GemvForm form, int64_t quant_bytes, int ctas,
                                 cudaStream_t stream);
template <class T>
cudaError_t launch_gemm_gemv_for(const BatchedParams& params, int bits, int64_t quant_bytes, int ctas,
                                 cudaStream_t stream);
template <class T>
cudaError_t gemv_ctas_per_sm_for(int bits, bool gated, GemvForm form, int64_t quant_bytes, int* ctas);

}  // namespace ferrum_moe_cuda::gemm

#endif  // FERRUM_MOE_CUDA_GEMM_LAUNCH_HPP_
