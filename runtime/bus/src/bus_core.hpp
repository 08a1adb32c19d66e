#pragma once

// The bus's engine room, shared by its source files: the constants of the wire protocol, the
// structures of the send and receive paths, and BusCore, which the public Bus
// (unimsg/bus/bus.hpp) fronts. Private to runtime/bus/src.
//
//   bus_core.cpp      construction, the wire-compatibility check
//   send_path.cpp     send queue, flow control, in-flight sends
//   receive_ring.cpp  preposted receives, split payloads, verification
//   delivery.cpp      subscriptions, mailbox, handlers, direct receive hand-over
//   drive_loop.cpp    progress rounds and the progress thread (drive_until is below: a template)
//   express.cpp       the express path: heartbeats apart from every other message
//   shutdown.cpp      shutdown and teardown
//   buffer_pool.cpp   the receive buffer pool

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "unimsg/bus/bus.hpp"
#include "unimsg/bus/mpi.hpp"
#include "unimsg/core/backoff.hpp"
#include "unimsg/core/wall_clock.hpp"

namespace unimsg::detail {

using Clock = std::chrono::steady_clock;

// A message whose header and payload fit in this many bytes travels as one MPI message (one
// copy into a packed buffer); a larger one travels as a header message followed by the payload
// sent from where it lies, so bulk data is never copied on the sending side.
constexpr std::size_t kPackedLimit = 16 * 1024;
// Packed messages and the headers of split ones share one tag, so that the receive ring matches
// them in the order each source sent them.
constexpr int kTagEnvelope = 101;
// A split message's payload travels on a tag derived from its sequence number: a payload whose
// header was rejected can then never be taken for the payload of a later message.
constexpr int kTagPayloadBase = 1024;
// Envelope receives kept posted: a message that finds one posted is received without a probe,
// which costs more than a plain receive (docs/architecture.md). Slots are completed in the order
// posted, which is the order MPI matched them, so per-source order holds.
constexpr std::size_t kRingSlots = 32;
// The last message every rank sends to every other during shutdown.
constexpr Topic kTopicGoodbye = kReservedTopicBase + 1;
// Bounds on the work one progress round does, so that no caller is held up for long.
constexpr int kMaxReceivesPerRound = 64;
// Bulk payloads being received at once from one source (beyond the first): more would only split
// the memory bandwidth between them and grow the buffer pool, without finishing any of them
// sooner. Per source, so that a stopped sender holds back only its own messages.
constexpr std::size_t kMaxPendingPayloadBytes = 1ull << 20;
// How long shutdown waits at least for MPI to cancel each receive still posted.
constexpr std::chrono::seconds kCancelGrace{1};

// The express path (express.cpp). Heartbeats must be heard while handlers block or the inbox is
// full, or a healthy rank goes deaf and is taken for an isolated one: so they travel on a tag of
// their own, into receives that are always posted and never wait for inbox room.
constexpr int kTagExpress = 102;
// The largest express message, header included; larger heartbeats travel the ordinary way.
constexpr std::size_t kExpressLimit = 256;
constexpr std::size_t kExpressSlots = 8;
// Express messages to one peer that may be unmatched there: every half window one goes with
// MPI_Issend, as on the ordinary path, so a peer that stops receiving holds at most this many of
// ours; heartbeats beyond them are dropped, since each one only repeats that we are alive.
constexpr std::uint64_t kExpressWindow = 8;
// A waiting thread's progress rounds test the express receives only every this many rounds:
// each test is one more pass through MPI's progress engine on the latency path.
constexpr std::uint32_t kExpressRounds = 16;
// How long the progress thread may be busy running handlers before the express thread receives
// the express messages in its place.
constexpr std::chrono::milliseconds kExpressPoll{10};

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Changes a counter whose writers all hold one mutex: a plain load and store instead of a locked
// read-modify-write (about 20 cycles each, several per message). Readers without the mutex see a
// recent value, which is all they need.
inline void add_guarded(std::atomic<std::uint64_t>& counter, std::uint64_t delta) noexcept {
  counter.store(counter.load(std::memory_order_relaxed) + delta, std::memory_order_release);
}
inline void sub_guarded(std::atomic<std::uint64_t>& counter, std::uint64_t delta) noexcept {
  counter.store(counter.load(std::memory_order_relaxed) - delta, std::memory_order_release);
}

inline Clock::time_point deadline_after(std::chrono::nanoseconds timeout) {
  const auto now = Clock::now();
  if (timeout > Clock::time_point::max() - now) return Clock::time_point::max();
  return now + std::chrono::duration_cast<Clock::duration>(timeout);
}

inline std::string describe(const Header& header) {
  return std::string(to_string(header.kind)) + " topic " + std::to_string(header.topic);
}

// Reuses large receive buffers: a fresh multi-megabyte allocation costs page faults and zeroing
// that would dominate a bulk transfer. Buffers return here when the last Message using them dies.
class BufferPool : public std::enable_shared_from_this<BufferPool> {
 public:
  static constexpr std::size_t kMinPooled = 64 * 1024;
  explicit BufferPool(std::size_t max_cached) : max_cached_(max_cached) {}

  std::shared_ptr<std::byte[]> acquire(std::size_t size);

 private:
  void give_back(std::unique_ptr<std::byte[]> storage, std::size_t capacity);

  std::mutex mutex_;
  std::multimap<std::size_t, std::unique_ptr<std::byte[]>> free_;
  std::size_t cached_ = 0;
  std::size_t max_cached_;
};

struct ReplySlot {
  int destination = 0;
  Header request;
  Clock::time_point deadline;
  bool done = false;  // guarded by BusCore::mail_mutex
  std::optional<Message> reply;
  std::string error;
  bool failed_by_shutdown = false;
};

// One message ready to leave this rank.
struct Outgoing {
  int destination = 0;
  Priority priority = Priority::kNormal;
  std::array<std::byte, kHeaderSize> header{};
  Payload payload;                            // sent after the header when not packed
  std::shared_ptr<const std::byte[]> packed;  // header + payload in one buffer, when small
  std::size_t packed_size = 0;
  std::uint64_t sequence = 0;  // picks the payload's tag
  bool counted = true;         // false for the bus's own messages, which stay out of the stats

  std::uint64_t wire_bytes() const noexcept {
    return packed ? packed_size : kHeaderSize + payload.size();
  }
};

// Small messages sent straight from send() are encoded into the InFlight itself: no allocation.
constexpr std::size_t kInlineBytes = 256;

struct InFlight {
  Outgoing message;
  std::array<MPI_Request, 2> requests{MPI_REQUEST_NULL, MPI_REQUEST_NULL};
  bool synchronous = false;
  std::uint64_t sync_mark = 0;
  std::size_t inline_size = 0;  // > 0: the whole message is in inline_bytes
  std::array<std::byte, kInlineBytes> inline_bytes;

  std::uint64_t wire_bytes() const noexcept {
    return inline_size > 0 ? inline_size : message.wire_bytes();
  }
};

// Flow control towards one peer: every window/2 messages one goes with MPI_Issend; its completion
// proves the peer matched everything before it, so at most `window` messages are ever unmatched
// at the peer, whatever the peer's MPI would otherwise buffer.
struct PeerState {
  std::uint64_t posted = 0;
  std::uint64_t confirmed = 0;
  std::uint64_t last_sync_mark = 0;
};

// A message from one source that must wait for the messages before it: a split payload still
// arriving or being verified, or a packed message queued behind one.
struct PendingReceive {
  MPI_Request request = MPI_REQUEST_NULL;
  std::shared_ptr<std::byte[]> buffer;
  std::size_t size = 0;
  std::array<std::byte, kHeaderSize> wire_header;
  Header header;
  std::optional<Message> ready;  // a packed message, decoded, waiting for its turn
  // A split payload whose receive is not posted yet: no memory for its buffer when its header
  // came (the payload waits in MPI, its sender's send unfinished, until a later round finds
  // memory), or MPI refused the receive.
  bool awaiting_post = false;
  bool memory_warned = false;
};

// One preposted envelope receive.
struct RingSlot {
  MPI_Request request = MPI_REQUEST_NULL;
  std::unique_ptr<std::byte[]> buffer = std::make_unique_for_overwrite<std::byte[]>(kPackedLimit);
};

// The express receives: one request array, so that a single MPI_Testsome tests them all.
struct ExpressRing {
  std::array<MPI_Request, kExpressSlots> requests;
  // When each slot was posted: MPI matches posted receives in that order, and completed slots
  // are handled in it, so each source's heartbeats come out in send order.
  std::array<std::uint64_t, kExpressSlots> posted_as{};
  std::uint64_t next_post = 0;
  std::unique_ptr<std::byte[]> buffers =
      std::make_unique_for_overwrite<std::byte[]>(kExpressSlots * kExpressLimit);

  ExpressRing() { requests.fill(MPI_REQUEST_NULL); }
  std::byte* buffer(std::size_t slot) const noexcept {
    return buffers.get() + slot * kExpressLimit;
  }
};

// One express message on its way to one peer.
struct ExpressFlight {
  MPI_Request request = MPI_REQUEST_NULL;
  int destination = 0;
  bool synchronous = false;
  std::uint64_t sync_mark = 0;
  std::size_t size = 0;
  std::array<std::byte, kExpressLimit> wire;
};

// A receive() driving progress itself, waiting for a message that `filter` matches.
struct DirectReceive {
  const Filter* filter = nullptr;
  std::optional<Message>* out = nullptr;
};

struct SubscriptionEntry {
  std::uint64_t id = 0;
  Filter filter;
  std::shared_ptr<Handler> handler;
};

struct BusCore : std::enable_shared_from_this<BusCore> {
  BusCore(MPI_Comm parent, BusOptions opts);
  ~BusCore();

  // --- sending
  void send(int destination, Message message, bool internal);
  void broadcast(Message message);
  Outgoing prepare(int destination, const Message& message);
  void enqueue(std::vector<Outgoing> items, bool internal);
  void wait_for_capacity(std::uint64_t bytes, std::uint64_t count);

  // --- progress (progress_mutex held)
  bool progress_once();
  bool post_sends();
  std::unique_ptr<InFlight> take_spare_flight();
  void post_flight(std::unique_ptr<InFlight> flight);
  // Whether the next message posted to `peer` is the one that goes with MPI_Issend.
  bool next_post_synchronises(const PeerState& peer) const noexcept {
    return peer.posted + 1 - peer.last_sync_mark >= options.window_per_peer / 2;
  }
  void count_sent(bool counted, std::uint64_t wire_bytes);
  // The fast path of send(): a small message posted at once, without queueing or allocating.
  bool try_send_now(int destination, const Message& message, bool internal);
  bool complete_sends();
  bool receive_messages();
  bool inbox_has_room() const;
  void post_ring_slot(RingSlot& slot);
  void post_ring_slots();
  void accept_envelope(int source, std::span<const std::byte> wire);
  bool post_payload_receive(int source, PendingReceive& pending);
  bool complete_receives();
  void accept_split(int source, PendingReceive& receive);
  void reject(int source, const std::string& reason);
  void count_received(const Header& header, std::uint64_t wire_bytes);

  // --- the express path (express.cpp)
  static bool is_express(const Message& message) noexcept;
  // To message.header.destination, or to every peer for kBroadcast.
  void send_express(const Message& message);
  void post_express(int peer, const ExpressFlight& wire, bool counted);
  void complete_express_sends();
  void post_express_slot(std::size_t slot);
  bool receive_express();
  std::optional<Message> accept_express(int source, std::span<const std::byte> wire);
  void deliver_express(Message message);
  // Whether an express subscription took the message.
  bool run_express_handlers(const Message& message);
  std::uint64_t subscribe_express(Filter filter, Handler handler);
  bool unsubscribe_express(std::uint64_t id);
  void start_express_thread();
  void stop_express_thread();
  void express_thread_main();
  // Called by the progress thread around the handlers it runs (express_thread_main).
  void mark_handlers_busy(bool busy) noexcept;

  // --- delivery
  void deliver(Message message);
  void deliver_received(Message message);
  // A message for the mailbox, or for the handlers when `subscribed`.
  void to_inbox(Message message, bool subscribed);
  void run_handlers(Message message);
  bool has_subscriber(const Header& header);

  // Drives progress until ready() (called with mail_mutex held) or the deadline; with `direct`,
  // also until a message reaches it straight from the wire.
  template <typename Ready>
  bool drive_until(Ready&& ready, Clock::time_point deadline, DirectReceive* direct = nullptr);
  void progress_thread_main();

  void unsubscribe(std::uint64_t id);
  void shutdown();
  void abandon_requests(Clock::time_point deadline);
  std::size_t abandon_express(Clock::time_point deadline);  // what MPI still holds of it
  void check_open(const char* operation) const;
  void check_topic(Topic topic, const char* operation) const;
  void check_payload(const Message& message, const char* operation) const;
  bool route_ok(int source, const Header& header);
  void check_wire_compatibility();

  MpiComm comm;
  int rank = 0;
  int size = 1;
  BusOptions options;
  WallClock clock;  // message timestamps
  std::shared_ptr<spdlog::logger> log;
  DecodeLimits limits;

  std::mutex progress_mutex;  // whoever holds it drives MPI for the bus
  std::array<std::deque<Outgoing>, kPriorityLevels> send_queue;
  std::vector<std::unique_ptr<InFlight>> in_flight;
  std::vector<std::unique_ptr<InFlight>> spare_flights;  // reused: no allocation per message
  std::vector<PeerState> peers;
  std::vector<RingSlot> ring;
  std::size_t ring_head = 0;
  // Slots consumed but not yet posted again: reposting waits for the next progress round, so
  // that the message just received reaches its reader first.
  std::vector<std::size_t> ring_to_post;
  int payload_tag_span = 1;
  std::vector<std::deque<PendingReceive>> pending_receives;  // per source, in match order
  std::size_t pending_receive_count = 0;
  // Bytes of split payloads being received, per source (kMaxPendingPayloadBytes).
  std::vector<std::size_t> posted_payload_bytes;
  // The receive() whose thread is driving progress right now, if any: a message for it goes
  // straight to it (deliver_received).
  DirectReceive* direct_receive = nullptr;
  // A progress round that has just handed a message to a waiting thread ends early, so that the
  // thread gets it without waiting for the rest of the round; never two rounds in a row, so that
  // sends keep moving while messages stream in.
  bool served_waiter = false;
  bool served_waiter_last_round = false;
  std::vector<char> blocked_scratch;
  std::shared_ptr<BufferPool> buffers;
  // Buffers of transfers MPI still holds after shutdown (abandon_requests).
  std::vector<std::shared_ptr<std::byte[]>> leaked_buffers;
  std::vector<std::unique_ptr<std::byte[]>> leaked_ring_buffers;
  std::vector<std::unique_ptr<InFlight>> leaked_flights;

  // The express path (guarded by progress_mutex, but for what is marked otherwise).
  ExpressRing express_ring;
  std::vector<PeerState> express_peers;
  std::vector<char> express_dropping;  // per peer: heartbeats to it are being dropped (logged)
  std::vector<std::unique_ptr<ExpressFlight>> express_flights;
  std::uint32_t express_countdown = kExpressRounds;
  std::unique_ptr<std::byte[]> leaked_express_buffers;
  std::vector<std::unique_ptr<ExpressFlight>> leaked_express_flights;
  // Express handlers run with express_mutex held: one at a time, and none after unsubscribing.
  std::mutex express_mutex;
  std::vector<SubscriptionEntry> express_subscriptions;  // guarded by express_mutex
  std::atomic<std::size_t> express_subscription_count{0};
  // Since when the progress thread has been running handlers (steady clock, ns); 0 while not.
  std::atomic<std::int64_t> handlers_busy_since{0};
  std::mutex express_thread_mutex;
  std::condition_variable express_cv;
  bool express_stop = false;  // guarded by express_thread_mutex
  std::thread express_thread;

  std::atomic<std::uint64_t> queued_bytes{0};
  std::atomic<std::uint64_t> queued_messages{0};

  std::mutex mail_mutex;
  // Waking a thread costs a system call, so each side is notified only while someone sleeps.
  std::condition_variable mail_cv;      // drivers sleeping in drive_until
  std::condition_variable progress_cv;  // the progress thread, idle
  int sleeping_drivers = 0;             // guarded by mail_mutex
  bool progress_sleeping = false;       // guarded by mail_mutex
  std::deque<Message> mailbox;
  std::deque<Message> dispatch_queue;
  // Bumped on every delivery, so a waiting thread re-checks its condition (under the lock)
  // only when something may have changed.
  std::atomic<std::uint64_t> mail_generation{0};
  std::atomic<std::uint64_t> inbox_bytes{0};
  std::atomic<std::uint64_t> inbox_messages{0};
  std::unordered_map<std::uint64_t, std::shared_ptr<ReplySlot>> pending_requests;
  std::vector<char> goodbye_from;
  int goodbye_count = 0;
  bool stop_progress = false;

  std::mutex subs_mutex;
  std::condition_variable subs_cv;
  std::vector<SubscriptionEntry> subscriptions;
  std::atomic<std::size_t> subscription_count{0};
  std::uint64_t next_subscription_id = 1;
  std::uint64_t running_subscription = 0;
  std::thread::id dispatcher_id;

  std::atomic<int> spinning_drivers{0};
  std::atomic<bool> shutdown_started{false};
  std::atomic<bool> goodbye_sent{false};
  std::atomic<bool> shut_down{false};
  std::atomic<std::uint64_t> next_sequence{1};
  std::atomic<std::uint64_t> next_correlation{1};
  std::thread progress_thread;

  struct AtomicStats {
    std::atomic<std::uint64_t> sent_messages{0}, sent_bytes{0}, received_messages{0},
        received_bytes{0}, compressed_messages{0}, rejected_messages{0}, late_replies{0},
        handler_errors{0};
  } stats;
};

template <typename Ready>
bool BusCore::drive_until(Ready&& ready, Clock::time_point deadline, DirectReceive* direct) {
  // Spin while a reply is likely imminent, then yield, then sleep with growing intervals so a
  // long wait costs almost no CPU; while this thread spins the progress thread stands down.
  constexpr std::uint64_t kSpinRounds = 256;
  constexpr std::uint64_t kYieldRounds = 512;
  // Idle rounds 1 .. kSpinRounds - 1 spin, then up to kYieldRounds - 1 yield, then sleep.
  Backoff backoff(kSpinRounds - 1, kYieldRounds - kSpinRounds);
  auto sleep = std::chrono::microseconds(20);
  spinning_drivers.fetch_add(1, std::memory_order_acq_rel);
  struct Stand {
    std::atomic<int>& counter;
    bool active = true;
    ~Stand() {
      if (active) counter.fetch_sub(1, std::memory_order_acq_rel);
    }
  } spinning{spinning_drivers};

  std::uint64_t seen_generation = ~std::uint64_t{0};
  while (true) {
    const std::uint64_t generation = mail_generation.load(std::memory_order_acquire);
    const std::uint64_t idle_rounds = backoff.rounds();
    if (generation != seen_generation || idle_rounds % 64 == 0 || idle_rounds >= kYieldRounds) {
      // Waits on other threads' state (send queue, shutdown) are re-checked every 64 rounds.
      seen_generation = generation;
      {
        std::lock_guard lock(mail_mutex);
        if (ready()) return true;
      }
      if (Clock::now() >= deadline) return false;
    }
    bool progressed = false;
    if (!shut_down.load(std::memory_order_acquire) && progress_mutex.try_lock()) {
      std::lock_guard lock(progress_mutex, std::adopt_lock);
      direct_receive = direct;
      struct Clear {
        DirectReceive*& slot;
        ~Clear() { slot = nullptr; }
      } clear{direct_receive};
      progressed = progress_once();
    }
    if (direct != nullptr && direct->out->has_value()) return true;
    if (progressed) {
      backoff.reset();
      sleep = std::chrono::microseconds(20);
      continue;
    }
    const Backoff::Step step = backoff.next();
    if (step == Backoff::Step::kSpin) {
      cpu_relax();
      continue;
    }
    if (step == Backoff::Step::kYield) {
      std::this_thread::yield();
      continue;
    }
    // Sleeping: hand progress back to the progress thread until woken or the interval ends.
    spinning_drivers.fetch_sub(1, std::memory_order_acq_rel);
    spinning.active = false;
    {
      std::unique_lock lock(mail_mutex);
      if (progress_sleeping) progress_cv.notify_one();
      ++sleeping_drivers;
      const auto wake = std::min(deadline, Clock::now() + sleep);
      const bool ready_now = mail_cv.wait_until(lock, wake, [&] { return ready(); });
      --sleeping_drivers;
      if (ready_now) return true;
    }
    spinning_drivers.fetch_add(1, std::memory_order_acq_rel);
    spinning.active = true;
    sleep = std::min<std::chrono::microseconds>(sleep * 2, options.idle_sleep_max);
  }
}

}  // namespace unimsg::detail
