#pragma once

// torch.distributed over unimsg: a c10d process group (a c10d::Backend from PyTorch 2) whose
// allreduce goes through the engine (fusion of concurrent calls, the response cache, dtype and
// shape checked across ranks) and whose other collectives go straight to the communicator.
// Every call returns at once; the group's completion threads wait for the collectives in the
// order they were issued and complete each c10d Work and its future (which DDP chains its
// averaging onto), so a caller overlaps communication with computation as with Gloo or NCCL.
// Like every c10d backend, it needs the same collectives issued in the same order on every rank
// (from several threads, that order is the caller's to keep).
//
// The version-specific part is the base class and nothing else (TORCH_VERSION_MAJOR), as in
// Horovod's torch binding: torch 1.13 (Debian 12's) registers a ProcessGroup, torch 2 a Backend.

#include <torch/version.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>
#if TORCH_VERSION_MAJOR >= 2
#include <torch/csrc/distributed/c10d/Backend.hpp>
#endif

#include <chrono>
#include <cstdint>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "unimsg/collectives/communicator.hpp"
#include "unimsg/collectives/engine.hpp"
#include "unimsg/core/error.hpp"

namespace unimsg {

namespace detail {
class WorkCompletion;
}

#if TORCH_VERSION_MAJOR >= 2
using C10dBackendBase = c10d::Backend;
#else
using C10dBackendBase = c10d::ProcessGroup;
#endif

struct ProcessGroupOptions {
  // Prefix of the engine's tensor names: groups over one engine need different ones.
  std::string name_prefix = "c10d";
  // How long a collective without a timeout of its own may take (init_process_group's
  // timeout); zero or less: no limit.
  std::chrono::milliseconds timeout{30 * 60 * 1000};
  // Runs on the completion thread when a collective outlives its timeout, before the error
  // reaches the caller (under unimsg-run: abort the job so that it re-ranks the survivors).
  std::function<void(const TimeoutError&)> on_timeout;
};

class ProcessGroupUnimsg final : public C10dBackendBase {
 public:
  // `communicator` and `engine` span the same ranks in the same order and outlive the group;
  // `owner` (if any) is held until the group is destroyed.
  ProcessGroupUnimsg(Communicator& communicator, Engine& engine, ProcessGroupOptions options = {},
                     std::shared_ptr<void> owner = {});
  ~ProcessGroupUnimsg() override;

  const std::string getBackendName() const override { return "unimsg"; }

  // sum, avg, min, max (PRODUCT and the bitwise ops are not among the engine's reductions).
  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& tensors,
                                           const c10d::AllreduceOptions& options) override;
  c10::intrusive_ptr<c10d::Work> allreduce_coalesced(
      std::vector<at::Tensor>& tensors, const c10d::AllreduceCoalescedOptions& options) override;
  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& tensors,
                                           const c10d::BroadcastOptions& options) override;
  c10::intrusive_ptr<c10d::Work> allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                           std::vector<at::Tensor>& inputs,
                                           const c10d::AllgatherOptions& options) override;
  c10::intrusive_ptr<c10d::Work> _allgather_base(at::Tensor& output, at::Tensor& input,
                                                 const c10d::AllgatherOptions& options) override;
  c10::intrusive_ptr<c10d::Work> reduce_scatter(std::vector<at::Tensor>& outputs,
                                                std::vector<std::vector<at::Tensor>>& inputs,
                                                const c10d::ReduceScatterOptions& options) override;
  c10::intrusive_ptr<c10d::Work> _reduce_scatter_base(
      at::Tensor& output, at::Tensor& input, const c10d::ReduceScatterOptions& options) override;
  // Equal splits only (the communicator's alltoall).
  c10::intrusive_ptr<c10d::Work> alltoall_base(at::Tensor& output, at::Tensor& input,
                                               std::vector<std::int64_t>& output_splits,
                                               std::vector<std::int64_t>& input_splits,
                                               const c10d::AllToAllOptions& options) override;
  c10::intrusive_ptr<c10d::Work> alltoall(std::vector<at::Tensor>& outputs,
                                          std::vector<at::Tensor>& inputs,
                                          const c10d::AllToAllOptions& options) override;
  c10::intrusive_ptr<c10d::Work> barrier(const c10d::BarrierOptions& options) override;

  // The average of an f32 tensor over the ranks, in place, compressed as `compression` says,
  // through the engine under `name` (error feedback is kept per name: one name per DDP bucket).
  // Every element NaN when some rank's tensor held NaN/Inf (skip the step).
  c10::intrusive_ptr<c10d::Work> allreduce_compressed(at::Tensor& tensor, const std::string& name,
                                                      const CompressionSpec& compression);

  // Completes every collective already issued and waits for the completion threads to end;
  // later calls throw ShutdownError. Before the communicator and the engine go away.
  void shutdown();
  // What shutdown() does, as a callable that outlives the group: torch releases a group holding
  // Python's GIL, which pending callbacks may need, so a released group's threads finish on
  // their own, and whoever destroys the communicator and the engine calls this first.
  std::function<void()> joiner() const;
  // c10 calls it when the last strong reference goes: no more calls; the threads finish what
  // is pending by themselves.
  void release_resources() override;

  Engine& engine() noexcept { return engine_; }

 private:
  c10::intrusive_ptr<c10d::Work> enqueue(c10d::OpType type, std::vector<at::Tensor> outputs,
                                         std::function<void()> wait);
  void ensure_running() const;
  std::chrono::milliseconds timeout_of(std::chrono::milliseconds requested) const;
  // Compares what every rank passed to a collective (one small allgather), before anything else
  // is issued: a mismatch is a MismatchError naming the ranks on every rank, where MPI would
  // hang or truncate. `problem`: what is wrong with this rank's own arguments (it still takes
  // part, so that the others fail naming it instead of waiting for it, then fails with that).
  void check_same_on_every_rank(const char* operation, const at::Tensor& tensor, std::int64_t count,
                                std::int64_t root, std::string problem = {});
  // `problem` as for the check: the others' tensors fail naming this rank.
  c10::intrusive_ptr<c10d::Work> reduce_through_engine(std::vector<at::Tensor>& tensors,
                                                       const c10d::AllreduceOptions& options,
                                                       std::string problem = {});
  void wait_for_name(std::size_t slot);
  // A collective from `input` into `output` through the communicator (`issue`), on dense copies
  // where they are not contiguous, the output written back when it completes.
  c10::intrusive_ptr<c10d::Work> input_to_output(
      c10d::OpType type, const at::Tensor& input, at::Tensor& output,
      std::chrono::milliseconds requested_timeout,
      const std::function<Work(TensorView, TensorView)>& issue);

  Communicator& communicator_;
  Engine& engine_;
  ProcessGroupOptions options_;
  std::shared_ptr<void> owner_;
  std::mutex allreduce_mutex_;
  std::uint64_t allreduce_calls_ = 0;
  std::vector<std::shared_future<void>> name_users_;  // per name: done with by the engine
  std::uint8_t placeholder_ = 0;  // what a rank with bad allreduce arguments submits (0 bytes)
  // Buffers of shape checks that timed out: MPI may still write into them.
  std::vector<std::shared_ptr<std::vector<std::int64_t>>> abandoned_;
  std::shared_ptr<detail::WorkCompletion> completion_;
};

}  // namespace unimsg
