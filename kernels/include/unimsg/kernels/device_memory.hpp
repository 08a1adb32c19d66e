#pragma once

// Device memory for tests, staging and backends. Without CUDA the constructor throws ConfigError
// saying so, without a device (or when a CUDA call fails) an Error naming the call;
// query_devices() tells beforehand.

#include <cstddef>
#include <memory>

namespace unimsg {

// cudaMalloc'd bytes on the current device, freed on destruction.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::size_t bytes);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() noexcept { return data_; }
  std::size_t bytes() const noexcept { return bytes_; }
  void copy_from_host(const void* host, std::size_t bytes);
  void copy_to_host(void* host, std::size_t bytes) const;

 private:
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
};

// Page-locked host memory (cudaHostAlloc): device copies to and from it run at full speed.
class PinnedBuffer {
 public:
  explicit PinnedBuffer(std::size_t bytes);
  ~PinnedBuffer();
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;

  void* data() noexcept { return data_; }
  std::size_t bytes() const noexcept { return bytes_; }

 private:
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
};

// Synchronous copies between device and host memory, and within the device.
void copy_device_to_host(void* host, const void* device, std::size_t bytes);
void copy_host_to_device(void* device, const void* host, std::size_t bytes);
void copy_device_to_device(void* to, const void* from, std::size_t bytes);

// Makes `device` current for the calling thread.
void set_device(int device);
// The device current on the calling thread.
int current_device();

// Makes `device` current for its lifetime, then restores the thread's previous one (for code
// that works on a GPU of its own from a caller's thread).
class ScopedDevice {
 public:
  explicit ScopedDevice(int device);
  ~ScopedDevice();
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace unimsg
