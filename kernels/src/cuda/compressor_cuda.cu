// CUDA compressors: the CPU reference's wire formats and semantics (compressor_cpu.cpp) on device
// memory. Where the CPU reference's result depends on the order of floating-point operations
// (onebit's sum of squares, the residual updates), the kernels follow the order of its AVX2 path,
// the one x86 machines with GPUs run, and use explicitly rounded operations (__fadd_rn and
// friends) so that nvcc does not contract them into FMAs the CPU does not use.

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cub/cub.cuh>
#include <limits>
#include <mutex>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "compress_format.hpp"
#include "cuda_support.cuh"
#include "unimsg/core/error.hpp"
#include "unimsg/core/random.hpp"
#include "unimsg/kernels/compressor.hpp"
#include "unimsg/kernels/device_memory.hpp"

namespace unimsg {
namespace {

using detail::cuda::check;
using detail::cuda::grid_for;
using detail::cuda::kThreads;
using detail::format::k_of;
using detail::format::kInt8ChunkBytes;
using detail::format::kOneBitChunkBytes;
using detail::format::uniform01;

// int8 and onebit: values under one scale; one block of kThreads per chunk.
constexpr std::size_t kChunk = detail::format::kInt8Chunk;
static_assert(detail::format::kOneBitChunk == kChunk && kThreads == static_cast<int>(kChunk));

__device__ __forceinline__ float corrected(const float* g, const float* r, std::size_t i) {
  return r != nullptr ? __fadd_rn(g[i], r[i]) : g[i];
}

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};

// Non-finite gradients (g only, as on the CPU) and, optionally, the bits of the largest finite
// |g + r| (for non-negative floats the bit patterns order as the values do).
__global__ void scan_kernel(const float* g, const float* r, std::size_t n, bool want_largest,
                            unsigned long long* nonfinite, unsigned int* largest) {
  unsigned int bad = 0;
  unsigned int big = 0;
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    bad += (__float_as_uint(g[i]) & 0x7f800000u) == 0x7f800000u;
    if (want_largest) {
      const unsigned bits = __float_as_uint(corrected(g, r, i)) & 0x7fffffffu;
      big = max(big, bits < 0x7f800000u ? bits : 0u);
    }
  }
  using Reduce = cub::BlockReduce<unsigned int, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  const unsigned total_bad = Reduce(storage).Sum(bad);
  __syncthreads();
  const unsigned total_big = Reduce(storage).Reduce(big, MaxOp{});
  if (threadIdx.x == 0) {
    if (total_bad != 0) atomicAdd(nonfinite, static_cast<unsigned long long>(total_bad));
    if (want_largest) atomicMax(largest, total_big);
  }
}

__global__ void write_f32_kernel(unsigned char* at, float value) {
  *reinterpret_cast<float*>(at) = value;
}

__global__ void to_f16_kernel(const float* g, float* r, __half* out, std::size_t n, float scale,
                              float inverse, bool update) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const float v = corrected(g, r, i);
    const __half h = __float2half_rn(__fmul_rn(v, scale));
    out[i] = h;
    if (update) r[i] = __fsub_rn(v, __fmul_rn(__half2float(h), inverse));
  }
}

// The scale is read where it lies on the wire (no round trip to the host); 1/scale with IEEE
// division, as the CPU computes it.
__global__ void from_f16_kernel(const unsigned char* wire, float* out, std::size_t n, bool add) {
  const float inverse = __fdiv_rn(1.0f, *reinterpret_cast<const float*>(wire));
  const auto* in = reinterpret_cast<const __half*>(wire + 4);
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const float value = __fmul_rn(__half2float(in[i]), inverse);
    out[i] = add ? __fadd_rn(value, out[i]) : value;
  }
}

// bf16 on the bits, exactly as the CPU: round to nearest even, NaN quieted.
__global__ void to_bf16_kernel(const float* g, float* r, std::uint16_t* out, std::size_t n,
                               bool update) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const float v = corrected(g, r, i);
    const unsigned bits = __float_as_uint(v);
    const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
    const unsigned h =
        nan ? ((bits >> 16) | 0x40u) : ((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
    out[i] = static_cast<std::uint16_t>(h);
    if (update) r[i] = __fsub_rn(v, __uint_as_float(h << 16));
  }
}

__global__ void from_bf16_kernel(const std::uint16_t* in, float* out, std::size_t n, bool add) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const float value = __uint_as_float(static_cast<unsigned>(in[i]) << 16);
    out[i] = add ? __fadd_rn(out[i], value) : value;
  }
}

// One block per chunk of 256: the largest finite magnitude, then stochastic rounding.
__global__ void int8_kernel(const float* g, float* r, unsigned char* wire, std::size_t n,
                            std::uint64_t seed, std::uint64_t step, bool update) {
  const std::size_t chunk = blockIdx.x;
  const std::size_t i = chunk * kChunk + threadIdx.x;
  const bool in = i < n;
  const float v = in ? corrected(g, r, i) : 0.0f;
  const bool finite = isfinite(v);
  using Reduce = cub::BlockReduce<float, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  __shared__ float shared_scale;
  const float largest = Reduce(storage).Reduce(in && finite ? fabsf(v) : 0.0f, MaxOp{});
  if (threadIdx.x == 0) shared_scale = largest > 0 ? __fdiv_rn(largest, 127.0f) : 1.0f;
  __syncthreads();
  const float scale = shared_scale;
  unsigned char* at = wire + chunk * kInt8ChunkBytes;
  if (threadIdx.x == 0) *reinterpret_cast<float*>(at) = scale;
  if (!in) return;
  const float x = finite ? __fdiv_rn(v, scale) : 0.0f;
  const float q = fminf(fmaxf(floorf(__fadd_rn(x, uniform01(seed, step, i))), -127.0f), 127.0f);
  const auto code = static_cast<std::int8_t>(q);
  at[4 + threadIdx.x] = static_cast<unsigned char>(code);
  if (update) r[i] = __fsub_rn(v, __fmul_rn(static_cast<float>(code), scale));
}

__global__ void from_int8_kernel(const unsigned char* wire, float* out, std::size_t n, bool add) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const unsigned char* at = wire + (i / kChunk) * kInt8ChunkBytes;
    const float scale = *reinterpret_cast<const float*>(at);
    const auto code = static_cast<std::int8_t>(at[4 + i % kChunk]);
    const float value = __fmul_rn(static_cast<float>(code), scale);
    out[i] = add ? __fadd_rn(out[i], value) : value;
  }
}

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

// topk: the corrected values (non-finite ones as 0), their magnitudes' bits as sort keys.
__global__ void topk_prepare_kernel(const float* g, const float* r, float* values, unsigned* keys,
                                    unsigned* indices, std::size_t n) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const float v = corrected(g, r, i);
    const float value = isfinite(v) ? v : 0.0f;
    values[i] = value;
    keys[i] = __float_as_uint(fabsf(value));
    indices[i] = static_cast<unsigned>(i);
  }
}

__global__ void topk_sample_kernel(const float* values, float* sample, std::size_t samples,
                                   std::size_t n, std::uint64_t seed, std::uint64_t step) {
  for (std::size_t s = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; s < samples;
       s += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    sample[s] = fabsf(values[splitmix64(seed ^ splitmix64(step) ^ s) % n]);
  }
}

__global__ void threshold_flags_kernel(const unsigned* keys, unsigned threshold_bits,
                                       unsigned char* flags, std::size_t n) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    flags[i] = keys[i] >= threshold_bits ? 1 : 0;
  }
}

__global__ void gather_keys_kernel(const unsigned* keys, const unsigned* indices, unsigned* out,
                                   std::size_t count) {
  for (std::size_t j = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; j < count;
       j += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    out[j] = keys[indices[j]];
  }
}

__global__ void topk_write_kernel(const unsigned* chosen, const float* values, unsigned char* wire,
                                  std::size_t k) {
  for (std::size_t j = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; j < k;
       j += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    auto* pair = reinterpret_cast<unsigned*>(wire + 4 + 8 * j);
    pair[0] = chosen[j];
    pair[1] = __float_as_uint(values[chosen[j]]);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0)
    *reinterpret_cast<unsigned*>(wire) = static_cast<unsigned>(k);
}

__global__ void copy_kernel(const float* in, float* out, std::size_t n, bool add) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    out[i] = add ? __fadd_rn(out[i], in[i]) : in[i];
  }
}

__global__ void zero_at_kernel(const unsigned* positions, float* out, std::size_t k) {
  for (std::size_t j = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; j < k;
       j += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    out[positions[j]] = 0.0f;
  }
}

// The sent pairs added into `out` (a sparse sum); indices were checked on the host.
__global__ void scatter_pairs_kernel(const unsigned char* wire, float* out, std::size_t k) {
  for (std::size_t j = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; j < k;
       j += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const auto* pair = reinterpret_cast<const unsigned*>(wire + 4 + 8 * j);
    atomicAdd(out + pair[0], __uint_as_float(pair[1]));
  }
}

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

// The stream a compressor runs on, and its scratch memory (grown as needed).
class CudaStream {
 public:
  // A blocking stream: its work is ordered after what the caller put on the legacy default
  // stream before (a cudaMemcpy of the gradient, say), which a non-blocking one would not be.
  explicit CudaStream(const std::string& operation) {
    check(cudaStreamCreate(&stream_), operation, "cudaStreamCreate");
  }
  ~CudaStream() { cudaStreamDestroy(stream_); }
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  cudaStream_t get() const noexcept { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

class CudaCompressor : public Compressor {
 public:
  CudaCompressor(CompressionSpec spec, std::string name)
      : Compressor(std::move(spec)), name_(std::move(name)), stream_("compress " + name_) {}

  std::string_view name() const noexcept override { return name_; }

  CompressResult compress(std::span<const float> g, std::span<float> r, std::uint64_t step,
                          std::span<std::byte> wire) const override {
    const std::string operation = "cuda compress " + name_;
    if (!r.empty() && r.size() != g.size()) {
      throw Error(kNoRank, operation, "the residual has another size");
    }
    const std::size_t need = wire_bytes(g.size());
    if (wire.size() < need) {
      throw Error(kNoRank, operation,
                  "the wire buffer holds " + std::to_string(wire.size()) + " bytes, " +
                      std::to_string(need) + " needed");
    }
    if (!g.empty()) check_device(g.data(), "gradient", operation);
    if (!r.empty()) check_device(r.data(), "residual", operation);
    if (need != 0) check_device(wire.data(), "wire", operation);
    if (reinterpret_cast<std::uintptr_t>(wire.data()) % 4 != 0) {
      throw Error(kNoRank, operation, "the wire buffer must be 4-byte aligned on the device");
    }
    std::lock_guard lock(mutex_);
    CompressResult result{need, 0};
    if (g.empty()) {
      // Nothing to launch, but a header (a scale, topk's k = 0) all the same: the CPU's.
      if (need != 0) {
        std::vector<std::byte> header(need);
        make_cpu_compressor(spec_)->compress({}, {}, step, header);
        check(cudaMemcpy(wire.data(), header.data(), need, cudaMemcpyHostToDevice), operation,
              "cudaMemcpy");
      }
      return result;
    }
    result = run_compress(g, r, step, wire, operation);
    check(cudaStreamSynchronize(stream_.get()), operation, "kernels");
    return result;
  }

  void decompress(std::span<const std::byte> wire, std::uint64_t step,
                  std::span<float> out) const override {
    expand_checked(wire, step, out, false);
  }
  void decompress_add(std::span<const std::byte> wire, std::uint64_t step,
                      std::span<float> out) const override {
    expand_checked(wire, step, out, true);
  }

 protected:
  virtual CompressResult run_compress(std::span<const float> g, std::span<float> r,
                                      std::uint64_t step, std::span<std::byte> wire,
                                      const std::string& operation) const = 0;
  virtual void run_expand(std::span<const std::byte> wire, std::uint64_t step, std::span<float> out,
                          bool add, const std::string& operation) const = 0;

  cudaStream_t stream() const noexcept { return stream_.get(); }

  // Scratch device memory, at least `bytes` (mutex_ held).
  void* scratch(std::size_t slot, std::size_t bytes) const {
    if (scratch_.size() <= slot) scratch_.resize(slot + 1);
    auto& buffer = scratch_[slot];
    if (!buffer || buffer->bytes() < bytes) buffer.emplace(std::max<std::size_t>(bytes, 256));
    return buffer->data();
  }

  // Non-finite gradients, and the largest finite |g + r| when asked (mutex_ held).
  std::size_t scan(std::span<const float> g, std::span<const float> r, float* largest,
                   const std::string& operation) const {
    auto* counters = static_cast<unsigned char*>(scratch(0, 16));
    check(cudaMemsetAsync(counters, 0, 16, stream()), operation, "cudaMemsetAsync");
    auto* nonfinite = reinterpret_cast<unsigned long long*>(counters);
    auto* largest_bits = reinterpret_cast<unsigned int*>(counters + 8);
    scan_kernel<<<grid_for(g.size()), kThreads, 0, stream()>>>(
        g.data(), r.empty() ? nullptr : r.data(), g.size(), largest != nullptr, nonfinite,
        largest_bits);
    check(cudaGetLastError(), operation, "scan kernel");
    unsigned long long host[2] = {0, 0};
    check(cudaMemcpyAsync(host, counters, 16, cudaMemcpyDeviceToHost, stream()), operation,
          "cudaMemcpyAsync");
    check(cudaStreamSynchronize(stream()), operation, "scan");
    if (largest != nullptr) {
      const auto bits = static_cast<unsigned int>(host[1]);
      std::memcpy(largest, &bits, 4);
    }
    return static_cast<std::size_t>(host[0]);
  }

 private:
  static void check_device(const void* pointer, const char* what, const std::string& operation) {
    detail::cuda::check_device_pointer(pointer, what, operation);
  }

  void expand_checked(std::span<const std::byte> wire, std::uint64_t step, std::span<float> out,
                      bool add) const {
    const std::string operation = "cuda decompress " + name_;
    if (out.empty()) return;
    check_device(out.data(), "output", operation);
    if (!wire.empty()) check_device(wire.data(), "wire", operation);
    if (reinterpret_cast<std::uintptr_t>(wire.data()) % 4 != 0) {
      throw Error(kNoRank, operation, "the wire buffer must be 4-byte aligned on the device");
    }
    std::lock_guard lock(mutex_);
    run_expand(wire, step, out, add, operation);
    check(cudaStreamSynchronize(stream_.get()), operation, "kernels");
  }

  std::string name_;
  CudaStream stream_;
  mutable std::mutex mutex_;
  mutable std::vector<std::optional<DeviceBuffer>> scratch_;
};

class CudaNone final : public CudaCompressor {
 public:
  explicit CudaNone(CompressionSpec spec) : CudaCompressor(std::move(spec), "none") {}
  std::size_t wire_bytes(std::size_t n) const noexcept override { return 4 * n; }

 protected:
  CompressResult run_compress(std::span<const float> g, std::span<float>, std::uint64_t,
                              std::span<std::byte> wire, const std::string& op) const override {
    const std::size_t nonfinite = scan(g, {}, nullptr, op);
    copy_kernel<<<grid_for(g.size()), kThreads, 0, stream()>>>(
        g.data(), reinterpret_cast<float*>(wire.data()), g.size(), false);
    check(cudaGetLastError(), op, "copy kernel");
    return {wire_bytes(g.size()), nonfinite};
  }
  void run_expand(std::span<const std::byte> wire, std::uint64_t, std::span<float> out, bool add,
                  const std::string& op) const override {
    if (wire.size() < wire_bytes(out.size())) throw Error(kNoRank, op, "the wire is too short");
    copy_kernel<<<grid_for(out.size()), kThreads, 0, stream()>>>(
        reinterpret_cast<const float*>(wire.data()), out.data(), out.size(), add);
    check(cudaGetLastError(), op, "copy kernel");
  }
};

class CudaHalf final : public CudaCompressor {
 public:
  CudaHalf(CompressionSpec spec, bool bf16)
      : CudaCompressor(std::move(spec), bf16 ? "bf16" : "fp16"), bf16_(bf16) {}
  std::size_t wire_bytes(std::size_t n) const noexcept override { return 4 + 2 * n; }

 protected:
  CompressResult run_compress(std::span<const float> g, std::span<float> r, std::uint64_t,
                              std::span<std::byte> wire, const std::string& op) const override {
    float largest = 0;
    const std::size_t nonfinite = scan(g, r, bf16_ ? nullptr : &largest, op);
    // As the CPU: f16 tops out at 65504, so only what would overflow is scaled down.
    const float scale = (!bf16_ && largest > 32768.0f) ? 32768.0f / largest : 1.0f;
    const bool update = !r.empty() && nonfinite == 0;
    auto* bytes = reinterpret_cast<unsigned char*>(wire.data());
    write_f32_kernel<<<1, 1, 0, stream()>>>(bytes, scale);
    float* residual = r.empty() ? nullptr : r.data();
    if (bf16_) {
      to_bf16_kernel<<<grid_for(g.size()), kThreads, 0, stream()>>>(
          g.data(), residual, reinterpret_cast<std::uint16_t*>(bytes + 4), g.size(), update);
    } else {
      to_f16_kernel<<<grid_for(g.size()), kThreads, 0, stream()>>>(
          g.data(), residual, reinterpret_cast<__half*>(bytes + 4), g.size(), scale, 1.0f / scale,
          update);
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

class CudaInt8 final : public CudaCompressor {
 public:
  explicit CudaInt8(CompressionSpec spec) : CudaCompressor(std::move(spec), "int8") {}
  std::size_t wire_bytes(std::size_t n) const noexcept override {
    return detail::format::int8_wire_bytes(n);
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

class CudaOneBit final : public CudaCompressor {
 public:
  explicit CudaOneBit(CompressionSpec spec) : CudaCompressor(std::move(spec), "onebit") {}
  std::size_t wire_bytes(std::size_t n) const noexcept override {
    return detail::format::onebit_wire_bytes(n);
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

class CudaTopK final : public CudaCompressor {
 public:
  explicit CudaTopK(CompressionSpec spec) : CudaCompressor(std::move(spec), "topk") {}
  std::size_t wire_bytes(std::size_t n) const noexcept override {
    return 4 + 8 * k_of(spec_.ratio, n);
  }

 protected:
  CompressResult run_compress(std::span<const float> g, std::span<float> r, std::uint64_t step,
                              std::span<std::byte> wire, const std::string& op) const override {
    const std::size_t n = g.size();
    if (n > static_cast<std::size_t>(std::numeric_limits<int>::max())) {
      throw Error(kNoRank, op, "more than 2^31 - 1 elements in one tensor");
    }
    const std::size_t k = k_of(spec_.ratio, n);
    const std::size_t nonfinite = scan(g, {}, nullptr, op);
    auto* values = static_cast<float*>(scratch(1, 4 * n));
    auto* keys = static_cast<unsigned*>(scratch(2, 4 * n));
    auto* indices = static_cast<unsigned*>(scratch(3, 4 * n));
    auto* sorted_keys = static_cast<unsigned*>(scratch(4, 4 * n));
    auto* sorted_indices = static_cast<unsigned*>(scratch(5, 4 * n));
    topk_prepare_kernel<<<grid_for(n), kThreads, 0, stream()>>>(
        g.data(), r.empty() ? nullptr : r.data(), values, keys, indices, n);
    check(cudaGetLastError(), op, "topk kernel");

    // Candidates in index order: everything, or (sampled, as DGC) what lies above a threshold
    // estimated from a sample; the same sample and threshold as the CPU's.
    const unsigned* candidates = indices;
    std::size_t candidate_count = n;
    if (spec_.sampled && n > 4 * k) {
      const std::size_t samples = std::min<std::size_t>(n, std::max<std::size_t>(k * 8, 1024));
      auto* sample = static_cast<float*>(scratch(6, 4 * samples));
      topk_sample_kernel<<<grid_for(samples), kThreads, 0, stream()>>>(values, sample, samples, n,
                                                                       spec_.seed, step);
      check(cudaGetLastError(), op, "topk sample kernel");
      std::vector<float> host(samples);
      check(cudaMemcpyAsync(host.data(), sample, 4 * samples, cudaMemcpyDeviceToHost, stream()), op,
            "cudaMemcpyAsync");
      check(cudaStreamSynchronize(stream()), op, "topk sample");
      const std::size_t rank_in_sample = std::max<std::size_t>(1, samples * k / n);
      std::nth_element(host.begin(), host.begin() + static_cast<std::ptrdiff_t>(rank_in_sample - 1),
                       host.end(), std::greater<float>());
      const float threshold = host[rank_in_sample - 1] * 0.8f;
      auto* flags = static_cast<unsigned char*>(scratch(7, n));
      unsigned threshold_bits = 0;
      std::memcpy(&threshold_bits, &threshold, 4);
      threshold_flags_kernel<<<grid_for(n), kThreads, 0, stream()>>>(keys, threshold_bits, flags,
                                                                     n);
      check(cudaGetLastError(), op, "topk threshold kernel");
      auto* selected = static_cast<unsigned*>(scratch(8, 4 * n));
      auto* selected_count = static_cast<int*>(scratch(9, sizeof(int)));
      std::size_t temp_bytes = 0;
      check(cub::DeviceSelect::Flagged(nullptr, temp_bytes, indices, flags, selected,
                                       selected_count, static_cast<int>(n), stream()),
            op, "cub::DeviceSelect");
      check(cub::DeviceSelect::Flagged(scratch(10, temp_bytes), temp_bytes, indices, flags,
                                       selected, selected_count, static_cast<int>(n), stream()),
            op, "cub::DeviceSelect");
      int count = 0;
      check(cudaMemcpyAsync(&count, selected_count, sizeof count, cudaMemcpyDeviceToHost, stream()),
            op, "cudaMemcpyAsync");
      check(cudaStreamSynchronize(stream()), op, "topk select");
      if (static_cast<std::size_t>(count) >= k) {  // (fewer: the threshold was too high)
        candidates = selected;
        candidate_count = static_cast<std::size_t>(count);
      }
    }
    // The k largest magnitudes among the candidates, ties to the lower index (a stable
    // descending radix sort of candidates in index order), then in index order.
    const unsigned* chosen = candidates;
    if (candidate_count > k) {
      const unsigned* candidate_keys = keys;
      if (candidates != indices) {
        auto* gathered = static_cast<unsigned*>(scratch(11, 4 * candidate_count));
        gather_keys_kernel<<<grid_for(candidate_count), kThreads, 0, stream()>>>(
            keys, candidates, gathered, candidate_count);
        check(cudaGetLastError(), op, "topk gather kernel");
        candidate_keys = gathered;
      }
      const int items = static_cast<int>(candidate_count);
      std::size_t temp_bytes = 0;
      check(cub::DeviceRadixSort::SortPairsDescending(nullptr, temp_bytes, candidate_keys,
                                                      sorted_keys, candidates, sorted_indices,
                                                      items, 0, 32, stream()),
            op, "cub::DeviceRadixSort");
      check(cub::DeviceRadixSort::SortPairsDescending(scratch(10, temp_bytes), temp_bytes,
                                                      candidate_keys, sorted_keys, candidates,
                                                      sorted_indices, items, 0, 32, stream()),
            op, "cub::DeviceRadixSort");
      auto* in_order = static_cast<unsigned*>(scratch(12, 4 * k));
      temp_bytes = 0;
      check(cub::DeviceRadixSort::SortKeys(nullptr, temp_bytes, sorted_indices, in_order,
                                           static_cast<int>(k), 0, 32, stream()),
            op, "cub::DeviceRadixSort");
      check(cub::DeviceRadixSort::SortKeys(scratch(10, temp_bytes), temp_bytes, sorted_indices,
                                           in_order, static_cast<int>(k), 0, 32, stream()),
            op, "cub::DeviceRadixSort");
      chosen = in_order;
    }
    topk_write_kernel<<<grid_for(k), kThreads, 0, stream()>>>(
        chosen, values, reinterpret_cast<unsigned char*>(wire.data()), k);
    check(cudaGetLastError(), op, "topk write kernel");
    if (!r.empty() && nonfinite == 0) {  // everything stays behind but what was sent
      copy_kernel<<<grid_for(n), kThreads, 0, stream()>>>(values, r.data(), n, false);
      zero_at_kernel<<<grid_for(k), kThreads, 0, stream()>>>(chosen, r.data(), k);
      check(cudaGetLastError(), op, "topk residual kernels");
    }
    return {wire_bytes(n), nonfinite};
  }

  void run_expand(std::span<const std::byte> wire, std::uint64_t, std::span<float> out, bool add,
                  const std::string& op) const override {
    // The pairs are validated on the host first: an index past the output is an error, not a
    // stray write on the device.
    if (wire.size() < 4) throw Error(kNoRank, op, "the wire is shorter than k");
    std::uint32_t k = 0;
    check(cudaMemcpyAsync(&k, wire.data(), 4, cudaMemcpyDeviceToHost, stream()), op,
          "cudaMemcpyAsync");
    check(cudaStreamSynchronize(stream()), op, "topk k");
    if (wire.size() < 4 + 8 * static_cast<std::size_t>(k)) {
      throw Error(kNoRank, op, "the wire is shorter than its k pairs");
    }
    std::vector<std::uint32_t> pairs(2 * static_cast<std::size_t>(k));
    if (k != 0) {
      check(cudaMemcpyAsync(pairs.data(), wire.data() + 4, 8 * static_cast<std::size_t>(k),
                            cudaMemcpyDeviceToHost, stream()),
            op, "cudaMemcpyAsync");
      check(cudaStreamSynchronize(stream()), op, "topk pairs");
    }
    for (std::size_t j = 0; j < k; ++j) {
      if (pairs[2 * j] >= out.size()) {
        throw Error(kNoRank, op,
                    "index " + std::to_string(pairs[2 * j]) + " is past the " +
                        std::to_string(out.size()) + " elements");
      }
    }
    if (!add) check(cudaMemsetAsync(out.data(), 0, 4 * out.size(), stream()), op, "cudaMemset");
    if (k != 0) {
      scatter_pairs_kernel<<<grid_for(k), kThreads, 0, stream()>>>(
          reinterpret_cast<const unsigned char*>(wire.data()), out.data(), k);
      check(cudaGetLastError(), op, "topk scatter kernel");
    }
  }
};

class CudaRandomK final : public CudaCompressor {
 public:
  explicit CudaRandomK(CompressionSpec spec) : CudaCompressor(std::move(spec), "randomk") {}
  std::size_t wire_bytes(std::size_t n) const noexcept override { return 4 * k_of(spec_.ratio, n); }

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

std::unique_ptr<Compressor> make_cuda_compressor(const CompressionSpec& spec) {
  if (spec.name == "none") return std::make_unique<CudaNone>(spec);
  if (spec.name == "fp16") return std::make_unique<CudaHalf>(spec, false);
  if (spec.name == "bf16") return std::make_unique<CudaHalf>(spec, true);
  if (spec.name == "int8") return std::make_unique<CudaInt8>(spec);
  if (spec.name == "onebit") return std::make_unique<CudaOneBit>(spec);
  if (spec.name == "topk") return std::make_unique<CudaTopK>(spec);
  if (spec.name == "randomk") return std::make_unique<CudaRandomK>(spec);
  if (spec.name == "powersgd") {
    throw ConfigError(kNoRank, "compression",
                      "powersgd needs the ranks between its stages: use CudaPowerSgd "
                      "(powersgd.hpp), which holds its steps");
  }
  throw ConfigError(kNoRank, "compression", "unknown compressor '" + spec.name + "'");
}

}  // namespace unimsg
