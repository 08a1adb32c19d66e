#include "unimsg/services/fault_injection.hpp"

#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

#include "unimsg/core/config.hpp"
#include "unimsg/core/error.hpp"

namespace unimsg {

FaultInjection FaultInjection::parse(std::string_view text) {
  constexpr const char* kWhat = "UNIMSG_FAULT_INJECT";
  FaultInjection fault;
  bool has_rank = false;
  bool has_step = false;
  std::size_t start = 0;
  while (start < text.size()) {
    const std::size_t comma = std::min(text.find(',', start), text.size());
    const std::string_view item = text.substr(start, comma - start);
    const std::size_t colon = item.find(':');
    if (colon == std::string_view::npos) {
      throw ConfigError(kNoRank, kWhat,
                        "'" + std::string(item) +
                            "' is not key:value (rank:R,step:S,mode:kill|exit|hang|slow[,ms:M])");
    }
    const std::string_view key = item.substr(0, colon);
    const std::string_view value = item.substr(colon + 1);
    if (key == "rank") {
      fault.rank = static_cast<int>(parse_uint(value, kWhat, 0, 1u << 30));
      has_rank = true;
    } else if (key == "step") {
      fault.step = parse_uint(value, kWhat, 0, ~std::uint64_t{0});
      has_step = true;
    } else if (key == "restart") {
      fault.restart = parse_uint(value, kWhat, 0, 1u << 30);
    } else if (key == "mode") {
      if (value == "kill") {
        fault.mode = Mode::kKill;
      } else if (value == "exit") {
        fault.mode = Mode::kExit;
      } else if (value == "hang") {
        fault.mode = Mode::kHang;
      } else if (value == "slow") {
        fault.mode = Mode::kSlow;
      } else {
        throw ConfigError(kNoRank, kWhat,
                          "mode '" + std::string(value) + "' is not kill, exit, hang or slow");
      }
    } else if (key == "ms") {
      fault.slow_ms = parse_uint(value, kWhat, 1, 3600000);
    } else {
      throw ConfigError(kNoRank, kWhat, "unknown key '" + std::string(key) + "'");
    }
    start = comma + 1;
  }
  if (!has_rank || !has_step) throw ConfigError(kNoRank, kWhat, "needs rank:R and step:S");
  return fault;
}

std::optional<FaultInjection> FaultInjection::from_env() {
  const auto text = env_value("UNIMSG_FAULT_INJECT");
  if (!text) return std::nullopt;
  const std::uint64_t restart = env_uint("UNIMSG_RESTART_COUNT", 0, 1u << 30).value_or(0);
  // Several faults, one per launch, are separated by ';' (each parsed, so a typo anywhere is
  // reported on the first launch).
  std::optional<FaultInjection> chosen;
  std::string_view rest = *text;
  while (!rest.empty()) {
    const std::size_t semicolon = std::min(rest.find(';'), rest.size());
    const FaultInjection fault = parse(rest.substr(0, semicolon));
    if (fault.restart == restart && !chosen) chosen = fault;
    rest.remove_prefix(std::min(semicolon + 1, rest.size()));
  }
  return chosen;
}

void FaultInjection::at_step(int here, std::uint64_t now) const {
  if (here != rank) return;
  if (mode == Mode::kSlow) {
    if (now < step) return;
    if (now == step) {
      std::fprintf(stderr,
                   "[rank %d] UNIMSG_FAULT_INJECT: %llu ms slower per step from step %llu\n", here,
                   static_cast<unsigned long long>(slow_ms), static_cast<unsigned long long>(now));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(slow_ms));
    return;
  }
  if (now != step) return;
  const char* what = mode == Mode::kKill   ? "killing this rank"
                     : mode == Mode::kHang ? "stopping this rank (SIGSTOP)"
                                           : "exiting";
  std::fprintf(stderr, "[rank %d] UNIMSG_FAULT_INJECT: %s at step %llu\n", here, what,
               static_cast<unsigned long long>(now));
  std::fflush(stderr);
  if (mode == Mode::kKill) ::kill(::getpid(), SIGKILL);
  if (mode == Mode::kHang) {
    ::kill(::getpid(), SIGSTOP);  // every thread stops, heartbeats too, until SIGCONT or SIGKILL
    return;
  }
  ::_exit(1);
}

}  // namespace unimsg
