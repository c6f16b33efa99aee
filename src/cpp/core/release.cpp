#include "release.hpp"

#include <atomic>

namespace ferrum {
namespace {

std::atomic<ReleaseRunner> g_runner{nullptr};

}  // namespace

void set_release_runner(ReleaseRunner runner) { g_runner.store(runner); }

void run_release(void (*release)(void* context), void* context) {
  if (ReleaseRunner runner = g_runner.load()) {
    runner(release, context);
  } else {
    release(context);
  }
}

}  // namespace ferrum
