#pragma once

// Helpers the CUDA sources of kernels/ share: errors, launch sizes, and the check that a pointer
// a caller handed in is device memory.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <string>

#include "unimsg/core/error.hpp"
#include "unimsg/kernels/cuda_checks.hpp"

namespace unimsg::detail::cuda {

constexpr int kThreads = 256;  // threads per block of the element-wise kernels

// Blocks for n elements, kThreads each, capped (the kernels loop grid-stride over the rest).
inline unsigned grid_for(std::size_t n) {
  return static_cast<unsigned>(std::min<std::size_t>((n + kThreads - 1) / kThreads, 65535));
}

// The kernels' calls carry no rank (unimsg/kernels/cuda_checks.hpp is the check itself).
inline void check(cudaError_t status, const std::string& operation, const char* call) {
  check_cuda(status, kNoRank, operation, call);
}

// An Error naming `what` unless `pointer` is device memory of `device` (or managed memory).
inline void check_device_pointer(const void* pointer, const char* what,
                                 const std::string& operation, int device) {
  cudaPointerAttributes attributes{};
  if (cudaPointerGetAttributes(&attributes, pointer) != cudaSuccess ||
      (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged)) {
    cudaGetLastError();  // (a failed query leaves an error behind for the next check: clear it)
    throw Error(kNoRank, operation,
                std::string("the ") + what + " is not in device memory (device pointers only)");
  }
  if (attributes.type == cudaMemoryTypeDevice && attributes.device != device) {
    throw Error(kNoRank, operation,
                std::string("the ") + what + " is on GPU " + std::to_string(attributes.device) +
                    ", this compressor on GPU " + std::to_string(device) +
                    " (the device current when it was made)");
  }
}

}  // namespace unimsg::detail::cuda
