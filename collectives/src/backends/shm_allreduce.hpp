#pragma once

// Allreduce through shared memory among the ranks of one host (MPI-3 shared windows from
// MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)): no copy goes through MPI's point-to-point. Per
// chunk, each rank copies its input into its own segment; after a barrier it reduces its slice
// of the chunk reading every peer's segment directly, in rank order, into its own segment; after
// a second barrier every rank copies the reduced slices out of their owners' segments. Segments
// are double-buffered, so the next chunk's copy-in needs no third barrier. Across hosts (every
// host holding as many ranks) the reduced slice is allreduced, between the two barriers, with
// the same slice on the other hosts over MPI: local rank l of each host carries slice l, all in
// parallel, so the slow links carry each byte once per host. The barriers spin on
// per-rank epoch counters in the window (yielding the core while they wait: hosts here run more
// ranks than cores). Private to the MPI backend.

#include <mpi.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "unimsg/collectives/tensor.hpp"

namespace unimsg::detail {

class ShmAllreduce {
 public:
  // Collective over `comm`. Usable where ranks share hosts: all on this one, or every host
  // holding the same number (two or more; then each host's reduced slices are allreduced with
  // the same slices of the other hosts, over MPI). Otherwise no window is made. `chunk_bytes`:
  // each segment's half. `host_group` > 0 (tests): every so many ranks of a host count as one.
  ShmAllreduce(MPI_Comm comm, std::size_t chunk_bytes, int host_group = 0);
  ~ShmAllreduce();
  ShmAllreduce(const ShmAllreduce&) = delete;
  ShmAllreduce& operator=(const ShmAllreduce&) = delete;

  bool usable() const noexcept { return window_ != MPI_WIN_NULL; }

  // Collective, blocking: recv = op over the ranks of send (in place when send == recv); avg
  // divides the sum (integers truncate); f16 and bf16 add in f32 and round once. A peer that
  // does not reach a barrier within `timeout` is a TimeoutError.
  void allreduce(const void* send, void* recv, std::size_t count, DType dtype, ReduceOp op,
                 std::chrono::nanoseconds timeout);

 private:
  void barrier(std::chrono::steady_clock::time_point deadline);
  std::byte* half(int rank, std::uint64_t slot) const noexcept;
  void reduce_slice(std::size_t offset, std::size_t count, DType dtype, ReduceOp op,
                    std::uint64_t slot);
  // Folds the peers' block into this rank's (or, for f16/bf16, into `wide`).
  void reduce_block(std::size_t offset, std::size_t count, DType dtype, ReduceOp op,
                    std::uint64_t slot, float* wide);

  MPI_Comm node_ = MPI_COMM_NULL;   // the ranks sharing this host
  MPI_Comm cross_ = MPI_COMM_NULL;  // this local rank's peers on the other hosts (if any)
  int total_ranks_ = 1;
  MPI_Win window_ = MPI_WIN_NULL;
  int rank_ = 0;
  int ranks_ = 1;
  std::size_t chunk_bytes_ = 0;
  std::vector<std::byte*> bases_;  // each rank's segment, mapped here
  std::vector<float> wide_;        // f16/bf16 sums
  std::vector<float> widened_;
  std::uint64_t epoch_ = 0;
  std::uint64_t chunks_ = 0;  // chunks run so far (their parity picks the half)
};

}  // namespace unimsg::detail
