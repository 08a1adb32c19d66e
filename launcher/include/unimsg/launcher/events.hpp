#pragma once

// unimsg-run's record of a job: <run dir>/events.jsonl, one JSON object a line (docs/launcher.md).
// Its text fields come from outside (a fault report's reason, mpirun's words on a dead rank):
// any length, any bytes. Each is cut to kMaxEventText bytes on a character boundary, and bytes
// that are not UTF-8 are replaced, so that writing an event never throws.

#include <nlohmann/json.hpp>

#include <cstddef>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>

namespace unimsg {

inline constexpr std::size_t kMaxEventText = 4096;

// At most `max_bytes` of `text`, never ending inside a UTF-8 character (a byte that is not
// UTF-8 counts as a character of its own).
std::string cut_utf8(std::string_view text, std::size_t max_bytes);

// One event's line (without the newline): `event`, `time`, `world_size`, `restart`, then
// `details` (an object), every string in it cut to kMaxEventText bytes.
std::string event_line(const std::string& event, double time, int world_size, int restart,
                       nlohmann::json details);

class EventLog {
 public:
  // Appends to `path`; ConfigError when it cannot be opened.
  explicit EventLog(const std::filesystem::path& path);
  void write(const std::string& event, int world_size, int restart, nlohmann::json details = {});

 private:
  std::ofstream out_;
};

}  // namespace unimsg
