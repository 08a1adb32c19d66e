#include "unimsg/trace/trace.hpp"

#include <nlohmann/json.hpp>

#include <map>

namespace unimsg {

TraceRecorder::TraceRecorder(std::size_t max_events) : max_events_(max_events) {}

void TraceRecorder::record(TraceEvent event) {
  std::lock_guard lock(mutex_);
  if (events_.size() >= max_events_) {
    ++dropped_;
    return;
  }
  events_.push_back(std::move(event));
}

std::vector<TraceEvent> TraceRecorder::take() {
  std::lock_guard lock(mutex_);
  std::vector<TraceEvent> out;
  out.swap(events_);
  return out;
}

std::uint64_t TraceRecorder::dropped() const {
  std::lock_guard lock(mutex_);
  return dropped_;
}

TraceSpan::TraceSpan(TraceRecorder* recorder, std::string_view lane, std::string_view name,
                     std::string args_json)
    : recorder_(recorder), lane_(lane), name_(name), args_json_(std::move(args_json)) {
  if (recorder_ != nullptr) start_ = std::chrono::steady_clock::now();
}

TraceSpan::~TraceSpan() {
  if (recorder_ == nullptr) return;
  const auto end = std::chrono::steady_clock::now();
  try {
    recorder_->record(
        {std::string(lane_), std::string(name_), start_, end - start_, std::move(args_json_)});
  } catch (...) {
    // Out of memory for one span: the timeline loses it, the work it describes goes on.
  }
}

void TraceSpan::set_args(std::string args_json) {
  if (recorder_ != nullptr) args_json_ = std::move(args_json);
}

std::string to_chrome_trace_events(std::span<const TraceEvent> events, int pid,
                                   std::chrono::nanoseconds offset,
                                   std::chrono::steady_clock::time_point origin,
                                   std::map<std::string, int>& lanes) {
  using nlohmann::json;
  std::string out;
  const auto append = [&out](const json& event) {
    if (!out.empty()) out += ',';
    out += event.dump();
  };
  if (lanes.empty()) {
    append({{"name", "process_name"},
            {"ph", "M"},
            {"pid", pid},
            {"tid", 0},
            {"args", {{"name", "rank " + std::to_string(pid)}}}});
    append({{"name", "process_sort_index"},
            {"ph", "M"},
            {"pid", pid},
            {"tid", 0},
            {"args", {{"sort_index", pid}}}});
  }
  for (const auto& event : events) {
    auto [it, added] = lanes.emplace(event.lane, static_cast<int>(lanes.size()) + 1);
    if (added) {
      append({{"name", "thread_name"},
              {"ph", "M"},
              {"pid", pid},
              {"tid", it->second},
              {"args", {{"name", event.lane}}}});
    }
    const auto start = event.start + offset - origin;
    json item{{"name", event.name},
              {"cat", event.lane},
              {"ph", "X"},
              {"pid", pid},
              {"tid", it->second},
              {"ts", std::chrono::duration<double, std::micro>(start).count()},
              {"dur", std::chrono::duration<double, std::micro>(event.duration).count()}};
    if (!event.args_json.empty()) {
      auto args = json::parse(event.args_json, nullptr, /*allow_exceptions=*/false);
      if (!args.is_discarded()) item["args"] = std::move(args);
    }
    append(item);
  }
  return out;
}

}  // namespace unimsg
