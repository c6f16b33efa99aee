// Header-only helpers for writing a ferrum-moe backend in C++.
//
// Implement ferrum::plugin::Backend and ferrum::plugin::Stack, then export the
// C table in one line:
//
//     FM_DEFINE_BACKEND(MyBackend, "mybackend", "0.1.0")
//
// which defines `fm_backend_get_api()`. Exceptions thrown by the
// implementation are caught at the boundary and turned into FmError objects:
// throw ferrum::plugin::Error(FM_ERROR_INVALID_ARGUMENT, "...") to choose the
// code; any other std::exception becomes FM_ERROR_INTERNAL.
#ifndef FERRUM_MOE_PLUGIN_HPP_
#define FERRUM_MOE_PLUGIN_HPP_

#include <exception>
#include <memory>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#include "ferrum_moe/plugin.h"

namespace ferrum::plugin {

class Error : public std::exception {
 public:
  Error(FmErrorCode code, std::string message) : code_(code), message_(std::move(message)) {}
  FmErrorCode code() const noexcept { return code_; }
  const char* what() const noexcept override { return message_.c_str(); }

 private:
  FmErrorCode code_;
  std::string message_;
};

struct BackendInfo {
  std::string description;
  std::vector<int32_t> device_types;
  int32_t device_count = 0;
};

class Stack {
 public:
  virtual ~Stack() = default;
  virtual FmStackProperties properties() const = 0;
  virtual void gemm_batched(const FmGemmBatchedArgs& args) = 0;
  virtual void gemm_routed(const FmGemmRoutedArgs& args) = 0;
  // The gated epilogue (plugin.h, ABI 1.3), asked when args.gated_out is set:
  // answers true once it has written gated_out, or false having queued
  // nothing, and gemm_routed then runs (when args.out is given) and the host
  // applies the activation. A stack without its own gated epilogue keeps this.
  virtual bool gemm_routed_gated(const FmGemmRoutedArgs& /*args*/) { return false; }
  virtual void zero_workspace(void* stream) = 0;
};

class Backend {
 public:
  // `services` outlives the backend.
  explicit Backend(const FmHostServices* services) : services_(services) {}
  virtual ~Backend() = default;

  virtual BackendInfo info() = 0;
  virtual DLManagedTensorVersioned* tensor_alloc(const FmTensorAllocArgs& args) = 0;
  virtual std::unique_ptr<Stack> create_stack(const FmStackCreateArgs& args) = 0;
  virtual void moe_align_block_size(const FmAlignArgs& args) = 0;
  virtual void gated_activation(const FmGatedActivationArgs& args) = 0;
  virtual void moe_sum(const FmMoeSumArgs& args) = 0;
  // The whole layer in one call (plugin.h, ABI 1.4): answers true once it has
  // queued the layer, or false having queued nothing (the host then runs the
  // steps); stack_of(args.w13) is the w13 stack. A backend that declares none
  // offers none (its table's entry is NULL: make_api).
  virtual bool moe_layer(const FmMoeLayerArgs& /*args*/) { return false; }
  // Backends whose work is synchronous (the CPU) have nothing to order.
  virtual void stream_order(DLDevice /*device*/, void* /*producer*/, void* /*consumer*/) {}

  const FmHostServices* services() const { return services_; }

 private:
  const FmHostServices* services_;
};

// Elements between consecutive rows of a rank-2 tensor (NULL strides: compact).
inline int64_t row_stride(const DLTensor& t) {
  return t.strides != nullptr ? t.strides[0] : t.shape[1];
}

// First byte of a tensor's data.
inline void* data_start(const DLTensor& t) {
  return static_cast<char*>(t.data) + t.byte_offset;
}

// The Stack behind a handle the host passes (a backend's own stacks only).
inline Stack& stack_of(FmStack* handle) { return *reinterpret_cast<Stack*>(handle); }

namespace detail {

// The services of the one initialised backend of this plugin, used to build
// errors in thunks that have no backend pointer at hand (stack calls).
inline const FmHostServices*& current_services() {
  static const FmHostServices* services = nullptr;
  return services;
}

template <class F>
FmError* guarded(F&& body) noexcept {
  const FmHostServices* services = current_services();
  try {
    body();
    return nullptr;
  } catch (const Error& e) {
    return services->error_new(e.code(), e.what());
  } catch (const std::bad_alloc&) {
    return services->error_new(FM_ERROR_OUT_OF_MEMORY, "out of memory");
  } catch (const std::exception& e) {
    return services->error_new(FM_ERROR_INTERNAL, e.what());
  } catch (...) {
    return services->error_new(FM_ERROR_INTERNAL, "unknown C++ exception in backend");
  }
}

// Owns what get_info's pointers refer to.
struct BackendBox {
  std::unique_ptr<Backend> backend;
  BackendInfo info;
};

inline BackendBox* box(FmBackend* b) { return reinterpret_cast<BackendBox*>(b); }

template <class B>
struct Thunks {
  static FmError* initialize(FmInitArgs* args) {
    if (args == nullptr || args->services == nullptr) return nullptr;  // cannot report without services
    current_services() = args->services;
    return guarded([&] {
      auto b = std::make_unique<BackendBox>();
      b->backend = std::make_unique<B>(args->services);
      args->backend = reinterpret_cast<FmBackend*>(b.release());
    });
  }
  static void destroy(FmBackend* b) { delete box(b); }
  static FmError* get_info(FmBackend* b, FmBackendInfo* info) {
    return guarded([&] {
      BackendBox* bx = box(b);
      bx->info = bx->backend->info();
      info->description = bx->info.description.c_str();
      info->device_types = bx->info.device_types.data();
      info->num_device_types = static_cast<int32_t>(bx->info.device_types.size());
      info->device_count = bx->info.device_count;
    });
  }
  static FmError* tensor_alloc(FmTensorAllocArgs* a) {
    return guarded([&] { a->result = box(a->backend)->backend->tensor_alloc(*a); });
  }
  static FmError* stack_create(FmStackCreateArgs* a) {
    return guarded([&] {
      a->stack = reinterpret_cast<FmStack*>(box(a->backend)->backend->create_stack(*a).release());
    });
  }
  static void stack_destroy(FmStack* s) { delete &stack_of(s); }
  static FmError* stack_get_properties(FmStack* s, FmStackProperties* p) {
    return guarded([&] {
      size_t size = p->struct_size;
      *p = stack_of(s).properties();
      p->struct_size = size;
    });
  }
  static FmError* stack_gemm_batched(FmGemmBatchedArgs* a) {
    return guarded([&] { stack_of(a->stack).gemm_batched(*a); });
  }
  static FmError* stack_gemm_routed(FmGemmRoutedArgs* a) {
    return guarded([&] {
      const bool gated = FM_STRUCT_HAS(a, gated_written) && a->gated_out != nullptr;
      const bool written = gated && stack_of(a->stack).gemm_routed_gated(*a);
      if (gated) a->gated_written = written ? 1 : 0;
      if (!written && a->out != nullptr) stack_of(a->stack).gemm_routed(*a);
    });
  }
  static FmError* stack_zero_workspace(FmStack* s, void* stream) {
    return guarded([&] { stack_of(s).zero_workspace(stream); });
  }
  static FmError* moe_align_block_size(FmAlignArgs* a) {
    return guarded([&] { box(a->backend)->backend->moe_align_block_size(*a); });
  }
  static FmError* gated_activation(FmGatedActivationArgs* a) {
    return guarded([&] { box(a->backend)->backend->gated_activation(*a); });
  }
  static FmError* moe_sum(FmMoeSumArgs* a) {
    return guarded([&] { box(a->backend)->backend->moe_sum(*a); });
  }
  static FmError* stream_order(FmBackend* b, DLDevice device, void* producer, void* consumer) {
    return guarded([&] { box(b)->backend->stream_order(device, producer, consumer); });
  }
  static FmError* moe_layer(FmMoeLayerArgs* a) {
    return guarded([&] { a->written = box(a->backend)->backend->moe_layer(*a) ? 1 : 0; });
  }
};

}  // namespace detail

// Whether B declares its own moe_layer (the table then offers it; otherwise
// its entry is NULL and the host never builds the call).
template <class B>
constexpr bool declares_moe_layer =
    !std::is_same_v<decltype(&B::moe_layer), bool (Backend::*)(const FmMoeLayerArgs&)>;

template <class B>
const FmBackendApi* make_api(const char* name, const char* version) {
  using T = detail::Thunks<B>;
  static const FmBackendApi api = {
      sizeof(FmBackendApi), FM_ABI_MAJOR, FM_ABI_MINOR, name, version,
      &T::initialize, &T::destroy, &T::get_info, &T::tensor_alloc,
      &T::stack_create, &T::stack_destroy, &T::stack_get_properties,
      &T::stack_gemm_batched, &T::stack_gemm_routed, &T::stack_zero_workspace,
      &T::moe_align_block_size, &T::gated_activation, &T::moe_sum, &T::stream_order,
      declares_moe_layer<B> ? &T::moe_layer : nullptr,
  };
  return &api;
}

}  // namespace ferrum::plugin

#define FM_DEFINE_BACKEND(BackendClass, name, version)                   \
  extern "C" FM_EXPORT const FmBackendApi* fm_backend_get_api(void) {    \
    return ::ferrum::plugin::make_api<BackendClass>(name, version);      \
  }

#endif  // FERRUM_MOE_PLUGIN_HPP_
