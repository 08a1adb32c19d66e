// Rank 0's board: the reports it aggregates, metrics.jsonl (every report and event, appended)
// and status.json (the summary, replaced whole so that unimsg-run never reads half of one).

#include <spdlog/spdlog.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <exception>
#include <fstream>
#include <stdexcept>

#include "monitor_internal.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/monitor/monitor.hpp"

namespace unimsg {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

// Replaces `path` only once `content` is wholly on disk: the last write of a full disk fails at
// close (the stream's buffer flushed), and renaming that file would publish a torn one.
void write_atomically(const fs::path& path, const std::string& content) {
  const fs::path temp = path.string() + ".tmp";
  std::ofstream out(temp, std::ios::trunc);
  out << content;
  out.close();
  if (out.fail()) {
    std::error_code ignored;
    fs::remove(temp, ignored);
    throw std::runtime_error("cannot write " + temp.string() + " (disk full?); " +
                             path.filename().string() + " keeps its last content");
  }
  std::error_code error;
  fs::rename(temp, path, error);
  if (error) {
    fs::remove(temp, error);
    throw std::runtime_error("cannot replace " + path.string() + ": " + error.message());
  }
}

}  // namespace

void Monitor::on_report(const Message& message) {
  try {
    handle_report(
        StatusReport::parse(message.payload.as_string(), message.header.source, bus_.size()));
  } catch (const DecodeError& error) {
    log_->warn("monitor: ignored a malformed status report: {}", error.what());
  }
}

void Monitor::handle_report(const StatusReport& report) {
  const double now = detail::unix_now();
  const auto change = board_->add(report, now);
  json line = report.to_json_value();
  line["type"] = "report";
  line["time"] = now;
  record(detail::dump(line));
  if (change) {
    const std::string& text = change->text;
    if (change->straggler) {
      log_->warn("monitor: {}", text);
    } else {
      log_->info("monitor: {}", text);
    }
    record(detail::dump(json{{"type", "event"},
                             {"time", now},
                             {"kind", change->straggler ? "straggler" : "straggler_cleared"},
                             {"rank", change->rank},
                             {"text", text}}));
  }
  if (report.final_report) {
    std::lock_guard lock(final_mutex_);
    if (final_ranks_.empty()) final_ranks_.assign(static_cast<std::size_t>(bus_.size()), false);
    final_ranks_[static_cast<std::size_t>(report.rank)] = true;
    final_cv_.notify_all();
  }
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

void Monitor::record(const std::string& json_line) {
  std::lock_guard lock(file_mutex_);
  if (!metrics_file_.is_open()) return;
  metrics_file_ << json_line << '\n';
  metrics_file_.flush();
}

void Monitor::write_status_file(double now) {
  if (options_.run_dir.empty()) return;
  try {
    write_atomically(options_.run_dir / "status.json", detail::dump(board_->snapshot(now, false)));
    if (status_file_failing_) log_->info("monitor: status.json written again");
    status_file_failing_ = false;
  } catch (const std::exception& error) {
    // (Once per failing stretch: it is retried every second.)
    if (!status_file_failing_) log_->warn("monitor: status.json: {}", error.what());
    status_file_failing_ = true;
  }
}

}  // namespace unimsg
