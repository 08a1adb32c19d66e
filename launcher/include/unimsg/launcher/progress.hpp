#pragma once

// unimsg-run's progress display: rank 0's monitor rewrites <run dir>/status.json every second
// (monitor.hpp); the launcher turns it into one line. On a terminal the line stays at the bottom
// and is redrawn in place while the job's output scrolls above it; elsewhere (a log file, CI) a
// plain line is printed every interval, only when the step moved. The job's stdout and stderr
// pass through here line by line (so that the launcher can also read mpirun's word on a rank
// that died, docs/launcher.md); a line that does not end (a '\r' progress bar, binary output)
// is passed on in pieces, never held without bound. Where our own stdout or stderr is gone (a
// reader that quit: `| head -1`), that stream is no longer relayed; the job runs on.

#include <atomic>
#include <chrono>
#include <cstddef>
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

// Cuts a stream of output into the text to relay and the lines to read. Whole lines go out as
// they complete; an open line goes out up to its last '\r' (a progress bar redrawn in place),
// and whole once kMaxHeld bytes of it wait. The lines to read are cut to kMaxHeld bytes.
class LineSplitter {
 public:
  static constexpr std::size_t kMaxHeld = 4096;
  using Sink = std::function<void(std::string_view)>;

  // The next bytes of output: `relay` gets what goes out now, `line` each complete line
  // (without its "\n" or "\r\n").
  void feed(std::string_view data, const Sink& relay, const Sink& line);
  // What is held back goes out (after a pause in the output); the line stays open.
  void release(const Sink& relay);
  // The end of the output: what is held back goes out, the unterminated line is read.
  void finish(const Sink& relay, const Sink& line);
  std::size_t held() const { return held_.size(); }

 private:
  void read_more(std::string_view text);
  void end_line(const Sink& line);

  std::string held_;  // not yet relayed: less than kMaxHeld bytes between calls
  std::string line_;  // the open line as far as it is read
};

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
  // Reads what `fd` has and relays it to `to` (while `to` takes it); true at the end of the
  // output.
  bool relay(int fd, int to, LineSplitter& splitter, bool& to_open);
  // `text` to `to`, below the terminal's progress line; `to_open` false once `to` fails.
  void pass_on(int to, std::string_view text, bool& to_open);
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
  LineSplitter out_split_, err_split_;
  bool out_open_ = true, err_open_ = true;  // our stdout / stderr still take output
  std::string line_;                        // the progress line as last read
  std::string printed_;                     // plain mode: the last line printed
  bool drawn_ = false;                      // terminal mode: a line is on screen...
  std::string drawn_line_;                  // ...this one
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace unimsg
