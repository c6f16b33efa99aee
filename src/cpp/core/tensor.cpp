#include "tensor.hpp"

#include "backend.hpp"
#include "dtype.hpp"
#include "error.hpp"

namespace ferrum {

std::shared_ptr<Tensor> Tensor::adopt(DLManagedTensorVersioned* managed) {
  std::shared_ptr<Tensor> t(new Tensor());
  t->init_from(managed->dl_tensor);
  t->read_only_ = (managed->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
  t->release_ = [managed] {
    if (managed->deleter != nullptr) managed->deleter(managed);
  };
  return t;
}

std::shared_ptr<Tensor> Tensor::adopt_legacy(DLManagedTensor* managed) {
  std::shared_ptr<Tensor> t(new Tensor());
  t->init_from(managed->dl_tensor);
  t->release_ = [managed] {
    if (managed->deleter != nullptr) managed->deleter(managed);
  };
  return t;
}

Tensor::~Tensor() {
  if (release_) release_();
}

void Tensor::init_from(const DLTensor& t) {
  dl_ = t;
  shape_.assign(t.shape, t.shape + t.ndim);
  dl_.shape = shape_.data();
  if (t.strides != nullptr) {
    strides_.assign(t.strides, t.strides + t.ndim);
    dl_.strides = strides_.data();
  }
}

std::vector<int64_t> Tensor::strides() const {
  if (!strides_.empty()) return strides_;
  std::vector<int64_t> s(shape_.size());
  int64_t step = 1;
  for (int i = int(shape_.size()) - 1; i >= 0; --i) {
    s[i] = step;
    step *= shape_[i];
  }
  return s;
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape_) n *= d;
  return n;
}

bool Tensor::is_compact() const {
  if (numel() == 0) return true;  // no element to be out of place (numpy 2 exports all-zero strides)
  std::vector<int64_t> s = strides();
  int64_t step = 1;
  for (int i = int(shape_.size()) - 1; i >= 0; --i) {
    if (shape_[i] != 1 && s[i] != step) return false;
    step *= shape_[i];
  }
  return true;
}

std::shared_ptr<Tensor> Tensor::view_of(const DLTensor& dl, std::vector<int64_t> shape) {
  std::shared_ptr<Tensor> t(new Tensor());
  t->init_from(dl);
  t->shape_ = std::move(shape);
  t->dl_.shape = t->shape_.data();
  t->dl_.ndim = int32_t(t->shape_.size());
  t->read_only_ = read_only_;
  t->base_ = shared_from_this();
  t->producer_backend_ = producer_backend_;
  t->producer_stream_ = producer_stream_;
  return t;
}

std::shared_ptr<Tensor> Tensor::retyped(DLDataType dtype) {
  if (dtype_bytes(dtype) != dtype_bytes(dl_.dtype)) {
    throw_type_error("cannot read " + dtype_name(dl_.dtype) + " memory as " + dtype_name(dtype) +
                     ": the element sizes differ");
  }
  DLTensor dl = dl_;
  dl.dtype = dtype;
  return view_of(dl, shape_);
}

std::shared_ptr<Tensor> Tensor::view(const std::vector<int64_t>& shape) {
  if (!is_compact()) throw_value_error("view: the tensor must be contiguous; got strides " + shape_string(strides()));
  // Multiplied only while the product stays within what the tensor holds, so
  // a hostile shape cannot wrap to a small count.
  const int64_t have = numel();
  bool zero = false;
  for (int64_t d : shape) {
    if (d < 0) throw_value_error("view: negative dimension in " + shape_string(shape));
    zero = zero || d == 0;
  }
  int64_t n = 1;
  for (int64_t d : shape) {
    if (zero) { n = 0; break; }
    if (n > have / d) { n = have + 1; break; }
    n *= d;
  }
  if (n > have) {
    throw_value_error("view: shape " + shape_string(shape) + " needs more elements than the tensor's " +
                      std::to_string(have));
  }
  DLTensor dl = dl_;
  dl.strides = nullptr;  // compact, so the new shape's row-major strides hold
  dl.ndim = 0;
  return view_of(dl, shape);
}

namespace {

// manager_ctx of an exported tensor: owns the shape/strides arrays the
// exported DLTensor points to, and a reference to the source Tensor. Its
// deleter needs no GIL: it only drops C++ references (the last of which may
// run a backend's deleter, which must itself be GIL-free, as DLPack requires).
struct ExportContext {
  std::shared_ptr<Tensor> source;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;
};

template <class Managed>
Managed* make_export(const std::shared_ptr<Tensor>& source) {
  auto* ctx = new ExportContext{source, source->shape(), source->strides()};
  auto* m = new Managed{};
  m->dl_tensor = source->dl();
  m->dl_tensor.shape = ctx->shape.data();
  m->dl_tensor.strides = ctx->strides.data();
  m->manager_ctx = ctx;
  m->deleter = [](Managed* self) {
    delete static_cast<ExportContext*>(self->manager_ctx);
    delete self;
  };
  return m;
}

}  // namespace

DLManagedTensorVersioned* Tensor::export_versioned() {
  auto* m = make_export<DLManagedTensorVersioned>(shared_from_this());
  m->version = {DLPACK_MAJOR_VERSION, DLPACK_MINOR_VERSION};
  m->flags = read_only_ ? DLPACK_FLAG_BITMASK_READ_ONLY : 0;
  return m;
}

DLManagedTensor* Tensor::export_legacy() { return make_export<DLManagedTensor>(shared_from_this()); }

void Tensor::set_producer(std::shared_ptr<Backend> backend, void* stream) {
  producer_backend_ = std::move(backend);
  producer_stream_ = stream;
}

void Tensor::prepare_export(int64_t consumer_stream) {
  if (!producer_backend_ || consumer_stream == -1) return;
  // DLPack's CUDA stream numbering: 1 is the legacy default stream (handle 0),
  // 2 the per-thread default stream; anything else is the handle itself.
  void* consumer = consumer_stream == 1 ? nullptr
                   : consumer_stream == 2 ? reinterpret_cast<void*>(uintptr_t{2})
                                          : reinterpret_cast<void*>(consumer_stream);
  if (consumer == producer_stream_) return;
  producer_backend_->stream_order(dl_.device, producer_stream_, consumer);
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

namespace {
std::string prefix(Arg arg) { return std::string(arg.op) + ": " + arg.name; }
}  // namespace

void expect_rank(const Tensor& t, int rank, Arg arg) {
  if (t.ndim() != rank) {
    throw_value_error(prefix(arg) + " must have " + std::to_string(rank) + " dimensions; got shape " +
                      shape_string(t.shape()));
  }
}

void expect_dtype(const Tensor& t, DLDataType dtype, Arg arg, const char* why) {
  if (t.dtype() != dtype) {
    throw_type_error(prefix(arg) + " must have dtype " + dtype_name(dtype) +
                     (why ? std::string(" (") + why + ")" : std::string()) + "; got " +
                     dtype_name(t.dtype()));
  }
}

void expect_dtype_in(const Tensor& t, const std::vector<DLDataType>& dtypes, Arg arg) {
  for (DLDataType d : dtypes) {
    if (t.dtype() == d) return;
  }
  std::string names;
  for (size_t i = 0; i < dtypes.size(); ++i) names += (i ? " or " : "") + dtype_name(dtypes[i]);
  throw_type_error(prefix(arg) + " must have dtype " + names + "; got " + dtype_name(t.dtype()));
}

void expect_device(const Tensor& t, DLDevice device, Arg arg, const char* why) {
  DLDevice d = t.device();
  // Pinned host memory is host memory to every CPU kernel.
  bool host_ok = device.device_type == kDLCPU && d.device_type == kDLCUDAHost;
  if (!host_ok && (d.device_type != device.device_type ||
                   (device.device_type != kDLCPU && d.device_id != device.device_id))) {
    throw_value_error(prefix(arg) + " must be on " + device_name(device) +
                      (why ? std::string(" (") + why + ")" : std::string()) + "; got an array on " +
                      device_name(d));
  }
}

void expect_dim(const Tensor& t, int axis, int64_t size, Arg arg, const char* what) {
  if (t.dim(axis) != size) {
    throw_value_error(prefix(arg) + " has shape " + shape_string(t.shape()) + "; dimension " +
                      std::to_string(axis) + " must be " + std::to_string(size) + " (" + what + ")");
  }
}

void expect_dim_at_least(const Tensor& t, int axis, int64_t size, Arg arg, const char* what) {
  if (t.dim(axis) < size) {
    throw_value_error(prefix(arg) + " has shape " + shape_string(t.shape()) + "; dimension " +
                      std::to_string(axis) + " must be at least " + std::to_string(size) + " (" +
                      what + ")");
  }
}

void expect_rows_contiguous(const Tensor& t, Arg arg) {
  if (t.numel() == 0) return;
  std::vector<int64_t> s = t.strides();
  int last = t.ndim() - 1;
  bool ok = t.dim(last) <= 1 || s[last] == 1;
  for (int i = 0; ok && i < last; ++i) ok = t.dim(i) <= 1 || s[i] >= s[i + 1] * t.dim(i + 1);
  if (!ok) {
    throw_value_error(prefix(arg) + " must be row-major with adjacent elements in each row; got strides " +
                      shape_string(s) + " for shape " + shape_string(t.shape()) +
                      " (pass a contiguous copy)");
  }
}

void expect_compact(const Tensor& t, Arg arg) {
  if (!t.is_compact()) {
    throw_value_error(prefix(arg) + " must be contiguous (compact row-major); got strides " +
                      shape_string(t.strides()) + " for shape " + shape_string(t.shape()) +
                      " (pass a contiguous copy)");
  }
}

void expect_writable(const Tensor& t, Arg arg) {
  if (t.read_only()) {
    throw_value_error(prefix(arg) +
                      " is read-only (a JAX array or a read-only buffer); pass a writable array");
  }
}

}  // namespace ferrum
