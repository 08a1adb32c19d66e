#pragma once

// Heartbeats and the watchdog: every rank broadcasts a Heartbeat message (carrying its last
// reported step) every interval from a thread of its own, and watches every other rank's. A rank
// silent for longer than the timeout — crashed, stopped (SIGSTOP), or on a host that vanished —
// is reported once to `on_loss`, on the watchdog thread, with every rank silent past the timeout
// and their host-mates silent for half of it (at least three beats) (HeartbeatOptions). Only a rank
// that still hears a quorum blames at once (hears_quorum): one on the small side of a cut link, or
// one that hears nobody because its own receiving stalled, suspects itself, and after another
// timeout of it goes to `on_isolated` instead (without one it keeps watching). Of two equal halves
// the one without rank 0 waits that extra timeout, then blames: rank 0's half would have acted by
// then. No verdict while another rank is half-way to the timeout (judge_silence). Nothing waits
// forever on a lost peer: the fault handler (fault.hpp) takes it from there.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "unimsg/bus/bus.hpp"

namespace unimsg {

struct HeartbeatOptions {
  std::chrono::milliseconds interval{500};   // UNIMSG_HEARTBEAT_INTERVAL_MS
  std::chrono::milliseconds timeout{10000};  // UNIMSG_HEARTBEAT_TIMEOUT (seconds, fractions ok)
  // Each rank's host, when known: a lost rank's host-mates silent for half the timeout are
  // reported with it (a host's ranks fall silent together, not at the same beat). Without it,
  // only the ranks silent past the timeout are.
  std::vector<std::string> host_of_rank;
  static HeartbeatOptions from_env();
};

// Whether the ranks a rank still hears (itself included) may blame the silent ones: more than
// half of the world, or exactly half with rank 0 among them (so that of two halves, one acts).
bool hears_quorum(int world_size, const std::vector<int>& silent_ranks);

// What one rank makes of the others' silence at one moment, given how long ago it heard each
// (`silent_for`, indexed by rank; its own entry is ignored).
struct SilenceVerdict {
  std::vector<int> lost;    // silent past the timeout
  std::vector<int> silent;  // the lost, with their host-mates silent for half of it (3 beats)
  // Some other rank is silent for more than half the timeout but not yet past it: a host cut
  // off hears the others go quiet within a beat of each other, not at once, and counting the
  // last of them as heard would give it a quorum to blame the first. Judged again next beat
  // (at most half a timeout later), when each has either spoken or is lost too.
  bool undecided = false;
  // Whether the ranks not in `silent` (this one included) are a quorum (hears_quorum): the
  // host-mates reported along count as silent here too, or a rank of a host cut off that finds
  // one rank of each other host past the timeout would count their host-mates as heard.
  bool quorum = true;
};
SilenceVerdict judge_silence(const std::vector<std::chrono::steady_clock::duration>& silent_for,
                             int self, const HeartbeatOptions& options);

class HeartbeatWatch {
 public:
  using LossHandler =
      std::function<void(const std::vector<int>& silent_ranks, std::uint64_t last_step)>;
  using IsolationHandler = std::function<void(int heard_ranks, int world_size)>;
  HeartbeatWatch(Bus& bus, HeartbeatOptions options, LossHandler on_loss,
                 IsolationHandler on_isolated = {});
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
  // Under mutex_: the silent ranks at `now`, and what to do about them.
  void judge(std::chrono::steady_clock::time_point now, std::uint64_t step,
             std::unique_lock<std::mutex>& lock);

  Bus& bus_;
  HeartbeatOptions options_;
  LossHandler on_loss_;
  IsolationHandler on_isolated_;
  std::atomic<std::uint64_t> step_{0};
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::vector<std::chrono::steady_clock::time_point> last_seen_;
  std::vector<std::uint64_t> last_step_;
  bool stopping_ = false;
  bool reported_ = false;
  bool isolated_ = false;  // hearing no quorum since isolated_since_
  std::chrono::steady_clock::time_point isolated_since_;
  Subscription subscription_;
  std::thread thread_;
};

}  // namespace unimsg
