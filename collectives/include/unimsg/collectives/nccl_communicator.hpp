#pragma once

// The NCCL backend of Communicator: device memory, one CUDA stream per communicator, the
// communicator created non-blocking (so that it can be aborted safely), its asynchronous error
// polled while waiting, and ncclCommAbort when a wait times out. Built when CUDA and NCCL are
// found (UNIMSG_WITH_NCCL); this header needs neither.

#include <mpi.h>

#include <memory>

#include "unimsg/bus/bus.hpp"
#include "unimsg/collectives/communicator.hpp"

namespace unimsg {

namespace detail {
struct NcclState;
}

class NcclCommunicator final : public Communicator {
 public:
  // Collective over `parent`, each member driving CUDA device `device`. Rank 0 draws the
  // ncclUniqueId and sends it to the members over `bus`, which must outlive this communicator.
  NcclCommunicator(MPI_Comm parent, Bus& bus, int device, CommunicatorOptions options);
  // From an already created state (split() uses it; detail::NcclState is not for users).
  explicit NcclCommunicator(std::shared_ptr<detail::NcclState> state);
  ~NcclCommunicator() override;

  int rank() const noexcept override;
  int size() const noexcept override;
  const char* backend() const noexcept override { return "nccl"; }
  const std::vector<int>& world_ranks() const noexcept override;

  std::unique_ptr<Communicator> split(std::span<const int> ranks) override;

 protected:
  Work do_allreduce(TensorView send, TensorView recv, const AllreduceOptions& options) override;
  Work do_broadcast(TensorView buffer, const BroadcastOptions& options) override;
  Work do_allgather(TensorView send, TensorView recv, const CollectiveOptions& options) override;
  Work do_allgatherv(TensorView send, TensorView recv, std::span<const std::size_t> counts,
                     const CollectiveOptions& options) override;
  Work do_reduce_scatter(TensorView send, TensorView recv,
                         const ReduceScatterOptions& options) override;
  Work do_alltoall(TensorView send, TensorView recv, const CollectiveOptions& options) override;
  Work do_barrier(const CollectiveOptions& options) override;

 private:
  std::shared_ptr<detail::NcclState> state_;
};

}  // namespace unimsg
