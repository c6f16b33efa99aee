// CUDA status -> ferrum::plugin::Error, and the device guard every entry point
// opens first. Host-only: included by the .cpp files and the .cu launchers.
#ifndef FERRUM_MOE_CUDA_CUDA_CHECK_HPP_
#define FERRUM_MOE_CUDA_CUDA_CHECK_HPP_

#include <cuda_runtime.h>

#include <string>

#include "ferrum_moe/plugin.hpp"

namespace ferrum_moe_cuda {

// Throws Error(FM_ERROR_DEVICE, "<what>: <cuda error string>"); an allocation
// failure becomes FM_ERROR_OUT_OF_MEMORY so Python raises MemoryError.
inline void check_cuda(cudaError_t status, const std::string& what) {
  if (status == cudaSuccess) return;
  // Clears the error if it is not sticky, so it does not resurface in the next
  // launch check of an unrelated call.
  cudaGetLastError();
  const FmErrorCode code =
      status == cudaErrorMemoryAllocation ? FM_ERROR_OUT_OF_MEMORY : FM_ERROR_DEVICE;
  throw ferrum::plugin::Error(code, what + ": " + cudaGetErrorString(status));
}

// Makes `device` current for the scope and restores the caller's device after:
// the host may call us from a thread whose current device is another one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int current = previous_;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// Owns one cudaMalloc'ed buffer (stack weights, load-time scratch).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes, const char* what) : bytes_(bytes) {
    if (bytes > 0) check_cuda(cudaMalloc(&ptr_, bytes), std::string("cudaMalloc(") + what + ")");
  }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  DeviceBuffer(DeviceBuffer&& other) noexcept : ptr_(other.ptr_), bytes_(other.bytes_) {
    other.ptr_ = nullptr;
    other.bytes_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      if (ptr_ != nullptr) cudaFree(ptr_);
      ptr_ = other.ptr_;
      bytes_ = other.bytes_;
      other.ptr_ = nullptr;
      other.bytes_ = 0;
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  template <class T = void>
  T* get() const { return static_cast<T*>(ptr_); }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Owns one stream-ordered allocation (a call's scratch): allocated and freed
// in `stream`'s order (cudaMallocAsync / cudaFreeAsync), so a call that uses
// one can be captured in a CUDA graph. The free is queued when the owner goes
// out of scope, after the kernels that read it were queued.
class StreamBuffer {
 public:
  StreamBuffer() = default;
  StreamBuffer(size_t bytes, cudaStream_t stream, const char* what) : stream_(stream) {
    check_cuda(cudaMallocAsync(&ptr_, bytes, stream), std::string("cudaMallocAsync(") + what + ")");
  }
  ~StreamBuffer() {
    if (ptr_ != nullptr) cudaFreeAsync(ptr_, stream_);
  }
  StreamBuffer(StreamBuffer&& other) noexcept : ptr_(other.ptr_), stream_(other.stream_) { other.ptr_ = nullptr; }
  StreamBuffer& operator=(StreamBuffer&& other) noexcept {
    if (this != &other) {
      if (ptr_ != nullptr) cudaFreeAsync(ptr_, stream_);
      ptr_ = other.ptr_;
      stream_ = other.stream_;
      other.ptr_ = nullptr;
    }
    return *this;
  }
  StreamBuffer(const StreamBuffer&) = delete;
  StreamBuffer& operator=(const StreamBuffer&) = delete;

  template <class T = void>
  T* get() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_ = nullptr;
};

}  // namespace ferrum_moe_cuda

#endif  // FERRUM_MOE_CUDA_CUDA_CHECK_HPP_
