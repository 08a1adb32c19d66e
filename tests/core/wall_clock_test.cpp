#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#include "unimsg/core/wall_clock.hpp"

namespace unimsg {
namespace {

// Readings are compared with the system clock read just before and after; the tolerance is
// far above the counter's real error (microseconds) so that a preempted thread on a loaded
// machine cannot fail the test, and far below anything a wrong rate or anchor would give.
constexpr std::uint64_t kToleranceNs = 5'000'000;

void expect_bracketed(WallClock& clock) {
  const std::uint64_t before = WallClock::system_ns();
  const std::uint64_t reading = clock.now_ns();
  const std::uint64_t after = WallClock::system_ns();
  EXPECT_GE(reading + kToleranceNs, before);
  EXPECT_LE(reading, after + kToleranceNs);
}

TEST(WallClock, SystemModeReadsTheSystemClock) {
  WallClock clock(false);
  const std::uint64_t before = WallClock::system_ns();
  const std::uint64_t reading = clock.now_ns();
  const std::uint64_t after = WallClock::system_ns();
  EXPECT_GE(reading, before);
  EXPECT_LE(reading, after);
  EXPECT_FALSE(clock.counter_calibrated());
  // Nanoseconds since 1970: after 2020-01-01.
  EXPECT_GT(reading, 1'577'836'800ull * 1'000'000'000ull);
}

TEST(WallClock, CounterModeAgreesWithTheSystemClockAcrossReanchors) {
#if !(defined(__x86_64__) || defined(__i386__))
  GTEST_SKIP() << "this CPU has no time-stamp counter the clock knows how to read";
#endif
  WallClock clock(true);
  EXPECT_FALSE(clock.counter_calibrated());
  // Four threads read it for 1.3 s: through the first calibration and one re-anchor.
  std::vector<std::thread> readers;
  for (int t = 0; t < 4; ++t) {
    readers.emplace_back([&clock] {
      const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(1300);
      while (std::chrono::steady_clock::now() < end) {
        for (int i = 0; i < 1000; ++i) expect_bracketed(clock);
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      }
    });
  }
  for (auto& reader : readers) reader.join();
  EXPECT_TRUE(clock.counter_calibrated());
  // Calibrated readings advance with the system clock over a sleep.
  const std::uint64_t first = clock.now_ns();
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  const std::uint64_t second = clock.now_ns();
  EXPECT_GE(second - first, 50'000'000ull - kToleranceNs);
  EXPECT_LE(second - first, 50'000'000ull + 10 * kToleranceNs);  // a slow wake-up is allowed
  expect_bracketed(clock);
}

}  // namespace
}  // namespace unimsg
