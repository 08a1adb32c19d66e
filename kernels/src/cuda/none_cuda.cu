// none on the device: the f32 values themselves.

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "compressor_cuda_support.cuh"

namespace unimsg::detail::cuda {
namespace {

class CudaNone final : public CudaCompressor {
 public:
  explicit CudaNone(CompressionSpec spec) : CudaCompressor(std::move(spec), "none") {}
  std::size_t wire_bytes(std::size_t n) const noexcept override {
    return format::none_wire_bytes(n);
  }

 protected:
  CompressResult run_compress(std::span<const float> g, std::span<float>, std::uint64_t,
                              std::span<std::byte> wire, const std::string& op) const override {
    const std::size_t nonfinite = scan(g, {}, nullptr, op);
    launch_copy(g.data(), reinterpret_cast<float*>(wire.data()), g.size(), false, stream());
    check(cudaGetLastError(), op, "copy kernel");
    return {wire_bytes(g.size()), nonfinite};
  }
  void run_expand(std::span<const std::byte> wire, std::uint64_t, std::span<float> out, bool add,
                  const std::string& op) const override {
    if (wire.size() < wire_bytes(out.size())) throw Error(kNoRank, op, "the wire is too short");
    launch_copy(reinterpret_cast<const float*>(wire.data()), out.data(), out.size(), add, stream());
    check(cudaGetLastError(), op, "copy kernel");
  }
};

}  // namespace

std::unique_ptr<Compressor> make_none_cuda(const CompressionSpec& spec) {
  return std::make_unique<CudaNone>(spec);
}

}  // namespace unimsg::detail::cuda
