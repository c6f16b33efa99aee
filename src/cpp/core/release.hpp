// Where the core runs what can block on a device when the last reference to
// a Tensor, an ExpertStack or a Backend goes: a backend's deleter (a device
// free waits for the device), a stack's or a backend's destroy. An embedder
// that holds a lock while it drops references installs a runner that lets
// go of it around the call (the Python binding lets go of the GIL: a device
// free under it stalled every Python thread, docs/reliability.md); without
// one, it runs in place.
#pragma once

namespace ferrum {

// Must call release(context) exactly once, on the calling thread.
using ReleaseRunner = void (*)(void (*release)(void* context), void* context);

// Installs `runner` (nullptr: run in place) for every later release.
void set_release_runner(ReleaseRunner runner);

void run_release(void (*release)(void* context), void* context);

}  // namespace ferrum
