#pragma once

// Heartbeats and the watchdog: every rank broadcasts a Heartbeat message (carrying its last
// reported step) every interval from a thread of its own, and watches every other rank's. A rank
// silent for longer than the timeout — crashed, stopped (SIGSTOP), or on a host that vanished —
// is reported once to `on_loss`, on the watchdog thread, with every rank silent at that moment.
// Nothing waits forever on a lost peer: the fault handler (fault.hpp) takes it from there.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "unimsg/bus/bus.hpp"

namespace unimsg {

struct HeartbeatOptions {
  std::chrono::milliseconds interval{500};   // UNIMSG_HEARTBEAT_INTERVAL_MS
  std::chrono::milliseconds timeout{10000};  // UNIMSG_HEARTBEAT_TIMEOUT (seconds, fractions ok)
  static HeartbeatOptions from_env();
};

class HeartbeatWatch {
 public:
  using LossHandler =
      std::function<void(const std::vector<int>& silent_ranks, std::uint64_t last_step)>;
  HeartbeatWatch(Bus& bus, HeartbeatOptions options, LossHandler on_loss);
  ~HeartbeatWatch();
  HeartbeatWatch(const HeartbeatWatch&) = delete;
  HeartbeatWatch& operator=(const HeartbeatWatch&) = delete;

  // The step this rank has completed (sent with the next heartbeat, and kept for reports).
  void report_step(std::uint64_t step) noexcept { step_.store(step, std::memory_order_relaxed); }
  // Seconds since each rank was last heard from (0 for this rank).
  std::vector<double> heartbeat_ages() const;
  // Stops sending and watching (before a planned shutdown, so that a rank finishing early is not
  // taken for a lost one).
  void stop();

 private:
  void run();

  Bus& bus_;
  HeartbeatOptions options_;
  LossHandler on_loss_;
  std::atomic<std::uint64_t> step_{0};
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::vector<std::chrono::steady_clock::time_point> last_seen_;
  std::vector<std::uint64_t> last_step_;
  bool stopping_ = false;
  bool reported_ = false;
  Subscription subscription_;
  std::thread thread_;
};

}  // namespace unimsg
