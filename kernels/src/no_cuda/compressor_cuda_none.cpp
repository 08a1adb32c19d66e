#include "unimsg/core/error.hpp"
#include "unimsg/kernels/compressor.hpp"

namespace unimsg {

std::unique_ptr<Compressor> make_cuda_compressor(const CompressionSpec&) {
  throw Error(kNoRank, "cuda compress",
              "unimsg was built without CUDA (UNIMSG_WITH_CUDA=OFF): no CUDA compressors");
}

}  // namespace unimsg
