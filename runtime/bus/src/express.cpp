// The express path: heartbeats sent, received and handed to their handlers apart from every other
// message. A rank whose handlers block, or whose inbox is full of messages nobody reads, must
// still hear its peers' heartbeats; otherwise its watchdog takes itself for isolated and ends a
// healthy job (docs/architecture.md, "The express path").

#include "bus_core.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <utility>

#include "unimsg/core/error.hpp"

namespace unimsg::detail {

namespace {

std::int64_t steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}

}  // namespace

// Requests and replies stay on the ordinary path: an express handler may not answer (it must not
// call the bus), and a reply belongs to its request's slot.
bool BusCore::is_express(const Message& message) noexcept {
  const Header& header = message.header;
  return header.kind == Kind::kHeartbeat && !header.is_reply() && header.correlation == 0 &&
         kHeaderSize + message.payload.size() <= kExpressLimit;
}

void BusCore::send_express(const Message& message) {
  ExpressFlight wire;
  wire.size = kHeaderSize + message.payload.size();
  const auto header = encode_header(message.header, message.payload.bytes());
  std::memcpy(wire.wire.data(), header.data(), kHeaderSize);
  if (!message.payload.empty()) {
    std::memcpy(wire.wire.data() + kHeaderSize, message.payload.data(), message.payload.size());
  }
  const bool counted = message.header.topic < kReservedTopicBase;
  const int only = message.header.destination;
  std::lock_guard lock(progress_mutex);
  check_open("bus.send");  // under the lock: nothing may follow our goodbye
  complete_express_sends();
  for (int peer = 0; peer < size; ++peer) {
    if (peer != rank && (only == kBroadcast || peer == only)) post_express(peer, wire, counted);
  }
}

// One failed peer must not stop the heartbeats to the others: failures are logged, not thrown.
void BusCore::post_express(int peer, const ExpressFlight& wire, bool counted) {
  PeerState& state = express_peers[static_cast<std::size_t>(peer)];
  char& dropping = express_dropping[static_cast<std::size_t>(peer)];
  if (state.posted - state.confirmed >= kExpressWindow) {
    if (!std::exchange(dropping, 1)) {
      log->warn("bus: rank {} has not taken our last {} heartbeats; dropping more until it does",
                peer, kExpressWindow);
    }
    return;
  }
  if (std::exchange(dropping, 0)) log->info("bus: rank {} takes our heartbeats again", peer);
  auto flight = std::make_unique<ExpressFlight>(wire);
  flight->destination = peer;
  flight->synchronous = state.posted + 1 - state.last_sync_mark >= kExpressWindow / 2;
  auto* send_fn = flight->synchronous ? &MPI_Issend : &MPI_Isend;
  const int rc = send_fn(flight->wire.data(), static_cast<int>(flight->size), MPI_BYTE, peer,
                         kTagExpress, comm.get(), &flight->request);
  if (rc != MPI_SUCCESS) {
    log->warn("bus: could not send a heartbeat to rank {} (MPI error {})", peer, rc);
    return;
  }
  ++state.posted;
  if (flight->synchronous) {
    flight->sync_mark = state.posted;
    state.last_sync_mark = state.posted;
  }
  count_sent(counted, flight->size);
  express_flights.push_back(std::move(flight));
}

void BusCore::complete_express_sends() {
  for (std::size_t i = 0; i < express_flights.size();) {
    ExpressFlight& flight = *express_flights[i];
    int done = 0;
    const int rc = MPI_Test(&flight.request, &done, MPI_STATUS_IGNORE);
    if (rc == MPI_SUCCESS && !done) {
      ++i;
      continue;
    }
    if (rc != MPI_SUCCESS) {
      log->warn("bus: a heartbeat to rank {} failed (MPI error {})", flight.destination, rc);
      if (flight.request != MPI_REQUEST_NULL) {
        // MPI may still read its bytes: they stay allocated (abandon_requests).
        MPI_Request_free(&flight.request);
        leaked_express_flights.push_back(std::move(express_flights[i]));
      }
    }
    // A failed send holds nothing at the peer either: it counts as taken.
    if (flight.synchronous) {
      PeerState& peer = express_peers[static_cast<std::size_t>(flight.destination)];
      peer.confirmed = std::max(peer.confirmed, flight.sync_mark);
    }
    express_flights[i] = std::move(express_flights.back());
    express_flights.pop_back();
  }
}

void BusCore::post_express_slot(std::size_t slot) {
  check_mpi(MPI_Irecv(express_ring.buffer(slot), static_cast<int>(kExpressLimit), MPI_BYTE,
                      MPI_ANY_SOURCE, kTagExpress, comm.get(), &express_ring.requests[slot]),
            rank, "bus: MPI_Irecv");
  express_ring.posted_as[slot] = express_ring.next_post++;
}

// Every slot is posted again as soon as its bytes are copied out, whatever the inbox holds: an
// express message is never left to wait in MPI for room.
bool BusCore::receive_express() {
  for (std::size_t slot = 0; slot < kExpressSlots; ++slot) {
    // Left unposted only when MPI refused to post it before.
    if (express_ring.requests[slot] == MPI_REQUEST_NULL) post_express_slot(slot);
  }
  std::array<int, kExpressSlots> done{};
  std::array<MPI_Status, kExpressSlots> statuses{};
  int count = 0;
  const int rc = MPI_Testsome(static_cast<int>(kExpressSlots), express_ring.requests.data(), &count,
                              done.data(), statuses.data());
  if (rc != MPI_SUCCESS && rc != MPI_ERR_IN_STATUS) check_mpi(rc, rank, "bus: MPI_Testsome");
  if (count == MPI_UNDEFINED || count <= 0) return false;
  // MPI matched the slots in the order they were posted: handled in it, each source's heartbeats
  // keep their order.
  std::array<std::pair<std::uint64_t, std::size_t>, kExpressSlots> order{};
  for (std::size_t i = 0; i < static_cast<std::size_t>(count); ++i) {
    order[i] = {express_ring.posted_as[static_cast<std::size_t>(done[i])], i};
  }
  std::sort(order.begin(), order.begin() + count);
  for (int i = 0; i < count; ++i) {
    const std::size_t at = order[static_cast<std::size_t>(i)].second;
    const auto slot = static_cast<std::size_t>(done[at]);
    const MPI_Status& status = statuses[at];
    std::optional<Message> message;
    if (rc == MPI_ERR_IN_STATUS && status.MPI_ERROR != MPI_SUCCESS) {
      int error_class = 0;
      MPI_Error_class(status.MPI_ERROR, &error_class);
      if (error_class != MPI_ERR_TRUNCATE) check_mpi(status.MPI_ERROR, rank, "bus: MPI_Testsome");
      reject(status.MPI_SOURCE,
             "an express message larger than " + std::to_string(kExpressLimit) + " bytes");
    } else {
      int bytes = 0;
      MPI_Get_count(&status, MPI_BYTE, &bytes);
      message = accept_express(status.MPI_SOURCE, {express_ring.buffer(slot),
                                                   static_cast<std::size_t>(std::max(bytes, 0))});
    }
    post_express_slot(slot);
    if (message) deliver_express(std::move(*message));
  }
  return true;
}

// Checked as strictly as any envelope (decode, checksum, source and destination), and only
// heartbeats may come this way.
std::optional<Message> BusCore::accept_express(int source, std::span<const std::byte> wire) {
  try {
    Message message = decode(wire, limits);
    if (!route_ok(source, message.header)) return std::nullopt;
    if (!is_express(message)) {
      reject(source,
             "a " + describe(message.header) + " on the express tag, which only heartbeats use");
      return std::nullopt;
    }
    count_received(message.header, wire.size());
    return message;
  } catch (const DecodeError& error) {
    reject(source, error.what());
  } catch (const std::bad_alloc&) {
    reject(source,
           "no memory to store an express message of " + std::to_string(wire.size()) + " bytes");
  }
  return std::nullopt;
}

void BusCore::deliver_express(Message message) {
  if (run_express_handlers(message)) return;
  // Nobody takes it express: ordinary subscriptions and the mailbox may, while the inbox has
  // room. A heartbeat only repeats the one before, so when the inbox is full it is dropped
  // rather than left to grow an inbox that nobody reads.
  if (!inbox_has_room()) {
    log->debug("bus: inbox full, dropped a heartbeat from rank {}", message.header.source);
    return;
  }
  deliver(std::move(message));
}

bool BusCore::run_express_handlers(const Message& message) {
  if (express_subscription_count.load(std::memory_order_acquire) == 0) return false;
  std::lock_guard lock(express_mutex);
  bool taken = false;
  for (const auto& entry : express_subscriptions) {
    if (!entry.filter.matches(message.header)) continue;
    taken = true;
    try {
      (*entry.handler)(message);
    } catch (const std::exception& error) {
      stats.handler_errors.fetch_add(1, std::memory_order_relaxed);
      log->error("bus: express handler for {} from rank {} threw: {}", describe(message.header),
                 message.header.source, error.what());
    }
  }
  return taken;
}

std::uint64_t BusCore::subscribe_express(Filter filter, Handler handler) {
  std::uint64_t id = 0;
  {
    std::lock_guard lock(subs_mutex);
    id = next_subscription_id++;
  }
  {
    std::lock_guard lock(express_mutex);
    express_subscriptions.push_back(
        {id, std::move(filter), std::make_shared<Handler>(std::move(handler))});
    express_subscription_count.fetch_add(1, std::memory_order_acq_rel);
  }
  start_express_thread();
  return id;
}

bool BusCore::unsubscribe_express(std::uint64_t id) {
  // Waits for a running express handler: it holds express_mutex.
  std::lock_guard lock(express_mutex);
  const auto it = std::find_if(express_subscriptions.begin(), express_subscriptions.end(),
                               [&](const SubscriptionEntry& entry) { return entry.id == id; });
  if (it == express_subscriptions.end()) return false;
  express_subscriptions.erase(it);
  express_subscription_count.fetch_sub(1, std::memory_order_acq_rel);
  return true;
}

void BusCore::start_express_thread() {
  std::lock_guard lock(express_thread_mutex);
  if (express_stop || express_thread.joinable()) return;
  express_thread = std::thread([this] { express_thread_main(); });
}

void BusCore::stop_express_thread() {
  std::thread thread;
  {
    std::lock_guard lock(express_thread_mutex);
    express_stop = true;
    thread = std::move(express_thread);
  }
  express_cv.notify_all();
  if (thread.joinable()) thread.join();
}

// The progress thread also runs the subscription handlers, and while one of them blocks (or a
// long queue of them runs) nothing else drives this rank's receiving. This thread then receives
// the express messages in its place; otherwise it only wakes to look.
void BusCore::express_thread_main() {
  const auto poll_ns = std::chrono::nanoseconds(kExpressPoll).count();
  std::unique_lock lock(express_thread_mutex);
  while (!express_cv.wait_for(lock, kExpressPoll, [&] { return express_stop; })) {
    const std::int64_t busy_since = handlers_busy_since.load(std::memory_order_acquire);
    if (busy_since == 0 || steady_ns() - busy_since < poll_ns) continue;
    lock.unlock();
    try {
      if (!shut_down.load(std::memory_order_acquire) && progress_mutex.try_lock()) {
        std::lock_guard progress(progress_mutex, std::adopt_lock);
        receive_express();
      }
    } catch (const std::exception& error) {
      log->error("bus: receiving heartbeats failed: {}", error.what());
      std::this_thread::sleep_for(options.idle_sleep_max);  // no tight loop of the same error
    }
    lock.lock();
  }
}

void BusCore::mark_handlers_busy(bool busy) noexcept {
  // Written only when it changes: the progress thread passes here on every loop.
  const bool marked = handlers_busy_since.load(std::memory_order_relaxed) != 0;
  if (busy && !marked) handlers_busy_since.store(steady_ns(), std::memory_order_release);
  if (!busy && marked) handlers_busy_since.store(0, std::memory_order_release);
}

}  // namespace unimsg::detail
