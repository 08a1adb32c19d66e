// CUDA compressors: the CPU reference's wire formats and semantics (kernels/src/cpu/) on device
// memory. Where the CPU reference's result depends on the order of floating-point operations
// (onebit's sum of squares, the residual updates), the kernels follow the order of its AVX2 path,
// the one x86 machines with GPUs run, and use explicitly rounded operations (__fadd_rn and
// friends) so that nvcc does not contract them into FMAs the CPU does not use.
//
// One file per format (none_cuda.cu, half_cuda.cu, int8_cuda.cu, onebit_cuda.cu, topk_cuda.cu,
// randomk_cuda.cu), what they share in compressor_cuda_support.cuh; here the factory.

#include <memory>

#include "compressor_cuda_support.cuh"
#include "unimsg/core/error.hpp"
#include "unimsg/kernels/compressor.hpp"

namespace unimsg {

std::unique_ptr<Compressor> make_cuda_compressor(const CompressionSpec& spec) {
  if (spec.name == "none") return detail::cuda::make_none_cuda(spec);
  if (spec.name == "fp16") return detail::cuda::make_half_cuda(spec, false);
  if (spec.name == "bf16") return detail::cuda::make_half_cuda(spec, true);
  if (spec.name == "int8") return detail::cuda::make_int8_cuda(spec);
  if (spec.name == "onebit") return detail::cuda::make_onebit_cuda(spec);
  if (spec.name == "topk") return detail::cuda::make_topk_cuda(spec);
  if (spec.name == "randomk") return detail::cuda::make_randomk_cuda(spec);
  if (spec.name == "powersgd") {
    throw ConfigError(kNoRank, "compression",
                      "powersgd needs the ranks between its stages: use CudaPowerSgd "
                      "(powersgd.hpp), which holds its steps");
  }
  throw ConfigError(kNoRank, "compression", "unknown compressor '" + spec.name + "'");
}

}  // namespace unimsg
