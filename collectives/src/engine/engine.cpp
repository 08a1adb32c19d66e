#include "unimsg/collectives/engine.hpp"

#include <spdlog/spdlog.h>
#include <xxhash.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <span>
#include <string_view>
#include <thread>
#include <unordered_map>

#include "unimsg/bus/bus.hpp"
#include "unimsg/collectives/compressed_allreduce.hpp"
#include "unimsg/core/config.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/core/log.hpp"
#include "wake_timer.hpp"

namespace unimsg {
namespace detail {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

// With nothing pending, a rank still takes part in a cycle this often (see wait_for_next_cycle).
constexpr auto kIdleCycle = std::chrono::milliseconds(50);
// Names remembered for the duplicate check before the idle ones are forgotten.
constexpr std::size_t kMaxNames = 1 << 16;
// wait() computes its deadline (now + the collective timeout) a moment before the engine sees it.
constexpr auto kDriveSlack = std::chrono::milliseconds(100);

// Tensor names are hashed for every tensor of every step: XXH3 takes a third of the time of
// std::hash on short names.
struct NameHash {
  using is_transparent = void;
  std::size_t operator()(std::string_view name) const noexcept {
    return static_cast<std::size_t>(XXH3_64bits(name.data(), name.size()));
  }
};

struct Signature {
  DType dtype = DType::kF32;
  std::size_t count = 0;
  ReduceOp op = ReduceOp::kSum;
  std::string compression = "none";  // CompressionSpec::to_string()

  bool operator==(const Signature&) const = default;
  std::string describe() const {
    std::string text =
        std::string(to_string(dtype)) + " x" + std::to_string(count) + " " + to_string(op);
    if (compression != "none") text += " compressed " + compression;
    return text;
  }
  json to_json(const std::string& name) const {
    return {{"name", name},
            {"dtype", static_cast<int>(dtype)},
            {"count", count},
            {"op", static_cast<int>(op)},
            {"compression", compression}};
  }
};

// What a Work waits on: one tensor, or all members of a group.
struct Completion {
  std::atomic<int> remaining{0};
  std::atomic<bool> failed{false};
  std::atomic<int> sleepers{0};  // threads in wait_until()
  std::mutex mutex;
  std::condition_variable done_cv;  // waiters sleep here: a spinning waiter would take the core
  std::exception_ptr error;         // the engine thread needs on an oversubscribed machine

  void finish_one() {
    // The mutex only for a sleeper: most waits find the work done, or run the cycle that does
    // it, and a lock per tensor was a measurable part of a small tensor's cost. (Sequentially
    // consistent: the sleeper counts itself, then looks; this decrements, then looks.)
    if (remaining.fetch_sub(1) == 1 && sleepers.load() > 0) {
      std::lock_guard lock(mutex);
      done_cv.notify_all();
    }
  }
  bool finished() const {
    return failed.load(std::memory_order_acquire) || remaining.load(std::memory_order_acquire) == 0;
  }
  void fail(std::exception_ptr cause) {
    std::lock_guard lock(mutex);
    if (!failed.exchange(true)) error = std::move(cause);
    done_cv.notify_all();
  }
  bool wait_until(Clock::time_point deadline) {
    sleepers.fetch_add(1);
    bool done = false;
    {
      std::unique_lock lock(mutex);
      done = done_cv.wait_until(lock, deadline, [&] { return finished(); });
    }
    sleepers.fetch_sub(1);
    return done;
  }
};

// What a rank knows of a name it submitted (EngineCore::names).
struct NameEntry {
  bool pending = false;  // a tensor of this name is pending here (under `mutex`)
  // Where the name was last found in the cache: a hint that saves the lookup by name each
  // cycle, checked against the slot before use (the cycle's thread alone touches it).
  std::size_t cache_slot = SIZE_MAX;
};

struct LocalTensor {
  std::string name;
  TensorView input;  // what this rank contributes...
  TensorView view;   // ...and where the result goes (the same tensor when in place)
  Signature signature;
  // Set while the engine holds the tensor: it keeps the Submission the tensor lives in alive
  // (the engine releases it last thing when the tensor completes or fails).
  std::shared_ptr<Completion> completion;
  Clock::time_point submitted;      // (with a trace) or when a cycle took it in
  bool sent = false;                // announced to rank 0
  std::size_t pending_index = 0;    // where in `pending` (for removal in O(1))
  NameEntry* name_entry = nullptr;  // in EngineCore::names
  std::size_t cached = SIZE_MAX;    // cache slot it is ready in, this cycle
  std::uint64_t order = 0;          // submissions numbered on this rank
};

}  // namespace

struct EngineCore;

namespace {

// One submit() or submit_group(): its Work's state, what that Work waits on and the tensors
// themselves, in one allocation whose tensors never move, so that the engine's tables hold
// pointers and names as views into it instead of copies (allocations, copies and a Work's
// functions were most of what a small tensor cost).
class Submission final : public Work::State {
 public:
  Submission() {}  // (user-provided: make_shared then does not zero the object first)
  Completion completion;
  std::weak_ptr<EngineCore> core;  // (the Work may outlive the engine)
  std::chrono::nanoseconds collective_timeout{};
  int bus_rank = -1;
  ReduceOp op = ReduceOp::kSum;
  bool grouped = false;
  LocalTensor single;              // submit()
  std::vector<LocalTensor> group;  // submit_group()

  std::span<LocalTensor> tensors() {
    return grouped ? std::span<LocalTensor>(group) : std::span<LocalTensor>(&single, 1);
  }

  bool poll() override {
    if (completion.failed.load(std::memory_order_acquire)) {
      std::lock_guard lock(completion.mutex);
      std::rethrow_exception(completion.error);
    }
    return completion.remaining.load(std::memory_order_acquire) == 0;
  }
  std::optional<bool> block(Clock::time_point deadline) override;  // (after EngineCore)
  std::string describe() const override {
    std::string text = std::string("engine allreduce ") + to_string(op);
    if (!grouped) return text + " '" + single.name + "'";
    for (const LocalTensor& tensor : group) text += " '" + tensor.name + "'";
    return text;
  }
  std::string missing_ranks() const override {
    return "see rank 0's engine stall warnings (UNIMSG_STALL_CHECK_TIME_S)";
  }
  int rank() const override { return bus_rank; }
  std::chrono::nanoseconds default_timeout() const override { return collective_timeout; }
};

struct CacheEntry {
  std::string name;
  Signature signature;
  std::uint64_t last_used = 0;
  bool valid = false;
};

// Rank 0's view of one tensor being negotiated.
struct TableEntry {
  std::map<int, Signature> submitted;  // rank -> what it submitted
  Clock::time_point first_seen;
  bool warned = false;
};

struct Response {
  std::string name;
  Signature signature;
  std::string error;  // empty: reduce it
  bool stalled = false;
};

DType parse_dtype(int value) {
  if (value < 0 || value > static_cast<int>(DType::kU8)) throw std::out_of_range("dtype");
  return static_cast<DType>(value);
}
ReduceOp parse_op(int value) {
  if (value < 0 || value > static_cast<int>(ReduceOp::kMax)) throw std::out_of_range("op");
  return static_cast<ReduceOp>(value);
}
Signature parse_signature(const json& item) {
  Signature signature{parse_dtype(item.at("dtype").get<int>()), item.at("count").get<std::size_t>(),
                      parse_op(item.at("op").get<int>()),
                      item.at("compression").get<std::string>()};
  // Canonical on the wire: a text that does not survive a round trip was not written by a rank.
  if (CompressionSpec::parse(signature.compression).to_string() != signature.compression) {
    throw std::invalid_argument("compression '" + signature.compression + "' is not canonical");
  }
  return signature;
}

}  // namespace

struct EngineCore {
  EngineCore(Communicator& parent, Bus& bus_ref, EngineOptions opts);

  void run();
  void wait_for_next_cycle();
  // Whether a cycle is due now; else when to look again (`until`). Holds `mutex`.
  bool cycle_due(bool pending_here, Clock::time_point* until) const;
  // Holds `mutex`: moves the sleeping engine thread's wake-up to the time cycle_due gives now
  // (earlier for a new batch, later once a waiting thread has taken the cycle), or wakes it
  // if a cycle is due. Moving it does not wake it: no context switch.
  void retime_engine();
  // A thread blocked in wait() runs cycles itself until `completion` is done (true) or the
  // deadline passed (false).
  bool drive(Completion& completion, Clock::time_point deadline);
  // A user thread starts (+1) or ends (-1) blocking on the engine's work.
  void user_waits(int change);
  // One cycle; `on_waiting_thread`: run by a thread blocked in wait() (drive), not the engine
  // thread.
  bool cycle(bool on_waiting_thread);
  void negotiate(bool joined_here, std::vector<Response>& responses);
  void coordinate(std::vector<Response>& responses);
  void execute(const std::vector<std::size_t>& hits, const std::vector<Response>& responses);
  void reduce_batch(std::vector<std::pair<Signature, LocalTensor*>>& batch);
  void reduce_compressed(std::vector<std::pair<Signature, LocalTensor*>>& batch, std::size_t total);
  // The batch's inputs and outputs when each lies in one piece, in batch order.
  std::optional<std::pair<TensorView, TensorView>> contiguous_span(
      const std::vector<std::pair<Signature, LocalTensor*>>& batch, std::size_t total) const;
  void complete(const std::vector<std::pair<Signature, LocalTensor*>>& batch);
  void fail_tensor(LocalTensor& tensor, std::exception_ptr error);
  // Takes a completed or failed tensor out of `pending` (whose order does not matter).
  void remove_pending(LocalTensor& tensor);
  void fail_everything(std::exception_ptr error);
  void cache_insert(const std::string& name, const Signature& signature);
  std::string rank_list(const std::set<int>& ranks) const;

  std::unique_ptr<Communicator> comm;
  Bus& bus;
  EngineOptions options;
  std::shared_ptr<spdlog::logger> log;
  int rank = 0;
  int size = 1;
  Topic request_topic = 0;
  Topic response_topic = 0;

  // Submissions, handed from user threads to the engine thread.
  std::mutex mutex;
  std::condition_variable join_cv;
  WakeTimer timer;  // the engine thread sleeps on it (see wait_for_next_cycle)
  std::vector<LocalTensor*> incoming;
  // The names this rank submitted, each with whether a tensor of that name is pending here
  // (for the duplicate check) and a cache-slot hint. A step's names repeat, so in steady state
  // a submission finds its entry with one lookup and completion clears the flag through a
  // pointer: no set to insert into and erase from per tensor (that was a third of a small
  // tensor's cost). Entries stay (nodes do not move) until there are kMaxNames; then the idle
  // ones go.
  std::unordered_map<std::string, NameEntry, NameHash, std::equal_to<>> names;
  bool stopping = false;
  bool join_requested = false;
  int waiting_users = 0;  // threads blocked in wait() on this engine's work
  std::uint64_t next_order = 0;
  Clock::time_point first_incoming;  // when `incoming` last became non-empty
  // When the sleeping engine thread wakes next; min() while it is awake or woken (it then
  // looks at the state before it sleeps again).
  Clock::time_point engine_wakes_at = Clock::time_point::min();
  bool join_done = false;
  std::exception_ptr fatal;  // set once the engine thread failed
  std::atomic<std::uint64_t> fusion_threshold{0};
  std::atomic<std::int64_t> cycle_us{0};

  // Whoever runs a cycle (the engine thread, or a thread waiting in wait()) holds cycle_mutex;
  // what follows is theirs.
  std::mutex cycle_mutex;
  std::vector<LocalTensor*> pending;     // in the order they came in
  std::atomic<bool> any_pending{false};  // !pending.empty() after the last cycle, for the timer
  std::vector<CacheEntry> cache;
  std::unordered_map<std::string, std::size_t, NameHash, std::equal_to<>> cache_index;
  std::vector<LocalTensor*> slot_owner;  // this cycle: the pending tensor ready in each slot
  std::uint64_t use_clock = 0;
  std::vector<std::byte> fusion_buffer;
  // Compression: one CompressedAllreduce per spec, error feedback per tensor, and a step count
  // that advances alike on every rank (the same batches run in the same order everywhere).
  std::map<std::string, std::unique_ptr<CompressedAllreduce>> compressors;
  std::unordered_map<std::string, std::vector<float>> residuals;
  std::vector<float> fused_values, fused_residual;
  std::uint64_t compressed_steps = 0;
  std::vector<std::string> table_order;  // rank 0: first-seen order
  std::map<std::string, TableEntry> table;

  std::atomic<std::uint64_t> cycles{0}, rounds{0}, hits{0}, reduced{0}, collectives{0},
      fused_in_place{0}, bytes{0}, wire{0}, dense_wire{0}, nonfinite{0}, busy_ns{0}, wakeups{0};
  std::atomic<std::uint64_t> wait_ns{0};  // callers blocked in wait()
  Clock::time_point wait_lane_end;        // the timeline's wait_for_data lane is busy until then
  Clock::time_point last_cycle_start;     // under `mutex`
  std::mutex listener_mutex;
  std::shared_ptr<const EngineListener> listener;
  void notify(EngineEvent::Type type, const std::vector<std::pair<Signature, LocalTensor*>>& batch,
              std::uint64_t batch_bytes);
  std::thread thread;
};

// One tensor as submitted: `input` and `output` are the same view when reduced in place.
struct Submitted {
  std::string name;
  TensorView input;
  TensorView output;
};

// Both submit()s (one tensor) and submit_group() (`grouped`: any number).
Work submit_tensors(const std::shared_ptr<EngineCore>& engine, std::span<Submitted> tensors,
                    bool grouped, ReduceOp op, const CompressionSpec& compression);

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

EngineCore::EngineCore(Communicator& parent, Bus& bus_ref, EngineOptions opts)
    : bus(bus_ref), options(std::move(opts)) {
  std::vector<int> everyone(static_cast<std::size_t>(parent.size()));
  for (int r = 0; r < parent.size(); ++r) everyone[static_cast<std::size_t>(r)] = r;
  comm = parent.split(everyone);  // the engine's own: never collides with the caller's traffic
  comm->set_default_timeout(parent.default_timeout());
  rank = comm->rank();
  size = comm->size();
  log = make_rank_logger(bus.rank(), bus.size());
  fusion_threshold = options.fusion_threshold_bytes;
  cycle_us = options.cycle_time.count();
  std::uint32_t draw = 0;
  if (rank == 0) draw = std::random_device{}();
  comm->broadcast(TensorView{&draw, 1, DType::kI32}, 0, "engine.topic").wait();
  constexpr Topic kSpan = (kReservedTopicBase - kServiceTopicBase) / 2;
  request_topic = kServiceTopicBase + (draw % kSpan) * 2;
  response_topic = request_topic + 1;
}

std::string EngineCore::rank_list(const std::set<int>& ranks) const {
  std::string text = "[";
  for (const int r : ranks) text += (text.size() > 1 ? ", " : "") + std::to_string(r);
  return text + "]";
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
  // means waiting for a core twice (measured: 1 MiB in 256 tensors, 4 ranks on 2 cores, median
  // 2.2x one raw allreduce with the hand-off, 1.5x driven; docs/benchmarks.md).
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

bool EngineCore::cycle(bool on_waiting_thread) {
  cycles.fetch_add(1, std::memory_order_relaxed);
  bool stop_here = false;
  bool joined_here = false;
  {
    std::lock_guard lock(mutex);
    last_cycle_start = Clock::now();
    if (on_waiting_thread && engine_wakes_at != Clock::time_point::min() &&
        engine_wakes_at < last_cycle_start + kIdleCycle) {
      // The engine thread cannot start a cycle before this one ends (cycle_mutex): its timer
      // firing meanwhile would only wake it to block on that lock, and wake it again when the
      // lock is released — two context switches inside a long allreduce, on cores the ranks
      // need. The thread that drives re-arms the timer when it is done (retime_engine in
      // drive()).
      engine_wakes_at = last_cycle_start + kIdleCycle;
      timer.arm(engine_wakes_at);
    }
    for (LocalTensor* tensor : incoming) {
      if (tensor->submitted == Clock::time_point{}) tensor->submitted = last_cycle_start;
      tensor->pending_index = pending.size();
      pending.push_back(tensor);
    }
    incoming.clear();
    stop_here = stopping;
    joined_here = join_requested;
  }

  // Local state, a byte per cache slot: ready here, not submitted here, or no longer matching
  // here. Invalid outranks not ready, which outranks ready, so the allreduce's max is what
  // the ranks agree on (one byte where a flag each took two: a shorter allreduce every cycle).
  constexpr std::uint8_t kReady = 0, kNotReady = 1, kInvalid = 2;
  const std::size_t slots = cache.size();
  std::vector<std::uint8_t> state(slots + 3, 0);
  std::uint8_t* slot_state = state.data();
  std::uint8_t& has_new = state[slots];
  std::uint8_t& stop = state[slots + 1];
  std::uint8_t& not_joined = state[slots + 2];
  for (std::size_t i = 0; i < slots; ++i) {
    slot_state[i] = (joined_here && cache[i].valid) ? kReady : kNotReady;
  }
  const auto now = Clock::now();
  slot_owner.assign(slots, nullptr);
  for (LocalTensor* pending_tensor : pending) {
    LocalTensor& tensor = *pending_tensor;
    tensor.cached = SIZE_MAX;
    if (tensor.sent) continue;
    std::size_t slot = tensor.name_entry->cache_slot;
    if (slot >= slots || !cache[slot].valid || cache[slot].name != tensor.name) {
      const auto it = cache_index.find(tensor.name);
      slot = it == cache_index.end() ? SIZE_MAX : it->second;
      tensor.name_entry->cache_slot = slot;
    }
    if (slot == SIZE_MAX) {
      has_new = 1;
      continue;
    }
    const bool stalled =
        options.stall_warning.count() > 0 && now - tensor.submitted > options.stall_warning / 2;
    if (cache[slot].signature != tensor.signature || stalled) {
      // Renegotiate: a changed tensor must be checked, and a stalled one must reach rank 0's
      // stall inspector, which can name who is missing.
      slot_state[slot] = kInvalid;
      has_new = 1;
    } else {
      slot_state[slot] = kReady;
      tensor.cached = slot;
      slot_owner[slot] = &tensor;
    }
  }
  if (rank == 0) {
    // Stalled tensors due for a warning or an abort need a round of the stall inspector.
    for (const auto& [name, entry] : table) {
      const auto waited = now - entry.first_seen;
      if ((options.stall_abort.count() > 0 && waited > options.stall_abort) ||
          (options.stall_warning.count() > 0 && waited > options.stall_warning && !entry.warned)) {
        has_new = 1;
      }
    }
  }
  stop = stop_here ? 1 : 0;
  not_joined = joined_here ? 0 : 1;

  Work agreement = comm->allreduce(TensorView{state.data(), state.size(), DType::kU8},
                                   TensorView{state.data(), state.size(), DType::kU8},
                                   ReduceOp::kMax, "engine.state");
  if (on_waiting_thread && comm->oversubscribed()) {
    // Here the ranks this allreduce waits for are still submitting a step, some on this core:
    // spinning would take it from them, so yield from the first poll. (The engine thread's
    // cycles run beside the ranks' computation, which a yield hands the core to for a whole
    // time slice: they spin first, as every wait does. Measured, 4 ranks on 2 cores: 1 MiB as
    // 256 tensors 1.17-1.31x one raw allreduce yielding here, 1.19-1.37x spinning; training
    // no slower; every wait yielding at once cost training 4-8 %.)
    agreement.wait(comm->default_timeout(), 0);
  } else {
    agreement.wait();
  }

  if (stop) {
    fail_everything(std::make_exception_ptr(ShutdownError(
        bus.rank(), "engine", "the engine was shut down before this tensor was reduced")));
    return false;
  }
  const bool all_joined = not_joined == 0;
  // Invalid entries leave every rank's cache; their tensors are negotiated afresh.
  for (std::size_t i = 0; i < slots; ++i) {
    if (slot_state[i] != kInvalid || !cache[i].valid) continue;
    cache_index.erase(cache[i].name);
    cache[i].valid = false;
    if (slot_owner[i] != nullptr) slot_owner[i]->cached = SIZE_MAX;
    slot_owner[i] = nullptr;
  }
  std::vector<std::size_t> ready;
  if (!all_joined) {
    for (std::size_t i = 0; i < slots; ++i) {
      if (cache[i].valid && slot_state[i] == kReady) ready.push_back(i);
    }
  }
  std::vector<Response> responses;
  if (has_new) {
    rounds.fetch_add(1, std::memory_order_relaxed);
    TraceSpan span(options.trace, "engine", "negotiate");
    negotiate(joined_here, responses);
  }
  execute(ready, responses);
  any_pending.store(!pending.empty(), std::memory_order_release);
  if (all_joined && joined_here) {
    std::lock_guard lock(mutex);
    join_requested = false;
    join_done = true;
    join_cv.notify_all();
  }
  return true;
}

void EngineCore::negotiate(bool joined_here, std::vector<Response>& responses) {
  // In the order submitted: rank 0's order becomes the order of the responses, and so of the
  // cache and of every later batch, so that tensors laid out in memory in the order they are
  // submitted can be reduced where they lie (contiguous_span).
  std::vector<LocalTensor*> unsent;
  for (LocalTensor* tensor : pending) {
    if (!tensor->sent && tensor->cached == SIZE_MAX) unsent.push_back(tensor);
  }
  std::sort(unsent.begin(), unsent.end(),
            [](const LocalTensor* a, const LocalTensor* b) { return a->order < b->order; });
  json requests = json::array();
  for (LocalTensor* tensor : unsent) {
    tensor->sent = true;
    requests.push_back(tensor->signature.to_json(tensor->name));
  }
  const json message = {{"joined", joined_here}, {"requests", std::move(requests)}};
  const int coordinator = comm->world_ranks()[0];
  bus.send(coordinator,
           Message::make(Kind::kNegotiation, request_topic, Payload::from_string(message.dump())));
  if (rank == 0) coordinate(responses);
  const Message answer =
      bus.receive({Kind::kNegotiation, response_topic, coordinator}, comm->default_timeout());
  try {
    const json parsed = json::parse(answer.payload.as_string());
    responses.clear();
    for (const auto& item : parsed.at("responses")) {
      Response response;
      response.name = item.at("name").get<std::string>();
      response.signature = parse_signature(item);
      response.error = item.at("error").get<std::string>();
      response.stalled = item.at("stalled").get<bool>();
      responses.push_back(std::move(response));
    }
  } catch (const std::exception& error) {
    throw Error(bus.rank(), "engine.negotiate",
                std::string("malformed response from rank 0: ") + error.what());
  }
}

void EngineCore::coordinate(std::vector<Response>& responses) {
  std::set<int> joined;
  for (int r = 0; r < size; ++r) {
    const Message m = bus.receive(
        {Kind::kNegotiation, request_topic, comm->world_ranks()[static_cast<std::size_t>(r)]},
        comm->default_timeout());
    try {
      const json parsed = json::parse(m.payload.as_string());
      if (parsed.at("joined").get<bool>()) joined.insert(r);
      for (const auto& item : parsed.at("requests")) {
        const auto name = item.at("name").get<std::string>();
        const Signature signature = parse_signature(item);
        auto [it, inserted] = table.try_emplace(name);
        if (inserted) {
          it->second.first_seen = Clock::now();
          table_order.push_back(name);
        }
        it->second.submitted[r] = signature;
      }
    } catch (const std::exception& error) {
      throw Error(
          bus.rank(), "engine.coordinate",
          "malformed negotiation message from rank " + std::to_string(r) + ": " + error.what());
    }
  }
  const auto now = Clock::now();
  json out = json::array();
  std::vector<std::string> still_open;
  for (const auto& name : table_order) {
    auto it = table.find(name);
    if (it == table.end()) continue;
    TableEntry& entry = it->second;
    std::set<int> missing;
    for (int r = 0; r < size; ++r) {
      if (!entry.submitted.count(r) && !joined.count(r)) missing.insert(r);
    }
    const Signature& first = entry.submitted.begin()->second;
    std::string error;
    bool stalled = false;
    if (missing.empty()) {
      // Everyone is in: do they agree?
      std::map<std::string, std::set<int>> by_signature;
      for (const auto& [r, signature] : entry.submitted)
        by_signature[signature.describe()].insert(r);
      if (by_signature.size() > 1) {
        error = "tensor '" + name + "' differs between ranks:";
        for (const auto& [text, ranks] : by_signature)
          error += " " + text + " on ranks " + rank_list(ranks) + ";";
      }
    } else {
      const auto waited = now - entry.first_seen;
      const auto waited_s = std::chrono::duration_cast<std::chrono::seconds>(waited).count();
      std::set<int> submitted;
      for (const auto& [r, signature] : entry.submitted) submitted.insert(r);
      if (options.stall_abort.count() > 0 && waited > options.stall_abort) {
        stalled = true;
        error = "tensor '" + name + "' stalled: submitted by ranks " + rank_list(submitted) +
                " but not by ranks " + rank_list(missing) + " for " + std::to_string(waited_s) +
                " s";
      } else {
        if (options.stall_warning.count() > 0 && waited > options.stall_warning && !entry.warned) {
          entry.warned = true;
          log->warn("engine stall: tensor '{}' submitted by ranks {} but not by ranks {} for {} s",
                    name, rank_list(submitted), rank_list(missing), waited_s);
        }
        still_open.push_back(name);
        continue;
      }
    }
    json response = first.to_json(name);
    response["error"] = error;
    response["stalled"] = stalled;
    out.push_back(std::move(response));
    table.erase(it);
  }
  table_order = std::move(still_open);
  const std::string payload = json{{"responses", std::move(out)}}.dump();
  for (const int member : comm->world_ranks()) {
    bus.send(member,
             Message::make(Kind::kNegotiation, response_topic, Payload::from_string(payload)));
  }
  (void)responses;
}

void EngineCore::cache_insert(const std::string& name, const Signature& signature) {
  if (options.cache_capacity == 0) return;
  const auto it = cache_index.find(name);
  if (it != cache_index.end()) {
    cache[it->second].signature = signature;
    cache[it->second].last_used = ++use_clock;
    return;
  }
  std::size_t slot = cache.size();
  for (std::size_t i = 0; i < cache.size(); ++i) {
    if (!cache[i].valid) {
      slot = i;
      break;
    }
  }
  if (slot == cache.size()) {
    if (cache.size() < options.cache_capacity) {
      cache.emplace_back();
    } else {
      // Least recently used; every rank makes the same choice, having run the same responses.
      slot = 0;
      for (std::size_t i = 1; i < cache.size(); ++i) {
        if (cache[i].last_used < cache[slot].last_used) slot = i;
      }
      cache_index.erase(cache[slot].name);
    }
  }
  cache[slot] = CacheEntry{name, signature, ++use_clock, true};
  cache_index[name] = slot;
}

void EngineCore::execute(const std::vector<std::size_t>& ready,
                         const std::vector<Response>& responses) {
  // The same list, in the same order, on every rank: cache hits by slot, then rank 0's responses.
  std::vector<std::pair<Signature, LocalTensor*>> items;
  items.reserve(ready.size() + responses.size());
  std::uint64_t local_hits = 0;
  for (const std::size_t slot : ready) {
    cache[slot].last_used = ++use_clock;
    LocalTensor* local = slot_owner[slot];
    if (local != nullptr) ++local_hits;
    items.emplace_back(cache[slot].signature, local);
  }
  hits.fetch_add(local_hits, std::memory_order_relaxed);
  std::unordered_map<std::string_view, LocalTensor*> by_name;  // (only rounds have responses)
  if (!responses.empty()) {
    by_name.reserve(pending.size());
    for (LocalTensor* tensor : pending) by_name.emplace(tensor->name, tensor);
  }
  for (const auto& response : responses) {
    const auto it = by_name.find(response.name);
    LocalTensor* local = it == by_name.end() ? nullptr : it->second;
    if (!response.error.empty()) {
      if (local != nullptr) {
        by_name.erase(it);
        fail_tensor(
            *local,
            response.stalled
                ? std::make_exception_ptr(TimeoutError(bus.rank(), "engine", response.error))
                : std::make_exception_ptr(MismatchError(bus.rank(), "engine", response.error)));
      }
      continue;
    }
    items.emplace_back(response.signature, local);
    cache_insert(response.name, response.signature);
  }

  std::vector<std::pair<Signature, LocalTensor*>> batch;
  std::uint64_t batch_bytes = 0;
  for (auto& item : items) {
    const std::uint64_t item_bytes = item.first.count * dtype_size(item.first.dtype);
    const bool fits = !batch.empty() && batch.front().first.dtype == item.first.dtype &&
                      batch.front().first.op == item.first.op &&
                      batch.front().first.compression == item.first.compression &&
                      // (PowerSGD approximates each tensor as the matrix it is.)
                      item.first.compression.rfind("powersgd", 0) != 0 &&
                      batch_bytes + item_bytes <= fusion_threshold.load(std::memory_order_relaxed);
    if (!batch.empty() && !fits) {
      reduce_batch(batch);
      batch.clear();
      batch_bytes = 0;
    }
    batch.push_back(item);
    batch_bytes += item_bytes;
  }
  if (!batch.empty()) reduce_batch(batch);
}

void EngineCore::reduce_batch(std::vector<std::pair<Signature, LocalTensor*>>& batch) {
  const DType dtype = batch.front().first.dtype;
  const ReduceOp op = batch.front().first.op;
  const std::size_t element = dtype_size(dtype);
  std::size_t total = 0;
  for (const auto& [signature, local] : batch) total += signature.count;
  collectives.fetch_add(1, std::memory_order_relaxed);
  bytes.fetch_add(total * element, std::memory_order_relaxed);
  const std::uint64_t dense = CompressedAllreduce::ring_allreduce_bytes(total * element, size);
  dense_wire.fetch_add(dense, std::memory_order_relaxed);
  notify(EngineEvent::Type::kReduceStart, batch, total * element);
  const auto started = Clock::now();
  std::string names;  // for the timeline
  if (options.trace != nullptr) {
    // Time this rank's tensors waited for the other ranks (from the earliest submission; the
    // lane is clipped so that consecutive batches do not overlap on it).
    auto submitted = started;
    for (const auto& [signature, local] : batch) {
      if (local == nullptr) continue;
      submitted = std::min(submitted, local->submitted);
      if (names.size() < 200) names += (names.empty() ? "" : ",") + local->name;
    }
    submitted = std::max(submitted, wait_lane_end);
    if (started > submitted) {
      options.trace->record({"engine.wait", "wait_for_data", submitted, started - submitted,
                             nlohmann::json{{"tensors", names}}.dump()});
    }
    wait_lane_end = started;
  }
  const auto args = [&] {
    return options.trace ? nlohmann::json{{"tensors", names},
                                          {"count", batch.size()},
                                          {"bytes", total * element},
                                          {"compression", batch.front().first.compression}}
                               .dump()
                         : std::string();
  };
  if (batch.front().first.compression != "none") {
    TraceSpan span(options.trace, "engine", "compressed_allreduce", args());
    reduce_compressed(batch, total);
  } else if (batch.size() == 1 && batch.front().second != nullptr) {
    wire.fetch_add(dense, std::memory_order_relaxed);
    LocalTensor* local = batch.front().second;
    TraceSpan span(options.trace, "engine", "allreduce", args());
    comm->allreduce_now(local->input, local->view, op, local->name);
  } else if (const auto span = contiguous_span(batch, total)) {
    // The tensors lie back to back in memory, in batch order (as a model's flattened gradients
    // do): reduced where they are, with no copy into or out of a fusion buffer.
    wire.fetch_add(dense, std::memory_order_relaxed);
    fused_in_place.fetch_add(1, std::memory_order_relaxed);
    TraceSpan span_trace(options.trace, "engine", "allreduce", args());
    comm->allreduce_now(span->first, span->second, op, "engine.fused");
  } else {
    // Pack (a joined rank's missing tensors as zeros), reduce once, unpack.
    std::optional<TraceSpan> fuse(std::in_place, options.trace, "engine", "fuse");
    if (fusion_buffer.size() < total * element) fusion_buffer.resize(total * element);
    std::size_t offset = 0;
    for (const auto& [signature, local] : batch) {
      const std::size_t n = signature.count * element;
      if (local != nullptr) {
        if (n != 0) std::memcpy(fusion_buffer.data() + offset, local->input.data, n);
      } else {
        std::memset(fusion_buffer.data() + offset, 0, n);
      }
      offset += n;
    }
    fuse.reset();
    const TensorView fused{fusion_buffer.data(), total, dtype, Device::kHost};
    wire.fetch_add(dense, std::memory_order_relaxed);
    {
      TraceSpan span(options.trace, "engine", "allreduce", args());
      comm->allreduce_now(fused, fused, op, "engine.fused");
    }
    TraceSpan unfuse(options.trace, "engine", "unfuse");
    offset = 0;
    for (const auto& [signature, local] : batch) {
      const std::size_t n = signature.count * element;
      if (local != nullptr && n != 0)
        std::memcpy(local->view.data, fusion_buffer.data() + offset, n);
      offset += n;
    }
  }
  busy_ns.fetch_add(
      static_cast<std::uint64_t>(std::chrono::nanoseconds(Clock::now() - started).count()),
      std::memory_order_relaxed);
  notify(EngineEvent::Type::kReduceEnd, batch, total * element);
  complete(batch);
}

std::optional<std::pair<TensorView, TensorView>> EngineCore::contiguous_span(
    const std::vector<std::pair<Signature, LocalTensor*>>& batch, std::size_t total) const {
  const LocalTensor* first = batch.front().second;
  if (first == nullptr || first->input.data == nullptr || first->view.data == nullptr) return {};
  auto* const input = static_cast<std::byte*>(first->input.data);
  auto* const output = static_cast<std::byte*>(first->view.data);
  const std::size_t element = dtype_size(first->input.dtype);
  std::size_t offset = 0;
  for (const auto& [signature, local] : batch) {
    if (local == nullptr) return {};  // a joined rank's zeros must be packed
    const std::size_t n = signature.count * element;
    if (n != 0 && (local->input.data != input + offset || local->view.data != output + offset)) {
      return {};
    }
    offset += n;
  }
  return std::pair{TensorView{input, total, first->input.dtype, Device::kHost},
                   TensorView{output, total, first->view.dtype, Device::kHost}};
}

void EngineCore::reduce_compressed(std::vector<std::pair<Signature, LocalTensor*>>& batch,
                                   std::size_t total) {
  const Signature& signature = batch.front().first;
  // Compressors work in place (with error feedback per tensor): out of place starts from a copy.
  for (const auto& [item, local] : batch) {
    if (local != nullptr && local->input.data != local->view.data && item.count != 0) {
      std::memcpy(local->view.data, local->input.data, item.count * sizeof(float));
    }
  }
  auto& compressor = compressors[signature.compression];
  if (!compressor) {
    compressor =
        std::make_unique<CompressedAllreduce>(*comm, CompressionSpec::parse(signature.compression));
    compressor->set_trace(options.trace);
  }
  const bool feedback = compressor->spec().error_feedback;
  // Error feedback is kept per tensor (a tensor may be fused with others one step and not the
  // next); the server side of the two-phase scheme per fused group.
  const auto residual_of = [&](LocalTensor* local) -> std::span<float> {
    if (!feedback || local == nullptr) return {};
    // (A tensor reduced with another compression starts a feedback of its own.)
    auto& kept = residuals[local->name + '\n' + signature.compression];
    if (kept.size() != local->view.count) kept.assign(local->view.count, 0.0f);
    return kept;
  };
  std::string key;
  for (const auto& [item, local] : batch) key += (local ? local->name : "?") + "\n";
  const std::uint64_t step = compressed_steps++;
  CompressedAllreduceResult result;
  if (batch.size() == 1 && batch.front().second != nullptr) {
    LocalTensor* local = batch.front().second;
    const std::span<float> data(static_cast<float*>(local->view.data), local->view.count);
    result = compressor->allreduce(data, residual_of(local), signature.op, step, key);
  } else {
    // Pack gradients and residuals (a joined rank's missing tensors as zeros), reduce, unpack.
    fused_values.resize(total);
    fused_residual.resize(feedback ? total : 0);
    std::size_t offset = 0;
    for (const auto& [item, local] : batch) {
      // (Empty tensors are skipped: memmove must not see their null data, UBSan says.)
      if (item.count == 0) continue;
      float* values = fused_values.data() + offset;
      float* residuals = feedback ? fused_residual.data() + offset : nullptr;
      if (local != nullptr) {
        std::copy_n(static_cast<const float*>(local->view.data), item.count, values);
        const auto kept = residual_of(local);
        if (!kept.empty()) std::copy(kept.begin(), kept.end(), residuals);
      } else {  // a joined rank's missing tensor: zeros
        std::fill_n(values, item.count, 0.0f);
        if (residuals != nullptr) std::fill_n(residuals, item.count, 0.0f);
      }
      offset += item.count;
    }
    result = compressor->allreduce(fused_values, fused_residual, signature.op, step, key);
    offset = 0;
    for (const auto& [item, local] : batch) {
      if (local != nullptr && item.count != 0) {
        std::memcpy(local->view.data, fused_values.data() + offset, item.count * sizeof(float));
        const auto kept = residual_of(local);
        if (!kept.empty()) {
          std::copy_n(fused_residual.begin() + static_cast<std::ptrdiff_t>(offset), item.count,
                      kept.begin());
        }
      }
      offset += item.count;
    }
  }
  wire.fetch_add(result.wire_bytes, std::memory_order_relaxed);
  if (result.nonfinite_ranks > 0) {
    nonfinite.fetch_add(1, std::memory_order_relaxed);
    log->warn(
        "engine: NaN/Inf in the gradients of {} rank(s) for '{}': result set to NaN, error "
        "feedback unchanged (skip this step)",
        result.nonfinite_ranks, key.substr(0, key.find('\n')));
  }
}

void EngineCore::complete(const std::vector<std::pair<Signature, LocalTensor*>>& batch) {
  std::vector<std::shared_ptr<Completion>> completions;
  completions.reserve(batch.size());
  {
    // The names are free again before a waiter can see completion and resubmit them.
    std::lock_guard lock(mutex);
    for (const auto& [signature, local] : batch) {
      if (local != nullptr) local->name_entry->pending = false;
    }
  }
  for (const auto& [signature, local] : batch) {
    if (local == nullptr) continue;
    // (Whoever waits may free the Submission once its completion is signalled: the tensor
    // leaves `pending` first.)
    remove_pending(*local);
    completions.push_back(std::move(local->completion));
  }
  reduced.fetch_add(completions.size(), std::memory_order_relaxed);
  for (const auto& completion : completions) completion->finish_one();
}

void EngineCore::remove_pending(LocalTensor& tensor) {
  LocalTensor* const last = pending.back();
  pending[tensor.pending_index] = last;
  last->pending_index = tensor.pending_index;
  pending.pop_back();
}

void EngineCore::fail_tensor(LocalTensor& tensor, std::exception_ptr error) {
  {
    std::lock_guard lock(mutex);
    tensor.name_entry->pending = false;
  }
  remove_pending(tensor);  // (before the completion is released, as in complete())
  const auto completion = std::move(tensor.completion);
  completion->fail(std::move(error));
}

void EngineCore::fail_everything(std::exception_ptr error) {
  std::vector<std::shared_ptr<Completion>> failed;
  for (LocalTensor* tensor : pending) failed.push_back(std::move(tensor->completion));
  pending.clear();
  any_pending.store(false, std::memory_order_release);
  {
    std::lock_guard lock(mutex);
    for (LocalTensor* tensor : incoming) failed.push_back(std::move(tensor->completion));
    incoming.clear();
    names.clear();  // (nothing points into it any more)
    fatal = error;
    join_done = true;
  }
  join_cv.notify_all();
  for (const auto& completion : failed) completion->fail(error);
}

void EngineCore::notify(EngineEvent::Type type,
                        const std::vector<std::pair<Signature, LocalTensor*>>& batch,
                        std::uint64_t batch_bytes) {
  std::shared_ptr<const EngineListener> current;
  {
    std::lock_guard lock(listener_mutex);
    current = listener;
  }
  if (!current) return;
  EngineEvent event;
  event.type = type;
  event.bytes = batch_bytes;
  event.time = Clock::now();
  for (const auto& [signature, local] : batch) {
    if (local != nullptr) event.tensors.push_back(local->name);
  }
  try {
    (*current)(event);
  } catch (const std::exception& error) {
    log->error("engine: listener threw: {}", error.what());
  }
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
    if (view.device != Device::kHost) {
      throw Error(rank, "engine.submit",
                  "tensor '" + name + "' is in device memory; the MPI engine takes host memory");
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
    tensor.signature = {view.dtype, view.count, op, compression_text};
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
  {
    std::lock_guard lock(engine->mutex);
    if (engine->fatal) std::rethrow_exception(engine->fatal);
    if (engine->stopping) throw ShutdownError(rank, "engine.submit", "the engine is shutting down");
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
  return out;
}

}  // namespace unimsg
