#pragma once

// Allreduce through shared memory among the ranks of one host (MPI-3 shared windows from
// MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)): no copy goes through MPI's point-to-point. Per
// chunk, each rank copies its input into its own segment; after a barrier it reduces its slice
// of the chunk reading every peer's segment directly, in rank order, into its own segment; after
// a second barrier every rank copies the reduced slices out of their owners' segments. Across
// hosts (every host holding as many ranks) the reduced slice is allreduced, between the two
// barriers, with the same slice on the other hosts over MPI (non-blocking): local rank l of each
// host carries slice l, all in parallel, so the slow links carry each byte once per host. The
// chunks are pipelined: chunk k+1 is copied in and reduced while chunk k crosses the hosts, and
// only then is chunk k completed and copied out. Three slots per segment make that safe with two
// barriers per chunk (chunk k+1's copy-in reuses chunk k-2's slot, whose copy-out every rank
// finished before it reached chunk k's first barrier). The barriers spin on
// per-rank epoch counters in the window (yielding the core while they wait: hosts here run more
// ranks than cores). Private to the MPI backend.

#include <mpi.h>

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "ring_across.hpp"
#include "unimsg/collectives/tensor.hpp"

namespace unimsg::detail {

class ShmAllreduce {
 public:
  static constexpr int kSlots = 3;

  // Collective over `comm`. Usable where ranks share hosts: all on this one, or every host
  // holding the same number (two or more; then each host's reduced slices are allreduced with
  // the same slices of the other hosts, over MPI). Otherwise no window is made. `chunk_bytes`:
  // each segment's slot. `host_group` > 0 (tests): every so many ranks of a host count as one.
  ShmAllreduce(MPI_Comm comm, std::size_t chunk_bytes, int host_group = 0);
  ~ShmAllreduce();
  ShmAllreduce(const ShmAllreduce&) = delete;
  ShmAllreduce& operator=(const ShmAllreduce&) = delete;

  bool usable() const noexcept { return window_ != MPI_WIN_NULL; }
  // Across hosts: each rank's host (its host's first rank), by rank of `comm`; else empty.
  const std::vector<int>& hosts() const noexcept { return hosts_; }

  // Collective, blocking: recv = op over the ranks of send (in place when send == recv); avg
  // divides the sum (integers truncate); f16 and bf16 add in f32 and round once. A peer that
  // does not reach a barrier within `timeout` is a TimeoutError.
  void allreduce(const void* send, void* recv, std::size_t count, DType dtype, ReduceOp op,
                 std::chrono::nanoseconds timeout);
  // On one host (hosts() empty), with at most kVoteBytes votes: the votes (max) and the data as
  // Communicator::allreduce_if_agreed, in the barriers the allreduce has anyway. Each rank's
  // votes go into its segment with its first chunk (none from a rank that vetoes); the first
  // barrier makes them visible; every rank folds them alike and either goes on or leaves with
  // nothing written. A veto costs the others one chunk's copy in.
  bool allreduce_if_agreed(const void* send, void* recv, std::size_t count, DType dtype,
                           ReduceOp op, std::chrono::nanoseconds timeout,
                           std::span<std::uint8_t> votes);
  static constexpr std::size_t kVoteBytes = 2048;

 private:
  // Moves the slices in flight across hosts on while it waits (they move only in MPI calls).
  void barrier(std::chrono::steady_clock::time_point deadline);
  std::byte* half(int rank, std::uint64_t slot) const noexcept;
  // One chunk's stages: in (copy in, barrier, reduce this rank's slice, start it across hosts);
  // out (wait for it, finish avg and halves, barrier, copy every slice out).
  struct Chunk {
    std::size_t start = 0;  // first element
    std::size_t count = 0;
    std::uint64_t slot = 0;
  };
  struct Call {
    const std::byte* in;
    std::byte* out;
    DType dtype;
    ReduceOp op;
    std::chrono::steady_clock::time_point deadline;
  };
  void chunk_in(const Call& call, const Chunk& chunk);
  void copy_in(const Call& call, const Chunk& chunk);
  void reduce_in(const Call& call, const Chunk& chunk);  // (after the barrier)
  // Chunks from `start` on, the first of them already in (copied and past its barrier) if
  // `first_in` is set.
  void pipeline(const Call& call, std::size_t start, std::size_t count, const Chunk* first_in);
  // A rank's vote area: two, used alternately (a rank writes one while a slower peer may still
  // read the other, which it can no longer do once past the next barrier).
  std::byte* votes_of(int rank, std::uint64_t ballot) const noexcept;
  void chunk_out(const Call& call, const Chunk& chunk);
  void wait_across(std::uint64_t slot, std::chrono::steady_clock::time_point deadline);
  void progress_across();
  // Folds the peers' slices into this rank's and starts it across hosts (if any).
  void reduce_slice(std::size_t offset, std::size_t count, DType dtype, ReduceOp op,
                    std::uint64_t slot);
  void finish_slice(std::size_t offset, std::size_t count, DType dtype, ReduceOp op,
                    std::uint64_t slot);
  // Folds the peers' block into this rank's (or, for f16/bf16, into `wide`).
  void reduce_block(std::size_t offset, std::size_t count, DType dtype, ReduceOp op,
                    std::uint64_t slot, float* wide);

  MPI_Comm node_ = MPI_COMM_NULL;   // the ranks sharing this host
  MPI_Comm cross_ = MPI_COMM_NULL;  // this local rank's peers on the other hosts (if any)
  int total_ranks_ = 1;
  std::vector<int> hosts_;
  MPI_Win window_ = MPI_WIN_NULL;
  int rank_ = 0;
  int ranks_ = 1;
  std::size_t chunk_bytes_ = 0;
  std::vector<std::byte*> bases_;                // each rank's segment, mapped here
  std::array<RingAcross, kSlots> across_;        // each slot's slice across hosts
  std::array<std::vector<float>, kSlots> wide_;  // f16/bf16 sums, per slot
  std::vector<float> widened_;
  std::uint64_t epoch_ = 0;
  std::uint64_t chunks_ = 0;   // chunks run so far (modulo kSlots: the slot)
  std::uint64_t ballots_ = 0;  // allreduce_if_agreed calls so far
};

}  // namespace unimsg::detail
