// Multi-rank tests of compressed allreduce, alone and through the engine: every rank gets the
// same result; error feedback loses nothing (the results plus what the worker and server
// residuals still hold equal the exact sum over all steps); NaN/Inf on one rank leaves every
// rank's state untouched; wire bytes; bad input.

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "test_gradient.hpp"
#include "unimsg/collectives/compressed_allreduce.hpp"
#include "unimsg/collectives/engine.hpp"
#include "unimsg/core/error.hpp"
#include "world_fixture.hpp"

namespace unimsg {
namespace {

using namespace std::chrono_literals;
constexpr auto kWait = 120s;

using testing_support::gradient;

class CompressedAllreduceTest : public testing_support::WorldTest {
 protected:
  int rank() const { return comm_->rank(); }
  int ranks() const { return comm_->size(); }

  // Every rank's `values`, concatenated in rank order.
  std::vector<float> gather(const std::vector<float>& values) {
    std::vector<float> all(values.size() * static_cast<std::size_t>(ranks()));
    comm_
        ->allgather(host_view(const_cast<float*>(values.data()), values.size()),
                    host_view(all.data(), all.size()))
        .wait(kWait);
    return all;
  }
  std::vector<float> gatherv(const std::vector<float>& values) {
    std::vector<std::size_t> counts(static_cast<std::size_t>(ranks()));
    std::size_t mine = values.size();
    comm_
        ->allgather(host_view(reinterpret_cast<std::int64_t*>(&mine), 1),
                    host_view(reinterpret_cast<std::int64_t*>(counts.data()), counts.size()))
        .wait(kWait);
    std::size_t total = 0;
    for (const auto c : counts) total += c;
    std::vector<float> all(total);
    comm_
        ->allgatherv(host_view(const_cast<float*>(values.data()), values.size()),
                     host_view(all.data(), all.size()), counts)
        .wait(kWait);
    return all;
  }
  void expect_same_on_every_rank(const std::vector<float>& values, const std::string& what) {
    const auto all = gather(values);
    if (values.empty()) return;  // (memcmp must not see the null data of an empty vector)
    for (int r = 1; r < ranks(); ++r) {
      ASSERT_EQ(0, std::memcmp(all.data(), all.data() + static_cast<std::size_t>(r) * values.size(),
                               values.size() * sizeof(float)))
          << what << ": rank " << r << "'s result differs from rank 0's";
    }
  }
};

const char* kSpecs[] = {
    "none",        "fp16",      "bf16", "int8", "onebit", "topk:0.1", "topk:0.1:sampled",
    "randomk:0.1", "powersgd:2"};
const std::size_t kSizes[] = {0, 1, 3, 1001, 5000};

// Over several steps: sum of results + avg of worker residuals + server residuals (two-phase)
// equals the exact average of all gradients, for every compressor and size class.
TEST_F(CompressedAllreduceTest, CompressErrorFeedbackLosesNothing) {
  for (const char* text : kSpecs) {
    for (const std::size_t n : kSizes) {
      SCOPED_TRACE(std::string(text) + " n=" + std::to_string(n));
      CompressedAllreduce reducer(*comm_, CompressionSpec::parse(text));
      std::vector<float> residual(n, 0.0f);
      std::vector<double> results(n, 0.0), exact(n, 0.0);
      constexpr int kSteps = 5;
      for (std::uint64_t step = 0; step < kSteps; ++step) {
        std::vector<float> data(n);
        for (std::size_t i = 0; i < n; ++i) data[i] = gradient(rank(), step, i);
        for (int r = 0; r < ranks(); ++r) {
          for (std::size_t i = 0; i < n; ++i) exact[i] += gradient(r, step, i) / ranks();
        }
        const auto result = reducer.allreduce(data, residual, ReduceOp::kAvg, step, "t");
        EXPECT_EQ(result.nonfinite_ranks, 0u);
        expect_same_on_every_rank(data, "step " + std::to_string(step));
        for (std::size_t i = 0; i < n; ++i) results[i] += data[i];
      }
      const auto worker = gather(residual);
      const auto server_part = reducer.server_residual("t");
      const auto server = gatherv(std::vector<float>(server_part.begin(), server_part.end()));
      if (!server.empty()) {
        ASSERT_EQ(server.size(), n);
      }
      double worst = 0;
      for (std::size_t i = 0; i < n; ++i) {
        double held = results[i];
        for (int r = 0; r < ranks(); ++r)
          held += worker[static_cast<std::size_t>(r) * n + i] / ranks();
        if (!server.empty()) held += server[i];
        worst = std::max(worst, std::fabs(held - exact[i]));
      }
      EXPECT_LT(worst, 1e-3) << "error feedback lost up to " << worst;
    }
  }
}

// One step, against the exact average: how close each compressor gets.
TEST_F(CompressedAllreduceTest, CompressOneStepBounds) {
  const std::size_t n = 4096;
  std::vector<float> exact(n, 0.0f);
  for (int r = 0; r < ranks(); ++r) {
    for (std::size_t i = 0; i < n; ++i) exact[i] += gradient(r, 0, i) / static_cast<float>(ranks());
  }
  const auto run = [&](const char* text, ReduceOp op) {
    CompressedAllreduce reducer(*comm_, CompressionSpec::parse(text));
    std::vector<float> data(n), residual(n, 0.0f);
    for (std::size_t i = 0; i < n; ++i) data[i] = gradient(rank(), 0, i);
    reducer.allreduce(data, residual, op, 0, "t");
    return data;
  };
  const auto none = run("none", ReduceOp::kSum);
  for (std::size_t i = 0; i < n; ++i) {
    ASSERT_NEAR(none[i], exact[i] * static_cast<float>(ranks()), 1e-4) << i;
  }
  // The casts: each value rounded twice (worker and server), a relative error of 2 x 2^-11
  // (fp16) or 2 x 2^-8 (bf16) of the inputs' magnitudes (up to 100), not of the average's.
  for (const auto& [text, relative] : {std::pair{"fp16", 2e-3}, std::pair{"bf16", 1.6e-2}}) {
    const auto half = run(text, ReduceOp::kAvg);
    for (std::size_t i = 0; i < n; ++i) {
      ASSERT_NEAR(half[i], exact[i], relative * 100.0) << text << " " << i;
    }
  }
  // topk at 10 %: exactly the 10 % largest of each rank's gradient travel, summed sparsely.
  const auto topk = run("topk:0.1", ReduceOp::kSum);
  const auto nonzero = static_cast<std::size_t>(
      std::count_if(topk.begin(), topk.end(), [](float v) { return v != 0.0f; }));
  EXPECT_LE(nonzero, static_cast<std::size_t>(ranks()) * 410);
  EXPECT_GE(nonzero, 410u);
  // onebit: what arrives is the server's recompression: within each 256-chunk of a rank's
  // partition, one magnitude (the chunk's scale) with signs.
  CompressedAllreduce onebit_reducer(*comm_, CompressionSpec::parse("onebit"));
  const auto onebit = run("onebit", ReduceOp::kAvg);
  for (int p = 0; p < ranks(); ++p) {
    const auto [begin, end] = onebit_reducer.partition(n, p);
    for (std::size_t chunk = begin; chunk < end; chunk += 256) {
      const float scale = std::fabs(onebit[chunk]);
      for (std::size_t i = chunk; i < std::min(end, chunk + 256); ++i) {
        ASSERT_EQ(std::fabs(onebit[i]), scale) << "partition " << p << " element " << i;
      }
    }
  }
}

TEST_F(CompressedAllreduceTest, CompressNonFiniteOnOneRankChangesNoState) {
  const int culprit = ranks() - 1;
  for (const char* text : kSpecs) {
    SCOPED_TRACE(text);
    CompressedAllreduce reducer(*comm_, CompressionSpec::parse(text));
    const std::size_t n = 3000;
    std::vector<float> residual(n, 0.0f), data(n);
    for (std::size_t i = 0; i < n; ++i) data[i] = gradient(rank(), 0, i);
    reducer.allreduce(data, residual, ReduceOp::kAvg, 0, "t");  // some state to keep
    const std::vector<float> residual_before = residual;
    const auto server = reducer.server_residual("t");
    const std::vector<float> server_before(server.begin(), server.end());
    for (std::size_t i = 0; i < n; ++i) data[i] = gradient(rank(), 1, i);
    if (rank() == culprit) data[17] = std::numeric_limits<float>::infinity();
    const auto result = reducer.allreduce(data, residual, ReduceOp::kAvg, 1, "t");
    if (std::string(text) == "none") {
      EXPECT_TRUE(std::isinf(data[17]) || std::isnan(data[17]));
      continue;
    }
    EXPECT_EQ(result.nonfinite_ranks, 1u);
    EXPECT_TRUE(std::all_of(data.begin(), data.end(), [](float v) { return std::isnan(v); }));
    EXPECT_EQ(residual, residual_before);
    const auto server_after = reducer.server_residual("t");
    EXPECT_EQ(std::vector<float>(server_after.begin(), server_after.end()), server_before);
  }
}

TEST_F(CompressedAllreduceTest, CompressWireBytesAgainstTheRing) {
  const std::size_t n = 1 << 20;
  const std::uint64_t ring = CompressedAllreduce::ring_allreduce_bytes(4 * n, ranks());
  for (const auto& [text, at_most] : {std::pair{"onebit", 1.0 / 25}, std::pair{"topk:0.01", 0.1},
                                      std::pair{"fp16", 0.51}, std::pair{"int8", 0.27}}) {
    CompressedAllreduce reducer(*comm_, CompressionSpec::parse(text));
    std::vector<float> data(n), residual(n, 0.0f);
    for (std::size_t i = 0; i < n; ++i) data[i] = gradient(rank(), 0, i);
    const auto result = reducer.allreduce(data, residual, ReduceOp::kAvg, 0, "t");
    if (ranks() == 1) {
      EXPECT_EQ(result.wire_bytes, 0u) << text;
    } else if (std::string(text) == "topk:0.01" && ranks() > 4) {
      // Allgather: each rank's pairs go to every other rank; 1 % of 8-byte pairs stays under
      // a tenth of the ring up to 5 ranks' worth.
      EXPECT_LE(static_cast<double>(result.wire_bytes),
                0.1 * static_cast<double>(ring) * ranks() / 4.0)
          << text;
    } else {
      EXPECT_LE(static_cast<double>(result.wire_bytes), at_most * static_cast<double>(ring))
          << text << ": " << result.wire_bytes << " vs ring " << ring;
      EXPECT_GT(result.wire_bytes, 0u) << text;
    }
  }
}

TEST_F(CompressedAllreduceTest, CompressRejectsBadArguments) {
  CompressedAllreduce reducer(*comm_, CompressionSpec::parse("onebit"));
  std::vector<float> data(10), residual(9);
  EXPECT_THROW(reducer.allreduce(data, {}, ReduceOp::kMax, 0, "t"), Error);
  EXPECT_THROW(reducer.allreduce(data, residual, ReduceOp::kSum, 0, "t"), Error);
}

class EngineCompressTest : public CompressedAllreduceTest {};

// Through the engine, fused and not: the same gradient every step. With error feedback the
// running mean of the results converges to the exact average (what feedback still holds back
// is bounded, and is divided by the number of steps); onebit without it stays biased.
TEST_F(EngineCompressTest, EngineCompressErrorFeedbackConverges) {
  const std::vector<std::size_t> sizes = {3000, 700, 5};
  const auto steady = [](int rank, std::size_t tensor, std::size_t i) {
    return static_cast<float>(
        std::sin(0.37 * static_cast<double>(i) + 1.3 * rank + 0.5 * static_cast<double>(tensor)) *
        static_cast<double>(1 + i % 3));
  };
  const auto run = [&](const char* text, std::uint64_t threshold) {
    EngineOptions options;
    options.stall_warning = 0s;
    options.fusion_threshold_bytes = threshold;
    Engine engine(*comm_, *bus_, options);
    const auto spec = CompressionSpec::parse(text);
    std::vector<std::vector<double>> sums(sizes.size());
    constexpr int kSteps = 200;
    for (int step = 0; step < kSteps; ++step) {
      std::vector<std::vector<float>> data(sizes.size());
      std::vector<Work> works;
      for (std::size_t t = 0; t < sizes.size(); ++t) {
        data[t].resize(sizes[t]);
        for (std::size_t i = 0; i < sizes[t]; ++i) data[t][i] = steady(rank(), t, i);
        works.push_back(engine.submit(std::string("g").append(std::to_string(t)),
                                      host_view(data[t].data(), sizes[t]), ReduceOp::kAvg, spec));
      }
      for (auto& work : works) work.wait(kWait);
      for (std::size_t t = 0; t < sizes.size(); ++t) {
        sums[t].resize(sizes[t]);
        for (std::size_t i = 0; i < sizes[t]; ++i) sums[t][i] += data[t][i];
      }
    }
    EXPECT_EQ(engine.stats().nonfinite_steps, 0u);
    if (ranks() > 1) {
      EXPECT_GT(engine.stats().wire_bytes, 0u);
    }
    double worst = 0;
    for (std::size_t t = 0; t < sizes.size(); ++t) {
      for (std::size_t i = 0; i < sizes[t]; ++i) {
        double exact = 0;
        for (int r = 0; r < ranks(); ++r) exact += steady(r, t, i) / ranks();
        worst = std::max(worst, std::fabs(sums[t][i] / kSteps - exact));
      }
    }
    std::printf("[rank %d] %s fusion %llu: worst error of the mean %.5f\n", rank(), text,
                static_cast<unsigned long long>(threshold), worst);
    return worst;
  };
  // Fused and not for onebit (whose two-phase partitions then differ); fused for the rest.
  double onebit_error = 0;
  for (const std::uint64_t threshold : {std::uint64_t{0}, std::uint64_t{64} << 20}) {
    SCOPED_TRACE("fusion threshold " + std::to_string(threshold));
    onebit_error = run("onebit", threshold);
    EXPECT_LT(onebit_error, 0.25);
  }
  EXPECT_LT(run("topk:0.1", 0), 0.2);
  EXPECT_LT(run("fp16", 64 << 20), 1e-3);
  EXPECT_LT(run("int8", 64 << 20), 0.05);
  EXPECT_LT(run("powersgd:2", 64 << 20), 0.25);
  EXPECT_GT(run("onebit:noef", 64 << 20), 4 * onebit_error)
      << "without error feedback onebit should stay far more biased";
}

TEST_F(EngineCompressTest, EngineCompressMismatchAndBadTensors) {
  EngineOptions options;
  options.stall_warning = 0s;
  Engine engine(*comm_, *bus_, options);
  std::vector<std::int32_t> ints(8, 1);
  EXPECT_THROW(engine.submit("ints", host_view(ints.data(), ints.size()), ReduceOp::kSum,
                             CompressionSpec::parse("fp16")),
               Error);
  std::vector<float> floats(8, 1.0f);
  EXPECT_THROW(engine.submit("max", host_view(floats.data(), floats.size()), ReduceOp::kMax,
                             CompressionSpec::parse("onebit")),
               Error);
  if (ranks() == 1) return;
  const auto spec = CompressionSpec::parse(rank() == 0 ? "topk:0.5" : "topk:0.25");
  auto work = engine.submit("mixed", host_view(floats.data(), floats.size()), ReduceOp::kAvg, spec);
  try {
    work.wait(kWait);
    ADD_FAILURE() << "expected a MismatchError";
  } catch (const MismatchError& error) {
    EXPECT_NE(std::string(error.what()).find("topk:0.25"), std::string::npos) << error.what();
  }
}

}  // namespace
}  // namespace unimsg
