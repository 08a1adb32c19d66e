#pragma once

#include <string>

namespace unimsg {

// What the CUDA runtime sees on this machine.
struct DeviceInfo {
  int count = 0;       // usable CUDA devices
  std::string reason;  // why there are none, when count == 0
  std::string name;    // device 0's name, when count > 0
};

// Never throws: a build without CUDA, a missing driver or no device all give count 0 and a
// reason, which GPU tests print when they skip.
DeviceInfo query_devices();

}  // namespace unimsg
