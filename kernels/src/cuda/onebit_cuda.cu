// onebit on the device: one block per chunk of 256 values, the root mean square in the order of
// the CPU's AVX2 path, then the signs, 32 per warp vote (onebit_cpu.cpp's wire).

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "compressor_cuda_support.cuh"
#include "element_math.hpp"

namespace unimsg::detail::cuda {
namespace {

using format::kOneBitChunkBytes;

// One block per chunk of 256: the root mean square in element_math.hpp's order (eight threads
// sum a lane each, one adds them), then the signs, 32 per warp vote.
__global__ void onebit_kernel(const float* g, float* r, unsigned char* wire, std::size_t n,
                              bool update) {
  __shared__ float values[kChunk];
  __shared__ float lanes[8];
  __shared__ float shared_scale;
  const std::size_t chunk = blockIdx.x;
  const std::size_t begin = chunk * kChunk;
  const std::size_t count = min(kChunk, n - begin);
  const unsigned t = threadIdx.x;
  const bool in = t < count;
  const float v = in ? math::corrected(g, r, begin + t) : 0.0f;
  values[t] = v;
  __syncthreads();
  if (t < math::kOneBitLanes) lanes[t] = math::onebit_lane_sum(values, count, static_cast<int>(t));
  __syncthreads();
  if (t == 0) shared_scale = math::onebit_scale(lanes, values, count);
  __syncthreads();
  const float scale = shared_scale;
  unsigned char* at = wire + chunk * kOneBitChunkBytes;
  const bool positive = math::onebit_positive(v);
  const unsigned word = __ballot_sync(0xffffffffu, in && positive);
  if (t % 32 == 0) reinterpret_cast<unsigned*>(at + 4)[t / 32] = word;
  if (t == 0) *reinterpret_cast<float*>(at) = scale;
  if (in && update) r[begin + t] = math::onebit_residual(v, scale);
}

__global__ void from_onebit_kernel(const unsigned char* wire, float* out, std::size_t n, bool add) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const unsigned char* at = wire + (i / kChunk) * kOneBitChunkBytes;
    const float scale = *reinterpret_cast<const float*>(at);
    const unsigned within = static_cast<unsigned>(i % kChunk);
    const bool positive = (at[4 + within / 8] >> (within % 8)) & 1u;
    out[i] = math::accumulate(out[i], math::onebit_decode(positive, scale), add);
  }
}

class CudaOneBit final : public CudaCompressor {
 public:
  explicit CudaOneBit(CompressionSpec spec) : CudaCompressor(std::move(spec), "onebit") {}
  std::size_t wire_bytes(std::size_t n) const noexcept override {
    return format::onebit_wire_bytes(n);
  }
  std::size_t block_elements() const noexcept override { return kChunk; }

 protected:
  CompressResult run_compress(std::span<const float> g, std::span<float> r, std::uint64_t,
                              std::span<std::byte> wire, const std::string& op) const override {
    const std::size_t nonfinite = scan(g, {}, nullptr, op);
    const auto chunks = static_cast<unsigned>((g.size() + kChunk - 1) / kChunk);
    onebit_kernel<<<chunks, kThreads, 0, stream()>>>(g.data(), r.empty() ? nullptr : r.data(),
                                                     reinterpret_cast<unsigned char*>(wire.data()),
                                                     g.size(), !r.empty() && nonfinite == 0);
    check(cudaGetLastError(), op, "onebit kernel");
    return {wire_bytes(g.size()), nonfinite};
  }
  void run_expand(std::span<const std::byte> wire, std::uint64_t, std::span<float> out, bool add,
                  const std::string& op) const override {
    if (wire.size() < wire_bytes(out.size())) throw Error(kNoRank, op, "the wire is too short");
    from_onebit_kernel<<<grid_for(out.size()), kThreads, 0, stream()>>>(
        reinterpret_cast<const unsigned char*>(wire.data()), out.data(), out.size(), add);
    check(cudaGetLastError(), op, "onebit kernel");
  }
};

}  // namespace

std::unique_ptr<Compressor> make_onebit_cuda(const CompressionSpec& spec) {
  return std::make_unique<CudaOneBit>(spec);
}

}  // namespace unimsg::detail::cuda
