#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <limits>

#include "unimsg/kernels/cast.hpp"

namespace unimsg {
namespace {

TEST(CollectivesCast, EveryHalfSurvivesTheRoundTrip) {
  for (std::uint32_t bits = 0; bits <= 0xFFFF; ++bits) {
    const auto half = static_cast<std::uint16_t>(bits);
    const float wide = f16_to_f32(half);
    if (std::isnan(wide)) {
      EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(wide)))) << bits;
      continue;
    }
    ASSERT_EQ(f32_to_f16(wide), half) << "bits " << bits;
  }
}

TEST(CollectivesCast, HalfRoundsToNearestEvenAndSaturatesToInfinity) {
  EXPECT_EQ(f16_to_f32(f32_to_f16(65504.0f)), 65504.0f);
  EXPECT_EQ(f32_to_f16(65519.0f), 0x7BFF);  // below the midpoint to the next step: stays max
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7C00);  // the midpoint rounds to even: infinity
  EXPECT_EQ(f32_to_f16(1e9f), 0x7C00);
  EXPECT_EQ(f32_to_f16(-1e9f), 0xFC00);
  EXPECT_EQ(f32_to_f16(1.0f + 1.0f / 2048.0f), 0x3C00);  // tie: to even (1.0)
  EXPECT_EQ(f32_to_f16(1.0f + 3.0f / 2048.0f), 0x3C02);  // tie: to even (upwards)
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -25)), 0x0000);  // half of it: tie to even, 0
  EXPECT_EQ(f32_to_f16(std::ldexp(1.5f, -25)), 0x0001);
  EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_EQ(f32_to_f16(std::numeric_limits<float>::infinity()), 0x7C00);
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000);
}

TEST(CollectivesCast, Bfloat16RoundsToNearestEven) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(bf16_to_f32(0x3F80), 1.0f);
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x3F808000u)), 0x3F80);  // tie: to even
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x3F818000u)), 0x3F82);  // tie: to even (up)
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x3F808001u)), 0x3F81);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::infinity()), 0x7F80);
  for (int i = -256; i <= 256; ++i) {
    EXPECT_EQ(bf16_to_f32(f32_to_bf16(static_cast<float>(i))), static_cast<float>(i));
  }
}

}  // namespace
}  // namespace unimsg
