// unimsg-bench-fetch: download throughput of the task queue against curl, in the same run.
// A local HTTP server (cpp-httplib, in this process) serves --files files of --size bytes from
// memory on 127.0.0.1; each round fetches all of them into a fresh cache with unimsg (the
// FetchQueue, K workers) and with curl (K at a time: `curl --parallel --parallel-max K`), and
// prints MB/s and the ratio unimsg / curl per K.
//
//   unimsg-bench-fetch [--files 16] [--size 16M] [--workers 1,2,4] [--rounds 2] [--json]

#include <httplib.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "unimsg/core/cli.hpp"
#include "unimsg/core/config.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/fetch/fetch_queue.hpp"
#include "unimsg/services/runtime.hpp"

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

struct Settings {
  int files = 16;
  std::uint64_t size = 0;
  int rounds = 2;
  std::vector<int> worker_counts;
  bool json = false;
};

Settings parse_settings(const cxxopts::ParseResult& args) {
  Settings s;
  s.files = args["files"].as<int>();
  s.size = unimsg::parse_size(args["size"].as<std::string>(), "--size");
  s.rounds = args["rounds"].as<int>();
  {
    std::stringstream list(args["workers"].as<std::string>());
    std::string item;
    while (std::getline(list, item, ',')) s.worker_counts.push_back(std::stoi(item));
  }
  if (s.files < 1 || s.size < 1 || s.rounds < 1 || s.worker_counts.empty() ||
      std::any_of(s.worker_counts.begin(), s.worker_counts.end(), [](int w) { return w < 1; })) {
    throw unimsg::ConfigError(unimsg::kNoRank, "unimsg-bench-fetch",
                              "--files, --size, --rounds and every --workers entry must be >= 1");
  }
  if (std::system("curl --version > /dev/null 2>&1") != 0) {
    throw unimsg::ConfigError(unimsg::kNoRank, "unimsg-bench-fetch",
                              "curl is not installed (apt-get install curl): it is the baseline");
  }
  s.json = args.count("json") > 0;
  return s;
}

// Fills `contents` with random files and returns their specs (no URLs yet).
std::vector<unimsg::FetchSpec> make_files(const Settings& s, const fs::path& work,
                                          std::vector<std::string>& contents) {
  std::vector<unimsg::FetchSpec> specs;
  std::mt19937_64 rng(1);
  for (int i = 0; i < s.files; ++i) {
    auto& data = contents[static_cast<std::size_t>(i)];
    data.resize(s.size);
    for (std::size_t j = 0; j + 8 <= data.size(); j += 8) {
      const auto value = rng();
      std::memcpy(data.data() + j, &value, 8);
    }
    const fs::path scratch = work / "scratch";
    std::ofstream(scratch, std::ios::binary) << data;
    specs.push_back({"file" + std::to_string(i), "", unimsg::sha256_file(scratch), s.size});
    fs::remove(scratch);
  }
  return specs;
}

// Serves /fileN from `contents`; returns the port bound on 127.0.0.1.
int bind_server(httplib::Server& server, const std::vector<std::string>& contents) {
  server.Get(R"(/file(\d+))", [&](const httplib::Request& request, httplib::Response& response) {
    const auto index = static_cast<std::size_t>(std::stoul(request.matches[1]));
    if (index >= contents.size()) {
      response.status = 404;
      return;
    }
    const std::string& data = contents[index];
    response.set_content_provider(
        data.size(), "application/octet-stream",
        [&data](std::size_t offset, std::size_t length, httplib::DataSink& sink) {
          sink.write(data.data() + offset, std::min<std::size_t>(length, 1 << 20));
          return true;
        });
  });
  return server.bind_to_any_port("127.0.0.1");
}

// unimsg: the queue, a fresh cache. Returns MB/s.
double unimsg_round(unimsg::Runtime& runtime, const std::vector<unimsg::FetchSpec>& specs,
                    int workers, const fs::path& work, double total_mb, int& exit_code) {
  const fs::path cache = work / "cache";
  fs::remove_all(cache);
  unimsg::FetchQueueOptions options;
  options.workers = workers;
  options.idle_poll = std::chrono::milliseconds(2);
  options.fetch.cache = cache;
  const auto start = Clock::now();
  {
    unimsg::FetchQueue queue(runtime.bus(), options);
    std::vector<std::future<unimsg::FetchResult>> results;
    for (const auto& spec : specs) results.push_back(queue.submit(spec));
    queue.drain();
    for (auto& result : results) {
      const auto got = result.get();
      if (got.outcome.status != unimsg::FetchStatus::kDownloaded) {
        std::fprintf(stderr, "unimsg-bench-fetch: %s: %s\n", got.outcome.name.c_str(),
                     got.outcome.error.c_str());
        exit_code = 1;
      }
    }
  }
  return total_mb / std::chrono::duration<double>(Clock::now() - start).count();
}

// curl: the same files, the same concurrency, written to files as we do. Returns MB/s.
double curl_round(const std::vector<unimsg::FetchSpec>& specs, int workers, const fs::path& work,
                  double total_mb, int& exit_code) {
  const fs::path out = work / "curl";
  fs::remove_all(out);
  fs::create_directories(out);
  std::string command = "curl -s -S --fail --parallel --parallel-max " + std::to_string(workers);
  for (const auto& spec : specs) {
    command += " -o " + (out / spec.name).string() + " " + spec.url;
  }
  // (--parallel draws a progress meter even when silent: its stderr goes to a file.)
  command += " 2> " + (work / "curl.err").string();
  const auto start = Clock::now();
  if (std::system(command.c_str()) != 0) {
    std::ifstream err(work / "curl.err");
    std::fprintf(stderr, "unimsg-bench-fetch: curl failed: %s\n",
                 std::string(std::istreambuf_iterator<char>(err), {}).c_str());
    exit_code = 1;
  }
  return total_mb / std::chrono::duration<double>(Clock::now() - start).count();
}

void print_row(const Settings& s, int workers, double a, double b) {
  if (s.json) {
    std::printf("%s\n", nlohmann::json{{"workers", workers},
                                       {"files", s.files},
                                       {"bytes", static_cast<double>(s.size) * s.files},
                                       {"unimsg_mbps", a},
                                       {"curl_mbps", b},
                                       {"ratio", a / b}}
                            .dump()
                            .c_str());
  } else {
    std::printf("%8d %14.1f %14.1f %8.2f\n", workers, a, b, a / b);
  }
}

int run(int argc, char** argv) {
  cxxopts::Options cli("unimsg-bench-fetch",
                       "Task-queue downloads against curl from a local HTTP server, same run.");
  cli.add_options()("files", "files per round", cxxopts::value<int>()->default_value("16"))(
      "size", "bytes per file (K/M/G)", cxxopts::value<std::string>()->default_value("16M"))(
      "workers", "comma list of concurrent downloads",
      cxxopts::value<std::string>()->default_value("1,2,4"))(
      "rounds", "rounds per worker count (median reported)",
      cxxopts::value<int>()->default_value("2"))("json", "one JSON object per row")(
      "h,help", "show this help");
  const auto args = cli.parse(argc, argv);
  if (args.count("help")) {
    std::puts(cli.help().c_str());
    return 0;
  }
  const Settings settings = parse_settings(args);
  unimsg::Runtime runtime(&argc, &argv);
  if (runtime.size() != 1) {
    throw unimsg::ConfigError(runtime.rank(), "unimsg-bench-fetch", "run it as one process");
  }
  spdlog::set_level(spdlog::level::warn);

  const fs::path work =
      fs::temp_directory_path() / ("unimsg-bench-fetch-" + std::to_string(::getpid()));
  fs::create_directories(work);
  std::vector<std::string> contents(static_cast<std::size_t>(settings.files));
  std::vector<unimsg::FetchSpec> specs = make_files(settings, work, contents);
  httplib::Server server;
  const int port = bind_server(server, contents);
  std::thread serving([&] { server.listen_after_bind(); });
  while (!server.is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  for (int i = 0; i < settings.files; ++i) {
    specs[static_cast<std::size_t>(i)].url =
        "http://127.0.0.1:" + std::to_string(port) + "/file" + std::to_string(i);
  }
  const double total_mb = static_cast<double>(settings.size) * settings.files / 1e6;
  if (!settings.json) {
    std::printf("# unimsg-bench-fetch: %d files x %llu bytes (%.0f MB) from 127.0.0.1, %d rounds\n",
                settings.files, static_cast<unsigned long long>(settings.size), total_mb,
                settings.rounds);
    std::printf("%8s %14s %14s %8s\n", "workers", "unimsg_MBps", "curl_MBps", "ratio");
  }
  int exit_code = 0;
  for (const int workers : settings.worker_counts) {
    std::vector<double> ours, theirs;
    for (int round = 0; round < settings.rounds; ++round) {
      ours.push_back(unimsg_round(runtime, specs, workers, work, total_mb, exit_code));
      theirs.push_back(curl_round(specs, workers, work, total_mb, exit_code));
    }
    print_row(settings, workers, median(ours), median(theirs));
    std::fflush(stdout);
  }
  server.stop();
  serving.join();
  fs::remove_all(work);
  return exit_code;
}

}  // namespace

int main(int argc, char** argv) {
  return unimsg::run_program("unimsg-bench-fetch", argc, argv, run);
}
