// Multi-rank tests of the engine: submission in any order, fusion, the response cache, mismatch
// and stall errors, grouped submission, join.

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "unimsg/bus/bus.hpp"
#include "unimsg/collectives/engine.hpp"
#include "unimsg/collectives/mpi_communicator.hpp"
#include "unimsg/core/error.hpp"
#include "world_fixture.hpp"

namespace unimsg {
namespace {

using namespace std::chrono_literals;
constexpr auto kWait = 120s;

float input(int rank, int tensor, std::size_t i) {
  return static_cast<float>((rank * 13 + tensor * 5 + static_cast<int>(i % 97)) % 31);
}

class EngineTest : public testing_support::WorldTest {
 protected:
  EngineOptions quick_options() {
    EngineOptions options;
    options.stall_warning = 0s;
    return options;
  }
  // Tensors 0..n-1 of `sizes`, submitted in an order that differs on every rank.
  std::vector<std::vector<float>> run_step(Engine& engine, const std::vector<std::size_t>& sizes,
                                           ReduceOp op) {
    const int rank = comm_->rank();
    const int n = static_cast<int>(sizes.size());
    std::vector<std::vector<float>> data(sizes.size());
    for (int t = 0; t < n; ++t) {
      data[static_cast<std::size_t>(t)].resize(sizes[static_cast<std::size_t>(t)]);
      for (std::size_t i = 0; i < sizes[static_cast<std::size_t>(t)]; ++i) {
        data[static_cast<std::size_t>(t)][i] = input(rank, t, i);
      }
    }
    std::vector<int> order(static_cast<std::size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    std::rotate(order.begin(), order.begin() + (rank * 7) % std::max(n, 1), order.end());
    if (rank % 2 == 1) std::reverse(order.begin(), order.end());
    std::vector<Work> works;
    for (const int t : order) {
      auto& tensor = data[static_cast<std::size_t>(t)];
      works.push_back(engine.submit("tensor." + std::to_string(t),
                                    host_view(tensor.data(), tensor.size()), op));
    }
    // wait(): the waiting thread runs the cycles (its deadline is the collective timeout).
    for (auto& work : works) work.wait();
    return data;
  }
  void expect_sums(const std::vector<std::vector<float>>& data) {
    for (std::size_t t = 0; t < data.size(); ++t) {
      for (std::size_t i = 0; i < data[t].size(); ++i) {
        float expected = 0;
        for (int r = 0; r < comm_->size(); ++r) expected += input(r, static_cast<int>(t), i);
        ASSERT_EQ(data[t][i], expected) << "tensor " << t << " element " << i;
      }
    }
  }
};

TEST_F(EngineTest, TensorsSubmittedInAnyOrderAreReduced) {
  Engine engine(*comm_, *bus_, quick_options());
  const std::vector<std::size_t> sizes = {1, 0, 7, 1000, 3, 65537, 2, 5, 128, 4096};
  expect_sums(run_step(engine, sizes, ReduceOp::kSum));
}

TEST_F(EngineTest, FusedResultEqualsUnfused) {
  std::vector<std::size_t> sizes;
  for (int t = 0; t < 64; ++t) sizes.push_back(static_cast<std::size_t>(1 + (t * 37) % 500));
  EngineOptions fused_options = quick_options();
  EngineOptions unfused_options = quick_options();
  unfused_options.fusion_threshold_bytes = 0;
  std::vector<std::vector<float>> fused, unfused;
  EngineStats fused_stats, unfused_stats;
  {
    Engine engine(*comm_, *bus_, fused_options);
    fused = run_step(engine, sizes, ReduceOp::kAvg);
    fused_stats = engine.stats();
  }
  {
    Engine engine(*comm_, *bus_, unfused_options);
    unfused = run_step(engine, sizes, ReduceOp::kAvg);
    unfused_stats = engine.stats();
  }
  ASSERT_EQ(fused.size(), unfused.size());
  for (std::size_t t = 0; t < fused.size(); ++t) EXPECT_EQ(fused[t], unfused[t]) << "tensor " << t;
  EXPECT_EQ(unfused_stats.collectives, 64u);
  EXPECT_LT(fused_stats.collectives, 64u) << "nothing was fused";
  EXPECT_EQ(fused_stats.tensors_reduced, 64u);
}

TEST_F(EngineTest, SteadyStateNeedsNoNegotiation) {
  Engine engine(*comm_, *bus_, quick_options());
  const std::vector<std::size_t> sizes = {10, 20, 30, 40, 50};
  expect_sums(run_step(engine, sizes, ReduceOp::kSum));
  const EngineStats after_first = engine.stats();
  for (int step = 0; step < 5; ++step) expect_sums(run_step(engine, sizes, ReduceOp::kSum));
  const EngineStats after_six = engine.stats();
  EXPECT_EQ(after_six.negotiation_rounds, after_first.negotiation_rounds)
      << "steady-state steps went back to rank 0";
  EXPECT_EQ(after_six.cache_hits - after_first.cache_hits, 25u);
  EXPECT_EQ(after_six.tensors_reduced, 30u);
}

TEST_F(EngineTest, StepThatIsWaitedOnGoesOutInOneCycle) {
  // With a cycle time far longer than the test, only a thread's wait() can start a cycle: each
  // rank's submissions are then all in when its cycle starts, so a step of 64 tensors takes one
  // cycle and one fused collective, however the submitting threads were scheduled.
  EngineOptions options = quick_options();
  options.cycle_time = std::chrono::duration_cast<std::chrono::microseconds>(kWait);
  Engine engine(*comm_, *bus_, options);
  std::vector<std::size_t> sizes;
  for (int t = 0; t < 64; ++t) sizes.push_back(static_cast<std::size_t>(1 + (t * 37) % 500));
  for (int step = 0; step < 4; ++step) {
    const EngineStats before = engine.stats();
    expect_sums(run_step(engine, sizes, ReduceOp::kSum));
    const EngineStats after = engine.stats();
    EXPECT_EQ(after.cycles - before.cycles, 1u) << "step " << step;
    EXPECT_EQ(after.collectives - before.collectives, 1u) << "step " << step;
  }
}

TEST_F(EngineTest, WaitRunsTheCycleItselfAndAShorterTimeoutHandsItToTheEngineThread) {
  // wait() (its deadline: the collective timeout) runs the step's cycle on the waiting thread,
  // with no hand-off to the engine thread and back; wait(timeout) with a shorter timeout of its
  // own hands the cycle to the engine thread, so that a cycle held up by a missing rank cannot
  // keep that wait past its deadline.
  ASSERT_GT(comm_->default_timeout(), kWait);
  EngineOptions options = quick_options();
  options.cycle_time = std::chrono::duration_cast<std::chrono::microseconds>(kWait);
  // (Before the engine, so that they outlive its listener on every path out of the test.)
  std::mutex mutex;
  std::vector<std::thread::id> reducers;  // the threads that ran the reductions
  Engine engine(*comm_, *bus_, options);
  engine.set_listener([&](const EngineEvent& event) {
    if (event.type != EngineEvent::Type::kReduceStart) return;
    std::lock_guard lock(mutex);
    reducers.push_back(std::this_thread::get_id());
  });
  const int n = comm_->size();
  for (const bool plain_wait : {true, false, true}) {
    SCOPED_TRACE(plain_wait ? "wait()" : "wait(120 s)");
    {
      std::lock_guard lock(mutex);
      reducers.clear();
    }
    std::vector<float> a(100, static_cast<float>(comm_->rank() + 1));
    std::vector<float> b(7, 2.0f);
    Work first = engine.submit("a", host_view(a.data(), a.size()), ReduceOp::kSum);
    Work second = engine.submit("b", host_view(b.data(), b.size()), ReduceOp::kSum);
    if (plain_wait) {
      first.wait();
      second.wait();
    } else {
      first.wait(kWait);
      second.wait(kWait);
    }
    EXPECT_EQ(a[99], static_cast<float>(n * (n + 1) / 2));
    EXPECT_EQ(b[6], 2.0f * static_cast<float>(n));
    std::lock_guard lock(mutex);
    ASSERT_FALSE(reducers.empty());
    for (const auto& id : reducers) {
      if (plain_wait) {
        EXPECT_EQ(id, std::this_thread::get_id()) << "wait() handed its cycle off";
      } else {
        EXPECT_NE(id, std::this_thread::get_id()) << "wait(timeout) ran the cycle itself";
      }
    }
  }
  engine.set_listener(nullptr);
}

TEST_F(EngineTest, CycleRunByAWaitingThreadDoesNotWakeTheEngineThread) {
  // The engine thread cannot cycle while a waiting thread does; its timer, due one cycle time
  // after a submission, used to wake it in the middle of every reduction longer than that (and
  // again when the waiting thread let go of the cycle): context switches on cores the ranks
  // need. 4 MiB out of place takes far longer than the 100 us cycle time here on any machine.
  EngineOptions options = quick_options();
  options.cycle_time = 100us;
  Engine engine(*comm_, *bus_, options);
  const int n = comm_->size();
  std::vector<float> input(1 << 20, static_cast<float>(comm_->rank() + 1));
  std::vector<float> output(input.size());
  constexpr int kSteps = 10;
  // A step that outlasts the engine's 50 ms idle tick may rightly wake it once: on a loaded
  // machine some do, and they are allowed for (with a margin for the tick's own phase).
  constexpr auto kNearTheIdleTick = std::chrono::milliseconds(40);
  std::uint64_t long_steps = 0;
  const EngineStats before = engine.stats();
  for (int step = 0; step < kSteps; ++step) {
    const auto start = std::chrono::steady_clock::now();
    engine
        .submit("large", host_view(input.data(), input.size()),
                host_view(output.data(), output.size()), ReduceOp::kSum)
        .wait();
    if (std::chrono::steady_clock::now() - start > kNearTheIdleTick) ++long_steps;
    ASSERT_EQ(output.back(), static_cast<float>(n * (n + 1) / 2)) << "step " << step;
  }
  const EngineStats after = engine.stats();
  EXPECT_LT(after.engine_thread_wakeups - before.engine_thread_wakeups,
            long_steps + static_cast<std::uint64_t>(kSteps / 2))
      << "the engine thread woke during the waiting thread's cycles (" << long_steps
      << " steps outlasted the idle tick)";
}

TEST_F(EngineTest, TensorsNobodyWaitsOnGoOutAfterTheCycleTime) {
  // No wait(): the cycle starts one cycle time after the submission; the caller only polls.
  EngineOptions options = quick_options();
  options.cycle_time = 2ms;
  Engine engine(*comm_, *bus_, options);
  std::vector<float> value(9, static_cast<float>(comm_->rank() + 1));
  Work work = engine.submit("polled", host_view(value.data(), value.size()), ReduceOp::kSum);
  const auto deadline = std::chrono::steady_clock::now() + kWait;
  while (!work.test() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(1ms);
  }
  ASSERT_TRUE(work.test()) << "not reduced within " << kWait.count() << " s without a wait()";
  const int n = comm_->size();
  EXPECT_EQ(value[8], static_cast<float>(n * (n + 1) / 2));
}

TEST_F(EngineTest, IdleEngineDoesNotCycleEveryCycleTime) {
  // Every cycle is a collective, so an idle rank that cycled every 1 ms would hold up every
  // other rank's next step; idle, the engine cycles only on a slow tick (50 ms).
  EngineOptions options = quick_options();
  options.cycle_time = 1ms;
  Engine engine(*comm_, *bus_, options);
  const EngineStats before = engine.stats();
  std::this_thread::sleep_for(500ms);
  const EngineStats after = engine.stats();
  EXPECT_LT(after.cycles - before.cycles, 50u) << "an idle engine cycled every cycle time";
}

TEST_F(EngineTest, OutOfPlaceLeavesTheInputAndFillsTheOutput) {
  // Only wait() starts a cycle, so the first two tensors (apart in memory) are packed together.
  EngineOptions options = quick_options();
  options.cycle_time = std::chrono::duration_cast<std::chrono::microseconds>(kWait);
  Engine engine(*comm_, *bus_, options);
  const int rank = comm_->rank();
  const int n = comm_->size();
  // Two tensors out of place, fused, with sum; then a lone one with max.
  std::vector<float> in_a(300), in_b(5), out_a(300, -1.0f), out_b(5, -1.0f);
  for (std::size_t i = 0; i < in_a.size(); ++i) in_a[i] = input(rank, 0, i);
  for (std::size_t i = 0; i < in_b.size(); ++i) in_b[i] = input(rank, 1, i);
  const std::vector<float> kept_a = in_a, kept_b = in_b;
  Work a = engine.submit("oop.a", host_view(in_a.data(), in_a.size()),
                         host_view(out_a.data(), out_a.size()), ReduceOp::kSum);
  Work b = engine.submit("oop.b", host_view(in_b.data(), in_b.size()),
                         host_view(out_b.data(), out_b.size()), ReduceOp::kSum);
  a.wait(kWait);
  b.wait(kWait);
  EXPECT_EQ(in_a, kept_a);
  EXPECT_EQ(in_b, kept_b);
  for (std::size_t i = 0; i < out_a.size(); ++i) {
    float expected = 0;
    for (int r = 0; r < n; ++r) expected += input(r, 0, i);
    ASSERT_EQ(out_a[i], expected) << "element " << i;
  }
  for (std::size_t i = 0; i < out_b.size(); ++i) {
    float expected = 0;
    for (int r = 0; r < n; ++r) expected += input(r, 1, i);
    ASSERT_EQ(out_b[i], expected) << "element " << i;
  }
  std::vector<std::int32_t> in_max(7, rank), out_max(7, -1);
  engine
      .submit("oop.max", TensorView{in_max.data(), in_max.size(), DType::kI32},
              TensorView{out_max.data(), out_max.size(), DType::kI32}, ReduceOp::kMax)
      .wait(kWait);
  EXPECT_EQ(out_max, std::vector<std::int32_t>(7, n - 1));
  EXPECT_EQ(in_max, std::vector<std::int32_t>(7, rank));
}

TEST_F(EngineTest, OutOfPlaceMismatchesAndOverlapsAreRefused) {
  Engine engine(*comm_, *bus_, quick_options());
  std::vector<float> data(16, 1.0f);
  std::vector<double> wide(16, 1.0);
  const auto refused = [&](TensorView in, TensorView out, const std::string& why) {
    try {
      engine.submit("bad", in, out, ReduceOp::kSum);
      ADD_FAILURE() << "accepted: " << why;
    } catch (const Error& error) {
      EXPECT_NE(std::string(error.what()).find("'bad'"), std::string::npos) << error.what();
    }
  };
  refused(host_view(data.data(), 8), host_view(data.data() + 4, 8), "overlapping halves");
  refused(host_view(data.data(), 8), host_view(data.data() + 8, 7), "different counts");
  refused(host_view(data.data(), 8), TensorView{wide.data(), 8, DType::kF64}, "different dtypes");
  // Adjacent but not overlapping is fine.
  engine.submit("ok", host_view(data.data(), 8), host_view(data.data() + 8, 8), ReduceOp::kSum)
      .wait(kWait);
  EXPECT_EQ(data[15], static_cast<float>(comm_->size()));
}

TEST_F(EngineTest, TensorsBackToBackInMemoryAreReducedWhereTheyLie) {
  // 64 tensors cut from one buffer and submitted in memory order (as a flattened model's
  // gradients): fused without a copy, in place and out of place, with sums equal to the packed
  // path's (a gap between two tensors forces it). Only wait() starts a cycle (the cycle time is
  // longer than the test), so that a slow submitting thread cannot split the step in two.
  EngineOptions options = quick_options();
  options.cycle_time = std::chrono::duration_cast<std::chrono::microseconds>(kWait);
  Engine engine(*comm_, *bus_, options);
  const int rank = comm_->rank();
  const int n = comm_->size();
  constexpr int kTensors = 64;
  std::vector<std::size_t> begin(kTensors + 1, 0);
  for (int t = 0; t < kTensors; ++t) begin[t + 1] = begin[t] + 1 + (t * 37) % 200;
  for (const bool gap : {false, true}) {
    for (const bool in_place : {true, false}) {
      const std::size_t total = begin[kTensors] + (gap ? 1 : 0);
      std::vector<float> in(total), out(total, -1.0f);
      const auto at = [&](int t) { return begin[t] + (gap && t >= kTensors / 2 ? 1 : 0); };
      for (int t = 0; t < kTensors; ++t) {
        for (std::size_t i = 0; i < begin[t + 1] - begin[t]; ++i) in[at(t) + i] = input(rank, t, i);
      }
      float* result = in_place ? in.data() : out.data();
      const EngineStats before = engine.stats();
      std::vector<Work> works;
      for (int t = 0; t < kTensors; ++t) {
        const std::size_t count = begin[t + 1] - begin[t];
        works.push_back(engine.submit("flat." + std::to_string(t),
                                      host_view(in.data() + at(t), count),
                                      host_view(result + at(t), count), ReduceOp::kSum));
      }
      for (auto& work : works) work.wait(kWait);
      const EngineStats after = engine.stats();
      const std::string label = std::string(gap ? "with a gap" : "back to back") + ", " +
                                (in_place ? "in place" : "out of place");
      EXPECT_EQ(after.fused_in_place - before.fused_in_place, gap ? 0u : 1u) << label;
      for (int t = 0; t < kTensors; ++t) {
        for (std::size_t i = 0; i < begin[t + 1] - begin[t]; ++i) {
          float expected = 0;
          for (int r = 0; r < n; ++r) expected += input(r, t, i);
          ASSERT_EQ(result[at(t) + i], expected) << label << ": tensor " << t << " element " << i;
        }
      }
    }
  }
}

TEST_F(EngineTest, ChangedTensorIsRenegotiated) {
  Engine engine(*comm_, *bus_, quick_options());
  std::vector<float> small(8, 1.0f), large(16, 1.0f);
  engine.submit("w", host_view(small.data(), small.size()), ReduceOp::kSum).wait(kWait);
  engine.submit("w", host_view(large.data(), large.size()), ReduceOp::kSum).wait(kWait);
  EXPECT_EQ(large[15], static_cast<float>(comm_->size()));
}

TEST_F(EngineTest, MismatchFailsOnEveryRankNamingTheRanks) {
  if (comm_->size() < 2) GTEST_SKIP() << "needs two ranks to disagree";
  Engine engine(*comm_, *bus_, quick_options());
  std::vector<float> data(comm_->rank() == 0 ? 4 : 5, 1.0f);
  try {
    engine.submit("grad.bias", host_view(data.data(), data.size()), ReduceOp::kSum).wait(kWait);
    FAIL() << "a mismatched tensor was reduced";
  } catch (const MismatchError& error) {
    const std::string text = error.what();
    EXPECT_NE(text.find("'grad.bias'"), std::string::npos) << text;
    EXPECT_NE(text.find("f32 x4 sum on ranks [0]"), std::string::npos) << text;
    EXPECT_NE(text.find("f32 x5 sum on ranks [1"), std::string::npos) << text;
  }
  // The engine goes on.
  std::vector<float> ok(3, 2.0f);
  engine.submit("after", host_view(ok.data(), ok.size()), ReduceOp::kSum).wait(kWait);
  EXPECT_EQ(ok[0], 2.0f * static_cast<float>(comm_->size()));
}

TEST_F(EngineTest, StalledTensorFailsNamingTheMissingRank) {
  if (comm_->size() < 2) GTEST_SKIP() << "needs a rank that never submits";
  EngineOptions options = quick_options();
  options.stall_warning = 1s;
  options.stall_abort = 2s;
  Engine engine(*comm_, *bus_, options);
  const int absent = comm_->size() - 1;
  if (comm_->rank() != absent) {
    std::vector<float> data(4, 1.0f);
    try {
      engine.submit("grad.stuck", host_view(data.data(), data.size()), ReduceOp::kSum).wait(kWait);
      FAIL() << "reduced without rank " << absent;
    } catch (const TimeoutError& error) {
      const std::string text = error.what();
      EXPECT_NE(text.find("'grad.stuck' stalled"), std::string::npos) << text;
      EXPECT_NE(text.find("not by ranks [" + std::to_string(absent) + "]"), std::string::npos)
          << text;
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

TEST_F(EngineTest, GroupIsReducedAsOneUnit) {
  Engine engine(*comm_, *bus_, quick_options());
  std::vector<float> a(5, 1.0f), b(7, 2.0f), c(1, 3.0f);
  engine
      .submit_group({{"g.a", host_view(a.data(), a.size())},
                     {"g.b", host_view(b.data(), b.size())},
                     {"g.c", host_view(c.data(), c.size())}},
                    ReduceOp::kSum)
      .wait(kWait);
  const float n = static_cast<float>(comm_->size());
  EXPECT_EQ(a[4], n);
  EXPECT_EQ(b[6], 2 * n);
  EXPECT_EQ(c[0], 3 * n);
}

TEST_F(EngineTest, JoinedRanksContributeZeros) {
  Engine engine(*comm_, *bus_, quick_options());
  const int rank = comm_->rank();
  const int size = comm_->size();
  // Rank r has r + 1 batches; a rank out of data joins and the others carry on.
  for (int step = 0; step <= rank; ++step) {
    std::vector<float> value(3, static_cast<float>(rank + 1));
    engine.submit("grad", host_view(value.data(), value.size()), ReduceOp::kSum).wait(kWait);
    float expected = 0;
    for (int r = step; r < size; ++r) expected += static_cast<float>(r + 1);  // ranks still in
    EXPECT_EQ(value[0], expected) << "step " << step;
  }
  engine.join();
}

TEST_F(EngineTest, DuplicateAndDeviceSubmissionsAreRefused) {
  Engine engine(*comm_, *bus_, quick_options());
  std::vector<float> data(4, 1.0f);
  Work first = engine.submit("dup", host_view(data.data(), data.size()), ReduceOp::kSum);
  EXPECT_THROW(engine.submit("dup", host_view(data.data(), data.size()), ReduceOp::kSum), Error);
  first.wait(kWait);
  // Device tensors go uncompressed (engine_device_test.cpp reduces them).
  TensorView device{data.data(), data.size(), DType::kF32, Device::kCuda};
  EXPECT_THROW(engine.submit("gpu", device, ReduceOp::kSum, CompressionSpec::parse("fp16")), Error);
  // A group naming one tensor twice is refused whole: none of its names stays pending.
  std::vector<float> a(3, 1.0f), b(3, 2.0f);
  try {
    engine.submit_group({{"g.a", host_view(a.data(), a.size())},
                         {"g.b", host_view(b.data(), b.size())},
                         {"g.a", host_view(b.data(), b.size())}},
                        ReduceOp::kSum);
    FAIL() << "a group with a repeated name was accepted";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("'g.a' appears twice"), std::string::npos)
        << error.what();
  }
  engine
      .submit_group(
          {{"g.a", host_view(a.data(), a.size())}, {"g.b", host_view(b.data(), b.size())}},
          ReduceOp::kSum)
      .wait(kWait);
  EXPECT_EQ(a[2], static_cast<float>(comm_->size()));
  EXPECT_EQ(b[2], 2.0f * static_cast<float>(comm_->size()));
}

TEST_F(EngineTest, TensorWhoseWorkWasDroppedIsStillReduced) {
  // The engine keeps what it needs of a submission: dropping the Work does not cancel it.
  Engine engine(*comm_, *bus_, quick_options());
  std::vector<float> dropped(9, 1.0f), kept(4, 3.0f);
  {
    Work forgotten =
        engine.submit("dropped", host_view(dropped.data(), dropped.size()), ReduceOp::kSum);
  }
  engine.submit("kept", host_view(kept.data(), kept.size()), ReduceOp::kSum).wait(kWait);
  // (Every rank submitted the dropped one first, and every rank executes rank 0's responses in
  // the order first seen: it was reduced no later than the kept one.)
  EXPECT_EQ(dropped[8], static_cast<float>(comm_->size()));
  EXPECT_EQ(kept[3], 3.0f * static_cast<float>(comm_->size()));
}

TEST_F(EngineTest, WaitTimeoutNamesTheTensor) {
  if (comm_->size() < 2) GTEST_SKIP() << "needs a rank that submits late";
  Engine engine(*comm_, *bus_, quick_options());
  std::vector<float> data(6, 1.0f);
  if (comm_->rank() == 0) {
    Work work = engine.submit("grad.late", host_view(data.data(), data.size()), ReduceOp::kAvg);
    try {
      work.wait(1s);
      FAIL() << "reduced before the other ranks submitted";
    } catch (const TimeoutError& error) {
      EXPECT_NE(std::string(error.what()).find("engine allreduce avg 'grad.late'"),
                std::string::npos)
          << error.what();
    }
    MPI_Barrier(MPI_COMM_WORLD);
    work.wait(kWait);  // the Work stays valid after a timeout
  } else {
    MPI_Barrier(MPI_COMM_WORLD);
    engine.submit("grad.late", host_view(data.data(), data.size()), ReduceOp::kAvg).wait(kWait);
  }
  EXPECT_EQ(data[5], 1.0f);
}

TEST(EngineConfig, FromEnvironment) {
  ::setenv("UNIMSG_FUSION_THRESHOLD", "32M", 1);
  ::setenv("UNIMSG_CYCLE_TIME_MS", "0.5", 1);
  const EngineOptions options = EngineOptions::from_env();
  EXPECT_EQ(options.fusion_threshold_bytes, 32u << 20);
  EXPECT_EQ(options.cycle_time, std::chrono::microseconds(500));
  ::setenv("UNIMSG_CYCLE_TIME_MS", "fast", 1);
  EXPECT_THROW(EngineOptions::from_env(), ConfigError);
  ::setenv("UNIMSG_CYCLE_TIME_MS", "0", 1);
  EXPECT_THROW(EngineOptions::from_env(), ConfigError);
  ::unsetenv("UNIMSG_CYCLE_TIME_MS");
  ::setenv("UNIMSG_FUSION_THRESHOLD", "lots", 1);
  EXPECT_THROW(EngineOptions::from_env(), ConfigError);
  ::unsetenv("UNIMSG_FUSION_THRESHOLD");
}

}  // namespace
}  // namespace unimsg
