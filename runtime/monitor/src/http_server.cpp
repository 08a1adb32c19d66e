// Rank 0's HTTP server: /metrics (Prometheus), /api/status (the board as JSON) and / (the live
// page of monitor_page.hpp, which polls /api/status). The only file that includes httplib.
//
// Whoever reaches the port is a stranger, and cpp-httplib 0.11 bounds neither what it reads
// (request lines, header counts, bodies) nor how long a connection may take to send its head, nor
// how many accepted connections wait for a thread. So this server serves one request per
// connection, read through ConnectionStream (a byte budget and a deadline for the head, one for
// the whole connection, all of it abandoned when the server stops), refuses every method but GET
// and HEAD before a body is read, and hands connections to a fixed set of workers through a
// bounded queue that drops its oldest connection when full: memory, threads and descriptors stay
// bounded whatever clients send or however many connect.

#include <httplib.h>
#include <netdb.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "monitor_internal.hpp"
#include "monitor_page.hpp"
#include "unimsg/monitor/monitor.hpp"

namespace unimsg {
namespace detail {
namespace {

// A request's line and headers, all a GET needs (httplib's own limit on the request line is 8 KiB).
constexpr std::size_t kMaxRequestBytes = 32 << 10;
// Threads serving connections, and accepted connections waiting for one.
constexpr std::size_t kWorkers = 8;
constexpr std::size_t kQueuedConnections = 16;
// From a worker taking a connection: its head must have arrived within the head time
// (MonitorOptions::http_head_time), and the answer must have left within kConnectionTime.
constexpr auto kConnectionTime = std::chrono::seconds(30);
// After answering, what is still arriving (a refused body) is read and dropped for this long,
// so that the client sees the answer rather than a reset.
constexpr auto kLingerTime = std::chrono::seconds(1);
constexpr std::size_t kLingerBytes = 1 << 20;
// A wait is cut in slices this long to notice the server stopping.
constexpr auto kPollSlice = std::chrono::milliseconds(100);

// Set on the accepting thread while it runs a connection dropped from the full queue.
thread_local bool t_shedding = false;

// Waits until `fd` is ready for `events`, until `deadline` or until `stopping`; true when ready
// (or in error, which the read or write then reports).
bool wait_for(int fd, short events, Clock::time_point deadline, const std::atomic<bool>& stopping) {
  while (!stopping.load(std::memory_order_relaxed)) {
    const auto left = deadline - Clock::now();
    if (left <= Clock::duration::zero()) return false;
    const auto slice = std::min<Clock::duration>(left, kPollSlice);
    pollfd entry{fd, events, 0};
    const int ready = ::poll(
        &entry, 1, static_cast<int>(std::chrono::ceil<std::chrono::milliseconds>(slice).count()));
    if (ready > 0) return true;
    if (ready < 0 && errno != EINTR) return false;
  }
  return false;
}

void socket_address(int fd, bool peer, std::string& ip, int& port) {
  sockaddr_storage address{};
  socklen_t length = sizeof address;
  auto* raw = reinterpret_cast<sockaddr*>(&address);
  if ((peer ? ::getpeername(fd, raw, &length) : ::getsockname(fd, raw, &length)) != 0) return;
  std::array<char, NI_MAXHOST> host{};
  std::array<char, NI_MAXSERV> service{};
  if (::getnameinfo(raw, length, host.data(), host.size(), service.data(), service.size(),
                    NI_NUMERICHOST | NI_NUMERICSERV) == 0) {
    ip = host.data();
    port = std::atoi(service.data());
  }
}

// One connection as httplib reads and writes it, with the bounds above.
class ConnectionStream final : public httplib::Stream {
 public:
  ConnectionStream(int fd, const std::atomic<bool>& stopping, Clock::duration head_time)
      : fd_(fd),
        stopping_(stopping),
        head_deadline_(Clock::now() + head_time),
        deadline_(Clock::now() + kConnectionTime) {}

  bool is_readable() const override {
    return offset_ < filled_ || wait_for(fd_, POLLIN, head_deadline_, stopping_);
  }
  bool is_writable() const override { return wait_for(fd_, POLLOUT, deadline_, stopping_); }

  ssize_t read(char* out, std::size_t size) override {
    if (offset_ == filled_ && !fill()) return -1;
    if (filled_ == 0) return 0;  // the client closed
    const std::size_t n = std::min(size, filled_ - offset_);
    std::memcpy(out, buffer_.data() + offset_, n);
    offset_ += n;
    return static_cast<ssize_t>(n);
  }

  ssize_t write(const char* data, std::size_t size) override {
    while (wait_for(fd_, POLLOUT, deadline_, stopping_)) {
      const ssize_t n = ::send(fd_, data, size, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n >= 0) return n;
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return -1;
    }
    return -1;
  }

  void get_remote_ip_and_port(std::string& ip, int& port) const override {
    socket_address(fd_, true, ip, port);
  }
  void get_local_ip_and_port(std::string& ip, int& port) const override {
    socket_address(fd_, false, ip, port);
  }
  ::socket_t socket() const override { return fd_; }

 private:
  // Refills the buffer: false past the budget, the head's deadline, or on an error.
  bool fill() {
    offset_ = filled_ = 0;
    const std::size_t budget = std::min(buffer_.size(), kMaxRequestBytes - received_);
    while (budget > 0 && wait_for(fd_, POLLIN, head_deadline_, stopping_)) {
      const ssize_t n = ::recv(fd_, buffer_.data(), budget, MSG_DONTWAIT);
      if (n >= 0) {
        filled_ = static_cast<std::size_t>(n);
        received_ += filled_;
        return true;
      }
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return false;
    }
    return false;
  }

  int fd_;
  const std::atomic<bool>& stopping_;
  Clock::time_point head_deadline_, deadline_;
  std::array<char, 4096> buffer_{};
  std::size_t offset_ = 0, filled_ = 0, received_ = 0;
};

// httplib's task queue with kWorkers threads and at most kQueuedConnections waiting: a connection
// arriving at a full queue pushes out the oldest, which is answered 503 and closed on the
// accepting thread (every task closes its socket, so none may be dropped unrun).
class BoundedQueue final : public httplib::TaskQueue {
 public:
  BoundedQueue() {
    for (std::size_t i = 0; i < kWorkers; ++i) workers_.emplace_back([this] { work(); });
  }

  void enqueue(std::function<void()> task) override {
    std::function<void()> shed;
    {
      std::lock_guard lock(mutex_);
      if (stopping_) {
        shed = std::move(task);
      } else {
        if (tasks_.size() >= kQueuedConnections) {
          shed = std::move(tasks_.front());
          tasks_.pop_front();
        }
        tasks_.push_back(std::move(task));
      }
    }
    ready_.notify_one();
    if (shed) run_shed(shed);
  }

  void shutdown() override {
    std::deque<std::function<void()>> left;
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
      left.swap(tasks_);
    }
    ready_.notify_all();
    for (auto& task : left) run_shed(task);
    for (auto& worker : workers_) worker.join();
  }

 private:
  static void run_shed(const std::function<void()>& task) {
    t_shedding = true;
    task();
    t_shedding = false;
  }

  void work() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock lock(mutex_);
        ready_.wait(lock, [&] { return stopping_ || !tasks_.empty(); });
        if (tasks_.empty()) return;
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      task();
    }
  }

  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::function<void()>> tasks_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

// Reads and drops what the client still sends, within the linger bounds, then closes.
void linger_and_close(int fd, const std::atomic<bool>& stopping) {
  ::shutdown(fd, SHUT_WR);
  const auto deadline = Clock::now() + kLingerTime;
  std::array<char, 4096> sink{};
  std::size_t dropped = 0;
  while (dropped < kLingerBytes && wait_for(fd, POLLIN, deadline, stopping)) {
    const ssize_t n = ::recv(fd, sink.data(), sink.size(), MSG_DONTWAIT);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) break;
    if (n > 0) dropped += static_cast<std::size_t>(n);
  }
  ::close(fd);
}

void refuse_method(httplib::Response& response) {
  response.status = 405;
  response.set_header("Allow", "GET, HEAD");
  response.set_content("only GET and HEAD are served\n", "text/plain");
}

bool is_get(const httplib::Request& request) {
  return request.method == "GET" || request.method == "HEAD";
}

}  // namespace

class HttpServer final : public httplib::Server {
 public:
  explicit HttpServer(Clock::duration head_time) : head_time_(head_time) {
    // (httplib takes ownership of the queue it is handed, as a raw pointer.)
    new_task_queue = [] { return std::make_unique<BoundedQueue>().release(); };
    set_payload_max_length(kMaxRequestBytes);
    set_pre_routing_handler([](const httplib::Request& request, httplib::Response& response) {
      if (is_get(request)) return HandlerResponse::Unhandled;
      refuse_method(response);
      return HandlerResponse::Handled;
    });
    set_expect_100_continue_handler(
        [](const httplib::Request& request, httplib::Response& response) {
          if (is_get(request)) return 100;
          refuse_method(response);
          return 405;
        });
  }

  // Stops accepting, and abandons the connections being served or waiting.
  void shut_down() {
    stopping_ = true;
    stop();
  }

 private:
  bool process_and_close_socket(::socket_t fd) override {
    if (t_shedding) {
      static constexpr char kBusy[] =
          "HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\n"
          "Content-Length: 0\r\n\r\n";
      ::send(fd, kBusy, sizeof kBusy - 1, MSG_NOSIGNAL | MSG_DONTWAIT);
      ::close(fd);
      return false;
    }
    bool closed = false;
    bool served = false;
    {
      ConnectionStream stream(fd, stopping_, head_time_);
      served = process_request(stream, /*close_connection=*/true, closed, nullptr);
    }
    linger_and_close(fd, stopping_);
    return served;
  }

  const Clock::duration head_time_;
  std::atomic<bool> stopping_{false};
};

}  // namespace detail

Monitor::Server::Server(std::chrono::milliseconds head_time)
    : http(std::make_unique<detail::HttpServer>(head_time)) {}

Monitor::Server::~Server() = default;

void Monitor::Server::stop() {
  http->shut_down();
  if (thread.joinable()) thread.join();
}

void Monitor::start_server() {
  auto server = std::make_unique<Server>(options_.http_head_time);
  const auto respond = [this](const char* type, auto body) {
    return [this, type, body](const httplib::Request&, httplib::Response& response) {
      response.set_header("Cache-Control", "no-store");
      response.set_content(body(), type);
    };
  };
  detail::HttpServer& http = *server->http;
  http.Get("/metrics", respond("text/plain; version=0.0.4; charset=utf-8",
                               [this] { return board_->prometheus(detail::unix_now()); }));
  http.Get("/api/status", respond("application/json", [this] {
             return detail::dump(board_->snapshot(detail::unix_now(), true));
           }));
  http.Get("/",
           respond("text/html; charset=utf-8", [] { return std::string(detail::kMonitorPage); }));
  if (!http.bind_to_port(options_.metrics_address, options_.metrics_port)) {
    log_->error(
        "monitor: cannot listen on {}:{} (UNIMSG_METRICS_PORT/UNIMSG_METRICS_ADDRESS: in use, or "
        "not an address of this host); training goes on without /metrics",
        options_.metrics_address, options_.metrics_port);
    return;
  }
  server->thread = std::thread([&http] { http.listen_after_bind(); });
  // stop() before the loop runs would be lost (and join() would wait forever).
  const auto deadline = detail::Clock::now() + std::chrono::seconds(10);
  while (!http.is_running() && detail::Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  bound_port_ = options_.metrics_port;
  const bool everywhere = options_.metrics_address == "0.0.0.0" || options_.metrics_address == "::";
  log_->info("monitor: live page at http://{}:{}/ (Prometheus: /metrics){}",
             everywhere ? host_ : options_.metrics_address, bound_port_,
             everywhere ? "" : "; this address only (UNIMSG_METRICS_ADDRESS=0.0.0.0: every one)");
  server_ = std::move(server);
}

}  // namespace unimsg
