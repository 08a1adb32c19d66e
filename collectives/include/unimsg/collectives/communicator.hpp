#pragma once

// The Communicator: collectives over a group of ranks, every one asynchronous. Backends (MPI
// here; NCCL next) implement the same interface.

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "unimsg/collectives/tensor.hpp"

namespace unimsg {

// The handle of one asynchronous collective. wait() and wait_for() throw TimeoutError naming the
// operation, the tensor and the ranks that have not started it; the Work stays valid, so a caller
// may decide to wait longer instead of giving up.
class Work {
 public:
  static constexpr std::uint32_t kSpinPolls = 2000;

  // What every source of operations implements (the backends' collectives, the engine's
  // submissions): poll for completion, finish (post-process) once complete, say which ranks are
  // missing when a wait times out. Called from the thread that tests or waits.
  class State {
   public:
    virtual ~State() = default;
    virtual bool poll() = 0;  // true once complete (may throw the operation's error)
    virtual void finish() {}  // runs once, after poll() returned true
    // Sleeps until complete (true) or the deadline (false); nullopt: this state cannot sleep,
    // wait() polls instead, which is right for MPI requests that progress only when tested.
    virtual std::optional<bool> block(std::chrono::steady_clock::time_point deadline) {
      (void)deadline;
      return std::nullopt;
    }
    virtual std::string describe() const = 0;  // for timeout messages
    virtual std::string missing_ranks() const { return "unknown"; }
    // Without block(): how many times wait() polls in a tight loop before it yields the core
    // between polls.
    virtual std::uint32_t spin_polls() const { return kSpinPolls; }
    // Runs when a wait times out, before the TimeoutError (NCCL aborts its communicator here,
    // as a hung collective cannot be cancelled).
    virtual void on_timeout() {}
    virtual int rank() const = 0;
    virtual std::chrono::nanoseconds default_timeout() const = 0;  // for wait()

   private:
    friend class Work;
    bool complete_ = false;
  };

  Work() = default;
  explicit Work(std::shared_ptr<State> state);

  bool test();  // true once complete (finishes it)
  void wait(std::chrono::nanoseconds timeout);
  // The same, polling this many times in a tight loop before it yields between polls (instead
  // of the operation's own count; a state that can sleep ignores it).
  void wait(std::chrono::nanoseconds timeout, std::uint32_t spin_polls);
  void wait();  // with the communicator's default timeout
  bool valid() const noexcept { return state_ != nullptr; }
  // A Work that completes when this one has and `after` has run (description, timeout and
  // missing-rank query carried over).
  Work then(std::function<void()> after) const;

 private:
  std::shared_ptr<State> state_;
};

// Per-collective options (constructible from their leading fields: `{ReduceOp::kMax, "grad"}`).
struct AllreduceOptions {
  AllreduceOptions(ReduceOp op_ = ReduceOp::kSum, std::string_view name_ = {})
      : op(op_), name(name_) {}
  ReduceOp op;
  std::string_view name;
};
struct BroadcastOptions {
  BroadcastOptions(int root_ = 0, std::string_view name_ = {}) : root(root_), name(name_) {}
  int root;
  std::string_view name;
};
struct ReduceScatterOptions {
  ReduceScatterOptions(ReduceOp op_ = ReduceOp::kSum, std::string_view name_ = {})
      : op(op_), name(name_) {}
  ReduceOp op;
  std::string_view name;
};
// allgather, allgatherv, alltoall, barrier: only a name.
struct CollectiveOptions {
  CollectiveOptions(std::string_view name_ = {}) : name(name_) {}
  std::string_view name;
};

// A communicator's settings, read by whoever builds it (from_env() explicitly).
struct CommunicatorOptions {
  // A collective that takes longer is a fault, not a hang (UNIMSG_COLLECTIVE_TIMEOUT_S): what
  // Work::wait() without an argument waits.
  std::chrono::nanoseconds timeout = std::chrono::seconds(300);
  // How many tight polls a wait makes before it yields the core between polls
  // (UNIMSG_WAIT_SPIN_POLLS; the MPI backend's, whose requests progress only when tested).
  std::uint32_t wait_spin_polls = Work::kSpinPolls;
  // Blocking allreduces among ranks that share one host go through shared memory instead of
  // MPI (UNIMSG_HIERARCHICAL: auto, the default, where measured faster and from shm_min_bytes
  // up; on: every size; off: never). The MPI backend's.
  enum class Hierarchical { kAuto, kOn, kOff };
  Hierarchical hierarchical = Hierarchical::kAuto;
  std::uint64_t shm_min_bytes = 0;          // UNIMSG_SHM_MIN_BYTES ("256K")
  std::uint64_t shm_chunk_bytes = 1 << 20;  // per segment slot (UNIMSG_SHM_CHUNK_BYTES, "1M")
  // Tests: every so many ranks of a host count as a host of their own (0: the real hosts), so
  // that one machine runs the allreduce across hosts.
  int shm_host_ranks = 0;
  static CommunicatorOptions from_env();
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const noexcept = 0;
  virtual int size() const noexcept = 0;
  virtual const char* backend() const noexcept = 0;
  // The MPI_COMM_WORLD rank (= bus rank) of each member, by rank in this communicator.
  virtual const std::vector<int>& world_ranks() const noexcept = 0;

  // The collectives take one options struct each (as c10d's AllreduceOptions); `name` labels
  // the operation in timeouts and logs. Each forwards to the backend's do_*() (defaults live
  // here only, never in an override).
  //
  // In-place when send.data == recv.data. Counts must match (TensorView sizes are checked).
  Work allreduce(TensorView send, TensorView recv, const AllreduceOptions& options = {}) {
    return do_allreduce(send, recv, options);
  }
  // allreduce() then wait(), for a caller that would wait at once anyway (the engine thread,
  // whose cycles already agree that every rank is there): a backend may use a faster blocking
  // path. Without a timeout of its own: use it only after such an agreement.
  void allreduce_now(TensorView send, TensorView recv, const AllreduceOptions& options = {}) {
    do_allreduce_now(send, recv, options);
  }
  // An agreement and a reduction as one collective, blocking (for the engine: the readiness of
  // a batch it predicts rides on that batch's allreduce). `votes` (a byte each) is max-reduced
  // over the ranks in place; then, only if the reduced votes[0] is 0 (no rank vetoed), recv = op
  // over the ranks of send, else recv is left untouched on every rank. A rank that vetoes (its
  // own votes[0] is not 0) passes views of the same count and dtype with no data (null).
  // Returns whether the data was reduced. The votes wait up to default_timeout().
  bool allreduce_if_agreed(TensorView send, TensorView recv, std::span<std::uint8_t> votes,
                           const AllreduceOptions& options = {});
  // Whether allreduce_if_agreed() of `count` elements of `dtype` with `vote_bytes` votes costs
  // one synchronization (the votes travel with the data) rather than the votes' allreduce and
  // then the data's. The same on every rank for the same arguments.
  virtual bool agreement_rides_on_data(std::size_t count, DType dtype,
                                       std::size_t vote_bytes) const {
    (void)count, (void)dtype, (void)vote_bytes;
    return false;
  }
  Work broadcast(TensorView buffer, const BroadcastOptions& options = {}) {
    return do_broadcast(buffer, options);
  }
  // recv holds size() * send.count elements, rank r's at offset r * send.count.
  Work allgather(TensorView send, TensorView recv, const CollectiveOptions& options = {}) {
    return do_allgather(send, recv, options);
  }
  // Rank r contributes counts[r] elements; recv holds their sum, in rank order.
  Work allgatherv(TensorView send, TensorView recv, std::span<const std::size_t> counts,
                  const CollectiveOptions& options = {}) {
    return do_allgatherv(send, recv, counts, options);
  }
  // send holds N elements; rank r receives the reduction of its share: N / size() elements, one
  // more for the first N % size() ranks (reduce_scatter_share tells). In-place: send.data ==
  // recv.data, send holds all N and the share ends up at its start.
  Work reduce_scatter(TensorView send, TensorView recv, const ReduceScatterOptions& options = {}) {
    return do_reduce_scatter(send, recv, options);
  }
  // send and recv hold size() blocks of equal length; block r goes to / came from rank r.
  Work alltoall(TensorView send, TensorView recv, const CollectiveOptions& options = {}) {
    return do_alltoall(send, recv, options);
  }
  Work barrier(const CollectiveOptions& options = {}) { return do_barrier(options); }

  // A communicator over `ranks` (ranks of this one, in the new order). Collective over all ranks
  // of this communicator; returns null on ranks not in the list.
  virtual std::unique_ptr<Communicator> split(std::span<const int> ranks) = 0;

  // The share of `count` elements that rank `rank` of `size` gets from reduce_scatter.
  static std::size_t reduce_scatter_share(std::size_t count, int size, int rank) noexcept;
  static std::size_t reduce_scatter_offset(std::size_t count, int size, int rank) noexcept;

  // This rank's position in a split() list, or -1 if it is not in it; throws on entries out of
  // range or repeated.
  int split_position(std::span<const int> ranks) const;

  // Whether this rank's node runs more ranks than it has cores: a waiter that spins there may
  // take the core from the rank it waits for (the engine's waiting threads yield at once).
  virtual bool oversubscribed() const noexcept { return false; }

  // Where this communicator spans several hosts that hold as many ranks each (two or more) and
  // hierarchical collectives are on: each rank's host, by rank (ranks with the same number share
  // a host). Otherwise empty. Compression uses it to compress only what crosses hosts.
  virtual std::vector<int> hosts() const { return {}; }

  // How long Work::wait() without an argument waits for this communicator's collectives.
  void set_default_timeout(std::chrono::nanoseconds timeout) noexcept { timeout_ = timeout; }
  std::chrono::nanoseconds default_timeout() const noexcept { return timeout_; }

 protected:
  virtual Work do_allreduce(TensorView send, TensorView recv, const AllreduceOptions& options) = 0;
  virtual void do_allreduce_now(TensorView send, TensorView recv, const AllreduceOptions& options) {
    do_allreduce(send, recv, options).wait();
  }
  // Where the votes cannot ride on the data: the votes' allreduce, then the data's if agreed.
  virtual bool do_allreduce_if_agreed(TensorView send, TensorView recv,
                                      std::span<std::uint8_t> votes,
                                      const AllreduceOptions& options);
  virtual Work do_broadcast(TensorView buffer, const BroadcastOptions& options) = 0;
  virtual Work do_allgather(TensorView send, TensorView recv, const CollectiveOptions& options) = 0;
  virtual Work do_allgatherv(TensorView send, TensorView recv, std::span<const std::size_t> counts,
                             const CollectiveOptions& options) = 0;
  virtual Work do_reduce_scatter(TensorView send, TensorView recv,
                                 const ReduceScatterOptions& options) = 0;
  virtual Work do_alltoall(TensorView send, TensorView recv, const CollectiveOptions& options) = 0;
  virtual Work do_barrier(const CollectiveOptions& options) = 0;

 private:
  std::chrono::nanoseconds timeout_ = CommunicatorOptions{}.timeout;
};

}  // namespace unimsg
