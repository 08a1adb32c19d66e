#include "unimsg/collectives/engine.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <random>

#include "engine_core.hpp"
#include "unimsg/bus/bus.hpp"
#include "unimsg/core/config.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/core/log.hpp"

namespace unimsg {
namespace detail {
namespace {

// An out-of-place pair must match and must not overlap (MPI would read what it is writing).
void check_out_of_place(const TensorView& input, const TensorView& output, int rank,
                        const std::string& name) {
  if (input.data == output.data && input.count == output.count && input.dtype == output.dtype &&
      input.device == output.device) {
    return;  // in place
  }
  const auto fail = [&](const std::string& why) {
    throw Error(rank, "engine.submit", "tensor '" + name + "': " + why);
  };
  if (input.dtype != output.dtype || input.count != output.count) {
    fail("input (" + std::string(to_string(input.dtype)) + " x" + std::to_string(input.count) +
         ") and output (" + std::string(to_string(output.dtype)) + " x" +
         std::to_string(output.count) + ") differ in dtype or count");
  }
  if (input.device != output.device) fail("input and output are on different devices");
  const std::size_t bytes = input.count * dtype_size(input.dtype);
  const auto* in = static_cast<const std::byte*>(input.data);
  const auto* out = static_cast<const std::byte*>(output.data);
  if (bytes != 0 && in < out + bytes && out < in + bytes) {
    fail("input and output overlap without being the same buffer");
  }
}

}  // namespace

EngineCore::EngineCore(Communicator& parent, Bus& bus_ref, EngineOptions opts)
    : bus(bus_ref), options(std::move(opts)), stall(options.stall_warning, options.stall_abort) {
  std::vector<int> everyone(static_cast<std::size_t>(parent.size()));
  for (int r = 0; r < parent.size(); ++r) everyone[static_cast<std::size_t>(r)] = r;
  comm = parent.split(everyone);  // the engine's own: never collides with the caller's traffic
  comm->set_default_timeout(parent.default_timeout());
  if (options.device_communicator != nullptr) {
    if (options.device_communicator->size() != parent.size()) {
      throw ConfigError(parent.rank(), "engine",
                        "the device communicator has " +
                            std::to_string(options.device_communicator->size()) +
                            " ranks, the engine's " + std::to_string(parent.size()));
    }
    device_comm = options.device_communicator->split(everyone);
    device_comm->set_default_timeout(parent.default_timeout());
  }
  rank = comm->rank();
  size = comm->size();
  log = make_rank_logger(bus.rank(), bus.size());
  fusion_threshold = options.fusion_threshold_bytes;
  cycle_us = options.cycle_time.count();
  std::uint32_t draw = 0;
  if (rank == 0) draw = std::random_device{}();
  comm->broadcast(TensorView{&draw, 1, DType::kI32}, {0, "engine.topic"}).wait();
  constexpr Topic kSpan = (kReservedTopicBase - kServiceTopicBase) / 2;
  const Topic request_topic = kServiceTopicBase + (draw % kSpan) * 2;
  channel = std::make_unique<BusNegotiationChannel>(bus, *comm, request_topic, request_topic + 1);
  if (rank == 0) coordinator = std::make_unique<Coordinator>(size, stall, log);
  controller = std::make_unique<Controller>(*channel, size, coordinator.get(), bus.rank());
}

void EngineCore::run() {
  // No cycle at start: like every other, the first one waits for a reason (a first cycle taken
  // at once would split the first step's submissions wherever it fell among them).
  {
    std::lock_guard lock(mutex);
    last_cycle_start = Clock::now();
  }
  while (true) {
    wait_for_next_cycle();
    std::lock_guard cycle_lock(cycle_mutex);
    {
      // A waiting thread may have run the cycle meanwhile.
      std::lock_guard lock(mutex);
      Clock::time_point until;
      if (fatal) return;
      if (!cycle_due(any_pending.load(std::memory_order_acquire), &until)) continue;
    }
    bool keep_going = false;
    try {
      keep_going = cycle(false);
    } catch (...) {
      log->error("engine: stopped after an error; pending tensors fail");
      fail_everything(std::current_exception());
      return;
    }
    if (!keep_going) return;
  }
}

bool EngineCore::drive(Completion& completion, Clock::time_point deadline) {
  // As the bus's waiting threads drive MPI themselves: handing the cycle to the engine thread
  // and its result back costs two context switches per step, which on an oversubscribed machine
  // means waiting for a core twice (docs/benchmarks.md, the seventh session).
  while (!completion.finished()) {
    if (Clock::now() >= deadline) {
      std::lock_guard lock(mutex);
      retime_engine();  // (its timer was moved on while this thread ran cycles)
      return false;
    }
    std::unique_lock cycle_lock(cycle_mutex);
    if (completion.finished()) break;
    {
      std::lock_guard lock(mutex);
      // Shutting down or failed: the engine thread's last cycle fails what is left.
      if (fatal || stopping) {
        cycle_lock.unlock();
        return completion.wait_until(deadline);
      }
    }
    try {
      if (!cycle(true)) return true;  // shut down: everything pending failed
    } catch (...) {
      log->error("engine: stopped after an error; pending tensors fail");
      fail_everything(std::current_exception());
      cycle_lock.unlock();
      timer.wake_now();  // the engine thread sees `fatal` and ends
      return true;
    }
  }
  // Tensors of other threads still pending here are the engine thread's again (its timer may
  // be set for an idle tick); with none, its timer set for this step's batch is moved on to
  // the idle tick, so that it does not wake for nothing.
  std::lock_guard lock(mutex);
  retime_engine();
  return true;
}

void EngineCore::retime_engine() {
  if (engine_wakes_at == Clock::time_point::min()) return;  // (it looks before it sleeps)
  Clock::time_point until;
  if (fatal || cycle_due(any_pending.load(std::memory_order_acquire), &until)) {
    timer.wake_now();
    engine_wakes_at = Clock::time_point::min();
  } else if (until != engine_wakes_at) {
    timer.arm(until);
    engine_wakes_at = until;
  }
}

bool EngineCore::cycle_due(bool pending_here, Clock::time_point* until) const {
  if (stopping || join_requested) return true;
  const bool work = pending_here || !incoming.empty();
  if (work && waiting_users > 0) return true;
  const auto cycle = std::chrono::microseconds(cycle_us.load());
  *until = last_cycle_start + std::max<Clock::duration>(cycle, kIdleCycle);
  if (pending_here) *until = last_cycle_start + cycle;
  if (!incoming.empty()) *until = std::min(*until, first_incoming + cycle);
  return Clock::now() >= *until;
}

void EngineCore::wait_for_next_cycle() {
  // Every cycle is a collective: a rank that starts one holds up until all have, so a cycle is
  // started only for a reason.
  // - A thread of this rank blocks in wait() on tensors still to reduce: whatever it submits
  //   before waiting is in, so the cycle starts at once (the cycle's allreduce then paces it to
  //   the slowest rank). A step's tensors thus go out in one cycle, not split by when a timer or
  //   a preempted submitting thread happened to fall.
  // - Tensors are pending and nobody waits yet (submitted during the backward pass, say): one
  //   cycle time after the first of them came in (or after the last cycle, for tensors that
  //   other ranks have not submitted yet), so that reduction overlaps the rest of the step.
  // - Nothing pending: only a slow idle tick (kIdleCycle), which rank 0's stall inspector needs
  //   when a tensor submitted elsewhere never comes here. An idle cycle every cycle time would
  //   make every other rank's next step wait for it.
  while (true) {
    {
      std::lock_guard lock(mutex);
      Clock::time_point until;
      if (fatal || cycle_due(any_pending.load(std::memory_order_acquire), &until)) {
        engine_wakes_at = Clock::time_point::min();
        return;
      }
      // Other threads move this time (retime_engine) without waking the thread.
      engine_wakes_at = until;
      timer.arm(until);
    }
    timer.sleep();
    wakeups.fetch_add(1, std::memory_order_relaxed);
    std::lock_guard lock(mutex);
    engine_wakes_at = Clock::time_point::min();
  }
}

void EngineCore::user_waits(int change) {
  std::lock_guard lock(mutex);
  waiting_users += change;
  if (change > 0) retime_engine();  // (a cycle is due at once if this rank has work)
}
}  // namespace detail

EngineOptions EngineOptions::from_env() {
  EngineOptions options;
  if (auto v = env_size("UNIMSG_FUSION_THRESHOLD", 0, std::uint64_t{1} << 40)) {
    options.fusion_threshold_bytes = *v;
  }
  if (auto ms = env_double("UNIMSG_CYCLE_TIME_MS", 0.01, 10000)) {
    options.cycle_time = std::chrono::microseconds(static_cast<std::int64_t>(*ms * 1000));
  }
  if (auto v = env_uint("UNIMSG_CACHE_CAPACITY", 0, 1u << 20)) options.cache_capacity = *v;
  if (auto v = env_uint("UNIMSG_STALL_CHECK_TIME_S", 0, 1u << 30)) {
    options.stall_warning = std::chrono::seconds(*v);
  }
  if (auto v = env_uint("UNIMSG_STALL_SHUTDOWN_TIME_S", 0, 1u << 30)) {
    options.stall_abort = std::chrono::seconds(*v);
  }
  if (auto v = env_bool("UNIMSG_ENGINE_SPECULATE")) options.speculate = *v;
  return options;
}

Engine::Engine(Communicator& communicator, Bus& bus, EngineOptions options)
    : core_(std::make_shared<detail::EngineCore>(communicator, bus, std::move(options))) {
  core_->thread = std::thread([core = core_.get()] { core->run(); });
}

Engine::~Engine() {
  {
    std::lock_guard lock(core_->mutex);
    core_->stopping = true;
  }
  core_->timer.wake_now();
  if (core_->thread.joinable()) core_->thread.join();
}

Work Engine::submit(std::string name, TensorView tensor, ReduceOp op,
                    const CompressionSpec& compression) {
  detail::Submitted one[] = {{std::move(name), tensor, tensor}};
  return detail::submit_tensors(core_, one, false, op, compression);
}

Work Engine::submit(std::string name, TensorView input, TensorView output, ReduceOp op,
                    const CompressionSpec& compression) {
  detail::Submitted one[] = {{std::move(name), input, output}};
  return detail::submit_tensors(core_, one, false, op, compression);
}

Work Engine::submit_group(std::vector<std::pair<std::string, TensorView>> tensors, ReduceOp op,
                          const CompressionSpec& compression) {
  std::vector<detail::Submitted> group;
  group.reserve(tensors.size());
  for (auto& [name, view] : tensors) group.push_back({std::move(name), view, view});
  return detail::submit_tensors(core_, group, true, op, compression);
}

namespace detail {

std::optional<bool> Submission::block(Clock::time_point deadline) {
  if (completion.finished()) return true;
  const auto blocked = Clock::now();
  const auto count_wait = [&](EngineCore& engine) {
    engine.wait_ns.fetch_add(
        static_cast<std::uint64_t>(std::chrono::nanoseconds(Clock::now() - blocked).count()),
        std::memory_order_relaxed);
  };
  // wait() (whose deadline is the engine's collective timeout) runs the cycles on this thread.
  // A wait with a shorter timeout of its own hands them to the engine thread instead, which
  // starts one at once (see wait_for_next_cycle): a cycle stuck on a missing rank lasts up to
  // the collective timeout, and that wait must end at its deadline.
  const bool drive = deadline - blocked + kDriveSlack >= collective_timeout;
  if (const auto engine = core.lock(); engine && drive) {
    const bool done = engine->drive(completion, deadline);
    count_wait(*engine);
    return done;
  }
  if (auto engine = core.lock()) engine->user_waits(+1);  // (the Work may outlive the engine)
  const bool done = completion.wait_until(deadline);
  if (auto engine = core.lock()) {
    engine->user_waits(-1);
    count_wait(*engine);
  }
  return done;
}

Work submit_tensors(const std::shared_ptr<EngineCore>& engine, std::span<Submitted> tensors,
                    bool grouped, ReduceOp op, const CompressionSpec& compression) {
  const int rank = engine->bus.rank();
  // (Every spec that does not compress reduces alike: one text for all.)
  const std::string compression_text = compression.compresses() ? compression.to_string() : "none";
  auto submission = std::make_shared<Submission>();
  submission->core = engine;
  submission->collective_timeout = engine->comm->default_timeout();
  submission->bus_rank = rank;
  submission->op = op;
  submission->grouped = grouped;
  if (grouped) submission->group.resize(tensors.size());
  submission->completion.remaining = static_cast<int>(tensors.size());
  const std::span<LocalTensor> locals = submission->tensors();
  // (The cycle stamps tensors as it takes them in: a clock read per tensor was a tenth of what
  // a small one cost. The timeline wants the moment of submission.)
  const auto now = engine->options.trace != nullptr ? Clock::now() : Clock::time_point{};
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    auto& [name, input, view] = tensors[i];
    if (name.empty()) throw Error(rank, "engine.submit", "a tensor needs a name");
    check_out_of_place(input, view, rank, name);
    if (view.device != Device::kHost && compression.compresses()) {
      throw Error(rank, "engine.submit",
                  "tensor '" + name + "' is in device memory: the engine compresses host tensors " +
                      "only (submit it uncompressed, or a host copy)");
    }
    if (compression.compresses() &&
        (view.dtype != DType::kF32 || (op != ReduceOp::kSum && op != ReduceOp::kAvg))) {
      throw Error(rank, "engine.submit",
                  "tensor '" + name + "': compression " + compression_text +
                      " takes f32 tensors reduced with sum or avg, not " + to_string(view.dtype) +
                      " " + to_string(op));
    }
    LocalTensor& tensor = locals[i];
    tensor.name = std::move(name);
    tensor.input = input;
    tensor.view = view;
    tensor.signature = {view.dtype, view.count, op, compression_text, view.device};
    tensor.submitted = now;
  }
  if (grouped && locals.size() > 1) {
    std::set<std::string_view> names;
    for (const LocalTensor& tensor : locals) {
      if (!names.insert(tensor.name).second) {
        throw Error(rank, "engine.submit",
                    "tensor '" + tensor.name + "' appears twice in the group");
      }
    }
  }
  // Device tensors live on the GPU current where they are submitted: one per engine.
  const bool on_device = std::any_of(locals.begin(), locals.end(), [](const LocalTensor& t) {
    return t.view.device == Device::kCuda;
  });
  const int gpu = on_device ? current_device() : -1;
  {
    std::lock_guard lock(engine->mutex);
    if (engine->fatal) std::rethrow_exception(engine->fatal);
    if (engine->stopping) throw ShutdownError(rank, "engine.submit", "the engine is shutting down");
    const int known = engine->device_index.load();
    if (gpu >= 0 && known >= 0 && gpu != known) {
      throw Error(rank, "engine.submit",
                  "device tensors submitted with GPU " + std::to_string(gpu) +
                      " current; this engine's are on GPU " + std::to_string(known));
    }
    if (gpu >= 0 && known < 0) engine->device_index.store(gpu);
    if (engine->names.size() + locals.size() > kMaxNames) {
      std::erase_if(engine->names, [](const auto& entry) { return !entry.second.pending; });
    }
    for (LocalTensor& tensor : locals) {
      // (One lookup; a refused submission leaves at most idle entries behind.)
      const auto entry = engine->names.try_emplace(tensor.name).first;
      if (entry->second.pending) {
        throw Error(rank, "engine.submit",
                    "tensor '" + tensor.name + "' is already pending on this rank");
      }
      tensor.name_entry = &entry->second;
    }
    const bool first_of_batch = !locals.empty() && engine->incoming.empty();
    if (first_of_batch) engine->first_incoming = Clock::now();
    for (LocalTensor& tensor : locals) {
      tensor.name_entry->pending = true;
      tensor.order = engine->next_order++;
      // (Only now that it is accepted: the tensor keeps its Submission alive until done.)
      tensor.completion = std::shared_ptr<Completion>(submission, &submission->completion);
      engine->incoming.push_back(&tensor);
    }
    // The engine thread cycles within one cycle time where no thread wait()s before.
    if (first_of_batch) engine->retime_engine();
  }
  return Work(std::move(submission));
}

}  // namespace detail

void Engine::join() {
  std::unique_lock lock(core_->mutex);
  if (core_->fatal) std::rethrow_exception(core_->fatal);
  core_->join_requested = true;
  core_->join_done = false;
  core_->retime_engine();
  core_->join_cv.wait(lock, [&] { return core_->join_done; });
  core_->join_done = false;
  if (core_->fatal) std::rethrow_exception(core_->fatal);
}

void Engine::set_fusion_threshold(std::uint64_t bytes) {
  core_->fusion_threshold = bytes;
}

void Engine::set_listener(EngineListener listener) {
  std::lock_guard lock(core_->listener_mutex);
  core_->listener =
      listener ? std::make_shared<const EngineListener>(std::move(listener)) : nullptr;
}

void Engine::set_cycle_time(std::chrono::microseconds cycle_time) {
  std::lock_guard lock(core_->mutex);
  core_->cycle_us = cycle_time.count();
  core_->retime_engine();
}

TraceRecorder* Engine::trace() const noexcept {
  return core_->options.trace;
}

EngineStats Engine::stats() const {
  EngineStats out;
  out.cycles = core_->cycles.load();
  out.negotiation_rounds = core_->rounds.load();
  out.cache_hits = core_->hits.load();
  out.tensors_reduced = core_->reduced.load();
  out.collectives = core_->collectives.load();
  out.fused_in_place = core_->fused_in_place.load();
  out.bytes_reduced = core_->bytes.load();
  out.wire_bytes = core_->wire.load();
  out.dense_wire_bytes = core_->dense_wire.load();
  out.communication_seconds = static_cast<double>(core_->busy_ns.load()) * 1e-9;
  out.wait_seconds = static_cast<double>(core_->wait_ns.load()) * 1e-9;
  out.nonfinite_steps = core_->nonfinite.load();
  out.engine_thread_wakeups = core_->wakeups.load();
  out.speculations = core_->speculations.load();
  out.speculations_reduced = core_->speculations_reduced.load();
  return out;
}

}  // namespace unimsg
