#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "unimsg/checkpoint/checkpoint.hpp"
#include "unimsg/core/error.hpp"

namespace unimsg {
namespace {

namespace fs = std::filesystem;

std::vector<std::byte> bytes_of(const std::string& text) {
  const auto* p = reinterpret_cast<const std::byte*>(text.data());
  return {p, p + text.size()};
}

Checkpoint make(std::uint64_t step, std::size_t model_bytes = 1000) {
  Checkpoint checkpoint;
  checkpoint.step = step;
  std::vector<std::byte> model(model_bytes);
  for (std::size_t i = 0; i < model.size(); ++i)
    model[i] = std::byte(static_cast<unsigned char>(i * 7 + step));
  checkpoint.blobs["model"] = std::move(model);
  checkpoint.blobs["optimizer"] = bytes_of("momentum state " + std::to_string(step));
  checkpoint.metadata_json = R"({"epoch":2,"position":1280})";
  return checkpoint;
}

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("unimsg_ckpt_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
  }
  void TearDown() override {
    std::error_code ignored;
    fs::permissions(dir_, fs::perms::owner_all, ignored);
    fs::remove_all(dir_, ignored);
  }
  fs::path step_dir(std::uint64_t step) const {
    char name[32];
    std::snprintf(name, sizeof name, "step-%012llu", static_cast<unsigned long long>(step));
    return dir_ / name;
  }
  fs::path dir_;
};

TEST_F(CheckpointTest, RoundTripKeepsBlobsAndMetadata) {
  Checkpointer checkpointer(dir_);
  checkpointer.save(make(5));
  const auto loaded = checkpointer.load_latest();
  ASSERT_TRUE(loaded.has_value());
  EXPECT_EQ(loaded->step, 5u);
  EXPECT_EQ(loaded->blobs, make(5).blobs);
  EXPECT_EQ(loaded->metadata_json, R"({"epoch":2,"position":1280})");
  EXPECT_EQ(checkpointer.load(5).blobs.at("optimizer"), bytes_of("momentum state 5"));
  EXPECT_THROW(checkpointer.load(6), CheckpointError);
}

TEST_F(CheckpointTest, KeepsTheLastK) {
  CheckpointOptions options;
  options.keep = 2;
  Checkpointer checkpointer(dir_, options);
  for (std::uint64_t step = 1; step <= 5; ++step) checkpointer.save(make(step));
  EXPECT_EQ(checkpointer.steps(), (std::vector<std::uint64_t>{5, 4}));
}

TEST_F(CheckpointTest, DamagedNewestIsReportedAndThePreviousUsed) {
  Checkpointer checkpointer(dir_);
  checkpointer.save(make(10));
  checkpointer.save(make(20));
  checkpointer.save(make(30));
  // 30: a flipped byte in a blob. 20: a truncated blob.
  {
    std::fstream blob(step_dir(30) / "0.blob", std::ios::in | std::ios::out | std::ios::binary);
    blob.seekp(17);
    blob.put('\x7f');
  }
  fs::resize_file(step_dir(20) / "0.blob", 10);
  std::vector<std::string> skipped;
  const auto loaded = checkpointer.load_latest(&skipped);
  ASSERT_TRUE(loaded.has_value());
  EXPECT_EQ(loaded->step, 10u);
  ASSERT_EQ(skipped.size(), 2u);
  EXPECT_NE(skipped[0].find("checksum"), std::string::npos) << skipped[0];
  EXPECT_NE(skipped[1].find("10 bytes"), std::string::npos) << skipped[1];
  EXPECT_THROW(checkpointer.load(30), CheckpointError);
}

TEST_F(CheckpointTest, IncompleteAndMalformedCheckpointsAreSkipped) {
  Checkpointer checkpointer(dir_);
  checkpointer.save(make(1));
  // A crash in the middle of a write leaves a temporary directory: never loaded.
  fs::create_directories(dir_ / ".tmp-step-000000000002-99999");
  std::ofstream(dir_ / ".tmp-step-000000000002-99999" / "0.blob") << "partial";
  // A step directory without a manifest, one with a broken manifest, one that escapes.
  fs::create_directories(step_dir(3));
  fs::create_directories(step_dir(4));
  std::ofstream(step_dir(4) / "manifest.json") << "{\"format\":1,\"step\":";
  fs::create_directories(step_dir(5));
  std::ofstream(step_dir(5) / "manifest.json")
      << R"({"format":1,"step":5,"metadata":{},"blobs":[{"name":"x","file":"../../etc/passwd","bytes":1,"xxh3":0}]})";
  std::vector<std::string> skipped;
  const auto loaded = checkpointer.load_latest(&skipped);
  ASSERT_TRUE(loaded.has_value());
  EXPECT_EQ(loaded->step, 1u);
  ASSERT_EQ(skipped.size(), 3u);
  EXPECT_NE(skipped[0].find("leaves the directory"), std::string::npos) << skipped[0];
  EXPECT_NE(skipped[1].find("not valid JSON"), std::string::npos) << skipped[1];
  EXPECT_NE(skipped[2].find("no manifest"), std::string::npos) << skipped[2];
}

TEST_F(CheckpointTest, AFullDiskIsAClearErrorAndThePreviousStays) {
  Checkpointer checkpointer(dir_);
  checkpointer.save(make(1));
  // A file size limit makes writes fail as a full disk does (and works as root, unlike chmod).
  rlimit saved{};
  getrlimit(RLIMIT_FSIZE, &saved);
  const auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit small = saved;
  small.rlim_cur = 4096;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
  try {
    checkpointer.save(make(2, 100000));
    ADD_FAILURE() << "a 100 kB blob was written under a 4 kB file size limit";
  } catch (const CheckpointError& error) {
    EXPECT_NE(std::string(error.what()).find("cannot write"), std::string::npos) << error.what();
  }
  setrlimit(RLIMIT_FSIZE, &saved);
  std::signal(SIGXFSZ, old_handler);
  EXPECT_EQ(checkpointer.steps(), (std::vector<std::uint64_t>{1}));
  EXPECT_EQ(checkpointer.load_latest()->blobs, make(1).blobs);
  for (const auto& entry : fs::directory_iterator(dir_)) {
    EXPECT_EQ(entry.path().filename().string().rfind(".tmp", 0), std::string::npos)
        << "left behind: " << entry.path();
  }
}

TEST_F(CheckpointTest, AReadOnlyDirectoryIsAClearError) {
  if (::geteuid() == 0) {
    GTEST_SKIP() << "running as root, which writes into read-only directories anyway; the "
                    "full-disk test covers the failure path";
  }
  Checkpointer checkpointer(dir_);
  checkpointer.save(make(1));
  fs::permissions(dir_, fs::perms::owner_read | fs::perms::owner_exec);
  EXPECT_THROW(checkpointer.save(make(2)), CheckpointError);
  fs::permissions(dir_, fs::perms::owner_all);
  EXPECT_EQ(checkpointer.steps(), (std::vector<std::uint64_t>{1}));
}

TEST_F(CheckpointTest, AsyncSavesAreWrittenInOrderAndFailuresSurface) {
  CheckpointOptions options;
  options.keep = 10;
  options.queue_capacity = 1;
  Checkpointer checkpointer(dir_, options);
  for (std::uint64_t step = 1; step <= 6; ++step) checkpointer.save_async(make(step, 50000));
  checkpointer.flush();
  EXPECT_EQ(checkpointer.steps(), (std::vector<std::uint64_t>{6, 5, 4, 3, 2, 1}));
  Checkpoint bad = make(7);
  bad.metadata_json = "{not json";
  checkpointer.save_async(bad);
  EXPECT_THROW(checkpointer.flush(), CheckpointError);
  checkpointer.flush();  // the error was reported once
}

TEST_F(CheckpointTest, TiersAreWrittenOnTheirOwnSchedules) {
  TieredCheckpointOptions options;
  options.fast_directory = dir_ / "fast";
  options.fast_every = 2;
  options.persistent_directory = dir_ / "persistent";
  options.persistent_every = 5;
  TieredCheckpointer tiers(options);
  int built = 0;
  for (std::uint64_t step = 1; step <= 11; ++step) {
    tiers.maybe_save(step, [&] {
      ++built;
      return make(step);
    });
  }
  tiers.flush();
  EXPECT_EQ(built, 6);  // steps 2 4 5 6 8 10 (10 built once for both tiers)
  EXPECT_EQ(Checkpointer(dir_ / "fast").steps(), (std::vector<std::uint64_t>{10, 8, 6}));
  EXPECT_EQ(Checkpointer(dir_ / "persistent").steps(), (std::vector<std::uint64_t>{10, 5}));
  EXPECT_EQ(tiers.load_latest()->step, 10u);
  fs::remove_all(dir_ / "fast");
  fs::create_directories(dir_ / "fast");
  EXPECT_EQ(tiers.load_latest()->step, 10u);  // the persistent tier still has it
}

TEST_F(CheckpointTest, BadOptionsAreClearErrors) {
  CheckpointOptions options;
  options.keep = 0;
  EXPECT_THROW(Checkpointer(dir_, options), ConfigError);
  fs::create_directories(dir_);
  std::ofstream(dir_ / "file") << "x";
  EXPECT_THROW(Checkpointer(dir_ / "file"), CheckpointError);
}

}  // namespace
}  // namespace unimsg
