#pragma once

// The MPI backend of Communicator: host memory, non-blocking MPI collectives on a communicator of
// its own. f16 and bf16 are reduced in f32 (converted once on the way in and once on the way
// out), never rounded at every step. When a wait times out, the members are asked over the bus
// which collectives they have started, so the error names the ranks that never arrived.

#include <mpi.h>

#include <cstdint>
#include <memory>

#include "unimsg/bus/bus.hpp"
#include "unimsg/collectives/communicator.hpp"

namespace unimsg {

namespace detail {
struct MpiCommState;
}

// The MPI datatype of `dtype`; MPI_DATATYPE_NULL for f16 and bf16, which MPI lacks.
MPI_Datatype mpi_datatype(DType dtype) noexcept;

class MpiCommunicator final : public Communicator {
 public:
  // Collective over `parent`. `bus` must span MPI_COMM_WORLD and outlive this communicator.
  MpiCommunicator(MPI_Comm parent, Bus& bus, CommunicatorOptions options);
  ~MpiCommunicator() override;

  int rank() const noexcept override;
  int size() const noexcept override;
  const char* backend() const noexcept override { return "mpi"; }
  const std::vector<int>& world_ranks() const noexcept override;

  std::unique_ptr<Communicator> split(std::span<const int> ranks) override;

  // How many tight polls wait() makes before it yields the core between polls
  // (Work::kSpinPolls; UNIMSG_WAIT_SPIN_POLLS sets it).
  std::uint32_t wait_spin_polls() const noexcept;
  // Counted at construction (MPI_Comm_split_type); a split communicator keeps its parent's.
  bool oversubscribed() const noexcept override;
  std::vector<int> hosts() const override;
  // On one host, through the shared-memory allreduce (its first barrier carries the votes).
  bool agreement_rides_on_data(std::size_t count, DType dtype,
                               std::size_t vote_bytes) const override;

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
  // Blocking MPI_Allreduce: Open MPI's tuned blocking algorithms beat its non-blocking ones on
  // large buffers (docs/architecture.md, Engine).
  void do_allreduce_now(TensorView send, TensorView recv, const AllreduceOptions& options) override;
  bool do_allreduce_if_agreed(TensorView send, TensorView recv, std::span<std::uint8_t> votes,
                              const AllreduceOptions& options) override;

 private:
  std::shared_ptr<detail::MpiCommState> state_;
};

}  // namespace unimsg
