// libFuzzer target for status reports off the wire (monitor.hpp): any payload must either parse
// or raise a DecodeError, never crash; what parses must survive its own round trip.

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "unimsg/core/error.hpp"
#include "unimsg/status/status.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view payload(reinterpret_cast<const char*>(data), size);
  try {
    const unimsg::StatusReport report = unimsg::StatusReport::parse(payload, 1, 4);
    const unimsg::StatusReport again = unimsg::StatusReport::parse(report.to_json(), 1, 4);
    if (again.step != report.step || again.samples != report.samples || again.host != report.host ||
        again.seconds != report.seconds || std::isnan(again.loss) != std::isnan(report.loss)) {
      __builtin_trap();
    }
    // The board takes whatever parses.
    unimsg::StatusBoard board(4, {}, "fuzz", 0);
    board.add(report, 1.0);
    board.sample(2.0);
    (void)board.prometheus(3.0);
    (void)board.snapshot(3.0, true);
  } catch (const unimsg::DecodeError&) {
  }
  return 0;
}
