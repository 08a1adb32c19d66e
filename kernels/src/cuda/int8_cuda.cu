// int8 on the device: one block per chunk of 256 values, the largest finite magnitude, then
// stochastic rounding (int8_cpu.cpp's wire, bit for bit).

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cub/cub.cuh>
#include <memory>
#include <span>
#include <string>

#include "compressor_cuda_support.cuh"
#include "element_math.hpp"

namespace unimsg::detail::cuda {
namespace {

using format::kInt8ChunkBytes;
using format::uniform01;

// One block per chunk of 256: the largest finite magnitude, then stochastic rounding.
__global__ void int8_kernel(const float* g, float* r, unsigned char* wire, std::size_t n,
                            std::uint64_t seed, std::uint64_t step, bool update) {
  const std::size_t chunk = blockIdx.x;
  const std::size_t i = chunk * kChunk + threadIdx.x;
  const bool in = i < n;
  const float v = in ? math::corrected(g, r, i) : 0.0f;
  const bool finite = isfinite(v);
  using Reduce = cub::BlockReduce<float, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  __shared__ float shared_scale;
  const float largest = Reduce(storage).Reduce(in && finite ? fabsf(v) : 0.0f, MaxOp{});
  if (threadIdx.x == 0) shared_scale = math::int8_scale(largest);
  __syncthreads();
  const float scale = shared_scale;
  unsigned char* at = wire + chunk * kInt8ChunkBytes;
  if (threadIdx.x == 0) *reinterpret_cast<float*>(at) = scale;
  if (!in) return;
  const std::int8_t code = math::int8_code(v, scale, uniform01(seed, step, i));
  at[4 + threadIdx.x] = static_cast<unsigned char>(code);
  if (update) r[i] = math::int8_residual(v, code, scale);
}

__global__ void from_int8_kernel(const unsigned char* wire, float* out, std::size_t n, bool add) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const unsigned char* at = wire + (i / kChunk) * kInt8ChunkBytes;
    const float scale = *reinterpret_cast<const float*>(at);
    const auto code = static_cast<std::int8_t>(at[4 + i % kChunk]);
    out[i] = math::accumulate(out[i], math::int8_decode(code, scale), add);
  }
}

class CudaInt8 final : public CudaCompressor {
 public:
  explicit CudaInt8(CompressionSpec spec) : CudaCompressor(std::move(spec), "int8") {}
  std::size_t wire_bytes(std::size_t n) const noexcept override {
    return format::int8_wire_bytes(n);
  }
  std::size_t block_elements() const noexcept override { return kChunk; }

 protected:
  CompressResult run_compress(std::span<const float> g, std::span<float> r, std::uint64_t step,
                              std::span<std::byte> wire, const std::string& op) const override {
    const std::size_t nonfinite = scan(g, {}, nullptr, op);
    const auto chunks = static_cast<unsigned>((g.size() + kChunk - 1) / kChunk);
    int8_kernel<<<chunks, kThreads, 0, stream()>>>(
        g.data(), r.empty() ? nullptr : r.data(), reinterpret_cast<unsigned char*>(wire.data()),
        g.size(), spec_.seed, step, !r.empty() && nonfinite == 0);
    check(cudaGetLastError(), op, "int8 kernel");
    return {wire_bytes(g.size()), nonfinite};
  }
  void run_expand(std::span<const std::byte> wire, std::uint64_t, std::span<float> out, bool add,
                  const std::string& op) const override {
    if (wire.size() < wire_bytes(out.size())) throw Error(kNoRank, op, "the wire is too short");
    from_int8_kernel<<<grid_for(out.size()), kThreads, 0, stream()>>>(
        reinterpret_cast<const unsigned char*>(wire.data()), out.data(), out.size(), add);
    check(cudaGetLastError(), op, "int8 kernel");
  }
};

}  // namespace

std::unique_ptr<Compressor> make_int8_cuda(const CompressionSpec& spec) {
  return std::make_unique<CudaInt8>(spec);
}

}  // namespace unimsg::detail::cuda
