// Hopper warpgroup MMA (wgmma, sm_90a), one wrapper per instruction, and the
// shared-memory matrix descriptor. Used by the 32-, 64- and 128-token tiles
// on Hopper: the weights are wgmma's A operand from registers (C^T = W^T X^T, 64
// weight columns per instruction, 16 per warp), the activation tile is its B
// operand in shared memory. Compiled to a trap on other architectures.
#ifndef FERRUM_MOE_CUDA_GEMM_WGMMA_CUH_
#define FERRUM_MOE_CUDA_GEMM_WGMMA_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace ferrum_moe_cuda::gemm {

// kHasWgmma: this compilation pass is sm_90a device code, which has the
// wgmma tiles (elsewhere they trap; the host asks the loaded code,
// gemm_dispatch.cu, before it picks them).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FERRUM_MOE_WGMMA 1
constexpr bool kHasWgmma = true;
#else
constexpr bool kHasWgmma = false;
#endif

// Descriptor of a K-major operand in shared memory with the 128-byte swizzle:
// rows of 64 16-bit elements (128 bytes), 16-byte chunks XOR-ed with row % 8
// (the A tile's layout, traits.cuh), 8-row groups 1024 bytes apart. The tile
// must start 1024-byte aligned; a k-step of 16 elements adds 32 bytes.
__device__ __forceinline__ uint64_t smem_descriptor_sw128(uint32_t smem_address) {
  constexpr uint64_t kStrideBytes = 1024;   // between 8-row core-matrix groups
  constexpr uint64_t kLeadingBytes = 16;    // ignored by swizzled K-major layouts
  constexpr uint64_t kSwizzle128B = 1;
  return (static_cast<uint64_t>((smem_address & 0x3FFFF) >> 4)) | ((kLeadingBytes >> 4) << 16) |
         ((kStrideBytes >> 4) << 32) | (kSwizzle128B << 62);
}

__device__ __forceinline__ void wgmma_fence() {
#ifdef FERRUM_MOE_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

// Orders generic-proxy writes to shared memory (cp.async, st.shared) before
// the async proxy's reads that wgmma makes of its shared operand: issued by
// the writers before the barrier that hands a tile over, or by the readers
// after the barrier that the writes' completion released.
__device__ __forceinline__ void fence_proxy_async_shared() {
#ifdef FERRUM_MOE_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Shared-memory barriers of the warp-specialised pipeline (sm_90).
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, int count) {
#ifdef FERRUM_MOE_WGMMA
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar))),
               "r"(count)
               : "memory");
#endif
}

__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
#ifdef FERRUM_MOE_WGMMA
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar)))
               : "memory");
#endif
}

// This thread's arrival on `bar`, made by the hardware once every cp.async
// the thread issued before has landed (.noinc: it is one of the arrivals the
// barrier was initialised to expect). The waiting threads fence the async
// proxy before wgmma reads the bytes.
__device__ __forceinline__ void mbarrier_arrive_on_copies(uint64_t* bar) {
#ifdef FERRUM_MOE_WGMMA
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(bar)))
               : "memory");
#endif
}

// Waits until the phase of parity `parity` has completed. The lanes of a warp
// may leave the polling loop in different rounds (nothing in the ISA keeps
// them together); the warp reconverges before what follows, wgmma and the
// walk's barriers, which need whole warps (synccheck's report at the
// consumers' walk barrier went away with this).
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
#ifdef FERRUM_MOE_WGMMA
  asm volatile(
      "{\n.reg .pred done;\nwait:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait;\n}\n" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar))),
      "r"(parity)
      : "memory");
  __syncwarp();
#endif
}

// Four 8x8 b16 matrices stored transposed: lanes 8i..8i+7 give the shared
// addresses of matrix i's stored rows, and register i holds matrix i in the
// mma C-fragment order (row lane / 4, columns 2 * (lane % 4) and the next),
// so element (r, c) lands in stored row c, column r.
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t address, const uint32_t (&regs)[4]) {
#ifdef FERRUM_MOE_WGMMA
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(address),
               "r"(regs[0]), "r"(regs[1]), "r"(regs[2]), "r"(regs[3])
               : "memory");
#endif
}

// Hands registers between warpgroups: every warp of a warpgroup runs it.
template <int kRegisters>
__device__ __forceinline__ void registers_decrease() {
#ifdef FERRUM_MOE_WGMMA
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
#endif
}
template <int kRegisters>
__device__ __forceinline__ void registers_increase() {
#ifdef FERRUM_MOE_WGMMA
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
#endif
}

__device__ __forceinline__ void wgmma_commit_group() {
#ifdef FERRUM_MOE_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

template <int kPending>
__device__ __forceinline__ void wgmma_wait_group() {
#ifdef FERRUM_MOE_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}

// acc (64 x kN fp32, the warpgroup's: kN / 2 a thread) += A (64 x 16,
// registers: this warp's 16 rows in the mma.m16n8k16 A-fragment layout) *
// B (16 x kN tokens, K-major in shared memory at `desc`); kN 128, 64 or 32.
template <class T, int kN>
__device__ __forceinline__ void wgmma_m64nNk16_rs(float (&acc)[kN / 2], const uint32_t (&a)[4], uint64_t desc) {
  static_assert(kN == 128 || kN == 64 || kN == 32, "the wgmma tiles' token counts");
#ifdef FERRUM_MOE_WGMMA
#define FM_ACC8(i) "+f"(acc[i]), "+f"(acc[i + 1]), "+f"(acc[i + 2]), "+f"(acc[i + 3]), \
                   "+f"(acc[i + 4]), "+f"(acc[i + 5]), "+f"(acc[i + 6]), "+f"(acc[i + 7])
#define FM_WGMMA_N128(TYPE)                                                                             \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                               \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "                  \
               "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"                                            \
               : FM_ACC8(0), FM_ACC8(8), FM_ACC8(16), FM_ACC8(24), FM_ACC8(32), FM_ACC8(40), FM_ACC8(48), \
                 FM_ACC8(56)                                                                             \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc))
#define FM_WGMMA_N64(TYPE)                                                                              \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                               \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, " \
               "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"                                            \
               : FM_ACC8(0), FM_ACC8(8), FM_ACC8(16), FM_ACC8(24)                                        \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc))
#define FM_WGMMA_N32(TYPE)                                                                              \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                               \
               "wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPE "." TYPE " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, " \
               "{%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"                                            \
               : FM_ACC8(0), FM_ACC8(8)                                                                  \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc))
  if constexpr (kN == 128) {
    if constexpr (std::is_same_v<T, __half>) {
      FM_WGMMA_N128("f16");
    } else {
      FM_WGMMA_N128("bf16");
    }
  } else if constexpr (kN == 64) {
    if constexpr (std::is_same_v<T, __half>) {
      FM_WGMMA_N64("f16");
    } else {
      FM_WGMMA_N64("bf16");
    }
  } else {
    if constexpr (std::is_same_v<T, __half>) {
      FM_WGMMA_N32("f16");
    } else {
      FM_WGMMA_N32("bf16");
    }
  }
#undef FM_WGMMA_N32
#undef FM_WGMMA_N64
#undef FM_WGMMA_N128
#undef FM_ACC8
#else
  (void)acc;
  (void)a;
  (void)desc;
  __trap();
#endif
}

}  // namespace ferrum_moe_cuda::gemm

#endif  // FERRUM_MOE_CUDA_GEMM_WGMMA_CUH_
