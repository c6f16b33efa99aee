// Programmatic dependent launch (compute capability 9.0+). The layer's kernels
// (align, GEMMs, activation, top-k sum) are launched so that each may be placed
// on the GPU while the kernel before it on the stream finishes, instead of
// after it has drained: the launch and the CTA set-up of the next kernel hide
// behind the last wave of the previous one. Each such kernel starts with
// dependent_grid_begin(), which waits for its predecessor's results before any
// of them is read, so the order of results on the stream is unchanged.
#ifndef FERRUM_MOE_CUDA_DEPENDENT_LAUNCH_CUH_
#define FERRUM_MOE_CUDA_DEPENDENT_LAUNCH_CUH_

#include <cuda_runtime.h>

#include <atomic>
#include <utility>

namespace ferrum_moe_cuda {

// The first statement of every kernel launched by launch_dependent. It lets
// the next kernel on the stream launch (the runtime places its CTAs once every
// CTA of this grid has started and as they leave), then waits until the grid
// before this one has completed and its memory operations are visible. On
// devices before sm_90, and in launches without the attribute, both are no-ops.
//
// release_next = false leaves the next kernel to launch as this grid's CTAs
// leave. A grid of more CTAs than SMs should pass false: released at once, the
// next kernel's CTAs are placed while this grid's later waves still hold the
// SMs, and a stream-K GEMM placed so ran 30% slower (H200, 2026-12-04: the
// 2-D activation before Mixtral's w2 at M = 64, 132 -> 174 us; kernel notes,
// "v35").
__device__ __forceinline__ void dependent_grid_begin(bool release_next = true) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (release_next) asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// The release half of dependent_grid_begin alone, for a kernel with work to
// issue before its wait (the pair-routed GEMMs' L2 prefetch): the next kernel
// may launch while it does. dependent_grid_begin follows it (releasing twice
// is harmless).
__device__ __forceinline__ void dependent_grid_release() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

namespace {

constexpr int kMaxCachedDevices = 64;

// query(device) for the current device, asked once per device and kept in
// `known` (0: not asked yet); 0 where the device is unknown or the query
// fails (answers 0), which is asked again next time.
template <class Query>
int once_per_device(std::atomic<int> (&known)[kMaxCachedDevices], Query&& query) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxCachedDevices) return 0;
  int value = known[device].load(std::memory_order_relaxed);
  if (value == 0) {
    value = query(device);
    known[device].store(value, std::memory_order_relaxed);
  }
  return value;
}

// Compiled with the same flags as the kernels of the translation unit that
// includes this header: the code the runtime loaded for it tells whether
// those kernels hold the griddepcontrol instructions.
__global__ void dependent_launch_probe() {}

// Whether this translation unit's kernels may be launched with the attribute:
// the device has it (compute capability 9.0+) and the loaded code was
// compiled for it (PTX 9.0+: a build whose sm_90 code is JIT-compiled from
// older PTX has no griddepcontrol.wait, and its kernels must wait for their
// predecessor the plain way). Asked once per device.
bool dependent_launch_supported() {
  static std::atomic<int> known[kMaxCachedDevices] = {};  // 0 unknown, 1 no, 2 yes
  return once_per_device(known, [](int device) {
           int major = 0;
           cudaFuncAttributes probe{};
           if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
               cudaFuncGetAttributes(&probe, dependent_launch_probe) != cudaSuccess) {
             return 0;
           }
           return major >= 9 && probe.ptxVersion >= 90 ? 2 : 1;
         }) == 2;
}

}  // namespace

// kernel<<<grid, block, smem, stream>>>(args...) with programmatic stream
// serialization allowed where the device has it. The kernel must begin with
// dependent_grid_begin().
template <class... Params, class... Args>
cudaError_t launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                             cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = dependent_launch_supported() ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace ferrum_moe_cuda

#endif  // FERRUM_MOE_CUDA_DEPENDENT_LAUNCH_CUH_
