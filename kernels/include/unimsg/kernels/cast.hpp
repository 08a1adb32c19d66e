#pragma once

// Conversions between f32 and the 16-bit float formats, CPU reference. IEEE round to nearest
// even; NaN stays NaN (quiet), infinities stay infinite, f16 overflow becomes infinity.

#include <cstdint>
#include <span>

namespace unimsg {

float f16_to_f32(std::uint16_t half) noexcept;
std::uint16_t f32_to_f16(float value) noexcept;
float bf16_to_f32(std::uint16_t bf16) noexcept;
std::uint16_t f32_to_bf16(float value) noexcept;

// Element-wise over spans of equal length.
void f16_to_f32(std::span<const std::uint16_t> in, std::span<float> out) noexcept;
void f32_to_f16(std::span<const float> in, std::span<std::uint16_t> out) noexcept;
void bf16_to_f32(std::span<const std::uint16_t> in, std::span<float> out) noexcept;
void f32_to_bf16(std::span<const float> in, std::span<std::uint16_t> out) noexcept;

}  // namespace unimsg
