#pragma once

// Test hooks of the device model (tests/device_model): a CPU stand-in for the parts of libcudart
// and libnccl that the NCCL backend, device memory and the MPI backend's device staging use.
// Only builds with UNIMSG_DEVICE_MODEL=ON link it; docs/gpu.md says what it models and what only
// a device shows.

#include <nccl.h>

#include <chrono>
#include <cstdint>
#include <string>

namespace device_model {

// The next collective (or group) this process launches, on any communicator, never finishes on
// its stream, and after `after` its communicator reports `error` from ncclCommGetAsyncError (a
// peer lost, a network error): what a real NCCL does when a remote rank dies mid-collective.
// With `error` = ncclSuccess the collective hangs and nothing is reported (a peer that never
// arrives), until the communicator is aborted.
void inject_async_error(ncclResult_t error, std::chrono::milliseconds after);

// The `nth` next call (0 = the very next) to the NCCL function named `function` ("ncclReduce",
// "ncclSend", ...) returns `error` at once, as NCCL does for an argument it refuses.
void fail_call(const std::string& function, int nth, ncclResult_t error);

// ncclGroupStart calls not yet matched by ncclGroupEnd on the calling thread.
int group_depth();

// Launches (a collective, or a group's collectives on one communicator) this process handed to
// a stream.
std::uint64_t launches();

// ncclCommAbort calls this process has made.
std::uint64_t aborts();

// Live NCCL communicators in this process (made, neither aborted nor destroyed).
int live_communicators();

}  // namespace device_model
