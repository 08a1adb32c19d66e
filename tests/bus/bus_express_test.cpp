// The bus's express path (subscribe_express): heartbeats on receives of their own, handed to
// their handler on the progress path. Run under mpirun with 2 and 3 ranks
// (tests/bus/CMakeLists.txt).

#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "eventually.hpp"
#include "unimsg/bus/bus.hpp"
#include "unimsg/core/error.hpp"

namespace unimsg {
namespace {

using namespace std::chrono_literals;
constexpr auto kLongWait = 60s;  // only ever reached when a test is failing
constexpr Topic kBeatTopic = 31;

BusOptions quiet_options() {
  BusOptions options;
  options.shutdown_timeout = 60s;
  return options;
}

// The (source, payload) pairs an express handler saw.
class Seen {
 public:
  Handler handler() {
    return [this](const Message& message) {
      std::lock_guard lock(mutex_);
      seen_.emplace(message.header.source, std::string(message.payload.as_string()));
    };
  }
  bool has(int source, const std::string& payload) const {
    std::lock_guard lock(mutex_);
    return seen_.count({source, payload}) > 0;
  }
  std::size_t size() const {
    std::lock_guard lock(mutex_);
    return seen_.size();
  }

 private:
  mutable std::mutex mutex_;
  std::set<std::pair<int, std::string>> seen_;
};

TEST(BusExpressTest, OnlyHeartbeatsMayBeSubscribedExpress) {
  Bus bus(MPI_COMM_WORLD, quiet_options());
  const auto nothing = [](const Message&) {};
  EXPECT_THROW(bus.subscribe_express(Filter{Kind::kUser, 1, std::nullopt}, nothing), ConfigError);
  EXPECT_THROW(bus.subscribe_express(Filter{}, nothing), ConfigError);
  EXPECT_THROW(bus.subscribe_express(Filter{Kind::kHeartbeat, 1, std::nullopt}, Handler{}), Error);
  EXPECT_NO_THROW(bus.subscribe_express(Filter{Kind::kHeartbeat, 1, std::nullopt}, nothing));
}

// Every rank's heartbeats reach every rank's express handler, its own broadcast included, and
// so does one too large for the express path (it travels the ordinary way); ordinary messages
// still reach the mailbox beside them.
TEST(BusExpressTest, HeartbeatsReachTheExpressHandlerFromEveryRank) {
  Bus bus(MPI_COMM_WORLD, quiet_options());
  Seen seen;
  Subscription express =
      bus.subscribe_express(Filter{Kind::kHeartbeat, kBeatTopic, std::nullopt}, seen.handler());
  MPI_Barrier(MPI_COMM_WORLD);
  const std::string large(1000, 'x');
  bus.publish(kBeatTopic,
              Message::make(Kind::kHeartbeat, kBeatTopic, Payload::from_string("beat")));
  bus.publish(kBeatTopic, Message::make(Kind::kHeartbeat, kBeatTopic, Payload::from_string(large)));
  const int next = (bus.rank() + 1) % bus.size();
  const int previous = (bus.rank() + bus.size() - 1) % bus.size();
  bus.send(next, Message::make(Kind::kUser, 5, Payload::from_string("ordinary")));
  EXPECT_EQ(bus.receive(Filter{Kind::kUser, 5, previous}, kLongWait).payload.as_string(),
            "ordinary");
  for (int source = 0; source < bus.size(); ++source) {
    EXPECT_TRUE(eventually([&] { return seen.has(source, "beat"); })) << "from rank " << source;
    EXPECT_TRUE(eventually([&] { return seen.has(source, large); })) << "from rank " << source;
  }
  EXPECT_FALSE(bus.try_receive(Filter{Kind::kHeartbeat, std::nullopt, std::nullopt}).has_value());
  MPI_Barrier(MPI_COMM_WORLD);
  bus.shutdown();
}

// A heartbeat no express subscription takes reaches ordinary subscriptions and the mailbox as
// before; after unsubscribing, the express handler sees nothing more.
TEST(BusExpressTest, HeartbeatsNobodyTakesExpressGoTheOrdinaryWay) {
  Bus bus(MPI_COMM_WORLD, quiet_options());
  Seen seen;
  Subscription express =
      bus.subscribe_express(Filter{Kind::kHeartbeat, kBeatTopic, std::nullopt}, seen.handler());
  express.reset();
  MPI_Barrier(MPI_COMM_WORLD);
  const int next = (bus.rank() + 1) % bus.size();
  const int previous = (bus.rank() + bus.size() - 1) % bus.size();
  bus.send(next, Message::make(Kind::kHeartbeat, kBeatTopic, Payload::from_string("to mailbox")));
  const Message got = bus.receive(Filter{Kind::kHeartbeat, kBeatTopic, previous}, kLongWait);
  EXPECT_EQ(got.payload.as_string(), "to mailbox");
  EXPECT_EQ(got.header.destination, bus.rank());
  EXPECT_EQ(seen.size(), 0u);
  MPI_Barrier(MPI_COMM_WORLD);
  bus.shutdown();
}

// What arrives on the express tag is checked like any envelope: garbage, a damaged checksum, a
// forged source and a kind other than heartbeat are rejected and counted; the path goes on.
TEST(BusExpressTest, BadExpressMessagesAreRejectedAndCounted) {
  Bus bus(MPI_COMM_WORLD, quiet_options());
  Seen seen;
  Subscription express =
      bus.subscribe_express(Filter{Kind::kHeartbeat, kBeatTopic, std::nullopt}, seen.handler());
  MPI_Barrier(MPI_COMM_WORLD);
  const int size = bus.size();
  const int next = (bus.rank() + 1) % size;
  const int previous = (bus.rank() + size - 1) % size;

  Message good = Message::make(Kind::kHeartbeat, kBeatTopic, Payload::from_string("intact"));
  good.header.source = bus.rank();
  good.header.destination = next;
  auto damaged = encode(good);
  damaged[kHeaderSize + 1] ^= std::byte{0x10};
  const std::string garbage = "not an envelope";
  Message forged = good;
  forged.header.source = next;  // not the sender: the receiver's own rank
  Message not_a_beat = Message::make(Kind::kUser, kBeatTopic, Payload::from_string("user"));
  not_a_beat.header.source = bus.rank();
  not_a_beat.header.destination = next;

  bus.send_raw_express_for_testing(next, damaged);
  bus.send_raw_express_for_testing(next, std::as_bytes(std::span(garbage.data(), garbage.size())));
  bus.send_raw_express_for_testing(next, encode(forged));
  bus.send_raw_express_for_testing(next, encode(not_a_beat));
  EXPECT_THROW(bus.send_raw_express_for_testing(next, std::vector<std::byte>(4096)), Error);
  bus.send(next, Message::make(Kind::kHeartbeat, kBeatTopic, Payload::from_string("after")));

  EXPECT_TRUE(eventually([&] { return seen.has(previous, "after"); }));
  EXPECT_TRUE(eventually([&] { return bus.stats().rejected_messages == 4; }))
      << bus.stats().rejected_messages;
  EXPECT_FALSE(seen.has(previous, "intact"));
  EXPECT_FALSE(seen.has(previous, "user"));
  EXPECT_FALSE(bus.try_receive(Filter{}).has_value());
  MPI_Barrier(MPI_COMM_WORLD);
  bus.shutdown();
}

}  // namespace
}  // namespace unimsg
