#pragma once

// The message bus: every rank's services talk through one Bus, routed over MPI on a
// communicator of its own.
//
// Threading model (docs/architecture.md has the measurements behind it): a thread that waits on
// the bus (receive, a request's reply, a full send queue) drives MPI progress itself, so a reply
// costs no thread hand-off. A background progress thread serves subscriptions and peers while
// nobody waits, and backs off to sleeping when the bus is idle.

#include <mpi.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "unimsg/message/message.hpp"

namespace spdlog {
class logger;
}

namespace unimsg {

struct BusOptions {
  // Largest payload accepted off the wire (UNIMSG_BUS_MAX_PAYLOAD, e.g. "256M").
  std::uint64_t max_payload_bytes = 256ull << 20;
  // Bytes and messages queued or in flight from this rank; send() blocks beyond them
  // (UNIMSG_BUS_SEND_QUEUE_BYTES, UNIMSG_BUS_SEND_QUEUE_MESSAGES).
  std::uint64_t send_queue_bytes = 512ull << 20;
  std::uint64_t send_queue_messages = 65536;
  // Bytes and messages received but not yet consumed; beyond them this rank stops receiving,
  // which stalls its senders (UNIMSG_BUS_INBOX_BYTES, UNIMSG_BUS_INBOX_MESSAGES).
  std::uint64_t inbox_bytes = 512ull << 20;
  std::uint64_t inbox_messages = 65536;
  // Large receive buffers kept for reuse once their messages are gone
  // (UNIMSG_BUS_BUFFER_POOL_BYTES); 0 disables the pool.
  std::uint64_t buffer_pool_bytes = 256ull << 20;
  // Messages to one peer that may be outstanding before its receipt is confirmed
  // (UNIMSG_BUS_WINDOW). Bounds what a slow receiver buffers for each sender.
  std::uint32_t window_per_peer = 256;
  // Payloads of at least this many bytes are zstd-compressed when that makes them smaller;
  // 0 turns compression off (UNIMSG_BUS_COMPRESS_THRESHOLD).
  std::uint64_t compress_threshold = 0;
  // Whether the checksums of payloads sent apart from their header (over 16 KiB) are verified
  // (UNIMSG_BUS_VERIFY_BULK=0 turns it off). Headers and small messages are always verified.
  // Verification runs on the receiving thread after the copy and costs about a fifth of the bulk
  // throughput, which a job on a transport that already guarantees integrity (MPI's) may choose
  // not to pay, as Kafka consumers may with check.crcs.
  bool verify_bulk_payloads = true;
  // Longest sleep of an idle progress thread (UNIMSG_BUS_IDLE_SLEEP_US): bounds the latency of
  // a message nobody waits for on an idle rank, and sets the idle CPU cost.
  std::chrono::microseconds idle_sleep_max{2000};
  // How long send() may block on a full queue (UNIMSG_BUS_SEND_TIMEOUT_MS).
  std::chrono::milliseconds send_timeout{120000};
  // How long shutdown() waits for peers to flush (UNIMSG_BUS_SHUTDOWN_TIMEOUT_MS).
  std::chrono::milliseconds shutdown_timeout{60000};
  // Where the bus logs; a rank-prefixed stderr logger when null.
  std::shared_ptr<spdlog::logger> logger;

  // Defaults overridden by the UNIMSG_BUS_* variables above; a bad value is a ConfigError.
  static BusOptions from_env();
};

// Selects messages by kind, topic and source; an empty field matches anything.
struct Filter {
  std::optional<Kind> kind;
  std::optional<Topic> topic;
  std::optional<int> source;

  bool matches(const Header& header) const noexcept {
    return (!kind || *kind == header.kind) && (!topic || *topic == header.topic) &&
           (!source || *source == header.source);
  }
};

struct BusStats {
  std::uint64_t sent_messages = 0;
  std::uint64_t sent_bytes = 0;  // wire bytes, headers included
  std::uint64_t received_messages = 0;
  std::uint64_t received_bytes = 0;
  std::uint64_t compressed_messages = 0;
  std::uint64_t rejected_messages = 0;  // failed decode or came from the wrong rank
  std::uint64_t late_replies = 0;       // replies whose request had already timed out
  std::uint64_t handler_errors = 0;     // exceptions thrown by subscription handlers
  std::uint64_t pending_requests = 0;   // requests sent whose reply has not come yet
};

using Handler = std::function<void(const Message&)>;

class Bus;
namespace detail {
struct BusCore;
struct ReplySlot;
}  // namespace detail

// Ends a subscription when destroyed; waits for a running handler to return first (unless it is
// destroyed from inside that handler).
class Subscription {
 public:
  Subscription() = default;
  ~Subscription();
  Subscription(Subscription&& other) noexcept;
  Subscription& operator=(Subscription&& other) noexcept;
  Subscription(const Subscription&) = delete;
  Subscription& operator=(const Subscription&) = delete;
  void reset();

 private:
  friend class Bus;
  Subscription(std::weak_ptr<detail::BusCore> core, std::uint64_t id);
  std::weak_ptr<detail::BusCore> core_;
  std::uint64_t id_ = 0;
};

// The reply to a request. get() waits (driving progress) until the reply arrives or the request's
// deadline passes, then throws TimeoutError naming the peer, kind, topic and correlation id.
// The reply to one request. Dropping it unanswered withdraws the request: a reply that comes
// later counts as late (BusStats::late_replies) instead of being kept for nobody.
class PendingReply {
 public:
  PendingReply() = default;
  ~PendingReply();
  PendingReply(PendingReply&& other) noexcept = default;
  PendingReply& operator=(PendingReply&& other) noexcept;
  PendingReply(const PendingReply&) = delete;
  PendingReply& operator=(const PendingReply&) = delete;
  Message get();
  bool ready() const;
  std::uint64_t correlation() const noexcept;

 private:
  friend class Bus;
  PendingReply(std::shared_ptr<detail::BusCore> core, std::shared_ptr<detail::ReplySlot> slot);
  void withdraw() noexcept;
  std::shared_ptr<detail::BusCore> core_;
  std::shared_ptr<detail::ReplySlot> slot_;
};

class Bus {
 public:
  // Duplicates `parent`, so bus traffic never matches the program's own MPI messages.
  Bus(MPI_Comm parent, BusOptions options);
  ~Bus();
  Bus(const Bus&) = delete;
  Bus& operator=(const Bus&) = delete;

  int rank() const noexcept;
  int size() const noexcept;

  // Queues `message` for `destination` (this rank included) and returns; blocks only while the
  // send queue is full. Messages from one rank on one topic arrive in the order sent (among
  // messages of one priority: a higher priority may overtake queued lower ones; heartbeats on
  // the express path, subscribe_express, keep order only among themselves).
  void send(int destination, Message message);
  // To every rank, this one included.
  void broadcast(Message message);
  // broadcast() with the topic set.
  void publish(Topic topic, Message message);

  // `handler` runs on the bus's progress thread, one message at a time, in arrival order.
  // Messages that no subscription matches go to the mailbox, read by receive().
  Subscription subscribe(Filter filter, Handler handler);
  // Heartbeats, heard apart from everything else (the express path, docs/architecture.md): a
  // heartbeat of at most 192 payload bytes that is no request or reply travels on receives of
  // its own that neither a full inbox nor a blocked handler holds up, and `handler` runs on the
  // thread driving MPI progress at that moment (the progress thread, one waiting in the bus, or
  // the bus's express thread while the progress thread is busy with handlers), under the bus's
  // progress lock; the sender's own copy of a broadcast runs it on the sending thread. So it
  // must not block and must not call the bus: record and return.
  // `filter.kind` must be Kind::kHeartbeat (ConfigError otherwise). A message an express
  // subscription takes reaches no ordinary subscription and not the mailbox; one none takes
  // goes there while the inbox has room, and is dropped when it is full.
  Subscription subscribe_express(Filter filter, Handler handler);

  // The oldest mailbox message matching `filter`; waits up to `timeout` (TimeoutError).
  Message receive(const Filter& filter, std::chrono::nanoseconds timeout);
  std::optional<Message> try_receive(const Filter& filter);

  // Sends `message` with a fresh correlation id; the peer answers with reply().
  PendingReply request(int destination, Message message, std::chrono::nanoseconds timeout);
  void reply(const Header& request, Message response);
  // Makes the requester's get() throw an Error carrying `error_text`.
  void reply_error(const Header& request, std::string error_text);

  // Waits until everything queued so far has left this rank.
  void flush(std::chrono::nanoseconds timeout);
  // Collective: every rank calls it. Delivers everything sent before it on any rank, then stops
  // the progress thread; pending requests fail with ShutdownError. Idempotent.
  void shutdown();

  BusStats stats() const;
  const BusOptions& options() const noexcept;

  // Puts `bytes` on the wire as if they were an encoded message: for fault-injection tests.
  void send_raw_for_testing(int destination, std::span<const std::byte> bytes);
  // The same on the express path's tag (subscribe_express), at most 256 bytes.
  void send_raw_express_for_testing(int destination, std::span<const std::byte> bytes);

 private:
  std::shared_ptr<detail::BusCore> core_;
};

}  // namespace unimsg
