#pragma once

// What the CPU reference compressors (kernels/src/cpu/*_cpu.cpp) share: wire access, the size
// checks, error feedback's corrected value, the run-time CPU feature checks, the base of the
// dense formats, and the factories make_cpu_compressor (compressor_cpu.cpp) picks from.
// Module-private: nothing outside kernels/src/ includes it.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <utility>

#include "element_math.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/core/random.hpp"
#include "unimsg/kernels/compressor.hpp"

namespace unimsg::detail {

inline constexpr auto mix = splitmix64;

template <typename T>
void put(std::span<std::byte> wire, std::size_t offset, T value) {
  std::memcpy(wire.data() + offset, &value, sizeof value);
}
template <typename T>
T get(std::span<const std::byte> wire, std::size_t offset) {
  T value;
  std::memcpy(&value, wire.data() + offset, sizeof value);
  return value;
}

// An Error unless the residual is empty or holds `count` elements and the wire holds `need`
// bytes.
void check_sizes(std::size_t count, std::span<float> residual, std::size_t wire, std::size_t need,
                 const char* name);

// Gradient plus residual (error feedback) at i.
inline float corrected(std::span<const float> gradient, std::span<const float> residual,
                       std::size_t i) noexcept {
  return math::corrected(gradient.data(), residual.empty() ? nullptr : residual.data(), i);
}

#if defined(__x86_64__)
// Whether this CPU runs AVX2 (and F16C): asked once, at the first call (cpu_support.cpp).
bool has_avx2() noexcept;
bool has_f16c() noexcept;
#endif

// Formats decompressed in one pass that either writes or adds: decompress and decompress_add
// are the same expand().
class DenseCompressor : public Compressor {
 public:
  void decompress(std::span<const std::byte> wire, std::uint64_t,
                  std::span<float> out) const final {
    expand(wire, out, false);
  }
  void decompress_add(std::span<const std::byte> wire, std::uint64_t,
                      std::span<float> out) const final {
    expand(wire, out, true);
  }

 protected:
  using Compressor::Compressor;
  virtual void expand(std::span<const std::byte> wire, std::span<float> out, bool add) const = 0;
};

// One factory per format, each defined in its own file (none_cpu.cpp, half_cpu.cpp, ...).
std::unique_ptr<Compressor> make_none_cpu(const CompressionSpec& spec);
std::unique_ptr<Compressor> make_half_cpu(const CompressionSpec& spec, bool bf16);
std::unique_ptr<Compressor> make_int8_cpu(const CompressionSpec& spec);
std::unique_ptr<Compressor> make_onebit_cpu(const CompressionSpec& spec);
std::unique_ptr<Compressor> make_topk_cpu(const CompressionSpec& spec);
std::unique_ptr<Compressor> make_randomk_cpu(const CompressionSpec& spec);

}  // namespace unimsg::detail
