#include "python_context.hpp"

#include <spdlog/spdlog.h>

#include <mutex>
#include <string>

#include "unimsg/core/error.hpp"

namespace unimsg::python {

namespace {

// The process's one context (design.md: no global mutable state beyond it).
struct Holder {
  std::mutex mutex;
  std::unique_ptr<Context> context;
  bool finished = false;
};

Holder& holder() {
  static Holder instance;
  return instance;
}

}  // namespace

Context& Context::get() {
  auto& h = holder();
  std::lock_guard lock(h.mutex);
  if (h.finished) {
    throw ShutdownError(kNoRank, "unimsg", "the runtime was finished (the interpreter is exiting)");
  }
  if (!h.context) h.context = std::make_unique<Context>();
  return *h.context;
}

bool Context::exists() noexcept {
  auto& h = holder();
  std::lock_guard lock(h.mutex);
  return h.context != nullptr;
}

void Context::finish() {
  auto& h = holder();
  std::unique_ptr<Context> context;
  {
    std::lock_guard lock(h.mutex);
    h.finished = true;
    context = std::move(h.context);
  }
  if (!context) return;
  for (const auto& join : context->group_joiners_) join();
  context->session_->finish();
  // (then the session, the bus and MPI, in reverse order of construction)
}

Context::Context()
    : runtime_(nullptr, nullptr),
      session_(std::make_unique<TrainingSession>(runtime_, TrainingSessionOptions::from_env())),
      fault_(FaultInjection::from_env()) {}

Context::~Context() = default;

c10::intrusive_ptr<ProcessGroupUnimsg> Context::create_group(int rank, int size,
                                                             std::chrono::milliseconds timeout) {
  if (size != runtime_.size() || rank != runtime_.rank()) {
    throw ConfigError(
        runtime_.rank(), "torch.distributed backend unimsg",
        "torch.distributed says rank " + std::to_string(rank) + " of " + std::to_string(size) +
            ", MPI says rank " + std::to_string(runtime_.rank()) + " of " +
            std::to_string(runtime_.size()) +
            ": unimsg takes its ranks from MPI; launch with `mpirun -np N python ...` or "
            "`unimsg-run -np N -- python ...` (torchrun starts N unrelated MPI processes; process "
            "groups over a subset of the ranks are not supported)");
  }
  ProcessGroupOptions options;
  options.on_timeout = [this](const TimeoutError& error) { abort_restartable(error); };
  // (groups are created in the same order on every rank: the same prefixes everywhere)
  options.name_prefix = "c10d" + std::to_string(groups_created_++);
  options.timeout = timeout;
  auto group = c10::make_intrusive<ProcessGroupUnimsg>(session_->communicator(), session_->engine(),
                                                       std::move(options));
  group_joiners_.push_back(group->joiner());
  return group;
}

void Context::step(std::uint64_t step, double loss, std::uint64_t samples) {
  last_step_.store(step);
  session_->step(step, loss, samples);
  if (fault_) fault_->at_step(runtime_.rank(), step);
}

void Context::abort_restartable(const TimeoutError& error) {
  session_->abort_restartable(error, last_step_.load());
}

}  // namespace unimsg::python
