// onebit on the device: one block per chunk of 256 values, the root mean square in the order of
// the CPU's AVX2 path, then the signs, 32 per warp vote (onebit_cpu.cpp's wire).

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "compressor_cuda_support.cuh"

namespace unimsg::detail::cuda {
namespace {

using format::kOneBitChunkBytes;

// One block per chunk of 256: the root mean square, summed in the order of the CPU's AVX2 path
// (eight f32 lanes over the whole groups of eight, the lanes then added in double, the tail in
// double), then the signs, 32 per warp vote.
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
  const float v = in ? corrected(g, r, begin + t) : 0.0f;
  values[t] = v;
  __syncthreads();
  const std::size_t whole = count / 8 * 8;
  if (t < 8) {
    // The CPU's four sums per lane: values t + 8k + 32m into sum k, whole groups of 32 first,
    // then the rest of the groups of 8 into sum 0.
    const std::size_t whole32 = count / 32 * 32;
    float sums[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (std::size_t j = t; j < whole32; j += 32) {
      for (int k = 0; k < 4; ++k) {
        const float x = values[j + 8 * k];
        sums[k] = __fadd_rn(sums[k], __fmul_rn(x, x));
      }
    }
    for (std::size_t j = whole32 + t; j < whole; j += 8)
      sums[0] = __fadd_rn(sums[0], __fmul_rn(values[j], values[j]));
    lanes[t] = __fadd_rn(__fadd_rn(sums[0], sums[1]), __fadd_rn(sums[2], sums[3]));
  }
  __syncthreads();
  if (t == 0) {
    double sum = 0;
    for (int lane = 0; lane < 8; ++lane) sum += lanes[lane];
    for (std::size_t j = whole; j < count; ++j) sum += static_cast<double>(values[j]) * values[j];
    shared_scale = static_cast<float>(sqrt(sum / static_cast<double>(count)));
  }
  __syncthreads();
  const float scale = shared_scale;
  unsigned char* at = wire + chunk * kOneBitChunkBytes;
  const bool positive = !(v < 0.0f);  // 0, -0 and NaN: positive, as on the CPU
  const unsigned word = __ballot_sync(0xffffffffu, in && positive);
  if (t % 32 == 0) reinterpret_cast<unsigned*>(at + 4)[t / 32] = word;
  if (t == 0) *reinterpret_cast<float*>(at) = scale;
  if (in && update) r[begin + t] = __fsub_rn(v, positive ? scale : -scale);
}

__global__ void from_onebit_kernel(const unsigned char* wire, float* out, std::size_t n, bool add) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const unsigned char* at = wire + (i / kChunk) * kOneBitChunkBytes;
    const float scale = *reinterpret_cast<const float*>(at);
    const unsigned within = static_cast<unsigned>(i % kChunk);
    const float value = ((at[4 + within / 8] >> (within % 8)) & 1u) ? scale : -scale;
    out[i] = add ? __fadd_rn(value, out[i]) : value;
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
