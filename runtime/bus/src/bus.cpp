// The public Bus, Subscription and PendingReply: a thin facade over detail::BusCore
// (bus_core.hpp), which holds the engine.

#include "unimsg/bus/bus.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "bus_core.hpp"
#include "unimsg/core/error.hpp"

namespace unimsg {

using detail::BusCore;
using detail::Clock;

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

Subscription Bus::subscribe_express(Filter filter, Handler handler) {
  if (!handler) throw Error(core_->rank, "bus.subscribe_express", "the handler is empty");
  if (filter.kind != Kind::kHeartbeat) {
    throw ConfigError(core_->rank, "bus.subscribe_express",
                      "only heartbeats travel express: the filter's kind must be heartbeat");
  }
  return Subscription(core_, core_->subscribe_express(std::move(filter), std::move(handler)));
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
  std::lock_guard lock(core_->mail_mutex);
  out.pending_requests = core_->pending_requests.size();
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

void Bus::send_raw_express_for_testing(int destination, std::span<const std::byte> bytes) {
  if (bytes.size() > detail::kExpressLimit) {
    throw Error(core_->rank, "bus.send_raw_express_for_testing",
                "raw express messages are limited to " + std::to_string(detail::kExpressLimit) +
                    " bytes, as every sender's are");
  }
  if (destination < 0 || destination >= core_->size || destination == core_->rank) {
    throw Error(core_->rank, "bus.send_raw_express_for_testing", "not a peer's rank");
  }
  auto flight = std::make_unique<detail::ExpressFlight>();
  flight->destination = destination;
  flight->size = bytes.size();
  if (!bytes.empty()) std::memcpy(flight->wire.data(), bytes.data(), bytes.size());
  std::lock_guard lock(core_->progress_mutex);
  core_->check_open("bus.send_raw_express_for_testing");
  check_mpi(MPI_Isend(flight->wire.data(), static_cast<int>(flight->size), MPI_BYTE, destination,
                      detail::kTagExpress, core_->comm.get(), &flight->request),
            core_->rank, "bus: MPI_Isend");
  core_->express_flights.push_back(std::move(flight));
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

PendingReply::~PendingReply() {
  withdraw();
}

PendingReply& PendingReply::operator=(PendingReply&& other) noexcept {
  if (this != &other) {
    withdraw();
    core_ = std::move(other.core_);
    slot_ = std::move(other.slot_);
  }
  return *this;
}

void PendingReply::withdraw() noexcept {
  if (!core_ || !slot_) return;
  std::lock_guard lock(core_->mail_mutex);
  if (!slot_->done) core_->pending_requests.erase(slot_->request.correlation);
}

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
