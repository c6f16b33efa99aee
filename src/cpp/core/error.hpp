// The one exception type of the core. Its code picks the Python exception it
// becomes (see plugin.h: FM_ERROR_INVALID_ARGUMENT -> ValueError, ...).
#pragma once

#include <stdexcept>
#include <string>

#include "ferrum_moe/plugin.h"

namespace ferrum {

class Error : public std::runtime_error {
 public:
  Error(FmErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  FmErrorCode code() const noexcept { return code_; }

 private:
  FmErrorCode code_;
};

[[noreturn]] inline void throw_value_error(const std::string& message) {
  throw Error(FM_ERROR_INVALID_ARGUMENT, message);
}

[[noreturn]] inline void throw_type_error(const std::string& message) {
  throw Error(FM_ERROR_TYPE, message);
}

}  // namespace ferrum
