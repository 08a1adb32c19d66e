#pragma once

// The engine's internals, shared by its parts: engine.cpp (the facade, submissions, the threads
// and when a cycle runs), engine_cycle.cpp (one cycle: the response cache's agreement, the
// negotiation round, fusion into batches), engine_reduce.cpp (a batch's reduction, compressed or
// not, and completions), negotiation.cpp (the controller and its wire).

#include <xxhash.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "negotiation.hpp"
#include "unimsg/collectives/compressed_allreduce.hpp"
#include "unimsg/collectives/engine.hpp"
#include "unimsg/kernels/device_memory.hpp"
#include "wake_timer.hpp"

namespace spdlog {
class logger;
}

namespace unimsg::detail {

// With nothing pending, a rank still takes part in a cycle this often (see wait_for_next_cycle).
constexpr auto kIdleCycle = std::chrono::milliseconds(50);
// Names remembered for the duplicate check before the idle ones are forgotten.
constexpr std::size_t kMaxNames = 1 << 16;
// wait() computes its deadline (now + the collective timeout) a moment before the engine sees it.
constexpr auto kDriveSlack = std::chrono::milliseconds(100);

// The cycle's byte per cache slot: ready here, not submitted here, or no longer matching here.
// Invalid outranks not ready, which outranks ready, so the allreduce's max is what the ranks
// agree on.
constexpr std::uint8_t kReady = 0, kNotReady = 1, kInvalid = 2;

// Tensor names are hashed for every tensor of every step: XXH3 takes a third of the time of

struct NameHash {
  using is_transparent = void;
  std::size_t operator()(std::string_view name) const noexcept {
    return static_cast<std::size_t>(XXH3_64bits(name.data(), name.size()));
  }
};

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

struct EngineCore;

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
  // The cycle's steps (cycle() runs them in this order).
  bool take_incoming(bool on_waiting_thread, bool* joined_here);
  void mark_ready_slots(std::span<std::uint8_t> slot_state, std::uint8_t* has_new, bool joined_here,
                        Clock::time_point now);
  void drop_invalid_slots(std::span<const std::uint8_t> slot_state);
  void negotiate(bool joined_here, std::vector<Response>& responses);
  // Reduces the ready slots and the responses in batches; returns the batches' count, and in
  // `single` the one batch's slots where it was the only one and a candidate for speculation.
  std::size_t execute(const std::vector<std::size_t>& hits, const std::vector<Response>& responses,
                      std::vector<std::size_t>* single);
  // Speculation (engine_speculation.cpp): the cycle's agreement riding on the data.
  // The expected batch's element count where this cycle speculates on it, else nothing.
  std::optional<std::size_t> can_speculate(std::size_t vote_bytes) const;
  bool ready_for_speculation(std::span<const std::uint8_t> slot_state, bool joined_here,
                             bool stop_here) const;
  // The cycle's agreement (`votes`: [veto, slot states..., flags]) and the speculated batch's
  // allreduce as one collective; true: the batch was reduced and completed.
  bool reduce_speculated(std::span<std::uint8_t> votes, bool ready_here, std::size_t total);
  // Counts one collective over `batch_bytes` (collectives, bytes, the ring's dense wire bytes,
  // which it returns).
  std::uint64_t count_collective(std::uint64_t batch_bytes);
  void count_busy(Clock::time_point started);
  // After a cycle that reduced `batches` batches (`single`: the only one's slots, or empty).
  void learn_speculation(std::size_t batches, std::vector<std::size_t> single);
  void reduce_batch(std::vector<std::pair<Signature, LocalTensor*>>& batch);
  std::string trace_wait_for_data(const std::vector<std::pair<Signature, LocalTensor*>>& batch,
                                  Clock::time_point started);
  // Packs (a joined rank's missing tensors as zeros), reduces once, unpacks.
  // The communicator that reduces a batch of `device` tensors.
  Communicator& reducer(Device device) const;
  void reduce_through_fusion_buffer(const std::vector<std::pair<Signature, LocalTensor*>>& batch,
                                    std::size_t total, const std::string& span_args);
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

  std::unique_ptr<Communicator> comm;
  std::unique_ptr<Communicator> device_comm;  // for device tensors (EngineOptions); may be null
  Bus& bus;
  EngineOptions options;
  std::shared_ptr<spdlog::logger> log;
  int rank = 0;
  int size = 1;
  // The negotiation: over the bus, rank 0 coordinating (coordinator null elsewhere).
  StallInspector stall;
  std::unique_ptr<BusNegotiationChannel> channel;
  std::unique_ptr<Coordinator> coordinator;
  std::unique_ptr<Controller> controller;

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
  // The batch (cache slots, in order) the engine expects next: the one the last two cycles that
  // reduced anything each reduced alone (cache hits, uncompressed, host memory). Every rank
  // derives it from what all agreed, so every rank speculates on the same batch.
  std::vector<std::size_t> speculated, last_single_batch;
  std::uint64_t use_clock = 0;
  std::vector<std::byte> fusion_buffer;
  std::unique_ptr<DeviceBuffer> device_fusion_buffer;  // made when device tensors are fused
  // The GPU of this rank's device tensors: the one current where the first was submitted
  // (mutex held to set it); -1 before any.
  std::atomic<int> device_index{-1};
  // Compression: one CompressedAllreduce per spec, error feedback per tensor, and a step count
  // that advances alike on every rank (the same batches run in the same order everywhere).
  std::map<std::string, std::unique_ptr<CompressedAllreduce>> compressors;
  std::unordered_map<std::string, std::vector<float>> residuals;
  std::vector<float> fused_values, fused_residual;
  std::uint64_t compressed_steps = 0;

  std::atomic<std::uint64_t> cycles{0}, rounds{0}, hits{0}, reduced{0}, collectives{0},
      fused_in_place{0}, bytes{0}, wire{0}, dense_wire{0}, nonfinite{0}, busy_ns{0}, wakeups{0},
      speculations{0}, speculations_reduced{0};
  std::atomic<std::uint64_t> wait_ns{0};  // callers blocked in wait()
  Clock::time_point wait_lane_end;        // the timeline's wait_for_data lane is busy until then
  Clock::time_point last_cycle_start;     // under `mutex`
  std::mutex listener_mutex;
  std::shared_ptr<const EngineListener> listener;
  void notify(EngineEvent::Type type, const std::vector<std::pair<Signature, LocalTensor*>>& batch,
              std::uint64_t batch_bytes);
  std::thread thread;
};

struct Submitted {
  std::string name;
  TensorView input;
  TensorView output;
};

// Both submit()s (one tensor) and submit_group() (`grouped`: any number).
Work submit_tensors(const std::shared_ptr<EngineCore>& engine, std::span<Submitted> tensors,
                    bool grouped, ReduceOp op, const CompressionSpec& compression);

}  // namespace unimsg::detail
