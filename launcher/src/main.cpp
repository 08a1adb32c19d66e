// unimsg-run: launches a program on N ranks through mpirun (or srun inside a Slurm allocation),
// supervises it, and when it fails re-ranks the survivors and launches again, until the job
// succeeds, --max-restarts is spent or fewer than --min-np slots remain. docs/launcher.md.
//
//   unimsg-run -np 4 [-H host:slots,...|--hostfile F] [--max-restarts 3] [--min-np 2]
//              [--checkpoint-dir D] [--run-dir R] [-x VAR[=value]] [--progress auto|tty|plain|off]
//              [--dry-run] -- program args

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <spdlog/spdlog.h>
// -x values hold commas (UNIMSG_FAULT_INJECT=rank:1,step:5,...): repeated -x, never split.
#define CXXOPTS_VECTOR_DELIMITER '\x1f'
#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "job_process.hpp"
#include "unimsg/core/config.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/launcher/events.hpp"
#include "unimsg/launcher/launcher.hpp"
#include "unimsg/launcher/process_tree.hpp"
#include "unimsg/launcher/progress.hpp"
#include "unimsg/launcher/slurm.hpp"

extern char** environ;

namespace {

namespace fs = std::filesystem;
using namespace unimsg;

// Splits our arguments from the program's: the program starts after "--" or at the first word
// that is neither an option of ours nor an option's value.
struct SplitArgs {
  std::vector<std::string> ours;
  std::vector<std::string> program;
};

SplitArgs split_arguments(int argc, char** argv) {
  static const std::set<std::string> with_value{"-np",
                                                "--np",
                                                "-n",
                                                "-H",
                                                "--host",
                                                "--hostfile",
                                                "--max-restarts",
                                                "--min-np",
                                                "--checkpoint-dir",
                                                "--run-dir",
                                                "--heartbeat-timeout",
                                                "--collective-timeout",
                                                "--progress",
                                                "--progress-interval",
                                                "-x",
                                                "--mpirun",
                                                "--launch-agent",
                                                "--teardown-grace"};
  SplitArgs split;
  split.ours.push_back(argv[0]);
  for (int i = 1; i < argc; ++i) {
    std::string word = argv[i];
    if (word == "--") {
      for (++i; i < argc; ++i) split.program.push_back(argv[i]);
      break;
    }
    if (word.empty() || word[0] != '-') {
      for (; i < argc; ++i) split.program.push_back(argv[i]);
      break;
    }
    if (word == "-np") word = "--np";  // mpirun's spelling; cxxopts wants one letter or two dashes
    split.ours.push_back(word);
    if (with_value.count(argv[i]) && i + 1 < argc) split.ours.push_back(argv[++i]);
  }
  return split;
}

std::string describe(int status) {
  if (WIFEXITED(status)) return "exit status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return std::string("signal ") + strsignal(WTERMSIG(status));
  return "status " + std::to_string(status);
}

// What the command line asks for, checked.
struct Settings {
  LaunchPlan plan;
  int max_restarts = 3;
  int min_np = 1;
  fs::path run_dir;
  ProgressSettings progress;
  TeardownSettings teardown;
  bool dry_run = false;
};

void declare_options(cxxopts::Options& cli) {
  cli.add_options()("np", "ranks to start (also -np)", cxxopts::value<int>())(
      "H,host", "hosts and slots: host:slots,host,...", cxxopts::value<std::string>())(
      "hostfile", "a file of hosts ('host slots=N' or 'host:N' per line)",
      cxxopts::value<std::string>())("max-restarts", "relaunches allowed after failures",
                                     cxxopts::value<int>()->default_value("3"))(
      "min-np", "give up when fewer ranks than this would remain",
      cxxopts::value<int>()->default_value("1"))(
      "checkpoint-dir", "checkpoints (passed as UNIMSG_CHECKPOINT_DIR)",
      cxxopts::value<std::string>())("run-dir", "events.jsonl and fault reports go here",
                                     cxxopts::value<std::string>()->default_value("unimsg-run"))(
      "heartbeat-timeout", "seconds (passed as UNIMSG_HEARTBEAT_TIMEOUT)",
      cxxopts::value<std::string>())(
      "collective-timeout", "seconds (passed as UNIMSG_COLLECTIVE_TIMEOUT_S)",
      cxxopts::value<std::string>())("x", "pass VAR (or VAR=value) to every rank; repeatable",
                                     cxxopts::value<std::vector<std::string>>())(
      "slurm", "launch with srun --mpi=pmix (default inside a Slurm allocation)")(
      "no-slurm", "launch with mpirun even inside a Slurm allocation")(
      "mpirun", "the mpirun to use", cxxopts::value<std::string>()->default_value("mpirun"))(
      "launch-agent",
      "what mpirun runs in place of ssh to start its daemons on the hosts (--mca plm_rsh_agent; "
      "scripts/cluster's agent for namespace hosts)",
      cxxopts::value<std::string>())(
      "teardown-grace",
      "seconds a failed job may take to end by itself after its fault is known, before the "
      "launcher ends it",
      cxxopts::value<int>()->default_value("15"))(
      "progress",
      "a progress line (step, samples/s, ETA) from the job's monitor: auto (on a terminal: one "
      "line kept below the output; otherwise plain lines), tty, plain or off",
      cxxopts::value<std::string>()->default_value("auto"))(
      "progress-interval", "seconds between plain progress lines",
      cxxopts::value<int>()->default_value("10"))(
      "dry-run", "print the command that would run, and exit")("h,help", "show this help");
}

// -np, the program and the hosts.
LaunchPlan parse_plan(const cxxopts::ParseResult& args, const SplitArgs& split) {
  if (!args.count("np")) throw unimsg::ConfigError(unimsg::kNoRank, "-np", "is required");
  LaunchPlan plan;
  plan.np = args["np"].as<int>();
  if (plan.np < 1) throw unimsg::ConfigError(unimsg::kNoRank, "-np", "must be at least 1");
  if (split.program.empty()) {
    throw unimsg::ConfigError(unimsg::kNoRank, "program", "none given (see --help)");
  }
  plan.program = split.program;
  if (plan.program[0].find('/') != std::string::npos && !fs::exists(plan.program[0])) {
    throw unimsg::ConfigError(unimsg::kNoRank, "program", plan.program[0] + " does not exist");
  }
  if (args.count("host") && args.count("hostfile")) {
    throw unimsg::ConfigError(unimsg::kNoRank, "-H/--hostfile", "give one, not both");
  }
  if (args.count("host")) plan.hosts = parse_host_list(args["host"].as<std::string>());
  if (args.count("hostfile")) plan.hosts = parse_hostfile(args["hostfile"].as<std::string>());
  return plan;
}

// Every UNIMSG_* variable of ours goes to the ranks, then what -x and the options add.
void pass_environment(const cxxopts::ParseResult& args, const fs::path& run_dir,
                      std::map<std::string, std::string>& environment) {
  for (char** entry = environ; *entry != nullptr; ++entry) {
    const std::string text = *entry;
    const auto equals = text.find('=');
    if (text.rfind("UNIMSG_", 0) == 0 && equals != std::string::npos) {
      environment[text.substr(0, equals)] = text.substr(equals + 1);
    }
  }
  if (args.count("x")) {
    for (const auto& item : args["x"].as<std::vector<std::string>>()) {
      const auto equals = item.find('=');
      const std::string name = item.substr(0, equals);
      if (name.empty()) throw unimsg::ConfigError(unimsg::kNoRank, "-x", "empty variable name");
      if (equals != std::string::npos) {
        environment[name] = item.substr(equals + 1);
      } else if (const char* value = std::getenv(name.c_str())) {
        environment[name] = value;
      } else {
        throw unimsg::ConfigError(unimsg::kNoRank, "-x", name + " is not set here");
      }
    }
  }
  if (args.count("checkpoint-dir")) {
    environment["UNIMSG_CHECKPOINT_DIR"] =
        fs::absolute(args["checkpoint-dir"].as<std::string>()).string();
  }
  if (args.count("heartbeat-timeout")) {
    environment["UNIMSG_HEARTBEAT_TIMEOUT"] = args["heartbeat-timeout"].as<std::string>();
  }
  if (args.count("collective-timeout")) {
    environment["UNIMSG_COLLECTIVE_TIMEOUT_S"] = args["collective-timeout"].as<std::string>();
  }
  environment["UNIMSG_RUN_DIR"] = run_dir.string();
  environment["UNIMSG_RESTART_COUNT"] = "0";
  // As torchrun sets OMP_NUM_THREADS=1: ranks share the host's cores, and OpenBLAS's own pool
  // (PowerSGD's products) spinning in every rank would take them from each other. An explicit
  // value (in this environment or through -x) wins.
  if (!environment.count("OPENBLAS_NUM_THREADS") &&
      std::getenv("OPENBLAS_NUM_THREADS") == nullptr) {
    environment["OPENBLAS_NUM_THREADS"] = "1";
  }
}

ProgressSettings parse_progress(const cxxopts::ParseResult& args, const fs::path& run_dir) {
  ProgressSettings progress;
  progress.mode = parse_progress_mode(args["progress"].as<std::string>(), ::isatty(STDERR_FILENO));
  progress.status_file = run_dir / "status.json";
  const int interval = args["progress-interval"].as<int>();
  if (interval < 1) {
    throw unimsg::ConfigError(unimsg::kNoRank, "--progress-interval", "must be at least 1 second");
  }
  progress.plain_interval = std::chrono::seconds(interval);
  return progress;
}

Settings parse_settings(const cxxopts::ParseResult& args, const SplitArgs& split) {
  Settings s;
  s.plan = parse_plan(args, split);
  s.max_restarts = args["max-restarts"].as<int>();
  s.min_np = args["min-np"].as<int>();
  if (s.max_restarts < 0) throw unimsg::ConfigError(unimsg::kNoRank, "--max-restarts", "< 0");
  if (s.min_np < 1 || s.min_np > s.plan.np) {
    throw unimsg::ConfigError(unimsg::kNoRank, "--min-np", "must be between 1 and -np");
  }
  s.plan.slurm = args.count("slurm") > 0 ||
                 (std::getenv("SLURM_JOB_ID") != nullptr && args.count("no-slurm") == 0);
  if (s.plan.slurm && s.plan.hosts.empty()) {
    // Inside an allocation its nodes are the host list (empty outside one: srun allocates).
    s.plan.hosts = unimsg::allocation_hosts();
  }
  s.plan.mpirun = args["mpirun"].as<std::string>();
  if (args.count("launch-agent")) {
    s.plan.launch_agent = args["launch-agent"].as<std::string>();
    if (s.plan.launch_agent.empty() || s.plan.slurm ||
        s.plan.launch_agent.find_first_of(" \t,:") != std::string::npos) {
      throw unimsg::ConfigError(unimsg::kNoRank, "--launch-agent",
                                "wants a path without spaces, commas or colons, and mpirun "
                                "(srun starts its tasks through slurmd)");
    }
  }
  for (char** entry = environ; *entry != nullptr; ++entry) {
    const std::string text = *entry;
    const auto equals = text.find('=');
    if (text.rfind("OMPI_MCA_", 0) == 0 && equals != std::string::npos) {
      s.plan.mpi_settings[text.substr(0, equals)] = text.substr(equals + 1);
    }
  }
  const int grace = args["teardown-grace"].as<int>();
  if (grace < 1) throw unimsg::ConfigError(unimsg::kNoRank, "--teardown-grace", "< 1 s");
  s.teardown.grace = std::chrono::seconds(grace);
  s.run_dir = fs::absolute(args["run-dir"].as<std::string>());
  pass_environment(args, s.run_dir, s.plan.environment);
  s.teardown.fault_report = s.run_dir / "fault-report.json";
  s.progress = parse_progress(args, s.run_dir);
  s.dry_run = args.count("dry-run") > 0;
  return s;
}

// Starts the job once and waits for it; nothing when it could not start (the event is written).
std::optional<Launch> launch_once(const Settings& s, EventLog& events, const fs::path& report_path,
                                  int restart) {
  const LaunchPlan& plan = s.plan;
  // The values reach the ranks through mpirun's (srun's) environment, never its command line.
  for (const auto& [name, value] : plan.environment) setenv(name.c_str(), value.c_str(), 1);
  std::error_code error;
  fs::remove(report_path, error);
  fs::remove(s.progress.status_file, error);  // the previous launch's
  const auto command = build_command(plan);
  nlohmann::json details;  // the hosts, when the launch names them
  for (const auto& host : plan.hosts) details["hosts"].push_back(host.name);
  events.write("launch", plan.np, restart, details);
  spdlog::info("[unimsg-run] launch {} of {}: {} rank(s)", restart + 1, s.max_restarts + 1,
               plan.np);
  Launch launch;
  try {
    TeardownSettings teardown = s.teardown;
    for (const auto& host : plan.hosts) teardown.hosts.insert(host.name);
    launch = run_and_wait(command, plan.slurm, s.progress, teardown);
  } catch (const unimsg::Error& failure) {
    events.write("gave_up", plan.np, restart, {{"reason", failure.what()}});
    spdlog::error("[unimsg-run] {}", failure.what());
    return std::nullopt;
  }
  return launch;
}

// What was lost, from the watchdog's fault report or else mpirun's word; written as "failure".
FaultReport record_failure(EventLog& events, const LaunchPlan& plan, int restart,
                           const Launch& launch, const fs::path& report_path) {
  const auto report = read_fault_report(report_path);
  FaultReport lost = report.value_or(FaultReport{});
  const auto& dead = launch.dead;
  if (!report && dead) {
    // No watchdog got to write a report (mpirun ended the job first): mpirun's word for it.
    lost.lost_ranks = {dead->rank};
    lost.rank_hosts = {dead->host};
    lost.reason = "rank " + std::to_string(dead->rank) +
                  (dead->host.empty() ? "" : " on " + dead->host) + ": " + dead->how +
                  " (reported by " + (plan.slurm ? "srun" : "mpirun") + ")";
  }
  // Hosts the launch agent could not reach or lost (ssh's word): dropped whole.
  for (const auto& host : launch.lost_hosts) {
    if (std::find(lost.lost_hosts.begin(), lost.lost_hosts.end(), host.host) ==
        lost.lost_hosts.end()) {
      lost.lost_hosts.push_back(host.host);
    }
  }
  if (!report && !launch.lost_hosts.empty()) {
    lost.reason = "host " + launch.lost_hosts.front().host +
                  " unreachable or lost: " + launch.lost_hosts.front().how +
                  (lost.reason.empty() ? "" : "; " + lost.reason);
  }
  if (lost.reason.empty()) lost.reason = "the job ended with " + describe(launch.status);
  if (launch.torn_down) lost.reason += " (the launcher ended the job: it did not end by itself)";
  nlohmann::json details{{"reason", lost.reason},
                         {"lost_ranks", lost.lost_ranks},
                         {"lost_hosts", lost.lost_hosts},
                         {"fault_report", report.has_value()}};
  if (lost.time) details["detected_at"] = *lost.time;
  if (lost.last_step) details["last_step"] = *lost.last_step;
  events.write("failure", plan.np, restart, details);
  spdlog::warn("[unimsg-run] failure: {}", lost.reason);
  return lost;
}

// The exit status when a failure ends the job; nothing when it may be relaunched.
std::optional<int> stop_status(const Settings& s, EventLog& events, int restart,
                               const Launch& launch) {
  const int status = launch.status;
  if (launch.interrupted) {
    events.write("gave_up", s.plan.np, restart, {{"reason", "interrupted"}});
    return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : kExitRestartsSpent;
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 2) {
    events.write("gave_up", s.plan.np, restart, {{"reason", "the program reported bad usage"}});
    return kExitNotRestartable;
  }
  if (restart >= s.max_restarts) {
    events.write("gave_up", s.plan.np, restart, {{"reason", "--max-restarts spent"}});
    spdlog::error("[unimsg-run] giving up: {} restart(s) spent", s.max_restarts);
    return kExitRestartsSpent;
  }
  return std::nullopt;
}

// Drops what was lost from the plan; the exit status when too few ranks would remain.
std::optional<int> rerank(Settings& s, EventLog& events, int restart, const FaultReport& lost) {
  LaunchPlan& plan = s.plan;
  const Shrink next = shrink(plan.hosts, plan.np, lost);
  if (next.np < s.min_np) {
    events.write("gave_up", next.np, restart, {{"reason", "fewer ranks than --min-np left"}});
    spdlog::error("[unimsg-run] giving up: {} rank(s) left, --min-np is {}", next.np, s.min_np);
    return kExitBelowMinNp;
  }
  events.write(
      "rerank", next.np, restart,
      {{"from", plan.np}, {"lost_ranks", lost.lost_ranks}, {"lost_hosts", lost.lost_hosts}});
  spdlog::warn("[unimsg-run] re-ranking: {} -> {} rank(s)", plan.np, next.np);
  plan.hosts = next.hosts;
  plan.np = next.np;
  events.write("restart", plan.np, restart + 1);
  return std::nullopt;
}

// Launches until the job succeeds or may not be relaunched; returns the exit status.
int supervise(Settings& s) {
  std::error_code error;
  fs::create_directories(s.run_dir, error);
  if (error) {
    throw unimsg::ConfigError(unimsg::kNoRank, "--run-dir",
                              "cannot create " + s.run_dir.string() + ": " + error.message());
  }
  const RunDirLock lock(s.run_dir);  // one job per run dir
  // What a launch orphans (Open MPI's launch agents, their daemons) stays ours to end.
  if (!become_subreaper()) spdlog::warn("[unimsg-run] cannot become a child subreaper");
  EventLog events(s.run_dir / "events.jsonl");
  const fs::path report_path = s.run_dir / "fault-report.json";
  for (int restart = 0;; ++restart) {
    s.plan.environment["UNIMSG_RESTART_COUNT"] = std::to_string(restart);
    const auto launch = launch_once(s, events, report_path, restart);
    if (!launch) return kExitCannotStart;
    if (WIFEXITED(launch->status) && WEXITSTATUS(launch->status) == 0) {
      events.write("done", s.plan.np, restart);
      spdlog::info("[unimsg-run] done after {} restart(s)", restart);
      return kExitDone;
    }
    const FaultReport lost = record_failure(events, s.plan, restart, *launch, report_path);
    if (const auto status = stop_status(s, events, restart, *launch)) return *status;
    if (const auto status = rerank(s, events, restart, lost)) return *status;
  }
}

int run(int argc, char** argv) {
  const SplitArgs split = split_arguments(argc, argv);
  cxxopts::Options cli("unimsg-run",
                       "Launch a unimsg program on N ranks through mpirun (or srun in a Slurm "
                       "allocation); on failure, re-rank the survivors and relaunch.\n"
                       "  unimsg-run -np 4 [options] [--] program [args...]");
  declare_options(cli);
  std::vector<char*> our_argv;
  for (const auto& word : split.ours) our_argv.push_back(const_cast<char*>(word.c_str()));
  const auto args = cli.parse(static_cast<int>(our_argv.size()), our_argv.data());
  if (args.count("help")) {
    std::puts(cli.help().c_str());
    std::puts(
        "Exit status: 0 done; 2 bad usage; 3 failed and --max-restarts spent; 4 fewer than "
        "--min-np ranks left; 5 the program failed in a way a restart cannot fix (it exited "
        "with status 2); 6 could not start mpirun/srun.");
    return 0;
  }
  Settings settings = parse_settings(args, split);
  if (settings.dry_run) {
    std::puts(describe_launch(settings.plan).c_str());
    return kExitDone;
  }
  // A reader of our output may quit (| head -1): the job runs on (progress.hpp).
  ::signal(SIGPIPE, SIG_IGN);
  return supervise(settings);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const cxxopts::exceptions::exception& error) {
    std::fprintf(stderr, "unimsg-run: %s (see --help)\n", error.what());
    return kExitUsage;
  } catch (const unimsg::ConfigError& error) {
    std::fprintf(stderr, "unimsg-run: %s\n", error.what());
    return kExitUsage;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "unimsg-run: %s\n", error.what());
    return 1;
  }
}
