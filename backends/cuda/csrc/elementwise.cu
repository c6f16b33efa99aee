// Elementwise kernels: a 2-D grid, rows along y (a row-stride loop past
// 65535), each thread kVector consecutive columns along x (a grid-stride
// loop), so no thread divides an index; float32 math. kVector is 16 bytes of
// the wider type where every row start is that aligned and the row length a
// multiple of it (one vector load or store per operand), else 1.
#include "elementwise.hpp"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "activation.cuh"
#include "dependent_launch.cuh"
#include "routing.cuh"

namespace ferrum_moe_cuda {
namespace {

constexpr int kElementwiseThreads = 256;
// Caps the grid; the grid-stride loop covers larger outputs.
constexpr int64_t kElementwiseMaxBlocks = 65535;
// moe_sum has no local-expert bound: any non-negative expert_map entry is local.
constexpr int64_t kNoLocalExpertBound = INT64_MAX;

// kVector consecutive elements, loaded or stored as one access (`ptr`
// aligned to the whole pack: the launcher checks).
template <class T, int kVector>
struct alignas(sizeof(T) * kVector) Pack {
  T v[kVector];
};

template <class T>
__device__ __forceinline__ float to_float(T value) {
  if constexpr (std::is_same_v<T, float>) {
    return value;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(value);
  } else {
    return __bfloat162float(value);
  }
}

template <class T>
__device__ __forceinline__ T from_float(float value) {
  if constexpr (std::is_same_v<T, float>) {
    return value;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(value);
  } else {
    return __float2bfloat16_rn(value);
  }
}

template <int kVector, class T>
__device__ __forceinline__ void load_floats(const T* ptr, float (&values)[kVector]) {
  const Pack<T, kVector> pack = *reinterpret_cast<const Pack<T, kVector>*>(ptr);
#pragma unroll
  for (int i = 0; i < kVector; ++i) values[i] = to_float(pack.v[i]);
}

template <int kVector, class T>
__device__ __forceinline__ void store_floats(T* ptr, const float (&values)[kVector]) {
  Pack<T, kVector> pack;
#pragma unroll
  for (int i = 0; i < kVector; ++i) pack.v[i] = from_float<T>(values[i]);
  *reinterpret_cast<Pack<T, kVector>*>(ptr) = pack;
}

// Calls visit(row, column) for every kVector-wide column group of every row
// this thread owns (columns = the row length / kVector).
template <class Visit>
__device__ __forceinline__ void for_each_group(int64_t rows, int64_t columns, Visit&& visit) {
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    for (int64_t column = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; column < columns;
         column += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      visit(row, column);
    }
  }
}

template <class In, class Out, int kVector>
__global__ void __launch_bounds__(kElementwiseThreads)
    gated_silu_kernel(GatedActivationParams p, bool release_next) {
  dependent_grid_begin(release_next);
  const auto* input = static_cast<const In*>(p.input);
  auto* out = static_cast<Out*>(p.out);
  for_each_group(p.rows, p.n / kVector, [&](int64_t r, int64_t group) {
    const In* row = input + r * p.input_row_stride + group * kVector;
    float gate[kVector], up[kVector], result[kVector];
    load_floats(row, gate);
    load_floats(row + p.n, up);
#pragma unroll
    for (int i = 0; i < kVector; ++i) result[i] = silu_times(gate[i], up[i]);
    store_floats(out + r * p.out_row_stride + group * kVector, result);
  });
}

template <class In, class Out, class Index, int kVector>
__global__ void __launch_bounds__(kElementwiseThreads) moe_sum_kernel(MoeSumParams p, bool release_next) {
  dependent_grid_begin(release_next);
  const auto* input = static_cast<const In*>(p.input);
  const auto* topk_ids = static_cast<const Index*>(p.topk_ids);
  auto* out = static_cast<Out*>(p.out);
  for_each_group(p.num_tokens, p.hidden / kVector, [&](int64_t t, int64_t group) {
    float sum[kVector] = {};
    for (int64_t slot = 0; slot < p.top_k; ++slot) {
      // Pairs of invalid or non-local experts were never computed (their rows
      // may hold garbage): their values are read (the row is in the buffer)
      // but not added, so no row read waits for its pair's id.
      const bool valid = local_expert_of(topk_ids, p.topk_ids_stride0, p.topk_ids_stride1, t, slot,
                                         p.num_experts, p.expert_map, kNoLocalExpertBound) >= 0;
      float values[kVector];
      load_floats(input + (t * p.top_k + slot) * p.input_row_stride + group * kVector, values);
#pragma unroll
      for (int i = 0; i < kVector; ++i) sum[i] += valid ? values[i] : 0.0f;
    }
    store_floats(out + t * p.out_row_stride + group * kVector, sum);
  });
}

// Calls body(T{}) with the C++ type of `type` (a null pointer of it).
template <class Body>
cudaError_t with_scalar_type(ScalarType type, Body&& body) {
  switch (type) {
    case ScalarType::kFloat16: return body(static_cast<__half*>(nullptr));
    case ScalarType::kBFloat16: return body(static_cast<__nv_bfloat16*>(nullptr));
    case ScalarType::kFloat32: return body(static_cast<float*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

// 16 bytes of the wider of the two element types.
template <class In, class Out>
constexpr int kWideVector = 16 / static_cast<int>(sizeof(In) > sizeof(Out) ? sizeof(In) : sizeof(Out));

// Whether every row of both operands starts on a pack of `vector` elements
// and holds whole packs: `length` (the row length, and the offset of the
// gated input's second half) and the row strides multiples of it, the bases
// aligned to the pack.
template <class In, class Out>
bool packs_fit(int vector, const void* input, int64_t input_row_stride, const void* out, int64_t out_row_stride,
               int64_t length) {
  const auto aligned = [](const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; };
  return length % vector == 0 && input_row_stride % vector == 0 && out_row_stride % vector == 0 &&
         aligned(input, vector * sizeof(In)) && aligned(out, vector * sizeof(Out));
}

// Column groups along x (at most kElementwiseMaxBlocks CTAs: the kernels loop
// past them), rows along y (at most 65535: the kernels loop past them).
dim3 grid_for(int64_t rows, int64_t groups) {
  const int64_t x = std::clamp<int64_t>((groups + kElementwiseThreads - 1) / kElementwiseThreads, 1,
                                        kElementwiseMaxBlocks);
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(std::clamp<int64_t>(rows, 1, 65535)));
}

// The SM count of the current device, asked once per device (0 if unknown).
int multiprocessor_count() {
  static std::atomic<int> known[kMaxCachedDevices] = {};
  return once_per_device(known, [](int device) {
    int count = 0;
    return cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) == cudaSuccess ? count : 0;
  });
}

// Launches kernel<kWideVector> when the operands' rows are whole aligned
// packs, else kernel<1>; the next kernel is released at once only when the
// grid fits one CTA per SM (dependent_launch.cuh).
template <class In, class Out, class Params, class Kernel>
cudaError_t launch_packed(Kernel&& kernel_of, const Params& params, const void* input, int64_t input_row_stride,
                          const void* out, int64_t out_row_stride, int64_t rows, int64_t length,
                          cudaStream_t stream) {
  constexpr int kWide = kWideVector<In, Out>;
  const bool wide = packs_fit<In, Out>(kWide, input, input_row_stride, out, out_row_stride, length);
  const dim3 grid = grid_for(rows, wide ? length / kWide : length);
  const bool release_next = int64_t{grid.x} * grid.y <= multiprocessor_count();
  return wide ? launch_dependent(kernel_of(std::integral_constant<int, kWide>{}), grid, kElementwiseThreads, 0,
                                 stream, params, release_next)
              : launch_dependent(kernel_of(std::integral_constant<int, 1>{}), grid, kElementwiseThreads, 0, stream,
                                 params, release_next);
}

}  // namespace

cudaError_t launch_gated_silu(const GatedActivationParams& params, cudaStream_t stream) {
  if (params.rows * params.n == 0) return cudaSuccess;
  return with_scalar_type(params.input_type, [&](auto* in_tag) {
    return with_scalar_type(params.out_type, [&](auto* out_tag) {
      using In = std::remove_pointer_t<decltype(in_tag)>;
      using Out = std::remove_pointer_t<decltype(out_tag)>;
      return launch_packed<In, Out>([](auto vector) { return gated_silu_kernel<In, Out, decltype(vector)::value>; },
                                    params, params.input, params.input_row_stride, params.out,
                                    params.out_row_stride, params.rows, params.n, stream);
    });
  });
}

cudaError_t launch_moe_sum(const MoeSumParams& params, cudaStream_t stream) {
  if (params.num_tokens * params.hidden == 0) return cudaSuccess;
  return with_scalar_type(params.input_type, [&](auto* in_tag) {
    return with_scalar_type(params.out_type, [&](auto* out_tag) {
      using In = std::remove_pointer_t<decltype(in_tag)>;
      using Out = std::remove_pointer_t<decltype(out_tag)>;
      const auto launch = [&](auto* index_tag) {
        using Index = std::remove_pointer_t<decltype(index_tag)>;
        return launch_packed<In, Out>(
            [](auto vector) { return moe_sum_kernel<In, Out, Index, decltype(vector)::value>; }, params,
            params.input, params.input_row_stride, params.out, params.out_row_stride, params.num_tokens,
            params.hidden, stream);
      };
      return params.topk_ids_int64 ? launch(static_cast<int64_t*>(nullptr)) : launch(static_cast<int32_t*>(nullptr));
    });
  });
}

}  // namespace ferrum_moe_cuda
