#pragma once

// The engine (Horovod's design): ranks submit named tensors in any order; a background thread
// agrees, cycle by cycle, which tensors every rank has submitted, and reduces them, fused into as
// few collectives as the fusion threshold allows.
//
// Each cycle every rank contributes one small byte-vector allreduce (max): a byte per cached
// tensor (ready here, not submitted here, entry no longer matching here), and flags (has new
// tensors, stopping, not joined). Where the same batch was reduced alone in the last two cycles
// that reduced anything, the next cycle speculates on it: the byte vector rides on that
// batch's allreduce (Communicator::allreduce_if_agreed), which reduces it only if every rank
// was ready for it and leaves every tensor untouched otherwise; then the cycle goes on with the
// agreed bytes as if they had had an allreduce of their own.
// In steady state (every tensor already negotiated once) that allreduce is all the negotiation
// there is. New tensors go to rank 0 over the bus; rank 0 matches them across ranks, checks
// dtype, count, op, compression and memory (host or device; a mismatch fails the tensor on every
// rank with a MismatchError naming the ranks), watches for stalls, and publishes the responses;
// every rank then executes the same responses in the same order and caches them.

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "unimsg/collectives/communicator.hpp"
#include "unimsg/kernels/compressor.hpp"
#include "unimsg/trace/trace.hpp"

namespace unimsg {

class Bus;  // the negotiation travels over it (unimsg/bus/bus.hpp): no MPI header here

struct EngineOptions {
  // Tensors of one dtype and op are packed into buffers of up to this many bytes
  // (UNIMSG_FUSION_THRESHOLD, e.g. "64M"; 0 disables fusion).
  std::uint64_t fusion_threshold_bytes = 64ull << 20;
  // Time between cycles (UNIMSG_CYCLE_TIME_MS, may be fractional, e.g. "0.5").
  std::chrono::microseconds cycle_time{1000};
  // Negotiated tensors remembered (UNIMSG_CACHE_CAPACITY; 0 disables the cache).
  std::size_t cache_capacity = 1024;
  // Rank 0 warns about a tensor that some ranks submitted and others have not after this long
  // (UNIMSG_STALL_CHECK_TIME_S), naming both...
  std::chrono::seconds stall_warning{60};
  // ...and fails it on the ranks that did submit it after this long (UNIMSG_STALL_SHUTDOWN_TIME_S;
  // 0 = only warn).
  std::chrono::seconds stall_abort{0};
  // Where the engine records its activity for a timeline (negotiate, wait_for_data, fuse,
  // allreduce, compress...); null: nothing is recorded. Must outlive the engine.
  TraceRecorder* trace = nullptr;
  // Reduces the tensors in device memory: a communicator over the same ranks in the same order
  // (an NcclCommunicator), which the engine splits for its own traffic; it must outlive the
  // engine. Null: device tensors go through the engine's communicator (MPI stages them through
  // host memory). The negotiation and the cycle's agreement stay on the host communicator.
  Communicator* device_communicator = nullptr;
  // Let a steady state's cycle agreement ride on the batch it expects (UNIMSG_ENGINE_SPECULATE,
  // default on; off: one agreement allreduce of its own every cycle, as before).
  bool speculate = true;

  static EngineOptions from_env();
};

struct EngineStats {
  std::uint64_t cycles = 0;
  std::uint64_t negotiation_rounds = 0;  // cycles that needed rank 0 (new or invalidated tensors)
  std::uint64_t cache_hits = 0;          // tensors reduced without negotiation
  std::uint64_t tensors_reduced = 0;
  std::uint64_t collectives = 0;  // allreduce calls issued for tensors (fused ones count once)
  // Fused collectives over tensors that lay back to back in memory: no fusion-buffer copies.
  std::uint64_t fused_in_place = 0;
  std::uint64_t bytes_reduced = 0;
  // Bytes this rank sent for tensors (uncompressed ones: the ring equivalent 2(n-1)/n x bytes).
  std::uint64_t wire_bytes = 0;
  // What wire_bytes would have been without compression (the ring equivalent of every tensor):
  // dense_wire_bytes / wire_bytes is the compression ratio.
  std::uint64_t dense_wire_bytes = 0;
  // Time the engine thread spent reducing tensors (collectives, fusion copies, compression).
  double communication_seconds = 0;
  // Time callers spent blocked in wait() on the engine's work (waiting for peers and for the
  // reductions that did not overlap their computation).
  double wait_seconds = 0;
  // Compressed reductions whose gradients held NaN/Inf on some rank (result NaN, step to skip).
  std::uint64_t nonfinite_steps = 0;
  // Times the engine thread woke from its sleep: for a due cycle, the idle tick, a hand-off or
  // shutdown. A thread blocked in wait() runs its own cycles without waking it.
  std::uint64_t engine_thread_wakeups = 0;
  // Cycles that expected the batch the cycles before reduced, and sent their agreement with its
  // data in one collective (where the communicator can: one host, shared memory)...
  std::uint64_t speculations = 0;
  // ...and those where every rank was ready for it: the batch was reduced, with no agreement
  // allreduce of its own.
  std::uint64_t speculations_reduced = 0;
};

// What the engine thread did, for timelines and tests: one event when a (possibly fused)
// allreduce starts and one when it ends.
struct EngineEvent {
  enum class Type { kReduceStart, kReduceEnd };
  Type type = Type::kReduceStart;
  std::vector<std::string> tensors;  // the names reduced together
  std::uint64_t bytes = 0;
  std::chrono::steady_clock::time_point time;
};
// Runs on the engine thread: keep it short.
using EngineListener = std::function<void(const EngineEvent&)>;

namespace detail {
struct EngineCore;
}

class Engine {
 public:
  // Collective over `communicator`, which the engine duplicates for its own traffic (so the
  // caller may keep using `communicator`). `bus` must outlive the engine.
  Engine(Communicator& communicator, Bus& bus, EngineOptions options);
  // Collective: stops every rank's engine; work still pending fails with ShutdownError.
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Reduces `tensor` in place across ranks under `name`, which must be unique among this rank's
  // pending tensors and name the same dtype, count, op and compression on every rank.
  // With a compression (f32 tensors, sum or avg), the aggregation CompressedAllreduce describes,
  // error feedback kept per tensor name (it restarts from zero with a new engine), tensors fused
  // only with tensors of the same compression. A result of NaN means some rank's gradients held
  // NaN/Inf: skip the step (error feedback is left as it was).
  // A tensor in device memory (uncompressed) goes to EngineOptions::device_communicator, and
  // lies on the GPU current on the submitting thread (one GPU per engine).
  Work submit(std::string name, TensorView tensor, ReduceOp op,
              const CompressionSpec& compression = {});
  // The same, out of place: `output` gets the result and `input` is left as it was. They must
  // not overlap unless they are the same buffer (then it is the in-place submit above).
  Work submit(std::string name, TensorView input, TensorView output, ReduceOp op,
              const CompressionSpec& compression = {});
  // Several tensors as one unit: reduced in the same cycle, fused together where they fit.
  // Tensors that lie back to back in memory, in the order the engine reduces them (the order
  // submitted, for a group or the first step), are reduced where they are, with no copy into a
  // fusion buffer.
  Work submit_group(std::vector<std::pair<std::string, TensorView>> tensors, ReduceOp op,
                    const CompressionSpec& compression = {});
  // For a rank out of data: until every rank has joined, this rank takes part in every reduction
  // the others make with zeros (avg still divides by the number of ranks). Blocks until all joined.
  void join();

  void set_fusion_threshold(std::uint64_t bytes);
  void set_cycle_time(std::chrono::microseconds cycle_time);
  // Replaces the listener (an empty one removes it).
  void set_listener(EngineListener listener);
  EngineStats stats() const;
  TraceRecorder* trace() const noexcept;

 private:
  std::shared_ptr<detail::EngineCore> core_;
};

}  // namespace unimsg
