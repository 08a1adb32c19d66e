#include "unimsg/core/wall_clock.hpp"

#include <chrono>
#include <cmath>
#include <fstream>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
#define UNIMSG_HAS_TSC 1
#else
#define UNIMSG_HAS_TSC 0
#endif

namespace unimsg {
namespace {

// A (counter, clock) pair is taken between two counter reads; a clock read takes ~70 ticks here,
// so a bracket wider than 2 000 ticks (under 1 µs at any plausible rate) means the thread was
// interrupted and the pair is not used. A pair is then off by at most half a bracket: the first
// rate, measured over 20 ms, is good to ~25 ppm (25 µs by the next anchor; ~1 µs typically), later
// ones, over a second each, to below 1 ppm.
constexpr std::uint64_t kFirstCalibrationNs = 20'000'000;
constexpr std::uint64_t kAnchorIntervalNs = 1'000'000'000;
constexpr std::uint64_t kWidestBracketTicks = 2'000;

std::uint64_t read_counter() noexcept {
#if UNIMSG_HAS_TSC
  return __rdtsc();
#else
  return 0;
#endif
}

bool kernel_keeps_time_with_tsc() {
  std::ifstream source("/sys/devices/system/clocksource/clocksource0/current_clocksource");
  std::string name;
  return static_cast<bool>(source >> name) && name == "tsc";
}

}  // namespace

WallClock::WallClock() : WallClock(UNIMSG_HAS_TSC && kernel_keeps_time_with_tsc()) {}

WallClock::WallClock(bool use_counter) : use_counter_(use_counter && UNIMSG_HAS_TSC) {}

std::uint64_t WallClock::system_ns() noexcept {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                        std::chrono::system_clock::now().time_since_epoch())
                                        .count());
}

bool WallClock::counter_calibrated() const noexcept {
  return use_counter_ && ns_per_tick_.load(std::memory_order_acquire) > 0.0;
}

std::uint64_t WallClock::now_ns() noexcept {
  if (!use_counter_) return system_ns();
  const std::uint64_t ticks = read_counter();
  const std::uint64_t version = version_.load(std::memory_order_acquire);
  const std::uint64_t anchor_ticks = anchor_ticks_.load(std::memory_order_relaxed);
  const std::uint64_t anchor_ns = anchor_ns_.load(std::memory_order_relaxed);
  const double ns_per_tick = ns_per_tick_.load(std::memory_order_relaxed);
  const std::uint64_t next_anchor = next_anchor_ticks_.load(std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_acquire);
  if ((version & 1) != 0 || version_.load(std::memory_order_relaxed) != version) {
    return system_ns();  // an anchor is being written
  }
  if (ns_per_tick == 0.0 || ticks >= next_anchor || ticks < anchor_ticks) return reanchor();
  return anchor_ns +
         static_cast<std::uint64_t>(static_cast<double>(ticks - anchor_ticks) * ns_per_tick);
}

std::uint64_t WallClock::reanchor() noexcept {
  std::uint64_t version = version_.load(std::memory_order_relaxed);
  if ((version & 1) != 0 ||
      !version_.compare_exchange_strong(version, version + 1, std::memory_order_relaxed)) {
    return system_ns();  // another thread is re-anchoring
  }
  // Readers that see any of the stores below must also see the odd version.
  std::atomic_thread_fence(std::memory_order_release);
  // A thread preempted between the reads would pair them far apart and skew the rate.
  const std::uint64_t before = read_counter();
  const std::uint64_t now = system_ns();
  const std::uint64_t after = read_counter();
  if (after < before || after - before > kWidestBracketTicks) {
    version_.store(version + 2, std::memory_order_release);
    return now;
  }
  const std::uint64_t now_ticks = before + (after - before) / 2;
  const std::uint64_t anchor_ticks = anchor_ticks_.load(std::memory_order_relaxed);
  const std::uint64_t anchor_ns = anchor_ns_.load(std::memory_order_relaxed);
  double ns_per_tick = ns_per_tick_.load(std::memory_order_relaxed);
  bool moved = false;
  if (anchor_ticks == 0 || now_ticks <= anchor_ticks || now <= anchor_ns) {
    // First call, or the counter or the clock went back (a migration, a clock step): start over.
    ns_per_tick = 0.0;
    moved = true;
  } else if (ns_per_tick == 0.0) {
    // Calibrating: the anchor stays put until the interval is long enough to measure the rate.
    if (now - anchor_ns >= kFirstCalibrationNs) {
      ns_per_tick =
          static_cast<double>(now - anchor_ns) / static_cast<double>(now_ticks - anchor_ticks);
      moved = true;
    }
  } else {
    // Calibrated: always re-based on the system clock. The rate is measured again only over a
    // long interval (a short one, when threads race to re-anchor, would measure it badly); one
    // far from the last means the clock was stepped, not slewed: measure it afresh.
    if (now - anchor_ns >= kAnchorIntervalNs / 2) {
      const double measured =
          static_cast<double>(now - anchor_ns) / static_cast<double>(now_ticks - anchor_ticks);
      ns_per_tick = std::abs(measured / ns_per_tick - 1.0) > 1e-3 ? 0.0 : measured;
    }
    moved = true;
  }
  if (moved) {
    anchor_ticks_.store(now_ticks, std::memory_order_relaxed);
    anchor_ns_.store(now, std::memory_order_relaxed);
    ns_per_tick_.store(ns_per_tick, std::memory_order_relaxed);
    next_anchor_ticks_.store(
        ns_per_tick > 0.0 ? now_ticks + static_cast<std::uint64_t>(
                                            static_cast<double>(kAnchorIntervalNs) / ns_per_tick)
                          : 0,
        std::memory_order_relaxed);
  }
  version_.store(version + 2, std::memory_order_release);
  return now;
}

}  // namespace unimsg
