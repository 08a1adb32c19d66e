#include "unimsg/data/sampler.hpp"

#include <numeric>
#include <random>
#include <string>

#include "unimsg/core/error.hpp"
#include "unimsg/core/random.hpp"

namespace unimsg {
namespace {

void check_world(int rank, int world_size) {
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    throw ConfigError(
        rank, "sampler",
        "rank " + std::to_string(rank) + " is not in a world of " + std::to_string(world_size));
  }
}

// Every rank (and every build) derives the same permutation from the same seed and epoch.
constexpr auto mix = splitmix64;

}  // namespace

DistributedSampler::DistributedSampler(std::size_t dataset_size, int rank, int world_size,
                                       std::uint64_t seed, bool shuffle)
    : size_(dataset_size), rank_(rank), world_(world_size), seed_(seed), shuffle_(shuffle) {
  check_world(rank, world_size);
  set_epoch(0);
}

void DistributedSampler::set_epoch(std::uint64_t epoch, std::size_t position) {
  if (position > size_) {
    throw ConfigError(rank_, "sampler",
                      "position " + std::to_string(position) + " is past the end of an epoch of " +
                          std::to_string(size_) + " samples");
  }
  epoch_ = epoch;
  position_ = position;
  order_.resize(size_);
  std::iota(order_.begin(), order_.end(), std::size_t{0});
  if (!shuffle_) return;
  // Fisher-Yates with our own generator: std::shuffle's algorithm is not specified, and every
  // rank must agree on the order.
  std::uint64_t state = mix(seed_ ^ mix(epoch));
  for (std::size_t i = size_; i > 1; --i) {
    state = mix(state);
    const std::size_t j = static_cast<std::size_t>(state % i);
    std::swap(order_[i - 1], order_[j]);
  }
}

void DistributedSampler::reshard(int rank, int world_size) {
  check_world(rank, world_size);
  rank_ = rank;
  world_ = world_size;
}

std::size_t DistributedSampler::per_rank() const noexcept {
  return (size_ - position_) / static_cast<std::size_t>(world_);
}

std::size_t DistributedSampler::position_after(std::size_t local) const noexcept {
  return position_ + local * static_cast<std::size_t>(world_);
}

std::vector<std::size_t> DistributedSampler::indices() const {
  const std::size_t count = per_rank();
  std::vector<std::size_t> mine;
  mine.reserve(count);
  const auto world = static_cast<std::size_t>(world_);
  for (std::size_t j = 0; j < count; ++j) {
    mine.push_back(order_[position_ + static_cast<std::size_t>(rank_) + j * world]);
  }
  return mine;
}

}  // namespace unimsg
