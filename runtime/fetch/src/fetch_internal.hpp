#pragma once

// What fetch.cpp and manifest.cpp share; not part of the module's interface.

#include <string>
#include <string_view>

namespace unimsg::detail {

bool is_sha256(const std::string& text);

// `text` (an error from libcurl, say) with `url`'s password and query values masked wherever
// they appear, whole or in parts.
std::string redact_text(std::string text, std::string_view url);

}  // namespace unimsg::detail
