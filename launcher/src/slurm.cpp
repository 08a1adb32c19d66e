#include "unimsg/launcher/slurm.hpp"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "unimsg/core/error.hpp"

extern char** environ;

namespace unimsg {
namespace {

constexpr std::string_view kCpusVariable = "SLURM_JOB_CPUS_PER_NODE";
constexpr std::string_view kNodesVariable = "SLURM_JOB_NODELIST";
// `scontrol show hostnames` prints a name per line: a few MiB is a very large cluster.
constexpr std::size_t kMaxHostnamesBytes = 16 << 20;

[[noreturn]] void bad(std::string_view what, const std::string& why) {
  throw ConfigError(kNoRank, std::string(what), why);
}

// (Appended, not "'" + string: GCC 12 warns falsely on that form.)
std::string in_quotes(std::string_view text) {
  std::string result(1, '\'');
  result.append(text).push_back('\'');
  return result;
}

int positive(std::string_view text, std::string_view whole) {
  int value = 0;
  const auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || ptr != text.data() + text.size() || value < 1) {
    bad(kCpusVariable, in_quotes(whole) + " is not of the form 2(x3),1,...");
  }
  return value;
}

struct Captured {
  int status = 0;
  std::string output;  // stdout and stderr together
};

// Runs `command` (no shell) and returns what it printed; throws when it cannot run or prints
// more than `limit` bytes.
Captured capture(const std::vector<std::string>& command, std::size_t limit) {
  int pipe_ends[2];
  if (::pipe2(pipe_ends, O_CLOEXEC) != 0) bad(command[0], "pipe: " + std::string(strerror(errno)));
  posix_spawn_file_actions_t files;
  posix_spawn_file_actions_init(&files);
  posix_spawn_file_actions_adddup2(&files, pipe_ends[1], STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&files, pipe_ends[1], STDERR_FILENO);
  std::vector<char*> args;
  for (const auto& word : command) args.push_back(const_cast<char*>(word.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  const int error = posix_spawnp(&pid, args[0], &files, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&files);
  ::close(pipe_ends[1]);
  if (error != 0) {
    ::close(pipe_ends[0]);
    bad(command[0], "cannot run it: " + std::string(strerror(error)));
  }
  Captured captured;
  char chunk[4096];
  bool too_much = false;
  for (;;) {
    const ssize_t got = ::read(pipe_ends[0], chunk, sizeof chunk);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) break;
    if (captured.output.size() + static_cast<std::size_t>(got) > limit) {
      too_much = true;
      break;
    }
    captured.output.append(chunk, static_cast<std::size_t>(got));
  }
  ::close(pipe_ends[0]);  // (a writer past the limit gets SIGPIPE and ends)
  while (::waitpid(pid, &captured.status, 0) < 0 && errno == EINTR) {
  }
  if (too_much) bad(command[0], "printed more than " + std::to_string(limit) + " bytes");
  return captured;
}

}  // namespace

std::vector<int> parse_slurm_counts(std::string_view text, std::size_t max_nodes) {
  std::vector<int> counts;
  if (text.empty()) bad(kCpusVariable, "is empty");
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t comma = std::min(text.find(',', start), text.size());
    const std::string_view item = text.substr(start, comma - start);
    int repeat = 1;
    std::string_view count = item;
    if (const std::size_t open = item.find("(x"); open != std::string_view::npos) {
      if (item.back() != ')') bad(kCpusVariable, in_quotes(item) + " lacks its ')'");
      repeat = positive(item.substr(open + 2, item.size() - open - 3), item);
      count = item.substr(0, open);
    }
    const int value = positive(count, item);
    if (counts.size() + static_cast<std::size_t>(repeat) > max_nodes) {
      bad(kCpusVariable, "names more than " + std::to_string(max_nodes) + " nodes");
    }
    counts.insert(counts.end(), static_cast<std::size_t>(repeat), value);
    start = comma + 1;
  }
  return counts;
}

std::vector<Host> slurm_hosts(const std::vector<std::string>& nodes, std::string_view cpus) {
  const auto counts = parse_slurm_counts(cpus, nodes.size() + 1);
  if (counts.size() != nodes.size()) {
    bad(kCpusVariable, std::to_string(counts.size()) + " counts for " +
                           std::to_string(nodes.size()) + " nodes of " +
                           std::string(kNodesVariable));
  }
  std::vector<Host> hosts;
  for (std::size_t i = 0; i < nodes.size(); ++i) {
    if (!valid_host_name(nodes[i]))
      bad(kNodesVariable, in_quotes(nodes[i]) + " is not a host name");
    hosts.push_back(Host{nodes[i], counts[i]});
  }
  total_slots(hosts);  // (a sum past an int is refused)
  return hosts;
}

std::vector<Host> allocation_hosts(const std::string& scontrol) {
  const char* list = std::getenv(std::string(kNodesVariable).c_str());
  if (list == nullptr || *list == '\0') return {};
  const char* cpus = std::getenv(std::string(kCpusVariable).c_str());
  if (cpus == nullptr) bad(kCpusVariable, "is not set, though SLURM_JOB_NODELIST is");
  const Captured listed = capture({scontrol, "show", "hostnames", list}, kMaxHostnamesBytes);
  if (!WIFEXITED(listed.status) || WEXITSTATUS(listed.status) != 0) {
    bad(kNodesVariable, "scontrol show hostnames failed: " + listed.output.substr(0, 500));
  }
  std::vector<std::string> nodes;
  std::istringstream lines(listed.output);
  for (std::string line; std::getline(lines, line);) {
    if (!line.empty()) nodes.push_back(line);
  }
  if (nodes.empty()) bad(kNodesVariable, in_quotes(list) + " names no node");
  return slurm_hosts(nodes, cpus);
}

}  // namespace unimsg
