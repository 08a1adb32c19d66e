// The MPI backend's shared-memory allreduce (ranks on one host): every dtype and op, sizes that
// end chunks and slices part-way, in and out of place, against a reference each rank computes
// and against the MPI path itself; a rank that never arrives is a TimeoutError, not a hang; the
// agreed allreduce (votes riding on the data) writes nothing where a rank vetoes.

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "unimsg/bus/bus.hpp"
#include "unimsg/collectives/mpi_communicator.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/kernels/cast.hpp"

namespace unimsg {
namespace {

using namespace std::chrono_literals;
using Hierarchical = CommunicatorOptions::Hierarchical;

// Small integers: every sum is exact in every dtype, so the order of additions cannot matter.
double value_at(int rank, std::size_t i) {
  return static_cast<double>((static_cast<std::size_t>(rank) * 7 + i * 3) % 11);
}

// `count` elements of `dtype` holding value_at(rank, i).
std::vector<std::byte> make(DType dtype, std::size_t count, int rank) {
  std::vector<std::byte> bytes(count * dtype_size(dtype));
  for (std::size_t i = 0; i < count; ++i) {
    const double v = value_at(rank, i);
    std::byte* at = bytes.data() + i * dtype_size(dtype);
    switch (dtype) {
      case DType::kF32: {
        const auto x = static_cast<float>(v);
        std::memcpy(at, &x, 4);
        break;
      }
      case DType::kF64:
        std::memcpy(at, &v, 8);
        break;
      case DType::kI32: {
        const auto x = static_cast<std::int32_t>(v) - 5;
        std::memcpy(at, &x, 4);
        break;
      }
      case DType::kI64: {
        const auto x = static_cast<std::int64_t>(v) - 5;
        std::memcpy(at, &x, 8);
        break;
      }
      case DType::kU8: {
        const auto x = static_cast<std::uint8_t>(v);
        std::memcpy(at, &x, 1);
        break;
      }
      case DType::kF16:
      case DType::kBF16: {
        const float x = static_cast<float>(v);
        const std::uint16_t h = dtype == DType::kF16 ? f32_to_f16(x) : f32_to_bf16(x);
        std::memcpy(at, &h, 2);
        break;
      }
    }
  }
  return bytes;
}

class ShmAllreduceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    bus_ = std::make_unique<Bus>(MPI_COMM_WORLD, BusOptions::from_env());
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &ranks_);
  }
  void TearDown() override { bus_.reset(); }
  std::unique_ptr<MpiCommunicator> communicator(Hierarchical mode, std::uint64_t chunk,
                                                std::chrono::seconds timeout = 60s) {
    CommunicatorOptions options;
    options.hierarchical = mode;
    options.shm_chunk_bytes = chunk;
    options.timeout = timeout;
    return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, *bus_, options);
  }
  std::unique_ptr<Bus> bus_;
  int rank_ = 0;
  int ranks_ = 1;
};

// Every dtype, op, size (across 256-byte chunks) and placement: the same bytes through `shm` as
// through `mpi`.
void expect_same_as_mpi(MpiCommunicator& shm, MpiCommunicator& mpi, int rank) {
  for (const DType dtype : {DType::kF32, DType::kF64, DType::kI32, DType::kI64, DType::kU8,
                            DType::kF16, DType::kBF16}) {
    for (const ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMin, ReduceOp::kMax}) {
      for (const std::size_t count : {0, 1, 3, 64, 65, 1000, 20011}) {
        for (const bool in_place : {true, false}) {
          const std::string what = std::string(to_string(dtype)) + " " + to_string(op) + " x" +
                                   std::to_string(count) + (in_place ? " in place" : "");
          auto input = make(dtype, count, rank);
          auto through_shm = input;
          auto through_mpi = input;
          std::vector<std::byte> out(input.size());
          const TensorView in{input.data(), count, dtype};
          const TensorView shm_view{through_shm.data(), count, dtype};
          const TensorView out_view{out.data(), count, dtype};
          shm.allreduce_now(in_place ? shm_view : in, in_place ? shm_view : out_view, {op});
          const auto& got = in_place ? through_shm : out;
          const TensorView mpi_view{through_mpi.data(), count, dtype};
          mpi.allreduce_now(mpi_view, mpi_view, {op});
          ASSERT_EQ(got, through_mpi) << what;
          if (!in_place) {
            ASSERT_EQ(input, make(dtype, count, rank)) << what << ": input changed";
          }
        }
      }
    }
  }
}

// Through shared memory (chunks of 256 bytes: sizes cross many chunks and end them part-way)
// and through MPI: the same bytes, and the reference's values.
TEST_F(ShmAllreduceTest, EveryDtypeAndOpMatchesMpiAndTheReference) {
  auto shm = communicator(Hierarchical::kOn, 256);
  auto mpi = communicator(Hierarchical::kOff, 256);
  expect_same_as_mpi(*shm, *mpi, rank_);
  // The reference, for f32 sums.
  const std::size_t n = 4099;
  auto data = make(DType::kF32, n, rank_);
  shm->allreduce_now(TensorView{data.data(), n, DType::kF32},
                     TensorView{data.data(), n, DType::kF32}, {ReduceOp::kSum});
  for (std::size_t i = 0; i < n; ++i) {
    double expected = 0;
    for (int r = 0; r < ranks_; ++r) expected += value_at(r, i);
    float got = 0;
    std::memcpy(&got, data.data() + 4 * i, 4);
    ASSERT_EQ(got, static_cast<float>(expected)) << i;
  }
}

// Every two ranks of this machine standing for a host, the shared-memory path on, small chunks.
CommunicatorOptions hosts_of_two(std::chrono::seconds timeout) {
  CommunicatorOptions options;
  options.hierarchical = Hierarchical::kOn;
  options.shm_chunk_bytes = 256;
  options.shm_host_ranks = 2;
  options.timeout = timeout;
  return options;
}

// Across hosts: every two ranks of this machine stand for a host (at 4 ranks, 2 hosts x 2; at
// 6, 3 x 2; at 2 ranks one host; at 3 and 5 the hosts are uneven and MPI reduces): each host's
// slices then cross between hosts over MPI, and the bytes are still MPI's.
TEST_F(ShmAllreduceTest, VirtualHostsReduceAcrossHostsAsMpiDoes) {
  MpiCommunicator hosts(MPI_COMM_WORLD, *bus_, hosts_of_two(60s));
  auto mpi = communicator(Hierarchical::kOff, 256);
  expect_same_as_mpi(hosts, *mpi, rank_);
}

// Host 0 (world ranks 0 and 1) calls, the other hosts never do: the slices cannot cross, and
// after the timeout both ranks throw, saying so.
TEST_F(ShmAllreduceTest, AHostThatNeverArrivesIsATimeout) {
  if (ranks_ != 4 && ranks_ != 6) GTEST_SKIP() << "needs hosts of two ranks (4 or 6 ranks)";
  MpiCommunicator hosts(MPI_COMM_WORLD, *bus_, hosts_of_two(2s));
  if (rank_ < 2) {
    std::vector<float> x(100, 1.0f);
    try {
      hosts.allreduce_now(TensorView{x.data(), x.size(), DType::kF32},
                          TensorView{x.data(), x.size(), DType::kF32});
      ADD_FAILURE() << "an allreduce without the other hosts returned";
    } catch (const TimeoutError& error) {
      EXPECT_NE(std::string(error.what()).find("across hosts did not complete"), std::string::npos)
          << error.what();
    }
  }
}

// The default chunk (1 MiB) and a buffer of three chunks and a bit.
TEST_F(ShmAllreduceTest, LargeBuffersAcrossDefaultChunks) {
  auto shm = communicator(Hierarchical::kOn, CommunicatorOptions{}.shm_chunk_bytes);
  const std::size_t n = 3 * (1 << 18) + 12345;
  auto data = make(DType::kF32, n, rank_);
  shm->allreduce_now(TensorView{data.data(), n, DType::kF32},
                     TensorView{data.data(), n, DType::kF32}, {ReduceOp::kMax});
  for (std::size_t i = 0; i < n; i += 997) {
    double expected = 0;
    for (int r = 0; r < ranks_; ++r) expected = std::max(expected, value_at(r, i));
    float got = 0;
    std::memcpy(&got, data.data() + 4 * i, 4);
    ASSERT_EQ(got, static_cast<float>(expected)) << i;
  }
}

// Ranks that differ in placing a call (even ranks in place, odd ones out of place, as a joined
// rank's packed zeros against the others' own tensors) still take one path: on two ranks from
// 512 KiB to 16 MiB in place went to MPI and out of place through the segments, and the two
// ranks hung.
TEST_F(ShmAllreduceTest, RanksThatPlaceACallDifferentlyTakeOnePath) {
  auto automatic = communicator(Hierarchical::kAuto, CommunicatorOptions{}.shm_chunk_bytes, 60s);
  for (const std::size_t count :
       {std::size_t{1} << 14, std::size_t{1} << 18, std::size_t{1} << 20}) {
    const auto input = make(DType::kF32, count, rank_);
    auto data = input;
    std::vector<std::byte> out(input.size());
    const TensorView in{data.data(), count, DType::kF32};
    const TensorView to{out.data(), count, DType::kF32};
    const bool in_place = rank_ % 2 == 0;
    automatic->allreduce_now(in, in_place ? in : to, {ReduceOp::kSum});
    const auto& got = in_place ? data : out;
    for (std::size_t i = 0; i < count; i += 101) {
      double expected = 0;
      for (int r = 0; r < ranks_; ++r) expected += value_at(r, i);
      float value = 0;
      std::memcpy(&value, got.data() + 4 * i, 4);
      ASSERT_EQ(value, static_cast<float>(expected)) << count << " element " << i;
    }
  }
}

// Rank 0 alone calls: after the communicator's timeout it throws, naming the late host rank.
TEST_F(ShmAllreduceTest, ARankThatNeverArrivesIsATimeout) {
  auto shm = communicator(Hierarchical::kOn, 256, 2s);
  if (ranks_ == 1) {
    // (One rank: no shared memory is set up; the call is MPI's and returns.)
    float x = 1;
    shm->allreduce_now(TensorView{&x, 1, DType::kF32}, TensorView{&x, 1, DType::kF32});
    EXPECT_EQ(x, 1.0f);
    return;
  }
  if (rank_ == 0) {
    std::vector<float> x(100, 1.0f);
    try {
      shm->allreduce_now(TensorView{x.data(), x.size(), DType::kF32},
                         TensorView{x.data(), x.size(), DType::kF32});
      ADD_FAILURE() << "an allreduce without its peers returned";
    } catch (const TimeoutError& error) {
      EXPECT_NE(std::string(error.what()).find("did not reach the barrier"), std::string::npos)
          << error.what();
    }
  }
}

// allreduce_if_agreed through `comm`: reduced (as `mpi` reduces) with the votes max-reduced
// where no rank vetoes; nothing written anywhere, the votes still agreed, where the last rank
// vetoes; and reduced again right after (chunks and epochs still in step).
void expect_agreed_allreduce(Communicator& comm, MpiCommunicator& mpi, int rank, int ranks) {
  for (const DType dtype : {DType::kF32, DType::kF16, DType::kI64, DType::kU8}) {
    for (const ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax}) {
      for (const std::size_t count : {0, 5, 1000}) {
        for (const bool in_place : {true, false}) {
          const std::string what = std::string(to_string(dtype)) + " " + to_string(op) + " x" +
                                   std::to_string(count) + (in_place ? " in place" : "");
          const auto input = make(dtype, count, rank);
          auto expected = input;
          const TensorView reference{expected.data(), count, dtype};
          mpi.allreduce_now(reference, reference, {op});
          for (const bool someone_vetoes : {false, true, false}) {
            const bool veto = someone_vetoes && rank == ranks - 1;
            auto data = input;
            std::vector<std::byte> out(input.size(), std::byte{0xAB});
            const TensorView in{veto ? nullptr : data.data(), count, dtype};
            const TensorView to{veto ? nullptr : out.data(), count, dtype};
            std::vector<std::uint8_t> votes = {static_cast<std::uint8_t>(veto ? 1 : 0),
                                               static_cast<std::uint8_t>(rank % 3),
                                               static_cast<std::uint8_t>(rank == 0 ? 9 : 2)};
            const bool reduced = comm.allreduce_if_agreed(in, in_place ? in : to, votes, {op});
            const auto want_votes =
                std::vector<std::uint8_t>{static_cast<std::uint8_t>(someone_vetoes ? 1 : 0),
                                          static_cast<std::uint8_t>(std::min(ranks - 1, 2)), 9};
            ASSERT_EQ(votes, want_votes) << what;
            ASSERT_EQ(reduced, !someone_vetoes) << what;
            if (veto) continue;
            const auto& got = in_place ? data : out;
            if (someone_vetoes) {
              ASSERT_EQ(got,
                        in_place ? input : std::vector<std::byte>(input.size(), std::byte{0xAB}))
                  << what << ": written although a rank vetoed";
            } else {
              ASSERT_EQ(got, expected) << what;
            }
          }
        }
      }
    }
  }
}

TEST_F(ShmAllreduceTest, AgreedAllreduceReducesOnlyWhereNoRankVetoes) {
  auto shm = communicator(Hierarchical::kOn, 256);
  auto mpi = communicator(Hierarchical::kOff, 256);
  MpiCommunicator hosts(MPI_COMM_WORLD, *bus_, hosts_of_two(60s));
  // The votes ride on the data through shared memory on one host only, and only so many.
  EXPECT_EQ(shm->agreement_rides_on_data(1000, DType::kF32, 3), ranks_ > 1);
  EXPECT_FALSE(shm->agreement_rides_on_data(1000, DType::kF32, 100000));
  EXPECT_FALSE(mpi->agreement_rides_on_data(1000, DType::kF32, 3));
  // (Virtual hosts of two: at 2 ranks, one host; at 3 and 5 uneven, MPI's.)
  EXPECT_EQ(hosts.agreement_rides_on_data(1000, DType::kF32, 3), ranks_ == 2);
  expect_agreed_allreduce(*shm, *mpi, rank_, ranks_);   // votes in the shared segments
  expect_agreed_allreduce(*mpi, *mpi, rank_, ranks_);   // votes' allreduce, then the data's
  expect_agreed_allreduce(hosts, *mpi, rank_, ranks_);  // (across virtual hosts: the same)
  // More votes than a segment holds: the votes' allreduce first, on the same communicator.
  std::vector<std::uint8_t> many(100000, 0);
  many[99999] = static_cast<std::uint8_t>(rank_);
  float x = 1;
  EXPECT_TRUE(shm->allreduce_if_agreed(TensorView{&x, 1, DType::kF32},
                                       TensorView{&x, 1, DType::kF32}, many));
  EXPECT_EQ(x, static_cast<float>(ranks_));
  EXPECT_EQ(many[99999], ranks_ - 1);
}

// The settings, validated: a bad value is a ConfigError naming the setting.
TEST_F(ShmAllreduceTest, SettingsFromTheEnvironment) {
  EXPECT_EQ(CommunicatorOptions::from_env().hierarchical, Hierarchical::kAuto);
  ::setenv("UNIMSG_HIERARCHICAL", "off", 1);
  ::setenv("UNIMSG_SHM_MIN_BYTES", "64K", 1);
  ::setenv("UNIMSG_SHM_CHUNK_BYTES", "1000", 1);
  const auto options = CommunicatorOptions::from_env();
  EXPECT_EQ(options.hierarchical, Hierarchical::kOff);
  EXPECT_EQ(options.shm_min_bytes, 64u << 10);
  EXPECT_EQ(options.shm_chunk_bytes, 960u);  // (whole 64-byte lines)
  ::setenv("UNIMSG_HIERARCHICAL", "sometimes", 1);
  try {
    CommunicatorOptions::from_env();
    ADD_FAILURE() << "UNIMSG_HIERARCHICAL=sometimes was accepted";
  } catch (const ConfigError& error) {
    EXPECT_NE(std::string(error.what()).find("UNIMSG_HIERARCHICAL"), std::string::npos);
  }
  ::setenv("UNIMSG_HIERARCHICAL", "on", 1);
  ::setenv("UNIMSG_SHM_CHUNK_BYTES", "8", 1);  // below one line
  EXPECT_THROW(CommunicatorOptions::from_env(), ConfigError);
  ::unsetenv("UNIMSG_HIERARCHICAL");
  ::unsetenv("UNIMSG_SHM_MIN_BYTES");
  ::unsetenv("UNIMSG_SHM_CHUNK_BYTES");
}

}  // namespace
}  // namespace unimsg
