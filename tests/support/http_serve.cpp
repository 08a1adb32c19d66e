// A static file server for script tests: serves DIR on 127.0.0.1 at a free port, prints the
// port on stdout, and runs until killed (cpp-httplib; Range requests supported).
//   unimsg-test-http-serve DIR

#include <httplib.h>

#include <cstdio>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  httplib::Server server;
  if (!server.set_mount_point("/", argv[1])) {
    std::fprintf(stderr, "%s: cannot serve %s\n", argv[0], argv[1]);
    return 2;
  }
  const int port = server.bind_to_any_port("127.0.0.1");
  if (port <= 0) return 1;
  std::printf("%d\n", port);
  std::fflush(stdout);
  return server.listen_after_bind() ? 0 : 1;
}
