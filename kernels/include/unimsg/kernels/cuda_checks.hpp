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

}  // namespace unimsg
