#include <cuda_runtime.h>

#include <string>
#include <utility>

#include "cuda_support.cuh"
#include "unimsg/core/error.hpp"
#include "unimsg/kernels/device_memory.hpp"

namespace unimsg {
namespace {

// An Error naming the failed call and CUDA's own error string.
void check(cudaError_t status, const char* what) {
  detail::cuda::check(status, "device memory", what);
}

// An Error unless `bytes` fit in a buffer of `capacity`.
void check_fits(std::size_t bytes, std::size_t capacity, const char* operation) {
  if (bytes > capacity) {
    throw Error(kNoRank, operation,
                "too many bytes (" + std::to_string(bytes) + " for a buffer of " +
                    std::to_string(capacity) + ")");
  }
}

}  // namespace

DeviceBuffer::DeviceBuffer(std::size_t bytes) : bytes_(bytes) {
  check(cudaMalloc(&data_, bytes == 0 ? 1 : bytes), "cudaMalloc");
}

DeviceBuffer::~DeviceBuffer() {
  if (data_ != nullptr) cudaFree(data_);
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) cudaFree(data_);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

void DeviceBuffer::copy_from_host(const void* host, std::size_t bytes) {
  check_fits(bytes, bytes_, "DeviceBuffer::copy_from_host");
  check(cudaMemcpy(data_, host, bytes, cudaMemcpyHostToDevice), "cudaMemcpy to device");
}

void DeviceBuffer::copy_to_host(void* host, std::size_t bytes) const {
  check_fits(bytes, bytes_, "DeviceBuffer::copy_to_host");
  check(cudaMemcpy(host, data_, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy to host");
}

PinnedBuffer::PinnedBuffer(std::size_t bytes) : bytes_(bytes) {
  check(cudaHostAlloc(&data_, bytes == 0 ? 1 : bytes, cudaHostAllocDefault), "cudaHostAlloc");
}

PinnedBuffer::~PinnedBuffer() {
  if (data_ != nullptr) cudaFreeHost(data_);
}

void copy_device_to_host(void* host, const void* device, std::size_t bytes) {
  if (bytes != 0)
    check(cudaMemcpy(host, device, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy to host");
}

void copy_host_to_device(void* device, const void* host, std::size_t bytes) {
  if (bytes != 0)
    check(cudaMemcpy(device, host, bytes, cudaMemcpyHostToDevice), "cudaMemcpy to device");
}

void copy_device_to_device(void* to, const void* from, std::size_t bytes) {
  if (bytes != 0) {
    check(cudaMemcpy(to, from, bytes, cudaMemcpyDeviceToDevice), "cudaMemcpy on the device");
  }
}

void set_device(int device) {
  check(cudaSetDevice(device), "cudaSetDevice");
}

int current_device() {
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

ScopedDevice::ScopedDevice(int device) : previous_(current_device()) {
  if (device != previous_) set_device(device);
}

ScopedDevice::~ScopedDevice() {
  cudaSetDevice(previous_);
}

}  // namespace unimsg
