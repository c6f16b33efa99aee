// DLPack data types by name: the names the Python API and its messages use.
#pragma once

#include <string>

#include "ferrum_moe/dlpack.h"

namespace ferrum {

inline constexpr DLDataType kFloat32{kDLFloat, 32, 1};
inline constexpr DLDataType kFloat16{kDLFloat, 16, 1};
inline constexpr DLDataType kBFloat16{kDLBfloat, 16, 1};
inline constexpr DLDataType kInt32{kDLInt, 32, 1};
inline constexpr DLDataType kInt64{kDLInt, 64, 1};
inline constexpr DLDataType kUInt8{kDLUInt, 8, 1};

inline bool operator==(DLDataType a, DLDataType b) {
  return a.code == b.code && a.bits == b.bits && a.lanes == b.lanes;
}
inline bool operator!=(DLDataType a, DLDataType b) { return !(a == b); }

// "float16", "int32", ...; unknown codes read like "dtype(code=9, bits=8, lanes=1)".
std::string dtype_name(DLDataType dtype);
// Inverse of dtype_name for the names above and float64/int8/int16/uint16/bool;
// throws ValueError naming `what` for anything else.
DLDataType dtype_from_name(const std::string& name, const char* what);
inline int64_t dtype_bytes(DLDataType dtype) { return (int64_t(dtype.bits) * dtype.lanes + 7) / 8; }

std::string device_name(DLDevice device);  // "cpu", "cuda:1", ...

}  // namespace ferrum
