// ferrum_moe._core: bindings only. Every behaviour lives in src/cpp/core.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "../core/backend.hpp"
#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/moe.hpp"
#include "../core/release.hpp"
#include "../core/tensor.hpp"
#include "dlpack_capsule.hpp"

namespace py = pybind11;
using ferrum::Backend;
using ferrum::ExpertStack;
using ferrum::Tensor;
using TensorPtr = std::shared_ptr<Tensor>;

namespace {

void* as_stream(uintptr_t handle) { return reinterpret_cast<void*>(handle); }
Tensor* opt(const std::optional<TensorPtr>& t) { return t ? t->get() : nullptr; }

// A routed GEMM's gated output (ExpertStack::Gated), or null.
std::optional<ExpertStack::Gated> gated_of(const std::optional<TensorPtr>& gated_out, int32_t activation) {
  if (!gated_out) return std::nullopt;
  return ExpertStack::Gated{activation, gated_out->get()};
}

// An int argument of __dlpack__ as int64, or a TypeError/ValueError naming it
// (pybind11's own casts would raise an anonymous RuntimeError).
int64_t dlpack_int(py::handle value, const char* name) {
  if (!PyLong_Check(value.ptr()) || PyBool_Check(value.ptr())) {
    throw ferrum::Error(FM_ERROR_TYPE, std::string("__dlpack__: ") + name + " must be an int; got " +
                                           py::str(py::repr(value)).cast<std::string>());
  }
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(value.ptr(), &overflow);
  if (overflow != 0) {
    throw ferrum::Error(FM_ERROR_INVALID_ARGUMENT, std::string("__dlpack__: ") + name + " " +
                                                       py::str(value).cast<std::string>() + " does not fit in 64 bits");
  }
  return v;
}

// (a, b) of ints, as __dlpack__'s max_version and dl_device are.
std::pair<int64_t, int64_t> dlpack_pair(py::handle value, const char* name) {
  if (!PyTuple_Check(value.ptr()) || PyTuple_Size(value.ptr()) != 2) {
    throw ferrum::Error(FM_ERROR_TYPE, std::string("__dlpack__: ") + name + " must be a tuple of two ints; got " +
                                           py::str(py::repr(value)).cast<std::string>());
  }
  py::tuple t = py::reinterpret_borrow<py::tuple>(value);
  return {dlpack_int(t[0], name), dlpack_int(t[1], name)};
}

py::dict build_info() {
  py::dict d;
#if defined(__clang__)
  d["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = "gcc " __VERSION__;
#else
  d["compiler"] = "unknown";
#endif
  d["abi"] = std::to_string(FM_ABI_MAJOR) + "." + std::to_string(FM_ABI_MINOR);
  d["dlpack"] = std::to_string(DLPACK_MAJOR_VERSION) + "." + std::to_string(DLPACK_MINOR_VERSION);
  return d;
}

// Releases (a backend's free or destroy) run without the GIL when the
// dropping thread holds it: a device free waits for the device, which must
// not stall every Python thread, nor deadlock with a tool that takes the GIL
// inside the driver (docs/reliability.md). Not while the interpreter shuts
// down, when a thread may no longer take the GIL back.
bool interpreter_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

void release_without_gil(void (*release)(void*), void* context) {
  if (PyGILState_Check() == 0 || interpreter_finalizing()) {
    release(context);
    return;
  }
  py::gil_scoped_release unlocked;
  release(context);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "ferrum-moe core: DLPack tensors, the plugin host, expert stacks (bindings only)";
  ferrum::set_release_runner(&release_without_gil);

  static py::exception<ferrum::Error> base_error(m, "CoreError", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ferrum::Error& e) {
      PyObject* type = PyExc_RuntimeError;
      switch (e.code()) {
        case FM_ERROR_INVALID_ARGUMENT: type = PyExc_ValueError; break;
        case FM_ERROR_TYPE: type = PyExc_TypeError; break;
        case FM_ERROR_UNSUPPORTED: type = PyExc_NotImplementedError; break;
        case FM_ERROR_OUT_OF_MEMORY: type = PyExc_MemoryError; break;
        default: break;
      }
      PyErr_SetString(type, e.what());
    }
  });

  m.def("build_info", &build_info);
  m.def("max_num_tokens_padded", &ferrum::max_num_tokens_padded, py::arg("num_pairs"),
        py::arg("num_local_experts"), py::arg("block_size"));

  m.def(
      "moe_layer",
      [](ExpertStack& w13, ExpertStack& w2, const TensorPtr& x, const TensorPtr& topk_ids,
         const TensorPtr& topk_weights, const std::optional<TensorPtr>& expert_map, int64_t num_experts,
         bool weights_on_input, int64_t block_size, const std::optional<TensorPtr>& sorted_token_ids,
         const std::optional<TensorPtr>& expert_ids, const std::optional<TensorPtr>& num_tokens_post_padded,
         const TensorPtr& gate_up, const TensorPtr& act, const TensorPtr& down, const TensorPtr& out,
         uintptr_t stream, bool layer_call) {
        ferrum::MoeLayerCall call;
        call.x = x.get();
        call.topk_ids = topk_ids.get();
        call.topk_weights = topk_weights.get();
        call.expert_map = opt(expert_map);
        call.num_experts = num_experts;
        call.weights_on_input = weights_on_input;
        call.block_size = block_size;
        call.sorted_token_ids = sorted_token_ids ? sorted_token_ids->get() : nullptr;
        call.expert_ids = expert_ids ? expert_ids->get() : nullptr;
        call.num_tokens_post_padded = num_tokens_post_padded ? num_tokens_post_padded->get() : nullptr;
        call.gate_up = gate_up.get();
        call.act = act.get();
        call.down = down.get();
        call.out = out.get();
        call.stream = as_stream(stream);
        call.layer_call = layer_call;
        return ferrum::run_moe_layer(w13, w2, call);
      },
      py::call_guard<py::gil_scoped_release>(), py::arg("w13"), py::arg("w2"), py::arg("x"), py::arg("topk_ids"),
      py::arg("topk_weights"), py::arg("expert_map"), py::arg("num_experts"), py::arg("weights_on_input"),
      py::arg("block_size"), py::arg("sorted_token_ids"), py::arg("expert_ids"), py::arg("num_tokens_post_padded"),
      py::arg("gate_up"), py::arg("act"), py::arg("down"), py::arg("out"), py::arg("stream") = 0,
      py::arg("layer_call") = true);

  py::class_<Tensor, TensorPtr>(m, "Tensor",
                                "An array ferrum-moe holds: imported through DLPack or allocated by a backend. "
                                "Exports itself through DLPack (both capsule kinds).")
      .def_static("from_capsule", &ferrum::python::consume_capsule, py::arg("capsule"))
      .def_property_readonly("shape", [](const Tensor& t) { return py::tuple(py::cast(t.shape())); })
      .def_property_readonly("strides", [](const Tensor& t) { return py::tuple(py::cast(t.strides())); })
      .def_property_readonly("dtype", [](const Tensor& t) { return ferrum::dtype_name(t.dtype()); })
      .def_property_readonly("device", [](const Tensor& t) {
        return py::make_tuple(int(t.device().device_type), t.device().device_id);
      })
      .def_property_readonly("data_ptr", &Tensor::data_ptr)
      .def_property_readonly("read_only", &Tensor::read_only)
      .def_property_readonly("is_compact", &Tensor::is_compact)
      .def("retyped", [](Tensor& t, const std::string& name) { return t.retyped(ferrum::dtype_from_name(name, "retyped")); })
      .def("view", &Tensor::view, py::arg("shape"))
      .def(
          "__dlpack__",
          [](Tensor& t, py::object stream, py::object max_version, py::object dl_device, py::object copy) {
            if (!copy.is_none() && !PyBool_Check(copy.ptr())) {
              throw ferrum::Error(FM_ERROR_TYPE, "__dlpack__: copy must be a bool or None; got " +
                                                     py::str(py::repr(copy)).cast<std::string>());
            }
            if (copy.is(py::bool_(true))) {
              throw ferrum::Error(FM_ERROR_UNSUPPORTED, "__dlpack__: copy=True is not supported; ferrum tensors export without copying");
            }
            if (!dl_device.is_none()) {
              auto [type, id] = dlpack_pair(dl_device, "dl_device");
              if (type != int(t.device().device_type) || id != t.device().device_id) {
                throw ferrum::Error(FM_ERROR_UNSUPPORTED, "__dlpack__: cannot export to another device");
              }
            }
            const bool versioned = !max_version.is_none() && dlpack_pair(max_version, "max_version").first >= 1;
            int64_t consumer = t.device().device_type == kDLCPU ? -1 : 1;
            if (!stream.is_none()) {
              consumer = dlpack_int(stream, "stream");
              if (consumer < -1) {
                throw ferrum::Error(FM_ERROR_INVALID_ARGUMENT, "__dlpack__: stream must be -1, None or a stream handle >= 0; got " +
                                                                   std::to_string(consumer));
              }
            }
            t.prepare_export(consumer);
            return ferrum::python::export_capsule(t.shared_from_this(), versioned);
          },
          py::kw_only(), py::arg("stream") = py::none(), py::arg("max_version") = py::none(),
          py::arg("dl_device") = py::none(), py::arg("copy") = py::none())
      .def("__dlpack_device__", [](const Tensor& t) {
        return py::make_tuple(int(t.device().device_type), t.device().device_id);
      });

  py::class_<Backend, std::shared_ptr<Backend>>(m, "Backend", "A loaded backend plugin (its C function table).")
      .def_static(
          "load",
          [](py::capsule capsule) {
            if (!PyCapsule_IsValid(capsule.ptr(), FM_BACKEND_CAPSULE_NAME)) {
              const char* name = PyCapsule_GetName(capsule.ptr());
              PyErr_Clear();
              throw ferrum::Error(FM_ERROR_TYPE, std::string("backend entry point returned a capsule named '") +
                                                     (name ? name : "(null)") + "'; expected '" FM_BACKEND_CAPSULE_NAME "'");
            }
            auto* api = static_cast<const FmBackendApi*>(PyCapsule_GetPointer(capsule.ptr(), FM_BACKEND_CAPSULE_NAME));
            return Backend::load(api);
          },
          py::arg("capsule"))
      .def_property_readonly("name", &Backend::name)
      .def_property_readonly("version", &Backend::version)
      .def_property_readonly("description", &Backend::description)
      .def_property_readonly("device_types", &Backend::device_types)
      .def_property_readonly("device_count", &Backend::device_count)
      .def_property_readonly("abi_version", &Backend::abi_version)
      .def_property_readonly("has_pair_routing", &Backend::has_pair_routing)
      .def_property_readonly("has_gated_epilogue", &Backend::has_gated_epilogue)
      .def_property_readonly("has_moe_layer", &Backend::has_moe_layer)
      .def(
          "empty",
          [](Backend& b, int device_type, int device_id, const std::string& dtype, std::vector<int64_t> shape,
             uintptr_t stream, bool temporary, bool zeroed) {
            const uint32_t flags =
                (temporary ? uint32_t{FM_ALLOC_TEMPORARY} : 0u) | (zeroed ? uint32_t{FM_ALLOC_ZEROED} : 0u);
            return b.empty(DLDevice{DLDeviceType(device_type), device_id}, ferrum::dtype_from_name(dtype, "empty"), shape,
                           as_stream(stream), flags);
          },
          // A device allocation can block (cudaMalloc synchronizes): never
          // with the GIL held (compute-sanitizer's Python backtraces deadlocked
          // on it, reliability.md).
          py::call_guard<py::gil_scoped_release>(), py::arg("device_type"), py::arg("device_id"), py::arg("dtype"),
          py::arg("shape"), py::arg("stream") = 0, py::arg("temporary") = false, py::arg("zeroed") = false)
      .def(
          "create_stack",
          [](Backend& b, int device_type, int device_id, const std::string& dtype, int64_t num_experts, int64_t k,
             int64_t n_per_expert, int bits, int64_t group_size, const TensorPtr& qweight, const TensorPtr& scales,
             const std::optional<TensorPtr>& zeros, const std::optional<TensorPtr>& g_idx, uintptr_t stream) {
            ferrum::StackSpec spec;
            spec.device = DLDevice{DLDeviceType(device_type), device_id};
            spec.dtype = ferrum::dtype_from_name(dtype, "ExpertStack dtype");
            spec.num_experts = num_experts;
            spec.k = k;
            spec.n_per_expert = n_per_expert;
            spec.bits = bits;
            spec.group_size = group_size;
            return b.create_stack(spec, *qweight, *scales, opt(zeros), opt(g_idx), as_stream(stream));
          },
          py::call_guard<py::gil_scoped_release>(), py::arg("device_type"), py::arg("device_id"), py::arg("dtype"), py::arg("num_experts"), py::arg("k"),
          py::arg("n_per_expert"), py::arg("bits"), py::arg("group_size"), py::arg("qweight"), py::arg("scales"),
          py::arg("zeros"), py::arg("g_idx"), py::arg("stream") = 0)
      .def(
          "moe_align_block_size",
          [](Backend& b, const TensorPtr& topk_ids, int64_t num_experts, int64_t block_size,
             const std::optional<TensorPtr>& expert_map, const TensorPtr& sorted_ids, const TensorPtr& expert_ids,
             const TensorPtr& num_post, uintptr_t stream) {
            b.moe_align_block_size(*topk_ids, num_experts, block_size, opt(expert_map), *sorted_ids, *expert_ids,
                                   *num_post, as_stream(stream));
          },
          py::call_guard<py::gil_scoped_release>(), py::arg("topk_ids"), py::arg("num_experts"), py::arg("block_size"), py::arg("expert_map"),
          py::arg("sorted_token_ids"), py::arg("expert_ids"), py::arg("num_tokens_post_padded"), py::arg("stream") = 0)
      .def(
          "gated_activation",
          [](Backend& b, const TensorPtr& input, const TensorPtr& out, uintptr_t stream) {
            b.gated_activation(*input, *out, as_stream(stream));
          },
          py::call_guard<py::gil_scoped_release>(), py::arg("input"), py::arg("out"), py::arg("stream") = 0)
      .def(
          "moe_sum",
          [](Backend& b, const TensorPtr& input, const TensorPtr& topk_ids, int64_t num_experts,
             const std::optional<TensorPtr>& expert_map, const TensorPtr& out, uintptr_t stream) {
            b.moe_sum(*input, *topk_ids, num_experts, opt(expert_map), *out, as_stream(stream));
          },
          py::call_guard<py::gil_scoped_release>(), py::arg("input"), py::arg("topk_ids"), py::arg("num_experts"), py::arg("expert_map"), py::arg("out"),
          py::arg("stream") = 0);

  py::class_<ExpertStack, std::shared_ptr<ExpertStack>>(m, "ExpertStack")
      .def_property_readonly("num_experts", [](const ExpertStack& s) { return s.spec().num_experts; })
      .def_property_readonly("k", [](const ExpertStack& s) { return s.spec().k; })
      .def_property_readonly("n_per_expert", [](const ExpertStack& s) { return s.spec().n_per_expert; })
      .def_property_readonly("bits", [](const ExpertStack& s) { return s.spec().bits; })
      .def_property_readonly("group_size", [](const ExpertStack& s) { return s.spec().group_size; })
      .def_property_readonly("dtype", [](const ExpertStack& s) { return ferrum::dtype_name(s.spec().dtype); })
      .def_property_readonly("device", [](const ExpertStack& s) {
        return py::make_tuple(int(s.spec().device.device_type), s.spec().device.device_id);
      })
      .def_property_readonly("backend", &ExpertStack::backend)
      .def_property_readonly("has_zeros", &ExpertStack::has_zeros)
      .def_property_readonly("has_g_idx", &ExpertStack::has_g_idx)
      .def_property_readonly("column_alignment", &ExpertStack::column_alignment)
      .def_property_readonly("resident_bytes", &ExpertStack::resident_bytes)
      .def_property_readonly("workspace_bytes", &ExpertStack::workspace_bytes)
      .def("check_view", &ExpertStack::check_view, py::arg("offset"), py::arg("n"), py::arg("op"))
      .def("batched_output_rows", &ExpertStack::batched_output_rows, py::arg("x"), py::arg("dispatches"))
      .def(
          "gemm_batched",
          [](ExpertStack& s, const TensorPtr& x, const TensorPtr& dispatches, int64_t col_begin, int64_t n,
             const std::optional<TensorPtr>& bias, const TensorPtr& out, uintptr_t stream) {
            s.gemm_batched(*x, *dispatches, col_begin, n, opt(bias), *out, as_stream(stream));
          },
          py::call_guard<py::gil_scoped_release>(), py::arg("x"), py::arg("dispatches"), py::arg("col_begin"), py::arg("n"), py::arg("bias"), py::arg("out"),
          py::arg("stream") = 0)
      .def(
          "linear",
          [](ExpertStack& s, const TensorPtr& x, int64_t offset, int64_t n, const std::optional<TensorPtr>& bias,
             const TensorPtr& out, uintptr_t stream) { s.linear(*x, offset, n, opt(bias), *out, as_stream(stream)); },
          py::call_guard<py::gil_scoped_release>(), py::arg("x"), py::arg("offset"), py::arg("n"), py::arg("bias"),
          py::arg("out"), py::arg("stream") = 0)
      .def(
          "gemm_routed",
          [](ExpertStack& s, const TensorPtr& x, const TensorPtr& sorted_ids, const TensorPtr& expert_ids,
             const TensorPtr& num_post, int64_t block_size, int64_t top_k, const std::optional<TensorPtr>& topk_weights,
             const std::optional<TensorPtr>& out, uintptr_t stream, const std::optional<TensorPtr>& gated_out,
             int32_t activation) {
            const auto gated = gated_of(gated_out, activation);
            return s.gemm_routed(*x, *sorted_ids, *expert_ids, *num_post, block_size, top_k, opt(topk_weights),
                                 opt(out), as_stream(stream), gated ? &*gated : nullptr);
          },
          py::call_guard<py::gil_scoped_release>(), py::arg("x"), py::arg("sorted_token_ids"), py::arg("expert_ids"), py::arg("num_tokens_post_padded"),
          py::arg("block_size"), py::arg("top_k"), py::arg("topk_weights"), py::arg("out"), py::arg("stream") = 0,
          py::arg("gated_out") = py::none(), py::arg("activation") = int(FM_ACTIVATION_SILU))
      .def(
          "gemm_routed_pairs",
          [](ExpertStack& s, const TensorPtr& x, const TensorPtr& topk_ids, int64_t num_experts,
             const std::optional<TensorPtr>& expert_map, const std::optional<TensorPtr>& topk_weights,
             const std::optional<TensorPtr>& out, uintptr_t stream, const std::optional<TensorPtr>& gated_out,
             int32_t activation) {
            const auto gated = gated_of(gated_out, activation);
            return s.gemm_routed_pairs(*x, *topk_ids, num_experts, opt(expert_map), opt(topk_weights), opt(out),
                                       as_stream(stream), gated ? &*gated : nullptr);
          },
          py::call_guard<py::gil_scoped_release>(), py::arg("x"), py::arg("topk_ids"), py::arg("num_experts"),
          py::arg("expert_map"), py::arg("topk_weights"), py::arg("out"), py::arg("stream") = 0,
          py::arg("gated_out") = py::none(), py::arg("activation") = int(FM_ACTIVATION_SILU))
      .def(
          "zero_workspace", [](ExpertStack& s, uintptr_t stream) { s.zero_workspace(as_stream(stream)); },
          py::call_guard<py::gil_scoped_release>(), py::arg("stream") = 0);
}
