#include "unimsg/launcher/progress.hpp"

#include <poll.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "unimsg/core/error.hpp"

namespace unimsg {
namespace {

using Clock = std::chrono::steady_clock;

void write_all(int fd, std::string_view text) {
  while (!text.empty()) {
    const ssize_t n = ::write(fd, text.data(), text.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // a closed terminal: nothing to do about it
    text.remove_prefix(static_cast<std::size_t>(n));
  }
}

std::size_t terminal_width() {
  winsize size{};
  if (::ioctl(STDERR_FILENO, TIOCGWINSZ, &size) == 0 && size.ws_col > 10) return size.ws_col;
  return 80;
}

}  // namespace

std::string format_duration(double seconds) {
  if (!(seconds >= 0) || seconds > 1e9) return "?";
  const auto total = static_cast<long long>(std::llround(seconds));
  char text[32];
  if (total >= 3600) {
    std::snprintf(text, sizeof text, "%lldh%02lldm", total / 3600, total % 3600 / 60);
  } else if (total >= 60) {
    std::snprintf(text, sizeof text, "%lldm%02llds", total / 60, total % 60);
  } else {
    std::snprintf(text, sizeof text, "%llds", total);
  }
  return text;
}

std::optional<std::string> progress_text(std::string_view status_json) {
  const auto status = nlohmann::json::parse(status_json, nullptr, /*allow_exceptions=*/false);
  if (!status.is_object()) return std::nullopt;
  const auto ranks = status.find("ranks");
  const auto step = status.find("step");
  if (ranks == status.end() || !ranks->is_array() || step == status.end() ||
      !step->is_number_unsigned()) {
    return std::nullopt;
  }
  std::size_t reported = 0;
  std::size_t stragglers = 0;
  for (const auto& rank : *ranks) {
    if (!rank.is_object()) return std::nullopt;
    if (rank.value("reported", false)) ++reported;
    if (rank.value("straggler", false)) ++stragglers;
  }
  if (reported == 0) return std::nullopt;
  const auto number = [&](const char* key) -> std::optional<double> {
    const auto it = status.find(key);
    if (it == status.end() || !it->is_number()) return std::nullopt;
    return it->get<double>();
  };
  const auto done = step->get<std::uint64_t>();
  std::ostringstream line;
  line << "step " << done;
  if (const auto total = number("total_steps"); total && *total >= 1) {
    char percent[32];
    std::snprintf(percent, sizeof percent, " (%.1f%%)", 100.0 * static_cast<double>(done) / *total);
    line << '/' << static_cast<std::uint64_t>(*total) << percent;
  }
  if (const auto rate = number("samples_per_second")) {
    line << " | " << static_cast<std::uint64_t>(std::llround(std::max(0.0, *rate))) << " samples/s";
  }
  if (const auto eta = number("eta_seconds")) line << " | ETA " << format_duration(*eta);
  line << " | " << ranks->size() << (ranks->size() == 1 ? " rank" : " ranks");
  if (stragglers > 0)
    line << " | " << stragglers << (stragglers == 1 ? " straggler" : " stragglers");
  return line.str();
}

ProgressMode parse_progress_mode(std::string_view text, bool stderr_is_terminal) {
  if (text == "auto") return stderr_is_terminal ? ProgressMode::kTerminal : ProgressMode::kPlain;
  if (text == "tty") return ProgressMode::kTerminal;
  if (text == "plain") return ProgressMode::kPlain;
  if (text == "off") return ProgressMode::kOff;
  throw ConfigError(kNoRank, "--progress",
                    "invalid value '" + std::string(text) + "': expected auto, tty, plain or off");
}

ProgressDisplay::ProgressDisplay(ProgressMode mode, std::filesystem::path status_file,
                                 std::chrono::seconds plain_interval, int out_pipe, int err_pipe,
                                 LineHandler on_line)
    : mode_(mode),
      status_file_(std::move(status_file)),
      plain_interval_(plain_interval),
      out_pipe_(out_pipe),
      err_pipe_(err_pipe),
      on_line_(std::move(on_line)) {
  if (mode_ != ProgressMode::kOff || out_pipe_ >= 0 || err_pipe_ >= 0) {
    thread_ = std::thread([this] { run(); });
  }
}

ProgressDisplay::~ProgressDisplay() {
  stopping_ = true;
  if (thread_.joinable()) thread_.join();
  if (out_pipe_ >= 0) ::close(out_pipe_);
  if (err_pipe_ >= 0) ::close(err_pipe_);
}

void ProgressDisplay::refresh_status() {
  std::ifstream in(status_file_);
  if (!in) return;
  std::stringstream text;
  text << in.rdbuf();
  // (A file caught mid-rewrite cannot happen, it is renamed into place; any other bad content
  // just leaves the previous line.)
  if (auto line = progress_text(text.str())) line_ = std::move(*line);
}

bool ProgressDisplay::print_plain() {
  if (line_.empty() || line_ == printed_) return false;
  spdlog::info("[unimsg-run] {}", line_);
  printed_ = line_;
  return true;
}

void ProgressDisplay::clear() {
  if (!drawn_) return;
  write_all(STDERR_FILENO, "\r\033[K");
  drawn_ = false;
}

void ProgressDisplay::draw() {
  if (mode_ != ProgressMode::kTerminal || line_.empty()) return;
  std::string shown = line_;
  // Wider than the terminal, the line would wrap and "\r" could no longer take it back.
  const std::size_t width = terminal_width() - 1;
  if (shown.size() > width) shown.resize(width);
  write_all(STDERR_FILENO, "\r\033[K" + shown);
  drawn_ = true;
  drawn_line_ = line_;
}

bool ProgressDisplay::relay(int fd, int to, std::string& pending) {
  char buffer[65536];
  ssize_t n = 0;
  do {
    n = ::read(fd, buffer, sizeof buffer);
  } while (n < 0 && errno == EINTR);
  if (n > 0) pending.append(buffer, static_cast<std::size_t>(n));
  const bool end_of_output = n <= 0;
  // Whole lines go out; at the end, the unterminated rest too. (rfind's npos + 1 is 0.)
  const std::size_t end = end_of_output ? pending.size() : pending.rfind('\n') + 1;
  if (end > 0) {
    clear();
    const std::string_view lines = std::string_view(pending).substr(0, end);
    write_all(to, lines);
    if (on_line_) {
      std::size_t start = 0;
      while (start < lines.size()) {
        std::size_t stop = lines.find('\n', start);
        if (stop == std::string_view::npos) stop = lines.size();
        std::string_view line = lines.substr(start, stop - start);
        if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
        on_line_(line);
        start = stop + 1;
      }
    }
    pending.erase(0, end);
  }
  return end_of_output;
}

void ProgressDisplay::run() {
  auto next_status = Clock::now();
  auto next_plain = Clock::now();
  Clock::time_point stop_deadline{};
  while (true) {
    if (out_pipe_ >= 0 || err_pipe_ >= 0) {
      pollfd fds[2] = {{out_pipe_, POLLIN, 0}, {err_pipe_, POLLIN, 0}};
      const int ready = ::poll(fds, 2, 250);
      const int targets[2] = {STDOUT_FILENO, STDERR_FILENO};
      std::string* pendings[2] = {&out_pending_, &err_pending_};
      int* pipes[2] = {&out_pipe_, &err_pipe_};
      bool wrote = false;
      for (int i = 0; i < 2 && ready > 0; ++i) {
        if (*pipes[i] < 0 || fds[i].revents == 0) continue;
        wrote = true;
        if (relay(*pipes[i], targets[i], *pendings[i])) {
          ::close(*pipes[i]);
          *pipes[i] = -1;
        }
      }
      if (ready == 0) {
        // Output that has waited a quarter second without its newline (a prompt) goes out.
        for (int i = 0; i < 2; ++i) {
          if (!pendings[i]->empty()) {
            clear();
            write_all(targets[i], *pendings[i]);
            pendings[i]->clear();
            wrote = true;
          }
        }
      }
      if (wrote) draw();
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
    }
    const auto now = Clock::now();
    if (mode_ != ProgressMode::kOff && now >= next_status) {
      refresh_status();
      next_status = now + std::chrono::seconds(1);
      if (mode_ == ProgressMode::kTerminal) {
        if (!drawn_ || line_ != drawn_line_) draw();
      } else if (now >= next_plain && print_plain()) {
        next_plain = now + plain_interval_;
      }
    }
    if (stopping_) {
      // The job is over; its output pipes close once every process holding them is gone (a
      // straggling grandchild gets two seconds).
      if (stop_deadline == Clock::time_point{}) {
        stop_deadline = now + std::chrono::seconds(2);
        refresh_status();  // the job's last word (the monitor's final status)
        if (mode_ == ProgressMode::kPlain) print_plain();
      }
      const bool drained = out_pipe_ < 0 && err_pipe_ < 0;
      if (drained || now >= stop_deadline) break;
    }
  }
  clear();
}

}  // namespace unimsg
