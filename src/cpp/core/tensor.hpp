// ferrum::Tensor: a DLTensor plus whatever keeps its memory alive, and the
// checks every operation runs on the tensors it is handed.
//
// Ownership: a Tensor either adopts a managed tensor (imported through DLPack,
// or allocated by a backend) and calls its deleter exactly once when the last
// reference goes, or views another Tensor (`retyped`) and keeps it alive.
// Exporting makes a new managed tensor that holds a reference to the Tensor,
// so an export may outlive every Python object.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "ferrum_moe/dlpack.h"

namespace ferrum {

class Backend;

class Tensor : public std::enable_shared_from_this<Tensor> {
 public:
  // Both take ownership even when they throw (the deleter then runs at once):
  // a producer's shape, strides and dtype are checked on import (see init_from).
  static std::shared_ptr<Tensor> adopt(DLManagedTensorVersioned* managed);
  static std::shared_ptr<Tensor> adopt_legacy(DLManagedTensor* managed);
  ~Tensor();
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;

  const DLTensor& dl() const { return dl_; }
  DLTensor* mutable_dl() { return &dl_; }
  int ndim() const { return dl_.ndim; }
  int64_t dim(int i) const { return shape_[i]; }
  const std::vector<int64_t>& shape() const { return shape_; }
  std::vector<int64_t> strides() const;  // in elements, NULL strides resolved
  int64_t numel() const;
  DLDataType dtype() const { return dl_.dtype; }
  DLDevice device() const { return dl_.device; }
  uintptr_t data_ptr() const { return reinterpret_cast<uintptr_t>(dl_.data) + dl_.byte_offset; }
  bool read_only() const { return read_only_; }
  bool is_compact() const;  // row-major without gaps

  // The same memory read as another dtype of the same width (numpy's uint16
  // storage of ml_dtypes.bfloat16 becomes bfloat16).
  std::shared_ptr<Tensor> retyped(DLDataType dtype);
  // The first numel(shape) elements of a compact tensor, read with `shape`
  // (a reshape, or the first rows of a preallocated workspace).
  std::shared_ptr<Tensor> view(const std::vector<int64_t>& shape);

  // Export: a new managed tensor sharing ownership of this one.
  DLManagedTensorVersioned* export_versioned();
  DLManagedTensor* export_legacy();

  // Work producing this tensor was queued on `stream` of `backend`: a
  // consumer on another stream must wait for it (see prepare_export).
  void set_producer(std::shared_ptr<Backend> backend, void* stream);
  // Orders the producing stream before `consumer_stream` (DLPack's stream
  // argument: -1 means the consumer does its own ordering).
  void prepare_export(int64_t consumer_stream);

 private:
  Tensor() = default;
  void init_from(const DLTensor& t);
  // A Tensor over this one's memory, read as `dl` with `shape`; keeps this alive.
  std::shared_ptr<Tensor> view_of(const DLTensor& dl, std::vector<int64_t> shape);

  DLTensor dl_{};
  std::vector<int64_t> shape_;
  std::vector<int64_t> strides_;  // empty when the source had NULL strides
  bool read_only_ = false;
  std::function<void()> release_;
  std::shared_ptr<Tensor> base_;  // for views
  std::shared_ptr<Backend> producer_backend_;
  void* producer_stream_ = nullptr;
};

// Argument checks. `op` and `arg` name the operation and the argument in the
// message: "gemm_batched: x must have dtype float16 (the stack's dtype); got float32".
struct Arg {
  const char* op;
  const char* name;
};

void expect_rank(const Tensor& t, int rank, Arg arg);
void expect_dtype(const Tensor& t, DLDataType dtype, Arg arg, const char* why = nullptr);
void expect_dtype_in(const Tensor& t, const std::vector<DLDataType>& dtypes, Arg arg);
void expect_device(const Tensor& t, DLDevice device, Arg arg, const char* why = nullptr);
void expect_dim(const Tensor& t, int axis, int64_t size, Arg arg, const char* what);
void expect_dim_at_least(const Tensor& t, int axis, int64_t size, Arg arg, const char* what);
// Elements of the last axis adjacent (row stride may be anything >= the row).
void expect_rows_contiguous(const Tensor& t, Arg arg);
void expect_compact(const Tensor& t, Arg arg);
void expect_writable(const Tensor& t, Arg arg);
// `out` shares no byte with `input` (an output written while an input is still
// read would change the input under the kernel). Exact for rank-2 row ranges,
// so disjoint column windows of one buffer pass.
void expect_disjoint(const Tensor& out, const Tensor& input, Arg out_arg, const char* input_name);
// Whether a and b share a byte (the test expect_disjoint makes).
bool overlaps(const Tensor& a, const Tensor& b);
std::string shape_string(const std::vector<int64_t>& shape);
// Memory the host can read: the CPU's, and pinned host memory.
inline bool host_readable(DLDevice d) { return d.device_type == kDLCPU || d.device_type == kDLCUDAHost; }

}  // namespace ferrum
