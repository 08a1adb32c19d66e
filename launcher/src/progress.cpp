#include "unimsg/launcher/progress.hpp"

#include <poll.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "unimsg/core/error.hpp"

namespace unimsg {
namespace {

using Clock = std::chrono::steady_clock;

// Whether `fd` took all of `text`: false once it is gone (a reader that quit, with SIGPIPE
// ignored: EPIPE; a closed terminal).
bool write_all(int fd, std::string_view text) {
  while (!text.empty()) {
    const ssize_t n = ::write(fd, text.data(), text.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      pollfd ready{fd, POLLOUT, 0};
      ::poll(&ready, 1, 1000);
      continue;
    }
    if (n <= 0) return false;
    text.remove_prefix(static_cast<std::size_t>(n));
  }
  return true;
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

void LineSplitter::read_more(std::string_view text) {
  line_.append(text.substr(0, std::min(text.size(), kMaxHeld - std::min(kMaxHeld, line_.size()))));
}

void LineSplitter::end_line(const Sink& line) {
  std::string_view text = line_;
  if (!text.empty() && text.back() == '\r') text.remove_suffix(1);
  if (line) line(text);
  line_.clear();
}

void LineSplitter::feed(std::string_view data, const Sink& relay, const Sink& line) {
  const std::size_t last = data.rfind('\n');
  if (last != std::string_view::npos) {
    // Whole lines: read each, relay them in one piece (with what was held of the first).
    for (std::size_t start = 0; start <= last;) {
      const std::size_t stop = data.find('\n', start);
      read_more(data.substr(start, stop - start));
      end_line(line);
      start = stop + 1;
    }
    if (held_.empty()) {
      relay(data.substr(0, last + 1));
    } else {
      held_.append(data.substr(0, last + 1));
      relay(held_);
      held_.clear();
    }
    data.remove_prefix(last + 1);
  }
  if (data.empty()) return;
  read_more(data);
  held_.append(data);
  const std::size_t carriage = held_.rfind('\r');
  const std::size_t out = held_.size() >= kMaxHeld        ? held_.size()
                          : carriage != std::string::npos ? carriage + 1
                                                          : 0;
  if (out > 0) {
    relay(std::string_view(held_).substr(0, out));
    held_.erase(0, out);
  }
}

void LineSplitter::release(const Sink& relay) {
  if (held_.empty()) return;
  relay(held_);
  held_.clear();
}

void LineSplitter::finish(const Sink& relay, const Sink& line) {
  release(relay);
  if (!line_.empty()) end_line(line);
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

void ProgressDisplay::pass_on(int to, std::string_view text, bool& to_open) {
  if (!to_open) return;
  clear();
  if (write_all(to, text)) return;
  // Our reader is gone (| head -1): the job runs on, its output is dropped from here on.
  to_open = false;
  if (to == STDOUT_FILENO && err_open_) {
    err_open_ = write_all(STDERR_FILENO,
                          "[unimsg-run] stdout is closed: the job's output to it is dropped\n");
  }
}

bool ProgressDisplay::relay(int fd, int to, LineSplitter& splitter, bool& to_open) {
  char buffer[65536];
  ssize_t n = 0;
  do {
    n = ::read(fd, buffer, sizeof buffer);
  } while (n < 0 && errno == EINTR);
  const auto out = [&](std::string_view text) { pass_on(to, text, to_open); };
  const auto read = [&](std::string_view line) {
    if (on_line_) on_line_(line);
  };
  if (n <= 0) {
    splitter.finish(out, read);
    return true;
  }
  splitter.feed(std::string_view(buffer, static_cast<std::size_t>(n)), out, read);
  return false;
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
      LineSplitter* splitters[2] = {&out_split_, &err_split_};
      bool* open[2] = {&out_open_, &err_open_};
      int* pipes[2] = {&out_pipe_, &err_pipe_};
      bool wrote = false;
      for (int i = 0; i < 2 && ready > 0; ++i) {
        if (*pipes[i] < 0 || fds[i].revents == 0) continue;
        wrote = true;
        if (relay(*pipes[i], targets[i], *splitters[i], *open[i])) {
          ::close(*pipes[i]);
          *pipes[i] = -1;
        }
      }
      if (ready == 0) {
        // Output that has waited a quarter second without its newline (a prompt) goes out.
        for (int i = 0; i < 2; ++i) {
          if (splitters[i]->held() > 0) {
            splitters[i]->release(
                [&](std::string_view text) { pass_on(targets[i], text, *open[i]); });
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
