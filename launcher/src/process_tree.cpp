#include "unimsg/launcher/process_tree.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#include <charconv>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <thread>

namespace unimsg {
namespace {

// The parent of `pid` from /proc/PID/stat ("pid (comm) state ppid ..."; comm may hold spaces
// and parentheses, so the fields are counted from the last ')').
pid_t parent_of(const std::filesystem::path& stat_file) {
  std::ifstream in(stat_file);
  std::string text;
  std::getline(in, text);
  const auto close = text.rfind(')');
  if (close == std::string::npos || close + 4 >= text.size()) return -1;
  const char* start = text.data() + close + 4;  // past ") S "
  pid_t parent = -1;
  std::from_chars(start, text.data() + text.size(), parent);
  return parent;
}

void reap_children() {
  while (::waitpid(-1, nullptr, WNOHANG) > 0) {
  }
}

}  // namespace

bool become_subreaper() {
#ifdef __linux__
  return ::prctl(PR_SET_CHILD_SUBREAPER, 1) == 0;
#else
  return false;
#endif
}

std::vector<pid_t> descendants_of(pid_t root) {
  std::multimap<pid_t, pid_t> children;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator("/proc", error)) {
    const std::string name = entry.path().filename().string();
    pid_t pid = 0;
    const auto [end, ec] = std::from_chars(name.data(), name.data() + name.size(), pid);
    if (ec != std::errc() || end != name.data() + name.size()) continue;
    const pid_t parent = parent_of(entry.path() / "stat");
    if (parent > 0) children.emplace(parent, pid);
  }
  std::vector<pid_t> found;
  std::vector<pid_t> frontier{root};
  while (!frontier.empty()) {
    const pid_t parent = frontier.back();
    frontier.pop_back();
    const auto [first, last] = children.equal_range(parent);
    for (auto it = first; it != last; ++it) {
      found.push_back(it->second);
      frontier.push_back(it->second);
    }
  }
  return found;
}

int end_descendants(std::chrono::milliseconds grace) {
  auto left = descendants_of(::getpid());
  const int signalled = static_cast<int>(left.size());
  for (const pid_t pid : left) {
    ::kill(pid, SIGTERM);
    ::kill(pid, SIGCONT);  // a stopped process acts on SIGTERM only once continued
  }
  const auto deadline = std::chrono::steady_clock::now() + grace;
  while (!left.empty() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    reap_children();
    left = descendants_of(::getpid());
  }
  for (const pid_t pid : left) ::kill(pid, SIGKILL);
  for (int round = 0; round < 50 && !descendants_of(::getpid()).empty(); ++round) {
    reap_children();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  reap_children();
  return signalled;
}

}  // namespace unimsg
