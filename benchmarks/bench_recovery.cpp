// unimsg-bench-recovery: how fast a job comes back from a lost rank. Runs train_linear on 4 ranks
// under unimsg-run, once with a rank killed (SIGKILL) and once with a rank stopped (SIGSTOP),
// and reports per fault the time to detection and to the first step after the resume, the steps
// lost, and the phases in between (detect, tear down, relaunch, restore, first step), from the
// trainer's JSON lines and unimsg-run's events.jsonl.
//
//   unimsg-bench-recovery [--json] [--heartbeat-timeout 2] [--fast-every 5]

#include <unistd.h>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

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
  std::string line_command;
  for (const auto& word : command) line_command += quote(word) + " ";
  line_command += "2>" + quote((work / "stderr").string());
  return line_command;
}

// The injection, the resume and the first step after it, from the trainer's JSON lines.
void read_trainer_lines(FILE* pipe, Result& result) {
  char buffer[4096];
  bool after_resume = false;
  while (std::fgets(buffer, sizeof buffer, pipe) != nullptr) {
    nlohmann::json line;
    try {
      line = nlohmann::json::parse(buffer);
    } catch (const nlohmann::json::exception&) {
      continue;  // not one of the trainer's lines
    }
    if (line.value("event", "") == "inject") {
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
               const std::string& heartbeat_timeout, std::uint64_t fast_every,
               const fs::path& work) {
  fs::remove_all(work);
  fs::create_directories(work);
  const std::string line_command =
      launch_line(fault, launcher, trainer, heartbeat_timeout, fast_every, work);
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(line_command.c_str(), "r"), pclose);
  if (!pipe) throw unimsg::Error(unimsg::kNoRank, "bench-recovery", "cannot run unimsg-run");
  Result result;
  result.fault = fault;
  read_trainer_lines(pipe.get(), result);
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
  std::string list = args["faults"].as<std::string>();
  for (std::size_t start = 0; start <= list.size();) {
    const auto comma = std::min(list.find(',', start), list.size());
    const std::string fault = list.substr(start, comma - start);
    if (fault != "kill" && fault != "hang") {
      throw unimsg::ConfigError(unimsg::kNoRank, "--faults", "'" + fault + "' is not kill or hang");
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
      "faults", "comma list of kill, hang",
      cxxopts::value<std::string>()->default_value("kill,hang"))("h,help", "show this help");
  const auto args = cli.parse(argc, argv);
  if (args.count("help")) {
    std::puts(cli.help().c_str());
    return 0;
  }
  const Settings settings = parse_settings(args);
  if (!settings.json) {
    std::printf(
        "# unimsg-bench-recovery: train_linear, 4 ranks, fault on rank 1 at step 63, "
        "heartbeat timeout %s s, fast checkpoint every %llu steps\n",
        settings.timeout.c_str(), static_cast<unsigned long long>(settings.fast_every));
    std::printf("%-6s %9s %9s %9s %9s %10s %9s %11s\n", "fault", "detect_s", "teardown", "relaunch",
                "restore", "first_step", "resume_s", "steps_lost");
  }
  for (const auto& fault : settings.faults) {
    const Result r = measure(fault, settings.launcher, settings.trainer, settings.timeout,
                             settings.fast_every, settings.work);
    print_row(settings, fault, r);
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
