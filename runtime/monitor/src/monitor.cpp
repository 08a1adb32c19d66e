// The monitor's core: options, construction and shutdown, and the training thread's entry
// points. The rest lives beside it: reporter.cpp (every rank's reports and ticker),
// board_files.cpp (rank 0's reports, metrics.jsonl and status.json), events.cpp, http_server.cpp
// and timeline_merge.cpp.

#include "unimsg/monitor/monitor.hpp"

#include <spdlog/spdlog.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <exception>
#include <limits>
#include <optional>

#include "monitor_internal.hpp"
#include "unimsg/core/config.hpp"
#include "unimsg/core/log.hpp"
#include "unimsg/services/heartbeat.hpp"

namespace unimsg {
namespace {

using detail::Clock;
using detail::unix_now;
using nlohmann::json;
namespace fs = std::filesystem;

std::string host_name() {
  char name[256] = {};
  if (::gethostname(name, sizeof name - 1) != 0) return "?";
  return name;
}

std::string program_name() {
  // (Not /proc/self/comm: the kernel cuts it at 15 characters.)
  const char* name = program_invocation_short_name;
  return name != nullptr && *name != '\0' ? name : "unimsg";
}

}  // namespace

double detail::unix_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

MonitorOptions MonitorOptions::from_env() {
  MonitorOptions options;
  if (auto v = env_value("UNIMSG_RUN_DIR")) options.run_dir = *v;
  if (auto v = env_uint("UNIMSG_METRICS_PORT", 0, 65535))
    options.metrics_port = static_cast<int>(*v);
  if (auto v = env_value("UNIMSG_METRICS_ADDRESS")) options.metrics_address = *v;
  if (auto v = env_uint("UNIMSG_METRICS_HEAD_TIMEOUT_S", 1, 3600)) {
    options.http_head_time = std::chrono::seconds(*v);
  }
  if (auto v = env_value("UNIMSG_TIMELINE")) options.timeline = *v;
  if (auto v = env_uint("UNIMSG_TIMELINE_MAX_EVENTS", 1, 1ull << 28)) {
    options.timeline_max_events = static_cast<std::size_t>(*v);
  }
  if (auto v = env_uint("UNIMSG_STATUS_INTERVAL_MS", 10, 3600000)) {
    options.report_interval = std::chrono::milliseconds(*v);
  }
  if (auto v = env_uint("UNIMSG_STATUS_FINISH_TIMEOUT_S", 1, 86400)) {
    options.finish_timeout = std::chrono::seconds(*v);
  }
  options.straggler = StragglerOptions::from_env();
  options.restart = static_cast<int>(env_uint("UNIMSG_RESTART_COUNT", 0, 1u << 30).value_or(0));
  options.job = program_name();
  return options;
}

Monitor::Monitor(Bus& bus, MonitorOptions options)
    : bus_(bus),
      options_(std::move(options)),
      host_(detail::clean_utf8(host_name(), 255)),
      last_loss_(std::numeric_limits<double>::quiet_NaN()) {
  last_step_end_ = last_report_ = timeline_origin_ = Clock::now();
  log_ = make_rank_logger(bus_.rank(), bus_.size());
  if (!options_.timeline.empty()) {
    trace_ = std::make_unique<TraceRecorder>(options_.timeline_max_events);
  }
  if (bus_.rank() == 0) {
    board_ = std::make_unique<StatusBoard>(bus_.size(), options_.straggler, options_.job,
                                           options_.restart);
    if (!options_.run_dir.empty()) {
      std::error_code error;
      fs::create_directories(options_.run_dir, error);
      load_launcher_events();
      metrics_file_.open(options_.run_dir / "metrics.jsonl", std::ios::app);
      if (!metrics_file_) {
        log_->warn("monitor: cannot write {}: no metrics.jsonl",
                   (options_.run_dir / "metrics.jsonl").string());
      }
      record(detail::dump(json{{"type", "start"},
                               {"time", unix_now()},
                               {"job", options_.job},
                               {"world_size", bus_.size()},
                               {"restart", options_.restart}}));
    }
    reports_ = bus_.subscribe(Filter{Kind::kStatus, kStatusReportTopic, std::nullopt},
                              [this](const Message& message) { on_report(message); });
    events_ = bus_.subscribe(Filter{Kind::kStatus, kStatusEventTopic, std::nullopt},
                             [this](const Message& message) { on_event(message); });
    if (trace_) {
      clock_ = bus_.subscribe(
          Filter{Kind::kStatus, kClockTopic, std::nullopt}, [this](const Message& message) {
            bus_.reply(message.header, Message::make(Kind::kStatus, kClockTopic,
                                                     detail::clock_reply(timeline_origin_)));
          });
    }
    if (options_.metrics_port > 0) start_server();
  }
  ticker_ = std::thread([this] { tick_loop(); });
  if (trace_ && bus_.rank() != 0) sync_clock();
}

Monitor::~Monitor() {
  if (finished_) return;
  finished_ = true;
  try {
    stop_ticker();
    if (bus_.rank() == 0) {
      stop_rank0_services();
      if (trace_) merge_timeline(/*wait_for_peers=*/false);
    }
  } catch (const std::exception& error) {
    log_->warn("monitor: {}", error.what());
  }
}

void Monitor::watch(CommunicationCountersSource counters) {
  counters_ = std::move(counters);
  const CommunicationCounters stats = counters_();
  last_communication_ = stats.communication_seconds;
  last_wait_ = stats.wait_seconds;
}

void Monitor::watch(const HeartbeatWatch& heartbeat) {
  std::lock_guard lock(tick_mutex_);
  heartbeat_ = &heartbeat;
  if (board_) board_->set_heartbeat_ages(heartbeat.heartbeat_ages());
}

void Monitor::set_total_steps(std::uint64_t total_steps) {
  total_steps_.store(total_steps, std::memory_order_relaxed);
}

void Monitor::start_timing() {
  std::lock_guard lock(report_mutex_);
  last_step_end_ = Clock::now();
  if (counters_) {
    const CommunicationCounters stats = counters_();
    last_communication_ = stats.communication_seconds;
    last_wait_ = stats.wait_seconds;
  }
}

void Monitor::step(std::uint64_t step, double loss, std::uint64_t samples) {
  std::optional<CommunicationCounters> stats;
  if (counters_) stats = counters_();
  std::lock_guard lock(report_mutex_);
  const auto now = Clock::now();
  const double seconds = std::chrono::duration<double>(now - last_step_end_).count();
  double communication = 0;
  double wait = 0;
  if (stats) {
    communication = std::max(0.0, stats->communication_seconds - last_communication_);
    wait = std::max(0.0, stats->wait_seconds - last_wait_);
    last_communication_ = stats->communication_seconds;
    last_wait_ = stats->wait_seconds;
    wire_bytes_ = stats->wire_bytes;
    dense_wire_bytes_ = stats->dense_wire_bytes;
  }
  window_.steps += 1;
  window_.samples += samples;
  window_.seconds += seconds;
  window_.compute += std::max(0.0, seconds - wait);
  window_.communication += communication;
  window_.wait += std::min(wait, seconds);
  if (trace_) {
    json args{{"step", step}, {"samples", samples}};
    if (std::isfinite(loss)) args["loss"] = loss;
    trace_->record({"training", "step", last_step_end_, now - last_step_end_, args.dump()});
  }
  last_step_end_ = now;
  last_step_ = step;
  last_loss_ = loss;
  if (reported_once_ && now - last_report_ < options_.report_interval) return;
  // Heartbeat ages only for a report (a locked copy per rank: not on every step).
  if (heartbeat_ != nullptr) {
    heartbeat_age_ = 0;
    for (const double age : heartbeat_->heartbeat_ages()) {
      heartbeat_age_ = std::max(heartbeat_age_, age);
    }
  }
  send_report(false);
}

void Monitor::finish() {
  if (finished_) return;
  finished_ = true;
  if (bus_.rank() != 0) stop_ticker();
  if (counters_) {  // the totals as they are now
    const CommunicationCounters stats = counters_();
    std::lock_guard lock(report_mutex_);
    wire_bytes_ = stats.wire_bytes;
    dense_wire_bytes_ = stats.dense_wire_bytes;
  }
  {
    std::lock_guard lock(report_mutex_);
    send_report(true);
  }
  if (bus_.rank() == 0) wait_for_final_reports();
  if (trace_) {
    try {
      merge_timeline(/*wait_for_peers=*/true);
    } catch (const std::exception& error) {
      log_->error("monitor: timeline: {}", error.what());
    }
  }
  if (bus_.rank() == 0) stop_rank0_services();
}

void Monitor::stop_rank0_services() {
  stop_ticker();
  const double now = unix_now();
  board_->sample(now);
  write_status_file(now);
  record(json{{"type", "finish"}, {"time", now}}.dump());
  if (server_) {
    server_->stop();
    server_.reset();
  }
  reports_.reset();
  events_.reset();
  clock_.reset();
}

}  // namespace unimsg
