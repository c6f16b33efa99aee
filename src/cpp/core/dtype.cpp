#include "dtype.hpp"

#include <utility>

#include "error.hpp"

namespace ferrum {
namespace {

constexpr std::pair<const char*, DLDataType> kNamed[] = {
    {"float32", kFloat32},           {"float16", kFloat16},       {"bfloat16", kBFloat16},
    {"float64", {kDLFloat, 64, 1}},  {"int32", kInt32},           {"int64", kInt64},
    {"uint8", kUInt8},               {"int8", {kDLInt, 8, 1}},    {"int16", {kDLInt, 16, 1}},
    {"uint16", {kDLUInt, 16, 1}},    {"uint32", {kDLUInt, 32, 1}}, {"bool", {kDLBool, 8, 1}},
};

}  // namespace

std::string dtype_name(DLDataType dtype) {
  for (const auto& [name, dt] : kNamed) {
    if (dt == dtype) return name;
  }
  return "dtype(code=" + std::to_string(dtype.code) + ", bits=" + std::to_string(dtype.bits) +
         ", lanes=" + std::to_string(dtype.lanes) + ")";
}

DLDataType dtype_from_name(const std::string& name, const char* what) {
  for (const auto& [n, dt] : kNamed) {
    if (name == n) return dt;
  }
  throw_value_error(std::string(what) + ": unknown dtype '" + name +
                    "' (expected float32, float16, bfloat16, int32, int64, uint8, ...)");
}

std::string device_name(DLDevice device) {
  switch (device.device_type) {
    case kDLCPU: return "cpu";
    case kDLCUDA: return "cuda:" + std::to_string(device.device_id);
    case kDLCUDAHost: return "cuda_host";
    case kDLCUDAManaged: return "cuda_managed:" + std::to_string(device.device_id);
    case kDLROCM: return "rocm:" + std::to_string(device.device_id);
    default:
      return "device(type=" + std::to_string(int(device.device_type)) + ", id=" +
             std::to_string(device.device_id) + ")";
  }
}

}  // namespace ferrum
