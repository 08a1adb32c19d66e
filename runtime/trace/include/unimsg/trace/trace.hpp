#pragma once

// Spans of activity for a Chrome-trace / Perfetto timeline (UNIMSG_TIMELINE): the engine, the
// compressors, the checkpointer and the training loop record what they do, each on a lane of its
// own; the monitor (monitor.hpp) merges every rank's spans into one file on rank 0.
//
// Recording is cheap enough to leave in hot paths: a span that nobody records (a null
// recorder) costs one branch; a recorded one, two clock reads and a short locked append.
// Memory is bounded: past `max_events` further spans are counted, not kept.

#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace unimsg {

struct TraceEvent {
  std::string lane;  // the timeline row ("engine", "training", "checkpoint", ...)
  std::string name;  // what happened ("allreduce", "negotiate", "step", ...)
  std::chrono::steady_clock::time_point start;
  std::chrono::nanoseconds duration{0};
  std::string args_json;  // a JSON object shown with the span, or empty
};

class TraceRecorder {
 public:
  explicit TraceRecorder(std::size_t max_events = 1u << 20);

  void record(TraceEvent event);
  // Moves the recorded events out (the recorder keeps recording afterwards).
  std::vector<TraceEvent> take();
  std::uint64_t dropped() const;

 private:
  mutable std::mutex mutex_;
  std::size_t max_events_;
  std::vector<TraceEvent> events_;
  std::uint64_t dropped_ = 0;
};

// Records [construction, destruction) on `lane` when `recorder` is not null.
class TraceSpan {
 public:
  TraceSpan(TraceRecorder* recorder, std::string_view lane, std::string_view name,
            std::string args_json = {});
  ~TraceSpan();
  TraceSpan(const TraceSpan&) = delete;
  TraceSpan& operator=(const TraceSpan&) = delete;

  // Arguments known only once the work is done (bytes moved, a result).
  void set_args(std::string args_json);

 private:
  TraceRecorder* recorder_;
  std::string_view lane_;
  std::string_view name_;
  std::string args_json_;
  std::chrono::steady_clock::time_point start_;
};

// One Chrome-trace "complete" event (ph "X") per span, comma-separated (no brackets), with
// times in microseconds on a clock shifted by `offset` (this rank's steady clock to the
// timeline's) and relative to `origin`; `pid` is the rank. Lanes become threads: `lanes` maps
// the lanes named so far to their thread ids (pass the same map for every slice of one rank's
// spans); the process and each new lane get their name events.
std::string to_chrome_trace_events(std::span<const TraceEvent> events, int pid,
                                   std::chrono::nanoseconds offset,
                                   std::chrono::steady_clock::time_point origin,
                                   std::map<std::string, int>& lanes);

}  // namespace unimsg
