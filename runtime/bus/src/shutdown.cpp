// Shutting the bus down: goodbyes to every peer, the progress thread stopped, requests failed.

#include "bus_core.hpp"

#include <spdlog/spdlog.h>

#include <mutex>
#include <string>

namespace unimsg::detail {

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

}  // namespace unimsg::detail
