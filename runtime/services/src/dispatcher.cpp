#include "unimsg/services/dispatcher.hpp"

#include <nlohmann/json.hpp>

#include <string>
#include <thread>

#include "unimsg/core/error.hpp"

namespace unimsg {
namespace {

using Clock = std::chrono::steady_clock;
constexpr Topic kDispatchTopic = kServiceTopicBase + 3;

}  // namespace

struct DataDispatcher::Server {
  struct Lease {
    int rank = 0;
    std::size_t begin = 0;
    std::size_t end = 0;
    Clock::time_point deadline;
  };

  std::size_t size = 0;
  std::size_t range_size = 1;
  std::chrono::milliseconds lease_time{0};
  mutable std::mutex mutex;
  std::uint64_t epoch = 0;
  std::deque<std::pair<std::size_t, std::size_t>> pending;
  std::map<std::uint64_t, Lease> out;
  std::uint64_t next_lease = 1;
  DispatcherStats stats;

  void start(std::uint64_t new_epoch, std::size_t position) {
    std::lock_guard lock(mutex);
    epoch = new_epoch;
    pending.clear();
    out.clear();
    for (std::size_t begin = position; begin < size; begin += range_size) {
      pending.emplace_back(begin, std::min(size, begin + range_size));
    }
  }

  nlohmann::json handle(const nlohmann::json& request, int rank) {
    std::lock_guard lock(mutex);
    const auto now = Clock::now();
    for (auto it = out.begin(); it != out.end();) {  // expired leases go back, in order
      if (it->second.deadline <= now) {
        pending.emplace_front(it->second.begin, it->second.end);
        ++stats.requeued;
        it = out.erase(it);
      } else {
        ++it;
      }
    }
    const std::string op = request.at("op").get<std::string>();
    if (op == "next") {
      if (pending.empty()) {
        return {{"status", out.empty() ? "done" : "wait"}, {"epoch", epoch}};
      }
      const auto [begin, end] = pending.front();
      pending.pop_front();
      const std::uint64_t lease = next_lease++;
      out.emplace(lease, Lease{rank, begin, end, now + lease_time});
      ++stats.handed_out;
      return {
          {"status", "range"}, {"epoch", epoch}, {"begin", begin}, {"end", end}, {"lease", lease}};
    }
    if (op == "complete") {
      const auto it = out.find(request.at("lease").get<std::uint64_t>());
      if (it == out.end() || request.at("epoch").get<std::uint64_t>() != epoch) {
        ++stats.late_acks;  // expired and handed to someone else, or of an old epoch
        return {{"status", "ignored"}};
      }
      ++stats.completed;
      ++stats.completed_by_rank[it->second.rank];
      out.erase(it);
      return {{"status", "ok"}};
    }
    throw Error(kNoRank, "dispatcher", "unknown request '" + op + "'");
  }
};

DataDispatcher::DataDispatcher(Bus& bus, std::size_t dataset_size, DispatcherOptions options)
    : bus_(bus), options_(options) {
  if (options_.range_size == 0) {
    throw ConfigError(bus_.rank(), "dispatcher", "range_size must be at least 1");
  }
  if (bus_.rank() == 0) {
    server_ = std::make_unique<Server>();
    server_->size = dataset_size;
    server_->range_size = options_.range_size;
    server_->lease_time = options_.lease;
    server_->start(0, 0);
    subscription_ = bus_.subscribe(
        Filter{Kind::kControl, kDispatchTopic, std::nullopt}, [this](const Message& message) {
          try {
            const auto request = nlohmann::json::parse(message.payload.as_string());
            const auto reply = server_->handle(request, message.header.source);
            bus_.reply(message.header, Message::make(Kind::kControl, kDispatchTopic,
                                                     Payload::from_string(reply.dump())));
          } catch (const std::exception& error) {
            bus_.reply_error(message.header, std::string("dispatcher: ") + error.what());
          }
        });
  }
  // No barrier needed: a request that reaches rank 0 before its subscription exists waits in
  // the mailbox, and subscribing hands it over.
}

DataDispatcher::~DataDispatcher() = default;

std::optional<SampleRange> DataDispatcher::next() {
  while (true) {
    const Message reply = bus_.request(0,
                                       Message::make(Kind::kControl, kDispatchTopic,
                                                     Payload::from_string(R"({"op":"next"})")),
                                       options_.request_timeout)
                              .get();
    nlohmann::json answer;
    try {
      answer = nlohmann::json::parse(reply.payload.as_string());
      const std::string status = answer.at("status").get<std::string>();
      if (status == "done") return std::nullopt;
      if (status == "wait") {
        std::this_thread::sleep_for(options_.retry_interval);
        continue;
      }
      if (status != "range") throw std::runtime_error("status '" + status + "'");
      SampleRange range;
      range.epoch = answer.at("epoch").get<std::uint64_t>();
      range.begin = answer.at("begin").get<std::size_t>();
      range.end = answer.at("end").get<std::size_t>();
      range.lease = answer.at("lease").get<std::uint64_t>();
      if (range.begin >= range.end) throw std::runtime_error("an empty range");
      return range;
    } catch (const std::exception& error) {
      throw Error(bus_.rank(), "dispatcher.next",
                  std::string("rank 0 answered something unexpected: ") + error.what());
    }
  }
}

bool DataDispatcher::complete(const SampleRange& range) {
  const nlohmann::json request{{"op", "complete"}, {"lease", range.lease}, {"epoch", range.epoch}};
  const Message reply = bus_.request(0,
                                     Message::make(Kind::kControl, kDispatchTopic,
                                                   Payload::from_string(request.dump())),
                                     options_.request_timeout)
                            .get();
  try {
    return nlohmann::json::parse(reply.payload.as_string()).at("status").get<std::string>() == "ok";
  } catch (const std::exception& error) {
    throw Error(bus_.rank(), "dispatcher.complete",
                std::string("rank 0 answered something unexpected: ") + error.what());
  }
}

void DataDispatcher::start_epoch(std::uint64_t epoch, std::size_t position) {
  if (!server_) throw Error(bus_.rank(), "dispatcher.start_epoch", "only rank 0 serves");
  server_->start(epoch, position);
}

DispatcherStats DataDispatcher::stats() const {
  if (!server_) return {};
  std::lock_guard lock(server_->mutex);
  return server_->stats;
}

}  // namespace unimsg
