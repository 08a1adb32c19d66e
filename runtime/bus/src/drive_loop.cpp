// Progress rounds and the progress thread; drive_until, a template, lives in bus_core.hpp.

#include "bus_core.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <exception>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>

namespace unimsg::detail {

bool BusCore::progress_once() {
  // Receives first: a waiting thread is most often waiting for one.
  bool progressed = false;
  if (--express_countdown == 0) {
    express_countdown = kExpressRounds;
    progressed = receive_express();
  }
  progressed |= receive_messages();
  served_waiter_last_round = served_waiter;
  if (std::exchange(served_waiter, false)) return true;
  progressed |= complete_receives();
  if (!in_flight.empty()) progressed |= complete_sends();
  if (queued_messages.load(std::memory_order_relaxed) > in_flight.size()) {
    progressed |= post_sends();
  }
  return progressed;
}

void BusCore::progress_thread_main() {
  {
    std::lock_guard lock(subs_mutex);
    dispatcher_id = std::this_thread::get_id();
  }
  Backoff backoff(0, 7);  // a few yields, then sleeps that grow while nothing happens
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
        mark_handlers_busy(false);
        return;
      }
    }
    mark_handlers_busy(job.has_value());
    if (job) {
      run_handlers(std::move(*job));
      backoff.reset();
      continue;
    }
    bool progressed = false;
    try {
      if (spinning_drivers.load(std::memory_order_acquire) == 0 &&
          !shut_down.load(std::memory_order_acquire) && progress_mutex.try_lock()) {
        std::lock_guard lock(progress_mutex, std::adopt_lock);
        // Every round of this thread tests the express receives: it is on nobody's latency path.
        express_countdown = 1;
        progressed = progress_once();
      }
    } catch (const std::exception& error) {
      log->error("bus: progress failed: {}", error.what());
      std::this_thread::sleep_for(options.idle_sleep_max);  // no tight loop of the same error
    }
    if (progressed) {
      backoff.reset();
      sleep = std::chrono::microseconds(20);
      continue;
    }
    if (backoff.next() == Backoff::Step::kYield) {
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

}  // namespace unimsg::detail
