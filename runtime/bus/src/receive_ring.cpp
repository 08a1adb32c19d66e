// The receive path: the ring of preposted envelope receives, split payloads, verification.

#include "bus_core.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <utility>

#include "unimsg/core/error.hpp"

namespace unimsg::detail {

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
  } catch (const std::bad_alloc&) {
    reject(source,
           "no memory to decompress a message of " + std::to_string(receive.size) + " bytes");
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
      pending.awaiting_post = true;
      source_queue.push_back(std::move(pending));
      ++pending_receive_count;
      // Queued first: if MPI refuses the receive, the entry stays and is posted again later.
      // Posted in order only: behind one still waiting, it waits its turn at the queue's head.
      const bool waiting_ahead =
          std::any_of(source_queue.begin(), source_queue.end() - 1,
                      [](const PendingReceive& p) { return p.awaiting_post; });
      if (!waiting_ahead) post_payload_receive(source, source_queue.back());
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
  } catch (const std::bad_alloc&) {
    reject(source, "no memory to store a message of " + std::to_string(wire.size()) + " bytes");
  }
}

bool BusCore::post_payload_receive(int source, PendingReceive& pending) {
  auto& posted = posted_payload_bytes[static_cast<std::size_t>(source)];
  if (posted > 0 && posted + pending.size > kMaxPendingPayloadBytes) return false;
  try {
    if (!pending.buffer) pending.buffer = buffers->acquire(pending.size);
  } catch (const std::bad_alloc&) {
    if (!std::exchange(pending.memory_warned, true)) {
      log->warn(
          "bus: no memory for a payload of {} bytes from rank {} ({}); it and the later messages "
          "from that rank wait until memory is free",
          pending.size, source, describe(pending.header));
    }
    return false;
  }
  const int tag = kTagPayloadBase + static_cast<int>(pending.header.sequence % payload_tag_span);
  check_mpi(MPI_Irecv(pending.buffer.get(), static_cast<int>(pending.size), MPI_BYTE, source, tag,
                      comm.get(), &pending.request),
            rank, "bus: MPI_Irecv");
  pending.awaiting_post = false;
  posted += pending.size;
  if (pending.memory_warned) {
    log->info("bus: memory found for the payload of {} bytes from rank {}", pending.size, source);
  }
  return true;
}

void BusCore::post_ring_slots() {
  // In ring order, which is the order MPI matches them in; a slot that MPI refused stays queued
  // (with those after it) for the next round, instead of being lost or posted twice.
  std::size_t posted = 0;
  try {
    for (; posted < ring_to_post.size(); ++posted) post_ring_slot(ring[ring_to_post[posted]]);
  } catch (...) {
    ring_to_post.erase(ring_to_post.begin(),
                       ring_to_post.begin() + static_cast<std::ptrdiff_t>(posted));
    throw;
  }
  ring_to_post.clear();
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
  if (!ring_to_post.empty() && inbox_has_room()) post_ring_slots();
  bool received = false;
  for (int round = 0; round < kMaxReceivesPerRound; ++round) {
    if (!inbox_has_room()) break;
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
    // Queued for posting again before the envelope is handled, whatever that throws: a slot left
    // unposted would stop this rank's receiving for good. (It is posted next round, after its
    // bytes have been read.)
    ring_to_post.push_back(ring_head);
    ring_head = (ring_head + 1) % ring.size();
    accept_envelope(status.MPI_SOURCE,
                    {slot.buffer.get(), static_cast<std::size_t>(std::max(count, 0))});
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
      if (head.awaiting_post && !post_payload_receive(source, head)) break;
      if (!head.ready) {
        int done = 0;
        check_mpi(MPI_Test(&head.request, &done, MPI_STATUS_IGNORE), rank, "bus: MPI_Test");
        if (!done) break;
        posted_payload_bytes[static_cast<std::size_t>(source)] -= head.size;
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

}  // namespace unimsg::detail
