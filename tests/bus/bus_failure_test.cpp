// The bus where things go wrong underneath it: no memory for a payload, requests dropped
// unanswered. Run under mpirun with 2 to 5 ranks (tests/bus/CMakeLists.txt).

#include <gtest/gtest.h>
#include <mpi.h>
#include <sys/resource.h>

#include <chrono>
#include <cstddef>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "eventually.hpp"
#include "unimsg/bus/bus.hpp"
#include "unimsg/core/error.hpp"

namespace unimsg {
namespace {

using namespace std::chrono_literals;
constexpr auto kLongWait = 120s;  // only ever reached when a test is failing

BusOptions test_options() {
  BusOptions options;
  options.shutdown_timeout = 60s;
  return options;
}

// This process's address space, from /proc/self/status (VmSize, in KiB).
std::size_t address_space_bytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmSize:", 0) == 0) return std::stoull(line.substr(7)) * 1024;
  }
  return 0;
}

// Limits the address space for as long as it lives, so that a large allocation fails.
class AddressSpaceLimit {
 public:
  explicit AddressSpaceLimit(std::size_t headroom) {
    getrlimit(RLIMIT_AS, &saved_);
    rlimit limited = saved_;
    limited.rlim_cur = address_space_bytes() + headroom;
    applied_ = setrlimit(RLIMIT_AS, &limited) == 0;
  }
  ~AddressSpaceLimit() { setrlimit(RLIMIT_AS, &saved_); }
  AddressSpaceLimit(const AddressSpaceLimit&) = delete;
  AddressSpaceLimit& operator=(const AddressSpaceLimit&) = delete;
  bool applied() const { return applied_; }

 private:
  rlimit saved_{};
  bool applied_ = false;
};

Payload patterned(std::size_t size) {
  std::vector<std::byte> bytes(size);
  for (std::size_t i = 0; i < size; i += 4096) bytes[i] = static_cast<std::byte>(i / 4096 % 251);
  return Payload(std::move(bytes));
}

// A payload that finds no memory when its header arrives waits in MPI until memory is free;
// meanwhile the ring keeps receiving. (It used to stop this rank's receiving for good.)
TEST(BusFailureTest, APayloadWithoutMemoryWaitsAndNothingIsLost) {
#if defined(__SANITIZE_ADDRESS__)
  // AddressSanitizer's operator new aborts the process where the allocator would throw
  // std::bad_alloc, so the failure this test provokes cannot be survived there; the release
  // build runs it (scripts/run, stage 1).
  GTEST_SKIP() << "needs a throwing operator new; AddressSanitizer's aborts on exhaustion";
#endif
  constexpr std::size_t kLarge = 192u << 20;
  Bus bus(MPI_COMM_WORLD, test_options());
  if (bus.rank() == 1) {
    MPI_Barrier(MPI_COMM_WORLD);
    bus.send(0, Message::make(Kind::kData, 41, patterned(kLarge)));
    bus.send(0, Message::make(Kind::kData, 42, Payload::from_string("after")));
  } else if (bus.rank() == 0) {
    {
      AddressSpaceLimit limit(64u << 20);
      ASSERT_TRUE(limit.applied());
      MPI_Barrier(MPI_COMM_WORLD);
      // Drives progress while the large payload cannot be stored.
      for (int round = 0; round < 4; ++round) {
        EXPECT_THROW(bus.receive(Filter{Kind::kData, 42, 1}, 500ms), TimeoutError);
      }
    }
    const Message large = bus.receive(Filter{Kind::kData, 41, 1}, kLongWait);
    ASSERT_EQ(large.payload.size(), kLarge);
    const Payload expected = patterned(kLarge);
    EXPECT_EQ(0, std::memcmp(large.payload.data(), expected.data(), kLarge));
    EXPECT_EQ(bus.receive(Filter{Kind::kData, 42, 1}, kLongWait).payload.as_string(), "after");
  } else {
    MPI_Barrier(MPI_COMM_WORLD);
  }
  bus.shutdown();
}

// A PendingReply dropped before its reply withdraws its request, instead of keeping an entry
// for nobody until the bus shuts down.
TEST(BusFailureTest, DroppedRequestsAreWithdrawn) {
  Bus bus(MPI_COMM_WORLD, test_options());
  const int peer = (bus.rank() + 1) % bus.size();
  for (int i = 0; i < 100; ++i) {
    PendingReply reply = bus.request(peer, Message::make(Kind::kTask, 91), 600s);
    EXPECT_EQ(bus.stats().pending_requests, 1u);
  }
  EXPECT_EQ(bus.stats().pending_requests, 0u);
  // Answering them now: each reply is late, counted and dropped.
  const int asker = (bus.rank() + bus.size() - 1) % bus.size();
  for (int i = 0; i < 100; ++i) {
    const Message request = bus.receive(Filter{Kind::kTask, 91, asker}, kLongWait);
    bus.reply(request.header, Message::make(Kind::kTaskResult, 91));
  }
  bus.flush(kLongWait);
  MPI_Barrier(MPI_COMM_WORLD);
  // (The peer flushed its replies before the barrier, but this rank counts each as it receives
  // it: the last may still be on their way. A clean-clone CI run under ASan saw 99.)
  EXPECT_TRUE(eventually([&] {
    (void)bus.try_receive(Filter{Kind::kTaskResult, 91, peer});  // (drives progress)
    return bus.stats().late_replies == 100u;
  })) << bus.stats().late_replies
      << " late replies";
  MPI_Barrier(MPI_COMM_WORLD);
  bus.shutdown();
  EXPECT_EQ(bus.stats().late_replies, 100u);
}

}  // namespace
}  // namespace unimsg
