#pragma once

// unimsg-run's one launch: mpirun (srun) started, its output relayed, signals passed on, and a
// job that does not end by itself after a fault ended within a bounded time (docs/launcher.md).

#include <chrono>
#include <filesystem>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "unimsg/launcher/launcher.hpp"
#include "unimsg/launcher/progress.hpp"

namespace unimsg {

struct ProgressSettings {
  ProgressMode mode = ProgressMode::kOff;
  std::filesystem::path status_file;
  std::chrono::seconds plain_interval{10};
};

// When a launch has failed but mpirun has not ended: once the ranks' fault report exists or
// mpirun reported a dead rank or the agent a lost host, mpirun gets `grace` to end the job, then
// it and everything it started get SIGTERM, and `kill_grace` later SIGKILL.
struct TeardownSettings {
  std::filesystem::path fault_report;
  std::set<std::string> hosts;  // the launch's hosts: only these can be reported lost
  std::chrono::milliseconds grace{std::chrono::seconds(15)};
  std::chrono::milliseconds kill_grace{std::chrono::seconds(5)};
};

// How one launch ended.
struct Launch {
  int status = 0;
  bool interrupted = false;
  bool torn_down = false;  // the launcher ended it (TeardownSettings)
  std::optional<DeadProcess> dead;
  std::vector<LostHost> lost_hosts;  // as the launch agent told them, first seen first
};

// Runs `command`, relays its output, forwards SIGINT/SIGTERM/SIGHUP, shows progress, and ends
// it as TeardownSettings say; afterwards ends whatever it left running. Throws unimsg::Error
// when it cannot be started.
Launch run_and_wait(const std::vector<std::string>& command, bool slurm,
                    const ProgressSettings& progress, const TeardownSettings& teardown);

}  // namespace unimsg
