// The heartbeat watchdog on a rank that is healthy but busy (issue 23, item 5): a subscription
// handler that blocks longer than the heartbeat timeout, or an inbox full of messages nobody
// reads, must not make the rank deaf to its peers' heartbeats, so nobody is blamed and nobody
// exits as isolated. Run under mpirun with 2 and 3 ranks (tests/services/CMakeLists.txt).
//
// The test threads only sleep while they watch: they drive no bus progress, as a rank busy
// computing a training step does not.

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "unimsg/bus/bus.hpp"
#include "unimsg/services/heartbeat.hpp"

namespace unimsg {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

constexpr Topic kBlockTopic = 71;
constexpr Topic kUnreadTopic = 72;
constexpr auto kLongWait = 120s;  // only ever reached when a test is failing

HeartbeatOptions fast_heartbeats() {
  HeartbeatOptions options;
  options.interval = 200ms;
  options.timeout = 1500ms;
  return options;
}

// What the watchdog decided, recorded instead of aborting the job.
class Verdicts {
 public:
  HeartbeatWatch::LossHandler on_loss() {
    return [this](const std::vector<int>& silent, std::uint64_t) {
      std::lock_guard lock(mutex_);
      std::string ranks;
      for (int rank : silent) {
        if (!ranks.empty()) ranks += ',';
        ranks += std::to_string(rank);
      }
      said_.push_back("lost ranks [" + ranks + "]");
    };
  }
  HeartbeatWatch::IsolationHandler on_isolated() {
    return [this](int heard, int world) {
      std::lock_guard lock(mutex_);
      said_.push_back("isolated, hearing " + std::to_string(heard) + " of " +
                      std::to_string(world));
    };
  }
  // Everything said, one verdict a line; empty when the watchdog said nothing.
  std::string said() const {
    std::lock_guard lock(mutex_);
    std::string text;
    for (const auto& verdict : said_) text += verdict + "\n";
    return text;
  }

 private:
  mutable std::mutex mutex_;
  std::vector<std::string> said_;
};

// The oldest of the other ranks' heartbeats, in seconds.
double oldest_heartbeat(const HeartbeatWatch& watch) {
  const auto ages = watch.heartbeat_ages();
  return ages.empty() ? 0.0 : *std::max_element(ages.begin(), ages.end());
}

// Samples the watch every 50 ms for `duration`, sleeping in between; returns the oldest age seen.
double watch_for(const HeartbeatWatch& watch, Clock::duration duration) {
  double oldest = 0.0;
  for (const auto end = Clock::now() + duration; Clock::now() < end;) {
    oldest = std::max(oldest, oldest_heartbeat(watch));
    std::this_thread::sleep_for(50ms);
  }
  return oldest;
}

TEST(HeartbeatExpressTest, AHandlerBlockedLongerThanTheTimeoutBlamesNobody) {
  constexpr auto kBlock = 4s;
  Bus bus(MPI_COMM_WORLD, BusOptions{});
  const int blocked = bus.size() - 1;
  std::atomic<bool> started{false};
  std::atomic<bool> finished{false};
  Subscription subscription;
  if (bus.rank() == blocked) {
    subscription =
        bus.subscribe(Filter{Kind::kUser, kBlockTopic, std::nullopt}, [&](const Message&) {
          started = true;
          std::this_thread::sleep_for(
              kBlock);  // the bus's handler thread, held far past the timeout
          finished = true;
        });
  }
  Verdicts verdicts;
  HeartbeatWatch watch(bus, fast_heartbeats(), verdicts.on_loss(), verdicts.on_isolated());
  MPI_Barrier(MPI_COMM_WORLD);
  if (bus.rank() == 0) bus.send(blocked, Message::make(Kind::kUser, kBlockTopic));

  double oldest_while_blocked = 0.0;
  if (bus.rank() == blocked) {
    const auto deadline = Clock::now() + kLongWait;
    while (!started && Clock::now() < deadline) std::this_thread::sleep_for(10ms);
    EXPECT_TRUE(started) << "the blocking handler never ran";
    while (started && !finished && Clock::now() < deadline) {
      oldest_while_blocked = std::max(oldest_while_blocked, oldest_heartbeat(watch));
      std::this_thread::sleep_for(50ms);
    }
    EXPECT_TRUE(finished) << "the blocking handler never returned";
  }
  // Past the block by more than the isolation verdict needs (two timeouts after going deaf).
  watch_for(watch, 2s);
  MPI_Barrier(MPI_COMM_WORLD);
  watch.stop();
  MPI_Barrier(MPI_COMM_WORLD);

  const auto said = verdicts.said();
  EXPECT_TRUE(said.empty()) << "rank " << bus.rank() << "'s watchdog said: " << said;
  if (bus.rank() == blocked) {
    EXPECT_LT(oldest_while_blocked, 1.5)
        << "heartbeats went unheard for " << oldest_while_blocked << " s while a handler blocked";
  }
}

TEST(HeartbeatExpressTest, AnInboxFullOfUnreadMessagesBlamesNobody) {
  constexpr int kUnread = 32;
  BusOptions options;
  options.inbox_messages = 8;  // full after 8 unread messages: this rank then stops receiving
  Bus bus(MPI_COMM_WORLD, options);
  const int deaf = bus.size() - 1;
  Verdicts verdicts;
  HeartbeatWatch watch(bus, fast_heartbeats(), verdicts.on_loss(), verdicts.on_isolated());
  MPI_Barrier(MPI_COMM_WORLD);
  if (bus.rank() == 0) {
    for (int i = 0; i < kUnread; ++i) {
      std::vector<std::byte> payload(sizeof i);
      std::memcpy(payload.data(), &i, sizeof i);
      bus.send(deaf, Message::make(Kind::kUser, kUnreadTopic, Payload(std::move(payload))));
    }
  }
  // Longer than the timeout, and than the two timeouts after which a deaf rank exits isolated.
  const double oldest = watch_for(watch, 5s);
  MPI_Barrier(MPI_COMM_WORLD);
  watch.stop();
  MPI_Barrier(MPI_COMM_WORLD);

  const auto said = verdicts.said();
  EXPECT_TRUE(said.empty()) << "rank " << bus.rank() << "'s watchdog said: " << said;
  EXPECT_LT(oldest, 1.5) << "heartbeats went unheard for " << oldest << " s";
  if (bus.rank() == deaf) {
    // Read at last, every one of them arrives, in order: the inbox was full, nothing was lost.
    for (int i = 0; i < kUnread; ++i) {
      const Message got = bus.receive(Filter{Kind::kUser, kUnreadTopic, 0}, kLongWait);
      int value = -1;
      ASSERT_EQ(got.payload.size(), sizeof value);
      std::memcpy(&value, got.payload.data(), sizeof value);
      EXPECT_EQ(value, i);
    }
  }
}

}  // namespace
}  // namespace unimsg
