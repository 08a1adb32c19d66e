#pragma once

// Strict parsing of settings that come from outside (environment variables, CLI flags): a bad
// value is a ConfigError naming the setting and the value, never a silent default.

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace unimsg {

// "64", "64K", "1M", "2G" (binary multiples, case-insensitive) -> bytes. `what` names the
// setting in the error.
std::uint64_t parse_size(std::string_view text, std::string_view what);
// An unsigned integer within [min, max].
std::uint64_t parse_uint(std::string_view text, std::string_view what, std::uint64_t min,
                         std::uint64_t max);
// A finite decimal number within [min, max] ("2.5", "1e-3").
double parse_double(std::string_view text, std::string_view what, double min, double max);
// "1", "true", "yes", "on" / "0", "false", "no", "off" (case-insensitive).
bool parse_bool(std::string_view text, std::string_view what);

// The variable's value, or nullopt when it is unset or empty.
std::optional<std::string> env_value(const char* name);
std::optional<std::uint64_t> env_size(const char* name, std::uint64_t min, std::uint64_t max);
std::optional<std::uint64_t> env_uint(const char* name, std::uint64_t min, std::uint64_t max);
std::optional<bool> env_bool(const char* name);
std::optional<double> env_double(const char* name, double min, double max);

}  // namespace unimsg
