#pragma once

// The one runtime context of a Python process that imports unimsg: MPI, the bus and the
// training session's services (heartbeats and the fault handler, the monitor, the engine), and
// the process groups torch.distributed made over them. Built by the first call that needs it
// (collective: every rank makes that call), ended by finish() (collective, at the interpreter's
// exit) or abort().

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "unimsg/services/fault_injection.hpp"
#include "unimsg/services/runtime.hpp"
#include "unimsg/session/training_session.hpp"
#include "unimsg/torch/process_group.hpp"

namespace unimsg::python {

class Context {
 public:
  // The context, built on the first call.
  static Context& get();
  static bool exists() noexcept;
  // Collective: the process groups stop, the session's services end in order (a last report, a
  // barrier, the heartbeats), the bus and MPI shut down. Later calls to get() fail.
  static void finish();

  Context();
  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  Runtime& runtime() noexcept { return runtime_; }
  TrainingSession& session() noexcept { return *session_; }

  // A process group over every rank (torch.distributed's world group, or a new_group() over all
  // ranks: each gets engine names of its own). `rank` and `size` are what torch.distributed was
  // told: they must be MPI's.
  // `timeout`: init_process_group's, for collectives without one of their own.
  c10::intrusive_ptr<ProcessGroupUnimsg> create_group(int rank, int size,
                                                      std::chrono::milliseconds timeout);

  // After an optimizer step: the monitor's report, the heartbeat's step, and the fault injection
  // of UNIMSG_FAULT_INJECT (a rank killed at a step, for tests of the re-ranking).
  void step(std::uint64_t step, double loss, std::uint64_t samples);
  std::uint64_t last_step() const noexcept { return last_step_.load(); }

  // A collective that outlived its timeout: a restartable fault (unimsg-run re-ranks).
  [[noreturn]] void abort_restartable(const TimeoutError& error);

 private:
  Runtime runtime_;
  std::unique_ptr<TrainingSession> session_;
  // Each group's shutdown, for finish(): a group torch released may still complete its last
  // collectives.
  std::vector<std::function<void()>> group_joiners_;
  std::size_t groups_created_ = 0;
  std::atomic<std::uint64_t> last_step_{0};
  std::optional<FaultInjection> fault_;
};

}  // namespace unimsg::python
