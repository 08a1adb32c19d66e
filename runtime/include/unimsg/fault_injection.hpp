#pragma once

// Fault injection for users and tests: UNIMSG_FAULT_INJECT=rank:R,step:S,mode:kill|exit makes
// rank R die at the trainer's step S (kill: SIGKILL, as a crashed node; exit: status 1). It acts
// only on the first launch (UNIMSG_RESTART_COUNT unset or 0), so that the relaunched job runs
// on. A malformed value is a ConfigError.

#include <cstdint>
#include <optional>
#include <string_view>

namespace unimsg {

struct FaultInjection {
  enum class Mode { kKill, kExit };
  int rank = 0;
  std::uint64_t step = 0;
  Mode mode = Mode::kKill;

  static FaultInjection parse(std::string_view text);
  // From the environment; nullopt when unset or after a restart.
  static std::optional<FaultInjection> from_env();
  // Dies here if this is the rank and the step.
  void at_step(int rank, std::uint64_t step) const;
};

}  // namespace unimsg
