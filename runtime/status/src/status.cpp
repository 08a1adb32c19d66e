#include "unimsg/status/status.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "unimsg/core/config.hpp"
#include "unimsg/core/error.hpp"

namespace unimsg {
namespace {

using nlohmann::json;

[[noreturn]] void bad_report(int source, const std::string& why) {
  throw DecodeError(DecodeErrorCode::kBadPayload,
                    "status report from rank " + std::to_string(source) + ": " + why);
}

std::uint64_t get_uint(const json& object, const char* key, int source) {
  const auto it = object.find(key);
  if (it == object.end()) bad_report(source, std::string("no \"") + key + "\"");
  if (!it->is_number_unsigned()) {
    bad_report(source, std::string("\"") + key + "\" is not a non-negative integer");
  }
  return it->get<std::uint64_t>();
}

double get_seconds(const json& object, const char* key, int source) {
  const auto it = object.find(key);
  if (it == object.end()) bad_report(source, std::string("no \"") + key + "\"");
  if (!it->is_number()) bad_report(source, std::string("\"") + key + "\" is not a number");
  const double value = it->get<double>();
  // (A year bounds any window or age a sane report carries.)
  if (!(value >= 0 && value <= 365.0 * 86400)) {
    bad_report(source, std::string("\"") + key + "\" is out of range");
  }
  return value;
}

std::string number(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  char text[32];
  // Counters (bytes) exactly, as integers; the rest to 9 significant digits.
  if (std::floor(value) == value && std::fabs(value) < 1e15) {
    std::snprintf(text, sizeof text, "%.0f", value);
  } else {
    std::snprintf(text, sizeof text, "%.9g", value);
  }
  return text;
}

double per_step(double seconds, std::uint64_t steps) {
  return steps > 0 ? seconds / static_cast<double>(steps) : 0.0;
}

double samples_per_second(const StatusReport& report) {
  return report.seconds > 0 ? static_cast<double>(report.samples) / report.seconds : 0.0;
}

double compression_ratio(const StatusReport& report) {
  return report.wire_bytes > 0
             ? static_cast<double>(report.dense_wire_bytes) / static_cast<double>(report.wire_bytes)
             : 1.0;
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
}

}  // namespace

std::string StatusReport::to_json() const {
  return to_json_value().dump();
}

json StatusReport::to_json_value() const {
  json out{{"rank", rank},
           {"step", step},
           {"total_steps", total_steps},
           {"steps", steps},
           {"samples", samples},
           {"seconds", seconds},
           {"compute_seconds", compute_seconds},
           {"communication_seconds", communication_seconds},
           {"wait_seconds", wait_seconds},
           {"wire_bytes", wire_bytes},
           {"dense_wire_bytes", dense_wire_bytes},
           {"rss_bytes", rss_bytes},
           {"heartbeat_age_seconds", heartbeat_age_seconds},
           {"host", host},
           {"final", final_report}};
  out["loss"] = std::isfinite(loss) ? json(loss) : json(nullptr);
  return out;
}

StatusReport StatusReport::parse(std::string_view payload, int source_rank, int world_size) {
  const json object = json::parse(payload, nullptr, /*allow_exceptions=*/false);
  if (object.is_discarded()) bad_report(source_rank, "not JSON");
  if (!object.is_object()) bad_report(source_rank, "not a JSON object");
  StatusReport report;
  const std::uint64_t rank = get_uint(object, "rank", source_rank);
  if (source_rank < 0 || source_rank >= world_size ||
      rank != static_cast<std::uint64_t>(source_rank)) {
    bad_report(source_rank, "claims to come from rank " + std::to_string(rank));
  }
  report.rank = source_rank;
  report.step = get_uint(object, "step", source_rank);
  report.total_steps = get_uint(object, "total_steps", source_rank);
  report.steps = get_uint(object, "steps", source_rank);
  report.samples = get_uint(object, "samples", source_rank);
  report.seconds = get_seconds(object, "seconds", source_rank);
  report.compute_seconds = get_seconds(object, "compute_seconds", source_rank);
  report.communication_seconds = get_seconds(object, "communication_seconds", source_rank);
  report.wait_seconds = get_seconds(object, "wait_seconds", source_rank);
  report.wire_bytes = get_uint(object, "wire_bytes", source_rank);
  report.dense_wire_bytes = get_uint(object, "dense_wire_bytes", source_rank);
  report.rss_bytes = get_uint(object, "rss_bytes", source_rank);
  report.heartbeat_age_seconds = get_seconds(object, "heartbeat_age_seconds", source_rank);
  if (report.steps > report.step) bad_report(source_rank, "more steps in the window than in all");
  const auto loss = object.find("loss");
  if (loss == object.end()) bad_report(source_rank, "no \"loss\"");
  if (loss->is_number()) {
    report.loss = loss->get<double>();
  } else if (!loss->is_null()) {
    bad_report(source_rank, "\"loss\" is neither a number nor null");
  }
  const auto host = object.find("host");
  if (host == object.end() || !host->is_string()) bad_report(source_rank, "no \"host\" string");
  report.host = host->get<std::string>();
  if (report.host.size() > 255) bad_report(source_rank, "\"host\" is longer than 255 bytes");
  const auto final = object.find("final");
  if (final == object.end() || !final->is_boolean()) {
    bad_report(source_rank, "no \"final\" boolean");
  }
  report.final_report = final->get<bool>();
  return report;
}

StragglerOptions StragglerOptions::from_env() {
  StragglerOptions options;
  if (auto v = env_double("UNIMSG_STRAGGLER_FACTOR", 1.01, 1000)) options.factor = *v;
  if (auto v = env_uint("UNIMSG_STRAGGLER_STEPS", 1, 1u << 30)) options.steps = *v;
  if (auto v = env_double("UNIMSG_STRAGGLER_MIN_MS", 0, 3.6e6)) {
    options.min_excess = std::chrono::duration<double>(*v / 1000);
  }
  return options;
}

StragglerDetector::StragglerDetector(int world_size, StragglerOptions options)
    : options_(options), ranks_(static_cast<std::size_t>(std::max(world_size, 1))) {}

std::optional<StragglerDetector::Change> StragglerDetector::add(int rank, std::uint64_t steps,
                                                                double compute_per_step) {
  if (rank < 0 || rank >= static_cast<int>(ranks_.size()) || steps == 0) return std::nullopt;
  RankState& state = ranks_[static_cast<std::size_t>(rank)];
  state.latest = compute_per_step;
  std::vector<double> others;
  for (std::size_t r = 0; r < ranks_.size(); ++r) {
    if (static_cast<int>(r) != rank && ranks_[r].latest) others.push_back(*ranks_[r].latest);
  }
  if (others.empty()) return std::nullopt;  // nobody to compare with (yet)
  const double reference = median(std::move(others));
  const bool slow = compute_per_step > options_.factor * reference &&
                    compute_per_step - reference >= options_.min_excess.count();
  Change change{rank, false, compute_per_step, reference, 0, {}};
  // Both verdicts need `steps` consecutive steps: one short window (the first step after an
  // evaluation pause) neither flags a rank nor clears it.
  if (slow) {
    state.slow_steps += steps;
    state.fast_steps = 0;
    change.steps = state.slow_steps;
    if (!state.flagged && state.slow_steps >= options_.steps) {
      state.flagged = true;
      change.straggler = true;
      return change;
    }
  } else {
    state.slow_steps = 0;
    state.fast_steps += steps;
    change.steps = state.fast_steps;
    if (state.flagged && state.fast_steps >= options_.steps) {
      state.flagged = false;
      return change;
    }
  }
  return std::nullopt;
}

bool StragglerDetector::flagged(int rank) const {
  return rank >= 0 && rank < static_cast<int>(ranks_.size()) &&
         ranks_[static_cast<std::size_t>(rank)].flagged;
}

StatusBoard::StatusBoard(int world_size, StragglerOptions straggler, std::string job, int restart)
    : job_(std::move(job)),
      restart_(restart),
      detector_(world_size, straggler),
      ranks_(static_cast<std::size_t>(std::max(world_size, 1))) {}

std::optional<StragglerDetector::Change> StatusBoard::add(const StatusReport& report, double now) {
  std::lock_guard lock(mutex_);
  if (report.rank < 0 || report.rank >= static_cast<int>(ranks_.size())) return std::nullopt;
  RankView& view = ranks_[static_cast<std::size_t>(report.rank)];
  if (report.steps == 0 && view.latest) {
    // An empty window (a last report right after a step's) says nothing about speed: the
    // figures of the previous window stand.
    const StatusReport& previous = *view.latest;
    StatusReport merged = report;
    merged.steps = previous.steps;
    merged.samples = previous.samples;
    merged.seconds = previous.seconds;
    merged.compute_seconds = previous.compute_seconds;
    merged.communication_seconds = previous.communication_seconds;
    merged.wait_seconds = previous.wait_seconds;
    view.latest = merged;
    view.received = now;
    return std::nullopt;
  }
  view.latest = report;
  view.received = now;
  auto change =
      detector_.add(report.rank, report.steps, per_step(report.compute_seconds, report.steps));
  if (change) {
    view.straggler = change->straggler;
    char text[256];
    if (change->straggler) {
      std::snprintf(
          text, sizeof text,
          "rank %d is a straggler: %.1f ms of compute per step, %.1fx the median of the "
          "other ranks (%.1f ms), for %llu steps",
          change->rank, change->compute_per_step * 1e3,
          change->median_of_others > 0 ? change->compute_per_step / change->median_of_others : 0.0,
          change->median_of_others * 1e3, static_cast<unsigned long long>(change->steps));
    } else {
      std::snprintf(text, sizeof text,
                    "rank %d is back in line: %.1f ms of compute per step, the others' median "
                    "%.1f ms, for %llu steps",
                    change->rank, change->compute_per_step * 1e3, change->median_of_others * 1e3,
                    static_cast<unsigned long long>(change->steps));
    }
    change->text = text;
    events_.push_back({now, change->straggler ? "straggler" : "straggler_cleared", text});
    if (events_.size() > kEventsKept) events_.pop_front();
  }
  return change;
}

void StatusBoard::set_heartbeat_ages(const std::vector<double>& ages) {
  std::lock_guard lock(mutex_);
  for (std::size_t r = 0; r < ranks_.size() && r < ages.size(); ++r) {
    ranks_[r].heartbeat_age = ages[r];
  }
}

void StatusBoard::add_event(StatusEvent event) {
  std::lock_guard lock(mutex_);
  events_.push_back(std::move(event));
  if (events_.size() > kEventsKept) events_.pop_front();
}

void StatusBoard::sample(double now) {
  std::lock_guard lock(mutex_);
  for (auto& view : ranks_) {
    if (!view.latest) continue;
    const StatusReport& r = *view.latest;
    view.history.push_back({now, per_step(r.seconds, r.steps), samples_per_second(r),
                            per_step(r.compute_seconds, r.steps)});
    if (view.history.size() > kHistoryPoints) view.history.pop_front();
  }
}

std::vector<StatusBoard::RankView> StatusBoard::copy_ranks(bool with_history) const {
  std::vector<RankView> ranks;
  ranks.reserve(ranks_.size());
  for (const RankView& view : ranks_) {
    ranks.push_back({view.latest, view.received, view.heartbeat_age, view.straggler, {}});
    if (with_history) ranks.back().history = view.history;
  }
  return ranks;
}

// prometheus() and snapshot() copy the board under its lock and render outside it: the bus
// thread takes the lock for every report, and a client polling the server must not hold it up.
std::string StatusBoard::prometheus(double now) const {
  std::vector<RankView> ranks;
  {
    std::lock_guard lock(mutex_);
    ranks = copy_ranks(false);
  }
  std::string out;
  const auto family = [&](const char* name, const char* type, const char* help, auto value_of,
                          bool every_rank = false) {
    out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
    for (std::size_t r = 0; r < ranks.size(); ++r) {
      const RankView& view = ranks[r];
      if (!view.latest && !every_rank) continue;
      const std::optional<double> value = value_of(view);
      if (!value) continue;
      out += std::string(name) + "{rank=\"" + std::to_string(r) + "\"} " + number(*value) + "\n";
    }
  };
  using V = std::optional<double>;
  family("unimsg_step", "gauge", "Optimizer steps the rank has completed.",
         [](const RankView& v) { return V(static_cast<double>(v.latest->step)); });
  family("unimsg_samples_per_second", "gauge",
         "Samples the rank trained on per second (over its last report's window).",
         [](const RankView& v) { return V(samples_per_second(*v.latest)); });
  family("unimsg_step_seconds", "gauge", "Wall time of one step (last report's window).",
         [](const RankView& v) { return V(per_step(v.latest->seconds, v.latest->steps)); });
  family("unimsg_compute_seconds", "gauge",
         "Per step, the rank's own work: step time minus waiting.",
         [](const RankView& v) { return V(per_step(v.latest->compute_seconds, v.latest->steps)); });
  family("unimsg_communication_seconds", "gauge",
         "Per step, the engine's time reducing gradients (overlaps compute).",
         [](const RankView& v) {
           return V(per_step(v.latest->communication_seconds, v.latest->steps));
         });
  family("unimsg_wait_seconds", "gauge",
         "Per step, time blocked waiting for reductions and for the other ranks.",
         [](const RankView& v) { return V(per_step(v.latest->wait_seconds, v.latest->steps)); });
  family("unimsg_loss", "gauge", "The loss of the rank's last step.",
         [](const RankView& v) { return V(v.latest->loss); });
  family("unimsg_allreduce_bytes_total", "counter",
         "Bytes the rank sent for gradient reductions (after compression).",
         [](const RankView& v) { return V(static_cast<double>(v.latest->wire_bytes)); });
  family("unimsg_compression_ratio", "gauge",
         "Uncompressed over compressed gradient bytes (1: no compression).",
         [](const RankView& v) { return V(compression_ratio(*v.latest)); });
  family("unimsg_memory_rss_bytes", "gauge", "Resident memory of the rank's process.",
         [](const RankView& v) { return V(static_cast<double>(v.latest->rss_bytes)); });
  family(
      "unimsg_heartbeat_age_seconds", "gauge",
      "Seconds since rank 0 last heard the rank's heartbeat.",
      [](const RankView& v) { return v.heartbeat_age >= 0 ? V(v.heartbeat_age) : V(); }, true);
  family("unimsg_report_age_seconds", "gauge", "Seconds since the rank's last status report.",
         [now](const RankView& v) { return V(std::max(0.0, now - v.received)); });
  family(
      "unimsg_straggler", "gauge",
      "1 while the rank's compute time per step stays above UNIMSG_STRAGGLER_FACTOR x the median.",
      [](const RankView& v) { return V(v.straggler ? 1.0 : 0.0); }, true);
  out += "# HELP unimsg_world_size Ranks in this launch.\n# TYPE unimsg_world_size gauge\n";
  out += "unimsg_world_size " + std::to_string(ranks.size()) + "\n";
  out += "# HELP unimsg_restarts_total Relaunches of the job so far (unimsg-run).\n";
  out += "# TYPE unimsg_restarts_total counter\n";
  out += "unimsg_restarts_total " + std::to_string(restart_) + "\n";
  return out;
}

json StatusBoard::rank_json(int rank, const RankView& view, double now) const {
  json out{{"rank", rank},
           {"straggler", view.straggler},
           {"heartbeat_age_seconds",
            view.heartbeat_age >= 0 ? json(view.heartbeat_age) : json(nullptr)}};
  if (!view.latest) {
    out["reported"] = false;
    return out;
  }
  const StatusReport& r = *view.latest;
  out.update({{"reported", true},
              {"host", r.host},
              {"step", r.step},
              {"loss", std::isfinite(r.loss) ? json(r.loss) : json(nullptr)},
              {"samples_per_second", samples_per_second(r)},
              {"step_seconds", per_step(r.seconds, r.steps)},
              {"compute_seconds", per_step(r.compute_seconds, r.steps)},
              {"communication_seconds", per_step(r.communication_seconds, r.steps)},
              {"wait_seconds", per_step(r.wait_seconds, r.steps)},
              {"wire_bytes", r.wire_bytes},
              {"compression_ratio", compression_ratio(r)},
              {"rss_bytes", r.rss_bytes},
              {"report_age_seconds", std::max(0.0, now - view.received)},
              {"final", r.final_report}});
  return out;
}

json StatusBoard::snapshot(double now, bool with_history) const {
  std::vector<RankView> views;
  std::deque<StatusEvent> events;
  {
    std::lock_guard lock(mutex_);
    views = copy_ranks(with_history);
    events = events_;
  }
  json out{{"job", job_}, {"time", now}, {"world_size", views.size()}, {"restart", restart_}};
  std::optional<std::uint64_t> step;
  std::uint64_t total_steps = 0;
  double throughput = 0;
  double step_seconds = 0;
  json ranks = json::array();
  for (std::size_t r = 0; r < views.size(); ++r) {
    const RankView& view = views[r];
    ranks.push_back(rank_json(static_cast<int>(r), view, now));
    if (!view.latest) continue;
    const StatusReport& report = *view.latest;
    step = std::min(step.value_or(report.step), report.step);
    total_steps = std::max(total_steps, report.total_steps);
    throughput += samples_per_second(report);
    step_seconds = std::max(step_seconds, per_step(report.seconds, report.steps));
  }
  out["ranks"] = std::move(ranks);
  out["step"] = step.value_or(0);
  out["total_steps"] = total_steps;
  out["samples_per_second"] = throughput;
  if (step && total_steps > *step && step_seconds > 0) {
    out["eta_seconds"] = static_cast<double>(total_steps - *step) * step_seconds;
  } else {
    out["eta_seconds"] = nullptr;
  }
  json event_list = json::array();
  for (const auto& event : events) {
    event_list.push_back({{"time", event.time}, {"kind", event.kind}, {"text", event.text}});
  }
  out["events"] = std::move(event_list);
  if (with_history) {
    json history = json::object();
    for (std::size_t r = 0; r < views.size(); ++r) {
      json points = json::array();
      for (const auto& point : views[r].history) points.push_back(point);
      history[std::to_string(r)] = std::move(points);
    }
    out["history"] = std::move(history);
  }
  return out;
}

}  // namespace unimsg
