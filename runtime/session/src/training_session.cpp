#include "unimsg/session/training_session.hpp"

#include <utility>

#include "unimsg/services/fault.hpp"

namespace unimsg {
namespace {

EngineOptions traced(EngineOptions options, TraceRecorder* trace) {
  options.trace = trace;
  return options;
}

}  // namespace

TrainingSessionOptions TrainingSessionOptions::from_env() {
  return {HeartbeatOptions::from_env(), MonitorOptions::from_env(), CommunicatorOptions::from_env(),
          EngineOptions::from_env()};
}

CommunicationCounters communication_counters(const Engine& engine) {
  const EngineStats stats = engine.stats();
  return {stats.communication_seconds, stats.wait_seconds, stats.wire_bytes,
          stats.dense_wire_bytes};
}

namespace {

HeartbeatOptions with_hosts(HeartbeatOptions options, const std::vector<std::string>& hosts) {
  options.host_of_rank = hosts;
  return options;
}

}  // namespace

TrainingSession::TrainingSession(Runtime& runtime, TrainingSessionOptions options)
    : hosts_(gather_host_names(MPI_COMM_WORLD)),
      heartbeat_(runtime.bus(), with_hosts(std::move(options.heartbeat), hosts_),
                 abort_on_silence(hosts_), exit_when_isolated()),
      monitor_(runtime.bus(), std::move(options.monitor)),
      communicator_(MPI_COMM_WORLD, runtime.bus(), std::move(options.communicator)),
      engine_(communicator_, runtime.bus(), traced(std::move(options.engine), monitor_.trace())) {
  monitor_.watch([this] { return communication_counters(engine_); });
  monitor_.watch(heartbeat_);
}

void TrainingSession::step(std::uint64_t step, double loss, std::uint64_t samples) {
  heartbeat_.report_step(step);
  monitor_.step(step, loss, samples);
}

void TrainingSession::abort_restartable(const TimeoutError& error, std::uint64_t last_step) {
  unimsg::abort_restartable({{}, error.what(), last_step}, hosts_);
}

void TrainingSession::finish() {
  monitor_.finish();
  communicator_.barrier().wait();
  heartbeat_.stop();
}

}  // namespace unimsg
