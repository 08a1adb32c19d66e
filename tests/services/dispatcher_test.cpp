// The data dispatcher on 1-5 ranks: every position of an epoch exactly once, pull-based load
// balancing, expired leases re-queued and late acknowledgements ignored.

#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <thread>

#include "unimsg/services/dispatcher.hpp"
#include "world_fixture.hpp"

namespace unimsg {
namespace {

using namespace std::chrono_literals;
using DispatcherTest = testing_support::WorldTest;

struct Coverage {
  double count = 0;  // positions covered by accepted ranges
  double sum = 0;    // their sum, to catch a position twice and another never
};

Coverage all_ranks(Coverage mine) {
  Coverage total;
  MPI_Allreduce(&mine.count, &total.count, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  MPI_Allreduce(&mine.sum, &total.sum, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  return total;
}

void add(Coverage& coverage, const SampleRange& range) {
  for (std::size_t p = range.begin; p < range.end; ++p) {
    coverage.count += 1;
    coverage.sum += static_cast<double>(p);
  }
}

TEST_F(DispatcherTest, EveryPositionExactlyOnce) {
  constexpr std::size_t kSize = 1000;
  DispatcherOptions options;
  options.range_size = 37;
  DataDispatcher dispatcher(*bus_, kSize, options);
  Coverage mine;
  while (const auto range = dispatcher.next()) {
    EXPECT_TRUE(dispatcher.complete(*range));
    add(mine, *range);
  }
  const Coverage total = all_ranks(mine);
  EXPECT_EQ(total.count, kSize);
  EXPECT_EQ(total.sum, kSize * (kSize - 1) / 2.0);
  if (bus_->rank() == 0) {
    const auto stats = dispatcher.stats();
    EXPECT_EQ(stats.completed, (kSize + 36) / 37);
    EXPECT_EQ(stats.handed_out, stats.completed);
    EXPECT_EQ(stats.requeued, 0u);
  }
  MPI_Barrier(MPI_COMM_WORLD);  // rank 0 serves until everyone is done
}

TEST_F(DispatcherTest, ASlowerRankTakesFewerRanges) {
  if (bus_->size() < 2) GTEST_SKIP() << "needs two ranks to compare";
  DispatcherOptions options;
  options.range_size = 10;
  DataDispatcher dispatcher(*bus_, 2000, options);
  while (const auto range = dispatcher.next()) {
    if (bus_->rank() == 1) std::this_thread::sleep_for(20ms);  // the straggler
    dispatcher.complete(*range);
  }
  if (bus_->rank() == 0) {
    auto by_rank = dispatcher.stats().completed_by_rank;
    EXPECT_LT(by_rank[1], by_rank[0]) << "rank 1 was 20 ms slower per range";
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

TEST_F(DispatcherTest, AnExpiredLeaseIsRequeuedAndItsLateAckIgnored) {
  constexpr std::size_t kSize = 300;
  DispatcherOptions options;
  options.range_size = 10;
  options.lease = 300ms;
  DataDispatcher dispatcher(*bus_, kSize, options);
  const int hanger = bus_->size() - 1;
  Coverage mine;
  bool hung = false;
  while (const auto range = dispatcher.next()) {
    if (bus_->rank() == hanger && !hung) {
      hung = true;
      std::this_thread::sleep_for(1s);  // holds its first range past the lease, as a hung rank
      EXPECT_FALSE(dispatcher.complete(*range)) << "a late acknowledgement counted";
      continue;
    }
    if (dispatcher.complete(*range)) add(mine, *range);
  }
  const Coverage total = all_ranks(mine);
  EXPECT_EQ(total.count, kSize);
  EXPECT_EQ(total.sum, kSize * (kSize - 1) / 2.0);
  if (bus_->rank() == 0) {
    const auto stats = dispatcher.stats();
    EXPECT_GE(stats.requeued, 1u);
    EXPECT_EQ(stats.late_acks, 1u);
    EXPECT_EQ(stats.completed, kSize / 10);
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

}  // namespace
}  // namespace unimsg
