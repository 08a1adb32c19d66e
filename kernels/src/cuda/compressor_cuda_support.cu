// The CUDA compressors' shared part: the base class's argument checks, scratch memory and scan
// for non-finite values, and the kernels more than one format launches.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <cub/cub.cuh>
#include <mutex>
#include <string>
#include <vector>

#include "compressor_cuda_support.cuh"

namespace unimsg::detail::cuda {
namespace {

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

__global__ void copy_kernel(const float* in, float* out, std::size_t n, bool add) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    out[i] = add ? __fadd_rn(out[i], in[i]) : in[i];
  }
}

}  // namespace

void launch_copy(const float* in, float* out, std::size_t n, bool add, cudaStream_t stream) {
  copy_kernel<<<grid_for(n), kThreads, 0, stream>>>(in, out, n, add);
}

CompressResult CudaCompressor::compress(std::span<const float> g, std::span<float> r,
                                        std::uint64_t step, std::span<std::byte> wire) const {
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
  const DeviceGuard guard(device_, kNoRank, operation);
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

// Scratch device memory, at least `bytes` (mutex_ held).
void* CudaCompressor::scratch(std::size_t slot, std::size_t bytes) const {
  if (scratch_.size() <= slot) scratch_.resize(slot + 1);
  auto& buffer = scratch_[slot];
  if (!buffer || buffer->bytes() < bytes) buffer.emplace(std::max<std::size_t>(bytes, 256));
  return buffer->data();
}

// Non-finite gradients, and the largest finite |g + r| when asked (mutex_ held).
std::size_t CudaCompressor::scan(std::span<const float> g, std::span<const float> r, float* largest,
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

void CudaCompressor::expand_checked(std::span<const std::byte> wire, std::uint64_t step,
                                    std::span<float> out, bool add) const {
  const std::string operation = "cuda decompress " + name_;
  if (!wire.empty()) check_device(wire.data(), "wire", operation);
  if (out.empty()) {
    // Nothing to write, but a wire the CPU refuses (topk's pairs past an empty output, a short
    // one) is refused here too: the CPU reads it.
    std::vector<std::byte> host(wire.size());
    if (!host.empty()) {
      const DeviceGuard guard(device_, kNoRank, operation);
      check(cudaMemcpy(host.data(), wire.data(), host.size(), cudaMemcpyDeviceToHost), operation,
            "cudaMemcpy");
    }
    const auto cpu = make_cpu_compressor(spec_);
    if (add) {
      cpu->decompress_add(host, step, {});
    } else {
      cpu->decompress(host, step, {});
    }
    return;
  }
  check_device(out.data(), "output", operation);
  if (reinterpret_cast<std::uintptr_t>(wire.data()) % 4 != 0) {
    throw Error(kNoRank, operation, "the wire buffer must be 4-byte aligned on the device");
  }
  const DeviceGuard guard(device_, kNoRank, operation);
  std::lock_guard lock(mutex_);
  run_expand(wire, step, out, add, operation);
  check(cudaStreamSynchronize(stream_.get()), operation, "kernels");
}

}  // namespace unimsg::detail::cuda
