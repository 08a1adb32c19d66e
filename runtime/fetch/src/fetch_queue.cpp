#include "unimsg/fetch/fetch_queue.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

#include <unistd.h>

#include "unimsg/core/error.hpp"
#include "unimsg/core/log.hpp"

namespace unimsg {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;
constexpr Topic kQueueTopic = kServiceTopicBase + 4;   // requests to rank 0
constexpr Topic kResultTopic = kServiceTopicBase + 5;  // results to the submitter

json spec_to_json(const FetchSpec& spec) {
  json out{{"name", spec.name}, {"url", spec.url}, {"sha256", spec.sha256}};
  if (spec.size) out["size"] = *spec.size;
  return out;
}

FetchSpec spec_from_json(const json& in) {
  FetchSpec spec{in.at("name").get<std::string>(), in.at("url").get<std::string>(),
                 in.at("sha256").get<std::string>(), std::nullopt};
  if (in.contains("size")) spec.size = in.at("size").get<std::uint64_t>();
  return spec;
}

json outcome_to_json(const FetchOutcome& outcome) {
  return {{"name", outcome.name},         {"status", to_string(outcome.status)},
          {"attempts", outcome.attempts}, {"bytes", outcome.bytes},
          {"seconds", outcome.seconds},   {"path", outcome.path.string()},
          {"error", outcome.error}};
}

FetchOutcome outcome_from_json(const json& in) {
  FetchOutcome outcome;
  outcome.name = in.at("name").get<std::string>();
  const auto status = in.at("status").get<std::string>();
  outcome.status = status == "downloaded" ? FetchStatus::kDownloaded
                   : status == "cached"   ? FetchStatus::kCached
                                          : FetchStatus::kFailed;
  outcome.attempts = in.at("attempts").get<int>();
  outcome.bytes = in.at("bytes").get<std::uint64_t>();
  outcome.seconds = in.at("seconds").get<double>();
  outcome.path = in.at("path").get<std::string>();
  outcome.error = in.at("error").get<std::string>();
  return outcome;
}

std::string host_name() {
  char name[256] = {0};
  if (::gethostname(name, sizeof name - 1) != 0) return "localhost";
  return name;
}

Message make_message(Kind kind, Topic topic, const json& body) {
  return Message::make(kind, topic, Payload::from_string(body.dump()));
}

}  // namespace

// Rank 0: the queue, the leases, the dead letters.
struct FetchQueue::Server {
  struct Task {
    FetchSpec spec;
    int submitter = 0;
    std::uint64_t submitter_id = 0;
    int deliveries = 0;
    std::string host;  // only a worker on this host may take it (empty: any)
    bool done = false;
    std::uint64_t lease = 0;  // the current lease (0: none)
    int worker = -1;
    Clock::time_point deadline;
  };

  Bus& bus;
  FetchQueueOptions options;
  std::shared_ptr<spdlog::logger> log;
  mutable std::mutex mutex;
  std::map<std::uint64_t, Task> tasks;
  std::deque<std::uint64_t> queue;
  std::uint64_t next_task = 1;
  std::uint64_t next_lease = 1;
  std::set<int> draining;
  std::set<int> stopped;
  // Counts what moves the queue on (a task submitted, taken, renewed or finished, a rank
  // joining the drain): drain() gives up when it stands still for the stall timeout.
  std::uint64_t progress = 0;
  std::condition_variable stopped_cv;
  FetchQueueStats stats;

  Server(Bus& b, FetchQueueOptions o) : bus(b), options(std::move(o)) {
    log = make_rank_logger(bus.rank(), bus.size());
  }

  // Sends the submitter its result; the task is done for good.
  void finish(std::uint64_t id, Task& task, const FetchOutcome& outcome, int worker) {
    task.done = true;
    task.lease = 0;
    FetchResult result{outcome, id, worker, task.deliveries};
    if (outcome.status == FetchStatus::kFailed) stats.dead_letters.push_back(result);
    ++stats.completed;
    bus.send(task.submitter, make_message(Kind::kTaskResult, kResultTopic,
                                          {{"submitter_id", task.submitter_id},
                                           {"task", id},
                                           {"worker", worker},
                                           {"deliveries", task.deliveries},
                                           {"outcome", outcome_to_json(outcome)}}));
  }

  void expire_leases(Clock::time_point now) {
    for (auto& [id, task] : tasks) {
      if (task.done || task.lease == 0 || task.deadline > now) continue;
      ++stats.requeued;
      log->warn("fetch queue: task {} ({}) lost its worker on rank {} (lease ran out)", id,
                task.spec.name, task.worker);
      task.lease = 0;
      if (task.deliveries >= options.max_deliveries) {
        FetchOutcome dead;
        dead.name = task.spec.name;
        dead.status = FetchStatus::kFailed;
        dead.error = "dead letter: its worker was lost " + std::to_string(task.deliveries) +
                     " times (lease " + std::to_string(options.lease.count()) + " ms)";
        finish(id, task, dead, -1);
      } else {
        queue.push_front(id);
      }
    }
  }

  bool idle() const {
    if (!queue.empty()) return false;
    for (const auto& [id, task] : tasks) {
      if (!task.done) return false;
    }
    return true;
  }

  // The answer to a drain() that must wait: what it waits for.
  json drain_wait() const {
    std::vector<int> absent;
    for (int rank = 0; rank < bus.size(); ++rank) {
      if (!draining.count(rank)) absent.push_back(rank);
    }
    std::size_t leased = 0;
    for (const auto& [id, task] : tasks) leased += !task.done && task.lease != 0;
    return {{"status", "wait"},
            {"progress", progress},
            {"absent", absent},
            {"queued", queue.size()},
            {"leased", leased}};
  }

  json handle(const json& request, int rank) {
    std::lock_guard lock(mutex);
    const auto now = Clock::now();
    expire_leases(now);
    const std::string op = request.at("op").get<std::string>();
    if (op == "submit") {
      const std::uint64_t id = next_task++;
      Task task;
      task.spec = spec_from_json(request.at("spec"));
      task.submitter = rank;
      task.submitter_id = request.at("submitter_id").get<std::uint64_t>();
      task.host = request.value("host", "");
      tasks.emplace(id, std::move(task));
      queue.push_back(id);
      ++stats.submitted;
      ++progress;
      return {{"status", "queued"}, {"task", id}};
    }
    if (op == "take") {
      const std::string host = request.value("host", "");
      const auto it = std::find_if(queue.begin(), queue.end(), [&](std::uint64_t id) {
        const std::string& wanted = tasks.at(id).host;
        return wanted.empty() || wanted == host;
      });
      if (it == queue.end()) return {{"status", "wait"}};
      const std::uint64_t id = *it;
      queue.erase(it);
      Task& task = tasks.at(id);
      task.lease = next_lease++;
      task.worker = rank;
      task.deadline = now + options.lease;
      ++task.deliveries;
      ++progress;
      return {{"status", "task"},
              {"task", id},
              {"lease", task.lease},
              {"spec", spec_to_json(task.spec)}};
    }
    if (op == "renew") {
      const auto it = tasks.find(request.at("task").get<std::uint64_t>());
      if (it == tasks.end() || it->second.done ||
          it->second.lease != request.at("lease").get<std::uint64_t>()) {
        return {{"status", "ignored"}};
      }
      it->second.deadline = now + options.lease;
      ++progress;
      return {{"status", "ok"}};
    }
    if (op == "done") {
      const auto it = tasks.find(request.at("task").get<std::uint64_t>());
      if (it == tasks.end()) return {{"status", "ignored"}};
      if (it->second.done) {
        ++stats.duplicate_results;  // a re-queued task finished twice: the first one counted
        return {{"status", "duplicate"}};
      }
      // The first result counts even from an expired lease: the work is done either way.
      auto pos = std::find(queue.begin(), queue.end(), it->first);
      if (pos != queue.end()) queue.erase(pos);
      finish(it->first, it->second, outcome_from_json(request.at("outcome")), rank);
      ++progress;
      return {{"status", "ok"}};
    }
    if (op == "drain") {
      progress += draining.insert(rank).second;
      if (static_cast<int>(draining.size()) == bus.size() && idle()) return {{"status", "done"}};
      return drain_wait();
    }
    if (op == "stop") {
      stopped.insert(rank);
      stopped_cv.notify_all();
      return {{"status", "ok"}};
    }
    throw std::invalid_argument("unknown op '" + op + "'");
  }
};

// Every rank: the futures of its submissions, its workers' leases.
struct FetchQueue::Client {
  std::mutex mutex;
  std::uint64_t next_id = 1;
  std::map<std::uint64_t, std::promise<FetchResult>> promises;
  std::map<std::uint64_t, std::uint64_t> active;  // task -> lease, renewed while working
  std::atomic<bool> stopping{false};
  std::atomic<int> abandon_next{0};  // tests: tasks to take and then go silent on
  std::condition_variable stop_cv;
  std::condition_variable results_cv;  // a result arrived
};

FetchQueue::FetchQueue(Bus& bus, FetchQueueOptions options)
    : bus_(bus), options_(std::move(options)), client_(std::make_shared<Client>()) {
  if (options_.workers < 0 || options_.max_deliveries < 1 || options_.lease.count() <= 0) {
    throw ConfigError(bus_.rank(), "fetch queue",
                      "workers >= 0, max_deliveries >= 1 and a positive lease are required");
  }
  if (bus_.rank() == 0) {
    server_ = std::make_unique<Server>(bus_, options_);
    server_subscription_ = bus_.subscribe(
        Filter{Kind::kTask, kQueueTopic, std::nullopt}, [this](const Message& message) {
          try {
            const auto reply =
                server_->handle(json::parse(message.payload.as_string()), message.header.source);
            bus_.reply(message.header, make_message(Kind::kTask, kQueueTopic, reply));
          } catch (const std::exception& error) {
            bus_.reply_error(message.header, std::string("fetch queue: ") + error.what());
          }
        });
  }
  result_subscription_ = bus_.subscribe(
      Filter{Kind::kTaskResult, kResultTopic, 0}, [client = client_](const Message& message) {
        FetchResult result;
        std::uint64_t id = 0;
        try {
          const auto body = json::parse(message.payload.as_string());
          id = body.at("submitter_id").get<std::uint64_t>();
          result.task = body.at("task").get<std::uint64_t>();
          result.worker_rank = body.at("worker").get<int>();
          result.deliveries = body.at("deliveries").get<int>();
          result.outcome = outcome_from_json(body.at("outcome"));
        } catch (const std::exception&) {
          return;  // not from our rank 0's queue: nothing to fulfil
        }
        std::lock_guard lock(client->mutex);
        const auto it = client->promises.find(id);
        if (it == client->promises.end()) return;
        it->second.set_value(std::move(result));
        client->promises.erase(it);
        client->results_cv.notify_all();
      });

  const auto ask = [this](const json& request) {
    const Message reply =
        bus_.request(0, make_message(Kind::kTask, kQueueTopic, request), options_.request_timeout)
            .get();
    try {
      return json::parse(reply.payload.as_string());
    } catch (const std::exception& error) {
      throw Error(bus_.rank(), "fetch queue", std::string("rank 0 answered: ") + error.what());
    }
  };
  auto log = make_rank_logger(bus_.rank(), bus_.size());
  const std::string host = host_name();
  for (int w = 0; w < options_.workers; ++w) {
    workers_.emplace_back([this, ask, log, host] {
      while (!client_->stopping.load()) {
        json answer;
        try {
          answer = ask({{"op", "take"}, {"host", host}});
        } catch (const std::exception& error) {
          if (client_->stopping.load()) return;
          log->error("fetch queue worker: {}", error.what());
          std::this_thread::sleep_for(options_.idle_poll);
          continue;
        }
        if (answer.value("status", "") != "task") {
          std::unique_lock lock(client_->mutex);
          client_->stop_cv.wait_for(lock, options_.idle_poll,
                                    [&] { return client_->stopping.load(); });
          continue;
        }
        std::uint64_t task = 0, lease = 0;
        try {
          task = answer.at("task").get<std::uint64_t>();
          lease = answer.at("lease").get<std::uint64_t>();
        } catch (const std::exception& error) {
          log->error("fetch queue worker: a malformed task from rank 0: {}", error.what());
          continue;
        }
        int abandon = client_->abandon_next.load();
        while (abandon > 0 && !client_->abandon_next.compare_exchange_weak(abandon, abandon - 1)) {
        }
        if (abandon > 0) {
          // As a worker that died holding the task: never renewed, never finished, so rank 0
          // re-queues it when the lease runs out.
          log->warn("fetch queue worker: abandoning task {} and stopping (test)", task);
          return;
        }
        {
          std::lock_guard lock(client_->mutex);
          client_->active[task] = lease;
        }
        FetchOutcome outcome;
        try {
          outcome = fetch_file(spec_from_json(answer.at("spec")), options_.fetch, log);
        } catch (const std::exception& error) {
          outcome.name = answer.at("spec").value("name", "");
          outcome.status = FetchStatus::kFailed;
          outcome.error = error.what();
        }
        {
          std::lock_guard lock(client_->mutex);
          client_->active.erase(task);
        }
        try {
          ask({{"op", "done"},
               {"task", task},
               {"lease", lease},
               {"outcome", outcome_to_json(outcome)}});
        } catch (const std::exception& error) {
          log->error("fetch queue worker: cannot report task {}: {}", task, error.what());
        }
      }
    });
  }
  // Renews this rank's leases at a third of their length, so a long download keeps its task.
  renewer_ = std::thread([this, ask] {
    std::unique_lock lock(client_->mutex);
    while (!client_->stopping.load()) {
      client_->stop_cv.wait_for(lock, options_.lease / 3, [&] { return client_->stopping.load(); });
      const auto active = client_->active;
      lock.unlock();
      for (const auto& [task, lease] : active) {
        try {
          ask({{"op", "renew"}, {"task", task}, {"lease", lease}});
        } catch (const std::exception&) {
        }
      }
      lock.lock();
    }
  });
}

FetchQueue::~FetchQueue() {
  {
    std::lock_guard lock(client_->mutex);
    client_->stopping = true;
  }
  client_->stop_cv.notify_all();
  for (auto& worker : workers_) worker.join();
  renewer_.join();
  try {
    bus_.request(0, make_message(Kind::kTask, kQueueTopic, {{"op", "stop"}}),
                 options_.request_timeout)
        .get();
  } catch (const std::exception&) {
  }
  if (server_) {
    // Serve until every rank has stopped asking (or the request timeout says one never will).
    std::unique_lock lock(server_->mutex);
    server_->stopped_cv.wait_for(lock, options_.request_timeout, [&] {
      return static_cast<int>(server_->stopped.size()) == bus_.size();
    });
  }
  {
    // After drain() every result has been sent; one may still be on its way here.
    std::unique_lock lock(client_->mutex);
    client_->results_cv.wait_for(lock, std::chrono::seconds(2),
                                 [&] { return client_->promises.empty(); });
  }
  server_subscription_.reset();
  result_subscription_.reset();
  std::lock_guard lock(client_->mutex);
  for (auto& [id, promise] : client_->promises) {
    promise.set_exception(std::make_exception_ptr(
        ShutdownError(bus_.rank(), "fetch queue", "the queue stopped before the task finished")));
  }
}

std::future<FetchResult> FetchQueue::submit(FetchSpec spec, Placement placement) {
  std::uint64_t id = 0;
  std::future<FetchResult> future;
  {
    std::lock_guard lock(client_->mutex);
    id = client_->next_id++;
    future = client_->promises[id].get_future();
  }
  const Message reply =
      bus_.request(0,
                   make_message(Kind::kTask, kQueueTopic,
                                {{"op", "submit"},
                                 {"submitter_id", id},
                                 {"host", placement == Placement::kThisHost ? host_name() : ""},
                                 {"spec", spec_to_json(spec)}}),
                   options_.request_timeout)
          .get();
  (void)reply;
  return future;
}

DrainStalledError::DrainStalledError(int rank, std::string cause, std::vector<int> absent_ranks)
    : TimeoutError(rank, "fetch queue.drain", std::move(cause)),
      absent_ranks_(std::move(absent_ranks)) {}

namespace {

[[noreturn]] void throw_stalled(int rank, const json& answer, std::chrono::milliseconds stall) {
  const auto absent = answer.value("absent", std::vector<int>{});
  std::string ranks;
  for (int r : absent) ranks += (ranks.empty() ? "" : ", ") + std::to_string(r);
  throw DrainStalledError(
      rank,
      "no progress for " + std::to_string(stall.count()) + " ms (stall_timeout): rank(s) [" +
          ranks + "] have not called drain(); " +
          std::to_string(answer.value("queued", std::size_t{0})) + " task(s) queued, " +
          std::to_string(answer.value("leased", std::size_t{0})) + " leased",
      absent);
}

}  // namespace

void FetchQueue::drain() {
  // Renewals come every third of a lease: a shorter stall timeout would take a long download
  // for a stall.
  const auto stall = std::max(options_.stall_timeout, options_.lease);
  std::optional<std::uint64_t> seen;
  auto moved = Clock::now();
  while (true) {
    const Message reply = bus_.request(0, make_message(Kind::kTask, kQueueTopic, {{"op", "drain"}}),
                                       options_.request_timeout)
                              .get();
    json answer;
    try {
      answer = json::parse(reply.payload.as_string());
    } catch (const std::exception& error) {
      throw Error(bus_.rank(), "fetch queue.drain",
                  std::string("rank 0 answered: ") + error.what());
    }
    if (answer.value("status", "") == "done") return;
    const auto progress = answer.value("progress", std::uint64_t{0});
    const auto now = Clock::now();
    if (seen != progress) {
      seen = progress;
      moved = now;
    } else if (now - moved > stall) {
      throw_stalled(bus_.rank(), answer, stall);
    }
    std::this_thread::sleep_for(options_.idle_poll);
  }
}

FetchQueueStats FetchQueue::stats() const {
  if (!server_) return {};
  std::lock_guard lock(server_->mutex);
  return server_->stats;
}

void FetchQueue::abandon_tasks_for_testing(int tasks) {
  client_->abandon_next = tasks;
}

}  // namespace unimsg
