#include <bit>
#include <cstddef>

#include "unimsg/kernels/cast.hpp"

namespace unimsg {

float f16_to_f32(std::uint16_t half) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(half & 0x8000u) << 16;
  std::uint32_t exponent = (half >> 10) & 0x1Fu;
  std::uint32_t mantissa = half & 0x3FFu;
  std::uint32_t bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000u | (mantissa << 13);  // infinity or NaN
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;  // signed zero
  } else {
    // Subnormal half: normalise into an f32 exponent.
    exponent = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3FFu) << 13);
  }
  return std::bit_cast<float>(bits);
}

std::uint16_t f32_to_f16(float value) noexcept {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  const auto sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  const std::int32_t exponent = static_cast<std::int32_t>((bits >> 23) & 0xFFu);
  std::uint32_t mantissa = bits & 0x7FFFFFu;
  if (exponent == 0xFF) {
    // Infinity, or NaN kept quiet with as much of its payload as fits.
    return static_cast<std::uint16_t>(sign | 0x7C00u |
                                      (mantissa != 0 ? 0x200u | (mantissa >> 13) : 0u));
  }
  const std::int32_t half_exponent = exponent - 127 + 15;
  if (half_exponent >= 0x1F) return static_cast<std::uint16_t>(sign | 0x7C00u);  // overflow
  if (half_exponent <= 0) {
    if (half_exponent < -10) return sign;  // below half the smallest subnormal: zero
    mantissa |= 0x800000u;
    const auto shift = static_cast<std::uint32_t>(14 - half_exponent);
    std::uint32_t half_mantissa = mantissa >> shift;
    const std::uint32_t rest = mantissa & ((1u << shift) - 1);
    const std::uint32_t halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (half_mantissa & 1u))) ++half_mantissa;
    return static_cast<std::uint16_t>(sign | half_mantissa);  // may round up to the normal range
  }
  auto half = static_cast<std::uint16_t>(sign | (static_cast<std::uint32_t>(half_exponent) << 10) |
                                         (mantissa >> 13));
  const std::uint32_t rest = mantissa & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;  // may round up to infinity
  return half;
}

float bf16_to_f32(std::uint16_t bf16) noexcept {
  return std::bit_cast<float>(static_cast<std::uint32_t>(bf16) << 16);
}

std::uint16_t f32_to_bf16(float value) noexcept {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  if ((bits & 0x7F800000u) == 0x7F800000u && (bits & 0x7FFFFFu) != 0) {
    return static_cast<std::uint16_t>((bits >> 16) | 0x40u);  // NaN, kept quiet
  }
  const std::uint32_t rounding = 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>((bits + rounding) >> 16);
}

void f16_to_f32(std::span<const std::uint16_t> in, std::span<float> out) noexcept {
  for (std::size_t i = 0; i < in.size(); ++i) out[i] = f16_to_f32(in[i]);
}
void f32_to_f16(std::span<const float> in, std::span<std::uint16_t> out) noexcept {
  for (std::size_t i = 0; i < in.size(); ++i) out[i] = f32_to_f16(in[i]);
}
void bf16_to_f32(std::span<const std::uint16_t> in, std::span<float> out) noexcept {
  for (std::size_t i = 0; i < in.size(); ++i) out[i] = bf16_to_f32(in[i]);
}
void f32_to_bf16(std::span<const float> in, std::span<std::uint16_t> out) noexcept {
  for (std::size_t i = 0; i < in.size(); ++i) out[i] = f32_to_bf16(in[i]);
}

}  // namespace unimsg
