#include "unimsg/core/config.hpp"

#include <cctype>
#include <charconv>
#include <cstdlib>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>

#include "unimsg/core/error.hpp"

namespace unimsg {
namespace {

[[noreturn]] void bad_value(std::string_view what, std::string_view text, std::string_view why) {
  throw ConfigError(kNoRank, std::string(what),
                    "invalid value '" + std::string(text) + "': " + std::string(why));
}

std::uint64_t parse_digits(std::string_view digits, std::string_view what, std::string_view text) {
  if (digits.empty()) bad_value(what, text, "expected a non-negative integer");
  std::uint64_t value = 0;
  const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), value);
  if (ec == std::errc::result_out_of_range) bad_value(what, text, "number too large");
  if (ec != std::errc() || end != digits.data() + digits.size()) {
    bad_value(what, text, "expected a non-negative integer");
  }
  return value;
}

}  // namespace

std::uint64_t parse_uint(std::string_view text, std::string_view what, std::uint64_t min,
                         std::uint64_t max) {
  const std::uint64_t value = parse_digits(text, what, text);
  if (value < min || value > max) {
    bad_value(what, text, "must be between " + std::to_string(min) + " and " + std::to_string(max));
  }
  return value;
}

double parse_double(std::string_view text, std::string_view what, double min, double max) {
  const std::string copy(text);
  double value = 0;
  try {
    std::size_t used = 0;
    value = std::stod(copy, &used);
    if (used != copy.size()) throw std::invalid_argument("trailing characters");
  } catch (const std::exception&) {
    bad_value(what, text, "expected a number");
  }
  if (!(value >= min && value <= max)) {  // (NaN fails too)
    std::ostringstream range;
    range << "must be between " << min << " and " << max;
    bad_value(what, text, range.str());
  }
  return value;
}

bool parse_bool(std::string_view text, std::string_view what) {
  std::string lower(text);
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (lower == "1" || lower == "true" || lower == "yes" || lower == "on") return true;
  if (lower == "0" || lower == "false" || lower == "no" || lower == "off") return false;
  bad_value(what, text, "expected 1/0, true/false, yes/no or on/off");
}

std::uint64_t parse_size(std::string_view text, std::string_view what) {
  std::string_view digits = text;
  unsigned shift = 0;
  if (!digits.empty() && std::isalpha(static_cast<unsigned char>(digits.back()))) {
    switch (std::toupper(static_cast<unsigned char>(digits.back()))) {
      case 'K':
        shift = 10;
        break;
      case 'M':
        shift = 20;
        break;
      case 'G':
        shift = 30;
        break;
      default:
        bad_value(what, text, "unknown size suffix (use K, M or G)");
    }
    digits.remove_suffix(1);
  }
  const std::uint64_t value = parse_digits(digits, what, text);
  if (shift != 0 && value > (std::numeric_limits<std::uint64_t>::max() >> shift)) {
    bad_value(what, text, "number too large");
  }
  return value << shift;
}

std::optional<std::string> env_value(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return std::nullopt;
  return std::string(value);
}

std::optional<std::uint64_t> env_size(const char* name, std::uint64_t min, std::uint64_t max) {
  const auto text = env_value(name);
  if (!text) return std::nullopt;
  const std::uint64_t value = parse_size(*text, name);
  if (value < min || value > max) {
    bad_value(name, *text,
              "must be between " + std::to_string(min) + " and " + std::to_string(max) + " bytes");
  }
  return value;
}

std::optional<std::uint64_t> env_uint(const char* name, std::uint64_t min, std::uint64_t max) {
  const auto text = env_value(name);
  if (!text) return std::nullopt;
  return parse_uint(*text, name, min, max);
}

std::optional<double> env_double(const char* name, double min, double max) {
  const auto text = env_value(name);
  if (!text) return std::nullopt;
  return parse_double(*text, name, min, max);
}

std::optional<bool> env_bool(const char* name) {
  const auto text = env_value(name);
  if (!text) return std::nullopt;
  return parse_bool(*text, name);
}

}  // namespace unimsg
