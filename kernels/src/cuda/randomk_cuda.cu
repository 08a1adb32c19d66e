// randomk on the device: the positions drawn on the host (randomk_positions, as every rank
// must draw the same), the values gathered and scattered by kernels.

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "compressor_cuda_support.cuh"

namespace unimsg::detail::cuda {
namespace {

using format::k_of;

// randomk: r += g everywhere (when updating), then the values at the drawn positions travel.
__global__ void add_into_kernel(const float* g, float* r, std::size_t n) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    r[i] = __fadd_rn(g[i], r[i]);
  }
}

__global__ void randomk_gather_kernel(const float* g, float* r, const unsigned* positions,
                                      float* wire, std::size_t k, bool updated) {
  for (std::size_t j = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; j < k;
       j += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const unsigned i = positions[j];
    if (updated) {
      wire[j] = r[i];
      r[i] = 0.0f;
    } else {
      wire[j] = corrected(g, r, i);
    }
  }
}

__global__ void randomk_scatter_kernel(const float* wire, const unsigned* positions, float* out,
                                       std::size_t k, bool add) {
  for (std::size_t j = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; j < k;
       j += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    out[positions[j]] = add ? __fadd_rn(out[positions[j]], wire[j]) : wire[j];
  }
}

class CudaRandomK final : public CudaCompressor {
 public:
  explicit CudaRandomK(CompressionSpec spec) : CudaCompressor(std::move(spec), "randomk") {}
  std::size_t wire_bytes(std::size_t n) const noexcept override {
    return format::randomk_wire_bytes(spec_.ratio, n);
  }

 protected:
  CompressResult run_compress(std::span<const float> g, std::span<float> r, std::uint64_t step,
                              std::span<std::byte> wire, const std::string& op) const override {
    const std::size_t nonfinite = scan(g, {}, nullptr, op);
    const unsigned* positions = upload_positions(g.size(), step, op);
    const std::size_t k = k_of(spec_.ratio, g.size());
    const bool update = !r.empty() && nonfinite == 0;
    if (update) {
      add_into_kernel<<<grid_for(g.size()), kThreads, 0, stream()>>>(g.data(), r.data(), g.size());
    }
    randomk_gather_kernel<<<grid_for(k), kThreads, 0, stream()>>>(
        g.data(), r.empty() ? nullptr : r.data(), positions, reinterpret_cast<float*>(wire.data()),
        k, update);
    check(cudaGetLastError(), op, "randomk kernels");
    return {wire_bytes(g.size()), nonfinite};
  }
  void run_expand(std::span<const std::byte> wire, std::uint64_t step, std::span<float> out,
                  bool add, const std::string& op) const override {
    if (wire.size() < wire_bytes(out.size())) throw Error(kNoRank, op, "the wire is too short");
    const unsigned* positions = upload_positions(out.size(), step, op);
    if (!add) check(cudaMemsetAsync(out.data(), 0, 4 * out.size(), stream()), op, "cudaMemset");
    const std::size_t k = k_of(spec_.ratio, out.size());
    randomk_scatter_kernel<<<grid_for(k), kThreads, 0, stream()>>>(
        reinterpret_cast<const float*>(wire.data()), positions, out.data(), k, add);
    check(cudaGetLastError(), op, "randomk kernel");
  }

 private:
  // The positions every rank draws for (seed, step): drawn on the host, as the CPU does.
  const unsigned* upload_positions(std::size_t n, std::uint64_t step, const std::string& op) const {
    const auto positions = randomk_positions(n, k_of(spec_.ratio, n), spec_.seed, step);
    auto* device = static_cast<unsigned*>(scratch(1, 4 * positions.size()));
    if (!positions.empty()) {
      check(cudaMemcpyAsync(device, positions.data(), 4 * positions.size(), cudaMemcpyHostToDevice,
                            stream()),
            op, "cudaMemcpyAsync");
      // (positions is a local: the copy must be done before it goes.)
      check(cudaStreamSynchronize(stream()), op, "randomk positions");
    }
    return device;
  }
};

}  // namespace

std::unique_ptr<Compressor> make_randomk_cuda(const CompressionSpec& spec) {
  return std::make_unique<CudaRandomK>(spec);
}

}  // namespace unimsg::detail::cuda
