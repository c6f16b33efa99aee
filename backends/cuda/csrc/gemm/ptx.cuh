// The PTX the GEMM uses, one wrapper per instruction (sm_80+).
//
// Deliberately absent: createpolicy + cp.async...L2::cache_hint. nvcc 13.0's
// ptxas miscompiles that pair in one asm block (the policy register is
// dropped; the kernel traps with "illegal instruction"), see DESIGN.md 5.
#ifndef FERRUM_MOE_CUDA_GEMM_PTX_CUH_
#define FERRUM_MOE_CUDA_GEMM_PTX_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace ferrum_moe_cuda::gemm {

__device__ __forceinline__ uint32_t shared_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16-byte global -> shared copy that bypasses L1 (weights are read once per
// CTA). Only the first `src_bytes` (0..16) are read; the rest is zero-filled,
// which is how rows past the token count and columns past K become zeros.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most `kPending` committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i,
// and register i receives matrix i in the mma A-fragment order. The memory
// clobber keeps it on its side of the pipeline's barriers.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&frag)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(frag[0]), "=r"(frag[1]), "=r"(frag[2]), "=r"(frag[3])
               : "r"(address)
               : "memory");
}

// acc += A (16x16, row-major) * B (16x8, column-major), fp32 accumulation.
template <class T>
__device__ __forceinline__ void mma_16816(float (&acc)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&acc)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&acc)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Barrier kId (1-15; 0 is __syncthreads') over kThreads threads, whole warps;
// answers whether `vote` holds in some of them.
template <int kId, int kThreads>
__device__ __forceinline__ bool named_barrier_or(bool vote) {
  uint32_t any;
  asm volatile(
      "{\n .reg .pred vote, any;\n setp.ne.u32 vote, %1, 0;\n"
      " barrier.red.or.pred any, %2, %3, vote;\n selp.u32 %0, 1, 0, any;\n}\n"
      : "=r"(any)
      : "r"(static_cast<uint32_t>(vote)), "n"(kId), "n"(kThreads)
      : "memory");
  return any != 0;
}

// Barrier `id` (1-15) over `threads` threads, whole warps.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// red.add with release semantics at GPU scope (no value back: nothing to wait for).
__device__ __forceinline__ void atomic_add_release(int32_t* counter, int value) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" ::"l"(counter), "r"(value) : "memory");
}

// Four floats added to global memory at once, relaxed, GPU scope (sm_90's
// vector red.add, PTX ISA 8.1: CUDA 12.1; four scalar ones elsewhere).
// `address`: 16-byte aligned.
__device__ __forceinline__ void red_add_f32x4(float* address, float4 value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && \
    (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 1))
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(address), "f"(value.x), "f"(value.y),
               "f"(value.z), "f"(value.w)
               : "memory");
#else
  atomicAdd(address, value.x);
  atomicAdd(address + 1, value.y);
  atomicAdd(address + 2, value.z);
  atomicAdd(address + 3, value.w);
#endif
}

// 16-byte global load of read-only data that is read once (the decode
// GEMV's weights): through the non-coherent path, not kept in L1.
__device__ __forceinline__ uint4 load_streaming_16(const void* address) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(address));
  return v;
}

// A hint that the 128-byte line at `address` be brought into L2 (no value,
// no wait, no fault on the hint's own account).
__device__ __forceinline__ void prefetch_l2(const void* address) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(address));
}

// ld with acquire semantics at GPU scope.
__device__ __forceinline__ int load_acquire(const int32_t* address) {
  int value;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(value) : "l"(address) : "memory");
  return value;
}

}  // namespace ferrum_moe_cuda::gemm

#endif  // FERRUM_MOE_CUDA_GEMM_PTX_CUH_
