// Every rank's reporter: the step window goes to rank 0 as a StatusReport, from step() or, once
// steps stop, from the ticker thread (which on rank 0 also refreshes the board and status.json).

#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <exception>
#include <fstream>

#include "monitor_internal.hpp"
#include "unimsg/monitor/monitor.hpp"
#include "unimsg/services/heartbeat.hpp"

namespace unimsg {
namespace {

using detail::Clock;

std::uint64_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  std::uint64_t pages_total = 0, pages_resident = 0;
  if (!(statm >> pages_total >> pages_resident)) return 0;
  return pages_resident * static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
}

}  // namespace

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
      const double now = detail::unix_now();
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

}  // namespace unimsg
