// Rank 0's HTTP server: /metrics (Prometheus), /api/status (the board as JSON) and / (the live
// page of monitor_page.hpp, which polls /api/status). The only file that includes httplib.

#include <httplib.h>
#include <spdlog/spdlog.h>

#include <nlohmann/json.hpp>

#include <string>

#include "monitor_internal.hpp"
#include "monitor_page.hpp"
#include "unimsg/monitor/monitor.hpp"

namespace unimsg {

Monitor::Server::Server() : http(std::make_unique<httplib::Server>()) {}

Monitor::Server::~Server() = default;

void Monitor::Server::stop() {
  http->stop();
  if (thread.joinable()) thread.join();
}

void Monitor::start_server() {
  auto server = std::make_unique<Server>();
  const auto respond = [this](const char* type, auto body) {
    return [this, type, body](const httplib::Request&, httplib::Response& response) {
      response.set_header("Cache-Control", "no-store");
      response.set_content(body(), type);
    };
  };
  httplib::Server& http = *server->http;
  http.Get("/metrics", respond("text/plain; version=0.0.4; charset=utf-8",
                               [this] { return board_->prometheus(detail::unix_now()); }));
  http.Get("/api/status", respond("application/json", [this] {
             return board_->snapshot(detail::unix_now(), true).dump();
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
  log_->info("monitor: live page at http://{}:{}/ (Prometheus: /metrics)", host_, bound_port_);
  server_ = std::move(server);
}

}  // namespace unimsg
