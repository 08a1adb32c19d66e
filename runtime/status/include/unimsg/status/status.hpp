#pragma once

// What ranks tell rank 0 about their training, and what rank 0 makes of it (no MPI here: the
// monitor service in monitor.hpp moves reports over the bus and serves the board).
//
// Every rank sends a StatusReport (Kind::kStatus, JSON payload) covering the steps since its
// previous report. Rank 0's StatusBoard keeps each rank's latest figures and a short history,
// flags stragglers, and renders them as Prometheus text and as the JSON the live page, the
// launcher's progress line and metrics.jsonl read.

#include <array>
#include <chrono>
#include <cstdint>
#include <deque>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace unimsg {

struct StatusReport {
  int rank = 0;
  std::uint64_t step = 0;         // optimizer steps this rank has completed
  std::uint64_t total_steps = 0;  // of the whole run (0: unknown)
  // The window: the steps since the previous report and what they took.
  std::uint64_t steps = 0;
  std::uint64_t samples = 0;         // samples this rank trained on
  double seconds = 0;                // wall time
  double compute_seconds = 0;        // seconds - wait_seconds: this rank's own work
  double communication_seconds = 0;  // the engine reducing (overlaps compute)
  double wait_seconds = 0;           // blocked waiting for reductions and peers
  double loss = std::numeric_limits<double>::quiet_NaN();  // the last step's (NaN: none)
  // Totals since the start of this launch.
  std::uint64_t wire_bytes = 0;        // bytes this rank sent for gradient reductions
  std::uint64_t dense_wire_bytes = 0;  // what they would have been uncompressed
  std::uint64_t rss_bytes = 0;         // resident memory
  double heartbeat_age_seconds = 0;    // the oldest heartbeat this rank has seen (0: none kept)
  std::string host;
  bool final_report = false;  // the rank's last report

  nlohmann::json to_json_value() const;
  std::string to_json() const;  // to_json_value().dump()
  // Validates a payload off the wire: every field of the right type and range, the rank equal
  // to `source_rank` (the envelope's). A DecodeError names what was wrong.
  static StatusReport parse(std::string_view payload, int source_rank, int world_size);
};

struct StragglerOptions {
  // A rank is flagged when its compute time per step stays above `factor` x the median of the
  // other ranks' for `steps` steps in a row (and cleared after as many steps back in line)
  // (UNIMSG_STRAGGLER_FACTOR, UNIMSG_STRAGGLER_STEPS), and is at least `min_excess` slower
  // (UNIMSG_STRAGGLER_MIN_MS: scheduling noise on millisecond steps is not a straggler).
  double factor = 1.5;
  std::uint64_t steps = 20;
  std::chrono::duration<double> min_excess{0.005};
  static StragglerOptions from_env();
};

// Compute time, not step time, is compared: with synchronous gradient averaging every rank's
// step takes as long as the slowest one's, and what a straggler changes is that the others wait
// for it (their compute stays short, their waiting grows).
class StragglerDetector {
 public:
  StragglerDetector(int world_size, StragglerOptions options);

  struct Change {
    int rank = 0;
    bool straggler = false;  // flagged (true) or back in line (false)
    double compute_per_step = 0;
    double median_of_others = 0;
    std::uint64_t steps = 0;  // consecutive slow steps behind the verdict
    std::string text;         // the verdict in words (set by StatusBoard::add)
  };
  // One report's window: `steps` steps that took `compute_per_step` seconds each on `rank`.
  std::optional<Change> add(int rank, std::uint64_t steps, double compute_per_step);
  bool flagged(int rank) const;

 private:
  struct RankState {
    std::optional<double> latest;
    std::uint64_t slow_steps = 0;
    std::uint64_t fast_steps = 0;
    bool flagged = false;
  };
  StragglerOptions options_;
  std::vector<RankState> ranks_;
};

struct StatusEvent {
  double time = 0;   // Unix seconds
  std::string kind;  // "launch", "failure", "rerank", "straggler", "fault", ...
  std::string text;
};

// Rank 0's view of the run. Thread-safe: reports arrive on the bus thread while HTTP and the
// ticker read (what they render is copied under the lock and rendered outside it).
class StatusBoard {
 public:
  StatusBoard(int world_size, StragglerOptions straggler, std::string job, int restart);

  // Returns the straggler verdict the report changed, if any (also kept as an event).
  std::optional<StragglerDetector::Change> add(const StatusReport& report, double now);
  void set_heartbeat_ages(const std::vector<double>& ages);
  void add_event(StatusEvent event);
  // Appends one point per rank to the charts' history (called once a second).
  void sample(double now);

  // The Prometheus text exposition (version 0.0.4).
  std::string prometheus(double now) const;
  // Everything the page shows; `with_history` adds the charts' points.
  nlohmann::json snapshot(double now, bool with_history) const;

  static constexpr std::size_t kHistoryPoints = 600;
  static constexpr std::size_t kEventsKept = 200;

 private:
  struct RankView {
    std::optional<StatusReport> latest;
    double received = 0;        // when (Unix seconds)
    double heartbeat_age = -1;  // rank 0's view (-1: unknown)
    bool straggler = false;
    std::deque<std::array<double, 4>> history;  // time, step seconds, samples/s, compute seconds
  };
  nlohmann::json rank_json(int rank, const RankView& view, double now) const;
  // The ranks' views, with their histories or without (mutex_ held).
  std::vector<RankView> copy_ranks(bool with_history) const;

  mutable std::mutex mutex_;
  std::string job_;
  int restart_ = 0;
  StragglerDetector detector_;
  std::vector<RankView> ranks_;
  std::deque<StatusEvent> events_;
};

}  // namespace unimsg
