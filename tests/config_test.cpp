#include <gtest/gtest.h>

#include <cstdlib>

#include "unimsg/bus.hpp"
#include "unimsg/config.hpp"
#include "unimsg/error.hpp"

namespace unimsg {
namespace {

TEST(MessageConfig, ParseSizeAcceptsSuffixes) {
  EXPECT_EQ(parse_size("0", "x"), 0u);
  EXPECT_EQ(parse_size("64", "x"), 64u);
  EXPECT_EQ(parse_size("4k", "x"), 4096u);
  EXPECT_EQ(parse_size("1M", "x"), 1u << 20);
  EXPECT_EQ(parse_size("2G", "x"), 2ull << 30);
}

TEST(MessageConfig, ParseSizeRejectsJunkNamingTheSetting) {
  for (const char* bad : {"", "-1", "1.5M", "12Q", "M", "99999999999999999999", "1 M"}) {
    try {
      parse_size(bad, "UNIMSG_TEST_SIZE");
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const ConfigError& error) {
      EXPECT_NE(std::string(error.what()).find("UNIMSG_TEST_SIZE"), std::string::npos);
    }
  }
  EXPECT_THROW(parse_size("17179869184G", "x"), ConfigError);
}

TEST(MessageConfig, ParseBoolAcceptsTheUsualSpellingsOnly) {
  for (const char* yes : {"1", "true", "YES", "On"}) EXPECT_TRUE(parse_bool(yes, "x")) << yes;
  for (const char* no : {"0", "false", "No", "OFF"}) EXPECT_FALSE(parse_bool(no, "x")) << no;
  for (const char* bad : {"", "2", "enable", "t"}) {
    try {
      parse_bool(bad, "UNIMSG_TEST_FLAG");
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const ConfigError& error) {
      EXPECT_NE(std::string(error.what()).find("UNIMSG_TEST_FLAG"), std::string::npos);
    }
  }
}

TEST(MessageConfig, BusOptionsFromEnvironment) {
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
