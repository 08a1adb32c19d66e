#include "unimsg/core/log.hpp"

#include <spdlog/sinks/stdout_color_sinks.h>

#include <string>

#include "unimsg/core/config.hpp"
#include "unimsg/core/error.hpp"

namespace unimsg {

std::shared_ptr<spdlog::logger> make_rank_logger(int rank, int size) {
  auto sink = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
  auto logger = std::make_shared<spdlog::logger>("unimsg", std::move(sink));
  logger->set_pattern("[%H:%M:%S.%e] [rank " + std::to_string(rank) + "/" + std::to_string(size) +
                      "] [%^%l%$] %v");
  logger->set_level(spdlog::level::info);
  if (const auto level = env_value("UNIMSG_LOG_LEVEL")) {
    const auto parsed = spdlog::level::from_str(*level);
    if (parsed == spdlog::level::off && *level != "off") {
      throw ConfigError(
          rank, "UNIMSG_LOG_LEVEL",
          "invalid value '" + *level + "': use trace, debug, info, warn, error, critical or off");
    }
    logger->set_level(parsed);
  }
  return logger;
}

}  // namespace unimsg
