// A sender stopped (SIGSTOP) in the middle of a bulk transfer: the other ranks' messages still
// get through, and shutdown still ends. 2 or 3 ranks, run
// with Open MPI's single-copy transport off (tests/bus/CMakeLists.txt), so that the transfer
// needs the sender to make progress, as it does between hosts.

#include <gtest/gtest.h>
#include <mpi.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "unimsg/bus/bus.hpp"
#include "unimsg/core/error.hpp"

namespace unimsg {
namespace {

using namespace std::chrono_literals;

// Whether process `pid` is stopped ('T' in /proc/<pid>/stat).
bool stopped(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  const auto close = text.rfind(')');
  return close != std::string::npos && close + 2 < text.size() && text[close + 2] == 'T';
}

bool wait_until_stopped(pid_t pid) {
  for (int i = 0; i < 60000 && !stopped(pid); ++i) std::this_thread::sleep_for(1ms);
  return stopped(pid);
}

TEST(BusStoppedSenderTest, OthersGetThroughAndShutdownEndsWhileASenderIsStopped) {
  int size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  ASSERT_TRUE(size == 2 || size == 3) << "run with 2 or 3 ranks";
  BusOptions options;
  options.shutdown_timeout = 3s;
  options.max_payload_bytes = 1ull << 30;
  Bus bus(MPI_COMM_WORLD, options);
  pid_t pids[3] = {0, 0, 0};
  const pid_t self = getpid();
  MPI_Allgather(&self, sizeof self, MPI_BYTE, pids, sizeof self, MPI_BYTE, MPI_COMM_WORLD);
  if (bus.rank() == 1) {
    const auto sent = bus.stats().sent_messages;
    bus.send(0, Message::make(Kind::kData, 7, Payload(std::vector<std::byte>(512u << 20))));
    // Stopped as soon as the transfer has begun: its header and payload are posted.
    while (bus.stats().sent_messages == sent) std::this_thread::yield();
    raise(SIGSTOP);
    bus.shutdown();
  } else if (bus.rank() == 2) {
    ASSERT_TRUE(wait_until_stopped(pids[1]));
    bus.send(0, Message::make(Kind::kData, 8, Payload(std::vector<std::byte>(4u << 20))));
    bus.send(0, Message::make(Kind::kData, 9, Payload::from_string("small")));
    bus.shutdown();
  } else {
    ASSERT_TRUE(wait_until_stopped(pids[1]));
    // Lets the header in and the payload's receive be matched.
    EXPECT_THROW(bus.receive(Filter{Kind::kData, 7, 1}, 1s), TimeoutError);
    if (size == 3) {
      // The stopped sender's unfinished payload must not hold back the messages of others.
      EXPECT_EQ(bus.receive(Filter{Kind::kData, 8, 2}, 60s).payload.size(), 4u << 20);
      EXPECT_EQ(bus.receive(Filter{Kind::kData, 9, 2}, 60s).payload.as_string(), "small");
    }
    auto done = std::async(std::launch::async, [&] { bus.shutdown(); });
    const bool ended = done.wait_for(60s) == std::future_status::ready;
    kill(pids[1], SIGCONT);
    EXPECT_TRUE(ended) << "shutdown still waiting for the stopped sender after 60 s";
    done.get();
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

}  // namespace
}  // namespace unimsg
