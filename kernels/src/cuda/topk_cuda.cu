// topk on the device: the corrected values and their magnitudes' bits as sort keys, candidates
// (everything, or what lies above a sampled threshold, as DGC), then the k largest by a stable
// radix sort, written in index order (topk_cpu.cpp's wire, the same choice of k).

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <cub/cub.cuh>
#include <functional>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "compressor_cuda_support.cuh"
#include "element_math.hpp"

namespace unimsg::detail::cuda {
namespace {

using format::k_of;

// topk: the corrected values (non-finite ones as 0), their magnitudes' bits as sort keys.
__global__ void topk_prepare_kernel(const float* g, const float* r, float* values, unsigned* keys,
                                    unsigned* indices, std::size_t n) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const float value = math::topk_value(math::corrected(g, r, i));
    values[i] = value;
    keys[i] = __float_as_uint(fabsf(value));
    indices[i] = static_cast<unsigned>(i);
  }
}

__global__ void topk_sample_kernel(const float* values, float* sample, std::size_t samples,
                                   std::size_t n, std::uint64_t seed, std::uint64_t step) {
  for (std::size_t s = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; s < samples;
       s += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    sample[s] = fabsf(values[math::topk_sample_index(seed, step, s, n)]);
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

// The device arrays of one compression: n corrected values, their keys and indices, and room
// for the sorted keys and indices.
struct TopKArrays {
  float* values;
  unsigned* keys;
  unsigned* indices;
  unsigned* sorted_keys;
  unsigned* sorted_indices;
};

// Candidates for the k largest, in index order.
struct Candidates {
  const unsigned* indices;
  std::size_t count;
};

class CudaTopK final : public CudaCompressor {
 public:
  explicit CudaTopK(CompressionSpec spec) : CudaCompressor(std::move(spec), "topk") {}
  std::size_t wire_bytes(std::size_t n) const noexcept override {
    return format::topk_wire_bytes(spec_.ratio, n);
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
    const TopKArrays arrays{
        static_cast<float*>(scratch(1, 4 * n)), static_cast<unsigned*>(scratch(2, 4 * n)),
        static_cast<unsigned*>(scratch(3, 4 * n)), static_cast<unsigned*>(scratch(4, 4 * n)),
        static_cast<unsigned*>(scratch(5, 4 * n))};
    topk_prepare_kernel<<<grid_for(n), kThreads, 0, stream()>>>(
        g.data(), r.empty() ? nullptr : r.data(), arrays.values, arrays.keys, arrays.indices, n);
    check(cudaGetLastError(), op, "topk kernel");

    // Candidates in index order: everything, or (sampled, as DGC) what lies above a threshold
    // estimated from a sample; the same sample and threshold as the CPU's.
    Candidates candidates{arrays.indices, n};
    if (spec_.sampled && n > 4 * k) candidates = sampled_candidates(arrays, n, k, step, op);
    const unsigned* chosen = largest_k(arrays, candidates, k, op);
    topk_write_kernel<<<grid_for(k), kThreads, 0, stream()>>>(
        chosen, arrays.values, reinterpret_cast<unsigned char*>(wire.data()), k);
    check(cudaGetLastError(), op, "topk write kernel");
    if (!r.empty() && nonfinite == 0) {  // everything stays behind but what was sent
      launch_copy(arrays.values, r.data(), n, false, stream());
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

 private:
  // What lies above a threshold estimated from a sample (as the CPU's): the selected indices,
  // or all of them when fewer than k pass (the threshold was too high).
  Candidates sampled_candidates(const TopKArrays& arrays, std::size_t n, std::size_t k,
                                std::uint64_t step, const std::string& op) const {
    const std::size_t samples = math::topk_samples(k, n);
    auto* sample = static_cast<float*>(scratch(6, 4 * samples));
    topk_sample_kernel<<<grid_for(samples), kThreads, 0, stream()>>>(arrays.values, sample, samples,
                                                                     n, spec_.seed, step);
    check(cudaGetLastError(), op, "topk sample kernel");
    std::vector<float> host(samples);
    check(cudaMemcpyAsync(host.data(), sample, 4 * samples, cudaMemcpyDeviceToHost, stream()), op,
          "cudaMemcpyAsync");
    check(cudaStreamSynchronize(stream()), op, "topk sample");
    const std::size_t rank_in_sample = math::topk_rank_in_sample(samples, k, n);
    std::nth_element(host.begin(), host.begin() + static_cast<std::ptrdiff_t>(rank_in_sample - 1),
                     host.end(), std::greater<float>());
    const float threshold = math::topk_threshold(host[rank_in_sample - 1]);
    auto* flags = static_cast<unsigned char*>(scratch(7, n));
    unsigned threshold_bits = 0;
    std::memcpy(&threshold_bits, &threshold, 4);
    threshold_flags_kernel<<<grid_for(n), kThreads, 0, stream()>>>(arrays.keys, threshold_bits,
                                                                   flags, n);
    check(cudaGetLastError(), op, "topk threshold kernel");
    auto* selected = static_cast<unsigned*>(scratch(8, 4 * n));
    auto* selected_count = static_cast<int*>(scratch(9, sizeof(int)));
    std::size_t temp_bytes = 0;
    check(cub::DeviceSelect::Flagged(nullptr, temp_bytes, arrays.indices, flags, selected,
                                     selected_count, static_cast<int>(n), stream()),
          op, "cub::DeviceSelect");
    check(cub::DeviceSelect::Flagged(scratch(10, temp_bytes), temp_bytes, arrays.indices, flags,
                                     selected, selected_count, static_cast<int>(n), stream()),
          op, "cub::DeviceSelect");
    int count = 0;
    check(cudaMemcpyAsync(&count, selected_count, sizeof count, cudaMemcpyDeviceToHost, stream()),
          op, "cudaMemcpyAsync");
    check(cudaStreamSynchronize(stream()), op, "topk select");
    if (static_cast<std::size_t>(count) >= k) return {selected, static_cast<std::size_t>(count)};
    return {arrays.indices, n};
  }

  // The k largest magnitudes among the candidates, ties to the lower index (a stable
  // descending radix sort of candidates in index order), then in index order.
  const unsigned* largest_k(const TopKArrays& arrays, Candidates candidates, std::size_t k,
                            const std::string& op) const {
    if (candidates.count <= k) return candidates.indices;
    const unsigned* candidate_keys = arrays.keys;
    if (candidates.indices != arrays.indices) {
      auto* gathered = static_cast<unsigned*>(scratch(11, 4 * candidates.count));
      gather_keys_kernel<<<grid_for(candidates.count), kThreads, 0, stream()>>>(
          arrays.keys, candidates.indices, gathered, candidates.count);
      check(cudaGetLastError(), op, "topk gather kernel");
      candidate_keys = gathered;
    }
    const int items = static_cast<int>(candidates.count);
    std::size_t temp_bytes = 0;
    check(cub::DeviceRadixSort::SortPairsDescending(nullptr, temp_bytes, candidate_keys,
                                                    arrays.sorted_keys, candidates.indices,
                                                    arrays.sorted_indices, items, 0, 32, stream()),
          op, "cub::DeviceRadixSort");
    check(cub::DeviceRadixSort::SortPairsDescending(
              scratch(10, temp_bytes), temp_bytes, candidate_keys, arrays.sorted_keys,
              candidates.indices, arrays.sorted_indices, items, 0, 32, stream()),
          op, "cub::DeviceRadixSort");
    auto* in_order = static_cast<unsigned*>(scratch(12, 4 * k));
    temp_bytes = 0;
    check(cub::DeviceRadixSort::SortKeys(nullptr, temp_bytes, arrays.sorted_indices, in_order,
                                         static_cast<int>(k), 0, 32, stream()),
          op, "cub::DeviceRadixSort");
    check(cub::DeviceRadixSort::SortKeys(scratch(10, temp_bytes), temp_bytes, arrays.sorted_indices,
                                         in_order, static_cast<int>(k), 0, 32, stream()),
          op, "cub::DeviceRadixSort");
    return in_order;
  }
};

}  // namespace

std::unique_ptr<Compressor> make_topk_cuda(const CompressionSpec& spec) {
  return std::make_unique<CudaTopK>(spec);
}

}  // namespace unimsg::detail::cuda
