// The engine's speculation (the cycle's agreement riding on the batch it expects): in steady
// state the batch goes out with no agreement allreduce of its own; a rank that is late for it
// vetoes and nobody's tensors are touched; a tensor changed on one rank in steady state is still
// a MismatchError on every rank, and the engine goes on.

#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
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

float input(int rank, int step, std::size_t i) {
  return static_cast<float>((rank * 13 + step * 5 + static_cast<int>(i % 97)) % 31);
}

class EngineSpeculationTest : public testing_support::WorldTest {
 protected:
  void SetUp() override {
    WorldTest::SetUp();
    // The shared-memory path at every size, whatever the environment says.
    CommunicatorOptions options;
    options.hierarchical = CommunicatorOptions::Hierarchical::kAuto;
    options.shm_min_bytes = 0;
    comm_.reset();
    comm_ = std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, *bus_, options);
    // (One rank has no shared memory: its agreement never rides on data.)
    if (comm_->size() < 2) GTEST_SKIP() << "speculation needs two ranks sharing memory";
    ASSERT_TRUE(comm_->agreement_rides_on_data(1000, DType::kF32, 8))
        << "this machine's ranks should share the shared-memory path";
  }
  // Only a thread blocked in wait() starts a cycle: each step is one cycle.
  static EngineOptions waited_cycles() {
    EngineOptions options;
    options.stall_warning = 0s;
    options.cycle_time = std::chrono::duration_cast<std::chrono::microseconds>(kWait);
    return options;
  }
  // Tensors "a" (`a` elements) and "b" (`b`), in place, reduced; checks the sums.
  void step(Engine& engine, int number, std::size_t a, std::size_t b) {
    const int rank = comm_->rank();
    std::vector<float> x(a), y(b);
    for (std::size_t i = 0; i < a; ++i) x[i] = input(rank, number, i);
    for (std::size_t i = 0; i < b; ++i) y[i] = input(rank, number + 1, i);
    Work wa = engine.submit("a", host_view(x.data(), x.size()), ReduceOp::kSum);
    Work wb = engine.submit("b", host_view(y.data(), y.size()), ReduceOp::kSum);
    wa.wait(kWait);
    wb.wait(kWait);
    expect_sums(x, number, "a");
    expect_sums(y, number + 1, "b");
  }
  void expect_sums(const std::vector<float>& got, int number, const std::string& name) {
    for (std::size_t i = 0; i < got.size(); ++i) {
      float expected = 0;
      for (int r = 0; r < comm_->size(); ++r) expected += input(r, number, i);
      ASSERT_EQ(got[i], expected) << name << " element " << i << " step " << number;
    }
  }
};

// Two cycles that reduced the same batch alone make the third speculate: from then on every
// step's batch carries its own agreement.
TEST_F(EngineSpeculationTest, SteadyStateStepsCarryTheirAgreement) {
  Engine engine(*comm_, *bus_, waited_cycles());
  for (int number = 0; number < 8; ++number) step(engine, number, 10, 3000);
  const EngineStats stats = engine.stats();
  // Step 0 negotiated, steps 1 and 2 taught the engine its batch, steps 3..7 speculated.
  EXPECT_EQ(stats.speculations, 5u);
  EXPECT_EQ(stats.speculations_reduced, 5u);
  EXPECT_EQ(stats.cycles, 8u);
  EXPECT_EQ(stats.collectives, 8u);
  EXPECT_EQ(stats.tensors_reduced, 16u);
  EXPECT_EQ(stats.cache_hits, 14u);

  EngineOptions off = waited_cycles();
  off.speculate = false;
  Engine agreed(*comm_, *bus_, off);
  for (int number = 0; number < 5; ++number) step(agreed, number, 10, 3000);
  EXPECT_EQ(agreed.stats().speculations, 0u);
}

// The last rank comes to the expected batch late; its engine thread's idle cycles veto it
// meanwhile. The others' tensors, reduced in place, must not be touched by those vetoed
// collectives: the result is the plain sum once the late rank is in.
TEST_F(EngineSpeculationTest, ALateRankVetoesAndNothingIsTouched) {
  EngineOptions options = waited_cycles();
  options.cycle_time = 20ms;  // (idle cycles every 50 ms: the late rank's vetoes)
  Engine engine(*comm_, *bus_, options);
  const int late = comm_->size() - 1;
  const int rank = comm_->rank();
  std::vector<float> w(5000);
  const auto run = [&](int number) {
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = input(rank, number, i);
    engine.submit("w", host_view(w.data(), w.size()), ReduceOp::kSum).wait(kWait);
    expect_sums(w, number, "w");
  };
  for (int number = 0; number < 4; ++number) run(number);
  ASSERT_GE(engine.stats().speculations_reduced, 1u) << "no steady state to speculate in";
  const EngineStats before = engine.stats();
  if (rank == late) {
    // Two idle cycles of this rank's engine thread while the others wait on "w".
    const auto deadline = std::chrono::steady_clock::now() + kWait;
    while (engine.stats().cycles < before.cycles + 2 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(5ms);
  }
  run(4);
  if (rank == late) {
    const EngineStats after = engine.stats();
    EXPECT_GE((after.speculations - after.speculations_reduced) -
                  (before.speculations - before.speculations_reduced),
              2u)
        << "the late rank's idle cycles did not veto the expected batch";
  }
  run(5);
  run(6);
}

// In steady state rank 0 changes "b": its slot votes invalid, the speculation fails, "a" is
// reduced, and "b" is a MismatchError on every rank naming both sides. Then the engine goes on.
TEST_F(EngineSpeculationTest, AChangedTensorInSteadyStateIsStillAMismatch) {
  Engine engine(*comm_, *bus_, waited_cycles());
  for (int number = 0; number < 4; ++number) step(engine, number, 10, 20);
  ASSERT_GE(engine.stats().speculations_reduced, 1u);
  const int rank = comm_->rank();
  std::vector<float> x(10, 1.0f), y(rank == 0 ? 21 : 20, 1.0f);
  Work wa = engine.submit("a", host_view(x.data(), x.size()), ReduceOp::kSum);
  Work wb = engine.submit("b", host_view(y.data(), y.size()), ReduceOp::kSum);
  wa.wait(kWait);
  EXPECT_EQ(x[9], static_cast<float>(comm_->size()));
  try {
    wb.wait(kWait);
    FAIL() << "a mismatched tensor was reduced";
  } catch (const MismatchError& error) {
    const std::string text = error.what();
    EXPECT_NE(text.find("'b'"), std::string::npos) << text;
    EXPECT_NE(text.find("f32 x21 sum on ranks [0]"), std::string::npos) << text;
    EXPECT_NE(text.find("f32 x20 sum on ranks [1"), std::string::npos) << text;
  }
  for (float v : y) ASSERT_EQ(v, 1.0f) << "a tensor that failed was written";
  for (int number = 10; number < 14; ++number) step(engine, number, 10, 20);
}

}  // namespace
}  // namespace unimsg
