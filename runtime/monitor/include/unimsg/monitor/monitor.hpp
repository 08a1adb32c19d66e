#pragma once

// The monitoring service: every rank reports its training status over the bus, rank 0
// aggregates it (status.hpp) and publishes it:
//   - <run dir>/metrics.jsonl: every report and event, one JSON object per line;
//   - <run dir>/status.json: the current summary, rewritten every second (unimsg-run's progress
//     line reads it);
//   - http://<rank 0>:UNIMSG_METRICS_PORT/metrics (Prometheus), / (a live page), /api/status;
//   - UNIMSG_TIMELINE=path: a Chrome-trace / Perfetto timeline of every rank's engine,
//     checkpoint and training activity, merged into one file by rank 0 at finish().
// docs/monitoring.md shows all of it.
//
//   unimsg::Monitor monitor(runtime.bus(), unimsg::MonitorOptions::from_env());
//   engine_options.trace = monitor.trace();            // before the engine is built
//   monitor.watch(counters_of(engine)); monitor.watch(heartbeat); monitor.set_total_steps(n);
//   for (...) { ...; monitor.step(step, loss, samples); }
//   monitor.finish();                                   // collective

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "unimsg/bus/bus.hpp"
#include "unimsg/status/status.hpp"
#include "unimsg/trace/trace.hpp"

namespace spdlog {
class logger;
}

namespace unimsg {

class HeartbeatWatch;

// What a step's report takes from the collectives (the engine's cumulative counters). The
// monitor reads them through a callback, so that it needs no collectives header and any source
// of counters can feed it.
struct CommunicationCounters {
  double communication_seconds = 0;    // spent reducing
  double wait_seconds = 0;             // callers blocked waiting for reductions
  std::uint64_t wire_bytes = 0;        // sent for tensors
  std::uint64_t dense_wire_bytes = 0;  // what wire_bytes would have been uncompressed
};
using CommunicationCountersSource = std::function<CommunicationCounters()>;

// The monitor's topics (Kind::kStatus), all addressed to rank 0.
inline constexpr Topic kStatusReportTopic = kServiceTopicBase + 6;  // StatusReport JSON
inline constexpr Topic kStatusEventTopic = kServiceTopicBase + 7;   // {"kind","text"}
inline constexpr Topic kTimelineTopic = kServiceTopicBase + 8;      // '0'|'1' + trace fragment
inline constexpr Topic kClockTopic = kServiceTopicBase + 9;         // clock requests

struct MonitorOptions {
  // metrics.jsonl and status.json go here (UNIMSG_RUN_DIR, which unimsg-run sets); empty: none.
  std::filesystem::path run_dir;
  // Rank 0 serves /metrics, / and /api/status on this port (UNIMSG_METRICS_PORT; 0: no server)
  // and address (UNIMSG_METRICS_ADDRESS). Loopback by default: the page and the metrics show the
  // job to whoever reaches them, so serving other hosts ("0.0.0.0", for a Prometheus elsewhere)
  // is asked for, not assumed (docs/monitoring.md).
  int metrics_port = 0;
  std::string metrics_address = "127.0.0.1";
  // A connection whose request line and headers have not arrived this long after a server
  // thread took it is closed (UNIMSG_METRICS_HEAD_TIMEOUT_S): slow clients cannot hold the
  // server's few threads for long.
  std::chrono::milliseconds http_head_time{std::chrono::seconds(10)};
  // The merged timeline's path (UNIMSG_TIMELINE; empty: no timeline), and the spans each rank
  // keeps at most (UNIMSG_TIMELINE_MAX_EVENTS; later ones are counted as dropped).
  std::filesystem::path timeline;
  std::size_t timeline_max_events = 1u << 20;
  // Ranks report at most this often (UNIMSG_STATUS_INTERVAL_MS): a report covers every step
  // since the previous one.
  std::chrono::milliseconds report_interval{500};
  // How long rank 0's finish() waits for the other ranks' last reports and timelines
  // (UNIMSG_STATUS_FINISH_TIMEOUT_S).
  std::chrono::seconds finish_timeout{60};
  StragglerOptions straggler;
  // Shown on the page and in the metrics (the program's name).
  std::string job = "unimsg";
  int restart = 0;  // UNIMSG_RESTART_COUNT

  static MonitorOptions from_env();
};

class Monitor {
 public:
  // Collective when a timeline is wanted (the ranks agree on a common clock with rank 0).
  // Rank 0 starts its server here; a port it cannot bind is logged, and training goes on.
  Monitor(Bus& bus, MonitorOptions options);
  // Without finish() (an error ends training): stops rank 0's server and threads; rank 0 still
  // writes its own timeline; no peer is waited for, and the engine and heartbeat watch being
  // watched are not touched (they may be gone already).
  ~Monitor();
  Monitor(const Monitor&) = delete;
  Monitor& operator=(const Monitor&) = delete;

  // Where the engine, checkpointer and trainer record timeline spans; null without a timeline.
  TraceRecorder* trace() noexcept { return trace_.get(); }
  // Steps take their communication, waiting and wire bytes from `counters`, heartbeat ages come
  // from `heartbeat`. What they read must outlive finish(); the heartbeat watch, the Monitor
  // itself.
  void watch(CommunicationCountersSource counters);
  void watch(const HeartbeatWatch& heartbeat);
  void set_total_steps(std::uint64_t total_steps);
  // The next step's time counts from now: call it right before the training loop and after
  // pauses that are not training (evaluation). Otherwise steps count from the previous step()
  // (the first from construction).
  void start_timing();

  // Once per optimizer step, on the training thread: `step` completed steps, this step's loss
  // (NaN: unknown), the samples this rank trained on in it.
  void step(std::uint64_t step, double loss, std::uint64_t samples);
  // Something rank 0's page and metrics.jsonl should show (kind: "fault", "info", ...).
  void event(std::string kind, std::string text);

  // Collective: last reports, the timeline merge, the server stops.
  void finish();

  // Rank 0: the port the server listens on (0: none).
  int metrics_port() const noexcept { return bound_port_; }

 private:
  struct Server;
  struct Window {
    std::uint64_t steps = 0;
    std::uint64_t samples = 0;
    double seconds = 0, compute = 0, communication = 0, wait = 0;
  };
  void start_server();
  void send_report(bool final_report);  // report_mutex_ held
  void flush_if_stale();
  void stop_ticker();
  void on_report(const Message& message);
  void handle_report(const StatusReport& report);
  void on_event(const Message& message);
  void handle_event(int source, std::string kind, std::string text);
  void record(const std::string& json_line);
  void tick_loop();
  void write_status_file(double now);
  void load_launcher_events();
  void sync_clock();
  void merge_timeline(bool wait_for_peers);
  void wait_for_final_reports();
  void stop_rank0_services();

  Bus& bus_;
  MonitorOptions options_;
  std::shared_ptr<spdlog::logger> log_;
  std::unique_ptr<TraceRecorder> trace_;
  CommunicationCountersSource counters_;
  const HeartbeatWatch* heartbeat_ = nullptr;
  std::atomic<std::uint64_t> total_steps_{0};
  std::string host_;

  // The training thread's figures (the ticker may send them too).
  std::mutex report_mutex_;
  Window window_;
  std::uint64_t wire_bytes_ = 0, dense_wire_bytes_ = 0;
  double heartbeat_age_ = 0;
  std::uint64_t last_step_ = 0;
  double last_loss_;
  std::chrono::steady_clock::time_point last_step_end_, last_report_;
  double last_communication_ = 0, last_wait_ = 0;
  bool reported_once_ = false;

  // Timeline clock: this rank's steady clock + offset = rank 0's; origin in rank 0's clock.
  std::chrono::nanoseconds clock_offset_{0};
  std::chrono::steady_clock::time_point timeline_origin_;

  // Rank 0.
  std::unique_ptr<StatusBoard> board_;
  std::mutex file_mutex_;
  std::ofstream metrics_file_;
  bool status_file_failing_ = false;  // the last write of status.json failed (warned once)
  std::mutex final_mutex_;
  std::condition_variable final_cv_;
  std::vector<bool> final_ranks_;  // ranks whose last report arrived
  std::unique_ptr<Server> server_;
  int bound_port_ = 0;
  std::mutex tick_mutex_;
  std::condition_variable tick_cv_;
  bool stopping_ = false;
  std::thread ticker_;
  Subscription reports_, events_, clock_;
  bool finished_ = false;
};

}  // namespace unimsg
