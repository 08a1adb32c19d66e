// CompressionSpec: the text form of a compressor's settings ("topk:0.01:sampled", ...), parsed
// and printed (the same for the CPU and CUDA compressors).

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <iterator>
#include <string>
#include <string_view>

#include "unimsg/core/error.hpp"
#include "unimsg/kernels/compressor.hpp"

namespace unimsg {

std::string CompressionSpec::to_string() const {
  std::string text = name;
  if (name == "topk" || name == "randomk") {
    char ratio_text[32];
    std::snprintf(ratio_text, sizeof ratio_text, ":%.17g", ratio);
    text += ratio_text;
  }
  // (Appended piece by piece: GCC 12 warns, wrongly, on ":" + std::to_string(...) here.)
  if (name == "powersgd") text.append(":").append(std::to_string(powersgd_rank));
  if (matrix_rows != 0) text.append(":rows=").append(std::to_string(matrix_rows));
  if (sampled) text += ":sampled";
  if (!error_feedback) text += ":noef";
  if (seed != 0) text.append(":seed=").append(std::to_string(seed));
  return text;
}

CompressionSpec CompressionSpec::parse(std::string_view text) {
  CompressionSpec spec;
  std::size_t start = 0;
  bool first = true;
  while (start <= text.size()) {
    const std::size_t colon = std::min(text.find(':', start), text.size());
    const std::string part(text.substr(start, colon - start));
    if (first) {
      static const char* kNames[] = {"none",   "fp16", "bf16",    "int8",
                                     "onebit", "topk", "randomk", "powersgd"};
      if (std::find(std::begin(kNames), std::end(kNames), part) == std::end(kNames)) {
        throw ConfigError(kNoRank, "compression",
                          "'" + part +
                              "' is not one of none, fp16, bf16, int8, onebit, topk, "
                              "randomk, powersgd");
      }
      spec.name = part;
      first = false;
    } else if (part == "sampled") {
      spec.sampled = true;
    } else if (part == "noef") {
      spec.error_feedback = false;
    } else if (part.rfind("seed=", 0) == 0) {
      try {
        spec.seed = std::stoull(part.substr(5));
      } catch (const std::exception&) {
        throw ConfigError(kNoRank, "compression", "bad seed in '" + std::string(text) + "'");
      }
    } else if (spec.name == "powersgd" && part.rfind("rows=", 0) == 0) {
      char* end = nullptr;
      const unsigned long long rows = std::strtoull(part.c_str() + 5, &end, 10);
      if (end != part.c_str() + part.size() || part.size() == 5 || rows == 0) {
        throw ConfigError(kNoRank, "compression",
                          "'" + part + "' in '" + std::string(text) + "' is not rows=N, N >= 1");
      }
      spec.matrix_rows = static_cast<std::size_t>(rows);
    } else if (spec.name == "powersgd") {
      char* end = nullptr;
      const long rank = std::strtol(part.c_str(), &end, 10);
      if (part.empty() || end != part.c_str() + part.size() || rank < 1 || rank > 256) {
        throw ConfigError(kNoRank, "compression",
                          "'" + part + "' in '" + std::string(text) +
                              "' is not a PowerSGD rank from 1 to 256, 'noef' or 'seed=N'");
      }
      spec.powersgd_rank = static_cast<int>(rank);
    } else {
      char* end = nullptr;
      const double ratio = std::strtod(part.c_str(), &end);
      if (part.empty() || end != part.c_str() + part.size() || !(ratio > 0 && ratio <= 1)) {
        throw ConfigError(kNoRank, "compression",
                          "'" + part + "' in '" + std::string(text) +
                              "' is not a ratio in (0, 1], 'sampled', 'noef' or 'seed=N'");
      }
      spec.ratio = ratio;
    }
    start = colon + 1;
  }
  return spec;
}

}  // namespace unimsg
