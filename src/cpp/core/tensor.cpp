#include "tensor.hpp"

#include <algorithm>

#include "backend.hpp"
#include "dtype.hpp"
#include "error.hpp"
#include "release.hpp"

namespace ferrum {

std::shared_ptr<Tensor> Tensor::adopt(DLManagedTensorVersioned* managed) {
  std::shared_ptr<Tensor> t(new Tensor());
  t->release_ = [managed] {
    if (managed->deleter != nullptr) managed->deleter(managed);
  };
  t->read_only_ = (managed->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
  t->init_from(managed->dl_tensor);
  return t;
}

std::shared_ptr<Tensor> Tensor::adopt_legacy(DLManagedTensor* managed) {
  std::shared_ptr<Tensor> t(new Tensor());
  t->release_ = [managed] {
    if (managed->deleter != nullptr) managed->deleter(managed);
  };
  t->init_from(managed->dl_tensor);
  return t;
}

Tensor::~Tensor() {
  if (release_) run_release([](void* release) { (*static_cast<std::function<void()>*>(release))(); }, &release_);
}

namespace {

constexpr int kMaxRank = 32;

// a * b when it stays within [0, limit]; false when it does not (or would overflow).
bool product_within(int64_t a, int64_t b, int64_t limit, int64_t* result) {
  int64_t p;
  if (__builtin_mul_overflow(a, b, &p) || p > limit) return false;
  *result = p;
  return true;
}

}  // namespace

// Metadata comes from any DLPack producer: it is checked before anything reads
// it, so every later size computation (numel, stride times extent, byte
// ranges) stays far from int64 overflow. Memory a producer lies about (a shape
// larger than its buffer) cannot be detected by any consumer.
void Tensor::init_from(const DLTensor& t) {
  const std::string what = "DLPack tensor";
  if (t.ndim < 0 || t.ndim > kMaxRank) {
    throw_value_error(what + ": ndim " + std::to_string(t.ndim) + " is not in [0, " + std::to_string(kMaxRank) + "]");
  }
  if (t.ndim > 0 && t.shape == nullptr) throw_value_error(what + ": shape is NULL for ndim " + std::to_string(t.ndim));
  if (t.dtype.bits == 0 || t.dtype.lanes == 0) throw_value_error(what + ": dtype " + dtype_name(t.dtype) + " has no size");
  dl_ = t;
  shape_.assign(t.shape, t.shape + t.ndim);
  dl_.shape = shape_.data();
  if (t.strides != nullptr) {
    strides_.assign(t.strides, t.strides + t.ndim);
    dl_.strides = strides_.data();
  }
  const int64_t item = dtype_bytes(t.dtype);
  const std::string too_big = what + ": shape " + shape_string(shape_) + " of " + dtype_name(t.dtype);
  // Zero dimensions left out: an empty tensor's other dimensions multiply
  // within bounds too, so no product of any of them can overflow.
  int64_t bytes = item;
  bool empty = false;
  for (int64_t d : shape_) {
    if (d < 0) throw_value_error(too_big + " has a negative dimension");
    empty = empty || d == 0;
    if (d != 0 && !product_within(bytes, d, kMaxTensorBytes, &bytes)) throw_value_error(too_big + " exceeds 2^48 bytes");
  }
  if (!strides_.empty()) {
    // The farthest element from the first, in bytes, bounds every stride product.
    int64_t span = 0;
    for (int i = 0; i < t.ndim && !empty; ++i) {
      if (shape_[i] <= 1) continue;
      int64_t reach;
      const int64_t s = strides_[i];
      if (s == INT64_MIN || !product_within(s < 0 ? -s : s, shape_[i] - 1, kMaxTensorBytes, &reach) ||
          !product_within(reach, item, kMaxTensorBytes, &reach) || reach > kMaxTensorBytes - span) {
        throw_value_error(what + ": strides " + shape_string(strides_) + " for shape " + shape_string(shape_) +
                          " reach past 2^48 bytes");
      }
      span += reach;
    }
  }
  if (t.data == nullptr && !empty) throw_value_error(what + ": data is NULL for shape " + shape_string(shape_));
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
  // The shape and memory were checked when this tensor was imported, or by view().
  std::shared_ptr<Tensor> t(new Tensor());
  t->dl_ = dl;
  t->shape_ = std::move(shape);
  t->dl_.shape = t->shape_.data();
  t->dl_.ndim = int32_t(t->shape_.size());
  if (dl.strides != nullptr) {
    t->strides_.assign(dl.strides, dl.strides + t->shape_.size());
    t->dl_.strides = t->strides_.data();
  }
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
  // The nonzero dimensions are multiplied only while the product stays within
  // what the tensor holds (or, for an empty view, within 2^48 bytes, as on
  // import), so a hostile shape cannot wrap to a small count.
  const int64_t have = numel();
  bool zero = false;
  for (int64_t d : shape) {
    if (d < 0) throw_value_error("view: negative dimension in " + shape_string(shape));
    zero = zero || d == 0;
  }
  const int64_t limit = zero ? kMaxTensorBytes / dtype_bytes(dl_.dtype) : have;
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d == 0) continue;
    if (n > limit / d) {
      throw_value_error("view: shape " + shape_string(shape) + " needs more elements than the tensor's " +
                        std::to_string(have));
    }
    n *= d;
  }
  DLTensor dl = dl_;
  dl.strides = nullptr;  // compact, so the new shape's row-major strides hold
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

namespace {

// The bytes a tensor covers as `rows` ranges of `row_bytes`, `step` apart
// (one range for a compact tensor). A layout without such a form is covered
// by its bounding range, which can only report more overlap, never less.
struct RowRanges {
  int64_t first, rows, step, row_bytes;
};

RowRanges row_ranges(const Tensor& t) {
  const int64_t item = dtype_bytes(t.dtype());
  const auto first = int64_t(t.data_ptr());
  if (t.is_compact()) return {first, 1, 0, t.numel() * item};
  const std::vector<int64_t> s = t.strides();
  if (t.ndim() == 2 && s[0] > 0 && (t.dim(1) <= 1 || s[1] == 1) && s[0] >= t.dim(1)) {
    return {first, t.dim(0), s[0] * item, t.dim(1) * item};
  }
  int64_t lo = 0, hi = 0;
  for (int i = 0; i < t.ndim(); ++i) {
    const int64_t reach = s[i] * (t.dim(i) - 1) * item;
    (reach < 0 ? lo : hi) += reach;
  }
  return {first + lo, 1, 0, hi - lo + item};
}

bool same_memory(DLDevice a, DLDevice b) {
  auto host = [](DLDevice d) { return d.device_type == kDLCPU || d.device_type == kDLCUDAHost; };
  if (host(a) || host(b)) return host(a) && host(b);
  return a.device_type == b.device_type && a.device_id == b.device_id;
}

}  // namespace

bool overlaps(const Tensor& a, const Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !same_memory(a.device(), b.device())) return false;
  RowRanges p = row_ranges(a), q = row_ranges(b);
  const int64_t p_end = p.first + (p.rows - 1) * p.step + p.row_bytes;
  const int64_t q_end = q.first + (q.rows - 1) * q.step + q.row_bytes;
  if (p.first >= q_end || q.first >= p_end) return false;
  if (p.rows > q.rows) std::swap(p, q);
  if (q.rows == 1) q.step = 1;  // any positive step: only row 0 exists
  // For each row of p, the rows j of q with q.first + j * step in (start - row_bytes, end).
  auto floor_div = [](int64_t a, int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); };
  for (int64_t i = 0; i < p.rows; ++i) {
    const int64_t start = p.first + i * p.step, end = start + p.row_bytes;
    const int64_t lo = std::max<int64_t>(floor_div(start - q.row_bytes - q.first, q.step) + 1, 0);
    const int64_t hi = std::min<int64_t>(-floor_div(-(end - q.first), q.step) - 1, q.rows - 1);
    if (lo <= hi) return true;
  }
  return false;
}

void expect_disjoint(const Tensor& out, const Tensor& input, Arg out_arg, const char* input_name) {
  if (overlaps(out, input)) {
    throw_value_error(prefix(out_arg) + " overlaps " + input_name +
                      " in memory; an output is written while the inputs are read: pass a separate array");
  }
}

void expect_writable(const Tensor& t, Arg arg) {
  if (t.read_only()) {
    throw_value_error(prefix(arg) +
                      " is read-only (a JAX array or a read-only buffer); pass a writable array");
  }
}

}  // namespace ferrum
