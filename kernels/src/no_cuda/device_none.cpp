#include "unimsg/kernels/device.hpp"

namespace unimsg {

DeviceInfo query_devices() {
  return DeviceInfo{0, "unimsg was built without CUDA (UNIMSG_WITH_CUDA=OFF)", ""};
}

}  // namespace unimsg
