#pragma once

// The compressors' per-element arithmetic, written once for the CPU (its scalar paths and the
// tails of its SIMD loops) and the CUDA kernels, so that the CPU tests check the GPU's formulas.
// Each operation is a single IEEE round-to-nearest step: on the device its __f*_rn intrinsic,
// which the compiler never contracts into an FMA (a fused multiply-add rounds once where the CPU
// rounds twice); on the host the plain operator (no -ffast-math, no FMA contraction here).
//
// NaN: a NaN stays a NaN; its bits are canonical where the formats store or decode one (fp16
// wire 0x7E00, decoded 0x7FC00000), since the CPU's conversions keep payloads and the device's do
// not. A sum with a NaN is a NaN, bits unspecified. Signed zeros are kept everywhere.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "unimsg/core/random.hpp"  // UNIMSG_HOST_DEVICE
#if !defined(__CUDA_ARCH__)
#include "unimsg/kernels/cast.hpp"
#endif
#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

namespace unimsg::detail::math {

UNIMSG_HOST_DEVICE inline float add_rn(float a, float b) noexcept {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
UNIMSG_HOST_DEVICE inline float sub_rn(float a, float b) noexcept {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
UNIMSG_HOST_DEVICE inline float mul_rn(float a, float b) noexcept {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
UNIMSG_HOST_DEVICE inline float div_rn(float a, float b) noexcept {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

UNIMSG_HOST_DEVICE inline std::uint32_t bits_of(float value) noexcept {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
#endif
}
UNIMSG_HOST_DEVICE inline float float_of(std::uint32_t bits) noexcept {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
#endif
}
UNIMSG_HOST_DEVICE inline bool is_nan(float value) noexcept {
  return (bits_of(value) & 0x7fffffffu) > 0x7f800000u;
}

// Error feedback: the gradient plus the residual carried from the last step (none: nullptr).
UNIMSG_HOST_DEVICE inline float corrected(const float* gradient, const float* residual,
                                          std::size_t i) noexcept {
  return residual != nullptr ? add_rn(gradient[i], residual[i]) : gradient[i];
}
// What decompress writes (add: decompress_add) at an element: -0 stays -0 when not adding.
UNIMSG_HOST_DEVICE inline float accumulate(float out, float value, bool add) noexcept {
  return add ? add_rn(out, value) : value;
}

// fp16: values are scaled down only when the largest finite |value| would overflow f16 (65504).
inline constexpr std::uint16_t kF16NaN = 0x7e00;
inline constexpr std::uint32_t kF32NaN = 0x7fc00000u;
UNIMSG_HOST_DEVICE inline float fp16_scale(float largest_finite) noexcept {
  return largest_finite > 32768.0f ? div_rn(32768.0f, largest_finite) : 1.0f;
}
// Decoding multiplies by the inverse of the scale (the CPU's SIMD loops cannot divide cheaply).
UNIMSG_HOST_DEVICE inline float fp16_inverse(float scale) noexcept {
  return div_rn(1.0f, scale);
}
UNIMSG_HOST_DEVICE inline std::uint16_t fp16_encode(float value, float scale) noexcept {
  const float scaled = mul_rn(value, scale);
  if (is_nan(scaled)) return kF16NaN;
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(scaled));
#else
  return f32_to_f16(scaled);
#endif
}
UNIMSG_HOST_DEVICE inline float fp16_decode(std::uint16_t half, float inverse) noexcept {
  if ((half & 0x7fffu) > 0x7c00u) return float_of(kF32NaN);
#if defined(__CUDA_ARCH__)
  const float value = __half2float(__ushort_as_half(half));
#else
  const float value = f16_to_f32(half);
#endif
  return mul_rn(value, inverse);
}
// The residual error feedback keeps: what the wire lost of `value`.
UNIMSG_HOST_DEVICE inline float fp16_residual(float value, std::uint16_t half,
                                              float inverse) noexcept {
  return sub_rn(value, fp16_decode(half, inverse));
}

// bf16 is f32's upper half: round to nearest even on the bits; a NaN is kept quiet, its sign and
// upper payload kept (the same integer operations on both sides, so the bits agree too).
UNIMSG_HOST_DEVICE inline std::uint16_t bf16_encode(float value) noexcept {
  const std::uint32_t bits = bits_of(value);
  const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
  return static_cast<std::uint16_t>(nan ? ((bits >> 16) | 0x40u)
                                        : ((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16));
}
UNIMSG_HOST_DEVICE inline float bf16_decode(std::uint16_t bf16) noexcept {
  return float_of(static_cast<std::uint32_t>(bf16) << 16);
}
UNIMSG_HOST_DEVICE inline float bf16_residual(float value, std::uint16_t bf16) noexcept {
  return sub_rn(value, bf16_decode(bf16));
}

// int8: per chunk, scale = largest finite |value| / 127 (1 for a chunk of zeros); each value
// coded as floor(value / scale + u), u uniform in [0, 1) (stochastic rounding, unbiased),
// clamped to [-127, 127]; a non-finite value codes as 0.
UNIMSG_HOST_DEVICE inline float int8_scale(float largest_finite) noexcept {
  return largest_finite > 0 ? div_rn(largest_finite, 127.0f) : 1.0f;
}
UNIMSG_HOST_DEVICE inline std::int8_t int8_code(float value, float scale, float u) noexcept {
  const bool finite = (bits_of(value) & 0x7f800000u) != 0x7f800000u;
  const float x = finite ? div_rn(value, scale) : 0.0f;
  return static_cast<std::int8_t>(fminf(fmaxf(floorf(add_rn(x, u)), -127.0f), 127.0f));
}
UNIMSG_HOST_DEVICE inline float int8_decode(std::int8_t code, float scale) noexcept {
  return mul_rn(static_cast<float>(code), scale);
}
UNIMSG_HOST_DEVICE inline float int8_residual(float value, std::int8_t code, float scale) noexcept {
  return sub_rn(value, int8_decode(code, scale));
}

// onebit: per chunk, scale = the root mean square of its values, in one summation order that the
// CPU's AVX2 loop, its portable loop and the kernel all follow: eight f32 lanes (lane = index % 8)
// over the whole groups of eight, each lane in four partial sums (index / 8 % 4, whole groups of
// 32 first, then the remaining groups of 8 into the first), the lanes then added in double in lane
// order, then the last count % 8 values' squares in double.
inline constexpr int kOneBitLanes = 8;
UNIMSG_HOST_DEVICE inline float onebit_lane_sum(const float* values, std::size_t count,
                                                int lane) noexcept {
  const std::size_t whole = count / 8 * 8, whole32 = count / 32 * 32;
  float sums[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (std::size_t j = static_cast<std::size_t>(lane); j < whole32; j += 32) {
    for (int k = 0; k < 4; ++k) {
      const float x = values[j + 8 * static_cast<std::size_t>(k)];
      sums[k] = add_rn(sums[k], mul_rn(x, x));
    }
  }
  for (std::size_t j = whole32 + static_cast<std::size_t>(lane); j < whole; j += 8) {
    sums[0] = add_rn(sums[0], mul_rn(values[j], values[j]));
  }
  return add_rn(add_rn(sums[0], sums[1]), add_rn(sums[2], sums[3]));
}
UNIMSG_HOST_DEVICE inline float onebit_scale(const float* lane_sums, const float* values,
                                             std::size_t count) noexcept {
  double sum = 0;
  for (int lane = 0; lane < kOneBitLanes; ++lane) sum += static_cast<double>(lane_sums[lane]);
  for (std::size_t j = count / 8 * 8; j < count; ++j) {
    sum += static_cast<double>(values[j]) * static_cast<double>(values[j]);
  }
  return static_cast<float>(sqrt(sum / static_cast<double>(count)));
}
// 0, -0 and NaN count as positive.
UNIMSG_HOST_DEVICE inline bool onebit_positive(float value) noexcept {
  return !(value < 0.0f);
}
UNIMSG_HOST_DEVICE inline float onebit_decode(bool positive, float scale) noexcept {
  return positive ? scale : -scale;
}
UNIMSG_HOST_DEVICE inline float onebit_residual(float value, float scale) noexcept {
  return sub_rn(value, onebit_decode(onebit_positive(value), scale));
}

// topk: a non-finite value is sent as 0 (the step is skipped anyway, and it must not win the
// selection). `:sampled` (DGC) estimates the k-th largest magnitude from a sample of
// max(8k, 1024) magnitudes (at most n) drawn by a counter, keeps what lies above 0.8 of it (a
// margin: rather more than k), then trims to exactly k (or selects exactly, if fewer pass).
UNIMSG_HOST_DEVICE inline float topk_value(float value) noexcept {
  return (bits_of(value) & 0x7f800000u) != 0x7f800000u ? value : 0.0f;
}
UNIMSG_HOST_DEVICE inline std::size_t topk_samples(std::size_t k, std::size_t n) noexcept {
  const std::size_t wanted = k * 8 > 1024 ? k * 8 : 1024;
  return wanted < n ? wanted : n;
}
UNIMSG_HOST_DEVICE inline std::size_t topk_sample_index(std::uint64_t seed, std::uint64_t step,
                                                        std::size_t sample,
                                                        std::size_t n) noexcept {
  return static_cast<std::size_t>(splitmix64(seed ^ splitmix64(step) ^ sample) % n);
}
// The position (from 1, largest first) of the k-th largest magnitude's estimate in the sample.
UNIMSG_HOST_DEVICE inline std::size_t topk_rank_in_sample(std::size_t samples, std::size_t k,
                                                          std::size_t n) noexcept {
  const std::size_t rank = samples * k / n;
  return rank > 1 ? rank : 1;
}
UNIMSG_HOST_DEVICE inline float topk_threshold(float sampled_kth_magnitude) noexcept {
  return mul_rn(sampled_kth_magnitude, 0.8f);
}

}  // namespace unimsg::detail::math
