#include "unimsg/launcher/launcher.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <fstream>
#include <sstream>

#include "unimsg/core/error.hpp"

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

bool valid_host_name(std::string_view name) {
  return !name.empty() && std::all_of(name.begin(), name.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.' || c == '_';
  });
}

}  // namespace

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
    auto same = std::find_if(hosts.begin(), hosts.end(),
                             [&](const Host& h) { return h.name == host.name; });
    if (same != hosts.end()) {
      same->slots += host.slots;
    } else {
      hosts.push_back(host);
    }
    start = comma + 1;
  }
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
    hosts.push_back(host);
  }
  if (hosts.empty()) bad("--hostfile", path.string() + " lists no hosts");
  return hosts;
}

int total_slots(const std::vector<Host>& hosts) {
  int total = 0;
  for (const auto& host : hosts) total += host.slots;
  return total;
}

std::vector<std::string> build_command(const LaunchPlan& plan) {
  if (plan.np < 1) bad("-np", "must be at least 1");
  if (plan.program.empty()) bad("unimsg-run", "no program to run");
  std::vector<std::string> command;
  if (plan.slurm) {
    command = {plan.srun, "--mpi=pmix", "--ntasks=" + std::to_string(plan.np),
               "--kill-on-bad-exit=1"};
    if (!plan.hosts.empty()) {
      std::string list;
      for (const auto& host : plan.hosts) list += (list.empty() ? "" : ",") + host.name;
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
    for (const auto& [name, value] : plan.environment) {
      command.push_back("-x");
      command.push_back(name + "=" + value);
    }
  }
  command.insert(command.end(), plan.program.begin(), plan.program.end());
  return command;
}

std::optional<FaultReport> read_fault_report(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) return std::nullopt;
  try {
    const auto json = nlohmann::json::parse(in);
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
  } catch (const nlohmann::json::exception& error) {
    bad("fault report", path.string() + " is malformed: " + error.what());
  }
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
  // Slurm: "srun: error: n3: task 2: Killed".
  if (line.rfind("srun: error: ", 0) == 0) {
    const std::string host = word_after("srun: error: ", 0);
    std::size_t end = 0;
    const auto rank = number_after(": task ", 0, &end);
    if (!rank || host.size() < 2 || host.back() != ':') return std::nullopt;
    std::string_view how = end + 2 <= line.size() ? line.substr(end + 2) : std::string_view();
    return DeadProcess{*rank, host.substr(0, host.size() - 1), std::string(how)};
  }
  return std::nullopt;
}

}  // namespace unimsg
