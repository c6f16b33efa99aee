// Host-side DLTensor helpers: element access math and the backend-specific
// checks the host cannot make for us (which device, which layout our kernels
// can read). Every failure names the call, the argument, what was expected and
// what was given.
#ifndef FERRUM_MOE_CUDA_TENSOR_CHECKS_HPP_
#define FERRUM_MOE_CUDA_TENSOR_CHECKS_HPP_

#include <cstdint>
#include <string>

#include "ferrum_moe/dlpack.h"
#include "ferrum_moe/plugin.hpp"

namespace ferrum_moe_cuda {

using ferrum::plugin::Error;

inline std::string dtype_name(DLDataType t) {
  std::string base;
  switch (t.code) {
    case kDLFloat: base = "float"; break;
    case kDLBfloat: base = "bfloat"; break;
    case kDLInt: base = "int"; break;
    case kDLUInt: base = "uint"; break;
    case kDLBool: return "bool";
    default: base = "dtype(code=" + std::to_string(t.code) + ")"; break;
  }
  std::string name = base + std::to_string(t.bits);
  if (t.lanes != 1) name += "x" + std::to_string(t.lanes);
  return name;
}

inline bool dtype_is(DLDataType t, DLDataTypeCode code, int bits) {
  return t.code == code && t.bits == bits && t.lanes == 1;
}
inline bool is_float16(DLDataType t) { return dtype_is(t, kDLFloat, 16); }
inline bool is_bfloat16(DLDataType t) { return dtype_is(t, kDLBfloat, 16); }
inline bool is_float32(DLDataType t) { return dtype_is(t, kDLFloat, 32); }
inline bool is_int32(DLDataType t) { return dtype_is(t, kDLInt, 32); }
inline bool is_int64(DLDataType t) { return dtype_is(t, kDLInt, 64); }

inline std::string device_name(DLDevice d) {
  switch (d.device_type) {
    case kDLCPU: return "cpu";
    case kDLCUDA: return "cuda:" + std::to_string(d.device_id);
    case kDLCUDAHost: return "cuda_host";
    default: return "device_type " + std::to_string(d.device_type) + ":" + std::to_string(d.device_id);
  }
}

inline int64_t numel(const DLTensor& t) {
  int64_t n = 1;
  for (int i = 0; i < t.ndim; ++i) n *= t.shape[i];
  return n;
}

// Stride of `dim` in elements; NULL strides mean compact row-major.
inline int64_t stride(const DLTensor& t, int dim) {
  if (t.strides != nullptr) return t.strides[dim];
  int64_t s = 1;
  for (int i = t.ndim - 1; i > dim; --i) s *= t.shape[i];
  return s;
}

// Compact row-major, ignoring the stride of size-1 dimensions (their stride
// never takes part in addressing, and producers fill it arbitrarily).
inline bool is_compact(const DLTensor& t) {
  if (t.strides == nullptr) return true;
  int64_t expected = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    if (t.shape[i] != 1 && t.strides[i] != expected) return false;
    expected *= t.shape[i];
  }
  return true;
}

template <class T = void>
inline T* data_ptr(const DLTensor& t) {
  return reinterpret_cast<T*>(static_cast<char*>(t.data) + t.byte_offset);
}

// The tensor must sit on the CUDA device `device` (where the stack or the
// other operands live); our kernels dereference it there.
inline void require_on_device(const DLTensor& t, int device, const char* op, const char* arg) {
  if (t.device.device_type != kDLCUDA || t.device.device_id != device) {
    throw Error(FM_ERROR_INVALID_ARGUMENT, std::string(op) + ": " + arg + " is on " +
                                               device_name(t.device) + ", expected cuda:" +
                                               std::to_string(device));
  }
}

inline void require_compact(const DLTensor& t, const char* op, const char* arg) {
  if (!is_compact(t)) {
    throw Error(FM_ERROR_INVALID_ARGUMENT,
                std::string(op) + ": " + arg +
                    " must be contiguous (compact row-major) for the CUDA backend; got a strided "
                    "view, pass a contiguous copy");
  }
}

// Any tensor with no element passes: its strides are meaningless (numpy 2 and
// torch export zero strides for empty arrays).
inline void require_unit_last_stride(const DLTensor& t, const char* op, const char* arg) {
  if (t.ndim > 0 && numel(t) > 0 && t.shape[t.ndim - 1] > 1 && stride(t, t.ndim - 1) != 1) {
    throw Error(FM_ERROR_INVALID_ARGUMENT,
                std::string(op) + ": " + arg + " must have stride 1 in its last dimension; got " +
                    std::to_string(stride(t, t.ndim - 1)));
  }
}

}  // namespace ferrum_moe_cuda

#endif  // FERRUM_MOE_CUDA_TENSOR_CHECKS_HPP_
