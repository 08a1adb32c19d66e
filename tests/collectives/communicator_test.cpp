// Multi-rank tests of the MPI Communicator: every op x dtype x reduction x size class against a
// reference each rank computes on its own from the inputs every rank is known to contribute.

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "unimsg/bus/bus.hpp"
#include "unimsg/collectives/mpi_communicator.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/kernels/cast.hpp"
#include "unimsg/kernels/device.hpp"
#include "world_fixture.hpp"

namespace unimsg {
namespace {

using namespace std::chrono_literals;
constexpr auto kWait = 120s;

// A typed buffer of any dtype, read and written as double.
class Buffer {
 public:
  Buffer(DType dtype, std::size_t count)
      : dtype_(dtype), count_(count), bytes_(count * dtype_size(dtype) + 1) {}

  void set(std::size_t i, double value) { store_element(bytes_.data(), dtype_, i, value); }
  double get(std::size_t i) const { return load_element(bytes_.data(), dtype_, i); }
  TensorView view() { return TensorView{bytes_.data(), count_, dtype_, Device::kHost}; }
  TensorView view_at(std::size_t offset, std::size_t count) {
    return TensorView{bytes_.data() + offset * dtype_size(dtype_), count, dtype_, Device::kHost};
  }

 private:
  DType dtype_;
  std::size_t count_;
  std::vector<std::byte> bytes_;
};

// Small integers: every sum over 5 ranks is exact in every dtype (u8 and bf16 included).
double input(int rank, std::size_t i) {
  return static_cast<double>((rank * 7 + i * 3) % 45 + 1);
}

bool is_integer(DType dtype) {
  return dtype == DType::kI32 || dtype == DType::kI64 || dtype == DType::kU8;
}

double reduce_reference(ReduceOp op, DType dtype, int ranks, std::size_t i) {
  double result = input(0, i);
  for (int r = 1; r < ranks; ++r) {
    const double v = input(r, i);
    if (op == ReduceOp::kMin)
      result = std::min(result, v);
    else if (op == ReduceOp::kMax)
      result = std::max(result, v);
    else
      result += v;
  }
  if (op == ReduceOp::kAvg)
    result = is_integer(dtype) ? std::trunc(result / ranks) : result / ranks;
  return result;
}

double tolerance(DType dtype, double expected) {
  switch (dtype) {
    case DType::kF16:
      return std::abs(expected) * 1e-3 + 1e-3;
    case DType::kBF16:
      return std::abs(expected) * 8e-3 + 1e-2;
    case DType::kF32:
      return std::abs(expected) * 1e-6;
    default:
      return 0;
  }
}

std::vector<std::size_t> size_classes(int ranks) {
  std::vector<std::size_t> sizes = {0, 1, 7, 1000, 100003};
  if (ranks > 2) sizes.push_back(static_cast<std::size_t>(ranks - 1));  // fewer than the ranks
  return sizes;
}

using CollectivesTest = testing_support::WorldTest;

TEST_F(CollectivesTest, AllreduceEveryDtypeOpAndSize) {
  const int rank = comm_->rank();
  const int ranks = comm_->size();
  for (const DType dtype : kAllDTypes) {
    for (const ReduceOp op : kAllReduceOps) {
      for (const std::size_t count : size_classes(ranks)) {
        for (const bool in_place : {false, true}) {
          Buffer send(dtype, count);
          Buffer recv(dtype, count);
          for (std::size_t i = 0; i < count; ++i) send.set(i, input(rank, i));
          Work work = in_place ? comm_->allreduce(send.view(), send.view(), {op, "t"})
                               : comm_->allreduce(send.view(), recv.view(), {op, "t"});
          work.wait(kWait);
          const Buffer& result = in_place ? send : recv;
          for (std::size_t i = 0; i < count; ++i) {
            const double expected = reduce_reference(op, dtype, ranks, i);
            ASSERT_NEAR(result.get(i), expected, tolerance(dtype, expected))
                << to_string(dtype) << " " << to_string(op) << " count " << count << " index " << i
                << (in_place ? " in place" : "");
          }
        }
      }
    }
  }
}

TEST_F(CollectivesTest, HalfPrecisionAccumulatesInF32) {
  // Element i: rank i % n contributes 2048, every other rank 1. In f16, 2048 + 1 rounds back to
  // 2048, so a reduction rounding at every step loses the ones that meet 2048 first — whatever
  // its order, some element has the 2048 added to a lone 1 first. In f32 every sum is exact.
  const int ranks = comm_->size();
  if (ranks < 3) GTEST_SKIP() << "needs 3 ranks for a sum that rounds stepwise in f16";
  for (const DType dtype : {DType::kF16, DType::kBF16}) {
    const double big = dtype == DType::kF16 ? 2048.0 : 256.0;  // bf16 spacing is 2 at 256
    Buffer buffer(dtype, static_cast<std::size_t>(ranks));
    for (int i = 0; i < ranks; ++i) {
      buffer.set(static_cast<std::size_t>(i), i == comm_->rank() ? big : 1.0);
    }
    comm_->allreduce(buffer.view(), buffer.view(), {ReduceOp::kSum}).wait(kWait);
    Buffer expected(dtype, 1);
    expected.set(0, big + ranks - 1);  // the exact sum, rounded once
    for (int i = 0; i < ranks; ++i) {
      EXPECT_EQ(buffer.get(static_cast<std::size_t>(i)), expected.get(0))
          << to_string(dtype) << " element " << i;
    }
  }
}

TEST_F(CollectivesTest, BroadcastFromEveryRoot) {
  for (int root = 0; root < comm_->size(); ++root) {
    for (const DType dtype : kAllDTypes) {
      for (const std::size_t count : size_classes(comm_->size())) {
        Buffer buffer(dtype, count);
        for (std::size_t i = 0; i < count; ++i) buffer.set(i, input(comm_->rank(), i));
        comm_->broadcast(buffer.view(), {root, "b"}).wait(kWait);
        for (std::size_t i = 0; i < count; ++i) {
          ASSERT_EQ(buffer.get(i), input(root, i)) << "root " << root << " " << to_string(dtype);
        }
      }
    }
  }
}

TEST_F(CollectivesTest, AllgatherAndAllgatherv) {
  const int rank = comm_->rank();
  const int ranks = comm_->size();
  for (const DType dtype : kAllDTypes) {
    for (const std::size_t count : size_classes(ranks)) {
      for (const bool in_place : {false, true}) {
        Buffer send(dtype, count);
        Buffer recv(dtype, count * static_cast<std::size_t>(ranks));
        const std::size_t offset = static_cast<std::size_t>(rank) * count;
        for (std::size_t i = 0; i < count; ++i) {
          send.set(i, input(rank, i));
          recv.set(offset + i, input(rank, i));
        }
        (in_place ? comm_->allgather(recv.view_at(offset, count), recv.view())
                  : comm_->allgather(send.view(), recv.view()))
            .wait(kWait);
        for (int r = 0; r < ranks; ++r) {
          for (std::size_t i = 0; i < count; ++i) {
            ASSERT_EQ(recv.get(static_cast<std::size_t>(r) * count + i), input(r, i));
          }
        }
      }
    }
    // Uneven contributions, one of them empty.
    std::vector<std::size_t> counts;
    for (int r = 0; r < ranks; ++r)
      counts.push_back(r == 1 ? 0 : static_cast<std::size_t>(3 * r + 2));
    std::size_t total = 0;
    for (const auto c : counts) total += c;
    Buffer send(dtype, counts[static_cast<std::size_t>(rank)]);
    for (std::size_t i = 0; i < counts[static_cast<std::size_t>(rank)]; ++i)
      send.set(i, input(rank, i));
    Buffer recv(dtype, total);
    comm_->allgatherv(send.view(), recv.view(), counts, {"v"}).wait(kWait);
    std::size_t at = 0;
    for (int r = 0; r < ranks; ++r) {
      for (std::size_t i = 0; i < counts[static_cast<std::size_t>(r)]; ++i) {
        ASSERT_EQ(recv.get(at++), input(r, i)) << "from rank " << r;
      }
    }
  }
}

TEST_F(CollectivesTest, ReduceScatterWithUnevenShares) {
  const int rank = comm_->rank();
  const int ranks = comm_->size();
  for (const DType dtype : kAllDTypes) {
    for (const ReduceOp op : kAllReduceOps) {
      for (const std::size_t count : size_classes(ranks)) {
        for (const bool in_place : {false, true}) {
          const std::size_t share = Communicator::reduce_scatter_share(count, ranks, rank);
          const std::size_t offset = Communicator::reduce_scatter_offset(count, ranks, rank);
          Buffer send(dtype, count);
          Buffer recv(dtype, share);
          for (std::size_t i = 0; i < count; ++i) send.set(i, input(rank, i));
          (in_place ? comm_->reduce_scatter(send.view(), send.view(), {op})
                    : comm_->reduce_scatter(send.view(), recv.view(), {op}))
              .wait(kWait);
          const Buffer& result = in_place ? send : recv;
          for (std::size_t i = 0; i < share; ++i) {
            const double expected = reduce_reference(op, dtype, ranks, offset + i);
            ASSERT_NEAR(result.get(i), expected, tolerance(dtype, expected))
                << to_string(dtype) << " " << to_string(op) << " count " << count;
          }
        }
      }
    }
  }
}

TEST_F(CollectivesTest, AlltoallSendsEachBlockToItsRank) {
  const int rank = comm_->rank();
  const auto ranks = static_cast<std::size_t>(comm_->size());
  for (const DType dtype : kAllDTypes) {
    for (const std::size_t block : {0u, 1u, 5u, 4099u}) {
      for (const bool in_place : {false, true}) {
        Buffer send(dtype, block * ranks);
        Buffer recv(dtype, block * ranks);
        // Block for rank d carries input(rank, d * 1000 + i).
        for (std::size_t d = 0; d < ranks; ++d) {
          for (std::size_t i = 0; i < block; ++i)
            send.set(d * block + i, input(rank, d * 1000 + i));
        }
        (in_place ? comm_->alltoall(send.view(), send.view())
                  : comm_->alltoall(send.view(), recv.view()))
            .wait(kWait);
        const Buffer& result = in_place ? send : recv;
        for (std::size_t s = 0; s < ranks; ++s) {
          for (std::size_t i = 0; i < block; ++i) {
            ASSERT_EQ(result.get(s * block + i),
                      input(static_cast<int>(s), static_cast<std::size_t>(rank) * 1000 + i));
          }
        }
      }
    }
  }
}

TEST_F(CollectivesTest, OutstandingOpsCompleteInAnyOrderWhileComputing) {
  const int ranks = comm_->size();
  constexpr std::size_t kCount = 1 << 20;
  std::vector<Buffer> buffers;
  std::vector<Work> works;
  for (int k = 0; k < 4; ++k) {
    buffers.emplace_back(DType::kF32, kCount);
    for (std::size_t i = 0; i < kCount; i += 4096) buffers.back().set(i, k + 1);
  }
  for (int k = 0; k < 4; ++k) {
    works.push_back(comm_->allreduce(buffers[static_cast<std::size_t>(k)].view(),
                                     buffers[static_cast<std::size_t>(k)].view(),
                                     {ReduceOp::kSum}));
  }
  double busy = 0;  // compute while the collectives run
  for (int i = 1; i < 2000000; ++i) busy += 1.0 / i;
  EXPECT_GT(busy, 1.0);
  for (int k = 3; k >= 0; --k) works[static_cast<std::size_t>(k)].wait(kWait);
  for (int k = 0; k < 4; ++k) {
    EXPECT_EQ(buffers[static_cast<std::size_t>(k)].get(0), (k + 1) * ranks);
    EXPECT_EQ(buffers[static_cast<std::size_t>(k)].get(kCount - 4096), (k + 1) * ranks);
  }
  comm_->barrier({"end"}).wait(kWait);
}

TEST_F(CollectivesTest, SubCommunicatorOverSomeRanks) {
  const int ranks = comm_->size();
  std::vector<int> members;  // even ranks, in reverse order
  for (int r = ranks - 1; r >= 0; --r) {
    if (r % 2 == 0) members.push_back(r);
  }
  auto sub = comm_->split(members);
  if (comm_->rank() % 2 != 0) {
    EXPECT_EQ(sub, nullptr);
    return;
  }
  ASSERT_NE(sub, nullptr);
  EXPECT_EQ(sub->size(), static_cast<int>(members.size()));
  const auto position = std::find(members.begin(), members.end(), comm_->rank()) - members.begin();
  EXPECT_EQ(sub->rank(), static_cast<int>(position));
  std::int64_t value = comm_->rank();
  sub->allreduce(host_view(&value, 1), host_view(&value, 1), {ReduceOp::kSum}).wait(kWait);
  std::int64_t expected = 0;
  for (const int m : members) expected += m;
  EXPECT_EQ(value, expected);
}

TEST_F(CollectivesTest, KnowsWhetherRanksOutnumberCoresAndHowLongWaitsSpin) {
  // The ranks on this node, counted independently of the communicator.
  MPI_Comm node = MPI_COMM_NULL;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
  int on_node = 0;
  MPI_Comm_size(node, &on_node);
  MPI_Comm_free(&node);
  const bool oversubscribed = static_cast<unsigned>(on_node) > std::thread::hardware_concurrency();
  EXPECT_EQ(comm_->oversubscribed(), oversubscribed)
      << on_node << " ranks on " << std::thread::hardware_concurrency() << " cores";
  EXPECT_EQ(comm_->wait_spin_polls(), Work::kSpinPolls);
  // A communicator over some of the ranks keeps what the whole job found.
  std::vector<int> first{0};
  auto alone = comm_->split(first);
  if (comm_->rank() == 0) {
    ASSERT_NE(alone, nullptr);
    EXPECT_EQ(alone->oversubscribed(), oversubscribed);
  }
  // The setting, validated; it decides nothing else: collectives still complete, also with a
  // wait that yields from the first poll.
  ::setenv("UNIMSG_WAIT_SPIN_POLLS", "7", 1);
  MpiCommunicator seven(MPI_COMM_WORLD, *bus_, CommunicatorOptions::from_env());
  EXPECT_EQ(seven.wait_spin_polls(), 7u);
  std::int32_t value = 1;
  seven.allreduce(host_view(&value, 1), host_view(&value, 1), {ReduceOp::kSum}).wait(kWait);
  EXPECT_EQ(value, comm_->size());
  seven.allreduce(host_view(&value, 1), host_view(&value, 1), {ReduceOp::kSum}).wait(kWait, 0);
  EXPECT_EQ(value, comm_->size() * comm_->size());
  ::setenv("UNIMSG_WAIT_SPIN_POLLS", "lots", 1);
  EXPECT_THROW(CommunicatorOptions::from_env(), ConfigError);
  ::unsetenv("UNIMSG_WAIT_SPIN_POLLS");
}

TEST_F(CollectivesTest, TimeoutNamesTheRanksThatNeverStarted) {
  const int ranks = comm_->size();
  if (ranks < 2) GTEST_SKIP() << "needs a rank that arrives late";
  const int late = ranks - 1;
  float value = 1;
  if (comm_->rank() != late) {
    Work work =
        comm_->allreduce(host_view(&value, 1), host_view(&value, 1), {ReduceOp::kSum, "grad.w"});
    try {
      work.wait(300ms);
      ADD_FAILURE() << "completed without rank " << late;
    } catch (const TimeoutError& error) {
      const std::string text = error.what();
      EXPECT_NE(text.find("allreduce sum f32 x1 'grad.w'"), std::string::npos) << text;
      EXPECT_NE(text.find("[" + std::to_string(late) + "]"), std::string::npos) << text;
    }
    MPI_Barrier(MPI_COMM_WORLD);
    work.wait(kWait);  // the late rank joins now: the same Work completes
  } else {
    MPI_Barrier(MPI_COMM_WORLD);
    comm_->allreduce(host_view(&value, 1), host_view(&value, 1), {ReduceOp::kSum}).wait(kWait);
  }
  EXPECT_EQ(value, static_cast<float>(ranks));
}

TEST_F(CollectivesTest, BadArgumentsAreClearErrors) {
  std::vector<float> a(4), b(5);
  try {
    comm_->allreduce(host_view(a.data(), a.size()), host_view(b.data(), b.size()),
                     {ReduceOp::kSum});
    FAIL() << "accepted different counts";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("send has 4 elements, recv 5"), std::string::npos);
  }
  if (query_devices().count == 0) {
    // Device tensors are staged through the host; without a GPU that fails clearly.
    TensorView device{a.data(), a.size(), DType::kF32, Device::kCuda};
    try {
      comm_->allreduce(device, device, {ReduceOp::kSum});
      ADD_FAILURE() << "staged device memory without a GPU";
    } catch (const Error& error) {
      EXPECT_NE(std::string(error.what()).find("staging device memory"), std::string::npos)
          << error.what();
    }
  }
  EXPECT_THROW(comm_->broadcast(host_view(a.data(), a.size()), {comm_->size()}), Error);
  std::vector<double> d(4);
  EXPECT_THROW(comm_->allreduce(host_view(a.data(), 4), host_view(d.data(), 4), {ReduceOp::kSum}),
               Error);
  const int bad[] = {0, 0};
  EXPECT_THROW(comm_->split(bad), Error);
}

}  // namespace
}  // namespace unimsg
