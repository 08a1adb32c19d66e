// libFuzzer target for the envelope decoder: any input must either decode or raise a
// DecodeError, never crash, over-read or leak (run under ASan + UBSan). docs/fuzzing.md says how.

#include <cstddef>
#include <cstdint>
#include <span>

#include "unimsg/core/error.hpp"
#include "unimsg/message/message.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto bytes = std::as_bytes(std::span(data, size));
  unimsg::DecodeLimits limits;
  limits.max_payload_bytes = 1 << 20;
  try {
    const unimsg::Message message = unimsg::decode(bytes, limits);
    // What decodes must encode back to a message that decodes to the same payload.
    const auto again = unimsg::decode(std::span<const std::byte>(unimsg::encode(message)), limits);
    if (again.payload.size() != message.payload.size()) __builtin_trap();
  } catch (const unimsg::DecodeError&) {
  }
  try {
    unimsg::decode_header(bytes, limits);
  } catch (const unimsg::DecodeError&) {
  }
  return 0;
}
