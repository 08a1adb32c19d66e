#pragma once

// A download task queue over the bus. Any rank submits tasks ("fetch this URL into the cache,
// expect this SHA-256"); workers on every rank take them; rank 0 keeps the queue.
//
//   FetchQueue queue(bus, options);                  // collective: workers start on every rank
//   auto result = queue.submit(spec);                // any rank; a future of the outcome
//   queue.drain();                                   // collective: returns once every task is done
//   FetchResult r = result.get();                    // r.outcome.status, .path, .attempts, ...
//
// Load balancing by credits: each rank runs `workers` workers, and a worker asks rank 0 for a
// task only when it is free, so a busy or slow rank simply asks less (the least-loaded worker
// gets the next task). Delivery is at least once with idempotent completion: a task is leased to
// its worker, which renews the lease while it works; a task whose lease runs out (its rank died
// or hung) goes back to the front of the queue, and of several results for one task the first
// counts and the others are ignored. A task whose lease ran out `max_deliveries` times goes to
// the dead-letter list and fails. Downloads themselves retry inside fetch_file (retryable errors
// with back-off, per-attempt timeouts); a file that still fails is a failed result, also listed
// as a dead letter on rank 0.

#include <chrono>
#include <cstdint>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "unimsg/bus/bus.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/fetch/fetch.hpp"

namespace unimsg {

struct FetchQueueOptions {
  int workers = 2;                          // per rank: concurrent downloads (credits)
  std::chrono::milliseconds lease{30000};   // re-queued when not renewed for this long
  int max_deliveries = 3;                   // leases that may run out before a dead letter
  std::chrono::milliseconds idle_poll{50};  // an idle worker's pause between asks
  std::chrono::milliseconds request_timeout{60000};
  // drain() throws TimeoutError once the queue has seen no progress (a task taken, renewed or
  // finished, a rank joining the drain) for this long; never less than the lease.
  std::chrono::milliseconds stall_timeout{120000};
  FetchOptions fetch;
};

struct FetchResult {
  FetchOutcome outcome;
  std::uint64_t task = 0;  // rank 0's id
  int worker_rank = -1;    // the rank whose result counted (-1: none, a dead letter)
  int deliveries = 0;      // times the task was handed to a worker
};

struct FetchQueueStats {  // rank 0's view
  std::uint64_t submitted = 0;
  std::uint64_t completed = 0;
  std::uint64_t requeued = 0;           // leases that ran out
  std::uint64_t duplicate_results = 0;  // results for a task already completed, ignored
  std::vector<FetchResult> dead_letters;
};

// drain() gave up: the queue stood still for the stall timeout. absent_ranks(): the ranks that
// had not called drain() (frozen, or stuck elsewhere).
class DrainStalledError : public TimeoutError {
 public:
  DrainStalledError(int rank, std::string cause, std::vector<int> absent_ranks);
  const std::vector<int>& absent_ranks() const noexcept { return absent_ranks_; }

 private:
  std::vector<int> absent_ranks_;
};

class FetchQueue {
 public:
  // Collective over the bus's ranks.
  FetchQueue(Bus& bus, FetchQueueOptions options);
  // Collective: stops this rank's workers (a download under way finishes first), then rank 0
  // stops serving once every rank has stopped asking. Futures not fulfilled fail.
  ~FetchQueue();
  FetchQueue(const FetchQueue&) = delete;
  FetchQueue& operator=(const FetchQueue&) = delete;

  // Where the file is needed: anywhere (the first free worker takes it), or in this host's
  // cache (a worker on this host takes it: every node that needs a file gets it, once).
  enum class Placement { kAnyHost, kThisHost };
  // Any rank. The future holds the outcome (a failed one too) or, if the queue stops first,
  // ShutdownError.
  std::future<FetchResult> submit(FetchSpec spec, Placement placement = Placement::kAnyHost);
  // Collective, once, at the end: returns on every rank once every rank has called it and every
  // task submitted before is completed or dead. Throws DrainStalledError when nothing has moved
  // (no task submitted, taken, renewed or finished, no rank joining) for the stall timeout.
  void drain();
  FetchQueueStats stats() const;  // meaningful on rank 0

  // Tests: the next `tasks` tasks this rank takes are abandoned, each by a worker that then
  // stops, as a worker that died mid-task.
  void abandon_tasks_for_testing(int tasks);

 private:
  struct Server;
  struct Client;
  Bus& bus_;
  FetchQueueOptions options_;
  std::unique_ptr<Server> server_;  // rank 0
  std::shared_ptr<Client> client_;
  Subscription server_subscription_;
  Subscription result_subscription_;
  std::vector<std::thread> workers_;
  std::thread renewer_;
};

}  // namespace unimsg
