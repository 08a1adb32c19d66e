#pragma once

// The NCCL backend's per-communicator state and the rules every call on it follows (private to
// the backend): the launch lock, the abort that frees the handle, asynchronous errors, groups.

#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>

#include "progress_tracker.hpp"
#include "unimsg/bus/mpi.hpp"
#include "unimsg/kernels/device_memory.hpp"

namespace unimsg::detail {

using Clock = std::chrono::steady_clock;
using EventHandle = std::shared_ptr<std::remove_pointer_t<cudaEvent_t>>;

struct NcclState {
  MpiComm comm;  // membership and ranks on the host side
  Bus* bus = nullptr;
  std::unique_ptr<ProgressTracker> progress;
  int device = 0;
  ncclComm_t nccl = nullptr;
  cudaStream_t stream = nullptr;
  std::atomic<bool> aborted{false};
  // No thread may be inside NCCL while ncclCommAbort runs, nor touch the handle after it (abort
  // frees it): launches, polls, splits and abort take this lock, and abort clears `nccl`.
  std::mutex launch_mutex;
  std::string abort_cause;  // why it was aborted (launch_mutex held)
  // Launches in stream order whose event may not have completed (launch_mutex held). An abort
  // ends the stream's NCCL work early, which completes the events of collectives it cut short:
  // it first notes the last launch that had completed on its own.
  std::uint64_t launched = 0;
  std::deque<std::pair<std::uint64_t, EventHandle>> in_flight;
  std::uint64_t done_before_abort = 0;
  std::unique_ptr<DeviceBuffer> barrier_scratch;

  ~NcclState();
};

// NCCL's words for a failed result, with the communicator's last error when it has one.
std::string nccl_cause(ncclResult_t result, const NcclState& state);

// A call's own result (an argument NCCL refused): an Error; the communicator stays usable.
void check_nccl(ncclResult_t result, const NcclState& state, const char* what);

// Aborts the communicator once (launch_mutex held). ncclCommAbort frees it: the handle is
// cleared, and every later launch, poll or split meets `aborted` and the cause instead.
void abort_locked(NcclState& state, const std::string& cause);
void abort_communicator(NcclState& state, const std::string& cause);

[[noreturn]] void throw_aborted(const NcclState& state, const std::string& what);

// Records launch `seq`'s event (launch_mutex held), forgetting launches that have completed.
void track_launch(NcclState& state, std::uint64_t seq, EventHandle event);

// The communicator's asynchronous state (launch_mutex held): an asynchronous error is fatal to
// it (as XLA and PyTorch's watchdog treat it): it is aborted at once, so that nothing more queues
// on it and its kernels stop, and the Error carries the cause. Returns ncclSuccess or
// ncclInProgress.
ncclResult_t async_state(NcclState& state, const std::string& what);

// A non-blocking communicator reports ncclInProgress until an issued call is enqueued (or the
// communicator is initialised); wait for that (launch_mutex held), bounded.
void wait_enqueued(NcclState& state, const char* what, std::chrono::nanoseconds timeout);

// ncclGroupStart .. ncclGroupEnd (launch_mutex held). An exception between them must not leave
// the group open (the thread's later NCCL calls would queue into it): the group is closed, and
// since half of it may have been issued, the communicator aborted.
class NcclGroup {
 public:
  explicit NcclGroup(NcclState& state);
  void end();
  ~NcclGroup();
  NcclGroup(const NcclGroup&) = delete;
  NcclGroup& operator=(const NcclGroup&) = delete;

 private:
  NcclState& state_;
  bool open_ = true;
};

}  // namespace unimsg::detail
