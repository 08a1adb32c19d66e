// unimsg-bench-recovery: how fast a job comes back from a lost rank. Runs train_linear on 4 ranks
// under unimsg-run, once with a rank killed (SIGKILL) and once with a rank stopped (SIGSTOP),
// and reports per fault the time to detection and to the first step after the resume, the steps
// lost, and the phases in between (detect, tear down, relaunch, restore, first step), from the
// trainer's JSON lines and unimsg-run's events.jsonl. With --cluster, on 3 namespace hosts x 2
// ranks (scripts/cluster, docs/cluster.md) a whole host is lost instead, three ways: kill, cut,
// freeze (root only).
//
//   unimsg-bench-recovery [--json] [--heartbeat-timeout 2] [--fast-every 5]
//   unimsg-bench-recovery --cluster scripts/cluster [--faults kill,cut,freeze] [--json]

#include <unistd.h>

#include <cstdlib>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "unimsg/core/cli.hpp"
#include "unimsg/core/error.hpp"

namespace {

namespace fs = std::filesystem;

struct Result {
  std::string fault;
  double inject = 0, detected = 0, failure = 0, relaunch = 0, resumed = 0, first_step = 0;
  std::uint64_t inject_step = 0, resumed_step = 0;
};

std::string quote(const std::string& word) {
  std::string quoted = "'";
  for (char c : word) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

// `command` as one shell line, its stderr to `stderr_file`.
std::string shell_line(const std::vector<std::string>& command, const fs::path& stderr_file) {
  std::string line;
  for (const auto& word : command) line += quote(word) + " ";
  return line + "2>" + quote(stderr_file.string());
}

// unimsg-run on 4 ranks with a fault on rank 1, as one shell line (its stderr to a file).
std::string launch_line(const std::string& fault, const fs::path& launcher, const fs::path& trainer,
                        const std::string& heartbeat_timeout, std::uint64_t fast_every,
                        const fs::path& work) {
  const std::string mode = fault == "kill" ? "kill" : "hang";
  const std::vector<std::string> command{launcher.string(),
                                         "-np",
                                         "4",
                                         "--max-restarts",
                                         "1",
                                         "--heartbeat-timeout",
                                         heartbeat_timeout,
                                         "--checkpoint-dir",
                                         (work / "ck").string(),
                                         "--run-dir",
                                         (work / "run").string(),
                                         "-x",
                                         "UNIMSG_FAULT_INJECT=rank:1,step:63,mode:" + mode,
                                         "--",
                                         trainer.string(),
                                         "--steps",
                                         "150",
                                         "--step-ms",
                                         "10",
                                         "--fast-dir",
                                         (work / "fast").string(),
                                         "--fast-every",
                                         std::to_string(fast_every),
                                         "--checkpoint-every",
                                         "50",
                                         "--json"};
  return shell_line(command, work / "stderr");
}

// The cluster a --cluster run loses a host of (one per fault: a lost host stays lost).
struct Cluster {
  std::string script;
  std::string name;
  fs::path hostfile;
  fs::path local_dir;
};

double unix_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string run_output(const std::string& command) {
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(command.c_str(), "r"), pclose);
  std::string out;
  char buffer[4096];
  while (pipe && std::fgets(buffer, sizeof buffer, pipe.get()) != nullptr) out += buffer;
  if (!pipe || pclose(pipe.release()) != 0) {
    throw unimsg::Error(unimsg::kNoRank, "bench-recovery", "failed: " + command);
  }
  return out;
}

// 3 hosts x 2 slots; mpirun's settings for them (the agent, the subnet) go into our environment,
// which unimsg-run and mpirun inherit.
Cluster cluster_up(const std::string& script) {
  // (We own it: popen's shell, the default owner, is gone at once, making it "stale".)
  const auto info = nlohmann::json::parse(run_output(quote(script) + " up --hosts 3 --owner " +
                                                     std::to_string(::getpid()) + " --json"));
  for (const auto& [name, value] : info.at("env").items()) {
    setenv(name.c_str(), value.get<std::string>().c_str(), 1);
  }
  return {script, info.at("name").get<std::string>(), info.at("hostfile").get<std::string>(),
          info.at("local_dir").get<std::string>()};
}

void cluster_down(const Cluster& cluster) {
  const std::string command = quote(cluster.script) + " down --name " + quote(cluster.name);
  if (std::system(command.c_str()) != 0)
    std::fprintf(stderr, "warning: %s failed\n", command.c_str());
}

// unimsg-run on the cluster's 6 slots, the fast tier on each host's own disk.
std::string cluster_launch_line(const Cluster& cluster, const fs::path& launcher,
                                const fs::path& trainer, const std::string& heartbeat_timeout,
                                std::uint64_t fast_every, const fs::path& work) {
  const std::vector<std::string> command{launcher.string(),
                                         "-np",
                                         "6",
                                         "--hostfile",
                                         cluster.hostfile.string(),
                                         "--max-restarts",
                                         "1",
                                         "--heartbeat-timeout",
                                         heartbeat_timeout,
                                         "--teardown-grace",
                                         "8",
                                         "--checkpoint-dir",
                                         (work / "ck").string(),
                                         "--run-dir",
                                         (work / "run").string(),
                                         "--",
                                         trainer.string(),
                                         "--steps",
                                         "150",
                                         "--step-ms",
                                         "10",
                                         "--fast-dir",
                                         (cluster.local_dir / "fast").string(),
                                         "--fast-every",
                                         std::to_string(fast_every),
                                         "--checkpoint-every",
                                         "50",
                                         "--json"};
  return shell_line(command, work / "stderr");
}

// The injection, the resume and the first step after it, from the trainer's JSON lines. With a
// cluster, the injection is ours: the host fault once the first launch passes step 63.
void read_trainer_lines(FILE* pipe, Result& result, const Cluster* cluster = nullptr) {
  char buffer[4096];
  bool after_resume = false;
  while (std::fgets(buffer, sizeof buffer, pipe) != nullptr) {
    nlohmann::json line;
    try {
      line = nlohmann::json::parse(buffer);
    } catch (const nlohmann::json::exception&) {
      continue;  // not one of the trainer's lines
    }
    if (cluster != nullptr && line.value("restart", 1) == 0 && line.contains("step")) {
      // The steps lost count from the last step the first launch reached: the trainer runs on
      // while the fault is being applied.
      const auto step = line.at("step").get<std::uint64_t>();
      if (result.inject != 0) result.inject_step = std::max(result.inject_step, step);
      if (result.inject == 0 && step >= 63) {
        const std::string command =
            quote(cluster->script) + " " + result.fault + " " + quote(cluster->name + "-h1");
        if (std::system(command.c_str()) != 0) {
          throw unimsg::Error(unimsg::kNoRank, "bench-recovery", "failed: " + command);
        }
        result.inject = unix_now();
        result.inject_step = step;
      }
    } else if (line.value("event", "") == "inject") {
      result.inject = line.at("time").get<double>();
      result.inject_step = line.at("step").get<std::uint64_t>();
    } else if (line.value("event", "") == "resumed" && line.value("restart", 0) == 1) {
      result.resumed = line.at("time").get<double>();
      result.resumed_step = line.at("step").get<std::uint64_t>();
      after_resume = true;
    } else if (after_resume && line.contains("step") && result.first_step == 0) {
      result.first_step = line.at("time").get<double>();
    }
  }
}

// The failure, its detection and the relaunch, from unimsg-run's events.jsonl.
void read_events(const fs::path& path, Result& result) {
  std::ifstream events(path);
  std::string text;
  while (std::getline(events, text)) {
    const auto event = nlohmann::json::parse(text);
    if (event.at("event") == "failure") {
      result.failure = event.at("time").get<double>();
      result.detected = event.value("detected_at", result.failure);
    } else if (event.at("event") == "launch" && event.at("restart") == 1) {
      result.relaunch = event.at("time").get<double>();
    }
  }
}

Result measure(const std::string& fault, const fs::path& launcher, const fs::path& trainer,
               const std::string& heartbeat_timeout, std::uint64_t fast_every, const fs::path& work,
               const Cluster* cluster) {
  fs::remove_all(work);
  fs::create_directories(work);
  const std::string line_command =
      cluster != nullptr
          ? cluster_launch_line(*cluster, launcher, trainer, heartbeat_timeout, fast_every, work)
          : launch_line(fault, launcher, trainer, heartbeat_timeout, fast_every, work);
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(line_command.c_str(), "r"), pclose);
  if (!pipe) throw unimsg::Error(unimsg::kNoRank, "bench-recovery", "cannot run unimsg-run");
  Result result;
  result.fault = fault;
  read_trainer_lines(pipe.get(), result, cluster);
  pipe.reset();  // waits for unimsg-run
  read_events(work / "run" / "events.jsonl", result);
  if (result.inject == 0 || result.first_step == 0 || result.failure == 0) {
    std::ifstream err(work / "stderr");
    const std::string log((std::istreambuf_iterator<char>(err)), std::istreambuf_iterator<char>());
    throw unimsg::Error(unimsg::kNoRank, "bench-recovery",
                        "the " + fault + " run did not inject, fail and resume as expected:\n" +
                            log.substr(log.size() > 3000 ? log.size() - 3000 : 0));
  }
  return result;
}

struct Settings {
  fs::path launcher;
  fs::path trainer;
  std::string timeout;
  std::uint64_t fast_every = 5;
  bool json = false;
  fs::path work;
  std::vector<std::string> faults;
  std::string cluster_script;  // --cluster: host faults on namespace hosts
};

Settings parse_settings(const cxxopts::ParseResult& args) {
  Settings s;
  s.launcher = args["launcher"].as<std::string>();
  s.trainer = args["trainer"].as<std::string>();
  for (const auto& path : {s.launcher, s.trainer}) {
    if (!fs::exists(path)) {
      throw unimsg::ConfigError(unimsg::kNoRank, "bench-recovery", path.string() + " not found");
    }
  }
  s.timeout = args["heartbeat-timeout"].as<std::string>();
  s.fast_every = args["fast-every"].as<std::uint64_t>();
  s.json = args.count("json") > 0;
  s.work = fs::temp_directory_path() / ("unimsg-bench-recovery-" + std::to_string(getpid()));
  if (args.count("cluster")) s.cluster_script = args["cluster"].as<std::string>();
  const bool on_cluster = !s.cluster_script.empty();
  std::string list = args.count("faults") ? args["faults"].as<std::string>()
                     : on_cluster         ? std::string("kill,cut,freeze")
                                          : std::string("kill,hang");
  for (std::size_t start = 0; start <= list.size();) {
    const auto comma = std::min(list.find(',', start), list.size());
    const std::string fault = list.substr(start, comma - start);
    const bool known = on_cluster ? fault == "kill" || fault == "cut" || fault == "freeze"
                                  : fault == "kill" || fault == "hang";
    if (!known) {
      throw unimsg::ConfigError(
          unimsg::kNoRank, "--faults",
          "'" + fault + "' is not " + (on_cluster ? "kill, cut or freeze" : "kill or hang"));
    }
    s.faults.push_back(fault);
    start = comma + 1;
  }
  return s;
}

void print_row(const Settings& s, const std::string& fault, const Result& r) {
  const double detect = r.detected - r.inject;
  const double teardown = r.failure - r.detected;
  const double relaunch = r.relaunch - r.failure;
  const double restore = r.resumed - r.relaunch;
  const double first = r.first_step - r.resumed;
  const double resume = r.first_step - r.inject;
  const auto lost = r.inject_step - r.resumed_step;
  if (s.json) {
    std::printf("%s\n", nlohmann::json{{"fault", fault},
                                       {"detect_s", detect},
                                       {"resume_s", resume},
                                       {"steps_lost", lost},
                                       {"heartbeat_timeout_s", std::stod(s.timeout)},
                                       {"fast_interval", s.fast_every},
                                       {"teardown_s", teardown},
                                       {"relaunch_s", relaunch},
                                       {"restore_s", restore},
                                       {"first_step_s", first}}
                            .dump()
                            .c_str());
  } else {
    std::printf("%-6s %9.3f %9.3f %9.3f %9.3f %10.3f %9.3f %11llu\n", fault.c_str(), detect,
                teardown, relaunch, restore, first, resume, static_cast<unsigned long long>(lost));
  }
}

int run(int argc, char** argv) {
  cxxopts::Options cli("unimsg-bench-recovery",
                       "Recovery time of train_linear on 4 ranks under unimsg-run, for a killed "
                       "and a hung rank.");
  const fs::path here = fs::canonical("/proc/self/exe").parent_path();
  cli.add_options()("json", "one JSON object per fault")(
      "heartbeat-timeout", "seconds", cxxopts::value<std::string>()->default_value("2"))(
      "fast-every", "fast-tier checkpoint interval (steps)",
      cxxopts::value<std::uint64_t>()->default_value("5"))(
      "launcher", "unimsg-run",
      cxxopts::value<std::string>()->default_value((here / "../launcher/unimsg-run").string()))(
      "trainer", "train_linear",
      cxxopts::value<std::string>()->default_value((here / "../examples/train_linear").string()))(
      "faults", "comma list of kill, hang (with --cluster: kill, cut, freeze of a host)",
      cxxopts::value<std::string>())(
      "cluster", "scripts/cluster: lose a whole host of 3 namespace hosts x 2 ranks (root)",
      cxxopts::value<std::string>())("h,help", "show this help");
  const auto args = cli.parse(argc, argv);
  if (args.count("help")) {
    std::puts(cli.help().c_str());
    return 0;
  }
  const Settings settings = parse_settings(args);
  if (!settings.json) {
    std::printf(
        settings.cluster_script.empty()
            ? "# unimsg-bench-recovery: train_linear, 4 ranks, fault on rank 1 at step 63, "
              "heartbeat timeout %s s, fast checkpoint every %llu steps\n"
            : "# unimsg-bench-recovery --cluster: train_linear, 3 hosts x 2 ranks, host 1 lost "
              "at step 63, heartbeat timeout %s s, teardown grace 8 s, fast checkpoint every "
              "%llu steps (node-local, with a buddy)\n",
        settings.timeout.c_str(), static_cast<unsigned long long>(settings.fast_every));
    std::printf("%-6s %9s %9s %9s %9s %10s %9s %11s\n", "fault", "detect_s", "teardown", "relaunch",
                "restore", "first_step", "resume_s", "steps_lost");
  }
  for (const auto& fault : settings.faults) {
    std::optional<Cluster> cluster;
    if (!settings.cluster_script.empty()) cluster = cluster_up(settings.cluster_script);
    try {
      const Result r = measure(fault, settings.launcher, settings.trainer, settings.timeout,
                               settings.fast_every, settings.work, cluster ? &*cluster : nullptr);
      print_row(settings, fault, r);
    } catch (...) {
      if (cluster) cluster_down(*cluster);
      throw;
    }
    if (cluster) cluster_down(*cluster);
    std::fflush(stdout);
  }
  std::error_code ignored;
  fs::remove_all(settings.work, ignored);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return unimsg::run_program("unimsg-bench-recovery", argc, argv, run);
}
