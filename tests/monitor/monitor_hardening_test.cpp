// The monitor against hostile or broken input: rank 0's HTTP server binds to loopback unless told
// otherwise and bounds what a client can make it read, hold or wait for; event text cut inside a
// character or not UTF-8 at all never breaks the status JSON; a full disk never replaces a good
// status.json with a torn one.

#include <arpa/inet.h>
#include <fcntl.h>
#include <httplib.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "unimsg/monitor/monitor.hpp"
#include "world_fixture.hpp"

namespace unimsg {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;
using testing_support::WorldTest;

// Rank 0 picks a directory; every rank learns it.
fs::path shared_directory(const char* name) {
  char path[256] = {};
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank == 0) {
    const auto dir = fs::temp_directory_path() /
                     (std::string("unimsg-") + name + "-" + std::to_string(::getpid()));
    fs::remove_all(dir);
    fs::create_directories(dir);
    std::snprintf(path, sizeof path, "%s", dir.c_str());
  }
  MPI_Bcast(path, sizeof path, MPI_CHAR, 0, MPI_COMM_WORLD);
  return path;
}

// A socket, closed on scope exit.
class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Fd& operator=(Fd&& other) noexcept {
    if (this != &other) {
      reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  ~Fd() { reset(); }
  int get() const { return fd_; }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_;
};

sockaddr_in ipv4(in_addr_t address, int port) {
  sockaddr_in out{};
  out.sin_family = AF_INET;
  out.sin_addr.s_addr = address;
  out.sin_port = htons(static_cast<std::uint16_t>(port));
  return out;
}

int free_port() {
  Fd fd(::socket(AF_INET, SOCK_STREAM, 0));
  sockaddr_in address = ipv4(htonl(INADDR_LOOPBACK), 0);
  socklen_t length = sizeof address;
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 ||
      ::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    return 0;
  }
  return ntohs(address.sin_port);
}

// A connected socket to address:port, or an invalid one.
Fd connect_to(in_addr_t address, int port) {
  Fd fd(::socket(AF_INET, SOCK_STREAM, 0));
  const sockaddr_in target = ipv4(address, port);
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&target), sizeof target) != 0) {
    return Fd();
  }
  return fd;
}

// An IPv4 address of this host that is not loopback, if it has one.
std::optional<in_addr_t> non_loopback_ipv4() {
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0) return std::nullopt;
  std::optional<in_addr_t> found;
  for (const ifaddrs* it = list; it != nullptr && !found; it = it->ifa_next) {
    if (it->ifa_addr == nullptr || it->ifa_addr->sa_family != AF_INET) continue;
    const in_addr_t address = reinterpret_cast<const sockaddr_in*>(it->ifa_addr)->sin_addr.s_addr;
    if ((ntohl(address) >> 24) != 127) found = address;
  }
  ::freeifaddrs(list);
  return found;
}

// Whether the server has let this connection go: what it sent (a 503, say) read, an end of
// stream or a reset follows.
bool closed_by_server(int fd) {
  char buffer[4096];
  for (;;) {
    const ssize_t n = ::recv(fd, buffer, sizeof buffer, MSG_DONTWAIT);
    if (n > 0) continue;
    return n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK);
  }
}

MonitorOptions test_options(const fs::path& dir) {
  MonitorOptions options;
  options.run_dir = dir / "run";
  options.report_interval = std::chrono::milliseconds(10);
  options.finish_timeout = std::chrono::seconds(120);
  options.job = "monitor_hardening_test";
  return options;
}

// A monitor on rank 0 with its server on a free loopback port.
MonitorOptions server_options(const fs::path& dir) {
  MonitorOptions options = test_options(dir);
  options.metrics_address = "127.0.0.1";
  options.metrics_port = free_port();
  return options;
}

std::optional<json> read_json(const fs::path& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  json parsed = json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded()) return std::nullopt;
  return parsed;
}

class MonitorHardeningTest : public WorldTest {};

TEST_F(MonitorHardeningTest, TheServerListensOnLoopbackByDefault) {
  if (bus_->size() > 1) GTEST_SKIP() << "rank 0's server is the same at any size: tested on one";
  EXPECT_EQ(MonitorOptions{}.metrics_address, "127.0.0.1");
  ::unsetenv("UNIMSG_METRICS_ADDRESS");
  EXPECT_EQ(MonitorOptions::from_env().metrics_address, "127.0.0.1");

  const fs::path dir = shared_directory("hardening-bind");
  MonitorOptions options = test_options(dir);
  options.metrics_port = free_port();
  {
    Monitor monitor(*bus_, options);
    ASSERT_EQ(monitor.metrics_port(), options.metrics_port);
    EXPECT_GE(connect_to(htonl(INADDR_LOOPBACK), options.metrics_port).get(), 0);
    if (const auto other = non_loopback_ipv4()) {
      EXPECT_LT(connect_to(*other, options.metrics_port).get(), 0)
          << "the server answers on a non-loopback address by default";
    }
    monitor.finish();
  }
  fs::remove_all(dir);
}

TEST_F(MonitorHardeningTest, ALargePostIsRefusedBeforeItsBodyIsRead) {
  if (bus_->size() > 1) GTEST_SKIP() << "rank 0's server is the same at any size: tested on one";
  const fs::path dir = shared_directory("hardening-post");
  const MonitorOptions options = server_options(dir);
  Monitor monitor(*bus_, options);
  ASSERT_EQ(monitor.metrics_port(), options.metrics_port);

  Fd fd = connect_to(htonl(INADDR_LOOPBACK), options.metrics_port);
  ASSERT_GE(fd.get(), 0);
  // (A small send buffer: what counts as sent is close to what the server took.)
  const int send_buffer = 64 << 10;
  ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDBUF, &send_buffer, sizeof send_buffer);
  constexpr std::uint64_t kBody = 128ull << 20;
  const std::string head =
      "POST /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n"
      "Content-Type: application/octet-stream\r\nContent-Length: " +
      std::to_string(kBody) + "\r\n\r\n";
  ASSERT_EQ(::send(fd.get(), head.data(), head.size(), MSG_NOSIGNAL),
            static_cast<ssize_t>(head.size()));
  ::fcntl(fd.get(), F_SETFL, ::fcntl(fd.get(), F_GETFL) | O_NONBLOCK);

  const std::vector<char> chunk(64 << 10, 'x');
  std::uint64_t sent = 0;
  std::string reply;
  bool ended = false;  // closed or reset by the server
  const auto deadline = Clock::now() + 120s;
  while (Clock::now() < deadline && reply.find("\r\n\r\n") == std::string::npos && !ended) {
    pollfd p{fd.get(), static_cast<short>(POLLIN | (sent < kBody ? POLLOUT : 0)), 0};
    if (::poll(&p, 1, 1000) <= 0) continue;
    if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
      char buffer[4096];
      const ssize_t n = ::recv(fd.get(), buffer, sizeof buffer, 0);
      if (n > 0) {
        reply.append(buffer, static_cast<std::size_t>(n));
      } else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
        ended = true;
      }
      continue;
    }
    const std::size_t size =
        static_cast<std::size_t>(std::min<std::uint64_t>(chunk.size(), kBody - sent));
    const ssize_t n = ::send(fd.get(), chunk.data(), size, MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<std::uint64_t>(n);
    } else if (errno != EAGAIN && errno != EWOULDBLOCK) {
      ended = true;
    }
  }
  EXPECT_LT(sent, kBody / 2) << "the server took " << sent << " of the " << kBody
                             << " body bytes before answering: " << reply.substr(0, 40);
  EXPECT_TRUE(!reply.empty() || ended) << "no answer within 120 s";
  if (!reply.empty()) {
    EXPECT_EQ(reply.substr(0, 12), "HTTP/1.1 405") << reply;
  }

  // And it still serves.
  httplib::Client client("127.0.0.1", options.metrics_port);
  client.set_read_timeout(60, 0);
  const auto response = client.Get("/metrics");
  ASSERT_TRUE(response);
  EXPECT_EQ(response->status, 200);
  monitor.finish();
  fs::remove_all(dir);
}

TEST_F(MonitorHardeningTest, SlowConnectionsNeitherStopAGetNorPileUp) {
  if (bus_->size() > 1) GTEST_SKIP() << "rank 0's server is the same at any size: tested on one";
  const fs::path dir = shared_directory("hardening-slow");
  MonitorOptions options = server_options(dir);
  options.http_head_time = std::chrono::seconds(2);  // (10 s by default: the same bound, sooner)
  Monitor monitor(*bus_, options);
  ASSERT_EQ(monitor.metrics_port(), options.metrics_port);

  // Connections that send a request's head a byte a second, each byte well within any read
  // timeout, and never finish it.
  constexpr int kSlow = 64;
  std::vector<Fd> slow;
  for (int i = 0; i < kSlow; ++i) {
    slow.push_back(connect_to(htonl(INADDR_LOOPBACK), options.metrics_port));
    ASSERT_GE(slow.back().get(), 0) << "connection " << i;
    const std::string start = "GET /metrics HTTP/1.1\r\nX-Slow: ";
    ::send(slow.back().get(), start.data(), start.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
  }
  std::atomic<bool> stop{false};
  std::thread trickle([&] {
    while (!stop) {
      for (const Fd& fd : slow) ::send(fd.get(), "a", 1, MSG_NOSIGNAL | MSG_DONTWAIT);
      for (int i = 0; i < 10 && !stop; ++i) std::this_thread::sleep_for(100ms);
    }
  });
  std::this_thread::sleep_for(2s);

  httplib::Client client("127.0.0.1", options.metrics_port);
  client.set_connection_timeout(30, 0);
  client.set_read_timeout(60, 0);
  bool served = false;
  const auto deadline = Clock::now() + 120s;
  while (!served && Clock::now() < deadline) {
    const auto response = client.Get("/metrics");
    served = response && response->status == 200;
  }
  EXPECT_TRUE(served) << "no /metrics within 120 s while " << kSlow
                      << " connections trickled their heads";

  // Past the server's deadlines, it holds few of them (each one a descriptor and maybe a thread).
  std::this_thread::sleep_for(5s);
  int open = 0;
  for (const Fd& fd : slow) open += closed_by_server(fd.get()) ? 0 : 1;
  stop = true;
  trickle.join();
  EXPECT_LE(open, kSlow / 2) << open << " of " << kSlow << " trickling connections still held";
  slow.clear();
  monitor.finish();
  fs::remove_all(dir);
}

TEST_F(MonitorHardeningTest, EventTextIsCutOnCharactersAndKeptValidUtf8) {
  const int rank = bus_->rank();
  const int size = bus_->size();
  const fs::path dir = shared_directory("hardening-utf8");
  // (Events are cut at 4096 bytes: here inside a two-byte character.)
  const std::string straddling = std::string(4095, 'a') + "\xc3\xa9 and more";
  const std::string cut = std::string(4095, 'a');
  if (rank == 0) {
    fs::create_directories(dir / "run");
    std::ofstream(dir / "run" / "events.jsonl")
        << json{{"event", "failure"}, {"time", 1.0}, {"reason", straddling}}.dump() << '\n';
  }
  MonitorOptions options = rank == 0 ? server_options(dir) : test_options(dir);
  Monitor monitor(*bus_, options);
  EXPECT_NO_THROW(monitor.event("info", straddling));
  EXPECT_NO_THROW(monitor.event("info", "bad \xff\xfe bytes \xc3"));
  EXPECT_NO_THROW(monitor.event("kind\xff", "odd kind"));
  monitor.step(1, 1.0, 1);
  if (rank == 0) {
    const std::string replaced = "bad \xef\xbf\xbd\xef\xbf\xbd bytes \xef\xbf\xbd";
    httplib::Client client("127.0.0.1", options.metrics_port);
    client.set_read_timeout(60, 0);
    bool all = false;
    std::string body;
    const auto deadline = Clock::now() + 120s;
    while (!all && Clock::now() < deadline) {
      const auto response = client.Get("/api/status");
      ASSERT_TRUE(response) << "no answer from /api/status";
      ASSERT_EQ(response->status, 200) << response->body;
      body = response->body;
      const json status = json::parse(body, nullptr, false);
      ASSERT_FALSE(status.is_discarded()) << body.substr(0, 200);
      std::vector<std::string> texts;
      for (const auto& event : status.at("events")) texts.push_back(event.at("text"));
      const auto has = [&](const std::string& text) {
        return std::find(texts.begin(), texts.end(), text) != texts.end();
      };
      all = has(cut);  // the launcher's
      for (int r = 0; r < size; ++r) {
        const std::string prefix = "rank " + std::to_string(r) + ": ";
        all = all && has(prefix + cut) && has(prefix + replaced) && has(prefix + "odd kind");
      }
      if (!all) std::this_thread::sleep_for(50ms);
    }
    EXPECT_TRUE(all) << "events missing or altered: " << body.substr(0, 300);
  }
  monitor.finish();
  if (rank == 0) {
    const auto status = read_json(dir / "run" / "status.json");
    ASSERT_TRUE(status) << "status.json does not parse";
    EXPECT_GE(status->at("events").size(), static_cast<std::size_t>(1 + 3 * size));
    std::ifstream lines(dir / "run" / "metrics.jsonl");
    std::string line;
    while (std::getline(lines, line)) {
      EXPECT_FALSE(json::parse(line, nullptr, false).is_discarded()) << line.substr(0, 200);
    }
    fs::remove_all(dir);
  }
}

// Unmounts on scope exit.
class Mount {
 public:
  explicit Mount(fs::path path) : path_(std::move(path)) {}
  ~Mount() { ::umount2(path_.c_str(), MNT_DETACH); }
  Mount(const Mount&) = delete;
  Mount& operator=(const Mount&) = delete;

 private:
  fs::path path_;
};

// Fills the file system under `path` until it has no room left.
void fill(const fs::path& path) {
  Fd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600));
  const std::vector<char> block(4096, 'f');
  while (::write(fd.get(), block.data(), block.size()) > 0) {
  }
  while (::write(fd.get(), block.data(), 1) > 0) {
  }
}

TEST_F(MonitorHardeningTest, AFullDiskLeavesTheLastGoodStatusFile) {
  if (bus_->size() > 1) GTEST_SKIP() << "rank 0's files are the same at any size: tested on one";
  const fs::path dir = shared_directory("hardening-disk");
  const fs::path run = dir / "run";
  fs::create_directories(run);
  if (::mount("tmpfs", run.c_str(), "tmpfs", 0, "size=64k") != 0) {
    const std::string why = std::strerror(errno);
    fs::remove_all(dir);
    GTEST_SKIP() << "cannot mount a small tmpfs to fill (" << why << "; needs root)";
  }
  {
    Mount mount(run);
    MonitorOptions options = test_options(dir);
    Monitor monitor(*bus_, options);
    monitor.step(1, 1.0, 1);
    const auto is_step = [&](std::uint64_t step) {
      const auto status = read_json(run / "status.json");
      return status && status->at("step") == step;
    };
    auto deadline = Clock::now() + 60s;
    while (!is_step(1) && Clock::now() < deadline) std::this_thread::sleep_for(50ms);
    ASSERT_TRUE(is_step(1)) << "no status.json at step 1";

    fill(run / "filler");
    // (A short status.json: the stream keeps all of it in its buffer, and the write fails only
    // when it is flushed at close.)
    monitor.step(2, 1.0, 1);
    std::this_thread::sleep_for(3500ms);  // the board is written every second
    const auto status = read_json(run / "status.json");
    ASSERT_TRUE(status) << "status.json torn on a full disk";
    EXPECT_EQ(status->at("step"), 1);
    EXPECT_FALSE(fs::exists(run / "status.json.tmp"));

    fs::remove(run / "filler");
    deadline = Clock::now() + 60s;
    while (!is_step(2) && Clock::now() < deadline) std::this_thread::sleep_for(50ms);
    EXPECT_TRUE(is_step(2)) << "status.json not written again once there was room";
    monitor.finish();
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace unimsg
