#include "unimsg/core/error.hpp"
#include "unimsg/kernels/device_memory.hpp"

namespace unimsg {
namespace {
[[noreturn]] void no_cuda() {
  throw ConfigError(kNoRank, "device memory",
                    "unimsg was built without CUDA (UNIMSG_WITH_CUDA=OFF): no device memory");
}
}  // namespace

DeviceBuffer::DeviceBuffer(std::size_t) {
  no_cuda();
}
DeviceBuffer::~DeviceBuffer() = default;
DeviceBuffer::DeviceBuffer(DeviceBuffer&&) noexcept = default;
DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&&) noexcept = default;
void DeviceBuffer::copy_from_host(const void*, std::size_t) {
  no_cuda();
}
void DeviceBuffer::copy_to_host(void*, std::size_t) const {
  no_cuda();
}
PinnedBuffer::PinnedBuffer(std::size_t) {
  no_cuda();
}
PinnedBuffer::~PinnedBuffer() = default;
void copy_device_to_host(void*, const void*, std::size_t) {
  no_cuda();
}
void copy_host_to_device(void*, const void*, std::size_t) {
  no_cuda();
}
void copy_device_to_device(void*, const void*, std::size_t) {
  no_cuda();
}
void set_device(int) {
  no_cuda();
}
int current_device() {
  no_cuda();
}
ScopedDevice::ScopedDevice(int) {
  no_cuda();
}
ScopedDevice::~ScopedDevice() = default;

}  // namespace unimsg
