#include "wake_timer.hpp"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>

#include "unimsg/core/error.hpp"

namespace unimsg::detail {
namespace {

[[noreturn]] void fail(const char* call) {
  throw Error(kNoRank, "engine.timer", std::string(call) + " failed: " + std::strerror(errno));
}

// Reads a ready descriptor's counter to clear it (nothing to read is not an error: non-blocking).
void drain(int fd) {
  std::uint64_t count = 0;
  while (::read(fd, &count, sizeof count) < 0 && errno == EINTR) {
  }
}

}  // namespace

WakeTimer::WakeTimer() {
  // steady_clock is CLOCK_MONOTONIC in libstdc++: its time points are the timer's.
  timer_fd_ = ::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (timer_fd_ < 0) fail("timerfd_create");
  event_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (event_fd_ < 0) {
    ::close(timer_fd_);
    fail("eventfd");
  }
}

WakeTimer::~WakeTimer() {
  ::close(event_fd_);
  ::close(timer_fd_);
}

void WakeTimer::arm(Clock::time_point when) {
  const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(when.time_since_epoch());
  itimerspec spec{};
  // (An all-zero it_value would disarm the timer: the earliest time is one nanosecond.)
  const std::int64_t at = ns.count() > 0 ? ns.count() : 1;
  spec.it_value.tv_sec = static_cast<time_t>(at / 1'000'000'000);
  spec.it_value.tv_nsec = static_cast<long>(at % 1'000'000'000);
  if (::timerfd_settime(timer_fd_, TFD_TIMER_ABSTIME, &spec, nullptr) != 0) fail("timerfd_settime");
}

void WakeTimer::wake_now() {
  const std::uint64_t one = 1;
  while (::write(event_fd_, &one, sizeof one) < 0) {
    if (errno == EAGAIN) return;  // (the counter is full: a wake-up is pending anyway)
    if (errno != EINTR) fail("write(eventfd)");
  }
}

void WakeTimer::sleep() {
  pollfd fds[2] = {{timer_fd_, POLLIN, 0}, {event_fd_, POLLIN, 0}};
  while (::poll(fds, 2, -1) < 0) {
    if (errno != EINTR) fail("poll");
  }
  if (fds[0].revents != 0) drain(timer_fd_);
  if (fds[1].revents != 0) drain(event_fd_);
}

}  // namespace unimsg::detail
