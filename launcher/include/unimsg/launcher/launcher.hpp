#pragma once

// unimsg-run's decisions, as pure functions (tested without launching anything): host lists,
// the mpirun/srun command line, and what to do after a failed run.

#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace unimsg {

struct Host {
  std::string name;
  int slots = 1;
  bool operator==(const Host&) const = default;
};

// Letters, digits, '-', '.' and '_' only, and not empty: what a host list may name (and may then
// be put on mpirun's or srun's command line).
bool valid_host_name(std::string_view name);

// "a:2,b,c:4" (a host without ":N" has one slot). ConfigError naming the bad entry, or when the
// slots add up to more than an int holds.
std::vector<Host> parse_host_list(std::string_view text);
// One host per line: "name", "name slots=N" or "name:N"; '#' starts a comment.
std::vector<Host> parse_hostfile(const std::filesystem::path& path);
// ConfigError when the sum does not fit an int.
int total_slots(const std::vector<Host>& hosts);

struct LaunchPlan {
  int np = 0;
  std::vector<Host> hosts;  // empty: this host, np slots
  bool slurm = false;       // srun --mpi=pmix instead of mpirun
  std::string mpirun = "mpirun";
  std::string srun = "srun";
  // Variables to set for the ranks. Their values go through mpirun's (srun's) environment,
  // which the caller sets: mpirun gets only their names (-x NAME), since a command line is
  // visible to every user of every host (ps) and the values may be secrets.
  std::map<std::string, std::string> environment;
  std::vector<std::string> program;  // the program and its arguments
  // mpirun's launch agent in place of ssh (--mca plm_rsh_agent), e.g. scripts/cluster's.
  std::string launch_agent;
  // Open MPI's settings in the launcher's environment (OMPI_MCA_*): mpirun inherits them; kept
  // here so that --dry-run shows them (they hold no secrets).
  std::map<std::string, std::string> mpi_settings;
};

std::vector<std::string> build_command(const LaunchPlan& plan);
// What --dry-run prints: the command line, then the variables given to the ranks with their
// values hidden.
std::string describe_launch(const LaunchPlan& plan);

// What a failed run lost, from the fault report the ranks' fault handler writes (run dir's
// fault-report.json: {"lost_ranks":[...], "lost_hosts":[...], "reason":..., "last_step":...}).
struct FaultReport {
  std::vector<int> lost_ranks;
  std::vector<std::string> lost_hosts;
  // The host each lost rank ran on, where known (same order as lost_ranks; "" unknown): a rank
  // lost alone costs a slot on its own host.
  std::vector<std::string> rank_hosts;
  std::string reason;
  std::optional<long long> last_step;
  std::optional<double> time;  // when the fault was detected (Unix seconds)
};
// nullopt when there is no report, and when it is unreadable or damaged (a full disk, a rank
// killed mid-write, garbage): logged, then treated as no report, so the job is still relaunched.
std::optional<FaultReport> read_fault_report(const std::filesystem::path& path);

// One job per run dir: its events, fault reports and status file have fixed names. Holds an
// exclusive flock on <run dir>/unimsg-run.lock for its lifetime (released by the kernel however
// the launcher ends); ConfigError naming the run dir when another job holds it.
class RunDirLock {
 public:
  explicit RunDirLock(const std::filesystem::path& run_dir);
  ~RunDirLock();
  RunDirLock(const RunDirLock&) = delete;
  RunDirLock& operator=(const RunDirLock&) = delete;

 private:
  int fd_ = -1;
};

// The hosts for the next attempt: lost hosts removed, then one slot less for each lost rank
// that was not on a lost host (from the host that held it when known, else the last host with
// slots). With no hosts (one local host) the world just shrinks.

// A rank's death as mpirun or srun tells it on its output, when a rank dies before any
// watchdog can write a fault report (a killed rank: mpirun ends the job at once):
//   "mpirun noticed that process rank 2 with PID 4242 on node n3 exited on signal 9 (Killed)."
//   "  Process name: [[31335,1],2]"      (mpirun: the first rank to exit non-zero)
//   "srun: error: n3: task 2: Killed"
struct DeadProcess {
  int rank = -1;
  std::string host;  // "" when the line does not say
  std::string how;   // "signal 9 (Killed)", "a non-zero exit", "Killed"
  bool operator==(const DeadProcess&) const = default;
};
std::optional<DeadProcess> parse_dead_process(std::string_view line);
// A host that the launch agent (ssh, or scripts/cluster's agent, which speaks like it) could not
// reach or lost, as it says so on mpirun's output:
//   "ssh: connect to host n3 port 22: No route to host"
//   "ssh: Could not resolve hostname n3: Name or service not known"
//   "Connection to n3 closed by remote host."
//   "Timeout, server n3 not responding."
struct LostHost {
  std::string host;
  std::string how;  // the whole line
  bool operator==(const LostHost&) const = default;
};
std::optional<LostHost> parse_lost_host(std::string_view line);

struct Shrink {
  std::vector<Host> hosts;
  int np = 0;
};
Shrink shrink(const std::vector<Host>& hosts, int np, const FaultReport& report);

// Exit statuses of unimsg-run (docs/launcher.md).
inline constexpr int kExitDone = 0;
inline constexpr int kExitUsage = 2;
inline constexpr int kExitRestartsSpent = 3;
inline constexpr int kExitBelowMinNp = 4;
inline constexpr int kExitNotRestartable = 5;
inline constexpr int kExitCannotStart = 6;
// A rank exiting with this status says "restart me" (its fault handler's code); any death by a
// signal or a non-zero status other than 2 (bad usage) counts as restartable too.
inline constexpr int kRestartableStatus = 75;

}  // namespace unimsg
