#pragma once

// How the engine thread sleeps: until a deadline that other threads may move without waking it
// (a timerfd), or until woken at once (an eventfd). A condition variable can only be moved by
// waking its sleeper, and the first submission of every step did that: a context switch, which
// on an oversubscribed machine took a core from a rank still submitting (docs/benchmarks.md).

#include <chrono>

namespace unimsg::detail {

class WakeTimer {
 public:
  using Clock = std::chrono::steady_clock;

  WakeTimer();  // throws Error when the kernel refuses a descriptor
  ~WakeTimer();
  WakeTimer(const WakeTimer&) = delete;
  WakeTimer& operator=(const WakeTimer&) = delete;

  // The sleeper wakes at `when` (the last call wins; a time already past wakes it at once).
  void arm(Clock::time_point when);
  void wake_now();
  // Blocks until the armed time or wake_now(), whichever comes first, then clears both.
  void sleep();

 private:
  int timer_fd_ = -1;
  int event_fd_ = -1;
};

}  // namespace unimsg::detail
