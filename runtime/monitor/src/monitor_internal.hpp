#pragma once

// What the monitor's source files share: its clocks, its limits and the HTTP server's handle.
// Private to runtime/monitor/src; the public API is unimsg/monitor/monitor.hpp.

#include <chrono>
#include <cstddef>
#include <memory>
#include <thread>

#include "unimsg/message/message.hpp"
#include "unimsg/monitor/monitor.hpp"

namespace httplib {
class Server;
}

namespace unimsg {

namespace detail {

using Clock = std::chrono::steady_clock;

// The longest event text a rank may send, and the longest a launcher event is cut to: rank 0
// keeps events in memory and writes each to metrics.jsonl.
inline constexpr std::size_t kMaxEventText = 4096;
// The longest event kind ("fault", "info", ...).
inline constexpr std::size_t kMaxEventKind = 64;

// Seconds since the Unix epoch: the time stamps of metrics.jsonl, status.json and the page.
double unix_now();

// Rank 0's answer to a clock request: its steady clock now and the timeline's origin.
Payload clock_reply(Clock::time_point timeline_origin);

}  // namespace detail

// Only http_server.cpp sees httplib (a large header), so the server lives behind a pointer and
// its constructor, destructor and stop() are defined there.
struct Monitor::Server {
  Server();
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Stops the listening loop and joins its thread.
  void stop();

  std::unique_ptr<httplib::Server> http;
  std::thread thread;
};

}  // namespace unimsg
