// The engine over tensors in device memory: through the MPI backend (which stages them through
// host memory) and over the NCCL backend (EngineOptions::device_communicator). Runs over the
// device model in CI (1-5 ranks) and on a lent GPU (one rank per GPU); skips, saying why,
// without a device.

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "unimsg/bus/bus.hpp"
#include "unimsg/collectives/engine.hpp"
#include "unimsg/collectives/mpi_communicator.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/kernels/device.hpp"
#include "unimsg/kernels/device_memory.hpp"
#ifdef UNIMSG_WITH_NCCL
#include "unimsg/collectives/nccl_communicator.hpp"
#endif
#ifdef UNIMSG_TEST_DEVICE_MODEL
#include "device_model.hpp"
#endif

// NCCL launches so far (the device model counts them; elsewhere 0).
std::uint64_t nccl_launches() {
#ifdef UNIMSG_TEST_DEVICE_MODEL
  return device_model::launches();
#else
  return 0;
#endif
}

namespace unimsg {
namespace {

using namespace std::chrono_literals;
constexpr auto kWait = 60s;

float value_at(int rank, std::size_t i, int salt) {
  return static_cast<float>((static_cast<std::size_t>(rank + salt) + i) % 7);
}

// One device tensor per count, rank r's element i = value_at(r, i, salt).
struct DeviceTensors {
  DeviceTensors(const std::vector<std::size_t>& sizes, int rank, int salt) : counts(sizes) {
    for (const std::size_t n : counts) {
      std::vector<float> host(n);
      for (std::size_t i = 0; i < n; ++i) host[i] = value_at(rank, i, salt);
      buffers.emplace_back(n * sizeof(float));
      buffers.back().copy_from_host(host.data(), n * sizeof(float));
    }
  }
  TensorView view(std::size_t k) {
    return TensorView{buffers[k].data(), counts[k], DType::kF32, Device::kCuda};
  }
  // Every element the sum over `ranks` of value_at (ranks not in `contributing` count zero).
  void expect_sums(int ranks, int salt, const std::vector<int>& contributing = {}) {
    for (std::size_t k = 0; k < counts.size(); ++k) {
      std::vector<float> host(counts[k]);
      buffers[k].copy_to_host(host.data(), host.size() * sizeof(float));
      for (std::size_t i = 0; i < host.size(); ++i) {
        float expected = 0;
        for (int r = 0; r < ranks; ++r) {
          const bool in =
              contributing.empty() ||
              std::find(contributing.begin(), contributing.end(), r) != contributing.end();
          if (in) expected += value_at(r, i, salt);
        }
        ASSERT_EQ(host[i], expected) << "tensor " << k << " element " << i;
      }
    }
  }
  std::vector<std::size_t> counts;
  std::vector<DeviceBuffer> buffers;
};

class EngineDevice : public ::testing::Test {
 protected:
  void SetUp() override {
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &ranks_);
    const auto devices = query_devices();
    int usable = devices.count >= 1 ? 1 : 0;
    MPI_Allreduce(MPI_IN_PLACE, &usable, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (!usable) GTEST_SKIP() << "needs a GPU per rank: " << devices.reason;
    set_device(rank_ % devices.count);
    bus_ = std::make_unique<Bus>(MPI_COMM_WORLD, BusOptions::from_env());
    mpi_ =
        std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, *bus_, CommunicatorOptions::from_env());
  }
  void TearDown() override {
    mpi_.reset();
    bus_.reset();
  }

  // Submits every tensor (in an order that differs per rank), then waits for all of them.
  void step(Engine& engine, DeviceTensors& tensors, const std::string& prefix) {
    std::vector<Work> works;
    const std::size_t n = tensors.counts.size();
    for (std::size_t j = 0; j < n; ++j) {
      const std::size_t k = (j + static_cast<std::size_t>(rank_)) % n;
      works.push_back(engine.submit(prefix + std::to_string(k), tensors.view(k), ReduceOp::kSum));
    }
    for (auto& work : works) work.wait(kWait);
  }

  int rank_ = 0;
  int ranks_ = 1;
  std::unique_ptr<Bus> bus_;
  std::unique_ptr<MpiCommunicator> mpi_;
};

const std::vector<std::size_t> kCounts{0, 1, 7, 1000, 33};

// Fused in a device buffer (and, steady state, from the cache), reduced through MPI's staging.
TEST_F(EngineDevice, DeviceTensorsFuseAndReduceThroughMpiStaging) {
  Engine engine(*mpi_, *bus_, EngineOptions{});
  for (int salt = 0; salt < 3; ++salt) {
    DeviceTensors tensors(kCounts, rank_, salt);
    step(engine, tensors, "mpi.");
    tensors.expect_sums(ranks_, salt);
  }
  EXPECT_EQ(engine.stats().tensors_reduced, 3 * kCounts.size());
}

// Device tensors over NCCL, host tensors of the same step over MPI; a group of slices of one
// device buffer reduced where it lies; a rank that joined contributes zeros.
TEST_F(EngineDevice, DeviceTensorsOverNcclHostTensorsOverMpi) {
#ifdef UNIMSG_WITH_NCCL
  NcclCommunicator nccl(MPI_COMM_WORLD, *bus_, current_device(), CommunicatorOptions::from_env());
  EngineOptions options;
  options.device_communicator = &nccl;
  Engine engine(*mpi_, *bus_, options);
  [[maybe_unused]] const auto launched = nccl_launches();
  for (int salt = 0; salt < 2; ++salt) {
    DeviceTensors tensors(kCounts, rank_, salt);
    std::vector<float> host(5, static_cast<float>(rank_ + 1));
    Work on_host =
        engine.submit("host", TensorView{host.data(), host.size(), DType::kF32}, ReduceOp::kSum);
    step(engine, tensors, "nccl.");
    on_host.wait(kWait);
    tensors.expect_sums(ranks_, salt);
    EXPECT_EQ(host[4], static_cast<float>(ranks_ * (ranks_ + 1) / 2));
  }
#ifdef UNIMSG_TEST_DEVICE_MODEL
  EXPECT_GE(nccl_launches(), launched + 2) << "the device tensors did not go over NCCL";
#endif
  DeviceTensors flat({24}, rank_, 5);
  const auto before = engine.stats().fused_in_place;
  engine
      .submit_group({{"flat.a", TensorView{flat.buffers[0].data(), 10, DType::kF32, Device::kCuda}},
                     {"flat.b", TensorView{static_cast<float*>(flat.buffers[0].data()) + 10, 14,
                                           DType::kF32, Device::kCuda}}},
                    ReduceOp::kSum)
      .wait(kWait);
  flat.expect_sums(ranks_, 5);
  EXPECT_EQ(engine.stats().fused_in_place, before + 1);
  // The last rank joins at once; the others reduce one more step without it.
  std::vector<int> others;
  for (int r = 0; r + 1 < ranks_; ++r) others.push_back(r);
  if (rank_ + 1 < ranks_) {
    DeviceTensors last({3, 8}, rank_, 9);
    step(engine, last, "joined.");
    last.expect_sums(ranks_, 9, others);
  }
  engine.join();
#else
  GTEST_SKIP() << "unimsg was built without NCCL (UNIMSG_WITH_NCCL=OFF)";
#endif
}

// The last rank joins before it ever submitted a device tensor: it still stands in with zeros
// in device memory (on its thread's current GPU) while the others reduce theirs.
TEST_F(EngineDevice, ARankThatJoinsFirstContributesZeros) {
  Engine engine(*mpi_, *bus_, EngineOptions{});
  std::vector<int> others;
  for (int r = 0; r + 1 < ranks_; ++r) others.push_back(r);
  if (rank_ + 1 < ranks_) {
    DeviceTensors tensors({5, 1000}, rank_, 2);
    step(engine, tensors, "early.");
    tensors.expect_sums(ranks_, 2, others);
  }
  engine.join();
}

// The engine compresses host tensors only; a name must be in device memory on every rank or on
// none (a MismatchError names the ranks otherwise).
TEST_F(EngineDevice, CompressionRefusedAndDeviceMismatchNamed) {
  Engine engine(*mpi_, *bus_, EngineOptions{});
  DeviceTensors tensors({16}, rank_, 0);
  try {
    engine.submit("compressed", tensors.view(0), ReduceOp::kSum, CompressionSpec::parse("fp16"));
    ADD_FAILURE() << "a compressed device tensor was accepted";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("device memory"), std::string::npos) << error.what();
  }
  if (ranks_ < 2) return;  // (one rank cannot disagree with itself)
  std::vector<float> host(16, 1.0f);
  const TensorView view =
      rank_ == 0 ? tensors.view(0) : TensorView{host.data(), host.size(), DType::kF32};
  Work mixed = engine.submit("mixed", view, ReduceOp::kSum);
  try {
    mixed.wait(kWait);
    ADD_FAILURE() << "host and device tensors under one name were reduced";
  } catch (const MismatchError& error) {
    EXPECT_NE(std::string(error.what()).find("in device memory"), std::string::npos)
        << error.what();
  }
}

}  // namespace
}  // namespace unimsg
