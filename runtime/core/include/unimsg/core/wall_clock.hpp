#pragma once

// Wall-clock time for message timestamps, read on every message the bus sends.
//
// clock_gettime(CLOCK_REALTIME) through the vDSO is a noticeable share of the bus's own time per
// message on the latency path (docs/architecture.md). Where the kernel itself keeps time with
// the CPU's time-stamp counter (its clocksource is "tsc": invariant and synchronised across
// cores, which the kernel has verified), this reads the counter, cheaper still, and converts it
// with a rate measured against the system clock, re-anchored to the system clock every second so
// that NTP slewing and steps are followed within a second. Anywhere else every call reads the
// system clock.

#include <atomic>
#include <cstdint>

namespace unimsg {

class WallClock {
 public:
  // Reads the kernel's clocksource once to decide whether the counter may be used.
  WallClock();
  // For tests: `use_counter` false makes every call read the system clock; true uses the
  // counter where this CPU has one, whatever the kernel's clocksource.
  explicit WallClock(bool use_counter);

  // Nanoseconds since the Unix epoch. Thread-safe; never blocks.
  std::uint64_t now_ns() noexcept;

  // Whether calls are served from the counter (false while it is still being calibrated).
  bool counter_calibrated() const noexcept;

  static std::uint64_t system_ns() noexcept;

 private:
  std::uint64_t reanchor() noexcept;

  bool use_counter_ = false;
  // A sequence lock: odd while one thread rewrites the anchor; readers that see it change fall
  // back to the system clock instead of waiting.
  std::atomic<std::uint64_t> version_{0};
  std::atomic<std::uint64_t> anchor_ticks_{0};
  std::atomic<std::uint64_t> anchor_ns_{0};
  std::atomic<double> ns_per_tick_{0.0};  // 0 until the first calibration interval has passed
  std::atomic<std::uint64_t> next_anchor_ticks_{0};
};

}  // namespace unimsg
