// The gated activation's product, shared by the activation kernel
// (elementwise.cu) and the GEMMs' gated epilogues (gemm/epilogue.cuh,
// gemm/gemv.cuh), so the layer's steps and its fused paths round alike.
#ifndef FERRUM_MOE_CUDA_ACTIVATION_CUH_
#define FERRUM_MOE_CUDA_ACTIVATION_CUH_

namespace ferrum_moe_cuda {

// silu(gate) * up, silu(g) = g * sigmoid(g). For very negative g, expf
// overflows to inf and the quotient is (-)0, the correct limit. __fdividef
// (2 ulp; its divisor here is 1 or more) has no slow path to branch to, so a
// thread's quotients overlap.
__device__ __forceinline__ float silu_times(float gate, float up) { return __fdividef(gate, 1.0f + expf(-gate)) * up; }

}  // namespace ferrum_moe_cuda

#endif  // FERRUM_MOE_CUDA_ACTIVATION_CUH_
