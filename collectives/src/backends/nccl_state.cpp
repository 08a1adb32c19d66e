#include "nccl_state.hpp"

#include <thread>

#include "unimsg/core/error.hpp"
#include "unimsg/kernels/cuda_checks.hpp"

namespace unimsg::detail {

NcclState::~NcclState() {
  if (nccl != nullptr && !aborted.load()) {
    cudaSetDevice(device);
    // Flush what was issued, then free; a communicator that does not finish within the grace
    // period (a peer is gone) is aborted instead.
    ncclResult_t state = ncclCommFinalize(nccl);
    const auto deadline = Clock::now() + std::chrono::seconds(30);
    while (state == ncclInProgress && Clock::now() < deadline) {
      if (ncclCommGetAsyncError(nccl, &state) != ncclSuccess) break;
      std::this_thread::yield();
    }
    if (state == ncclSuccess) {
      ncclCommDestroy(nccl);
    } else {
      ncclCommAbort(nccl);
    }
  }
  in_flight.clear();  // (events before the stream they were recorded on)
  if (stream != nullptr) cudaStreamDestroy(stream);
}

std::string nccl_cause(ncclResult_t result, const NcclState& state) {
  std::string cause = ncclGetErrorString(result);
  if (state.nccl != nullptr) {
    const char* last = ncclGetLastError(state.nccl);
    if (last != nullptr && *last != '\0') cause += std::string(": ") + last;
  }
  return cause;
}

void check_nccl(ncclResult_t result, const NcclState& state, const char* what) {
  if (result == ncclSuccess || result == ncclInProgress) return;
  throw Error(state.comm.rank(), what, nccl_cause(result, state));
}

void abort_locked(NcclState& state, const std::string& cause) {
  if (state.aborted.exchange(true)) return;
  state.abort_cause = cause;
  // (The stream runs launches in order: those complete now finished before the abort.)
  while (!state.in_flight.empty() &&
         cudaEventQuery(state.in_flight.front().second.get()) == cudaSuccess) {
    state.done_before_abort = state.in_flight.front().first;
    state.in_flight.pop_front();
  }
  state.in_flight.clear();
  if (state.nccl != nullptr) {
    cudaSetDevice(state.device);
    ncclCommAbort(state.nccl);
    state.nccl = nullptr;
  }
}

void abort_communicator(NcclState& state, const std::string& cause) {
  std::lock_guard lock(state.launch_mutex);
  abort_locked(state, cause);
}

void throw_aborted(const NcclState& state, const std::string& what) {
  throw Error(state.comm.rank(), what, "the NCCL communicator was aborted: " + state.abort_cause);
}

void track_launch(NcclState& state, std::uint64_t seq, EventHandle event) {
  while (!state.in_flight.empty() &&
         cudaEventQuery(state.in_flight.front().second.get()) == cudaSuccess) {
    state.in_flight.pop_front();
  }
  state.in_flight.emplace_back(seq, std::move(event));
}

ncclResult_t async_state(NcclState& state, const std::string& what) {
  if (state.aborted.load()) throw_aborted(state, what);
  ncclResult_t async = ncclSuccess;
  const ncclResult_t query = ncclCommGetAsyncError(state.nccl, &async);
  const ncclResult_t failed = query != ncclSuccess ? query : async;
  if (failed == ncclSuccess || failed == ncclInProgress) return failed;
  abort_locked(state, nccl_cause(failed, state));
  throw_aborted(state, what);
}

void wait_enqueued(NcclState& state, const char* what, std::chrono::nanoseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  while (async_state(state, what) == ncclInProgress) {
    if (Clock::now() >= deadline) {
      abort_locked(
          state,
          "NCCL did not get ready within " +
              std::to_string(std::chrono::duration_cast<std::chrono::seconds>(timeout).count()) +
              " s");
      throw TimeoutError(state.comm.rank(), what,
                         state.abort_cause + "; the communicator was aborted");
    }
    std::this_thread::yield();
  }
}

NcclGroup::NcclGroup(NcclState& state) : state_(state) {
  check_nccl(ncclGroupStart(), state, "ncclGroupStart");
}

void NcclGroup::end() {
  open_ = false;
  check_nccl(ncclGroupEnd(), state_, "ncclGroupEnd");
}

NcclGroup::~NcclGroup() {
  if (!open_) return;
  ncclGroupEnd();
  abort_locked(state_, "an error inside an NCCL group left it half issued");
}

}  // namespace unimsg::detail
