#include <gtest/gtest.h>

#include <cstdlib>

#include "unimsg/core/error.hpp"
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

}  // namespace
}  // namespace unimsg
