// Restore from the newest checkpoint any rank holds (node-local fast tiers: each rank its own
// directory here), on 1-5 ranks: broadcast from the lowest holder to the ranks that lack it,
// byte-equal everywhere; a damaged newest copy skipped in favour of the newest intact one;
// nothing anywhere; a rank stuck loading making the others time out; the transfer format
// refusing truncated bytes.

#include <gtest/gtest.h>
#include <mpi.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "unimsg/core/error.hpp"
#include "unimsg/services/checkpoint_restore.hpp"

namespace unimsg {
namespace {

namespace fs = std::filesystem;

int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}
int world_size() {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

Checkpoint make(std::uint64_t step) {
  Checkpoint checkpoint;
  checkpoint.step = step;
  checkpoint.metadata_json = R"({"epoch":)" + std::to_string(step / 10) + "}";
  std::vector<std::byte> weights(100000 + step);
  for (std::size_t i = 0; i < weights.size(); ++i) {
    weights[i] = static_cast<std::byte>((i * 31 + step) & 0xff);
  }
  checkpoint.blobs["weights"] = weights;
  checkpoint.blobs["empty"] = {};
  return checkpoint;
}

class CheckpointRestoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    int pid = static_cast<int>(::getpid());
    MPI_Bcast(&pid, 1, MPI_INT, 0, MPI_COMM_WORLD);
    base_ = fs::temp_directory_path() /
            ("unimsg-restore-" + std::to_string(pid) + "-" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
    mine_ = base_ / ("host" + std::to_string(world_rank()));  // this rank's node-local tier
    MPI_Barrier(MPI_COMM_WORLD);
  }
  void TearDown() override {
    MPI_Barrier(MPI_COMM_WORLD);
    fs::remove_all(mine_);
    MPI_Barrier(MPI_COMM_WORLD);
    if (world_rank() == 0) fs::remove_all(base_);
  }
  std::optional<RestoredCheckpoint> restore(std::vector<std::string>* skipped = nullptr) {
    Checkpointer checkpointer(mine_);
    return restore_newest_anywhere(
        MPI_COMM_WORLD, [&](std::vector<std::string>* s) { return checkpointer.load_latest(s); },
        skipped);
  }
  fs::path base_, mine_;
};

TEST_F(CheckpointRestoreTest, NewestHeldByOneRankReachesEveryRank) {
  // Rank 0 holds steps 10 and 20; the last rank holds 30, the newest; the others nothing.
  {
    Checkpointer checkpointer(mine_);
    if (world_rank() == 0) {
      checkpointer.save(make(10));
      checkpointer.save(make(20));
    }
    if (world_rank() == world_size() - 1) checkpointer.save(make(30));
  }
  const auto restored = restore();
  ASSERT_TRUE(restored);
  EXPECT_EQ(restored->checkpoint.step, 30u);
  EXPECT_EQ(restored->source_rank, world_size() - 1);
  EXPECT_EQ(restored->received, world_rank() != world_size() - 1);
  const Checkpoint expected = make(30);
  EXPECT_EQ(restored->checkpoint.blobs, expected.blobs);
  EXPECT_EQ(restored->checkpoint.metadata_json, expected.metadata_json);
}

TEST_F(CheckpointRestoreTest, DamagedNewestIsSkippedForTheNewestIntact) {
  {
    Checkpointer checkpointer(mine_);
    if (world_rank() == 0) {
      checkpointer.save(make(10));
      checkpointer.save(make(20));
    }
  }
  if (world_rank() == 0) {
    // Corrupt step 20's blob: rank 0 must fall back to 10, and so must everyone.
    for (const auto& entry : fs::recursive_directory_iterator(mine_)) {
      if (entry.path().extension() == ".blob" &&
          entry.path().string().find("step-000000000020") != std::string::npos &&
          fs::file_size(entry.path()) > 0) {
        std::fstream file(entry.path(), std::ios::in | std::ios::out | std::ios::binary);
        file.seekp(7);
        file.put('\x5a');
      }
    }
  }
  std::vector<std::string> skipped;
  const auto restored = restore(&skipped);
  ASSERT_TRUE(restored);
  EXPECT_EQ(restored->checkpoint.step, 10u);
  EXPECT_EQ(restored->checkpoint.blobs, make(10).blobs);
  if (world_rank() == 0) {
    ASSERT_EQ(skipped.size(), 1u);
    EXPECT_NE(skipped[0].find("20"), std::string::npos) << skipped[0];
  }
}

TEST_F(CheckpointRestoreTest, NothingAnywhereIsNothingEverywhere) {
  EXPECT_FALSE(restore());
}

// A rank stuck on a slow filesystem still heartbeats, so nothing else notices it: the restore's
// own collectives must give up on it, with an error naming the restore, long before it arrives.
TEST_F(CheckpointRestoreTest, ARankStuckLoadingMakesTheOthersTimeOut) {
  if (world_size() < 2) GTEST_SKIP() << "needs a second rank";
  const int stuck = world_size() - 1;
  constexpr auto kDelay = std::chrono::seconds(6);
  RestoreOptions options;
  options.timeout = std::chrono::seconds(1);
  const auto start = std::chrono::steady_clock::now();
  std::string error;
  try {
    const auto restored = restore_newest_anywhere(
        MPI_COMM_WORLD,
        [&](std::vector<std::string>*) -> std::optional<Checkpoint> {
          if (world_rank() == stuck) std::this_thread::sleep_for(kDelay);
          return std::nullopt;
        },
        nullptr, options);
    EXPECT_FALSE(restored);
  } catch (const TimeoutError& timeout) {
    error = timeout.what();
  }
  const auto waited = std::chrono::steady_clock::now() - start;
  if (world_rank() != stuck) {
    EXPECT_NE(error.find("checkpoint restore"), std::string::npos)
        << "no timeout naming the restore (\"" << error << "\") after "
        << std::chrono::duration_cast<std::chrono::milliseconds>(waited).count() << " ms";
    EXPECT_LT(waited, kDelay - std::chrono::seconds(2)) << "the error came only when it arrived";
  }
}

TEST(CheckpointTransferTest, TruncatedOrPaddedBytesAreRefused) {
  const auto bytes = serialize_checkpoint(make(5));
  EXPECT_EQ(deserialize_checkpoint(bytes).blobs, make(5).blobs);
  for (const std::size_t cut :
       {std::size_t{0}, std::size_t{7}, std::size_t{20}, bytes.size() - 1}) {
    const std::vector<std::byte> truncated(bytes.begin(),
                                           bytes.begin() + static_cast<std::ptrdiff_t>(cut));
    EXPECT_THROW(deserialize_checkpoint(truncated), CheckpointError) << cut;
  }
  auto padded = bytes;
  padded.push_back(std::byte{0});
  EXPECT_THROW(deserialize_checkpoint(padded), CheckpointError);
  auto huge = bytes;
  for (int i = 8; i < 16; ++i)
    huge[static_cast<std::size_t>(i)] = std::byte{0xff};  // metadata size
  EXPECT_THROW(deserialize_checkpoint(huge), CheckpointError);
}

}  // namespace
}  // namespace unimsg
