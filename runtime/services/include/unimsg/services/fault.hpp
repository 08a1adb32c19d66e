#pragma once

// The fault handler: on a fault (a lost peer, a collective past its timeout) it writes
// fault-report.json into the run directory (UNIMSG_RUN_DIR; atomically, so the launcher never
// reads half a report), then aborts the job with the "restartable" status 75, which unimsg-run
// answers by re-ranking the survivors and relaunching. Open MPI 4.1 cannot shrink a
// communicator, so aborting the whole job (MPI_Abort) is how every rank, the stopped one
// included, is brought down quickly.

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <mpi.h>

namespace unimsg {

inline constexpr int kRestartableExitStatus = 75;

struct FaultInfo {
  std::vector<int> lost_ranks;
  std::string reason;
  std::optional<std::uint64_t> last_step;
};

// The hosts every one of whose ranks is lost, given each rank's host name.
std::vector<std::string> lost_hosts(const std::vector<std::string>& host_of_rank,
                                    const std::vector<int>& lost_ranks);
// Every rank's host name (collective over `comm`).
std::vector<std::string> gather_host_names(MPI_Comm comm);
// Where a report is written before it is published: host, rank (once MPI is up) and pid in the
// name, since ranks of several hosts write into one shared run dir.
std::filesystem::path fault_report_temp_path(const std::filesystem::path& final_path);
// Writes the report (no-op without UNIMSG_RUN_DIR); returns where it went, nothing when it could
// not be written whole (a full disk) or another rank's came first.
std::optional<std::string> write_fault_report(const FaultInfo& fault,
                                              const std::vector<std::string>& host_of_rank);
// The heartbeat watchdog's answer to silent ranks in a training job: report them and abort.
std::function<void(const std::vector<int>&, std::uint64_t)> abort_on_silence(
    std::vector<std::string> host_of_rank);
// The heartbeat watchdog's answer to hearing no quorum (heartbeat.hpp): this rank is the one cut
// off or stalled, so it blames nobody (no report: the ranks that still hear each other write
// theirs) and exits with kRestartableExitStatus, leaving nothing of the job running on its side.
std::function<void(int, int)> exit_when_isolated();
// Report, log and abort the job with kRestartableExitStatus.
[[noreturn]] void abort_restartable(const FaultInfo& fault,
                                    const std::vector<std::string>& host_of_rank);

}  // namespace unimsg
