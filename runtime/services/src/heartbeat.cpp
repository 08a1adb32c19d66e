#include "unimsg/services/heartbeat.hpp"

#include <algorithm>
#include <cstring>
#include <string>

#include "unimsg/core/config.hpp"
#include "unimsg/core/error.hpp"

namespace unimsg {
namespace {

using Clock = std::chrono::steady_clock;
// Heartbeats are told apart by their kind; the topic only keeps them off user topics.
constexpr Topic kHeartbeatTopic = kServiceTopicBase + 1;

}  // namespace

HeartbeatOptions HeartbeatOptions::from_env() {
  HeartbeatOptions options;
  if (const auto seconds = env_double("UNIMSG_HEARTBEAT_TIMEOUT", 0.1, 86400)) {
    options.timeout = std::chrono::milliseconds(static_cast<long long>(*seconds * 1000));
  }
  if (const auto v = env_uint("UNIMSG_HEARTBEAT_INTERVAL_MS", 10, 3600000)) {
    options.interval = std::chrono::milliseconds(*v);
  }
  if (options.interval * 2 > options.timeout) {
    throw ConfigError(kNoRank, "UNIMSG_HEARTBEAT_INTERVAL_MS",
                      "the interval must be at most half the heartbeat timeout");
  }
  return options;
}

bool hears_quorum(int world_size, const std::vector<int>& silent_ranks) {
  const int heard = world_size - static_cast<int>(silent_ranks.size());
  const bool hears_rank0 =
      std::find(silent_ranks.begin(), silent_ranks.end(), 0) == silent_ranks.end();
  return 2 * heard > world_size || (2 * heard == world_size && hears_rank0);
}

HeartbeatWatch::HeartbeatWatch(Bus& bus, HeartbeatOptions options, LossHandler on_loss,
                               IsolationHandler on_isolated)
    : bus_(bus),
      options_(options),
      on_loss_(std::move(on_loss)),
      on_isolated_(std::move(on_isolated)) {
  const auto now = Clock::now();
  // Until a rank's first heartbeat its clock starts here: a rank that never starts is lost too.
  last_seen_.assign(static_cast<std::size_t>(bus_.size()), now);
  last_step_.assign(static_cast<std::size_t>(bus_.size()), 0);
  // Express: heard even while this rank's handlers block or its inbox is full, which would
  // otherwise make a healthy rank deaf and take itself for isolated. The handler runs on the
  // bus's progress path, so it only records, under a lock nobody holds for long.
  subscription_ = bus_.subscribe_express(
      Filter{Kind::kHeartbeat, kHeartbeatTopic, std::nullopt}, [this](const Message& message) {
        const int source = message.header.source;
        if (source < 0 || source >= static_cast<int>(last_seen_.size())) return;
        std::uint64_t step = 0;
        if (message.payload.size() == sizeof step)
          std::memcpy(&step, message.payload.data(), sizeof step);
        std::lock_guard lock(mutex_);
        last_seen_[static_cast<std::size_t>(source)] = Clock::now();
        last_step_[static_cast<std::size_t>(source)] = step;
      });
  thread_ = std::thread([this] { run(); });
}

HeartbeatWatch::~HeartbeatWatch() {
  stop();
}

void HeartbeatWatch::stop() {
  {
    std::lock_guard lock(mutex_);
    if (stopping_ && !thread_.joinable()) return;
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
  subscription_.reset();
}

std::vector<double> HeartbeatWatch::heartbeat_ages() const {
  std::lock_guard lock(mutex_);
  const auto now = Clock::now();
  std::vector<double> ages;
  for (std::size_t rank = 0; rank < last_seen_.size(); ++rank) {
    ages.push_back(static_cast<int>(rank) == bus_.rank()
                       ? 0.0
                       : std::chrono::duration<double>(now - last_seen_[rank]).count());
  }
  return ages;
}

void HeartbeatWatch::run() {
  std::unique_lock lock(mutex_);
  auto last_tick = Clock::now();
  while (!stopping_) {
    // A long gap since our own last round means this rank was the one frozen (SIGSTOP, then the
    // SIGCONT that precedes the job's tear-down): the others' silence is ours, blame nobody.
    const auto tick = Clock::now();
    if (tick - last_tick > options_.timeout / 2) {
      std::fill(last_seen_.begin(), last_seen_.end(), tick);
    }
    last_tick = tick;
    lock.unlock();
    const std::uint64_t step = step_.load(std::memory_order_relaxed);
    try {
      std::vector<std::byte> payload(sizeof step);
      std::memcpy(payload.data(), &step, sizeof step);
      bus_.publish(kHeartbeatTopic,
                   Message::make(Kind::kHeartbeat, kHeartbeatTopic, Payload(std::move(payload))));
    } catch (const ShutdownError&) {
      return;  // the bus is going away: so is this rank
    } catch (const std::exception&) {
      // A beat that could not be queued (a peer not reading fills our queue): watching matters
      // more than this one beat, and the silent peer is what the watchdog is for.
    }
    lock.lock();
    judge(Clock::now(), step, lock);
    wake_.wait_for(lock, options_.interval, [&] { return stopping_; });
  }
}

SilenceVerdict judge_silence(const std::vector<std::chrono::steady_clock::duration>& silent_for,
                             int self, const HeartbeatOptions& options) {
  SilenceVerdict verdict;
  const auto ranks = silent_for.size();
  for (std::size_t rank = 0; rank < ranks; ++rank) {
    if (static_cast<int>(rank) != self && silent_for[rank] > options.timeout) {
      verdict.lost.push_back(static_cast<int>(rank));
    }
  }
  if (verdict.lost.empty()) return verdict;
  // Reported with them: their host-mates silent for half the timeout (at least three beats).
  // Only host-mates: on a loaded machine a healthy rank's beat can be late by that much.
  const auto along = std::min(options.timeout, std::max(options.timeout / 2, 3 * options.interval));
  const auto& hosts = options.host_of_rank;
  const bool hosts_known = hosts.size() == ranks;
  for (std::size_t rank = 0; rank < ranks; ++rank) {
    if (static_cast<int>(rank) == self) continue;
    const bool is_lost = std::find(verdict.lost.begin(), verdict.lost.end(),
                                   static_cast<int>(rank)) != verdict.lost.end();
    const bool quiet = silent_for[rank] > along;
    const bool host_mate =
        hosts_known && std::any_of(verdict.lost.begin(), verdict.lost.end(), [&](int other) {
          return hosts[static_cast<std::size_t>(other)] == hosts[rank];
        });
    if (is_lost || (quiet && host_mate)) verdict.silent.push_back(static_cast<int>(rank));
    if (!is_lost && quiet && !host_mate) verdict.undecided = true;
  }
  verdict.quorum = hears_quorum(static_cast<int>(ranks), verdict.silent);
  return verdict;
}

void HeartbeatWatch::judge(Clock::time_point now, std::uint64_t step,
                           std::unique_lock<std::mutex>& lock) {
  if (reported_) return;
  std::vector<Clock::duration> silent_for;
  for (const auto& seen : last_seen_) silent_for.push_back(now - seen);
  const SilenceVerdict verdict = judge_silence(silent_for, bus_.rank(), options_);
  const auto& lost = verdict.lost;
  const auto& silent = verdict.silent;
  if (lost.empty()) {
    isolated_ = false;
    return;
  }
  if (verdict.undecided) return;
  const int world = static_cast<int>(last_seen_.size());
  const int heard = world - static_cast<int>(silent.size());
  if (!verdict.quorum) {
    // Most of the world silent at once is more likely this rank's own trouble than theirs.
    if (!isolated_) {
      isolated_ = true;
      isolated_since_ = now;
    }
    if (now - isolated_since_ <= options_.timeout) return;
    // Two halves: rank 0's had a whole timeout to act and did not, so it is the lost one.
    if (2 * heard < world) {
      if (!on_isolated_) return;  // nothing to do but keep watching
      reported_ = true;
      lock.unlock();
      on_isolated_(heard, world);
      lock.lock();
      return;
    }
  }
  reported_ = true;
  std::uint64_t last = step;
  for (int rank : silent) last = std::min(last, last_step_[static_cast<std::size_t>(rank)]);
  lock.unlock();
  on_loss_(silent, last);
  lock.lock();
}

}  // namespace unimsg
