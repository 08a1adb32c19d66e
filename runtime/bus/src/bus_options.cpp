// BusOptions from the environment (UNIMSG_BUS_*).

#include "unimsg/bus/bus.hpp"

#include <cstdint>
#include <limits>

#include "unimsg/core/config.hpp"
#include "unimsg/message/message.hpp"

namespace unimsg {

BusOptions BusOptions::from_env() {
  BusOptions options;
  constexpr std::uint64_t kMaxInt = static_cast<std::uint64_t>(std::numeric_limits<int>::max());
  constexpr std::uint64_t kHuge = std::uint64_t{1} << 50;
  if (auto v = env_size("UNIMSG_BUS_MAX_PAYLOAD", 0, kMaxInt - kHeaderSize)) {
    options.max_payload_bytes = *v;
  }
  if (auto v = env_size("UNIMSG_BUS_SEND_QUEUE_BYTES", 1, kHuge)) options.send_queue_bytes = *v;
  if (auto v = env_uint("UNIMSG_BUS_SEND_QUEUE_MESSAGES", 1, kHuge)) {
    options.send_queue_messages = *v;
  }
  if (auto v = env_size("UNIMSG_BUS_INBOX_BYTES", 1, kHuge)) options.inbox_bytes = *v;
  if (auto v = env_uint("UNIMSG_BUS_INBOX_MESSAGES", 1, kHuge)) options.inbox_messages = *v;
  if (auto v = env_size("UNIMSG_BUS_BUFFER_POOL_BYTES", 0, kHuge)) options.buffer_pool_bytes = *v;
  if (auto v = env_uint("UNIMSG_BUS_WINDOW", 2, 1u << 20)) {
    options.window_per_peer = static_cast<std::uint32_t>(*v);
  }
  if (auto v = env_size("UNIMSG_BUS_COMPRESS_THRESHOLD", 0, kHuge)) {
    options.compress_threshold = *v;
  }
  if (auto v = env_bool("UNIMSG_BUS_VERIFY_BULK")) options.verify_bulk_payloads = *v;
  if (auto v = env_uint("UNIMSG_BUS_IDLE_SLEEP_US", 20, 1000000)) {
    options.idle_sleep_max = std::chrono::microseconds(*v);
  }
  if (auto v = env_uint("UNIMSG_BUS_SEND_TIMEOUT_MS", 1, kHuge)) {
    options.send_timeout = std::chrono::milliseconds(*v);
  }
  if (auto v = env_uint("UNIMSG_BUS_SHUTDOWN_TIMEOUT_MS", 1, kHuge)) {
    options.shutdown_timeout = std::chrono::milliseconds(*v);
  }
  return options;
}

}  // namespace unimsg
