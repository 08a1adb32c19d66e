// The send path: checks, encoding, the send queue, per-peer flow control and in-flight sends.

#include "bus_core.hpp"

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "unimsg/core/error.hpp"

namespace unimsg::detail {

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
  if (is_express(message)) {
    send_express(message);
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
  if (is_express(message)) {
    if (size > 1) send_express(message);
    message.header.payload_length = message.payload.size();
    deliver(std::move(message));
    return;
  }
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
    // needs no request to allocate, test and free (docs/benchmarks.md: MPI_Send against
    // MPI_Isend on the latency path).
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

}  // namespace unimsg::detail
