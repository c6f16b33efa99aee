#include "dlpack_capsule.hpp"

#include <cstring>

#include "../core/error.hpp"

namespace py = pybind11;

namespace ferrum::python {
namespace {

constexpr const char* kVersioned = "dltensor_versioned";
constexpr const char* kLegacy = "dltensor";
constexpr const char* kUsedVersioned = "used_dltensor_versioned";
constexpr const char* kUsedLegacy = "used_dltensor";

// A capsule nobody consumed still owns its tensor: free it. Runs with the GIL
// held (capsule destructors always do); the deleters it calls need no GIL.
void versioned_capsule_destructor(PyObject* capsule) {
  if (PyCapsule_IsValid(capsule, kVersioned)) {
    auto* m = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(capsule, kVersioned));
    if (m != nullptr && m->deleter != nullptr) m->deleter(m);
  }
}

void legacy_capsule_destructor(PyObject* capsule) {
  if (PyCapsule_IsValid(capsule, kLegacy)) {
    auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, kLegacy));
    if (m != nullptr && m->deleter != nullptr) m->deleter(m);
  }
}

}  // namespace

std::shared_ptr<Tensor> consume_capsule(py::capsule capsule) {
  PyObject* c = capsule.ptr();
  if (PyCapsule_IsValid(c, kVersioned)) {
    auto* m = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(c, kVersioned));
    if (m->version.major != 1) {
      throw_type_error("DLPack capsule has major version " + std::to_string(m->version.major) +
                       "; ferrum-moe reads version 1");
    }
    PyCapsule_SetName(c, kUsedVersioned);
    return Tensor::adopt(m);
  }
  if (PyCapsule_IsValid(c, kLegacy)) {
    auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(c, kLegacy));
    PyCapsule_SetName(c, kUsedLegacy);
    return Tensor::adopt_legacy(m);
  }
  const char* name = PyCapsule_GetName(c);
  PyErr_Clear();
  if (name != nullptr && (std::strcmp(name, kUsedVersioned) == 0 || std::strcmp(name, kUsedLegacy) == 0)) {
    throw_value_error("this DLPack capsule was already consumed: a capsule can be imported once");
  }
  throw_type_error(std::string("expected a DLPack capsule named 'dltensor_versioned' or 'dltensor'; got '") +
                   (name != nullptr ? name : "(null)") + "'");
}

py::capsule export_capsule(const std::shared_ptr<Tensor>& t, bool versioned) {
  PyObject* c = versioned ? PyCapsule_New(t->export_versioned(), kVersioned, &versioned_capsule_destructor)
                          : PyCapsule_New(t->export_legacy(), kLegacy, &legacy_capsule_destructor);
  if (c == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::capsule>(c);
}

}  // namespace ferrum::python
