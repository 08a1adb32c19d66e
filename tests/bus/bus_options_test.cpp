#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "unimsg/bus/bus.hpp"
#include "unimsg/core/error.hpp"

namespace unimsg {
namespace {

TEST(BusConfig, BusOptionsFromEnvironment) {
  EXPECT_TRUE(BusOptions::from_env().verify_bulk_payloads);
  ::setenv("UNIMSG_BUS_VERIFY_BULK", "0", 1);
  EXPECT_FALSE(BusOptions::from_env().verify_bulk_payloads);
  ::setenv("UNIMSG_BUS_VERIFY_BULK", "maybe", 1);
  EXPECT_THROW(BusOptions::from_env(), ConfigError);
  ::unsetenv("UNIMSG_BUS_VERIFY_BULK");
  ::setenv("UNIMSG_BUS_MAX_PAYLOAD", "1M", 1);
  ::setenv("UNIMSG_BUS_IDLE_SLEEP_US", "500", 1);
  const BusOptions options = BusOptions::from_env();
  EXPECT_EQ(options.max_payload_bytes, 1u << 20);
  EXPECT_EQ(options.idle_sleep_max.count(), 500);
  ::setenv("UNIMSG_BUS_IDLE_SLEEP_US", "fast", 1);
  try {
    BusOptions::from_env();
    ADD_FAILURE() << "accepted UNIMSG_BUS_IDLE_SLEEP_US=fast";
  } catch (const ConfigError& error) {
    EXPECT_NE(std::string(error.what()).find("UNIMSG_BUS_IDLE_SLEEP_US"), std::string::npos);
    EXPECT_NE(std::string(error.what()).find("'fast'"), std::string::npos);
  }
  ::setenv("UNIMSG_BUS_IDLE_SLEEP_US", "0", 1);
  EXPECT_THROW(BusOptions::from_env(), ConfigError);
  ::unsetenv("UNIMSG_BUS_IDLE_SLEEP_US");
  ::unsetenv("UNIMSG_BUS_MAX_PAYLOAD");
}

}  // namespace
}  // namespace unimsg
