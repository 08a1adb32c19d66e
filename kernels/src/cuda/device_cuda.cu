#include <cuda_runtime.h>

#include "unimsg/kernels/device.hpp"

namespace unimsg {

DeviceInfo query_devices() {
  DeviceInfo info;
  const cudaError_t status = cudaGetDeviceCount(&info.count);
  if (status != cudaSuccess) {
    info.count = 0;
    info.reason = std::string("CUDA runtime: ") + cudaGetErrorString(status);
    return info;
  }
  if (info.count == 0) {
    info.reason = "the CUDA runtime found no device";
    return info;
  }
  cudaDeviceProp properties{};
  if (cudaGetDeviceProperties(&properties, 0) == cudaSuccess) info.name = properties.name;
  return info;
}

}  // namespace unimsg
