#pragma once

// Fault injection for users and tests: UNIMSG_FAULT_INJECT=rank:R,step:S,mode:kill|exit|hang
// makes rank R fail at the trainer's step S: kill sends itself SIGKILL (a crashed node), exit
// exits with status 1, hang stops the whole process with SIGSTOP (a hung node: only a heartbeat
// watchdog in the program notices it). mode:slow,ms:M makes rank R a straggler instead: from
// step S on it sleeps M milliseconds (default 50) at every step. It acts only on launch `restart:K`
// (default 0, the first; UNIMSG_RESTART_COUNT tells which launch this is), so that the relaunched
// job runs on; several faults for several launches are separated by ';'. A malformed value is a
// ConfigError.

#include <cstdint>
#include <optional>
#include <string_view>

namespace unimsg {

struct FaultInjection {
  enum class Mode { kKill, kExit, kHang, kSlow };
  int rank = 0;
  std::uint64_t step = 0;
  std::uint64_t restart = 0;
  Mode mode = Mode::kKill;
  std::uint64_t slow_ms = 50;  // kSlow: the sleep per step

  static FaultInjection parse(std::string_view text);
  // The fault for this launch from the environment; nullopt when there is none.
  static std::optional<FaultInjection> from_env();
  // Dies here if this is the rank and the step (kSlow: sleeps from that step on).
  void at_step(int rank, std::uint64_t step) const;
};

}  // namespace unimsg
