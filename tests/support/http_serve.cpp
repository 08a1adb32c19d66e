// A static file server for script tests: serves DIR at a free port of ADDRESS (127.0.0.1 unless
// --bind says otherwise: the cluster tests serve from a namespace host), prints the port on
// stdout, and runs until killed (cpp-httplib; Range requests supported). With --log, one line
// per request ("GET /path 200") is appended to FILE, so tests can count downloads.
//   unimsg-test-http-serve [--bind ADDRESS] [--log FILE] DIR

#include <httplib.h>

#include <cstdio>
#include <fstream>
#include <mutex>
#include <string>
#include <string_view>

int main(int argc, char** argv) {
  std::string address = "127.0.0.1";
  std::string log_path;
  std::string dir;
  for (int i = 1; i < argc; ++i) {
    const std::string_view word = argv[i];
    if (word == "--bind" && i + 1 < argc) {
      address = argv[++i];
    } else if (word == "--log" && i + 1 < argc) {
      log_path = argv[++i];
    } else if (dir.empty() && !word.starts_with("--")) {
      dir = word;
    } else {
      dir.clear();
      break;
    }
  }
  if (dir.empty()) {
    std::fprintf(stderr, "usage: %s [--bind ADDRESS] [--log FILE] DIR\n", argv[0]);
    return 2;
  }
  httplib::Server server;
  if (!server.set_mount_point("/", dir)) {
    std::fprintf(stderr, "%s: cannot serve %s\n", argv[0], dir.c_str());
    return 2;
  }
  std::ofstream log;
  std::mutex log_mutex;
  if (!log_path.empty()) {
    log.open(log_path, std::ios::app);
    server.set_logger([&](const httplib::Request& request, const httplib::Response& response) {
      std::lock_guard lock(log_mutex);
      log << request.method << ' ' << request.path << ' ' << response.status << std::endl;
    });
  }
  const int port = server.bind_to_any_port(address);
  if (port <= 0) return 1;
  std::printf("%d\n", port);
  std::fflush(stdout);
  return server.listen_after_bind() ? 0 : 1;
}
