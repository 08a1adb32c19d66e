#pragma once

// The wire formats' constants and the functions that must give the same result on the CPU and in
// CUDA kernels (compressor_cpu.cpp, compressor_cuda.cu): defined once, for both.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "unimsg/core/random.hpp"  // (and UNIMSG_HOST_DEVICE)

namespace unimsg::detail::format {

constexpr std::size_t kInt8Chunk = 256;    // int8: values under one scale
constexpr std::size_t kOneBitChunk = 256;  // onebit: values under one scale
constexpr std::size_t kInt8ChunkBytes = 4 + kInt8Chunk;
constexpr std::size_t kOneBitChunkBytes = 4 + kOneBitChunk / 8;

constexpr std::size_t int8_wire_bytes(std::size_t n) noexcept {
  return (n + kInt8Chunk - 1) / kInt8Chunk * 4 + n;
}
constexpr std::size_t onebit_wire_bytes(std::size_t n) noexcept {
  return (n + kOneBitChunk - 1) / kOneBitChunk * kOneBitChunkBytes;
}

// Elements topk and randomk send: ceil(ratio n), at least 1 of a non-empty tensor.
inline std::size_t k_of(double ratio, std::size_t n) noexcept {
  if (n == 0) return 0;
  return std::clamp<std::size_t>(
      static_cast<std::size_t>(std::ceil(ratio * static_cast<double>(n))), 1, n);
}

// Every format's wire size, the CPU's and the kernels' one source. fp16/bf16: a scale, then a
// half per element; none: the floats.
constexpr std::size_t half_wire_bytes(std::size_t n) noexcept {
  return 4 + 2 * n;
}
constexpr std::size_t none_wire_bytes(std::size_t n) noexcept {
  return 4 * n;
}
// topk: k, then k (index, value) pairs; randomk: k values (the positions are drawn).
inline std::size_t topk_wire_bytes(double ratio, std::size_t n) noexcept {
  return 4 + 8 * k_of(ratio, n);
}
inline std::size_t randomk_wire_bytes(double ratio, std::size_t n) noexcept {
  return 4 * k_of(ratio, n);
}

// Uniform in [0, 1) from a counter: the same on every platform and for any thread split.
// uniform01 = uniform01_from(uniform01_base(seed, step), index).
UNIMSG_HOST_DEVICE inline std::uint64_t uniform01_base(std::uint64_t seed,
                                                       std::uint64_t step) noexcept {
  return splitmix64(seed ^ splitmix64(step));
}
UNIMSG_HOST_DEVICE inline float uniform01_from(std::uint64_t base, std::uint64_t index) noexcept {
  return static_cast<float>(splitmix64(base + index) >> 40) * (1.0f / 16777216.0f);
}
UNIMSG_HOST_DEVICE inline float uniform01(std::uint64_t seed, std::uint64_t step,
                                          std::uint64_t index) noexcept {
  return uniform01_from(uniform01_base(seed, step), index);
}

}  // namespace unimsg::detail::format
