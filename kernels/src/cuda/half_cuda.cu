// fp16 and bf16 on the device: an f32 scale, then one 16-bit value per element (half_cpu.cpp's
// wire).

#include <cuda_fp16.h>
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

__global__ void write_f32_kernel(unsigned char* at, float value) {
  *reinterpret_cast<float*>(at) = value;
}

// The shared formulas (element_math.hpp), as the CPU computes them.
__global__ void to_f16_kernel(const float* g, float* r, std::uint16_t* out, std::size_t n,
                              float scale, float inverse, bool update) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const float v = math::corrected(g, r, i);
    const std::uint16_t h = math::fp16_encode(v, scale);
    out[i] = h;
    if (update) r[i] = math::fp16_residual(v, h, inverse);
  }
}

// The scale is read where it lies on the wire (no round trip to the host).
__global__ void from_f16_kernel(const unsigned char* wire, float* out, std::size_t n, bool add) {
  const float inverse = math::fp16_inverse(*reinterpret_cast<const float*>(wire));
  const auto* in = reinterpret_cast<const std::uint16_t*>(wire + 4);
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    out[i] = math::accumulate(out[i], math::fp16_decode(in[i], inverse), add);
  }
}

__global__ void to_bf16_kernel(const float* g, float* r, std::uint16_t* out, std::size_t n,
                               bool update) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const float v = math::corrected(g, r, i);
    const std::uint16_t h = math::bf16_encode(v);
    out[i] = h;
    if (update) r[i] = math::bf16_residual(v, h);
  }
}

__global__ void from_bf16_kernel(const std::uint16_t* in, float* out, std::size_t n, bool add) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    out[i] = math::accumulate(out[i], math::bf16_decode(in[i]), add);
  }
}

class CudaHalf final : public CudaCompressor {
 public:
  CudaHalf(CompressionSpec spec, bool bf16)
      : CudaCompressor(std::move(spec), bf16 ? "bf16" : "fp16"), bf16_(bf16) {}
  std::size_t wire_bytes(std::size_t n) const noexcept override {
    return format::half_wire_bytes(n);
  }

 protected:
  CompressResult run_compress(std::span<const float> g, std::span<float> r, std::uint64_t,
                              std::span<std::byte> wire, const std::string& op) const override {
    float largest = 0;
    const std::size_t nonfinite = scan(g, r, bf16_ ? nullptr : &largest, op);
    // As the CPU: f16 tops out at 65504, so only what would overflow is scaled down.
    const float scale = bf16_ ? 1.0f : math::fp16_scale(largest);
    const bool update = !r.empty() && nonfinite == 0;
    auto* bytes = reinterpret_cast<unsigned char*>(wire.data());
    write_f32_kernel<<<1, 1, 0, stream()>>>(bytes, scale);
    float* residual = r.empty() ? nullptr : r.data();
    if (bf16_) {
      to_bf16_kernel<<<grid_for(g.size()), kThreads, 0, stream()>>>(
          g.data(), residual, reinterpret_cast<std::uint16_t*>(bytes + 4), g.size(), update);
    } else {
      to_f16_kernel<<<grid_for(g.size()), kThreads, 0, stream()>>>(
          g.data(), residual, reinterpret_cast<std::uint16_t*>(bytes + 4), g.size(), scale,
          math::fp16_inverse(scale), update);
    }
    check(cudaGetLastError(), op, "cast kernel");
    return {wire_bytes(g.size()), nonfinite};
  }
  void run_expand(std::span<const std::byte> wire, std::uint64_t, std::span<float> out, bool add,
                  const std::string& op) const override {
    if (wire.size() < wire_bytes(out.size())) throw Error(kNoRank, op, "the wire is too short");
    const auto* bytes = reinterpret_cast<const unsigned char*>(wire.data());
    if (bf16_) {
      from_bf16_kernel<<<grid_for(out.size()), kThreads, 0, stream()>>>(
          reinterpret_cast<const std::uint16_t*>(bytes + 4), out.data(), out.size(), add);
    } else {
      from_f16_kernel<<<grid_for(out.size()), kThreads, 0, stream()>>>(bytes, out.data(),
                                                                       out.size(), add);
    }
    check(cudaGetLastError(), op, "cast kernel");
  }

 private:
  bool bf16_;
};

}  // namespace

std::unique_ptr<Compressor> make_half_cuda(const CompressionSpec& spec, bool bf16) {
  return std::make_unique<CudaHalf>(spec, bf16);
}

}  // namespace unimsg::detail::cuda
