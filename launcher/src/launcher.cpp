#include "unimsg/launcher/launcher.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <climits>
#include <cstring>
#include <fstream>
#include <sstream>

#include "unimsg/core/error.hpp"
#include "unimsg/launcher/events.hpp"

namespace unimsg {
namespace {

[[noreturn]] void bad(const std::string& what, const std::string& why) {
  throw ConfigError(kNoRank, what, why);
}

int parse_slots(std::string_view text, const std::string& entry) {
  int slots = 0;
  const auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), slots);
  if (ec != std::errc() || ptr != text.data() + text.size() || slots < 1) {
    bad("-H", "'" + entry + "': slots must be a positive integer");
  }
  return slots;
}

// Host lists from users can name absurd slot counts: their sum must stay an int.
void check_total(const std::vector<Host>& hosts, const std::string& what) {
  long long total = 0;
  for (const auto& host : hosts) {
    total += host.slots;
    if (total > INT_MAX) {
      bad(what, "the slots add up to more than " + std::to_string(INT_MAX));
    }
  }
}

// A fault report is a few hundred bytes; anything much larger is not one.
constexpr std::uintmax_t kMaxFaultReportBytes = 1 << 20;

// A host named again adds its slots to its first entry (mpirun's "-H a,a" and a $PBS_NODEFILE,
// one line per slot), so that a lost host is dropped whole.
void add_host(std::vector<Host>& hosts, const Host& host, const std::string& what) {
  const auto same =
      std::find_if(hosts.begin(), hosts.end(), [&](const Host& h) { return h.name == host.name; });
  if (same == hosts.end()) {
    hosts.push_back(host);
    return;
  }
  if (same->slots > INT_MAX - host.slots) {
    bad(what, "'" + host.name + "': the slots add up to more than " + std::to_string(INT_MAX));
  }
  same->slots += host.slots;
}

}  // namespace

bool valid_host_name(std::string_view name) {
  return !name.empty() && std::all_of(name.begin(), name.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.' || c == '_';
  });
}

std::vector<Host> parse_host_list(std::string_view text) {
  std::vector<Host> hosts;
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t comma = std::min(text.find(',', start), text.size());
    const std::string entry(text.substr(start, comma - start));
    if (entry.empty()) bad("-H", "empty entry in '" + std::string(text) + "'");
    const std::size_t colon = entry.find(':');
    Host host;
    host.name = entry.substr(0, colon);
    if (!valid_host_name(host.name)) bad("-H", "'" + entry + "' is not a host name");
    if (colon != std::string::npos) host.slots = parse_slots(entry.substr(colon + 1), entry);
    add_host(hosts, host, "-H");
    start = comma + 1;
  }
  check_total(hosts, "-H");
  return hosts;
}

std::vector<Host> parse_hostfile(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) bad("--hostfile", "cannot read " + path.string());
  std::vector<Host> hosts;
  std::string line;
  int number = 0;
  while (std::getline(in, line)) {
    ++number;
    line = line.substr(0, line.find('#'));
    std::istringstream words(line);
    std::string name;
    if (!(words >> name)) continue;
    std::string slots_entry = name;
    Host host;
    const auto colon = name.find(':');
    if (colon != std::string::npos) {
      host.name = name.substr(0, colon);
      host.slots = parse_slots(name.substr(colon + 1), name);
    } else {
      host.name = name;
    }
    std::string option;
    while (words >> option) {
      if (option.rfind("slots=", 0) == 0) {
        host.slots = parse_slots(option.substr(6), option);
      } else if (option.rfind("max_slots=", 0) != 0) {
        bad("--hostfile",
            path.string() + ":" + std::to_string(number) + ": unknown '" + option + "'");
      }
    }
    if (!valid_host_name(host.name)) {
      bad("--hostfile", path.string() + ":" + std::to_string(number) + ": '" + host.name +
                            "' is not a host name");
    }
    add_host(hosts, host, "--hostfile " + path.string());
  }
  if (hosts.empty()) bad("--hostfile", path.string() + " lists no hosts");
  check_total(hosts, "--hostfile " + path.string());
  return hosts;
}

int total_slots(const std::vector<Host>& hosts) {
  check_total(hosts, "host list");
  int total = 0;
  for (const auto& host : hosts) total += host.slots;
  return total;
}

std::vector<std::string> build_command(const LaunchPlan& plan) {
  if (plan.np < 1) bad("-np", "must be at least 1");
  if (plan.program.empty()) bad("unimsg-run", "no program to run");
  std::vector<std::string> command;
  if (plan.slurm) {
    // --overlap: a step on a lost node stays "running" to slurmctld until the node is declared
    // down, holding its CPUs on the healthy nodes too; the relaunch must not wait for it (the
    // launcher runs one step at a time, so it overlaps only the dead one's leftovers).
    command = {plan.srun, "--mpi=pmix", "--ntasks=" + std::to_string(plan.np),
               "--kill-on-bad-exit=1", "--overlap"};
    if (!plan.hosts.empty()) {
      if (total_slots(plan.hosts) < plan.np) {
        bad("-np", std::to_string(plan.np) + " ranks but only " +
                       std::to_string(total_slots(plan.hosts)) + " CPUs on the nodes left");
      }
      // The first nodes that hold np ranks, all of them used (srun's --nodelist means every
      // node listed gets a task).
      std::string list;
      int nodes = 0;
      for (int slots = 0; slots < plan.np; ++nodes) {
        slots += plan.hosts[nodes].slots;
        list += (list.empty() ? "" : ",") + plan.hosts[nodes].name;
      }
      command.push_back("--nodes=" + std::to_string(nodes));
      command.push_back("--nodelist=" + list);
    }
    // srun passes the launcher's environment, which the caller has set.
  } else {
    command = {plan.mpirun, "-np", std::to_string(plan.np)};
    if (plan.hosts.empty()) {
      // One host: as many ranks as asked, whatever the core count, unbound so that the ranks'
      // helper threads (bus progress, engine) share the cores.
      command.insert(command.end(), {"--oversubscribe", "--bind-to", "none"});
    } else {
      if (total_slots(plan.hosts) < plan.np) {
        bad("-np", std::to_string(plan.np) + " ranks but only " +
                       std::to_string(total_slots(plan.hosts)) + " slots in the host list");
      }
      std::string list;
      for (const auto& host : plan.hosts) {
        list += (list.empty() ? "" : ",") + host.name + ":" + std::to_string(host.slots);
      }
      command.insert(command.end(), {"--host", list, "--bind-to", "none"});
    }
    if (!plan.launch_agent.empty()) {
      command.insert(command.end(), {"--mca", "plm_rsh_agent", plan.launch_agent});
    }
    // Names only: mpirun takes each value from its own environment.
    for (const auto& entry : plan.environment) {
      command.push_back("-x");
      command.push_back(entry.first);
    }
  }
  command.insert(command.end(), plan.program.begin(), plan.program.end());
  return command;
}

std::string describe_launch(const LaunchPlan& plan) {
  std::string text;
  for (const auto& word : build_command(plan)) text += (text.empty() ? "" : " ") + word;
  text += "\nenvironment of the ranks (values hidden):";
  for (const auto& entry : plan.environment) text += " " + entry.first + "=***";
  if (!plan.mpi_settings.empty()) {
    text += "\nOpen MPI settings inherited from this environment:";
    for (const auto& [name, value] : plan.mpi_settings) text += " " + name + "=" + value;
  }
  return text;
}

std::optional<FaultReport> read_fault_report(const std::filesystem::path& path) {
  std::error_code error;
  if (!std::filesystem::exists(path, error)) return std::nullopt;
  const auto ignore = [&](const std::string& why) -> std::optional<FaultReport> {
    spdlog::warn("[unimsg-run] ignoring the fault report {}: {}", path.string(), why);
    return std::nullopt;
  };
  const auto size = std::filesystem::file_size(path, error);
  if (error) return ignore("cannot read it: " + error.message());
  if (size > kMaxFaultReportBytes) return ignore(std::to_string(size) + " bytes, not a report");
  std::ifstream in(path);
  if (!in) return ignore(std::string("cannot open it: ") + std::strerror(errno));
  try {
    const auto json = nlohmann::json::parse(in);
    if (!json.is_object()) return ignore("not a JSON object");
    FaultReport report;
    report.lost_ranks = json.value("lost_ranks", std::vector<int>{});
    report.lost_hosts = json.value("lost_hosts", std::vector<std::string>{});
    report.reason = json.value("reason", std::string{});
    if (json.contains("time") && !json.at("time").is_null()) {
      report.time = json.at("time").get<double>();
    }
    if (json.contains("last_step") && !json.at("last_step").is_null()) {
      report.last_step = json.at("last_step").get<long long>();
    }
    return report;
  } catch (const nlohmann::json::exception& damaged) {
    return ignore(cut_utf8(damaged.what(), kMaxEventText));
  }
}

RunDirLock::RunDirLock(const std::filesystem::path& run_dir) {
  const auto path = run_dir / "unimsg-run.lock";
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) bad("--run-dir", "cannot open " + path.string() + ": " + std::strerror(errno));
  int result = 0;
  do {
    result = ::flock(fd_, LOCK_EX | LOCK_NB);
  } while (result != 0 && errno == EINTR);
  if (result != 0) {
    const int cause = errno;
    ::close(fd_);
    if (cause == EWOULDBLOCK) {
      bad("--run-dir", "another job is running in " + run_dir.string() + " (it holds " +
                           path.string() + "); give this one a run dir of its own with --run-dir");
    }
    bad("--run-dir", "cannot lock " + path.string() + ": " + std::strerror(cause));
  }
}

RunDirLock::~RunDirLock() {
  ::close(fd_);
}

std::string cut_utf8(std::string_view text, std::size_t max_bytes) {
  if (text.size() <= max_bytes) return std::string(text);
  std::size_t end = max_bytes;
  // Back over continuation bytes (10xxxxxx) to the lead byte of the character the cut falls in;
  // keep it whole only if it ends exactly at the cut. A stray byte is a character of its own.
  std::size_t lead = end;
  while (lead > 0 && end - lead < 3 &&
         (static_cast<unsigned char>(text[lead - 1]) & 0xC0) == 0x80) {
    --lead;
  }
  if (lead > 0) {
    const auto byte = static_cast<unsigned char>(text[lead - 1]);
    const std::size_t length = byte >= 0xF8   ? 1
                               : byte >= 0xF0 ? 4
                               : byte >= 0xE0 ? 3
                               : byte >= 0xC0 ? 2
                                              : 1;
    if (length > 1 && lead - 1 + length > end) end = lead - 1;
  }
  return std::string(text.substr(0, end));
}

namespace {

void cut_strings(nlohmann::json& value) {
  if (value.is_string()) {
    auto& text = value.get_ref<std::string&>();
    if (text.size() > kMaxEventText) text = cut_utf8(text, kMaxEventText);
  } else if (value.is_structured()) {
    for (auto& item : value) cut_strings(item);
  }
}

}  // namespace

std::string event_line(const std::string& event, double time, int world_size, int restart,
                       nlohmann::json details) {
  nlohmann::json line{
      {"event", event}, {"time", time}, {"world_size", world_size}, {"restart", restart}};
  if (details.is_object()) {
    cut_strings(details);
    line.update(details);
  }
  // Bytes that are not UTF-8 (from a damaged report, a rank's output) become U+FFFD.
  return line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

EventLog::EventLog(const std::filesystem::path& path) : out_(path, std::ios::app) {
  if (!out_) bad("--run-dir", "cannot write " + path.string());
}

void EventLog::write(const std::string& event, int world_size, int restart,
                     nlohmann::json details) {
  const double now =
      std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  out_ << event_line(event, now, world_size, restart, std::move(details)) << '\n';
  out_.flush();
}

Shrink shrink(const std::vector<Host>& hosts, int np, const FaultReport& report) {
  Shrink next{hosts, np};
  int lost = static_cast<int>(report.lost_ranks.size());
  for (const auto& gone : report.lost_hosts) {
    const auto it = std::find_if(next.hosts.begin(), next.hosts.end(),
                                 [&](const Host& h) { return h.name == gone; });
    if (it == next.hosts.end()) continue;
    next.np -= std::min(it->slots, next.np);
    lost = std::max(0, lost - it->slots);
    next.hosts.erase(it);
  }
  if (lost == 0 && report.lost_hosts.empty()) lost = 1;  // something died: at least one slot
  for (int i = 0; i < lost && next.np > 0; ++i) {
    --next.np;
    // The lost rank's own host when known (and still there), else the last host with slots.
    const std::string known =
        static_cast<std::size_t>(i) < report.rank_hosts.size() ? report.rank_hosts[i] : "";
    const auto own = std::find_if(next.hosts.begin(), next.hosts.end(), [&](const Host& h) {
      return !known.empty() && h.name == known && h.slots > 0;
    });
    if (own != next.hosts.end()) {
      --own->slots;
      continue;
    }
    for (auto it = next.hosts.rbegin(); it != next.hosts.rend(); ++it) {
      if (it->slots > 0) {
        --it->slots;
        break;
      }
    }
  }
  std::erase_if(next.hosts, [](const Host& h) { return h.slots == 0; });
  if (!next.hosts.empty()) next.np = std::min(next.np, total_slots(next.hosts));
  return next;
}

std::optional<DeadProcess> parse_dead_process(std::string_view line) {
  const auto number_after = [&](std::string_view prefix, std::size_t from,
                                std::size_t* end) -> std::optional<int> {
    const std::size_t at = line.find(prefix, from);
    if (at == std::string_view::npos) return std::nullopt;
    std::size_t i = at + prefix.size();
    std::size_t digits = 0;
    long long value = 0;
    while (i < line.size() && std::isdigit(static_cast<unsigned char>(line[i])) && digits < 9) {
      value = value * 10 + (line[i] - '0');
      ++i;
      ++digits;
    }
    if (digits == 0) return std::nullopt;
    if (end != nullptr) *end = i;
    return static_cast<int>(value);
  };
  const auto word_after = [&](std::string_view prefix, std::size_t from) -> std::string {
    const std::size_t at = line.find(prefix, from);
    if (at == std::string_view::npos) return {};
    std::size_t i = at + prefix.size();
    std::size_t start = i;
    while (i < line.size() && !std::isspace(static_cast<unsigned char>(line[i]))) ++i;
    return std::string(line.substr(start, i - start));
  };
  // Open MPI: "mpirun noticed that process rank 2 with PID 4242 on node n3 exited on signal 9
  // (Killed)."
  if (line.find("noticed that process rank ") != std::string_view::npos) {
    std::size_t end = 0;
    const auto rank = number_after("noticed that process rank ", 0, &end);
    if (!rank) return std::nullopt;
    DeadProcess dead{*rank, word_after(" on node ", end), ""};
    const std::size_t how = line.find("exited on ", end);
    if (how != std::string_view::npos) {
      std::string_view text = line.substr(how + 10);
      while (!text.empty() &&
             (text.back() == '.' || std::isspace(static_cast<unsigned char>(text.back())))) {
        text.remove_suffix(1);
      }
      dead.how = std::string(text);
    }
    return dead;
  }
  // Open MPI: the first process to exit non-zero, "  Process name: [[31335,1],2]".
  if (const std::size_t at = line.find("Process name: [["); at != std::string_view::npos) {
    const std::size_t close = line.find("],", at);
    if (close == std::string_view::npos) return std::nullopt;
    const auto rank = number_after("],", close, nullptr);
    if (!rank) return std::nullopt;
    return DeadProcess{*rank, "", "a non-zero exit"};
  }
  // Slurm: "srun: error: n3: task 2: Killed", "srun: error: n3: tasks 2-3: Killed" (the first).
  if (line.rfind("srun: error: ", 0) == 0) {
    const std::string host = word_after("srun: error: ", 0);
    std::size_t end = 0;
    const bool several = line.find(": tasks ") != std::string_view::npos;
    const auto rank = number_after(several ? ": tasks " : ": task ", 0, &end);
    if (!rank || host.size() < 2 || host.back() != ':') return std::nullopt;
    end = line.find(": ", end);
    std::string_view how =
        end != std::string_view::npos ? line.substr(end + 2) : std::string_view();
    return DeadProcess{*rank, host.substr(0, host.size() - 1), std::string(how)};
  }
  return std::nullopt;
}

std::optional<LostHost> parse_lost_host(std::string_view line) {
  while (!line.empty() && std::isspace(static_cast<unsigned char>(line.back()))) {
    line.remove_suffix(1);
  }
  // (prefix, what follows the host name): the host is the word in between ("": the line's end).
  static constexpr std::pair<std::string_view, std::string_view> kForms[] = {
      {"ssh: connect to host ", " port "},           {"ssh: Could not resolve hostname ", ": "},
      {"Connection to ", " closed by remote host."}, {"Timeout, server ", " not responding."},
      {"srun: error: Node failure on ", ""},  // (the host's slurmd is gone)
  };
  while (!line.empty() && std::isspace(static_cast<unsigned char>(line.front()))) {
    line.remove_prefix(1);
  }
  for (const auto& [prefix, after] : kForms) {
    // (At the start of the line only, as the agent writes it: not a rank quoting it.)
    const std::size_t at = line.starts_with(prefix) ? 0 : std::string_view::npos;
    if (at == std::string_view::npos) continue;
    const std::size_t start = at + prefix.size();
    const std::size_t end = after.empty() ? line.size() : line.find(after, start);
    if (end == std::string_view::npos) continue;
    const std::string host(line.substr(start, end - start));
    if (!valid_host_name(host)) continue;
    return LostHost{host, cut_utf8(line.substr(at), kMaxEventText)};
  }
  return std::nullopt;
}

}  // namespace unimsg
