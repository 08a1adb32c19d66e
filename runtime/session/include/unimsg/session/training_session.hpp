#pragma once

// A training program's services, built and torn down in the order they depend on each other:
// every rank's host name (for fault reports), the heartbeat watch (a silent peer aborts the job
// for unimsg-run to relaunch), the monitor (its trace is the engine's), the MPI communicator, the
// engine (watched by the monitor). finish() ends them in the order a clean exit needs.
//
//   unimsg::Runtime runtime(&argc, &argv);
//   unimsg::TrainingSession session(runtime, unimsg::TrainingSessionOptions::from_env());
//   for (...) { ...; session.engine().submit(...).wait(); session.step(step, loss, samples); }
//   session.finish();  // collective

#include <cstdint>
#include <string>
#include <vector>

#include "unimsg/collectives/engine.hpp"
#include "unimsg/collectives/mpi_communicator.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/monitor/monitor.hpp"
#include "unimsg/services/heartbeat.hpp"
#include "unimsg/services/runtime.hpp"

namespace unimsg {

struct TrainingSessionOptions {
  HeartbeatOptions heartbeat;
  MonitorOptions monitor;
  CommunicatorOptions communicator;
  EngineOptions engine;  // its trace is set to the monitor's
  static TrainingSessionOptions from_env();
};

// The monitor's view of an engine's counters.
CommunicationCounters communication_counters(const Engine& engine);

class TrainingSession {
 public:
  // Collective over MPI_COMM_WORLD.
  TrainingSession(Runtime& runtime, TrainingSessionOptions options);
  TrainingSession(const TrainingSession&) = delete;
  TrainingSession& operator=(const TrainingSession&) = delete;

  const std::vector<std::string>& host_of_rank() const noexcept { return hosts_; }
  HeartbeatWatch& heartbeat() noexcept { return heartbeat_; }
  Monitor& monitor() noexcept { return monitor_; }
  MpiCommunicator& communicator() noexcept { return communicator_; }
  Engine& engine() noexcept { return engine_; }
  // Where checkpoints and the trainer record timeline spans; null without a timeline.
  TraceRecorder* trace() noexcept { return monitor_.trace(); }

  // After each optimizer step: `step` completed steps, its loss (NaN: unknown), this rank's
  // samples in it.
  void step(std::uint64_t step, double loss, std::uint64_t samples);
  // A collective past its timeout means some rank stopped taking part: report a restartable
  // fault (fault.hpp) and abort the job.
  [[noreturn]] void abort_restartable(const TimeoutError& error, std::uint64_t last_step);
  // Collective: the monitor's last reports, then a barrier, then the heartbeats stop — every
  // rank is done before any goes quiet, so a rank still busy (rank 0 flushing a checkpoint)
  // never takes a finished one for a lost one.
  void finish();

 private:
  std::vector<std::string> hosts_;
  HeartbeatWatch heartbeat_;
  Monitor monitor_;
  MpiCommunicator communicator_;
  Engine engine_;
};

}  // namespace unimsg
