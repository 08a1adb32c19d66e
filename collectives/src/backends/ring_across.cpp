#include "ring_across.hpp"

#include <utility>

#include "unimsg/bus/mpi.hpp"
#include "unimsg/collectives/communicator.hpp"

namespace unimsg::detail {
namespace {

int wrap(int index, int ranks) {
  return ((index % ranks) + ranks) % ranks;
}

}  // namespace

void RingAcross::start(MPI_Comm comm, int tag, std::byte* data, std::size_t count,
                       MPI_Datatype type, std::size_t element, Fold fold) {
  comm_ = comm;
  tag_ = tag;
  MPI_Comm_rank(comm, &rank_);
  MPI_Comm_size(comm, &ranks_);
  data_ = data;
  count_ = count;
  type_ = type;
  element_ = element;
  fold_ = std::move(fold);
  step_ = 0;
  steps_ = 2 * (ranks_ - 1);
  if (active()) post();
}

std::byte* RingAcross::block(int index) const noexcept {
  return data_ + Communicator::reduce_scatter_offset(count_, ranks_, index) * element_;
}

std::size_t RingAcross::block_count(int index) const noexcept {
  return Communicator::reduce_scatter_share(count_, ranks_, index);
}

// Reduce-scatter step s sends block (rank - s) on and receives block (rank - s - 1), which is
// folded in: after h-1 steps this rank holds block (rank + 1) whole. Allgather step s sends
// block (rank + 1 - s) on and receives block (rank - s) in place.
void RingAcross::post() {
  const int next = wrap(rank_ + 1, ranks_);
  const int previous = wrap(rank_ - 1, ranks_);
  const bool scatter = step_ < ranks_ - 1;
  const int s = scatter ? step_ : step_ - (ranks_ - 1);
  const int out = wrap(scatter ? rank_ - s : rank_ + 1 - s, ranks_);
  const int in = wrap(scatter ? rank_ - s - 1 : rank_ - s, ranks_);
  std::byte* into = block(in);
  if (scatter) {
    incoming_.resize(block_count(in) * element_);
    into = incoming_.data();
  }
  check_mpi(MPI_Irecv(into, static_cast<int>(block_count(in)), type_, previous, tag_, comm_,
                      &requests_[0]),
            rank_, "MPI_Irecv across hosts");
  check_mpi(MPI_Isend(block(out), static_cast<int>(block_count(out)), type_, next, tag_, comm_,
                      &requests_[1]),
            rank_, "MPI_Isend across hosts");
}

bool RingAcross::progress() {
  while (active()) {
    int done = 0;
    check_mpi(MPI_Testall(2, requests_.data(), &done, MPI_STATUSES_IGNORE), rank_,
              "MPI_Testall across hosts");
    if (done == 0) return false;
    if (step_ < ranks_ - 1) {
      const int in = wrap(rank_ - step_ - 1, ranks_);
      fold_(block(in), incoming_.data(), block_count(in));
    }
    if (++step_ < steps_) post();
  }
  return true;
}

void RingAcross::abandon() noexcept {
  if (requests_[0] != MPI_REQUEST_NULL) {
    MPI_Cancel(&requests_[0]);
    MPI_Wait(&requests_[0], MPI_STATUS_IGNORE);  // (a cancelled receive completes at once)
  }
  if (requests_[1] != MPI_REQUEST_NULL) MPI_Request_free(&requests_[1]);
  step_ = steps_;
}

}  // namespace unimsg::detail
