#pragma once

// One slice's allreduce among the hosts (the ranks of one local rank on every host): a ring
// reduce-scatter, then a ring allgather, each step a non-blocking exchange with the neighbours,
// moved on by progress(). Every host's link carries 2(h-1)/h of the slice each way, both ways at
// once. Open MPI's MPI_Iallreduce was measured instead: in place on fewer than four ranks it
// reduces to a root and broadcasts, so each direction of a link idles half the time
// (docs/benchmarks.md, "Across hosts"). Private to the shared-memory allreduce.

#include <mpi.h>

#include <array>
#include <cstddef>
#include <functional>
#include <vector>

namespace unimsg::detail {

class RingAcross {
 public:
  // dst[i] = op(dst[i], src[i]) for `count` elements.
  using Fold = std::function<void(std::byte* dst, const std::byte* src, std::size_t count)>;

  // Starts the allreduce of `data` (count elements of `type`, `element` bytes each) over `comm`,
  // in place; messages carry `tag` (one per slice in flight). `data` must outlive done().
  void start(MPI_Comm comm, int tag, std::byte* data, std::size_t count, MPI_Datatype type,
             std::size_t element, Fold fold);
  // Moves it on as far as it goes without waiting; true once it is complete (or never started).
  bool progress();
  bool active() const noexcept { return step_ < steps_; }
  // Gives it up (a peer failed to arrive): the receive is cancelled, the send left to MPI.
  void abandon() noexcept;

 private:
  void post();  // the current step's send and receive
  std::byte* block(int index) const noexcept;
  std::size_t block_count(int index) const noexcept;

  MPI_Comm comm_ = MPI_COMM_NULL;
  int tag_ = 0;
  int rank_ = 0;
  int ranks_ = 1;
  std::byte* data_ = nullptr;
  std::size_t count_ = 0;
  MPI_Datatype type_ = MPI_DATATYPE_NULL;
  std::size_t element_ = 0;
  Fold fold_;
  int step_ = 0;
  int steps_ = 0;  // 2(h-1)
  std::array<MPI_Request, 2> requests_{MPI_REQUEST_NULL, MPI_REQUEST_NULL};
  std::vector<std::byte> incoming_;  // a reduce-scatter step's block before it is folded in
};

}  // namespace unimsg::detail
