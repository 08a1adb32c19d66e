#pragma once

#include <spdlog/spdlog.h>

#include <memory>

namespace unimsg {

// A logger whose lines start with the rank ("[rank 2/4]"), level from UNIMSG_LOG_LEVEL
// (trace, debug, info, warn, error, off; default info), written to stderr.
std::shared_ptr<spdlog::logger> make_rank_logger(int rank, int size);

}  // namespace unimsg
