#pragma once

// What the monitor's source files share: its clocks, its limits and the HTTP server's handle.
// Private to runtime/monitor/src; the public API is unimsg/monitor/monitor.hpp.

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <thread>

#include <nlohmann/json_fwd.hpp>

#include "unimsg/message/message.hpp"
#include "unimsg/monitor/monitor.hpp"

namespace unimsg {

namespace detail {

class HttpServer;  // http_server.cpp, the one file that sees httplib

using Clock = std::chrono::steady_clock;

// The longest event text a rank may send, and the longest a launcher event is cut to: rank 0
// keeps events in memory and writes each to metrics.jsonl.
inline constexpr std::size_t kMaxEventText = 4096;
// The longest event kind ("fault", "info", ...).
inline constexpr std::size_t kMaxEventKind = 64;

// Seconds since the Unix epoch: the time stamps of metrics.jsonl, status.json and the page.
double unix_now();

// `text` as valid UTF-8 of at most `max_bytes`: every byte that does not belong to a well-formed
// character becomes U+FFFD, and the cut falls between characters. Events come from user code and
// files, and one invalid string would make every later dump of the board throw.
std::string clean_utf8(std::string_view text, std::size_t max_bytes);

// value.dump(), with any invalid UTF-8 left replaced by U+FFFD instead of throwing: what the
// monitor writes or serves must not fail on text from outside.
std::string dump(const nlohmann::json& value);

// Rank 0's answer to a clock request: its steady clock now and the timeline's origin.
Payload clock_reply(Clock::time_point timeline_origin);

}  // namespace detail

// Only http_server.cpp sees httplib (a large header), so the server lives behind a pointer and
// its constructor, destructor and stop() are defined there.
struct Monitor::Server {
  explicit Server(std::chrono::milliseconds head_time);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Stops the listening loop and joins its thread.
  void stop();

  std::unique_ptr<detail::HttpServer> http;
  std::thread thread;
};

}  // namespace unimsg
