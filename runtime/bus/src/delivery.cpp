// Delivery: subscriptions, the mailbox, replies, handlers and the direct hand-over to a waiting
// receive().

#include "bus_core.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <exception>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace unimsg::detail {

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
  // The local copy of a heartbeat broadcast, or one too large for the express path.
  if (header.kind == Kind::kHeartbeat && run_express_handlers(message)) return;
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
// message, it takes it here: no mailbox, no second lock, no wake-up, so the latency path skips
// the mailbox hand-over, a large share of the bus's own time per message (docs/architecture.md).
// Only when nothing older could match first: the inbox is empty and no subscription wants the
// message.
void BusCore::deliver_received(Message message) {
  const Header& header = message.header;
  DirectReceive* waiter = direct_receive;
  const bool for_waiter = waiter != nullptr && !waiter->out->has_value() && !header.is_reply() &&
                          !(header.kind == Kind::kControl && header.topic == kTopicGoodbye) &&
                          waiter->filter->matches(header) &&
                          inbox_messages.load(std::memory_order_acquire) == 0 &&
                          (header.kind != Kind::kHeartbeat ||
                           express_subscription_count.load(std::memory_order_acquire) == 0);
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

void BusCore::unsubscribe(std::uint64_t id) {
  std::unique_lock lock(subs_mutex);
  const auto it = std::find_if(subscriptions.begin(), subscriptions.end(),
                               [&](const SubscriptionEntry& entry) { return entry.id == id; });
  if (it == subscriptions.end()) {
    lock.unlock();  // lock order: express_mutex is never taken under subs_mutex
    unsubscribe_express(id);
    return;
  }
  subscriptions.erase(it);
  subscription_count.fetch_sub(1, std::memory_order_acq_rel);
  if (std::this_thread::get_id() != dispatcher_id) {
    subs_cv.wait(lock, [&] { return running_subscription != id; });
  }
}

}  // namespace unimsg::detail
