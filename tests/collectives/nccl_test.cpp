// The NCCL backend on the lent GPU machine: one GPU per rank (mpirun -np N with N GPUs; one rank
// on a single-GPU machine). Skips, saying why, where there is no GPU or no NCCL in the build.

#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <vector>

#include "unimsg/bus/bus.hpp"
#include "unimsg/collectives/mpi_communicator.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/kernels/cast.hpp"
#include "unimsg/kernels/device.hpp"
#include "unimsg/kernels/device_memory.hpp"
#ifdef UNIMSG_WITH_NCCL
#include "unimsg/collectives/nccl_communicator.hpp"
#endif

namespace unimsg {
namespace {

using namespace std::chrono_literals;

int world(int* rank = nullptr) {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (rank != nullptr) MPI_Comm_rank(MPI_COMM_WORLD, rank);
  return size;
}

// Device tensors through the MPI backend, staged through pinned host memory.
TEST(GpuMpiStaging, DeviceTensorsReduceThroughTheHost) {
  const auto devices = query_devices();
  int usable = devices.count >= world() ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &usable, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (!usable) GTEST_SKIP() << "needs one GPU per rank: " << devices.reason;
  int rank = 0;
  const int ranks = world(&rank);
  set_device(rank);
  Bus bus(MPI_COMM_WORLD, BusOptions::from_env());
  MpiCommunicator comm(MPI_COMM_WORLD, bus, CommunicatorOptions::from_env());
  std::vector<float> host(1000);
  for (std::size_t i = 0; i < host.size(); ++i) host[i] = static_cast<float>((rank + i) % 9);
  DeviceBuffer device(host.size() * 4);
  device.copy_from_host(host.data(), host.size() * 4);
  const TensorView view{device.data(), host.size(), DType::kF32, Device::kCuda};
  comm.allreduce(view, view, {ReduceOp::kSum}).wait(60s);
  device.copy_to_host(host.data(), host.size() * 4);
  for (std::size_t i = 0; i < host.size(); ++i) {
    float expected = 0;
    for (int r = 0; r < ranks; ++r) expected += static_cast<float>((r + i) % 9);
    ASSERT_EQ(host[i], expected) << i;
  }
}

#ifdef UNIMSG_WITH_NCCL
class NcclTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto devices = query_devices();
    // Every rank decides the same way, so that none enters a collective alone.
    int usable = devices.count >= world() ? 1 : 0;
    MPI_Allreduce(MPI_IN_PLACE, &usable, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (!usable) {
      GTEST_SKIP() << "needs one GPU per rank: " << world() << " rank(s), "
                   << (devices.count == 0 ? devices.reason
                                          : std::to_string(devices.count) + " GPU(s)");
    }
    int rank = 0;
    world(&rank);
    set_device(rank);
    bus_ = std::make_unique<Bus>(MPI_COMM_WORLD, BusOptions::from_env());
    comm_ = std::make_unique<NcclCommunicator>(MPI_COMM_WORLD, *bus_, rank,
                                               CommunicatorOptions::from_env());
  }
  void TearDown() override {
    comm_.reset();
    bus_.reset();
  }
  std::unique_ptr<Bus> bus_;
  std::unique_ptr<NcclCommunicator> comm_;
};

TensorView device_view(DeviceBuffer& buffer, std::size_t count, DType dtype) {
  return TensorView{buffer.data(), count, dtype, Device::kCuda};
}

TEST_F(NcclTest, AllreduceF32F16Bf16MatchesTheReference) {
  const int rank = comm_->rank();
  const int ranks = comm_->size();
  for (const std::size_t count :
       {std::size_t{0}, std::size_t{1}, std::size_t{7}, std::size_t{1 << 20}}) {
    std::vector<float> host(count);
    for (std::size_t i = 0; i < count; ++i) host[i] = static_cast<float>((rank + i) % 13);
    DeviceBuffer buffer(count * 4);
    buffer.copy_from_host(host.data(), count * 4);
    comm_
        ->allreduce(device_view(buffer, count, DType::kF32),
                    device_view(buffer, count, DType::kF32), {ReduceOp::kSum})
        .wait(60s);
    buffer.copy_to_host(host.data(), count * 4);
    for (std::size_t i = 0; i < count; ++i) {
      float expected = 0;
      for (int r = 0; r < ranks; ++r) expected += static_cast<float>((r + i) % 13);
      ASSERT_EQ(host[i], expected) << i;
    }
    for (const DType half : {DType::kF16, DType::kBF16}) {
      std::vector<std::uint16_t> bits(count);
      for (std::size_t i = 0; i < count; ++i) {
        const float v = static_cast<float>((rank + i) % 13);
        bits[i] = half == DType::kF16 ? f32_to_f16(v) : f32_to_bf16(v);
      }
      DeviceBuffer hb(count * 2);
      hb.copy_from_host(bits.data(), count * 2);
      comm_->allreduce(device_view(hb, count, half), device_view(hb, count, half), {ReduceOp::kMax})
          .wait(60s);
      hb.copy_to_host(bits.data(), count * 2);
      for (std::size_t i = 0; i < count; ++i) {
        float expected = 0;
        for (int r = 0; r < ranks; ++r)
          expected = std::max(expected, static_cast<float>((r + i) % 13));
        const float got = half == DType::kF16 ? f16_to_f32(bits[i]) : bf16_to_f32(bits[i]);
        ASSERT_EQ(got, expected) << to_string(half) << " " << i;
      }
    }
  }
}

TEST_F(NcclTest, BroadcastAllgatherReduceScatterAlltoallBarrier) {
  const int rank = comm_->rank();
  const auto ranks = static_cast<std::size_t>(comm_->size());
  // broadcast from the last rank
  std::vector<std::int32_t> values(5, rank);
  DeviceBuffer b(values.size() * 4);
  b.copy_from_host(values.data(), values.size() * 4);
  comm_->broadcast(device_view(b, values.size(), DType::kI32), {static_cast<int>(ranks - 1)})
      .wait(60s);
  b.copy_to_host(values.data(), values.size() * 4);
  EXPECT_EQ(values[4], static_cast<std::int32_t>(ranks - 1));
  // allgatherv with uneven counts
  std::vector<std::size_t> counts;
  std::size_t total = 0;
  for (std::size_t r = 0; r < ranks; ++r) {
    counts.push_back(r + 1);
    total += r + 1;
  }
  std::vector<std::int64_t> mine(counts[static_cast<std::size_t>(rank)], rank);
  DeviceBuffer send(mine.size() * 8), gathered(total * 8);
  send.copy_from_host(mine.data(), mine.size() * 8);
  comm_
      ->allgatherv(device_view(send, mine.size(), DType::kI64),
                   device_view(gathered, total, DType::kI64), counts)
      .wait(60s);
  std::vector<std::int64_t> all(total);
  gathered.copy_to_host(all.data(), total * 8);
  std::size_t at = 0;
  for (std::size_t r = 0; r < ranks; ++r) {
    for (std::size_t i = 0; i < counts[r]; ++i) EXPECT_EQ(all[at++], static_cast<std::int64_t>(r));
  }
  // reduce_scatter of an uneven count, in place
  const std::size_t n = 3 * ranks + 1;
  std::vector<float> input(n, 1.0f);
  DeviceBuffer rs(n * 4);
  rs.copy_from_host(input.data(), n * 4);
  comm_
      ->reduce_scatter(device_view(rs, n, DType::kF32), device_view(rs, n, DType::kF32),
                       {ReduceOp::kSum})
      .wait(60s);
  rs.copy_to_host(input.data(), n * 4);
  const std::size_t share = Communicator::reduce_scatter_share(n, comm_->size(), rank);
  for (std::size_t i = 0; i < share; ++i) EXPECT_EQ(input[i], static_cast<float>(ranks));
  // alltoall in place: block r carries this rank's id * 100 + r
  std::vector<std::int32_t> blocks(ranks * 2);
  for (std::size_t r = 0; r < ranks; ++r)
    blocks[2 * r] = blocks[2 * r + 1] = rank * 100 + static_cast<int>(r);
  DeviceBuffer a(blocks.size() * 4);
  a.copy_from_host(blocks.data(), blocks.size() * 4);
  comm_
      ->alltoall(device_view(a, blocks.size(), DType::kI32),
                 device_view(a, blocks.size(), DType::kI32))
      .wait(60s);
  a.copy_to_host(blocks.data(), blocks.size() * 4);
  for (std::size_t s = 0; s < ranks; ++s)
    EXPECT_EQ(blocks[2 * s], static_cast<int>(s) * 100 + rank);
  comm_->barrier().wait(60s);
  // host memory is refused with a clear error
  float host = 1;
  EXPECT_THROW(comm_->allreduce(TensorView{&host, 1, DType::kF32, Device::kHost},
                                TensorView{&host, 1, DType::kF32, Device::kHost}, {ReduceOp::kSum}),
               Error);
}
#else
TEST(NcclTest, BuiltWithoutNccl) {
  GTEST_SKIP() << "unimsg was built without NCCL (UNIMSG_WITH_NCCL=OFF): no NCCL backend to test";
}
#endif

}  // namespace
}  // namespace unimsg
