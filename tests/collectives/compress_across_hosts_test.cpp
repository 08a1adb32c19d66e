// Compression across hosts: CompressedAllreduce over a communicator whose hosts hold two ranks
// each (CommunicatorOptions::shm_host_ranks makes every two ranks of this machine a host; at 4
// and 6 ranks, 2 and 3 hosts). Only each rank's slice of its host's f32 sum crosses, compressed;
// every rank gets the same result; error feedback is kept for the slice alone and loses
// nothing; NaN on one rank skips the step everywhere; fewer bytes than one level. At 1, 2, 3 and
// 5 ranks (one host, or uneven hosts) the reducer stays one level and the same checks hold.

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "test_gradient.hpp"
#include "unimsg/collectives/compressed_allreduce.hpp"
#include "world_fixture.hpp"

namespace unimsg {
namespace {

using namespace std::chrono_literals;
using Hierarchical = CommunicatorOptions::Hierarchical;

using testing_support::gradient;

class CompressAcrossHostsTest : public testing_support::WorldTest {
 protected:
  std::unique_ptr<MpiCommunicator> hosts_of_two(Hierarchical mode) {
    CommunicatorOptions options;
    options.hierarchical = mode;
    options.shm_host_ranks = 2;
    options.timeout = 120s;
    return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, *bus_, options);
  }
  int rank() const { return comm_->rank(); }
  int ranks() const { return comm_->size(); }
  bool spans_hosts() const { return ranks() == 4 || ranks() == 6; }

  double sum_over_ranks(double value) {
    double total = 0;
    MPI_Allreduce(&value, &total, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    return total;
  }
  void expect_same_on_every_rank(const std::vector<float>& values, const std::string& what) {
    std::vector<float> first(values);
    MPI_Bcast(first.data(), static_cast<int>(first.size()), MPI_FLOAT, 0, MPI_COMM_WORLD);
    EXPECT_EQ(0, values.empty() ? 0 : std::memcmp(first.data(), values.data(), 4 * values.size()))
        << what << ": rank " << rank() << " differs from rank 0";
  }
};

const char* kSpecs[] = {"fp16", "bf16", "int8", "onebit", "topk:0.1", "topk:0.1:sampled"};

// Five steps of avg: the results, plus the worker residuals (each rank's, its slice only) and
// the server residuals (two-phase) divided among the ranks, add up to the exact sum over steps.
TEST_F(CompressAcrossHostsTest, OnlySlicesCrossAndErrorFeedbackLosesNothing) {
  auto comm = hosts_of_two(Hierarchical::kAuto);
  EXPECT_EQ(comm->hosts().empty(), !spans_hosts());
  for (const char* text : kSpecs) {
    for (const std::size_t n :
         {std::size_t{0}, std::size_t{1}, std::size_t{3}, std::size_t{1001}, std::size_t{5000}}) {
      SCOPED_TRACE(std::string(text) + " n=" + std::to_string(n));
      CompressedAllreduce reducer(*comm, CompressionSpec::parse(text));
      ASSERT_EQ(reducer.across_hosts(), spans_hosts());
      std::vector<float> residual(n, 0.0f);
      double results = 0, exact = 0;
      for (std::uint64_t step = 0; step < 5; ++step) {
        std::vector<float> data(n);
        for (std::size_t i = 0; i < n; ++i) data[i] = gradient(rank(), step, i);
        for (int r = 0; r < ranks(); ++r) {
          for (std::size_t i = 0; i < n; ++i) exact += gradient(r, step, i) / ranks();
        }
        const auto result = reducer.allreduce(data, residual, ReduceOp::kAvg, step, "t");
        ASSERT_EQ(result.nonfinite_ranks, 0u);
        expect_same_on_every_rank(data, "step " + std::to_string(step));
        for (const float v : data) results += v;  // (the same on every rank)
      }
      const auto [begin, end] = reducer.host_slice(n);
      double held = 0;
      for (std::size_t i = 0; i < n; ++i) {
        if (i < begin || i >= end) {
          ASSERT_EQ(residual[i], 0.0f) << "error feedback outside this rank's slice, at " << i;
        }
        held += residual[i];
      }
      double server = 0;
      for (const float v : reducer.server_residual("t")) server += v;
      // (Across hosts the slice is reduced as a sum, so its server residual is in sum units.)
      const double server_share = spans_hosts() ? server / ranks() : server;
      const double total = sum_over_ranks(held / ranks() + server_share);
      EXPECT_NEAR(results + total, exact, 1e-2 + 1e-6 * static_cast<double>(n))
          << "error feedback lost part of the gradient";
    }
  }
}

// onebit on 1 Mi floats: across hosts only the slices cross, so this rank puts fewer bytes on
// the wire than one level over all ranks: 2(h-1) compressed blocks of S/(2h) against 2(n-1) of
// S/n (at 4 ranks a third, at 6 two fifths).
TEST_F(CompressAcrossHostsTest, FewerBytesThanOneLevel) {
  if (!spans_hosts()) GTEST_SKIP() << "needs hosts of two ranks (4 or 6 ranks)";
  auto across = hosts_of_two(Hierarchical::kAuto);
  auto flat = hosts_of_two(Hierarchical::kOff);
  const std::size_t n = 1 << 20;
  std::uint64_t wire[2] = {};
  for (const int level : {0, 1}) {
    CompressedAllreduce reducer(level == 0 ? *across : *flat, CompressionSpec::parse("onebit"));
    std::vector<float> data(n), residual(n, 0.0f);
    for (std::size_t i = 0; i < n; ++i) data[i] = gradient(rank(), 0, i);
    wire[level] = reducer.allreduce(data, residual, ReduceOp::kAvg, 0, "t").wire_bytes;
  }
  EXPECT_GT(wire[0], 0u);
  EXPECT_LE(static_cast<double>(wire[0]), 0.4 * static_cast<double>(wire[1]))
      << wire[0] << " across hosts vs " << wire[1] << " one level";
}

// Inf on the last rank: every rank's result is NaN, and no residual moves.
TEST_F(CompressAcrossHostsTest, NonFiniteOnOneRankChangesNoState) {
  auto comm = hosts_of_two(Hierarchical::kAuto);
  for (const char* text : kSpecs) {
    SCOPED_TRACE(text);
    CompressedAllreduce reducer(*comm, CompressionSpec::parse(text));
    const std::size_t n = 3000;
    std::vector<float> residual(n, 0.0f), data(n);
    for (std::size_t i = 0; i < n; ++i) data[i] = gradient(rank(), 0, i);
    reducer.allreduce(data, residual, ReduceOp::kAvg, 0, "t");
    const std::vector<float> residual_before = residual;
    const auto server = reducer.server_residual("t");
    const std::vector<float> server_before(server.begin(), server.end());
    for (std::size_t i = 0; i < n; ++i) data[i] = gradient(rank(), 1, i);
    if (rank() == ranks() - 1) data[17] = std::numeric_limits<float>::infinity();
    const auto result = reducer.allreduce(data, residual, ReduceOp::kAvg, 1, "t");
    EXPECT_EQ(result.nonfinite_ranks, 1u);
    EXPECT_TRUE(std::all_of(data.begin(), data.end(), [](float v) { return std::isnan(v); }));
    EXPECT_EQ(residual, residual_before);
    const auto after = reducer.server_residual("t");
    EXPECT_EQ(std::vector<float>(after.begin(), after.end()), server_before);
  }
}

}  // namespace
}  // namespace unimsg
