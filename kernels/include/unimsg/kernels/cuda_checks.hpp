#pragma once

// The one check of a CUDA runtime call's status, for the kernels' CUDA sources and the NCCL
// backend (the only code that calls CUDA): a failure is a unimsg::Error naming the operation, the
// call and CUDA's own words. Include it only from code built with CUDA.

#include <cuda_runtime.h>

#include <string>

#include "unimsg/core/error.hpp"

namespace unimsg {

// `call` (cudaMalloc, ...) may be null when `operation` already names it.
inline void check_cuda(cudaError_t status, int rank, const std::string& operation,
                       const char* call = nullptr) {
  if (status == cudaSuccess) return;
  std::string cause = cudaGetErrorString(status);
  if (call != nullptr) cause = std::string(call) + ": " + cause;
  throw Error(rank, operation, cause);
}

// The device current on this thread (an Error when CUDA cannot say).
inline int current_device(int rank, const std::string& operation) {
  int device = 0;
  check_cuda(cudaGetDevice(&device), rank, operation, "cudaGetDevice");
  return device;
}

// Makes `device` current for its lifetime and then restores the caller's (as PyTorch's
// CUDAGuard): a stream, an allocation and a launch belong to the device current when they are
// made, so an object bound to one GPU sets it on every call instead of trusting the caller's.
class DeviceGuard {
 public:
  DeviceGuard(int device, int rank, const std::string& operation)
      : previous_(current_device(rank, operation)) {
    if (previous_ != device) check_cuda(cudaSetDevice(device), rank, operation, "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_;
};

}  // namespace unimsg
