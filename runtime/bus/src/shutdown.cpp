// Shutting the bus down: goodbyes to every peer, the progress thread stopped, requests failed.

#include "bus_core.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

namespace unimsg::detail {

BusCore::~BusCore() {
  stop_express_thread();
  if (progress_thread.joinable()) {
    {
      std::lock_guard lock(mail_mutex);
      stop_progress = true;
    }
    progress_cv.notify_all();
    progress_thread.join();
  }
  // Deliberately never freed: MPI may still use them (abandon_requests).
  for (auto& buffer : leaked_buffers) {
    std::make_unique<std::shared_ptr<std::byte[]>>(std::move(buffer)).release();
  }
  for (auto& buffer : leaked_ring_buffers) buffer.release();
  for (auto& flight : leaked_flights) flight.release();
  leaked_express_buffers.release();
  for (auto& flight : leaked_express_flights) flight.release();
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
  stop_express_thread();
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
  abandon_requests(std::max(deadline, deadline_after(kCancelGrace)));
}

namespace {

// Cancels a receive and waits for it to end until `deadline`. MPI cannot cancel a receive it has
// already matched: that one ends only when its data has arrived, which a stopped sender may
// never send, so an unbounded wait here could hang the rank.
bool cancel_receive(MPI_Request& request, Clock::time_point deadline) {
  MPI_Cancel(&request);
  while (true) {
    int done = 0;
    if (MPI_Test(&request, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS || done) return true;
    if (Clock::now() >= deadline) {
      MPI_Request_free(&request);
      return false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

}  // namespace

// What MPI still holds after shutdown: receives it would not cancel and sends no peer took.
// Their buffers stay allocated for as long as the process lives, since MPI may still write or
// read them; freeing them could corrupt memory or put garbage on the wire.
void BusCore::abandon_requests(Clock::time_point deadline) {
  std::size_t abandoned = 0;
  for (auto& queue : pending_receives) {
    for (auto& pending : queue) {
      if (pending.request == MPI_REQUEST_NULL || cancel_receive(pending.request, deadline)) {
        continue;
      }
      ++abandoned;
      leaked_buffers.push_back(std::move(pending.buffer));
    }
    queue.clear();
  }
  for (auto& slot : ring) {
    if (slot.request == MPI_REQUEST_NULL || cancel_receive(slot.request, deadline)) continue;
    ++abandoned;
    leaked_ring_buffers.push_back(std::move(slot.buffer));
  }
  for (auto& flight : in_flight) {
    bool active = false;
    for (auto& request : flight->requests) {
      if (request == MPI_REQUEST_NULL) continue;
      active = true;
      MPI_Request_free(&request);
    }
    if (active) {
      ++abandoned;
      leaked_flights.push_back(std::move(flight));
    }
  }
  in_flight.clear();
  abandoned += abandon_express(deadline);
  if (abandoned > 0) {
    log->warn("bus.shutdown: {} transfer(s) left unfinished with stopped or lost peers", abandoned);
  }
}

// The express path's share of abandon_requests: the same rules, one buffer block for all slots.
std::size_t BusCore::abandon_express(Clock::time_point deadline) {
  std::size_t abandoned = 0;
  for (auto& request : express_ring.requests) {
    if (request == MPI_REQUEST_NULL || cancel_receive(request, deadline)) continue;
    ++abandoned;
  }
  if (abandoned > 0) leaked_express_buffers = std::move(express_ring.buffers);
  for (auto& flight : express_flights) {
    int done = 0;
    if (MPI_Test(&flight->request, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS || done) continue;
    MPI_Request_free(&flight->request);
    ++abandoned;
    leaked_express_flights.push_back(std::move(flight));
  }
  express_flights.clear();
  return abandoned;
}

}  // namespace unimsg::detail
