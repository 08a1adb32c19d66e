// Multi-rank tests of the bus; run under mpirun with 1 to 4 ranks (tests/CMakeLists.txt).

#include <gtest/gtest.h>
#include <mpi.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "eventually.hpp"
#include "unimsg/bus/bus.hpp"
#include "unimsg/core/error.hpp"

namespace unimsg {
namespace {

using namespace std::chrono_literals;
constexpr auto kLongWait = 60s;  // only ever reached when a test is failing

BusOptions quiet_options() {
  BusOptions options;
  options.shutdown_timeout = 60s;
  return options;
}

Payload u64_payload(std::uint64_t a, std::uint64_t b = 0) {
  std::vector<std::byte> bytes(16);
  std::memcpy(bytes.data(), &a, 8);
  std::memcpy(bytes.data() + 8, &b, 8);
  return Payload(std::move(bytes));
}
std::uint64_t u64_at(const Message& message, std::size_t index) {
  std::uint64_t value = 0;
  std::memcpy(&value, message.payload.data() + index * 8, 8);
  return value;
}

TEST(BusTest, EveryKindReachesEveryRankWithItsFields) {
  Bus bus(MPI_COMM_WORLD, quiet_options());
  const int rank = bus.rank();
  const int size = bus.size();
  for (int peer = 0; peer < size; ++peer) {
    for (const Kind kind : kAllKinds) {
      Message message = Message::make(kind, 7, u64_payload(rank, static_cast<std::uint64_t>(kind)));
      bus.send(peer, std::move(message));
    }
  }
  for (int peer = 0; peer < size; ++peer) {
    for (const Kind kind : kAllKinds) {
      const Message got = bus.receive(Filter{kind, 7, peer}, kLongWait);
      EXPECT_EQ(got.header.source, peer);
      EXPECT_EQ(got.header.destination, rank);
      EXPECT_EQ(got.header.kind, kind);
      EXPECT_EQ(got.header.priority, default_priority(kind));
      EXPECT_EQ(u64_at(got, 0), static_cast<std::uint64_t>(peer));
      EXPECT_EQ(u64_at(got, 1), static_cast<std::uint64_t>(kind));
      EXPECT_GT(got.header.timestamp_ns, 0u);
    }
  }
  EXPECT_FALSE(bus.try_receive(Filter{}).has_value());
}

TEST(BusTest, OrderedPerSourceAndTopic) {
  Bus bus(MPI_COMM_WORLD, quiet_options());
  const int size = bus.size();
  constexpr int kPerTopic = 500;
  constexpr Topic kTopics[] = {1, 2, 3};
  for (int i = 0; i < kPerTopic; ++i) {
    for (const Topic topic : kTopics) {
      for (int peer = 0; peer < size; ++peer) {
        // Alternate sizes so that packed and split messages interleave.
        const std::size_t bytes = (i % 50 == 0) ? 40000 : 16;
        std::vector<std::byte> payload(bytes);
        const std::uint64_t index = static_cast<std::uint64_t>(i);
        std::memcpy(payload.data(), &index, 8);
        bus.send(peer, Message::make(Kind::kData, topic, Payload(std::move(payload))));
      }
    }
  }
  // Read topics in a different order than they were sent in.
  for (int peer = 0; peer < size; ++peer) {
    for (auto it = std::rbegin(kTopics); it != std::rend(kTopics); ++it) {
      for (int i = 0; i < kPerTopic; ++i) {
        const Message got = bus.receive(Filter{Kind::kData, *it, peer}, kLongWait);
        ASSERT_EQ(u64_at(got, 0), static_cast<std::uint64_t>(i))
            << "from rank " << peer << " topic " << *it;
      }
    }
  }
}

// receive() takes a message straight off the wire when its thread is the one driving progress
// and nothing older could match: this checks that the shortcut keeps order per source and topic,
// leaves subscribed messages to their handler even when the receive's filter matches them too,
// and gives way to the mailbox once it holds messages.
TEST(BusTest, WaitingReceiveKeepsOrderBesideSubscriptionsAndTheMailbox) {
  Bus bus(MPI_COMM_WORLD, quiet_options());
  const int rank = bus.rank();
  const int size = bus.size();
  const int right = (rank + 1) % size;
  const int left = (rank + size - 1) % size;
  constexpr Topic kReceived = 31, kSubscribed = 32, kParked = 33;
  constexpr int kRounds = 400;
  std::mutex seen_mutex;
  std::vector<std::uint64_t> handled;
  auto subscription = bus.subscribe(Filter{Kind::kUser, kSubscribed, left}, [&](const Message& m) {
    std::lock_guard lock(seen_mutex);
    handled.push_back(u64_at(m, 0));
  });
  MPI_Barrier(MPI_COMM_WORLD);
  // Phase 0 with an empty mailbox; phase 1 with parked messages in it that nobody reads yet.
  for (int phase = 0; phase < 2; ++phase) {
    for (int i = 0; i < kRounds; ++i) {
      const auto index = static_cast<std::uint64_t>(phase * kRounds + i);
      if (i % 3 == 0) bus.send(right, Message::make(Kind::kUser, kSubscribed, u64_payload(index)));
      if (phase == 1 && i % 7 == 0) {
        bus.send(right, Message::make(Kind::kUser, kParked, u64_payload(index)));
      }
      bus.send(right, Message::make(Kind::kUser, kReceived, u64_payload(index)));
      // Phase 0 takes any topic from the left: the subscribed messages must still go to the
      // handler. Phase 1 takes only its topic, so the parked messages stay in the mailbox.
      const Filter filter{Kind::kUser, phase == 0 ? std::nullopt : std::optional(kReceived), left};
      const Message got = bus.receive(filter, kLongWait);
      ASSERT_EQ(got.header.topic, kReceived) << "round " << index;
      ASSERT_EQ(u64_at(got, 0), index);
    }
  }
  // The parked messages all waited in the mailbox, in order.
  std::vector<std::uint64_t> parked;
  EXPECT_TRUE(eventually([&] {
    while (auto message = bus.try_receive(Filter{Kind::kUser, kParked, left})) {
      parked.push_back(u64_at(*message, 0));
    }
    return parked.size() == (kRounds + 6) / 7;
  }));
  for (std::size_t i = 0; i < parked.size(); ++i) EXPECT_EQ(parked[i], kRounds + 7 * i);
  const std::size_t expected_handled = 2 * ((kRounds + 2) / 3);
  EXPECT_TRUE(eventually([&] {
    std::lock_guard lock(seen_mutex);
    return handled.size() == expected_handled;
  }));
  std::lock_guard lock(seen_mutex);
  for (std::size_t i = 1; i < handled.size(); ++i) EXPECT_LT(handled[i - 1], handled[i]);
  EXPECT_EQ(bus.stats().rejected_messages, 0u);
}

TEST(BusTest, BroadcastReachesAllRanksIncludingSender) {
  Bus bus(MPI_COMM_WORLD, quiet_options());
  bus.broadcast(Message::make(Kind::kControl, 11, u64_payload(bus.rank())));
  std::vector<int> seen(static_cast<std::size_t>(bus.size()), 0);
  for (int i = 0; i < bus.size(); ++i) {
    const Message got = bus.receive(Filter{Kind::kControl, 11, std::nullopt}, kLongWait);
    EXPECT_EQ(got.header.destination, kBroadcast);
    EXPECT_EQ(u64_at(got, 0), static_cast<std::uint64_t>(got.header.source));
    ++seen[static_cast<std::size_t>(got.header.source)];
  }
  for (int r = 0; r < bus.size(); ++r) EXPECT_EQ(seen[static_cast<std::size_t>(r)], 1) << r;
}

TEST(BusTest, PublishSubscribeByTopicAndKind) {
  Bus bus(MPI_COMM_WORLD, quiet_options());
  std::atomic<int> on_topic{0};
  std::atomic<int> on_kind{0};
  std::atomic<std::uint64_t> source_sum{0};
  auto topic_sub = bus.subscribe(Filter{std::nullopt, 21, std::nullopt}, [&](const Message& m) {
    source_sum += static_cast<std::uint64_t>(m.header.source);
    ++on_topic;
  });
  auto kind_sub = bus.subscribe(Filter{Kind::kStatus, std::nullopt, std::nullopt},
                                [&](const Message&) { ++on_kind; });
  MPI_Barrier(MPI_COMM_WORLD);  // every rank subscribed before anyone publishes
  bus.publish(21, Message::make(Kind::kUser, 0));
  bus.publish(22, Message::make(Kind::kStatus, 0));
  const int size = bus.size();
  EXPECT_TRUE(eventually([&] { return on_topic == size && on_kind == size; }))
      << on_topic << " on topic, " << on_kind << " on kind";
  EXPECT_EQ(source_sum.load(), static_cast<std::uint64_t>(size * (size - 1) / 2));
  EXPECT_FALSE(bus.try_receive(Filter{}).has_value());
}

TEST(BusTest, RequestReplyAcrossRanks) {
  Bus bus(MPI_COMM_WORLD, quiet_options());
  auto responder = bus.subscribe(Filter{Kind::kTask, 5, std::nullopt}, [&](const Message& m) {
    bus.reply(m.header,
              Message::make(Kind::kTaskResult, 5, u64_payload(u64_at(m, 0) * 10, bus.rank())));
  });
  MPI_Barrier(MPI_COMM_WORLD);
  std::vector<PendingReply> replies;
  for (int peer = 0; peer < bus.size(); ++peer) {
    replies.push_back(bus.request(peer, Message::make(Kind::kTask, 5, u64_payload(peer + 1)), 60s));
  }
  for (int peer = 0; peer < bus.size(); ++peer) {
    const Message got = replies[static_cast<std::size_t>(peer)].get();
    EXPECT_TRUE(got.header.is_reply());
    EXPECT_EQ(got.header.source, peer);
    EXPECT_EQ(got.header.correlation, replies[static_cast<std::size_t>(peer)].correlation());
    EXPECT_EQ(u64_at(got, 0), static_cast<std::uint64_t>((peer + 1) * 10));
    EXPECT_EQ(u64_at(got, 1), static_cast<std::uint64_t>(peer));
  }
  MPI_Barrier(MPI_COMM_WORLD);  // nobody unsubscribes while others still ask
}

TEST(BusTest, RequestTimesOutNamingThePeer) {
  Bus bus(MPI_COMM_WORLD, quiet_options());
  const int peer = (bus.rank() + 1) % bus.size();
  PendingReply reply = bus.request(peer, Message::make(Kind::kTask, 77), 200ms);
  try {
    reply.get();
    FAIL() << "a request nobody answers returned";
  } catch (const TimeoutError& error) {
    const std::string text = error.what();
    EXPECT_NE(text.find("to rank " + std::to_string(peer)), std::string::npos) << text;
    EXPECT_NE(text.find("correlation"), std::string::npos) << text;
  }
  // The unanswered request is in the peer's mailbox; a late answer to it is counted, not lost.
  const int asker = (bus.rank() + bus.size() - 1) % bus.size();
  const Message request = bus.receive(Filter{Kind::kTask, 77, asker}, kLongWait);
  MPI_Barrier(MPI_COMM_WORLD);
  bus.reply(request.header, Message::make(Kind::kTaskResult, 77));
  EXPECT_TRUE(eventually([&] { return bus.stats().late_replies == 1; }));
}

TEST(BusTest, ErrorReplyBecomesAnError) {
  Bus bus(MPI_COMM_WORLD, quiet_options());
  auto responder = bus.subscribe(Filter{Kind::kTask, 6, std::nullopt}, [&](const Message& m) {
    bus.reply_error(m.header, "no such file: shard-17");
  });
  MPI_Barrier(MPI_COMM_WORLD);
  const int peer = (bus.rank() + 1) % bus.size();
  try {
    bus.request(peer, Message::make(Kind::kTask, 6), 60s).get();
    FAIL() << "an error reply returned normally";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("no such file: shard-17"), std::string::npos);
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

TEST(BusTest, ThousandsOfMessagesToEveryRankConcurrently) {
  Bus bus(MPI_COMM_WORLD, quiet_options());
  const int rank = bus.rank();
  const int size = bus.size();
#if defined(__SANITIZE_ADDRESS__)
  // The release build checks the scale; the sanitizer build, where every message costs ~10x
  // (28-110 s of CI for 4-5 ranks on 2 cores), checks memory on fewer.
  constexpr std::uint64_t kCount = 2000;
#else
  constexpr std::uint64_t kCount = 10000;
#endif
  std::atomic<bool> receive_ok{true};
  std::string receive_error;
  // One thread receives while the main thread sends: both drive the bus at once.
  std::thread receiver([&] {
    std::vector<std::uint64_t> next(static_cast<std::size_t>(size), 0);
    try {
      for (std::uint64_t n = 0; n < kCount * static_cast<std::uint64_t>(size); ++n) {
        const Message got = bus.receive(Filter{Kind::kData, 9, std::nullopt}, kLongWait);
        auto& expected = next[static_cast<std::size_t>(got.header.source)];
        if (u64_at(got, 0) != expected || u64_at(got, 1) != static_cast<std::uint64_t>(rank)) {
          receive_error = "from rank " + std::to_string(got.header.source) + " got #" +
                          std::to_string(u64_at(got, 0)) + ", expected #" +
                          std::to_string(expected);
          receive_ok = false;
          return;
        }
        ++expected;
      }
    } catch (const std::exception& error) {
      receive_error = error.what();
      receive_ok = false;
    }
  });
  for (std::uint64_t i = 0; i < kCount; ++i) {
    for (int step = 0; step < size; ++step) {
      const int peer = (rank + step) % size;  // every rank starts with a different peer
      bus.send(peer,
               Message::make(Kind::kData, 9, u64_payload(i, static_cast<std::uint64_t>(peer))));
    }
  }
  receiver.join();
  bus.flush(kLongWait);  // sends still queued for slower peers are counted once posted
  EXPECT_TRUE(receive_ok) << receive_error;
  EXPECT_FALSE(bus.try_receive(Filter{}).has_value()) << "a duplicate arrived";
  const BusStats stats = bus.stats();
  EXPECT_EQ(stats.sent_messages, kCount * static_cast<std::uint64_t>(size - 1));
  EXPECT_EQ(stats.received_messages, kCount * static_cast<std::uint64_t>(size - 1));
  EXPECT_EQ(stats.rejected_messages, 0u);
}

TEST(BusTest, PayloadsFromZeroBytesTo64MiB) {
  Bus bus(MPI_COMM_WORLD, quiet_options());
  const int next = (bus.rank() + 1) % bus.size();
  const int previous = (bus.rank() + bus.size() - 1) % bus.size();
  // Around the packed/split boundary (16 KiB with the header) and up to 64 MiB.
  const std::vector<std::size_t> sizes = {0,        1, 8, 16320, 16321, 1u << 20, (1u << 20) + 3,
                                          64u << 20};
  for (const std::size_t size : sizes) {
    std::vector<std::byte> payload(size);
    for (std::size_t i = 0; i < size; ++i) {
      payload[i] = static_cast<std::byte>((i * 131 + static_cast<std::size_t>(bus.rank())) & 0xFF);
    }
    bus.send(next, Message::make(Kind::kData, 3, Payload(std::move(payload))));
    const Message got = bus.receive(Filter{Kind::kData, 3, previous}, kLongWait);
    ASSERT_EQ(got.payload.size(), size);
    for (std::size_t i = 0; i < size; i += (i < 4096 ? 1 : 4093)) {
      ASSERT_EQ(got.payload.data()[i],
                static_cast<std::byte>((i * 131 + static_cast<std::size_t>(previous)) & 0xFF))
          << "byte " << i << " of " << size;
    }
  }
}

TEST(BusTest, CorruptedEnvelopesAreRejectedAndCountedAndTheBusGoesOn) {
  Bus bus(MPI_COMM_WORLD, quiet_options());
  const int size = bus.size();
  const int next = (bus.rank() + 1) % size;
  const int previous = (bus.rank() + size - 1) % size;

  Message good = Message::make(Kind::kUser, 4, Payload::from_string("intact"));
  good.header.source = bus.rank();
  good.header.destination = next;
  auto flipped = encode(good);
  flipped[kHeaderSize + 2] ^= std::byte{0x20};
  auto truncated = encode(good);
  truncated.resize(truncated.size() - 3);
  const std::string garbage = "definitely not a unimsg envelope, just bytes";
  auto spoofed = good;
  spoofed.header.source = (bus.rank() + 2) % size == bus.rank() ? next : (bus.rank() + 2) % size;
  const bool can_spoof = spoofed.header.source != bus.rank();

  bus.send_raw_for_testing(next, flipped);
  bus.send_raw_for_testing(next, truncated);
  bus.send_raw_for_testing(next, std::as_bytes(std::span(garbage.data(), garbage.size())));
  if (can_spoof) bus.send_raw_for_testing(next, encode(spoofed));
  bus.send(next, Message::make(Kind::kUser, 4, Payload::from_string("intact")));

  const Message got = bus.receive(Filter{Kind::kUser, 4, previous}, kLongWait);
  EXPECT_EQ(got.payload.as_string(), "intact");
  const std::uint64_t expected_rejects = can_spoof ? 4 : 3;
  EXPECT_TRUE(eventually([&] { return bus.stats().rejected_messages == expected_rejects; }))
      << bus.stats().rejected_messages;
  EXPECT_FALSE(bus.try_receive(Filter{Kind::kUser, 4, std::nullopt}).has_value());
  // Still working afterwards, both directions.
  bus.send(previous, Message::make(Kind::kUser, 8, Payload::from_string("after")));
  EXPECT_EQ(bus.receive(Filter{Kind::kUser, 8, next}, kLongWait).payload.as_string(), "after");
}

TEST(BusTest, OversizedMessagesAreRefusedAndDropped) {
  BusOptions options = quiet_options();
  options.max_payload_bytes = 1024;
  Bus bus(MPI_COMM_WORLD, options);
  const int next = (bus.rank() + 1) % bus.size();
  const int previous = (bus.rank() + bus.size() - 1) % bus.size();
  // An envelope announcing more than the receiver's maximum is rejected by the receiver...
  Message over = Message::make(Kind::kData, 6, Payload(std::vector<std::byte>(4096)));
  over.header.source = bus.rank();
  over.header.destination = next;
  bus.send_raw_for_testing(next, encode(over));
  // ...and nothing larger than an envelope ever leaves a sender on the envelope tag.
  EXPECT_THROW(bus.send_raw_for_testing(next, std::vector<std::byte>(100000)), Error);
  // A payload over the maximum is refused at the sender already, naming the setting.
  try {
    bus.send(next, Message::make(Kind::kData, 6, Payload(std::vector<std::byte>(4096))));
    ADD_FAILURE() << "sent a payload over the maximum";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("UNIMSG_BUS_MAX_PAYLOAD"), std::string::npos);
  }
  bus.send(next, Message::make(Kind::kUser, 6, Payload::from_string("small")));
  EXPECT_EQ(bus.receive(Filter{Kind::kUser, 6, previous}, kLongWait).payload.as_string(), "small");
  EXPECT_TRUE(eventually([&] { return bus.stats().rejected_messages == 1; }))
      << bus.stats().rejected_messages;
}

TEST(BusTest, LargePayloadsAreCompressedWhenAsked) {
  BusOptions options = quiet_options();
  options.compress_threshold = 4096;
  Bus bus(MPI_COMM_WORLD, options);
  const int next = (bus.rank() + 1) % bus.size();
  const int previous = (bus.rank() + bus.size() - 1) % bus.size();
  std::string text;
  while (text.size() < (1u << 20))
    text += "loss=0.25 step=" + std::to_string(text.size() % 97) + ";";
  bus.send(next, Message::make(Kind::kStatus, 2, Payload::from_string(text)));
  const Message got = bus.receive(Filter{Kind::kStatus, 2, previous}, kLongWait);
  EXPECT_EQ(got.payload.as_string(), text);
  EXPECT_FALSE(got.header.is_compressed());
  if (bus.size() > 1) {
    EXPECT_EQ(bus.stats().compressed_messages, 1u);
    EXPECT_LT(bus.stats().sent_bytes, text.size() / 4);
  }
}

TEST(BusTest, FullQueuesPushBackInsteadOfGrowing) {
  BusOptions options = quiet_options();
  options.inbox_messages = 4;
  options.window_per_peer = 4;
  options.send_queue_messages = 8;
  options.send_timeout = 300ms;
  Bus bus(MPI_COMM_WORLD, options);
  if (bus.size() == 1) GTEST_SKIP() << "needs a receiver on another rank";
  const int rank = bus.rank();
  if (rank == 0) {
    // Rank 1 does not read yet: its inbox fills, our window fills, then our queue fills, and
    // send() reports the stall instead of buffering without bound.
    int accepted = 0;
    try {
      for (int i = 0; i < 1000; ++i) {
        bus.send(1, Message::make(Kind::kData, 1, u64_payload(static_cast<std::uint64_t>(i))));
        ++accepted;
      }
      ADD_FAILURE() << "1000 sends to a rank that reads nothing all went through";
    } catch (const TimeoutError& error) {
      EXPECT_NE(std::string(error.what()).find("send queue"), std::string::npos) << error.what();
    }
    EXPECT_GE(accepted, 8);
    EXPECT_LE(accepted, 4 + 4 + 8 + 2);  // inbox + window + queue, with a little slack
    MPI_Send(&accepted, 1, MPI_INT, 1, 0, MPI_COMM_WORLD);
  } else if (rank == 1) {
    int accepted = 0;
    MPI_Recv(&accepted, 1, MPI_INT, 0, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    for (int i = 0; i < accepted; ++i) {
      const Message got = bus.receive(Filter{Kind::kData, 1, 0}, kLongWait);
      ASSERT_EQ(u64_at(got, 0), static_cast<std::uint64_t>(i));
    }
  }
}

TEST(BusTest, UrgentMessagesOvertakeQueuedBulkData) {
  BusOptions options = quiet_options();
  options.inbox_messages = 1;
  options.window_per_peer = 2;
  Bus bus(MPI_COMM_WORLD, options);
  if (bus.size() == 1) GTEST_SKIP() << "needs a receiver on another rank";
  constexpr int kBulk = 20;
  if (bus.rank() == 0) {
    for (int i = 0; i < kBulk; ++i) {
      bus.send(1, Message::make(Kind::kData, 1, u64_payload(static_cast<std::uint64_t>(i))));
    }
    bus.send(1, Message::make(Kind::kFault, 1, u64_payload(999)));
    MPI_Barrier(MPI_COMM_WORLD);
  } else {
    MPI_Barrier(MPI_COMM_WORLD);
    if (bus.rank() == 1) {
      int fault_position = -1;
      int next_bulk = 0;
      for (int position = 0; position <= kBulk; ++position) {
        const Message got = bus.receive(Filter{std::nullopt, 1, 0}, kLongWait);
        if (got.header.kind == Kind::kFault) {
          fault_position = position;
        } else {
          ASSERT_EQ(u64_at(got, 0), static_cast<std::uint64_t>(next_bulk++));
        }
      }
      EXPECT_GE(fault_position, 0);
      EXPECT_LT(fault_position, kBulk) << "the fault message waited behind all the bulk data";
    }
  }
}

TEST(BusTest, ShutdownDeliversEverythingSentBeforeIt) {
  Bus bus(MPI_COMM_WORLD, quiet_options());
  const int size = bus.size();
  constexpr int kEach = 200;
  for (int i = 0; i < kEach; ++i) {
    for (int peer = 0; peer < size; ++peer) {
      bus.send(peer, Message::make(Kind::kData, 12, u64_payload(static_cast<std::uint64_t>(i))));
    }
  }
  bus.shutdown();
  for (int peer = 0; peer < size; ++peer) {
    for (int i = 0; i < kEach; ++i) {
      const auto got = bus.try_receive(Filter{Kind::kData, 12, peer});
      ASSERT_TRUE(got.has_value()) << "message " << i << " from rank " << peer << " missing";
      EXPECT_EQ(u64_at(*got, 0), static_cast<std::uint64_t>(i));
    }
  }
  EXPECT_THROW(bus.send(0, Message::make(Kind::kData, 12)), ShutdownError);
}

TEST(BusTest, ShutdownCompletesThroughAFullInbox) {
  BusOptions options = quiet_options();
  options.inbox_messages = 2;
  options.shutdown_timeout = 120s;
  Bus bus(MPI_COMM_WORLD, options);
  const int next = (bus.rank() + 1) % bus.size();
  const int previous = (bus.rank() + bus.size() - 1) % bus.size();
  for (int i = 0; i < 10; ++i) {
    bus.send(next, Message::make(Kind::kData, 13, u64_payload(static_cast<std::uint64_t>(i))));
  }
  const auto start = std::chrono::steady_clock::now();
  bus.shutdown();  // nobody read anything: the inbox is full, yet the goodbyes get through
  EXPECT_LT(std::chrono::steady_clock::now() - start, 60s);
  for (int i = 0; i < 10; ++i) {
    const auto got = bus.try_receive(Filter{Kind::kData, 13, previous});
    ASSERT_TRUE(got.has_value()) << "message " << i << " missing";
    EXPECT_EQ(u64_at(*got, 0), static_cast<std::uint64_t>(i));
  }
}

TEST(BusTest, ShutdownFailsPendingRequestsClearly) {
  Bus bus(MPI_COMM_WORLD, quiet_options());
  const int peer = (bus.rank() + 1) % bus.size();
  PendingReply pending = bus.request(peer, Message::make(Kind::kTask, 31), 120s);
  std::string outcome;
  std::thread waiter([&] {
    try {
      pending.get();
      outcome = "returned";
    } catch (const ShutdownError& error) {
      outcome = error.what();
    } catch (const std::exception& error) {
      outcome = std::string("wrong error: ") + error.what();
    }
  });
  std::this_thread::sleep_for(50ms);
  bus.shutdown();
  waiter.join();
  EXPECT_NE(outcome.find("shut down before rank " + std::to_string(peer) + " replied"),
            std::string::npos)
      << outcome;
}

TEST(BusTest, BadArgumentsAreClearErrors) {
  Bus bus(MPI_COMM_WORLD, quiet_options());
  try {
    bus.send(bus.size(), Message::make(Kind::kUser, 1));
    FAIL() << "sent to a rank that does not exist";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("outside 0.."), std::string::npos);
  }
  EXPECT_THROW(bus.send(0, Message::make(Kind::kUser, kReservedTopicBase + 1)), Error);
  EXPECT_THROW(bus.receive(Filter{Kind::kUser, 12345, std::nullopt}, 10ms), TimeoutError);
}

}  // namespace
}  // namespace unimsg
