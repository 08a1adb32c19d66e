#include <gtest/gtest.h>

#include "unimsg/core/config.hpp"
#include "unimsg/core/error.hpp"

namespace unimsg {
namespace {

TEST(CoreConfig, ParseSizeAcceptsSuffixes) {
  EXPECT_EQ(parse_size("0", "x"), 0u);
  EXPECT_EQ(parse_size("64", "x"), 64u);
  EXPECT_EQ(parse_size("4k", "x"), 4096u);
  EXPECT_EQ(parse_size("1M", "x"), 1u << 20);
  EXPECT_EQ(parse_size("2G", "x"), 2ull << 30);
}

TEST(CoreConfig, ParseSizeRejectsJunkNamingTheSetting) {
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

TEST(CoreConfig, ParseBoolAcceptsTheUsualSpellingsOnly) {
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

}  // namespace
}  // namespace unimsg
