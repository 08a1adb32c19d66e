#pragma once

// The data dispatcher: rank 0 hands out ranges of an epoch's sample positions on request, over
// the bus, so that a faster rank simply asks more often and takes more (pull-based load
// balancing). A range is leased: its consumer acknowledges it when done; one not acknowledged
// before its lease expires (its rank died or hung) goes back to the queue, and an
// acknowledgement for it that comes late is ignored, so no range is lost and none counts twice.
//
//   DataDispatcher dispatcher(bus, dataset_size, options);     // collective
//   while (auto range = dispatcher.next()) {                  // [begin, end) of the epoch order
//     train_on(range->begin, range->end);
//     dispatcher.complete(*range);
//   }
//   barrier();  // rank 0 serves until every rank is done: destroy it everywhere after that
//
// Ranks then take different numbers of ranges, so a synchronous data-parallel step loop needs
// the engine's join() for the ranks that run out first.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>

#include "unimsg/bus/bus.hpp"

namespace unimsg {

struct DispatcherOptions {
  std::size_t range_size = 256;            // positions per range
  std::chrono::milliseconds lease{30000};  // a range not acknowledged by then is re-queued
  std::chrono::milliseconds request_timeout{60000};
  std::chrono::milliseconds retry_interval{20};  // while others still hold the last ranges
};

struct SampleRange {
  std::uint64_t epoch = 0;
  std::size_t begin = 0;  // positions in the epoch's order
  std::size_t end = 0;
  std::uint64_t lease = 0;
};

struct DispatcherStats {  // rank 0's view
  std::size_t handed_out = 0;
  std::size_t completed = 0;
  std::size_t requeued = 0;   // leases that expired
  std::size_t late_acks = 0;  // acknowledgements of expired leases, ignored
  std::map<int, std::size_t> completed_by_rank;
};

class DataDispatcher {
 public:
  // Collective over the bus's ranks. Starts epoch 0.
  DataDispatcher(Bus& bus, std::size_t dataset_size, DispatcherOptions options = {});
  ~DataDispatcher();
  DataDispatcher(const DataDispatcher&) = delete;
  DataDispatcher& operator=(const DataDispatcher&) = delete;

  // The next range of the current epoch for this rank; nullopt once every range of the epoch is
  // acknowledged. Waits while other ranks hold the last ones (they may yet be re-queued).
  std::optional<SampleRange> next();
  // True if it counted; false if the lease had expired (the range went to another rank, whose
  // work counts instead).
  bool complete(const SampleRange& range);
  // Rank 0 only: starts `epoch` from `position` (after a restore). Ranges of the old epoch still
  // out are forgotten.
  void start_epoch(std::uint64_t epoch, std::size_t position = 0);
  DispatcherStats stats() const;  // meaningful on rank 0

 private:
  struct Server;
  Bus& bus_;
  DispatcherOptions options_;
  std::unique_ptr<Server> server_;  // rank 0
  Subscription subscription_;
};

}  // namespace unimsg
