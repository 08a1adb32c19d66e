#pragma once

// unimsg-run's progress display: rank 0's monitor rewrites <run dir>/status.json every second
// (monitor.hpp); the launcher turns it into one line. On a terminal the line stays at the bottom
// and is redrawn in place while the job's output scrolls above it; elsewhere (a log file, CI) a
// plain line is printed every interval, only when the step moved. The job's stdout and stderr
// pass through here line by line (so that the launcher can also read mpirun's word on a rank
// that died, docs/launcher.md).

#include <atomic>
#include <chrono>
#include <filesystem>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>

namespace unimsg {

// "step 1200/4690 (25.6%) | 2345 samples/s | ETA 1m30s | 4 ranks | 1 straggler" from
// status.json's text; nullopt when it is not a status (missing, partial, malformed) or no rank
// has reported a step yet.
std::optional<std::string> progress_text(std::string_view status_json);
// "1h02m", "3m05s", "42s".
std::string format_duration(double seconds);

enum class ProgressMode { kOff, kTerminal, kPlain };
// "auto" (a terminal on stderr: kTerminal, else kPlain), "tty", "plain" or "off"; a
// ConfigError otherwise.
ProgressMode parse_progress_mode(std::string_view text, bool stderr_is_terminal);

class ProgressDisplay {
 public:
  using LineHandler = std::function<void(std::string_view line)>;
  // `out_pipe`/`err_pipe`: the read ends of the pipes the child's stdout and stderr write to
  // (-1: that stream does not pass through here); their lines go to our stdout and stderr, and
  // each to `on_line` (on the display's thread).
  ProgressDisplay(ProgressMode mode, std::filesystem::path status_file,
                  std::chrono::seconds plain_interval, int out_pipe = -1, int err_pipe = -1,
                  LineHandler on_line = {});
  // Relays what is left of the output, clears the line.
  ~ProgressDisplay();
  ProgressDisplay(const ProgressDisplay&) = delete;
  ProgressDisplay& operator=(const ProgressDisplay&) = delete;

 private:
  void run();
  // Reads what `fd` has and writes its whole lines to `to`; true at the end of the output.
  bool relay(int fd, int to, std::string& pending);
  void draw();
  // Plain mode: prints the line if it changed since the last one printed; whether it did.
  bool print_plain();
  void clear();
  void refresh_status();

  ProgressMode mode_;
  std::filesystem::path status_file_;
  std::chrono::seconds plain_interval_;
  int out_pipe_, err_pipe_;
  LineHandler on_line_;
  std::string out_pending_, err_pending_;
  std::string line_;        // the progress line as last read
  std::string printed_;     // plain mode: the last line printed
  bool drawn_ = false;      // terminal mode: a line is on screen...
  std::string drawn_line_;  // ...this one
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace unimsg
