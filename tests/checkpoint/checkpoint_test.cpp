#include <fcntl.h>
#include <gtest/gtest.h>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
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

// A manifest is damaged input: its sizes are checked against the files before anything is
// allocated for them, so a claim of exabytes is a skipped checkpoint, not an allocation.
TEST_F(CheckpointTest, ManifestSizesAreCheckedAgainstTheFilesBeforeAllocating) {
  Checkpointer checkpointer(dir_);
  checkpointer.save(make(1));
  checkpointer.save(make(2));
  const fs::path manifest = step_dir(2) / "manifest.json";
  std::string text;
  {
    std::ifstream in(manifest);
    std::stringstream buffer;
    buffer << in.rdbuf();
    text = buffer.str();
  }
  const auto at = text.find("\"bytes\": 1000");
  ASSERT_NE(at, std::string::npos) << text;
  text.replace(at, 13, "\"bytes\": 4611686018427387904");
  std::ofstream(manifest, std::ios::trunc) << text;
  std::vector<std::string> skipped;
  const auto loaded = checkpointer.load_latest(&skipped);
  ASSERT_TRUE(loaded.has_value());
  EXPECT_EQ(loaded->step, 1u);
  ASSERT_EQ(skipped.size(), 1u);
  EXPECT_NE(skipped[0].find("holds 1000 bytes, the manifest says 4611686018427387904"),
            std::string::npos)
      << skipped[0];
}

TEST_F(CheckpointTest, AnOversizedManifestIsSkippedUnread) {
  Checkpointer checkpointer(dir_);
  checkpointer.save(make(1));
  checkpointer.save(make(2));
  // Sparse: large on paper, nothing on disk.
  fs::resize_file(step_dir(2) / "manifest.json", std::uintmax_t{1} << 36);
  std::vector<std::string> skipped;
  const auto loaded = checkpointer.load_latest(&skipped);
  ASSERT_TRUE(loaded.has_value());
  EXPECT_EQ(loaded->step, 1u);
  ASSERT_EQ(skipped.size(), 1u);
  EXPECT_NE(skipped[0].find("manifest.json is 68719476736 bytes"), std::string::npos) << skipped[0];
}

TEST_F(CheckpointTest, ReSavingAStepReplacesItWhole) {
  Checkpointer checkpointer(dir_);
  checkpointer.save(make(7, 1000));
  checkpointer.save(make(7, 3000));
  EXPECT_EQ(checkpointer.load(7).blobs, make(7, 3000).blobs);
  EXPECT_EQ(checkpointer.steps(), (std::vector<std::uint64_t>{7}));
  for (const auto& entry : fs::directory_iterator(dir_)) {
    EXPECT_EQ(entry.path().filename().string().rfind('.', 0), std::string::npos)
        << "left behind: " << entry.path();
  }
}

// A crash in the middle of replacing a step (without an atomic exchange) leaves the old copy
// under its set-aside name and the new one in a temporary directory: the step must not be lost.
TEST_F(CheckpointTest, AStepWhoseOnlyCopyIsSetAsideIsStillFound) {
  Checkpointer checkpointer(dir_);
  checkpointer.save(make(5));
  checkpointer.save(make(6));
  fs::rename(step_dir(6), dir_ / ".old-step-000000000006-otherhost-99999-0");
  fs::create_directories(dir_ / ".tmp-step-000000000006-otherhost-99999-1");
  std::vector<std::string> skipped;
  const auto loaded = checkpointer.load_latest(&skipped);
  ASSERT_TRUE(loaded.has_value());
  EXPECT_EQ(loaded->step, 6u);
  EXPECT_EQ(loaded->blobs, make(6).blobs);
  EXPECT_TRUE(skipped.empty());
  EXPECT_EQ(checkpointer.steps(), (std::vector<std::uint64_t>{6, 5}));
  EXPECT_EQ(checkpointer.load(6).blobs, make(6).blobs);
  // The next writer's start puts the set-aside copy back under its name and removes the
  // temporary one.
  const Checkpointer relaunched(dir_);
  EXPECT_TRUE(fs::is_directory(step_dir(6)));
  EXPECT_FALSE(fs::exists(dir_ / ".old-step-000000000006-otherhost-99999-0"));
  EXPECT_FALSE(fs::exists(dir_ / ".tmp-step-000000000006-otherhost-99999-1"));
  EXPECT_EQ(relaunched.load_latest()->blobs, make(6).blobs);
}

// Temporary directories of writers that died are removed when a writer starts and when it
// prunes; a live writer's (it holds a lock on its directory) is left alone.
TEST_F(CheckpointTest, StaleTemporaryDirectoriesAreRemovedAndLiveOnesKept) {
  fs::create_directories(dir_);
  const fs::path stale = dir_ / ".tmp-step-000000000002-99999";
  const fs::path stale_too = dir_ / ".tmp-step-000000000003-somehost-99998-4";
  const fs::path live = dir_ / ".tmp-step-000000000004-somehost-99997-0";
  for (const auto& path : {stale, stale_too, live}) {
    fs::create_directories(path);
    std::ofstream(path / "0.blob") << "partial";
  }
  const int lock = ::open(live.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  ASSERT_GE(lock, 0);
  ASSERT_EQ(::flock(lock, LOCK_EX | LOCK_NB), 0);
  {
    Checkpointer checkpointer(dir_);
    EXPECT_FALSE(fs::exists(stale));
    EXPECT_FALSE(fs::exists(stale_too));
    EXPECT_TRUE(fs::exists(live / "0.blob"));
    fs::create_directories(stale);  // a writer that died since
    checkpointer.save(make(1));
    EXPECT_FALSE(fs::exists(stale));
    EXPECT_TRUE(fs::exists(live / "0.blob"));
  }
  ::close(lock);
  Checkpointer checkpointer(dir_);
  EXPECT_FALSE(fs::exists(live));
  EXPECT_EQ(checkpointer.steps(), (std::vector<std::uint64_t>{1}));
}

TEST_F(CheckpointTest, PruneKeepsOnlyIntactCheckpointsAndRemovesDamagedOnes) {
  std::ostringstream log;
  CheckpointOptions options;
  options.keep = 2;
  options.logger = std::make_shared<spdlog::logger>(
      "checkpoint-test", std::make_shared<spdlog::sinks::ostream_sink_mt>(log));
  {
    Checkpointer before_the_crash(dir_, options);
    before_the_crash.save(make(1));
    before_the_crash.save(make(2));
    before_the_crash.save(make(3));
  }
  {
    std::fstream blob(step_dir(3) / "0.blob", std::ios::in | std::ios::out | std::ios::binary);
    blob.seekp(17);
    blob.put('\x7f');
  }
  Checkpointer checkpointer(dir_, options);
  checkpointer.save(make(4));
  // 3 is damaged: it does not count toward keep=2, and is removed.
  EXPECT_EQ(checkpointer.steps(), (std::vector<std::uint64_t>{4, 2}));
  EXPECT_NE(log.str().find("step-000000000003: damaged: blob 'model' fails its checksum"),
            std::string::npos)
      << log.str();
  // Damaged during this writer's life (cut short): found at the next prune.
  fs::resize_file(step_dir(4) / "0.blob", 10);
  checkpointer.save(make(5));
  EXPECT_EQ(checkpointer.steps(), (std::vector<std::uint64_t>{5, 2}));
  EXPECT_EQ(checkpointer.load_latest()->step, 5u);
}

// A checkpoint numbered above the step a new run writes, and already there when its writer
// started, is from an older or abandoned run: it neither survives keep=1 nor gets restored after
// this run's next crash.
TEST_F(CheckpointTest, StepsLeftAboveByAnOlderRunAreRemoved) {
  {
    Checkpointer older(dir_);
    older.save(make(9999));
  }
  CheckpointOptions options;
  options.keep = 1;
  Checkpointer checkpointer(dir_, options);
  checkpointer.save(make(1));
  EXPECT_EQ(checkpointer.steps(), (std::vector<std::uint64_t>{1}));
  checkpointer.save(make(2));
  EXPECT_EQ(checkpointer.steps(), (std::vector<std::uint64_t>{2}));
  EXPECT_EQ(checkpointer.load_latest()->step, 2u);
}

// Steps that another writer adds during this writer's life are not "an older run".
TEST_F(CheckpointTest, StepsAboveWrittenByAConcurrentWriterAreKept) {
  CheckpointOptions options;
  options.keep = 3;
  Checkpointer slow(dir_, options);
  Checkpointer fast(dir_, options);
  fast.save(make(12));
  slow.save(make(10));
  EXPECT_EQ(slow.steps(), (std::vector<std::uint64_t>{12, 10}));
}

// A failed asynchronous save is never dropped: last_error() shows it while it is pending, and a
// Checkpointer destroyed with it unreported logs it.
TEST_F(CheckpointTest, AsyncFailuresAreShownByLastErrorAndLoggedByTheDestructor) {
  std::ostringstream log;
  const auto previous = spdlog::default_logger();
  spdlog::set_default_logger(std::make_shared<spdlog::logger>(
      "checkpoint-test", std::make_shared<spdlog::sinks::ostream_sink_mt>(log)));
  {
    Checkpointer checkpointer(dir_);
    Checkpoint bad = make(7);
    bad.metadata_json = "{not json";
    checkpointer.save_async(bad);
  }
  spdlog::set_default_logger(previous);
  EXPECT_NE(log.str().find("metadata is not JSON"), std::string::npos) << log.str();
  EXPECT_NE(log.str().find("step 7"), std::string::npos) << log.str();
}

TEST_F(CheckpointTest, LastErrorShowsAPendingAsyncFailureUntilItIsRethrown) {
  Checkpointer checkpointer(dir_);
  EXPECT_FALSE(checkpointer.last_error());
  Checkpoint bad = make(3);
  bad.metadata_json = "[";
  checkpointer.save_async(bad);
  for (int i = 0; i < 3000 && !checkpointer.last_error(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_TRUE(checkpointer.last_error());
  EXPECT_TRUE(checkpointer.last_error());  // looking does not take it
  EXPECT_THROW(checkpointer.flush(), CheckpointError);
  EXPECT_FALSE(checkpointer.last_error());
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
