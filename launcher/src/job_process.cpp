// unimsg-run's one launch (job_process.hpp).

#include "job_process.hpp"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <ctime>

#include "unimsg/core/error.hpp"
#include "unimsg/launcher/process_tree.hpp"

extern char** environ;

namespace unimsg {
namespace {

using Clock = std::chrono::steady_clock;

// The signal that stops the job gracefully, for one that reached the launcher. srun answers a
// single SIGINT with a status report only: it gets SIGTERM, which it passes to the tasks.
int forwarded_signal(int signal_number, bool slurm) {
  if (signal_number == SIGHUP || (slurm && signal_number == SIGINT)) return SIGTERM;
  return signal_number;
}

// mpirun starts with our signal mask from before the blocking (`mask`), SIGPIPE back to its
// default (ignored here: our reader may quit), in a process group of its own: a Ctrl-C on the
// terminal reaches our group only, and mpirun gets the one SIGINT we forward. (Two in a row
// make mpirun quit at once, leaving the ranks running unsignalled; srun likewise aborts on a
// second within a second.)
void init_spawn_attributes(posix_spawnattr_t& attributes, const sigset_t& mask) {
  posix_spawnattr_init(&attributes);
  posix_spawnattr_setsigmask(&attributes, &mask);
  sigset_t defaults;
  sigemptyset(&defaults);
  sigaddset(&defaults, SIGPIPE);
  posix_spawnattr_setsigdefault(&attributes, &defaults);
  posix_spawnattr_setpgroup(&attributes, 0);
  posix_spawnattr_setflags(&attributes,
                           POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP);
}

struct Spawned {
  pid_t pid = 0;
  int out_fd = -1;  // read ends of the child's stdout and stderr; -1 when they are ours
  int err_fd = -1;
};

// Starts `command` with our signal mask from before the blocking (`mask`). The job's output
// passes through us: the progress line stays below it on a terminal, and mpirun's and the
// agents' reports of a dead rank or a lost host can be read (pipes close-on-exec here; dup2
// makes the child's copies inheritable). Without pipes the output goes straight to ours.
Spawned spawn(const std::vector<std::string>& command, const sigset_t& mask) {
  posix_spawnattr_t attributes;
  init_spawn_attributes(attributes, mask);
  int out_pipe[2] = {-1, -1};
  int err_pipe[2] = {-1, -1};
  posix_spawn_file_actions_t files;
  posix_spawn_file_actions_init(&files);
  const bool through_us = ::pipe2(out_pipe, O_CLOEXEC) == 0 && ::pipe2(err_pipe, O_CLOEXEC) == 0;
  if (through_us) {
    posix_spawn_file_actions_adddup2(&files, out_pipe[1], STDOUT_FILENO);
    posix_spawn_file_actions_adddup2(&files, err_pipe[1], STDERR_FILENO);
  }
  std::vector<char*> args;
  for (const auto& word : command) args.push_back(const_cast<char*>(word.c_str()));
  args.push_back(nullptr);
  Spawned spawned;
  const int error = posix_spawnp(&spawned.pid, args[0], &files, &attributes, args.data(), environ);
  posix_spawnattr_destroy(&attributes);
  posix_spawn_file_actions_destroy(&files);
  for (int* ends : {out_pipe, err_pipe}) {
    if (ends[1] >= 0) ::close(ends[1]);
    if ((error != 0 || !through_us) && ends[0] >= 0) ::close(ends[0]);
  }
  if (error != 0) {
    throw Error(kNoRank, "unimsg-run", "cannot start " + command[0] + ": " + std::strerror(error));
  }
  if (through_us) {
    spawned.out_fd = out_pipe[0];
    spawned.err_fd = err_pipe[0];
  }
  return spawned;
}

// Ends a failed launch that does not end by itself (TeardownSettings): mpirun waits for every
// daemon to confirm its ranks are gone, which a daemon behind a cut link never does.
class Teardown {
 public:
  Teardown(const TeardownSettings& settings, pid_t child) : settings_(settings), child_(child) {}

  void tick(bool fault_known) {
    const auto now = Clock::now();
    if (!fault_known_ && fault_known) {
      fault_known_ = true;
      fault_since_ = now;
    }
    if (!fault_known_) return;
    if (!terminated_ && now - fault_since_ >= settings_.grace) {
      terminated_ = true;
      term_at_ = now;
      spdlog::warn("[unimsg-run] the job has not ended {} s after its fault: ending it",
                   std::chrono::duration_cast<std::chrono::seconds>(settings_.grace).count());
      signal_tree(SIGTERM);
    } else if (terminated_ && !killed_ && now - term_at_ >= settings_.kill_grace) {
      killed_ = true;
      spdlog::warn("[unimsg-run] the job outlived SIGTERM: SIGKILL");
      signal_tree(SIGKILL);
    }
  }
  bool acted() const { return terminated_; }

 private:
  void signal_tree(int signal_number) {
    ::kill(child_, signal_number);
    for (const pid_t pid : descendants_of(::getpid())) {
      ::kill(pid, signal_number);
      // A stopped process (a frozen host's) acts on SIGTERM only once continued.
      if (signal_number == SIGTERM) ::kill(pid, SIGCONT);
    }
  }

  const TeardownSettings& settings_;
  pid_t child_;
  bool fault_known_ = false;
  bool terminated_ = false;
  bool killed_ = false;
  Clock::time_point fault_since_;
  Clock::time_point term_at_;
};

}  // namespace

// Blocks the signals the launch handles itself for as long as it lives, so that none of them
// ends the launcher between the launch and the cleanup after it.
class BlockedSignals {
 public:
  BlockedSignals() {
    sigemptyset(&handled_);
    for (const int signal_number : {SIGINT, SIGTERM, SIGHUP, SIGCHLD}) {
      sigaddset(&handled_, signal_number);
    }
    pthread_sigmask(SIG_BLOCK, &handled_, &previous_);
  }
  ~BlockedSignals() { pthread_sigmask(SIG_SETMASK, &previous_, nullptr); }
  BlockedSignals(const BlockedSignals&) = delete;
  BlockedSignals& operator=(const BlockedSignals&) = delete;
  const sigset_t& handled() const { return handled_; }
  const sigset_t& previous() const { return previous_; }

 private:
  sigset_t handled_;
  sigset_t previous_;
};

// Whatever the launch left running (a launch agent of a host behind a cut link, its daemon) is
// ended when the launch is over, however it ends.
struct EndLeftovers {
  std::chrono::milliseconds grace;
  ~EndLeftovers() {
    if (const int left = end_descendants(grace); left > 0) {
      spdlog::warn("[unimsg-run] ended {} process(es) the launch left running", left);
    }
  }
};

Launch run_and_wait(const std::vector<std::string>& command, bool slurm,
                    const ProgressSettings& progress, const TeardownSettings& teardown) {
  const BlockedSignals signals;  // (declared first: released last, after the cleanup)
  const Spawned child = spawn(command, signals.previous());
  const EndLeftovers cleanup{teardown.kill_grace};
  // (Started with SIGINT/SIGTERM/SIGHUP/SIGCHLD blocked: its thread leaves them to
  // sigtimedwait below.)
  Launch launch;
  std::atomic<bool> fault_said{false};
  const auto watch = [&](std::string_view line) {  // on the display's thread
    if (!launch.dead && (launch.dead = parse_dead_process(line))) fault_said = true;
    auto lost = parse_lost_host(line);
    // Only a host of this launch, and each once: a rank's own "ssh: connect to host ..." about
    // some other machine is not a lost host.
    if (lost && teardown.hosts.count(lost->host) != 0 &&
        std::none_of(launch.lost_hosts.begin(), launch.lost_hosts.end(),
                     [&](const LostHost& known) { return known.host == lost->host; })) {
      launch.lost_hosts.push_back(std::move(*lost));
      fault_said = true;
    }
  };
  std::optional<ProgressDisplay> display;
  // (No terminal line without the output passing through: it would be drawn over.)
  const auto mode = child.out_fd < 0 && progress.mode == ProgressMode::kTerminal
                        ? ProgressMode::kPlain
                        : progress.mode;
  display.emplace(mode, progress.status_file, progress.plain_interval, child.out_fd, child.err_fd,
                  watch);
  Teardown ending(teardown, child.pid);
  const timespec tick{0, 500'000'000};
  for (bool done = false; !done;) {
    siginfo_t info;
    const int signal_number = sigtimedwait(&signals.handled(), &info, &tick);
    if (signal_number == SIGINT || signal_number == SIGTERM || signal_number == SIGHUP) {
      launch.interrupted = true;
      ::kill(child.pid, forwarded_signal(signal_number, slurm));
    }
    // (As a subreaper we also adopt what the job orphans: reap it all, note mpirun's status.)
    int status = 0;
    for (pid_t pid; (pid = ::waitpid(-1, &status, WNOHANG)) > 0;) {
      if (pid == child.pid) {
        launch.status = status;
        done = true;
      }
    }
    // An interrupted job that does not end (a host behind a cut link) is ended the same way.
    std::error_code ignored;
    if (!done) {
      ending.tick(launch.interrupted || fault_said ||
                  std::filesystem::exists(teardown.fault_report, ignored));
    }
  }
  display.reset();  // relays the rest of the output first
  launch.torn_down = ending.acted();
  return launch;
}

}  // namespace unimsg
