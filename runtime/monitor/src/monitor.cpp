#include "unimsg/monitor/monitor.hpp"

#include <httplib.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <vector>

#include "monitor_page.hpp"
#include "unimsg/core/config.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/core/log.hpp"
#include "unimsg/services/heartbeat.hpp"

namespace unimsg {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;
namespace fs = std::filesystem;

constexpr std::size_t kSpansPerFragment = 20000;
constexpr std::size_t kMaxEventText = 4096;

std::int64_t nanoseconds_of(Clock::time_point time) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(time.time_since_epoch()).count();
}

double unix_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string host_name() {
  char name[256] = {};
  if (::gethostname(name, sizeof name - 1) != 0) return "?";
  return name;
}

std::uint64_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  std::uint64_t pages_total = 0, pages_resident = 0;
  if (!(statm >> pages_total >> pages_resident)) return 0;
  return pages_resident * static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
}

std::string program_name() {
  // (Not /proc/self/comm: the kernel cuts it at 15 characters.)
  const char* name = program_invocation_short_name;
  return name != nullptr && *name != '\0' ? name : "unimsg";
}

// A launcher event (events.jsonl) as the page shows it; nullopt for lines it cannot read.
std::optional<StatusEvent> launcher_event(const std::string& line) {
  const json event = json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (!event.is_object()) return std::nullopt;
  const auto kind = event.find("event");
  const auto time = event.find("time");
  if (kind == event.end() || !kind->is_string() || time == event.end() || !time->is_number()) {
    return std::nullopt;
  }
  const auto field = [&](const char* key) {
    const auto it = event.find(key);
    return it == event.end() ? std::string()
                             : (it->is_string() ? it->get<std::string>() : it->dump());
  };
  StatusEvent out{time->get<double>(), kind->get<std::string>(), ""};
  if (out.kind == "launch") {
    out.text = "launch " + std::to_string(event.value("restart", 0) + 1) + " on " +
               field("world_size") + " rank(s)";
  } else if (out.kind == "failure") {
    out.text = field("reason");
    if (const auto ranks = field("lost_ranks"); !ranks.empty() && ranks != "[]") {
      out.text += " (lost ranks " + ranks + ")";
    }
    if (const auto hosts = field("lost_hosts"); !hosts.empty() && hosts != "[]") {
      out.text += " (lost hosts " + hosts + ")";
    }
  } else if (out.kind == "rerank") {
    out.text = "re-ranked from " + field("from") + " to " + field("world_size") + " rank(s)";
  } else if (out.kind == "restart") {
    out.text = "relaunched on " + field("world_size") + " rank(s)";
  } else {
    out.text = field("reason");
  }
  if (out.text.size() > kMaxEventText) out.text.resize(kMaxEventText);
  return out;
}

void write_atomically(const fs::path& path, const std::string& content) {
  const fs::path temp = path.string() + ".tmp";
  {
    std::ofstream out(temp, std::ios::trunc);
    out << content;
    if (!out) throw std::runtime_error("cannot write " + temp.string());
  }
  fs::rename(temp, path);
}

}  // namespace

struct Monitor::Server {
  httplib::Server http;
  std::thread thread;
};

MonitorOptions MonitorOptions::from_env() {
  MonitorOptions options;
  if (auto v = env_value("UNIMSG_RUN_DIR")) options.run_dir = *v;
  if (auto v = env_uint("UNIMSG_METRICS_PORT", 0, 65535))
    options.metrics_port = static_cast<int>(*v);
  if (auto v = env_value("UNIMSG_METRICS_ADDRESS")) options.metrics_address = *v;
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
      host_(host_name()),
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
      record(json{{"type", "start"},
                  {"time", unix_now()},
                  {"job", options_.job},
                  {"world_size", bus_.size()},
                  {"restart", options_.restart}}
                 .dump());
    }
    reports_ = bus_.subscribe(Filter{Kind::kStatus, kStatusReportTopic, std::nullopt},
                              [this](const Message& message) { on_report(message); });
    events_ = bus_.subscribe(Filter{Kind::kStatus, kStatusEventTopic, std::nullopt},
                             [this](const Message& message) { on_event(message); });
    if (trace_) {
      clock_ = bus_.subscribe(
          Filter{Kind::kStatus, kClockTopic, std::nullopt}, [this](const Message& message) {
            const std::int64_t times[2] = {nanoseconds_of(Clock::now()),
                                           nanoseconds_of(timeline_origin_)};
            std::vector<std::byte> payload(sizeof times);
            std::memcpy(payload.data(), times, sizeof times);
            bus_.reply(message.header,
                       Message::make(Kind::kStatus, kClockTopic, Payload(std::move(payload))));
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

void Monitor::start_server() {
  auto server = std::make_unique<Server>();
  const auto respond = [this](const char* type, auto body) {
    return [this, type, body](const httplib::Request&, httplib::Response& response) {
      response.set_header("Cache-Control", "no-store");
      response.set_content(body(), type);
    };
  };
  server->http.Get("/metrics", respond("text/plain; version=0.0.4; charset=utf-8",
                                       [this] { return board_->prometheus(unix_now()); }));
  server->http.Get("/api/status", respond("application/json", [this] {
                     return board_->snapshot(unix_now(), true).dump();
                   }));
  server->http.Get(
      "/", respond("text/html; charset=utf-8", [] { return std::string(detail::kMonitorPage); }));
  if (!server->http.bind_to_port(options_.metrics_address, options_.metrics_port)) {
    log_->error(
        "monitor: cannot listen on {}:{} (UNIMSG_METRICS_PORT/UNIMSG_METRICS_ADDRESS: in use, or "
        "not an address of this host); training goes on without /metrics",
        options_.metrics_address, options_.metrics_port);
    return;
  }
  httplib::Server& http = server->http;
  server->thread = std::thread([&http] { http.listen_after_bind(); });
  // stop() before the loop runs would be lost (and join() would wait forever).
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  while (!http.is_running() && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  bound_port_ = options_.metrics_port;
  log_->info("monitor: live page at http://{}:{}/ (Prometheus: /metrics)", host_, bound_port_);
  server_ = std::move(server);
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

void Monitor::flush_if_stale() {
  std::lock_guard lock(report_mutex_);
  if (window_.steps > 0 && Clock::now() - last_report_ >= options_.report_interval) {
    send_report(false);
  }
}

// With report_mutex_ held: rank 0 then sees its own reports in order, as it sees each peer's.
void Monitor::send_report(bool final_report) {
  StatusReport report;
  report.rank = bus_.rank();
  report.step = last_step_;
  report.total_steps = total_steps_.load(std::memory_order_relaxed);
  report.steps = std::min(window_.steps, last_step_);
  report.samples = window_.samples;
  report.seconds = window_.seconds;
  report.compute_seconds = window_.compute;
  report.communication_seconds = window_.communication;
  report.wait_seconds = window_.wait;
  report.loss = last_loss_;
  // (As of the last step: the engine and heartbeat watch are not touched from here, which
  // also runs on the ticker thread.)
  report.wire_bytes = wire_bytes_;
  report.dense_wire_bytes = dense_wire_bytes_;
  report.heartbeat_age_seconds = heartbeat_age_;
  report.rss_bytes = resident_bytes();
  report.host = host_;
  report.final_report = final_report;
  window_ = {};
  last_report_ = Clock::now();
  reported_once_ = true;
  if (bus_.rank() == 0) {
    handle_report(report);
    return;
  }
  try {
    bus_.send(0, Message::make(Kind::kStatus, kStatusReportTopic,
                               Payload::from_string(report.to_json())));
  } catch (const std::exception& error) {
    // Monitoring never stops training: the next report carries the totals again.
    log_->warn("monitor: status report not sent: {}", error.what());
  }
}

void Monitor::on_report(const Message& message) {
  try {
    handle_report(
        StatusReport::parse(message.payload.as_string(), message.header.source, bus_.size()));
  } catch (const DecodeError& error) {
    log_->warn("monitor: ignored a malformed status report: {}", error.what());
  }
}

void Monitor::handle_report(const StatusReport& report) {
  const double now = unix_now();
  const auto change = board_->add(report, now);
  json line = report.to_json_value();
  line["type"] = "report";
  line["time"] = now;
  record(line.dump());
  if (change) {
    const std::string& text = change->text;
    if (change->straggler) {
      log_->warn("monitor: {}", text);
    } else {
      log_->info("monitor: {}", text);
    }
    record(json{
        {"type", "event"},
        {"time", now},
        {"kind", change->straggler ? "straggler" : "straggler_cleared"},
        {"rank", change->rank},
        {"text",
         text}}.dump());
  }
  if (report.final_report) {
    std::lock_guard lock(final_mutex_);
    if (final_ranks_.empty()) final_ranks_.assign(static_cast<std::size_t>(bus_.size()), false);
    final_ranks_[static_cast<std::size_t>(report.rank)] = true;
    final_cv_.notify_all();
  }
}

void Monitor::event(std::string kind, std::string text) {
  if (kind.size() > 64) kind.resize(64);
  if (text.size() > kMaxEventText) text.resize(kMaxEventText);
  if (bus_.rank() == 0) {
    handle_event(0, std::move(kind), std::move(text));
    return;
  }
  try {
    bus_.send(0, Message::make(Kind::kStatus, kStatusEventTopic,
                               Payload::from_string(json{{"kind", kind}, {"text", text}}.dump())));
  } catch (const std::exception& error) {
    log_->warn("monitor: event not sent: {}", error.what());
  }
}

void Monitor::on_event(const Message& message) {
  const json event = json::parse(message.payload.as_string(), nullptr, false);
  const auto valid_string = [&](const char* key, std::size_t limit) {
    const auto it = event.is_object() ? event.find(key) : event.end();
    return it != event.end() && it->is_string() &&
           it->get_ref<const std::string&>().size() <= limit;
  };
  if (!valid_string("kind", 64) || !valid_string("text", kMaxEventText)) {
    log_->warn("monitor: ignored a malformed event from rank {}", message.header.source);
    return;
  }
  handle_event(message.header.source, event.at("kind").get<std::string>(),
               event.at("text").get<std::string>());
}

void Monitor::handle_event(int source, std::string kind, std::string text) {
  const double now = unix_now();
  text = "rank " + std::to_string(source) + ": " + text;
  log_->debug("monitor: event {}: {}", kind, text);  // (its sender logs it)
  record(json{{"type", "event"}, {"time", now}, {"kind", kind}, {"rank", source}, {"text", text}}
             .dump());
  board_->add_event({now, std::move(kind), std::move(text)});
}

void Monitor::record(const std::string& json_line) {
  std::lock_guard lock(file_mutex_);
  if (!metrics_file_.is_open()) return;
  metrics_file_ << json_line << '\n';
  metrics_file_.flush();
}

void Monitor::load_launcher_events() {
  std::ifstream in(options_.run_dir / "events.jsonl");
  std::string line;
  std::vector<StatusEvent> events;
  std::size_t unreadable = 0;
  while (std::getline(in, line)) {
    if (auto event = launcher_event(line)) {
      events.push_back(std::move(*event));
    } else if (!line.empty()) {
      ++unreadable;
    }
  }
  if (unreadable > 0) {
    log_->warn("monitor: {} unreadable line(s) in {}", unreadable,
               (options_.run_dir / "events.jsonl").string());
  }
  const std::size_t keep = std::min(events.size(), StatusBoard::kEventsKept);
  for (std::size_t i = events.size() - keep; i < events.size(); ++i) {
    board_->add_event(std::move(events[i]));
  }
}

void Monitor::tick_loop() {
  // Every rank: steps not yet reported go out once they are a report interval old (a pause after
  // them, evaluation or the end, must not hide them). Rank 0, once a second: heartbeat ages,
  // the charts' history, status.json.
  const auto period = std::min<Clock::duration>(options_.report_interval, std::chrono::seconds(1));
  auto next_board = Clock::now();
  std::unique_lock lock(tick_mutex_);
  while (!stopping_) {
    lock.unlock();
    flush_if_stale();
    lock.lock();
    if (board_ && Clock::now() >= next_board) {
      next_board = Clock::now() + std::chrono::seconds(1);
      const double now = unix_now();
      if (heartbeat_ != nullptr) board_->set_heartbeat_ages(heartbeat_->heartbeat_ages());
      board_->sample(now);
      lock.unlock();
      write_status_file(now);
      lock.lock();
    }
    tick_cv_.wait_for(lock, period, [&] { return stopping_; });
  }
}

void Monitor::stop_ticker() {
  {
    std::lock_guard lock(tick_mutex_);
    stopping_ = true;
  }
  tick_cv_.notify_all();
  if (ticker_.joinable()) ticker_.join();
}

void Monitor::write_status_file(double now) {
  if (options_.run_dir.empty()) return;
  try {
    write_atomically(options_.run_dir / "status.json", board_->snapshot(now, false).dump());
  } catch (const std::exception& error) {
    log_->warn("monitor: status.json: {}", error.what());
  }
}

void Monitor::sync_clock() {
  // Cristian's algorithm: the round trip with the least delay bounds the error best.
  std::optional<std::chrono::nanoseconds> best_rtt;
  for (int round = 0; round < 8; ++round) {
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
  std::vector<TraceEvent> spans = trace_->take();
  const std::uint64_t dropped = trace_->dropped();
  std::vector<std::string> fragments;
  std::map<std::string, int> lanes;
  for (std::size_t from = 0; from < spans.size() || fragments.empty(); from += kSpansPerFragment) {
    const std::size_t to = std::min(spans.size(), from + kSpansPerFragment);
    fragments.push_back(
        to_chrome_trace_events(std::span<const TraceEvent>(spans.data() + from, to - from),
                               bus_.rank(), clock_offset_, timeline_origin_, lanes));
  }
  if (dropped > 0) {
    fragments.back() += ',';
    fragments.back() += json{{"name", "spans dropped (UNIMSG_TIMELINE_MAX_EVENTS)"},
                             {"ph", "i"},
                             {"s", "p"},
                             {"pid", bus_.rank()},
                             {"tid", 0},
                             {"ts", 0},
                             {"args", {{"dropped", dropped}}}}
                            .dump();
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
  const fs::path temp = options_.timeline.string() + ".tmp";
  std::ofstream out(temp, std::ios::trunc);
  if (!out) {
    log_->error("monitor: cannot write the timeline {}", temp.string());
    return;
  }
  out << "{\"traceEvents\":[";
  bool first = true;
  const auto append = [&](std::string_view fragment) {
    if (fragment.empty()) return;
    if (!first) out << ',';
    out << fragment;
    first = false;
  };
  std::size_t spans_total = spans.size();
  for (const auto& fragment : fragments) append(fragment);
  std::vector<bool> done(static_cast<std::size_t>(bus_.size()), false);
  done[0] = true;
  int remaining = bus_.size() - 1;
  const auto deadline = Clock::now() + options_.finish_timeout;
  while (wait_for_peers && remaining > 0) {
    const auto left = deadline - Clock::now();
    if (left <= Clock::duration::zero()) break;
    Message message;
    try {
      message = bus_.receive(Filter{Kind::kStatus, kTimelineTopic, std::nullopt}, left);
    } catch (const TimeoutError&) {
      break;
    }
    const int source = message.header.source;
    const std::string_view payload = message.payload.as_string();
    if (source <= 0 || source >= bus_.size() || done[static_cast<std::size_t>(source)] ||
        payload.empty() || (payload[0] != '0' && payload[0] != '1')) {
      log_->warn("monitor: ignored a malformed timeline message from rank {}", source);
      continue;
    }
    const std::string_view fragment = payload.substr(1);
    std::string bracketed = "[";
    bracketed.append(fragment).append("]");
    const json parsed = json::parse(bracketed, nullptr, false);
    if (parsed.is_discarded() || !parsed.is_array()) {
      log_->warn("monitor: ignored a malformed timeline fragment from rank {}", source);
    } else {
      spans_total += parsed.size();
      append(fragment);
    }
    if (payload[0] == '1') {
      done[static_cast<std::size_t>(source)] = true;
      --remaining;
    }
  }
  json missing = json::array();
  for (int r = 0; r < bus_.size(); ++r) {
    if (!done[static_cast<std::size_t>(r)]) missing.push_back(r);
  }
  out << "],\"displayTimeUnit\":\"ms\",\"otherData\":"
      << json{{"job", options_.job},
              {"world_size", bus_.size()},
              {"restart", options_.restart},
              {"missing_ranks", missing}}
             .dump()
      << "}\n";
  out.close();
  std::error_code error;
  if (!out) {
    log_->error("monitor: could not write the timeline {}", temp.string());
    return;
  }
  fs::rename(temp, options_.timeline, error);
  if (error) {
    log_->error("monitor: cannot rename {} to {}: {}", temp.string(), options_.timeline.string(),
                error.message());
    return;
  }
  if (!missing.empty()) {
    log_->warn("monitor: timeline without ranks {} (nothing arrived within {} s)", missing.dump(),
               options_.finish_timeout.count());
  }
  log_->info("monitor: timeline of {} ranks ({} events) in {}", bus_.size() - missing.size(),
             spans_total, options_.timeline.string());
}

void Monitor::wait_for_final_reports() {
  std::unique_lock lock(final_mutex_);
  if (final_ranks_.empty()) final_ranks_.assign(static_cast<std::size_t>(bus_.size()), false);
  const bool all = final_cv_.wait_for(lock, options_.finish_timeout, [&] {
    return std::all_of(final_ranks_.begin(), final_ranks_.end(), [](bool b) { return b; });
  });
  if (!all) {
    std::string missing;
    for (std::size_t r = 0; r < final_ranks_.size(); ++r) {
      if (!final_ranks_[r]) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
    }
    log_->warn("monitor: no last status report from rank(s) {} within {} s", missing,
               options_.finish_timeout.count());
  }
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
    server_->http.stop();
    if (server_->thread.joinable()) server_->thread.join();
    server_.reset();
  }
  reports_.reset();
  events_.reset();
  clock_.reset();
}

}  // namespace unimsg
