#include "unimsg/bus/bus.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <limits>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "unimsg/bus/mpi.hpp"
#include "unimsg/core/config.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/core/log.hpp"
#include "unimsg/core/wall_clock.hpp"

namespace unimsg {
namespace detail {
namespace {

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
// Envelope receives kept posted: a message that finds one posted is received without a probe
// (MPI_Improbe + MPI_Mrecv cost 1.5x a plain receive here). Slots are completed in the order
// posted, which is the order MPI matched them, so per-source order holds.
constexpr std::size_t kRingSlots = 32;
// The last message every rank sends to every other during shutdown.
constexpr Topic kTopicGoodbye = kReservedTopicBase + 1;
// Bounds on the work one progress round does, so that no caller is held up for long.
constexpr int kMaxReceivesPerRound = 64;
// Bulk payloads being received at once: more would only split the memory bandwidth between them
// and grow the buffer pool, without finishing any of them sooner.
constexpr std::size_t kMaxPendingPayloadBytes = 1ull << 20;

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

Clock::time_point deadline_after(std::chrono::nanoseconds timeout) {
  const auto now = Clock::now();
  if (timeout > Clock::time_point::max() - now) return Clock::time_point::max();
  return now + std::chrono::duration_cast<Clock::duration>(timeout);
}

std::string describe(const Header& header) {
  return std::string(to_string(header.kind)) + " topic " + std::to_string(header.topic);
}

}  // namespace

// Reuses large receive buffers: a fresh multi-megabyte allocation costs page faults and zeroing
// that would dominate a bulk transfer. Buffers return here when the last Message using them dies.
class BufferPool : public std::enable_shared_from_this<BufferPool> {
 public:
  static constexpr std::size_t kMinPooled = 64 * 1024;
  explicit BufferPool(std::size_t max_cached) : max_cached_(max_cached) {}

  std::shared_ptr<std::byte[]> acquire(std::size_t size) {
    if (size < kMinPooled)
      return std::make_shared_for_overwrite<std::byte[]>(std::max<std::size_t>(size, 1));
    std::unique_ptr<std::byte[]> storage;
    std::size_t capacity = size;
    {
      std::lock_guard lock(mutex_);
      // A cached buffer up to twice the size will do; of equal ones the last returned, which is
      // the most likely to be still in cache.
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first <= 2 * size) {
        it = std::prev(free_.upper_bound(it->first));
        capacity = it->first;
        storage = std::move(it->second);
        cached_ -= capacity;
        free_.erase(it);
      }
    }
    if (!storage) storage = std::make_unique_for_overwrite<std::byte[]>(capacity);
    std::byte* data = storage.get();
    auto recycle = [pool = weak_from_this(), capacity](std::byte* released) {
      std::unique_ptr<std::byte[]> owned(released);
      if (auto alive = pool.lock()) alive->give_back(std::move(owned), capacity);
    };
    storage.release();  // owned by `recycle` from here on
    return std::shared_ptr<std::byte[]>(data, std::move(recycle));
  }

 private:
  void give_back(std::unique_ptr<std::byte[]> storage, std::size_t capacity) {
    std::lock_guard lock(mutex_);
    if (cached_ + capacity > max_cached_) return;  // frees it
    cached_ += capacity;
    free_.emplace(capacity, std::move(storage));
  }

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
};

// One preposted envelope receive.
struct RingSlot {
  MPI_Request request = MPI_REQUEST_NULL;
  std::unique_ptr<std::byte[]> buffer = std::make_unique_for_overwrite<std::byte[]>(kPackedLimit);
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
  void accept_envelope(int source, std::span<const std::byte> wire);
  bool complete_receives();
  void accept_split(int source, PendingReceive& receive);
  void reject(int source, const std::string& reason);
  void count_received(const Header& header, std::uint64_t wire_bytes);

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
  std::size_t pending_payload_bytes = 0;
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

BusCore::BusCore(MPI_Comm parent, BusOptions opts) : comm(parent), options(std::move(opts)) {
  rank = comm.rank();
  size = comm.size();
  // Errors on the bus's own communicator become MpiError exceptions (and a truncated foreign
  // message a rejection), not an abort of the whole job.
  check_mpi(MPI_Comm_set_errhandler(comm.get(), MPI_ERRORS_RETURN), rank,
            "MPI_Comm_set_errhandler");
  log = options.logger ? options.logger : make_rank_logger(rank, size);
  if (options.max_payload_bytes > static_cast<std::uint64_t>(std::numeric_limits<int>::max())) {
    throw ConfigError(rank, "bus", "max_payload_bytes must be below 2 GiB (MPI counts are int)");
  }
  if (options.window_per_peer < 2) {
    throw ConfigError(rank, "bus", "window_per_peer must be at least 2");
  }
  limits.max_payload_bytes = options.max_payload_bytes;
  peers.resize(static_cast<std::size_t>(size));
  pending_receives.resize(static_cast<std::size_t>(size));
  goodbye_from.assign(static_cast<std::size_t>(size), 0);
  buffers = std::make_shared<BufferPool>(options.buffer_pool_bytes);

  check_wire_compatibility();

  int* tag_upper_bound = nullptr;
  int found = 0;
  check_mpi(MPI_Comm_get_attr(comm.get(), MPI_TAG_UB, &tag_upper_bound, &found), rank,
            "MPI_Comm_get_attr(MPI_TAG_UB)");
  const int tag_ub = found && tag_upper_bound ? *tag_upper_bound : 32767;
  payload_tag_span = std::min(1 << 20, tag_ub - kTagPayloadBase + 1);
  // No more slots than the inbox may hold: a posted slot receives whether anyone reads or not.
  ring.resize(
      static_cast<std::size_t>(std::clamp<std::uint64_t>(options.inbox_messages, 1, kRingSlots)));
  for (auto& slot : ring) post_ring_slot(slot);
}

// Every rank must speak the same wire format and envelope limit: the receive ring's buffers are
// kPackedLimit bytes, and Open MPI 4.1 (vader, single-copy) writes a longer message past the end
// of the receive buffer instead of truncating it. So each sender caps its envelopes, and here
// every rank checks, once, that every other one does the same.
void BusCore::check_wire_compatibility() {
  const std::array<int, 2> mine{kMessageVersion, static_cast<int>(kPackedLimit)};
  std::vector<int> all(2 * static_cast<std::size_t>(size));
  check_mpi(MPI_Allgather(mine.data(), 2, MPI_INT, all.data(), 2, MPI_INT, comm.get()), rank,
            "bus: MPI_Allgather");
  std::string different;
  for (int peer = 0; peer < size; ++peer) {
    const int version = all[2 * static_cast<std::size_t>(peer)];
    const int limit = all[2 * static_cast<std::size_t>(peer) + 1];
    if (version != mine[0] || limit != mine[1]) {
      different += (different.empty() ? "" : ", ") + std::string("rank ") + std::to_string(peer) +
                   " (version " + std::to_string(version) + ", envelope limit " +
                   std::to_string(limit) + ")";
    }
  }
  if (!different.empty()) {
    throw ConfigError(rank, "bus",
                      "ranks run incompatible unimsg builds: this rank has wire version " +
                          std::to_string(mine[0]) + " and envelope limit " +
                          std::to_string(mine[1]) + ", but " + different);
  }
}

BusCore::~BusCore() {
  if (progress_thread.joinable()) {
    {
      std::lock_guard lock(mail_mutex);
      stop_progress = true;
    }
    progress_cv.notify_all();
    progress_thread.join();
  }
}

void BusCore::check_open(const char* operation) const {
  if (goodbye_sent.load(std::memory_order_acquire)) {
    throw ShutdownError(rank, operation, "the bus has been shut down");
  }
}

void BusCore::check_payload(const Message& message, const char* operation) const {
  if (message.payload.size() > options.max_payload_bytes) {
    throw Error(rank, operation,
                "a payload of " + std::to_string(message.payload.size()) +
                    " bytes exceeds the maximum of " + std::to_string(options.max_payload_bytes) +
                    " (UNIMSG_BUS_MAX_PAYLOAD), which receivers would reject");
  }
}

void BusCore::check_topic(Topic topic, const char* operation) const {
  if (topic >= kReservedTopicBase) {
    throw Error(rank, operation,
                "topic " + std::to_string(topic) + " is reserved for the bus itself (topics from " +
                    std::to_string(kReservedTopicBase) + " up)");
  }
}

bool BusCore::route_ok(int source, const Header& header) {
  if (header.source != source) {
    reject(source, "header claims source rank " + std::to_string(header.source));
    return false;
  }
  if (header.destination != rank && header.destination != kBroadcast) {
    reject(source, "header names destination rank " + std::to_string(header.destination));
    return false;
  }
  return true;
}

Outgoing BusCore::prepare(int destination, const Message& message) {
  Outgoing out;
  out.destination = destination;
  out.priority = message.header.priority;
  out.sequence = message.header.sequence;
  out.counted = message.header.topic < kReservedTopicBase;
  out.header = encode_header(message.header, message.payload.bytes());
  if (kHeaderSize + message.payload.size() <= kPackedLimit) {
    out.packed_size = kHeaderSize + message.payload.size();
    auto packed = std::make_shared_for_overwrite<std::byte[]>(out.packed_size);
    std::memcpy(packed.get(), out.header.data(), kHeaderSize);
    if (!message.payload.empty()) {
      std::memcpy(packed.get() + kHeaderSize, message.payload.data(), message.payload.size());
    }
    out.packed = std::move(packed);
  } else {
    out.payload = message.payload;
  }
  return out;
}

void BusCore::send(int destination, Message message, bool internal) {
  if (destination < 0 || destination >= size) {
    throw Error(rank, "bus.send",
                "destination rank " + std::to_string(destination) + " is outside 0.." +
                    std::to_string(size - 1));
  }
  if (!internal) {
    check_open("bus.send");
    check_topic(message.header.topic, "bus.send");
    check_payload(message, "bus.send");
  }
  message.header.source = rank;
  message.header.destination = destination;
  message.header.sequence = next_sequence.fetch_add(1, std::memory_order_relaxed);
  message.header.timestamp_ns = clock.now_ns();
  if (destination == rank) {
    message.header.payload_length = message.payload.size();
    deliver(std::move(message));
    return;
  }
  if (options.compress_threshold != 0 && message.payload.size() >= options.compress_threshold) {
    message = compress(message);
    if (message.header.is_compressed()) stats.compressed_messages.fetch_add(1);
  }
  if (try_send_now(destination, message, internal)) return;
  std::vector<Outgoing> items;
  items.push_back(prepare(destination, message));
  enqueue(std::move(items), internal);
}

void BusCore::broadcast(Message message) {
  check_open("bus.broadcast");
  check_topic(message.header.topic, "bus.broadcast");
  check_payload(message, "bus.broadcast");
  message.header.source = rank;
  message.header.destination = kBroadcast;
  message.header.sequence = next_sequence.fetch_add(1, std::memory_order_relaxed);
  message.header.timestamp_ns = clock.now_ns();
  Message wire = message;
  if (options.compress_threshold != 0 && wire.payload.size() >= options.compress_threshold) {
    wire = compress(wire);
    if (wire.header.is_compressed()) stats.compressed_messages.fetch_add(1);
  }
  std::vector<Outgoing> items;
  if (size > 1) {
    // One encoding shared by every destination: the header names no single destination.
    const Outgoing first = prepare(0, wire);
    for (int peer = 0; peer < size; ++peer) {
      if (peer == rank) continue;
      Outgoing copy = first;
      copy.destination = peer;
      items.push_back(std::move(copy));
    }
    enqueue(std::move(items), false);
  }
  message.header.payload_length = message.payload.size();
  deliver(std::move(message));
}

void BusCore::wait_for_capacity(std::uint64_t bytes, std::uint64_t count) {
  const auto fits = [&] {
    const auto queued = queued_bytes.load(std::memory_order_acquire);
    const auto messages = queued_messages.load(std::memory_order_acquire);
    // A single message larger than the whole queue may go once the queue is empty.
    return (queued == 0 || queued + bytes <= options.send_queue_bytes) &&
           (messages == 0 || messages + count <= options.send_queue_messages);
  };
  if (fits()) return;
  if (!drive_until(fits, deadline_after(options.send_timeout))) {
    throw TimeoutError(rank, "bus.send",
                       "the send queue stayed full (" + std::to_string(queued_messages.load()) +
                           " messages, " + std::to_string(queued_bytes.load()) +
                           " bytes queued or in flight) for " +
                           std::to_string(options.send_timeout.count()) +
                           " ms: a receiver is not consuming its messages");
  }
}

void BusCore::enqueue(std::vector<Outgoing> items, bool internal) {
  std::uint64_t bytes = 0;
  for (const auto& item : items) bytes += item.wire_bytes();
  wait_for_capacity(bytes, items.size());
  std::lock_guard lock(progress_mutex);
  if (!internal) check_open("bus.send");
  for (auto& item : items) {
    send_queue[static_cast<std::size_t>(item.priority)].push_back(std::move(item));
  }
  add_guarded(queued_bytes, bytes);
  add_guarded(queued_messages, items.size());
  // Post right away: a message waits in the queue only while its peer's window is full.
  if (!in_flight.empty()) complete_sends();
  post_sends();
}

bool BusCore::post_sends() {
  bool posted = false;
  bool any_blocked = false;
  const std::uint64_t window = options.window_per_peer;
  for (int level = kPriorityLevels - 1; level >= 0; --level) {
    auto& queue = send_queue[static_cast<std::size_t>(level)];
    for (auto it = queue.begin(); it != queue.end();) {
      const int peer_rank = it->destination;
      PeerState& peer = peers[static_cast<std::size_t>(peer_rank)];
      const bool window_full = peer.posted - peer.confirmed >= window;
      if (window_full || (any_blocked && blocked_scratch[static_cast<std::size_t>(peer_rank)])) {
        // Later messages to this peer wait behind this one, so per-peer order holds.
        if (!any_blocked) blocked_scratch.assign(static_cast<std::size_t>(size), 0);
        any_blocked = true;
        blocked_scratch[static_cast<std::size_t>(peer_rank)] = 1;
        ++it;
        continue;
      }
      auto flight = take_spare_flight();
      flight->message = std::move(*it);
      it = queue.erase(it);
      post_flight(std::move(flight));
      posted = true;
    }
  }
  return posted;
}

std::unique_ptr<InFlight> BusCore::take_spare_flight() {
  if (spare_flights.empty()) return std::make_unique<InFlight>();
  auto flight = std::move(spare_flights.back());
  spare_flights.pop_back();
  flight->requests = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
  flight->synchronous = false;
  flight->inline_size = 0;
  return flight;
}

void BusCore::post_flight(std::unique_ptr<InFlight> flight) {
  Outgoing& out = flight->message;
  PeerState& peer = peers[static_cast<std::size_t>(out.destination)];
  const bool synchronising = next_post_synchronises(peer);
  ++peer.posted;
  if (synchronising) {
    flight->synchronous = true;
    flight->sync_mark = peer.posted;
    peer.last_sync_mark = peer.posted;
  }
  auto* send_fn = flight->synchronous ? &MPI_Issend : &MPI_Isend;
  if (flight->inline_size > 0 || out.packed) {
    const std::byte* data =
        flight->inline_size > 0 ? flight->inline_bytes.data() : out.packed.get();
    check_mpi(send_fn(data, static_cast<int>(flight->wire_bytes()), MPI_BYTE, out.destination,
                      kTagEnvelope, comm.get(), &flight->requests[0]),
              rank, "bus: MPI_Isend");
  } else {
    check_mpi(send_fn(out.header.data(), static_cast<int>(kHeaderSize), MPI_BYTE, out.destination,
                      kTagEnvelope, comm.get(), &flight->requests[0]),
              rank, "bus: MPI_Isend");
    const int tag = kTagPayloadBase + static_cast<int>(out.sequence % payload_tag_span);
    check_mpi(MPI_Isend(out.payload.data(), static_cast<int>(out.payload.size()), MPI_BYTE,
                        out.destination, tag, comm.get(), &flight->requests[1]),
              rank, "bus: MPI_Isend");
  }
  count_sent(out.counted, flight->wire_bytes());
  in_flight.push_back(std::move(flight));
}

bool BusCore::try_send_now(int destination, const Message& message, bool internal) {
  const std::size_t wire_size = kHeaderSize + message.payload.size();
  if (wire_size > kInlineBytes) return false;
  const std::unique_lock lock(progress_mutex, std::try_to_lock);
  if (!lock.owns_lock()) return false;
  if (!internal) check_open("bus.send");  // under the lock: nothing may follow our goodbye
  // Only when nothing waits in the queue (order) and the peer's window and our queue have room.
  for (const auto& queue : send_queue) {
    if (!queue.empty()) return false;
  }
  const PeerState& peer = peers[static_cast<std::size_t>(destination)];
  if (peer.posted - peer.confirmed >= options.window_per_peer) return false;
  const auto queued = queued_messages.load(std::memory_order_acquire);
  if (queued != 0 && queued + 1 > options.send_queue_messages) return false;
  // Earlier sends are completed by progress rounds, not here: testing them costs a pass through
  // MPI's progress engine on the latency path.
  if (in_flight.size() >= kMaxReceivesPerRound) complete_sends();

  const auto header = encode_header(message.header, message.payload.bytes());
  const auto pack_into = [&](std::byte* wire) {
    std::memcpy(wire, header.data(), kHeaderSize);
    if (!message.payload.empty()) {
      std::memcpy(wire + kHeaderSize, message.payload.data(), message.payload.size());
    }
  };
  PeerState& target = peers[static_cast<std::size_t>(destination)];
  if (!next_post_synchronises(target)) {
    // Not this peer's synchronising message: a blocking MPI_Send, which for a message this small
    // is an eager copy into the peer's queue (or MPI's own buffering) and returns at once, and
    // needs no request to allocate, test and free (0.05-0.2x of raw MPI's latency, measured).
    // While a full queue holds it up, MPI's progress drains ours, so two ranks sending to each
    // other cannot wedge.
    std::array<std::byte, kInlineBytes> wire;
    pack_into(wire.data());
    check_mpi(MPI_Send(wire.data(), static_cast<int>(wire_size), MPI_BYTE, destination,
                       kTagEnvelope, comm.get()),
              rank, "bus: MPI_Send");
    ++target.posted;
    count_sent(message.header.topic < kReservedTopicBase, wire_size);
    return true;
  }
  auto flight = take_spare_flight();
  pack_into(flight->inline_bytes.data());
  flight->inline_size = wire_size;
  flight->message.destination = destination;
  flight->message.priority = message.header.priority;
  flight->message.counted = message.header.topic < kReservedTopicBase;
  add_guarded(queued_bytes, wire_size);
  add_guarded(queued_messages, 1);
  // Completed by the next progress round: testing it here would cost one more pass through
  // MPI's progress engine on the latency path.
  post_flight(std::move(flight));
  return true;
}

bool BusCore::complete_sends() {
  bool completed = false;
  for (std::size_t i = 0; i < in_flight.size();) {
    InFlight& flight = *in_flight[i];
    int done = 0;
    check_mpi(MPI_Testall(2, flight.requests.data(), &done, MPI_STATUSES_IGNORE), rank,
              "bus: MPI_Testall");
    if (!done) {
      ++i;
      continue;
    }
    if (flight.synchronous) {
      PeerState& peer = peers[static_cast<std::size_t>(flight.message.destination)];
      peer.confirmed = std::max(peer.confirmed, flight.sync_mark);
    }
    sub_guarded(queued_bytes, flight.wire_bytes());
    sub_guarded(queued_messages, 1);
    flight.message = Outgoing{};  // releases the payload now
    if (spare_flights.size() < 64) spare_flights.push_back(std::move(in_flight[i]));
    in_flight[i] = std::move(in_flight.back());
    in_flight.pop_back();
    completed = true;
  }
  return completed;
}

void BusCore::count_sent(bool counted, std::uint64_t wire_bytes) {
  if (!counted) return;  // the bus's own messages stay out of the stats
  add_guarded(stats.sent_messages, 1);
  add_guarded(stats.sent_bytes, wire_bytes);
}

void BusCore::reject(int source, const std::string& reason) {
  stats.rejected_messages.fetch_add(1, std::memory_order_relaxed);
  log->warn("bus: rejected a message from rank {}: {}", source, reason);
}

void BusCore::count_received(const Header& header, std::uint64_t wire_bytes) {
  if (header.topic >= kReservedTopicBase) return;
  add_guarded(stats.received_messages, 1);
  add_guarded(stats.received_bytes, wire_bytes);
}

void BusCore::post_ring_slot(RingSlot& slot) {
  check_mpi(MPI_Irecv(slot.buffer.get(), static_cast<int>(kPackedLimit), MPI_BYTE, MPI_ANY_SOURCE,
                      kTagEnvelope, comm.get(), &slot.request),
            rank, "bus: MPI_Irecv");
}

void BusCore::accept_split(int source, PendingReceive& receive) {
  try {
    if (options.verify_bulk_payloads) {
      verify_payload(receive.wire_header, receive.header, {receive.buffer.get(), receive.size});
    }
    Message message;
    message.header = receive.header;
    message.payload =
        Payload(std::shared_ptr<const void>(receive.buffer), {receive.buffer.get(), receive.size});
    if (message.header.is_compressed()) message = decompress(message, limits);
    count_received(message.header, kHeaderSize + receive.size);
    deliver_received(std::move(message));
  } catch (const DecodeError& error) {
    reject(source, error.what());
  }
}

// One envelope off the ring: a packed message is decoded (its bytes copied out, so the slot can
// be posted again at once); a split message's header posts the receive of its payload.
void BusCore::accept_envelope(int source, std::span<const std::byte> wire) {
  auto& source_queue = pending_receives[static_cast<std::size_t>(source)];
  try {
    const Header header = decode_header(wire, limits);
    if (!route_ok(source, header)) return;
    const bool split = wire.size() == kHeaderSize && header.payload_length > 0 &&
                       kHeaderSize + header.payload_length > kPackedLimit;
    if (split) {
      PendingReceive pending;
      pending.header = header;
      std::memcpy(pending.wire_header.data(), wire.data(), kHeaderSize);
      pending.size = header.payload_length;
      pending.buffer = buffers->acquire(pending.size);
      const int tag = kTagPayloadBase + static_cast<int>(header.sequence % payload_tag_span);
      check_mpi(MPI_Irecv(pending.buffer.get(), static_cast<int>(pending.size), MPI_BYTE, source,
                          tag, comm.get(), &pending.request),
                rank, "bus: MPI_Irecv");
      pending_payload_bytes += pending.size;
      source_queue.push_back(std::move(pending));
      ++pending_receive_count;
      return;
    }
    const auto payload_bytes = wire.subspan(kHeaderSize);
    verify_payload(wire.first<kHeaderSize>(), header, payload_bytes);
    Message message;
    message.header = header;
    if (!payload_bytes.empty()) message.payload = Payload::copy_of(payload_bytes);
    if (message.header.is_compressed()) message = decompress(message, limits);
    count_received(message.header, wire.size());
    if (source_queue.empty()) {
      deliver_received(std::move(message));
      return;
    }
    // Earlier large messages from this source are still arriving: keep its order.
    PendingReceive pending;
    pending.ready = std::move(message);
    source_queue.push_back(std::move(pending));
    ++pending_receive_count;
  } catch (const DecodeError& error) {
    reject(source, error.what());
  }
}

bool BusCore::inbox_has_room() const {
  // Not enforced during shutdown, which must reach every peer's goodbye behind whatever nobody
  // will read.
  return (inbox_bytes.load(std::memory_order_acquire) < options.inbox_bytes &&
          inbox_messages.load(std::memory_order_acquire) < options.inbox_messages) ||
         goodbye_sent.load(std::memory_order_acquire);
}

bool BusCore::receive_messages() {
  // A full inbox stops receiving: no slot is posted again, so senders stall on their windows
  // (back-pressure).
  if (!ring_to_post.empty() && inbox_has_room()) {
    for (const std::size_t index : ring_to_post) post_ring_slot(ring[index]);
    ring_to_post.clear();
  }
  bool received = false;
  for (int round = 0; round < kMaxReceivesPerRound; ++round) {
    if (!inbox_has_room() || pending_payload_bytes >= kMaxPendingPayloadBytes) break;
    RingSlot& slot = ring[ring_head];
    if (slot.request == MPI_REQUEST_NULL) break;  // consumed, waiting to be posted again
    int done = 0;
    MPI_Status status;
    const int rc = MPI_Test(&slot.request, &done, &status);
    if (rc != MPI_SUCCESS) {
      // With MPI_ERRORS_RETURN a failed receive completes with its error: reject it and post
      // the slot again. (Senders never exceed the slot size: see check_wire_compatibility.)
      int error_class = 0;
      MPI_Error_class(rc, &error_class);
      if (error_class != MPI_ERR_TRUNCATE) check_mpi(rc, rank, "bus: MPI_Test");
      slot.request = MPI_REQUEST_NULL;
      reject(status.MPI_SOURCE, "an envelope that MPI failed to receive (error class " +
                                    std::to_string(error_class) + ")");
      ring_to_post.push_back(ring_head);
      ring_head = (ring_head + 1) % ring.size();
      received = true;
      continue;
    }
    if (!done) break;
    received = true;
    int count = 0;
    MPI_Get_count(&status, MPI_BYTE, &count);
    const std::uint64_t generation = mail_generation.load(std::memory_order_relaxed);
    const bool was_served = direct_receive != nullptr && direct_receive->out->has_value();
    accept_envelope(status.MPI_SOURCE,
                    {slot.buffer.get(), static_cast<std::size_t>(std::max(count, 0))});
    ring_to_post.push_back(ring_head);
    ring_head = (ring_head + 1) % ring.size();
    const bool waiter_may_be_ready =
        (direct_receive != nullptr && direct_receive->out->has_value() && !was_served) ||
        (spinning_drivers.load(std::memory_order_relaxed) > 0 &&
         mail_generation.load(std::memory_order_relaxed) != generation);
    if (waiter_may_be_ready && !served_waiter_last_round) {
      served_waiter = true;
      break;
    }
  }
  return received;
}

bool BusCore::complete_receives() {
  if (pending_receive_count == 0) return false;
  bool completed = false;
  for (int source = 0; source < size; ++source) {
    auto& queue = pending_receives[static_cast<std::size_t>(source)];
    while (!queue.empty()) {
      PendingReceive& head = queue.front();
      if (!head.ready) {
        int done = 0;
        check_mpi(MPI_Test(&head.request, &done, MPI_STATUS_IGNORE), rank, "bus: MPI_Test");
        if (!done) break;
        pending_payload_bytes -= head.size;
      }
      PendingReceive pending = std::move(head);
      queue.pop_front();
      --pending_receive_count;
      completed = true;
      if (pending.ready) {
        deliver_received(std::move(*pending.ready));
      } else {
        accept_split(source, pending);
      }
    }
  }
  return completed;
}

bool BusCore::progress_once() {
  // Receives first: a waiting thread is most often waiting for one.
  bool progressed = receive_messages();
  served_waiter_last_round = served_waiter;
  if (std::exchange(served_waiter, false)) return true;
  progressed |= complete_receives();
  if (!in_flight.empty()) progressed |= complete_sends();
  if (queued_messages.load(std::memory_order_relaxed) > in_flight.size()) {
    progressed |= post_sends();
  }
  return progressed;
}

bool BusCore::has_subscriber(const Header& header) {
  if (subscription_count.load(std::memory_order_acquire) == 0) return false;
  std::lock_guard lock(subs_mutex);
  return std::any_of(subscriptions.begin(), subscriptions.end(),
                     [&](const SubscriptionEntry& entry) { return entry.filter.matches(header); });
}

void BusCore::deliver(Message message) {
  const Header& header = message.header;
  if (header.kind == Kind::kControl && header.topic == kTopicGoodbye) {
    std::lock_guard lock(mail_mutex);
    auto& seen = goodbye_from[static_cast<std::size_t>(header.source)];
    if (!seen) {
      seen = 1;
      ++goodbye_count;
    }
    add_guarded(mail_generation, 1);
    if (sleeping_drivers > 0) mail_cv.notify_all();
    return;
  }
  if (header.is_reply()) {
    std::lock_guard lock(mail_mutex);
    const auto it = pending_requests.find(header.correlation);
    if (it == pending_requests.end()) {
      stats.late_replies.fetch_add(1, std::memory_order_relaxed);
      log->debug("bus: reply from rank {} to correlation {} came after its request ended",
                 header.source, header.correlation);
      return;
    }
    ReplySlot& slot = *it->second;
    if ((header.flags & flags::kErrorReply) != 0) {
      slot.error = "rank " + std::to_string(header.source) +
                   " answered with an error: " + std::string(message.payload.as_string());
    } else {
      slot.reply = std::move(message);
    }
    slot.done = true;
    pending_requests.erase(it);
    add_guarded(mail_generation, 1);
    if (sleeping_drivers > 0) mail_cv.notify_all();
    return;
  }
  const bool subscribed = has_subscriber(header);
  to_inbox(std::move(message), subscribed);
}

void BusCore::to_inbox(Message message, bool subscribed) {
  bool wake_drivers = false;
  bool wake_progress = false;
  {
    std::lock_guard lock(mail_mutex);
    add_guarded(inbox_bytes, message.payload.size());
    add_guarded(inbox_messages, 1);
    (subscribed ? dispatch_queue : mailbox).push_back(std::move(message));
    add_guarded(mail_generation, 1);
    wake_drivers = !subscribed && sleeping_drivers > 0;
    wake_progress = subscribed && progress_sleeping;
  }
  if (wake_drivers) mail_cv.notify_all();
  if (wake_progress) progress_cv.notify_one();
}

// Called by the thread driving progress. When that thread waits in receive() for this very
// message, it takes it here: no mailbox, no second lock, no wake-up (the mailbox hand-over was a
// quarter of the bus's own time per message on the latency path). Only when nothing older could
// match first: the inbox is empty and no subscription wants the message.
void BusCore::deliver_received(Message message) {
  const Header& header = message.header;
  DirectReceive* waiter = direct_receive;
  const bool for_waiter = waiter != nullptr && !waiter->out->has_value() && !header.is_reply() &&
                          !(header.kind == Kind::kControl && header.topic == kTopicGoodbye) &&
                          waiter->filter->matches(header) &&
                          inbox_messages.load(std::memory_order_acquire) == 0;
  if (!for_waiter) {
    deliver(std::move(message));
  } else if (has_subscriber(header)) {
    to_inbox(std::move(message), true);
  } else {
    waiter->out->emplace(std::move(message));
  }
}

void BusCore::run_handlers(Message message) {
  std::vector<SubscriptionEntry> matching;
  {
    std::lock_guard lock(subs_mutex);
    for (const auto& entry : subscriptions) {
      if (entry.filter.matches(message.header)) matching.push_back(entry);
    }
  }
  if (matching.empty()) {
    // Its subscription ended before it ran: keep it for receive().
    {
      std::lock_guard lock(mail_mutex);
      add_guarded(inbox_bytes, message.payload.size());
      add_guarded(inbox_messages, 1);
      mailbox.push_back(std::move(message));
      add_guarded(mail_generation, 1);
    }
    mail_cv.notify_all();  // rare: the subscription ended while the message was queued
    return;
  }
  for (const auto& entry : matching) {
    {
      std::lock_guard lock(subs_mutex);
      const bool still_subscribed =
          std::any_of(subscriptions.begin(), subscriptions.end(),
                      [&](const SubscriptionEntry& e) { return e.id == entry.id; });
      if (!still_subscribed) continue;
      running_subscription = entry.id;
    }
    try {
      (*entry.handler)(message);
    } catch (const std::exception& error) {
      stats.handler_errors.fetch_add(1, std::memory_order_relaxed);
      log->error("bus: handler for {} from rank {} threw: {}", describe(message.header),
                 message.header.source, error.what());
    }
    {
      std::lock_guard lock(subs_mutex);
      running_subscription = 0;
    }
    subs_cv.notify_all();
  }
}

template <typename Ready>
bool BusCore::drive_until(Ready&& ready, Clock::time_point deadline, DirectReceive* direct) {
  // Spin while a reply is likely imminent, then yield, then sleep with growing intervals so a
  // long wait costs almost no CPU; while this thread spins the progress thread stands down.
  constexpr int kSpinRounds = 256;
  constexpr int kYieldRounds = 512;
  int idle_rounds = 0;
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
      idle_rounds = 0;
      sleep = std::chrono::microseconds(20);
      continue;
    }
    ++idle_rounds;
    if (idle_rounds < kSpinRounds) {
      cpu_relax();
      continue;
    }
    if (idle_rounds < kYieldRounds) {
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

void BusCore::progress_thread_main() {
  {
    std::lock_guard lock(subs_mutex);
    dispatcher_id = std::this_thread::get_id();
  }
  int idle_rounds = 0;
  auto sleep = std::chrono::microseconds(20);
  while (true) {
    std::optional<Message> job;
    {
      std::lock_guard lock(mail_mutex);
      if (!dispatch_queue.empty()) {
        job = std::move(dispatch_queue.front());
        dispatch_queue.pop_front();
        sub_guarded(inbox_bytes, job->payload.size());
        sub_guarded(inbox_messages, 1);
      } else if (stop_progress) {
        return;
      }
    }
    if (job) {
      run_handlers(std::move(*job));
      idle_rounds = 0;
      continue;
    }
    bool progressed = false;
    try {
      if (spinning_drivers.load(std::memory_order_acquire) == 0 &&
          !shut_down.load(std::memory_order_acquire) && progress_mutex.try_lock()) {
        std::lock_guard lock(progress_mutex, std::adopt_lock);
        progressed = progress_once();
      }
    } catch (const std::exception& error) {
      log->error("bus: progress failed: {}", error.what());
      std::this_thread::sleep_for(options.idle_sleep_max);  // no tight loop of the same error
    }
    if (progressed) {
      idle_rounds = 0;
      sleep = std::chrono::microseconds(20);
      continue;
    }
    if (++idle_rounds < 8) {
      std::this_thread::yield();
      continue;
    }
    std::unique_lock lock(mail_mutex);
    progress_sleeping = true;
    progress_cv.wait_for(lock, sleep, [&] { return !dispatch_queue.empty() || stop_progress; });
    progress_sleeping = false;
    // Each wake-up costs two context switches. With no subscription to serve and nothing of ours
    // to send, nobody is waiting on this thread (a thread that waits drives progress itself), so
    // it may sleep ten times longer.
    const bool serving = subscription_count.load(std::memory_order_acquire) > 0 ||
                         queued_messages.load(std::memory_order_acquire) > 0;
    sleep = std::min<std::chrono::microseconds>(
        sleep * 2, serving ? options.idle_sleep_max : options.idle_sleep_max * 10);
  }
}

void BusCore::unsubscribe(std::uint64_t id) {
  std::unique_lock lock(subs_mutex);
  const auto it = std::find_if(subscriptions.begin(), subscriptions.end(),
                               [&](const SubscriptionEntry& entry) { return entry.id == id; });
  if (it == subscriptions.end()) return;
  subscriptions.erase(it);
  subscription_count.fetch_sub(1, std::memory_order_acq_rel);
  if (std::this_thread::get_id() != dispatcher_id) {
    subs_cv.wait(lock, [&] { return running_subscription != id; });
  }
}

void BusCore::shutdown() {
  if (shutdown_started.exchange(true)) return;
  const auto deadline = deadline_after(options.shutdown_timeout);
  // 1. Everything this rank queued leaves, then the goodbye goes last to every peer: MPI keeps
  //    per-peer order, so a peer that has our goodbye has everything we sent.
  drive_until([&] { return queued_messages.load() == 0; }, deadline);
  goodbye_sent.store(true, std::memory_order_release);
  for (int peer = 0; peer < size; ++peer) {
    if (peer == rank) continue;
    send(peer, Message::make(Kind::kControl, kTopicGoodbye), true);
  }
  // 2. Keep receiving until every peer's goodbye is in and ours have left.
  const bool clean = drive_until(
      [&] { return goodbye_count == size - 1 && queued_messages.load() == 0; }, deadline);
  if (!clean) {
    std::string missing;
    for (int peer = 0; peer < size; ++peer) {
      if (peer != rank && !goodbye_from[static_cast<std::size_t>(peer)]) {
        missing += (missing.empty() ? "" : ", ") + std::to_string(peer);
      }
    }
    log->error(
        "bus.shutdown: gave up after {} ms; no goodbye from rank(s) [{}], {} message(s) of "
        "ours not delivered",
        options.shutdown_timeout.count(), missing, queued_messages.load());
  }
  // 3. Let the progress thread run the handlers still queued, then stop it.
  {
    std::lock_guard lock(mail_mutex);
    stop_progress = true;
  }
  progress_cv.notify_all();
  if (progress_thread.joinable()) progress_thread.join();
  shut_down.store(true, std::memory_order_release);
  // 4. Nobody can answer any more.
  {
    std::lock_guard lock(mail_mutex);
    for (auto& [correlation, slot] : pending_requests) {
      slot->error =
          "the bus shut down before rank " + std::to_string(slot->destination) + " replied";
      slot->failed_by_shutdown = true;
      slot->done = true;
    }
    pending_requests.clear();
  }
  mail_cv.notify_all();
  std::lock_guard lock(progress_mutex);
  for (auto& queue : pending_receives) {
    for (auto& pending : queue) {
      if (pending.request == MPI_REQUEST_NULL) continue;
      MPI_Cancel(&pending.request);
      MPI_Wait(&pending.request, MPI_STATUS_IGNORE);
    }
    queue.clear();
  }
  for (auto& slot : ring) {
    if (slot.request == MPI_REQUEST_NULL) continue;
    MPI_Cancel(&slot.request);
    MPI_Wait(&slot.request, MPI_STATUS_IGNORE);
  }
  for (auto& flight : in_flight) {
    for (auto& request : flight->requests) {
      if (request != MPI_REQUEST_NULL) MPI_Request_free(&request);
    }
  }
}

}  // namespace detail

using detail::BusCore;
using detail::Clock;

BusOptions BusOptions::from_env() {
  BusOptions options;
  constexpr std::uint64_t kMaxInt = static_cast<std::uint64_t>(std::numeric_limits<int>::max());
  constexpr std::uint64_t kHuge = std::uint64_t{1} << 50;
  if (auto v = env_size("UNIMSG_BUS_MAX_PAYLOAD", 0, kMaxInt - kHeaderSize)) {
    options.max_payload_bytes = *v;
  }
  if (auto v = env_size("UNIMSG_BUS_SEND_QUEUE_BYTES", 1, kHuge)) options.send_queue_bytes = *v;
  if (auto v = env_uint("UNIMSG_BUS_SEND_QUEUE_MESSAGES", 1, kHuge)) {
    options.send_queue_messages = *v;
  }
  if (auto v = env_size("UNIMSG_BUS_INBOX_BYTES", 1, kHuge)) options.inbox_bytes = *v;
  if (auto v = env_uint("UNIMSG_BUS_INBOX_MESSAGES", 1, kHuge)) options.inbox_messages = *v;
  if (auto v = env_size("UNIMSG_BUS_BUFFER_POOL_BYTES", 0, kHuge)) options.buffer_pool_bytes = *v;
  if (auto v = env_uint("UNIMSG_BUS_WINDOW", 2, 1u << 20)) {
    options.window_per_peer = static_cast<std::uint32_t>(*v);
  }
  if (auto v = env_size("UNIMSG_BUS_COMPRESS_THRESHOLD", 0, kHuge)) {
    options.compress_threshold = *v;
  }
  if (auto v = env_bool("UNIMSG_BUS_VERIFY_BULK")) options.verify_bulk_payloads = *v;
  if (auto v = env_uint("UNIMSG_BUS_IDLE_SLEEP_US", 20, 1000000)) {
    options.idle_sleep_max = std::chrono::microseconds(*v);
  }
  if (auto v = env_uint("UNIMSG_BUS_SEND_TIMEOUT_MS", 1, kHuge)) {
    options.send_timeout = std::chrono::milliseconds(*v);
  }
  if (auto v = env_uint("UNIMSG_BUS_SHUTDOWN_TIMEOUT_MS", 1, kHuge)) {
    options.shutdown_timeout = std::chrono::milliseconds(*v);
  }
  return options;
}

Bus::Bus(MPI_Comm parent, BusOptions options)
    : core_(std::make_shared<BusCore>(parent, std::move(options))) {
  core_->progress_thread = std::thread([core = core_.get()] { core->progress_thread_main(); });
}

Bus::~Bus() {
  try {
    core_->shutdown();
  } catch (const std::exception& error) {
    core_->log->error("bus: shutdown failed: {}", error.what());
  }
}

int Bus::rank() const noexcept {
  return core_->rank;
}
int Bus::size() const noexcept {
  return core_->size;
}
const BusOptions& Bus::options() const noexcept {
  return core_->options;
}

void Bus::send(int destination, Message message) {
  core_->send(destination, std::move(message), false);
}

void Bus::broadcast(Message message) {
  core_->broadcast(std::move(message));
}

void Bus::publish(Topic topic, Message message) {
  message.header.topic = topic;
  core_->broadcast(std::move(message));
}

Subscription Bus::subscribe(Filter filter, Handler handler) {
  if (!handler) throw Error(core_->rank, "bus.subscribe", "the handler is empty");
  std::uint64_t id = 0;
  {
    std::lock_guard lock(core_->subs_mutex);
    id = core_->next_subscription_id++;
    core_->subscriptions.push_back(
        {id, std::move(filter), std::make_shared<Handler>(std::move(handler))});
    core_->subscription_count.fetch_add(1, std::memory_order_acq_rel);
  }
  // Messages that reached the mailbox before this subscription existed are its to handle.
  {
    std::lock_guard lock(core_->mail_mutex);
    std::lock_guard subs_lock(core_->subs_mutex);
    const auto& added = core_->subscriptions.back().filter;
    for (auto it = core_->mailbox.begin(); it != core_->mailbox.end();) {
      if (added.matches(it->header)) {
        core_->dispatch_queue.push_back(std::move(*it));
        it = core_->mailbox.erase(it);
      } else {
        ++it;
      }
    }
  }
  core_->progress_cv.notify_all();
  return Subscription(core_, id);
}

std::optional<Message> Bus::try_receive(const Filter& filter) {
  std::lock_guard lock(core_->mail_mutex);
  auto& mailbox = core_->mailbox;
  const auto it = std::find_if(mailbox.begin(), mailbox.end(),
                               [&](const Message& m) { return filter.matches(m.header); });
  if (it == mailbox.end()) return std::nullopt;
  Message message = std::move(*it);
  mailbox.erase(it);
  detail::sub_guarded(core_->inbox_bytes, message.payload.size());
  detail::sub_guarded(core_->inbox_messages, 1);
  return message;
}

Message Bus::receive(const Filter& filter, std::chrono::nanoseconds timeout) {
  std::optional<Message> found;
  auto& mailbox = core_->mailbox;
  const auto take = [&] {
    const auto it = std::find_if(mailbox.begin(), mailbox.end(),
                                 [&](const Message& m) { return filter.matches(m.header); });
    if (it == mailbox.end()) return false;
    found = std::move(*it);
    if (it == mailbox.begin()) {
      mailbox.pop_front();  // the common case, and much cheaper than erase()
    } else {
      mailbox.erase(it);
    }
    detail::sub_guarded(core_->inbox_bytes, found->payload.size());
    detail::sub_guarded(core_->inbox_messages, 1);
    return true;
  };
  if (core_->shut_down.load()) {
    std::lock_guard lock(core_->mail_mutex);
    if (take()) return std::move(*found);
    throw ShutdownError(core_->rank, "bus.receive", "the bus has been shut down");
  }
  detail::DirectReceive direct{&filter, &found};
  const bool got = core_->drive_until(take, detail::deadline_after(timeout), &direct);
  if (!got) {
    std::string what = "no message";
    if (filter.kind) what += std::string(" of kind ") + to_string(*filter.kind);
    if (filter.topic) what += " on topic " + std::to_string(*filter.topic);
    if (filter.source) what += " from rank " + std::to_string(*filter.source);
    throw TimeoutError(
        core_->rank, "bus.receive",
        what + " within " +
            std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(timeout).count()) +
            " ms");
  }
  return std::move(*found);
}

PendingReply Bus::request(int destination, Message message, std::chrono::nanoseconds timeout) {
  auto slot = std::make_shared<detail::ReplySlot>();
  const std::uint64_t correlation = core_->next_correlation.fetch_add(1);
  message.header.correlation = correlation;
  message.header.flags &= ~(flags::kReply | flags::kErrorReply);
  slot->destination = destination;
  slot->request = message.header;
  slot->deadline = detail::deadline_after(timeout);
  {
    std::lock_guard lock(core_->mail_mutex);
    core_->pending_requests.emplace(correlation, slot);
  }
  try {
    core_->send(destination, std::move(message), false);
  } catch (...) {
    std::lock_guard lock(core_->mail_mutex);
    core_->pending_requests.erase(correlation);
    throw;
  }
  return PendingReply(core_, std::move(slot));
}

void Bus::reply(const Header& request, Message response) {
  response.header.correlation = request.correlation;
  response.header.flags |= flags::kReply;
  core_->send(request.source, std::move(response), false);
}

void Bus::reply_error(const Header& request, std::string error_text) {
  Message response = Message::make(request.kind, request.topic, Payload::from_string(error_text));
  response.header.flags |= flags::kErrorReply;
  reply(request, std::move(response));
}

void Bus::flush(std::chrono::nanoseconds timeout) {
  if (!core_->drive_until([&] { return core_->queued_messages.load() == 0; },
                          detail::deadline_after(timeout))) {
    throw TimeoutError(
        core_->rank, "bus.flush",
        std::to_string(core_->queued_messages.load()) + " message(s) still queued or in flight");
  }
}

void Bus::shutdown() {
  core_->shutdown();
}

BusStats Bus::stats() const {
  const auto& s = core_->stats;
  BusStats out;
  out.sent_messages = s.sent_messages.load();
  out.sent_bytes = s.sent_bytes.load();
  out.received_messages = s.received_messages.load();
  out.received_bytes = s.received_bytes.load();
  out.compressed_messages = s.compressed_messages.load();
  out.rejected_messages = s.rejected_messages.load();
  out.late_replies = s.late_replies.load();
  out.handler_errors = s.handler_errors.load();
  return out;
}

void Bus::send_raw_for_testing(int destination, std::span<const std::byte> bytes) {
  if (bytes.size() > detail::kPackedLimit) {
    throw Error(core_->rank, "bus.send_raw_for_testing",
                "raw envelopes are limited to " + std::to_string(detail::kPackedLimit) +
                    " bytes, as every sender's are");
  }
  detail::Outgoing out;
  out.destination = destination;
  out.priority = Priority::kNormal;
  auto packed = std::make_shared_for_overwrite<std::byte[]>(std::max<std::size_t>(bytes.size(), 1));
  if (!bytes.empty()) std::memcpy(packed.get(), bytes.data(), bytes.size());
  out.packed = std::move(packed);
  out.packed_size = bytes.size();
  std::vector<detail::Outgoing> items;
  items.push_back(std::move(out));
  core_->enqueue(std::move(items), false);
}

// --- Subscription

Subscription::Subscription(std::weak_ptr<detail::BusCore> core, std::uint64_t id)
    : core_(std::move(core)), id_(id) {}

Subscription::~Subscription() {
  reset();
}

Subscription::Subscription(Subscription&& other) noexcept
    : core_(std::move(other.core_)), id_(std::exchange(other.id_, 0)) {}

Subscription& Subscription::operator=(Subscription&& other) noexcept {
  if (this != &other) {
    reset();
    core_ = std::move(other.core_);
    id_ = std::exchange(other.id_, 0);
  }
  return *this;
}

void Subscription::reset() {
  if (id_ == 0) return;
  if (auto core = core_.lock()) core->unsubscribe(id_);
  id_ = 0;
  core_.reset();
}

// --- PendingReply

PendingReply::PendingReply(std::shared_ptr<detail::BusCore> core,
                           std::shared_ptr<detail::ReplySlot> slot)
    : core_(std::move(core)), slot_(std::move(slot)) {}

std::uint64_t PendingReply::correlation() const noexcept {
  return slot_ ? slot_->request.correlation : 0;
}

bool PendingReply::ready() const {
  if (!slot_) return false;
  std::lock_guard lock(core_->mail_mutex);
  return slot_->done;
}

Message PendingReply::get() {
  if (!slot_) throw Error(kNoRank, "bus.request", "get() on an empty PendingReply");
  auto& slot = *slot_;
  const bool arrived = core_->shut_down.load()
                           ? [&] {
                               std::lock_guard lock(core_->mail_mutex);
                               return slot.done;
                             }()
                           : core_->drive_until([&] { return slot.done; }, slot.deadline);
  const std::string what = std::string("request ") + detail::describe(slot.request) + " to rank " +
                           std::to_string(slot.destination) + " (correlation " +
                           std::to_string(slot.request.correlation) + ")";
  if (!arrived) {
    std::lock_guard lock(core_->mail_mutex);
    core_->pending_requests.erase(slot.request.correlation);
    if (!slot.done) {
      throw TimeoutError(core_->rank, "bus.request", what + ": no reply before the deadline");
    }
  }
  std::lock_guard lock(core_->mail_mutex);
  if (slot.failed_by_shutdown)
    throw ShutdownError(core_->rank, "bus.request", what + ": " + slot.error);
  if (!slot.error.empty()) throw Error(core_->rank, "bus.request", what + ": " + slot.error);
  if (!slot.reply) throw Error(core_->rank, "bus.request", what + ": reply already taken");
  Message reply = std::move(*slot.reply);
  slot.reply.reset();
  return reply;
}

}  // namespace unimsg
