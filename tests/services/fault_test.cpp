#include <gtest/gtest.h>

#include <sys/mount.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "unimsg/core/error.hpp"
#include "unimsg/services/checkpoint_restore.hpp"
#include "unimsg/services/fault.hpp"
#include "unimsg/services/fault_injection.hpp"
#include "unimsg/services/heartbeat.hpp"

namespace unimsg {
namespace {

TEST(FaultInjectionTest, ParsesAndRejects) {
  const auto fault = FaultInjection::parse("rank:2,step:25,mode:hang,restart:1");
  EXPECT_EQ(fault.rank, 2);
  EXPECT_EQ(fault.step, 25u);
  EXPECT_EQ(fault.restart, 1u);
  EXPECT_EQ(fault.mode, FaultInjection::Mode::kHang);
  EXPECT_EQ(FaultInjection::parse("step:3,rank:0").mode, FaultInjection::Mode::kKill);
  const auto slow = FaultInjection::parse("rank:1,step:5,mode:slow,ms:30");
  EXPECT_EQ(slow.mode, FaultInjection::Mode::kSlow);
  EXPECT_EQ(slow.slow_ms, 30u);
  EXPECT_EQ(FaultInjection::parse("rank:1,step:5,mode:slow").slow_ms, 50u);
  for (const char* bad : {"", "rank:1", "step:1", "rank:x,step:1", "rank:1,step:1,mode:boom",
                          "rank:1,step:1,mode:slow,ms:0", "rank:1,step:1,mode:slow,ms:x",
                          "rank:1,step:1,colour:red", "rank1,step:1"}) {
    EXPECT_THROW(FaultInjection::parse(bad), ConfigError) << bad;
  }
}

TEST(FaultInjectionTest, PicksTheFaultOfThisLaunch) {
  ::setenv("UNIMSG_FAULT_INJECT", "rank:2,step:25;rank:0,step:35,mode:exit,restart:1", 1);
  ::unsetenv("UNIMSG_RESTART_COUNT");
  EXPECT_EQ(FaultInjection::from_env()->step, 25u);
  ::setenv("UNIMSG_RESTART_COUNT", "1", 1);
  EXPECT_EQ(FaultInjection::from_env()->mode, FaultInjection::Mode::kExit);
  ::setenv("UNIMSG_RESTART_COUNT", "2", 1);
  EXPECT_FALSE(FaultInjection::from_env().has_value());
  ::setenv("UNIMSG_FAULT_INJECT", "rank:2,step:25;oops", 1);
  EXPECT_THROW(FaultInjection::from_env(), ConfigError);  // a typo is reported on every launch
  ::unsetenv("UNIMSG_FAULT_INJECT");
  ::unsetenv("UNIMSG_RESTART_COUNT");
}

TEST(FaultReportTest, AHostIsLostOnlyWhenAllItsRanksAre) {
  const std::vector<std::string> hosts{"a", "a", "b", "b"};
  EXPECT_TRUE(lost_hosts(hosts, {1}).empty());
  EXPECT_EQ(lost_hosts(hosts, {2, 3}), std::vector<std::string>{"b"});
  EXPECT_EQ(lost_hosts(hosts, {0, 1, 3}), std::vector<std::string>{"a"});
}

// A run directory of its own for a report test, removed afterwards.
class FaultReportWriteTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("unimsg_fault_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
    ::setenv("UNIMSG_RUN_DIR", dir_.c_str(), 1);
  }
  void TearDown() override {
    if (mounted_) ::umount(dir_.c_str());
    ::unsetenv("UNIMSG_RUN_DIR");
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }
  std::filesystem::path report() const { return dir_ / "fault-report.json"; }

  std::filesystem::path dir_;
  bool mounted_ = false;
};

TEST_F(FaultReportWriteTest, AFullDiskPublishesNoReport) {
  // A 16 KiB tmpfs, filled up: the report's bytes cannot be written.
  if (::mount("tmpfs", dir_.c_str(), "tmpfs", 0, "size=16k") != 0) {
    GTEST_SKIP() << "cannot mount a small tmpfs to fill (" << std::strerror(errno)
                 << "; needs root or CAP_SYS_ADMIN)";
  }
  mounted_ = true;
  {
    std::ofstream filler(dir_ / "filler", std::ios::binary);
    const std::string block(4096, 'x');
    for (int i = 0; i < 64 && filler; ++i) filler << block << std::flush;
  }
  ASSERT_LT(std::filesystem::file_size(dir_ / "filler"), 64u * 4096u) << "the tmpfs did not fill";
  EXPECT_FALSE(write_fault_report({{1}, "heartbeat", 40}, {"a", "b"}).has_value());
  // No report rather than an empty (or cut) one that the launcher would stop on.
  EXPECT_FALSE(std::filesystem::exists(report()))
      << "size " << std::filesystem::file_size(report());
}

TEST_F(FaultReportWriteTest, TheTempNameIsNotJustThePid) {
  // A rank on another host with this pid, sharing the run dir: its temporary file (here a
  // directory, so that writing to it fails) must not be ours.
  std::filesystem::create_directory(report().string() + ".tmp-" + std::to_string(::getpid()));
  const auto where = write_fault_report({{1}, "heartbeat", 40}, {"a", "b"});
  ASSERT_TRUE(where.has_value());
  EXPECT_EQ(*where, report().string());
  std::ifstream in(report());
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("\"lost_ranks\":[1]"), std::string::npos) << text;
  // The first report stays: a second rank's does not replace it.
  EXPECT_FALSE(write_fault_report({{0}, "other", 41}, {"a", "b"}).has_value());
}

TEST(HeartbeatOptionsTest, FromEnvironment) {
  ::setenv("UNIMSG_HEARTBEAT_TIMEOUT", "2.5", 1);
  EXPECT_EQ(HeartbeatOptions::from_env().timeout.count(), 2500);
  for (const char* bad : {"soon", "0", "-1", "3s"}) {
    ::setenv("UNIMSG_HEARTBEAT_TIMEOUT", bad, 1);
    EXPECT_THROW(HeartbeatOptions::from_env(), ConfigError) << bad;
  }
  ::setenv("UNIMSG_HEARTBEAT_TIMEOUT", "1", 1);
  ::setenv("UNIMSG_HEARTBEAT_INTERVAL_MS", "800", 1);  // more than half the timeout
  EXPECT_THROW(HeartbeatOptions::from_env(), ConfigError);
  ::unsetenv("UNIMSG_HEARTBEAT_TIMEOUT");
  ::unsetenv("UNIMSG_HEARTBEAT_INTERVAL_MS");
}

// Only the side of a partition that still hears most of the world blames the other.
TEST(HeartbeatQuorumTest, OnlyAMajorityBlames) {
  EXPECT_TRUE(hears_quorum(6, {2, 3}));            // 3 hosts x 2, one host lost
  EXPECT_FALSE(hears_quorum(6, {0, 1, 4, 5}));     // ... as the lost host sees it
  EXPECT_FALSE(hears_quorum(6, {0, 1, 2, 3, 5}));  // a rank that hears nobody
  EXPECT_TRUE(hears_quorum(4, {2, 3}));            // two halves: the one with rank 0 acts
  EXPECT_FALSE(hears_quorum(4, {0, 1}));
  EXPECT_TRUE(hears_quorum(2, {1}));
  EXPECT_FALSE(hears_quorum(2, {0}));
  EXPECT_TRUE(hears_quorum(5, {4}));
  EXPECT_TRUE(hears_quorum(5, {0, 4}));
  EXPECT_FALSE(hears_quorum(5, {1, 2, 3}));
}

// A host cut off hears the others fall silent within a beat of each other. Seen on the cluster
// under srun: a rank of the cut host found two healthy ranks past the timeout while the other
// two were not quite, counted those as heard, had its quorum, and blamed a healthy host.
TEST(HeartbeatVerdictTest, ACutHostWaitsUntilTheLastOfTheOthersIsSilentToo) {
  using std::chrono::milliseconds;
  HeartbeatOptions options;
  options.timeout = milliseconds(4000);
  options.interval = milliseconds(500);
  options.host_of_rank = {"a", "a", "b", "b", "c", "c"};
  const auto ages = [](std::initializer_list<int> ms) {
    std::vector<std::chrono::steady_clock::duration> out;
    for (int value : ms) out.emplace_back(milliseconds(value));
    return out;
  };
  // Rank 2, on the cut host b: c went quiet a beat before a.
  auto verdict = judge_silence(ages({3800, 3700, 0, 100, 4200, 4300}), 2, options);
  EXPECT_EQ(verdict.lost, (std::vector<int>{4, 5}));
  EXPECT_TRUE(verdict.undecided);
  // A beat later every other host is past the timeout, and the rank hears no quorum.
  verdict = judge_silence(ages({4300, 4200, 0, 100, 4700, 4800}), 2, options);
  EXPECT_EQ(verdict.lost, (std::vector<int>{0, 1, 4, 5}));
  EXPECT_FALSE(verdict.undecided);
  EXPECT_FALSE(verdict.quorum);
  // Rank 2 again, one rank of each other host past the timeout and its host-mate half-way: those
  // host-mates are reported along, and count as silent for the quorum too (seen under srun: a
  // rank of the cut host counted them as heard, and blamed both healthy hosts).
  verdict = judge_silence(ages({4100, 3000, 0, 100, 4200, 2500}), 2, options);
  EXPECT_EQ(verdict.lost, (std::vector<int>{0, 4}));
  EXPECT_EQ(verdict.silent, (std::vector<int>{0, 1, 4, 5}));
  EXPECT_FALSE(verdict.undecided);
  EXPECT_FALSE(verdict.quorum);
  // Rank 0, on the healthy side: b's first rank past the timeout, its host-mate reported along.
  verdict = judge_silence(ages({0, 200, 4100, 3000, 300, 100}), 0, options);
  EXPECT_EQ(verdict.lost, (std::vector<int>{2}));
  EXPECT_EQ(verdict.silent, (std::vector<int>{2, 3}));
  EXPECT_FALSE(verdict.undecided);
  EXPECT_TRUE(verdict.quorum);
  // A healthy rank elsewhere late by more than half the timeout (a loaded machine) delays the
  // verdict rather than being blamed with the lost.
  verdict = judge_silence(ages({0, 200, 4100, 3000, 2500, 100}), 0, options);
  EXPECT_EQ(verdict.silent, (std::vector<int>{2, 3}));
  EXPECT_TRUE(verdict.undecided);
  // Nobody past the timeout: nothing to judge.
  verdict = judge_silence(ages({0, 3900, 3900, 3900, 3900, 3900}), 0, options);
  EXPECT_TRUE(verdict.lost.empty());
  EXPECT_FALSE(verdict.undecided);
}

// The fast tier lives on two hosts: rank 0's and the next one's.
TEST(FastTierWritersTest, RankZeroAndItsBuddyOnTheNextHost) {
  EXPECT_EQ(fast_tier_writers({"a", "a", "b", "b", "c", "c"}), (std::vector<int>{0, 2}));
  EXPECT_EQ(fast_tier_writers({"a", "b", "a", "b"}), (std::vector<int>{0, 1}));
  EXPECT_EQ(fast_tier_writers({"a", "a", "a"}), (std::vector<int>{0}));
  EXPECT_EQ(fast_tier_writers({"a"}), (std::vector<int>{0}));
  EXPECT_TRUE(fast_tier_writers({}).empty());
}

}  // namespace
}  // namespace unimsg
