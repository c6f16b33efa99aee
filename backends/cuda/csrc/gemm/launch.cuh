// Definitions of the launchers declared in launch.hpp: pick the (bits, rows
// per CTA) specialisation and launch it. Return the launch status, never throw.
#ifndef FERRUM_MOE_CUDA_GEMM_LAUNCH_CUH_
#define FERRUM_MOE_CUDA_GEMM_LAUNCH_CUH_

#include <cuda_runtime.h>

#include <utility>

#include "dependent_launch.cuh"
#include "gemm/gemv.cuh"
#include "gemm/kernel.cuh"
#include "gemm/launch.hpp"
#include "gemm/traits.cuh"

namespace ferrum_moe_cuda::gemm {

// Whether a launch of `tile` under `schedule` takes the kernels with the
// stream-K meeting compiled in (kernel.cuh, kSplitsK): the mma.sync tiles
// always (their schedule decides at run time, at no cost); the wgmma tiles
// only where the schedule has slots to share tiles in. In the others the
// meeting's registers doubled their spills and cost prefill 5-14% (kernel
// notes, v45).
inline bool splits_k(CtaTile tile, const StreamK& schedule) { return !tile.wgmma || schedule.partials != nullptr; }

// Calls body(std::integral_constant<int, kBits>) for 4 or 8 bits.
template <class Body>
cudaError_t with_bits(int bits, Body&& body) {
  if (bits == 4) return body(std::integral_constant<int, 4>{});
  if (bits == 8) return body(std::integral_constant<int, 8>{});
  return cudaErrorInvalidValue;
}

// Calls body(std::integral_constant<int, kBits>, std::integral_constant<int, kRows>,
// std::bool_constant<kSplitsK>, std::bool_constant<kWgmma>).
template <class Body>
cudaError_t with_specialisation(int bits, CtaTile tile, bool splits, Body&& body) {
  auto with_rows = [&](auto b) {
    using Yes = std::true_type;
    using No = std::false_type;
    auto wgmma = [&](auto m) {
      if (splits) return body(b, m, Yes{}, Yes{});
      return body(b, m, No{}, Yes{});
    };
    if (tile.rows == kWgmmaRowsPerCta && tile.wgmma) return wgmma(std::integral_constant<int, kWgmmaRowsPerCta>{});
    if (tile.rows == kLargeRowsPerCta && tile.wgmma) return wgmma(std::integral_constant<int, kLargeRowsPerCta>{});
    if (tile.rows == kMediumRowsPerCta && tile.wgmma) return wgmma(std::integral_constant<int, kMediumRowsPerCta>{});
    if (tile.wgmma) return cudaErrorInvalidValue;
    if (tile.rows == kLargeRowsPerCta) return body(b, std::integral_constant<int, kLargeRowsPerCta>{}, Yes{}, No{});
    if (tile.rows == kMediumRowsPerCta) return body(b, std::integral_constant<int, kMediumRowsPerCta>{}, Yes{}, No{});
    if (tile.rows == kSmallRowsPerCta) return body(b, std::integral_constant<int, kSmallRowsPerCta>{}, Yes{}, No{});
    if (tile.rows == kTinyRowsPerCta) return body(b, std::integral_constant<int, kTinyRowsPerCta>{}, Yes{}, No{});
    return cudaErrorInvalidValue;
  };
  return with_bits(bits, with_rows);
}

// Calls body(gemv_kernel<T, kBits, kStreams, kRows, kPermutedX, RoutedParams>)
// for the decode GEMV's specialisation over routing (gemv.cuh: pairs or
// blocks); permuted (act-order x read through the expert's perm) is a
// one-row form only.
template <class T, class Body>
cudaError_t with_gemv(int bits, bool gated, GemvForm form, bool permuted, Body&& body) {
  if (form == GemvForm::kItems || (form == GemvForm::kBlocks && permuted)) return cudaErrorInvalidValue;
  const bool blocks = form == GemvForm::kBlocks;
  return with_bits(bits, [&](auto b) {
    constexpr int kBits = decltype(b)::value;
    if (gated) {
      if (blocks) return body(gemv_kernel<T, kBits, 2, kGemvBlockRows, false, RoutedParams>);
      return permuted ? body(gemv_kernel<T, kBits, 2, 1, true, RoutedParams>)
                      : body(gemv_kernel<T, kBits, 2, 1, false, RoutedParams>);
    }
    if (blocks) return body(gemv_kernel<T, kBits, 1, kGemvBlockRows, false, RoutedParams>);
    return permuted ? body(gemv_kernel<T, kBits, 1, 1, true, RoutedParams>)
                    : body(gemv_kernel<T, kBits, 1, 1, false, RoutedParams>);
  });
}

// The same over gemm_batched's work items (plain results, x in order).
template <class T, class Body>
cudaError_t with_gemv_items(int bits, Body&& body) {
  return with_bits(bits, [&](auto b) {
    return body(gemv_kernel<T, decltype(b)::value, 1, kGemvBlockRows, false, BatchedParams>);
  });
}

// Either, by form (for what any kernel takes: attributes, occupancy).
template <class T, class Body>
cudaError_t with_gemv_form(int bits, bool gated, GemvForm form, bool permuted, Body&& body) {
  if (form != GemvForm::kItems) return with_gemv<T>(bits, gated, form, permuted, body);
  return gated || permuted ? cudaErrorInvalidValue : with_gemv_items<T>(bits, body);
}

template <class T>
cudaError_t configure_gemm_kernels_for(int bits, bool wgmma_tiles) {
  cudaError_t status = cudaSuccess;
  for (GemvForm form : {GemvForm::kPairs, GemvForm::kBlocks, GemvForm::kItems})
    for (bool gated : {false, true})
      for (bool permuted : {false, true}) {
        if ((form != GemvForm::kPairs && permuted) || (form == GemvForm::kItems && gated)) continue;
        int64_t gemv_quant_bytes = 0;
        status = gemv_max_quant_bytes(form != GemvForm::kPairs, &gemv_quant_bytes);
        if (status != cudaSuccess) return status;
        status = with_gemv_form<T>(bits, gated, form, permuted, [&](auto kernel) {
          return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(gemv_quant_bytes));
        });
        if (status != cudaSuccess) return status;
      }
  for (CtaTile tile : kCtaTiles) {
    // The 128-row tiles' ~190 KB is more than a CTA may hold before Hopper
    // (A100: 163 KB): asking for it there fails. The wgmma tiles only run on
    // sm_90a.
    if (tile.wgmma && !wgmma_tiles) continue;
    for (bool splits : {true, false}) {  // the wgmma tiles' two copies (splits_k)
      if (!splits && !tile.wgmma) continue;
      status = with_specialisation(bits, tile, splits, [](auto b, auto m, auto k, auto g) {
        constexpr int kBits = decltype(b)::value;
        constexpr int kRows = decltype(m)::value;
        constexpr bool kSplitsK = decltype(k)::value;
        constexpr bool kWgmma = decltype(g)::value;
        constexpr int kSmem = GemmTraits<T, kBits, kRows, kWgmma>::kSmemBytes;
        cudaError_t s = cudaFuncSetAttribute(gemm_batched_kernel<T, kBits, kRows, kSplitsK, kWgmma>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
        if (s != cudaSuccess) return s;
        s = cudaFuncSetAttribute(gemm_device_dispatch_kernel<T, kBits, kRows, kSplitsK, kWgmma>,
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
        if (s != cudaSuccess) return s;
        return cudaFuncSetAttribute(gemm_routed_kernel<T, kBits, kRows, kSplitsK, kWgmma>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
      });
      if (status != cudaSuccess) return status;
    }
  }
  return status;
}

template <class T>
cudaError_t gemm_ctas_per_sm_for(int bits, CtaTile tile, int* ctas) {
  // (The stream-K wave: the kernels that split K.)
  return with_specialisation(bits, tile, true, [&](auto b, auto m, auto k, auto g) {
    constexpr int kBits = decltype(b)::value;
    constexpr int kRows = decltype(m)::value;
    constexpr bool kSplitsK = decltype(k)::value;
    constexpr bool kWgmma = decltype(g)::value;
    using Traits = GemmTraits<T, kBits, kRows, kWgmma>;
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(ctas, gemm_routed_kernel<T, kBits, kRows, kSplitsK, kWgmma>,
                                                         Traits::kCtaThreads, Traits::kSmemBytes);
  });
}

// The specialisation kernel_for(b, m, k, g) names (a kernel.cuh kernel for
// the launch's bits, rows per CTA, K split and MMA) as a dependent launch of
// `ctas` CTAs, which walk the schedule (params.hpp, StreamK).
template <class T, class Params, class KernelFor>
cudaError_t launch_specialised(KernelFor kernel_for, const Params& params, int bits, CtaTile tile, int ctas,
                               cudaStream_t stream) {
  const bool splits = splits_k(tile, params.schedule);
  return with_specialisation(bits, tile, splits, [&](auto b, auto m, auto k, auto g) {
    using Traits = GemmTraits<T, decltype(b)::value, decltype(m)::value, decltype(g)::value>;
    return launch_dependent(kernel_for(b, m, k, g), dim3(static_cast<unsigned>(ctas)), Traits::kCtaThreads,
                            Traits::kSmemBytes, stream, params);
  });
}

template <class T>
cudaError_t launch_gemm_batched_for(const BatchedParams& params, int bits, CtaTile tile, int ctas,
                                    cudaStream_t stream) {
  return launch_specialised<T>(
      [](auto b, auto m, auto k, auto g) {
        return gemm_batched_kernel<T, decltype(b)::value, decltype(m)::value, decltype(k)::value, decltype(g)::value>;
      },
      params, bits, tile, ctas, stream);
}

template <class T>
cudaError_t launch_gemm_device_dispatch_for(const DeviceDispatchParams& params, int bits, CtaTile tile, int ctas,
                                            cudaStream_t stream) {
  return launch_specialised<T>(
      [](auto b, auto m, auto k, auto g) {
        return gemm_device_dispatch_kernel<T, decltype(b)::value, decltype(m)::value, decltype(k)::value,
                                           decltype(g)::value>;
      },
      params, bits, tile, ctas, stream);
}

template <class T>
cudaError_t gemv_ctas_per_sm_for(int bits, bool gated, GemvForm form, int64_t quant_bytes, int* ctas) {
  // (The permuted form is the plain one's occupancy: ptxas gives both 2 CTAs
  // an SM, their launch bounds; kernel notes, v81.)
  return with_gemv_form<T>(bits, gated, form, false, [&](auto kernel) {
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(ctas, kernel, kGemvThreads, quant_bytes);
  });
}

template <class T>
cudaError_t launch_gemm_gemv_for(const RoutedParams& params, int bits, GemvForm form, int64_t quant_bytes, int ctas,
                                 cudaStream_t stream) {
  // Act-order x not copied first (CudaStack::gemm_routed_pairs): the
  // permuted form reads it through w.perm.
  return with_gemv<T>(bits, params.io.gate_up_tiles > 0, form, params.w.perm != nullptr, [&](auto kernel) {
    return launch_dependent(kernel, dim3(static_cast<unsigned>(ctas)), kGemvThreads, static_cast<size_t>(quant_bytes),
                            stream, params);
  });
}

template <class T>
cudaError_t launch_gemm_gemv_for(const BatchedParams& params, int bits, int64_t quant_bytes, int ctas,
                                 cudaStream_t stream) {
  return with_gemv_items<T>(bits, [&](auto kernel) {
    return launch_dependent(kernel, dim3(static_cast<unsigned>(ctas)), kGemvThreads, static_cast<size_t>(quant_bytes),
                            stream, params);
  });
}

template <class T>
cudaError_t launch_gemm_routed_for(const RoutedParams& params, int bits, CtaTile tile, int ctas,
                                   cudaStream_t stream) {
  return launch_specialised<T>(
      [](auto b, auto m, auto k, auto g) {
        return gemm_routed_kernel<T, decltype(b)::value, decltype(m)::value, decltype(k)::value, decltype(g)::value>;
      },
      params, bits, tile, ctas, stream);
}

}  // namespace ferrum_moe_cuda::gemm

#endif  // FERRUM_MOE_CUDA_GEMM_LAUNCH_CUH_
