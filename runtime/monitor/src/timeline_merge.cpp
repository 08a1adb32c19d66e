// The merged timeline: every rank aligns its steady clock with rank 0's at construction
// (Cristian's algorithm over the bus), and at finish() sends its spans to rank 0, which writes
// them all into one Chrome-trace / Perfetto file.

#include <spdlog/spdlog.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <exception>
#include <fstream>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "monitor_internal.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/monitor/monitor.hpp"

namespace unimsg {
namespace {

using detail::Clock;
using nlohmann::json;
namespace fs = std::filesystem;

// Spans per timeline message: a rank's spans go to rank 0 in pieces that each stay a modest
// bus message however many spans it kept.
constexpr std::size_t kSpansPerFragment = 20000;
// Round trips sync_clock() tries; the one with the least delay gives the offset.
constexpr int kClockRounds = 8;

std::int64_t nanoseconds_of(Clock::time_point time) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(time.time_since_epoch()).count();
}

// This rank's spans as Chrome-trace event lists (comma-separated, no brackets), at least one,
// the last one marking how many spans were dropped past the recorder's limit.
std::vector<std::string> timeline_fragments(std::span<const TraceEvent> spans,
                                            std::uint64_t dropped, int rank,
                                            std::chrono::nanoseconds clock_offset,
                                            Clock::time_point origin) {
  std::vector<std::string> fragments;
  std::map<std::string, int> lanes;
  for (std::size_t from = 0; from < spans.size() || fragments.empty(); from += kSpansPerFragment) {
    const std::size_t to = std::min(spans.size(), from + kSpansPerFragment);
    fragments.push_back(
        to_chrome_trace_events(spans.subspan(from, to - from), rank, clock_offset, origin, lanes));
  }
  if (dropped > 0) {
    fragments.back() += ',';
    fragments.back() += json{{"name", "spans dropped (UNIMSG_TIMELINE_MAX_EVENTS)"},
                             {"ph", "i"},
                             {"s", "p"},
                             {"pid", rank},
                             {"tid", 0},
                             {"ts", 0},
                             {"args", {{"dropped", dropped}}}}
                            .dump();
  }
  return fragments;
}

// The merged file, written to <path>.tmp and renamed into place once whole, so that a reader
// never sees a timeline cut short.
class TimelineFile {
 public:
  explicit TimelineFile(const fs::path& path)
      : path_(path), temp_(path.string() + ".tmp"), out_(temp_, std::ios::trunc) {
    if (out_) out_ << "{\"traceEvents\":[";
  }

  bool is_open() const { return static_cast<bool>(out_); }
  const fs::path& temp() const { return temp_; }

  void append(std::string_view fragment) {
    if (fragment.empty()) return;
    if (!first_) out_ << ',';
    out_ << fragment;
    first_ = false;
  }

  // Closes the event list with `other_data` and renames the file into place; false (logged)
  // when either fails.
  bool commit(const json& other_data, spdlog::logger& log) {
    out_ << "],\"displayTimeUnit\":\"ms\",\"otherData\":" << other_data.dump() << "}\n";
    out_.close();
    if (!out_) {
      log.error("monitor: could not write the timeline {}", temp_.string());
      return false;
    }
    std::error_code error;
    fs::rename(temp_, path_, error);
    if (error) {
      log.error("monitor: cannot rename {} to {}: {}", temp_.string(), path_.string(),
                error.message());
      return false;
    }
    return true;
  }

 private:
  fs::path path_, temp_;
  std::ofstream out_;
  bool first_ = true;
};

// Appends the other ranks' fragments to `out` as they arrive, until every rank has sent its last
// one or `timeout` passes; marks those ranks in `done` and returns the spans appended.
std::size_t receive_peer_fragments(Bus& bus, spdlog::logger& log, Clock::duration timeout,
                                   TimelineFile& out, std::vector<bool>& done) {
  std::size_t spans = 0;
  int remaining = static_cast<int>(std::count(done.begin(), done.end(), false));
  const auto deadline = Clock::now() + timeout;
  while (remaining > 0) {
    const auto left = deadline - Clock::now();
    if (left <= Clock::duration::zero()) break;
    Message message;
    try {
      message = bus.receive(Filter{Kind::kStatus, kTimelineTopic, std::nullopt}, left);
    } catch (const TimeoutError&) {
      break;
    }
    const int source = message.header.source;
    const std::string_view payload = message.payload.as_string();
    if (source <= 0 || source >= bus.size() || done[static_cast<std::size_t>(source)] ||
        payload.empty() || (payload[0] != '0' && payload[0] != '1')) {
      log.warn("monitor: ignored a malformed timeline message from rank {}", source);
      continue;
    }
    const std::string_view fragment = payload.substr(1);
    std::string bracketed = "[";
    bracketed.append(fragment).append("]");
    const json parsed = json::parse(bracketed, nullptr, false);
    if (parsed.is_discarded() || !parsed.is_array()) {
      log.warn("monitor: ignored a malformed timeline fragment from rank {}", source);
    } else {
      spans += parsed.size();
      out.append(fragment);
    }
    if (payload[0] == '1') {
      done[static_cast<std::size_t>(source)] = true;
      --remaining;
    }
  }
  return spans;
}

}  // namespace

Payload detail::clock_reply(Clock::time_point timeline_origin) {
  const std::int64_t times[2] = {nanoseconds_of(Clock::now()), nanoseconds_of(timeline_origin)};
  std::vector<std::byte> payload(sizeof times);
  std::memcpy(payload.data(), times, sizeof times);
  return Payload(std::move(payload));
}

void Monitor::sync_clock() {
  // Cristian's algorithm: the round trip with the least delay bounds the error best.
  std::optional<std::chrono::nanoseconds> best_rtt;
  for (int round = 0; round < kClockRounds; ++round) {
    try {
      const auto sent = Clock::now();
      const Message reply =
          bus_.request(0, Message::make(Kind::kStatus, kClockTopic), std::chrono::seconds(30))
              .get();
      const auto received = Clock::now();
      std::int64_t times[2] = {};
      if (reply.payload.size() != sizeof times) {
        throw DecodeError(DecodeErrorCode::kBadPayload,
                          "clock reply of " + std::to_string(reply.payload.size()) + " bytes");
      }
      std::memcpy(times, reply.payload.data(), sizeof times);
      const auto rtt = received - sent;
      if (!best_rtt || rtt < *best_rtt) {
        best_rtt = rtt;
        const auto midpoint = sent + rtt / 2;
        clock_offset_ = std::chrono::nanoseconds(times[0] - nanoseconds_of(midpoint));
        timeline_origin_ = Clock::time_point(
            std::chrono::duration_cast<Clock::duration>(std::chrono::nanoseconds(times[1])));
      }
    } catch (const std::exception& error) {
      log_->warn("monitor: timeline clock not aligned with rank 0 ({}): spans may be shifted",
                 error.what());
      return;
    }
  }
}

void Monitor::merge_timeline(bool wait_for_peers) {
  const std::vector<TraceEvent> spans = trace_->take();
  const std::uint64_t dropped = trace_->dropped();
  const std::vector<std::string> fragments =
      timeline_fragments(spans, dropped, bus_.rank(), clock_offset_, timeline_origin_);
  if (dropped > 0) {
    log_->warn("monitor: {} timeline span(s) dropped past UNIMSG_TIMELINE_MAX_EVENTS={}", dropped,
               options_.timeline_max_events);
  }
  if (bus_.rank() != 0) {
    if (!wait_for_peers) return;
    for (std::size_t i = 0; i < fragments.size(); ++i) {
      std::string payload(1, i + 1 == fragments.size() ? '1' : '0');
      payload += fragments[i];
      bus_.send(0, Message::make(Kind::kStatus, kTimelineTopic, Payload::from_string(payload)));
    }
    return;
  }
  TimelineFile out(options_.timeline);
  if (!out.is_open()) {
    log_->error("monitor: cannot write the timeline {}", out.temp().string());
    return;
  }
  std::size_t spans_total = spans.size();
  for (const auto& fragment : fragments) out.append(fragment);
  std::vector<bool> done(static_cast<std::size_t>(bus_.size()), false);
  done[0] = true;
  if (wait_for_peers) {
    spans_total += receive_peer_fragments(bus_, *log_, options_.finish_timeout, out, done);
  }
  json missing = json::array();
  for (int r = 0; r < bus_.size(); ++r) {
    if (!done[static_cast<std::size_t>(r)]) missing.push_back(r);
  }
  const json other_data{{"job", options_.job},
                        {"world_size", bus_.size()},
                        {"restart", options_.restart},
                        {"missing_ranks", missing}};
  if (!out.commit(other_data, *log_)) return;
  if (!missing.empty()) {
    log_->warn("monitor: timeline without ranks {} (nothing arrived within {} s)", missing.dump(),
               options_.finish_timeout.count());
  }
  log_->info("monitor: timeline of {} ranks ({} events) in {}", bus_.size() - missing.size(),
             spans_total, options_.timeline.string());
}

}  // namespace unimsg
