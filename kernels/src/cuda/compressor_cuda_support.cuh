#pragma once

// What the CUDA compressors (kernels/src/cuda/*_cuda.cu) share: the device helpers, the base
// class that checks arguments, owns the stream and the scratch memory and counts non-finite
// gradients (compressor_cuda_support.cu), the kernels more than one format launches (through
// host launchers defined once, beside them), and the factories make_cuda_compressor
// (compressor_cuda.cu) picks from. Module-private: nothing outside kernels/src/cuda/ includes it.
//
// Kernels are defined in the one .cu file that launches them (the build compiles device code per
// file, without separable compilation): a kernel two formats need is launched through a host
// function declared here.

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "compress_format.hpp"
#include "cuda_support.cuh"
#include "element_math.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/kernels/compressor.hpp"
#include "unimsg/kernels/device_memory.hpp"

namespace unimsg::detail::cuda {

// int8 and onebit: values under one scale; one block of kThreads per chunk.
constexpr std::size_t kChunk = format::kInt8Chunk;
static_assert(format::kOneBitChunk == kChunk && kThreads == static_cast<int>(kChunk));

// Error feedback's corrected value, as the CPU computes it.
using math::corrected;

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};

// out = in, or out += in (add), on `stream`: none's wire and topk's residual
// (compressor_cuda_support.cu). The caller checks cudaGetLastError.
void launch_copy(const float* in, float* out, std::size_t n, bool add, cudaStream_t stream);

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
  // Bound to the device current now: its stream and scratch live there, and every call sets it.
  CudaCompressor(CompressionSpec spec, std::string name)
      : Compressor(std::move(spec)),
        name_(std::move(name)),
        device_(current_device(kNoRank, "compress " + name_)),
        stream_("compress " + name_) {}

  std::string_view name() const noexcept override { return name_; }

  CompressResult compress(std::span<const float> g, std::span<float> r, std::uint64_t step,
                          std::span<std::byte> wire) const override;

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
  void* scratch(std::size_t slot, std::size_t bytes) const;

  // Non-finite gradients, and the largest finite |g + r| when asked (mutex_ held).
  std::size_t scan(std::span<const float> g, std::span<const float> r, float* largest,
                   const std::string& operation) const;

 private:
  void check_device(const void* pointer, const char* what, const std::string& operation) const {
    check_device_pointer(pointer, what, operation, device_);
  }

  void expand_checked(std::span<const std::byte> wire, std::uint64_t step, std::span<float> out,
                      bool add) const;

  std::string name_;
  int device_;
  CudaStream stream_;
  mutable std::mutex mutex_;
  mutable std::vector<std::optional<DeviceBuffer>> scratch_;
};

// One factory per format, each defined in its own file (none_cuda.cu, half_cuda.cu, ...).
std::unique_ptr<Compressor> make_none_cuda(const CompressionSpec& spec);
std::unique_ptr<Compressor> make_half_cuda(const CompressionSpec& spec, bool bf16);
std::unique_ptr<Compressor> make_int8_cuda(const CompressionSpec& spec);
std::unique_ptr<Compressor> make_onebit_cuda(const CompressionSpec& spec);
std::unique_ptr<Compressor> make_topk_cuda(const CompressionSpec& spec);
std::unique_ptr<Compressor> make_randomk_cuda(const CompressionSpec& spec);

}  // namespace unimsg::detail::cuda
