// libFuzzer target for unimsg-fetch's manifest (fetch.hpp): any text must either parse into
// specs that meet the documented checks or raise a ConfigError, never crash; every URL, parsed
// or not, must survive redact_url, which keeps no password of a user:password@ it masked.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "unimsg/core/error.hpp"
#include "unimsg/fetch/fetch.hpp"

namespace {

void check_redacted(std::string_view url) {
  const std::string redacted = unimsg::redact_url(url);
  const auto scheme = url.find("://");
  const auto authority = scheme == std::string_view::npos ? 0 : scheme + 3;
  const auto end = std::min(url.find_first_of("/?#", authority), url.size());
  const auto at = url.substr(authority, end - authority).rfind('@');
  if (at == std::string_view::npos) return;
  const auto user_info = url.substr(authority, at);
  const auto colon = user_info.find(':');
  if (colon == std::string_view::npos) return;
  // The masked form of the authority must be what the redacted URL carries.
  const std::string expected = std::string(user_info.substr(0, colon)) + ":***@";
  if (redacted.compare(authority, expected.size(), expected) != 0) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  check_redacted(text);
  (void)unimsg::allowed_redirect_protocols(text);
  try {
    for (const auto& spec : unimsg::parse_manifest(text)) {
      if (spec.name.empty() || spec.url.empty() || spec.sha256.size() != 64) __builtin_trap();
      check_redacted(spec.url);
    }
  } catch (const unimsg::ConfigError&) {
  }
  return 0;
}
