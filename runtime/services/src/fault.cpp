#include "unimsg/services/fault.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <set>
#include <string_view>

#include "unimsg/core/config.hpp"

namespace unimsg {

std::vector<std::string> lost_hosts(const std::vector<std::string>& host_of_rank,
                                    const std::vector<int>& lost_ranks) {
  const std::set<int> lost(lost_ranks.begin(), lost_ranks.end());
  std::set<std::string> with_survivors;
  std::set<std::string> with_losses;
  for (std::size_t rank = 0; rank < host_of_rank.size(); ++rank) {
    (lost.count(static_cast<int>(rank)) ? with_losses : with_survivors).insert(host_of_rank[rank]);
  }
  std::vector<std::string> gone;
  for (const auto& host : with_losses) {
    if (!with_survivors.count(host)) gone.push_back(host);
  }
  return gone;
}

std::vector<std::string> gather_host_names(MPI_Comm comm) {
  constexpr int kLength = 256;
  std::array<char, kLength> mine{};
  gethostname(mine.data(), kLength - 1);
  int size = 0;
  MPI_Comm_size(comm, &size);
  std::vector<char> all(static_cast<std::size_t>(size) * kLength);
  MPI_Allgather(mine.data(), kLength, MPI_CHAR, all.data(), kLength, MPI_CHAR, comm);
  std::vector<std::string> names;
  for (int rank = 0; rank < size; ++rank) {
    names.emplace_back(all.data() + static_cast<std::size_t>(rank) * kLength);
  }
  return names;
}

std::filesystem::path fault_report_temp_path(const std::filesystem::path& final_path) {
  std::array<char, 256> host{};
  if (::gethostname(host.data(), host.size() - 1) != 0) host[0] = '\0';
  std::string name = final_path.filename().string() + ".tmp-" + host.data();
  // Ranks of several hosts share the run dir and may share a pid: host, rank and pid together
  // name one process.
  int initialized = 0;
  int finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized != 0 && finalized == 0) {
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    name.append("-r").append(std::to_string(rank));
  }
  name.append("-").append(std::to_string(::getpid()));
  return final_path.parent_path() / name;
}

namespace {

// Whether all of `text` reached the disk's page cache: a full disk shows at write or at close,
// and an unchecked close would let an empty or cut report be published.
bool write_whole_file(const std::filesystem::path& path, std::string_view text) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return false;
  bool ok = true;
  while (ok && !text.empty()) {
    const ssize_t n = ::write(fd, text.data(), text.size());
    if (n < 0 && errno == EINTR) continue;
    ok = n > 0;
    if (ok) text.remove_prefix(static_cast<std::size_t>(n));
  }
  return ::close(fd) == 0 && ok;
}

}  // namespace

std::optional<std::string> write_fault_report(const FaultInfo& fault,
                                              const std::vector<std::string>& host_of_rank) {
  const auto run_dir = env_value("UNIMSG_RUN_DIR");
  if (!run_dir) return std::nullopt;
  const double now =
      std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  nlohmann::json report{
      {"time", now},
      {"lost_ranks", fault.lost_ranks},
      {"lost_hosts", lost_hosts(host_of_rank, fault.lost_ranks)},
      {"reason", fault.reason},
      {"last_step", fault.last_step ? nlohmann::json(*fault.last_step) : nlohmann::json(nullptr)}};
  const std::filesystem::path final_path = std::filesystem::path(*run_dir) / "fault-report.json";
  const std::filesystem::path temp_path = fault_report_temp_path(final_path);
  // (A reason with bytes that are not UTF-8 must not throw here, on the way to MPI_Abort.)
  const std::string text =
      report.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + '\n';
  if (!write_whole_file(temp_path, text)) {
    std::error_code ignored;
    std::filesystem::remove(temp_path, ignored);
    return std::nullopt;
  }
  // link() publishes the whole file at once and fails if a report is already there: the first
  // rank to report wins (a rank thawed by the tear-down's SIGCONT must not overwrite it).
  const bool published = ::link(temp_path.c_str(), final_path.c_str()) == 0;
  std::error_code ignored;
  std::filesystem::remove(temp_path, ignored);
  if (!published) return std::nullopt;
  return final_path.string();
}

std::function<void(const std::vector<int>&, std::uint64_t)> abort_on_silence(
    std::vector<std::string> host_of_rank) {
  return [hosts = std::move(host_of_rank)](const std::vector<int>& silent, std::uint64_t step) {
    abort_restartable({silent, "no heartbeat within UNIMSG_HEARTBEAT_TIMEOUT", step}, hosts);
  };
}

std::function<void(int, int)> exit_when_isolated() {
  return [](int heard, int world) {
    spdlog::error(
        "fault: this rank has heard only {} of {} rank(s) (itself included) for two heartbeat "
        "timeouts: it, not they, is taken to be cut off; exiting (status {}) without a report",
        heard, world, kRestartableExitStatus);
    std::fflush(nullptr);
    std::_Exit(kRestartableExitStatus);
  };
}

void abort_restartable(const FaultInfo& fault, const std::vector<std::string>& host_of_rank) {
  std::string ranks;
  for (int rank : fault.lost_ranks) ranks += (ranks.empty() ? "" : ", ") + std::to_string(rank);
  const auto where = write_fault_report(fault, host_of_rank);
  spdlog::error("fault: {} (lost rank(s) [{}]); {}; aborting the job for a restart (status {})",
                fault.reason, ranks,
                where ? "report in " + *where
                      : std::string("no report written (no UNIMSG_RUN_DIR, or another rank's "
                                    "report came first)"),
                kRestartableExitStatus);
  std::fflush(nullptr);
  MPI_Abort(MPI_COMM_WORLD, kRestartableExitStatus);
  std::_Exit(kRestartableExitStatus);  // MPI_Abort does not return; if it ever did
}

}  // namespace unimsg
