// DLPack capsules <-> ferrum::Tensor. The only place that knows capsule names.
#pragma once

#include <pybind11/pybind11.h>

#include <memory>

#include "../core/tensor.hpp"

namespace ferrum::python {

// Consumes a "dltensor_versioned" or "dltensor" capsule: renames it to
// "used_*" so its destructor no longer frees the tensor, and adopts the
// managed tensor, whose deleter then runs when the Tensor dies.
std::shared_ptr<Tensor> consume_capsule(pybind11::capsule capsule);

// A new capsule owning an export of `t`: versioned unless the consumer asked
// without max_version (or with a major version below 1).
pybind11::capsule export_capsule(const std::shared_ptr<Tensor>& t, bool versioned);

}  // namespace ferrum::python
