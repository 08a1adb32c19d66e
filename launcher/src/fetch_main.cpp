// unimsg-fetch: downloads the files of a manifest into a content-addressed cache through the
// task queue: alone (one process, --workers threads) or under mpirun (workers on every rank,
// rank 0 keeping the queue). Heartbeats watch the ranks: a rank that dies or freezes ends the
// run (status 75, restartable under unimsg-run) instead of leaving the others in drain() for
// ever. docs/fetch.md.
//
//   unimsg-fetch --manifest files.json --cache DIR [--workers N] [--retries R] [--timeout S]
//                [--max-rate BYTES] [--max-size BYTES] [--stall-timeout S] [--json]

#include <mpi.h>

#include <spdlog/spdlog.h>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <fstream>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "unimsg/core/cli.hpp"
#include "unimsg/core/config.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/fetch/fetch_queue.hpp"
#include "unimsg/services/fault.hpp"
#include "unimsg/services/fault_injection.hpp"
#include "unimsg/services/heartbeat.hpp"
#include "unimsg/services/runtime.hpp"

namespace {

// Rank 0's manifest text on every rank (a bad manifest then fails on every rank alike).
std::string read_manifest_everywhere(const std::string& path, int rank) {
  std::string text;
  int status = 0;  // 0 read, 1 could not
  if (rank == 0) {
    std::ifstream in(path, std::ios::binary);
    if (in) {
      std::ostringstream buffer;
      buffer << in.rdbuf();
      text = buffer.str();
    } else {
      status = 1;
    }
  }
  MPI_Bcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD);
  if (status != 0) {
    throw unimsg::ConfigError(rank, "--manifest", "cannot read '" + path + "'");
  }
  unsigned long long length = text.size();
  MPI_Bcast(&length, 1, MPI_UNSIGNED_LONG_LONG, 0, MPI_COMM_WORLD);
  text.resize(length);
  MPI_Bcast(text.data(), static_cast<int>(length), MPI_CHAR, 0, MPI_COMM_WORLD);
  return text;
}

struct Settings {
  std::string manifest;
  unimsg::FetchQueueOptions options;
  bool json = false;
};

void declare_options(cxxopts::Options& cli) {
  cli.add_options()("manifest", "JSON: {\"files\":[{\"name\",\"url\",\"sha256\",\"size\"?}]}",
                    cxxopts::value<std::string>())("cache", "cache directory (objects/<sha256>)",
                                                   cxxopts::value<std::string>())(
      "workers", "concurrent downloads per rank", cxxopts::value<int>()->default_value("4"))(
      "retries", "retries of a file after its first attempt",
      cxxopts::value<int>()->default_value("4"))("timeout", "seconds one attempt may take",
                                                 cxxopts::value<double>()->default_value("300"))(
      "max-rate", "bytes per second per transfer (K/M/G suffixes; 0: unlimited)",
      cxxopts::value<std::string>()->default_value("0"))(
      "lease", "seconds a silent worker keeps a task before it is re-queued",
      cxxopts::value<double>()->default_value("30"))(
      "max-size", "bytes a file without a manifest size may have (K/M/G suffixes)",
      cxxopts::value<std::string>()->default_value("64G"))(
      "stall-timeout", "seconds the queue may stand still before the run gives up",
      cxxopts::value<double>()->default_value("120"))("json", "one JSON object per file (rank 0)")(
      "h,help", "show this help");
}

Settings parse_settings(const cxxopts::ParseResult& args) {
  if (!args.count("manifest") || !args.count("cache")) {
    throw unimsg::ConfigError(unimsg::kNoRank, "unimsg-fetch",
                              "--manifest and --cache are required");
  }
  const int retries = args["retries"].as<int>();
  const double timeout = args["timeout"].as<double>();
  const double lease = args["lease"].as<double>();
  const double stall = args["stall-timeout"].as<double>();
  const int workers = args["workers"].as<int>();
  if (retries < 0 || retries > 100) {
    throw unimsg::ConfigError(unimsg::kNoRank, "--retries", "must be from 0 to 100");
  }
  if (!(timeout > 0) || !(lease > 0) || !(stall > 0)) {
    throw unimsg::ConfigError(unimsg::kNoRank, "--timeout/--lease/--stall-timeout",
                              "must be positive seconds");
  }
  if (workers < 1 || workers > 256) {
    throw unimsg::ConfigError(unimsg::kNoRank, "--workers", "must be from 1 to 256");
  }
  Settings s;
  s.manifest = args["manifest"].as<std::string>();
  unimsg::FetchQueueOptions& options = s.options;
  options.workers = workers;
  options.lease = std::chrono::milliseconds(static_cast<long long>(lease * 1000));
  options.stall_timeout = std::chrono::milliseconds(static_cast<long long>(stall * 1000));
  options.fetch.cache = args["cache"].as<std::string>();
  options.fetch.max_attempts = retries + 1;
  options.fetch.attempt_timeout = std::chrono::milliseconds(static_cast<long long>(timeout * 1000));
  options.fetch.max_bytes_per_second =
      unimsg::parse_size(args["max-rate"].as<std::string>(), "--max-rate");
  options.fetch.max_file_bytes =
      unimsg::parse_size(args["max-size"].as<std::string>(), "--max-size");
  if (options.fetch.max_file_bytes == 0) {
    throw unimsg::ConfigError(unimsg::kNoRank, "--max-size", "must be positive");
  }
  s.json = args.count("json") > 0;
  return s;
}

// Progress every 2 s per file. UNIMSG_FAULT_INJECT's step counts this rank's progress reports
// (one per 250 ms of transfer), so a fault lands in the middle of a download.
void report_progress(unimsg::Runtime& runtime, unimsg::FetchOptions& fetch) {
  const int rank = runtime.rank();
  const auto fault = unimsg::FaultInjection::from_env();
  fetch.progress_interval = std::chrono::milliseconds(250);
  auto progress_state = std::make_shared<std::pair<std::mutex, std::uint64_t>>();
  fetch.progress = [&runtime, fault, progress_state, rank](
                       const unimsg::FetchSpec& spec, std::uint64_t bytes, std::uint64_t total) {
    std::uint64_t reports = 0;
    {
      std::lock_guard lock(progress_state->first);
      reports = ++progress_state->second;
    }
    if (fault) fault->at_step(rank, reports);
    if (reports % 8 == 0) {
      runtime.log().info("fetch {}: {:.1f} of {:.1f} MB", spec.name, bytes / 1e6, total / 1e6);
    }
  };
}

void print_result(unimsg::Runtime& runtime, const unimsg::FetchResult& result, bool json) {
  const auto& outcome = result.outcome;
  if (json) {
    std::printf("%s\n", nlohmann::json{{"name", outcome.name},
                                       {"status", unimsg::to_string(outcome.status)},
                                       {"attempts", outcome.attempts},
                                       {"bytes", outcome.bytes},
                                       {"seconds", outcome.seconds},
                                       {"path", outcome.path.string()},
                                       {"error", outcome.error},
                                       {"worker_rank", result.worker_rank},
                                       {"deliveries", result.deliveries}}
                            .dump()
                            .c_str());
  } else {
    runtime.log().info("{}: {} ({} attempts, {} bytes, {:.2f} s){}{}", outcome.name,
                       unimsg::to_string(outcome.status), outcome.attempts, outcome.bytes,
                       outcome.seconds, outcome.path.empty() ? "" : " -> ",
                       outcome.path.empty() ? outcome.error : outcome.path.string());
  }
}

// A queue that stopped moving: a rank never came to drain(), or rank 0 stopped answering. Ends
// the job at once, as a lost heartbeat does: unwinding would wait on the missing rank.
void drain_or_abort(unimsg::FetchQueue& queue, const std::vector<std::string>& hosts) {
  try {
    queue.drain();
  } catch (const unimsg::DrainStalledError& error) {
    unimsg::abort_restartable({error.absent_ranks(), error.what(), std::nullopt}, hosts);
  } catch (const unimsg::TimeoutError& error) {
    unimsg::abort_restartable({{0}, error.what(), std::nullopt}, hosts);
  }
}

// Rank 0 submits the files; every rank works until the queue drains. Returns the failures.
int fetch_all(unimsg::Runtime& runtime, const Settings& settings,
              const std::vector<unimsg::FetchSpec>& files, const std::vector<std::string>& hosts) {
  int failed = 0;
  unimsg::FetchQueue queue(runtime.bus(), settings.options);
  std::vector<std::future<unimsg::FetchResult>> results;
  if (runtime.rank() == 0) {
    for (const auto& file : files) results.push_back(queue.submit(file));
  }
  drain_or_abort(queue, hosts);
  for (auto& future : results) {
    const unimsg::FetchResult result = future.get();
    failed += result.outcome.status == unimsg::FetchStatus::kFailed;
    print_result(runtime, result, settings.json);
  }
  std::fflush(stdout);
  return failed;
}

int run(int argc, char** argv) {
  cxxopts::Options cli("unimsg-fetch",
                       "Download a manifest's files into a content-addressed cache through the "
                       "unimsg task queue (alone, or under mpirun with workers on every rank).");
  declare_options(cli);
  const auto args = cli.parse(argc, argv);
  if (args.count("help")) {
    std::puts(cli.help().c_str());
    return 0;
  }
  Settings settings = parse_settings(args);

  unimsg::Runtime runtime(&argc, &argv);
  const auto files =
      unimsg::parse_manifest(read_manifest_everywhere(settings.manifest, runtime.rank()));
  report_progress(runtime, settings.options.fetch);
  // As a training session does: a rank silent past UNIMSG_HEARTBEAT_TIMEOUT (dead, or frozen
  // while the others wait for it) is reported and the job aborted.
  const auto hosts = unimsg::gather_host_names(MPI_COMM_WORLD);
  auto heartbeat_options = unimsg::HeartbeatOptions::from_env();
  heartbeat_options.host_of_rank = hosts;
  unimsg::HeartbeatWatch heartbeat(runtime.bus(), heartbeat_options,
                                   unimsg::abort_on_silence(hosts), unimsg::exit_when_isolated());
  int failed = fetch_all(runtime, settings, files, hosts);
  MPI_Bcast(&failed, 1, MPI_INT, 0, MPI_COMM_WORLD);
  heartbeat.stop();  // a planned end: a rank leaving first is not a lost one
  return failed == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  return unimsg::run_program("unimsg-fetch", argc, argv, run);
}
