#pragma once

// Which samples each rank trains on. The epoch's order is one permutation shared by every rank
// (a seeded shuffle of 0..N-1, different per epoch); rank r of W takes the samples at positions
// p + r, p + r + W, p + r + 2W, ... from the epoch's current position p. So the k-th batch of B/W
// samples on every rank together is exactly the k-th global batch of B samples of a single
// process, and after a re-rank to a new world size the epoch continues from position p with no
// sample repeated or skipped.

#include <cstddef>
#include <cstdint>
#include <vector>

namespace unimsg {

class DistributedSampler {
 public:
  DistributedSampler(std::size_t dataset_size, int rank, int world_size, std::uint64_t seed,
                     bool shuffle = true);

  // Starts `epoch` at global position `position` (samples already consumed by all ranks
  // together in this epoch, e.g. restored from a checkpoint).
  void set_epoch(std::uint64_t epoch, std::size_t position = 0);
  // The same epoch and position for a different world (after a re-rank).
  void reshard(int rank, int world_size);

  // This rank's samples for the rest of the epoch, in order. Every rank gets the same count:
  // the last (remaining % world_size) samples of an epoch are left out (as drop_last does), so
  // that no rank runs a step the others do not.
  std::vector<std::size_t> indices() const;
  // The epoch's order as every rank sees it (all dataset_size positions).
  const std::vector<std::size_t>& order() const noexcept { return order_; }
  // Samples per rank left in the epoch.
  std::size_t per_rank() const noexcept;

  std::uint64_t epoch() const noexcept { return epoch_; }
  std::size_t position() const noexcept { return position_; }
  // Global position after this rank consumed `local` of its indices (every rank in step).
  std::size_t position_after(std::size_t local) const noexcept;

 private:
  std::size_t size_;
  int rank_;
  int world_;
  std::uint64_t seed_;
  bool shuffle_;
  std::uint64_t epoch_ = 0;
  std::size_t position_ = 0;
  std::vector<std::size_t> order_;
};

}  // namespace unimsg
