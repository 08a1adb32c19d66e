#pragma once

// How far each member of a communicator has got, so that a timed-out collective can name the
// ranks that never started it. Every member counts the collectives it started and answers bus
// requests for that count on a topic of the communicator's own.

#include <mpi.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "unimsg/bus/bus.hpp"

namespace unimsg::detail {

// The MPI_COMM_WORLD rank (= bus rank) of each member of `comm`, by rank in `comm`.
std::vector<int> world_ranks_of(MPI_Comm comm);

class ProgressTracker {
 public:
  // Collective over `comm`: rank 0 draws the topic and broadcasts it.
  ProgressTracker(MPI_Comm comm, Bus& bus);

  // Counts one more started collective and returns its index (from 1).
  std::uint64_t start();
  // For Work::State::missing_ranks: asks every member how far it got and lists those that
  // have not started collective `index` (or did not answer), e.g. "[2, 3 (no answer)]".
  std::function<std::string()> missing_ranks(std::uint64_t index) const;
  const std::vector<int>& world_ranks() const noexcept { return state_->world_ranks; }

 private:
  struct State {
    Bus* bus = nullptr;
    std::vector<int> world_ranks;
    Topic topic = 0;
    std::atomic<std::uint64_t> started{0};
  };
  std::shared_ptr<State> state_;
  Subscription answers_;
};

}  // namespace unimsg::detail
