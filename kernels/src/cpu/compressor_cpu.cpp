// CPU reference compressors: one pass per element where possible (error feedback, scaling and
// packing fused), as the CUDA kernels will do.

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>

#include "compress_format.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/core/random.hpp"
#include "unimsg/kernels/cast.hpp"
#include "unimsg/kernels/compressor.hpp"

namespace unimsg {
namespace {

using detail::format::k_of;
using detail::format::kInt8Chunk;
using detail::format::kOneBitChunk;
using detail::format::uniform01;

constexpr auto mix = splitmix64;

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

void check_sizes(std::size_t count, std::span<float> residual, std::size_t wire, std::size_t need,
                 const char* name) {
  if (!residual.empty() && residual.size() != count) {
    throw Error(kNoRank, std::string("compress ") + name, "the residual has another size");
  }
  if (wire < need) {
    throw Error(kNoRank, std::string("compress ") + name,
                "the wire buffer holds " + std::to_string(wire) + " bytes, " +
                    std::to_string(need) + " needed");
  }
}

}  // namespace

namespace {

std::size_t count_nonfinite_portable(const float* p, std::size_t n) noexcept {
  std::size_t bad = 0;
  for (std::size_t i = 0; i < n; ++i) {
    std::uint32_t bits;
    std::memcpy(&bits, p + i, 4);
    bad += (bits & 0x7f800000u) == 0x7f800000u;
  }
  return bad;
}

#if defined(__x86_64__)
bool has_avx2() noexcept;

// Every compressor counts first (a step with NaN/Inf must leave the residual alone), so this
// pass is paid on every compression: 8 lanes of 32-bit counts, where GCC's own vectorisation of
// the loop above widens to 64 bits 4 floats at a time. Lanes are summed every 2^20 vectors,
// before any could overflow.
__attribute__((target("avx2"))) std::size_t count_nonfinite_avx2(const float* p,
                                                                 std::size_t n) noexcept {
  const __m256i exponent = _mm256_set1_epi32(0x7f800000);
  std::size_t total = 0;
  std::size_t i = 0;
  while (n - i >= 8) {
    const std::size_t stop = i + std::min((n - i) / 8, std::size_t{1} << 20) * 8;
    __m256i bad8 = _mm256_setzero_si256();
    for (; i < stop; i += 8) {
      const __m256i bits = _mm256_castps_si256(_mm256_loadu_ps(p + i));
      // cmpeq gives -1 per non-finite lane: subtracting counts them.
      bad8 = _mm256_sub_epi32(bad8, _mm256_cmpeq_epi32(_mm256_and_si256(bits, exponent), exponent));
    }
    alignas(32) std::uint32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), bad8);
    for (const std::uint32_t lane : lanes) total += lane;
  }
  return total + count_nonfinite_portable(p + i, n - i);
}
#endif

}  // namespace

std::size_t count_nonfinite(std::span<const float> gradient) noexcept {
#if defined(__x86_64__)
  if (has_avx2()) return count_nonfinite_avx2(gradient.data(), gradient.size());
#endif
  return count_nonfinite_portable(gradient.data(), gradient.size());
}

namespace {

// Gradient plus residual (error feedback) at i.
inline float corrected(std::span<const float> gradient, std::span<const float> residual,
                       std::size_t i) noexcept {
  return residual.empty() ? gradient[i] : gradient[i] + residual[i];
}

#if defined(__x86_64__)
// F16C converts 8 floats per instruction with IEEE round-to-nearest-even, NaN and infinity kept:
// the scalar reference's semantics at ~20x its speed. Chosen at run time.
__attribute__((target("avx2,f16c"))) void to_f16_with_feedback(const float* g, float* r,
                                                               std::byte* wire, std::size_t n,
                                                               float scale, bool update) {
  const __m256 scale8 = _mm256_set1_ps(scale);
  const __m256 inverse8 = _mm256_set1_ps(1.0f / scale);
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(g + i);
    if (r != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(r + i));
    const __m128i h = _mm256_cvtps_ph(_mm256_mul_ps(v, scale8), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(wire + 2 * i), h);
    if (update) {
      const __m256 back = _mm256_mul_ps(_mm256_cvtph_ps(h), inverse8);
      _mm256_storeu_ps(r + i, _mm256_sub_ps(v, back));
    }
  }
  for (; i < n; ++i) {
    const float v = r != nullptr ? g[i] + r[i] : g[i];
    const std::uint16_t h = f32_to_f16(v * scale);
    std::memcpy(wire + 2 * i, &h, 2);
    if (update) r[i] = v - f16_to_f32(h) / scale;
  }
}

__attribute__((target("avx2,f16c"))) void from_f16(const std::byte* wire, float* out, std::size_t n,
                                                   float scale, bool add) {
  const __m256 inverse8 = _mm256_set1_ps(1.0f / scale);
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wire + 2 * i));
    __m256 v = _mm256_mul_ps(_mm256_cvtph_ps(h), inverse8);
    if (add) v = _mm256_add_ps(v, _mm256_loadu_ps(out + i));
    _mm256_storeu_ps(out + i, v);
  }
  for (; i < n; ++i) {
    std::uint16_t h;
    std::memcpy(&h, wire + 2 * i, 2);
    out[i] = (add ? out[i] : 0.0f) + f16_to_f32(h) / scale;
  }
}

bool has_f16c() noexcept {
  // (clang's __builtin_cpu_supports knows no "f16c": ask cpuid, leaf 1, ECX bit 29.)
  static const bool supported = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __builtin_cpu_supports("avx2") && __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 &&
           (ecx & (1u << 29)) != 0;
  }();
  return supported;
}
#endif

// The non-finite gradients, and the bits of the largest finite |gradient + residual|: the
// portable version (and the AVX2 one's tail).
template <bool kResidual>
inline __attribute__((always_inline)) std::size_t scan_magnitudes_body(
    const float* g, const float* r, std::size_t n, std::uint32_t& largest_bits) {
  std::size_t nonfinite = 0;
  std::uint32_t largest = 0;
  constexpr std::size_t kBlock = std::size_t{1} << 20;
  for (std::size_t begin = 0; begin < n; begin += kBlock) {
    const std::size_t end = std::min(n, begin + kBlock);
    std::uint32_t bad = 0;
    for (std::size_t i = begin; i < end; ++i) {
      std::uint32_t gradient_bits;
      std::memcpy(&gradient_bits, g + i, 4);
      bad += static_cast<std::uint32_t>((gradient_bits & 0x7f800000u) == 0x7f800000u);
      const float v = kResidual ? g[i] + r[i] : g[i];
      std::uint32_t bits;
      std::memcpy(&bits, &v, 4);
      bits &= 0x7fffffffu;
      largest = std::max(largest, bits < 0x7f800000u ? bits : 0u);
    }
    nonfinite += bad;
  }
  largest_bits = largest;
  return nonfinite;
}

#if defined(__x86_64__)
// The same with AVX2 intrinsics (GCC leaves the two reductions of the loop above scalar).
template <bool kResidual>
__attribute__((target("avx2"))) std::size_t scan_magnitudes_avx2(const float* g, const float* r,
                                                                 std::size_t n,
                                                                 std::uint32_t& largest_bits) {
  const __m256i exponent = _mm256_set1_epi32(0x7f800000);
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
  __m256i largest8 = _mm256_setzero_si256();
  __m256i bad8 = _mm256_setzero_si256();
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gradient = _mm256_loadu_ps(g + i);
    const __m256i gradient_bits = _mm256_castps_si256(gradient);
    // cmpeq gives -1 per non-finite lane: subtracting counts them.
    bad8 = _mm256_sub_epi32(
        bad8, _mm256_cmpeq_epi32(_mm256_and_si256(gradient_bits, exponent), exponent));
    const __m256 v = kResidual ? _mm256_add_ps(gradient, _mm256_loadu_ps(r + i)) : gradient;
    const __m256i bits = _mm256_and_si256(_mm256_castps_si256(v), magnitude);
    const __m256i finite = _mm256_cmpgt_epi32(exponent, bits);  // both below 2^31: signed is fine
    largest8 = _mm256_max_epu32(largest8, _mm256_and_si256(bits, finite));
  }
  alignas(32) std::uint32_t largest_lanes[8], bad_lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(largest_lanes), largest8);
  _mm256_store_si256(reinterpret_cast<__m256i*>(bad_lanes), bad8);
  std::uint32_t tail_largest = 0;
  std::size_t nonfinite =
      scan_magnitudes_body<kResidual>(g + i, r == nullptr ? nullptr : r + i, n - i, tail_largest);
  for (int lane = 0; lane < 8; ++lane) {
    tail_largest = std::max(tail_largest, largest_lanes[lane]);
    nonfinite += bad_lanes[lane];
  }
  largest_bits = tail_largest;
  return nonfinite;
}
bool has_avx2() noexcept;
#endif

template <bool kResidual>
std::size_t scan_magnitudes(const float* g, const float* r, std::size_t n,
                            std::uint32_t& largest_bits) {
#if defined(__x86_64__)
  if (has_avx2()) return scan_magnitudes_avx2<kResidual>(g, r, n, largest_bits);
#endif
  return scan_magnitudes_body<kResidual>(g, r, n, largest_bits);
}

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

class HalfCompressor final : public DenseCompressor {
 public:
  HalfCompressor(CompressionSpec spec, bool bf16) : DenseCompressor(std::move(spec)), bf16_(bf16) {}
  std::string_view name() const noexcept override { return bf16_ ? "bf16" : "fp16"; }
  std::size_t wire_bytes(std::size_t n) const noexcept override { return 4 + 2 * n; }

  CompressResult compress(std::span<const float> g, std::span<float> r, std::uint64_t,
                          std::span<std::byte> wire) const override {
    check_sizes(g.size(), r, wire.size(), wire_bytes(g.size()), bf16_ ? "bf16" : "fp16");
    CompressResult result{wire_bytes(g.size()), 0};
    if (bf16_) {
      // f32's range: no scaling, so one pass after the count of non-finite values.
      result.nonfinite = count_nonfinite(g);
      put(wire, 0, 1.0f);
      to_bf16_with_feedback(g, r, wire.subspan(4), !r.empty() && result.nonfinite == 0);
      return result;
    }
    // One pass for the largest finite magnitude and the non-finite count, on the bits
    // (vectorised): for non-negative floats the bit patterns order as the values do, and finite
    // ones lie below the exponent's all-ones.
    std::uint32_t largest_bits = 0;
    if (r.empty()) {
      result.nonfinite = scan_magnitudes<false>(g.data(), nullptr, g.size(), largest_bits);
    } else {
      result.nonfinite = scan_magnitudes<true>(g.data(), r.data(), g.size(), largest_bits);
    }
    float largest;
    std::memcpy(&largest, &largest_bits, 4);
    // f16 tops out at 65504: scale down only what would overflow (bf16 has f32's range).
    const float scale = (!bf16_ && largest > 32768.0f) ? 32768.0f / largest : 1.0f;
    put(wire, 0, scale);
    const bool update = !r.empty() && result.nonfinite == 0;
#if defined(__x86_64__)
    // (scale is 1 or 32768/largest: dividing by it or multiplying by its inverse differ by at
    // most an ulp, well inside the format's own rounding.)
    if (!bf16_ && has_f16c()) {
      to_f16_with_feedback(g.data(), r.empty() ? nullptr : r.data(), wire.data() + 4, g.size(),
                           scale, update);
      return result;
    }
#endif
    for (std::size_t i = 0; i < g.size(); ++i) {
      const float v = corrected(g, r, i);
      const std::uint16_t h = bf16_ ? f32_to_bf16(v * scale) : f32_to_f16(v * scale);
      put(wire, 4 + 2 * i, h);
      if (update) r[i] = v - (bf16_ ? bf16_to_f32(h) : f16_to_f32(h)) / scale;
    }
    return result;
  }

 private:
  void expand(std::span<const std::byte> wire, std::span<float> out, bool add) const override {
    const float scale = get<float>(wire, 0);
#if defined(__x86_64__)
    if (!bf16_ && has_f16c()) {
      from_f16(wire.data() + 4, out.data(), out.size(), scale, add);
      return;
    }
#endif
    if (bf16_) {
      from_bf16(wire.subspan(4), out, add);  // (the scale is always 1)
      return;
    }
    for (std::size_t i = 0; i < out.size(); ++i) {
      const auto h = get<std::uint16_t>(wire, 4 + 2 * i);
      out[i] = (add ? out[i] : 0.0f) + f16_to_f32(h) / scale;
    }
  }

  // bf16 is f32's upper half: rounding to nearest even and quieting NaN are integer operations,
  // written branch-free over blocks so that the compiler vectorises them.
  static constexpr std::size_t kBlock = 512;
  static void to_bf16_with_feedback(std::span<const float> g, std::span<float> r,
                                    std::span<std::byte> wire, bool update) {
    std::uint16_t block[kBlock];
    for (std::size_t begin = 0; begin < g.size(); begin += kBlock) {
      const std::size_t n = std::min(kBlock, g.size() - begin);
      const float* gp = g.data() + begin;
      float* rp = r.empty() ? nullptr : r.data() + begin;
      for (std::size_t i = 0; i < n; ++i) {
        const float v = rp != nullptr ? gp[i] + rp[i] : gp[i];
        std::uint32_t bits;
        std::memcpy(&bits, &v, 4);
        const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
        const std::uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
        const std::uint32_t h = nan ? ((bits >> 16) | 0x40u) : rounded;
        block[i] = static_cast<std::uint16_t>(h);
        if (update) {
          const std::uint32_t back_bits = h << 16;
          float back;
          std::memcpy(&back, &back_bits, 4);
          rp[i] = v - back;
        }
      }
      std::memcpy(wire.data() + 2 * begin, block, 2 * n);
    }
  }
  static void from_bf16(std::span<const std::byte> wire, std::span<float> out, bool add) {
    std::uint16_t block[kBlock];
    for (std::size_t begin = 0; begin < out.size(); begin += kBlock) {
      const std::size_t n = std::min(kBlock, out.size() - begin);
      std::memcpy(block, wire.data() + 2 * begin, 2 * n);
      float* o = out.data() + begin;
      for (std::size_t i = 0; i < n; ++i) {
        const std::uint32_t bits = static_cast<std::uint32_t>(block[i]) << 16;
        float value;
        std::memcpy(&value, &bits, 4);
        o[i] = add ? o[i] + value : value;
      }
    }
  }

  bool bf16_;
};

// int8's code for one value: stochastic rounding, floor(v / scale + u) with u uniform in [0, 1),
// unbiased in expectation; a non-finite value codes as 0. The scalar loop and the AVX2 chunk's
// tail share it, so their codes cannot drift apart.
inline std::int8_t int8_code(float v, float scale, float u) noexcept {
  const float x = std::isfinite(v) ? v / scale : 0.0f;
  return static_cast<std::int8_t>(std::clamp(std::floor(x + u), -127.0f, 127.0f));
}

#if defined(__x86_64__)
// 64-bit products, 4 lanes: AVX2 multiplies only 32 x 32 -> 64, so three of those.
__attribute__((target("avx2"), always_inline)) inline __m256i multiply_u64(__m256i a,
                                                                           std::uint64_t c) {
  const __m256i low = _mm256_set1_epi64x(static_cast<long long>(c & 0xffffffffu));
  const __m256i high = _mm256_set1_epi64x(static_cast<long long>(c >> 32));
  const __m256i cross =
      _mm256_add_epi64(_mm256_mul_epu32(_mm256_srli_epi64(a, 32), low), _mm256_mul_epu32(a, high));
  return _mm256_add_epi64(_mm256_mul_epu32(a, low), _mm256_slli_epi64(cross, 32));
}

// splitmix64 (unimsg/mix.hpp) on 4 lanes: integer operations, so bit for bit the scalar one.
__attribute__((target("avx2"), always_inline)) inline __m256i splitmix64_4(__m256i x) {
  x = _mm256_add_epi64(x, _mm256_set1_epi64x(static_cast<long long>(0x9e3779b97f4a7c15ull)));
  x = multiply_u64(_mm256_xor_si256(x, _mm256_srli_epi64(x, 30)), 0xbf58476d1ce4e5b9ull);
  x = multiply_u64(_mm256_xor_si256(x, _mm256_srli_epi64(x, 27)), 0x94d049bb133111ebull);
  return _mm256_xor_si256(x, _mm256_srli_epi64(x, 31));
}

// detail::format::uniform01 for the 8 indices first .. first + 7, `base` being its inner
// splitmix64(seed ^ splitmix64(step)).
__attribute__((target("avx2"), always_inline)) inline __m256 uniform01_8(std::uint64_t base,
                                                                         std::uint64_t first) {
  const __m256i start = _mm256_set1_epi64x(static_cast<long long>(base + first));
  const __m256i low4 = splitmix64_4(_mm256_add_epi64(start, _mm256_setr_epi64x(0, 1, 2, 3)));
  const __m256i high4 = splitmix64_4(_mm256_add_epi64(start, _mm256_setr_epi64x(4, 5, 6, 7)));
  // The top 24 bits of each, as 32-bit lanes in index order: (0 1 4 5 | 2 3 6 7), then the
  // middle 64-bit blocks swapped.
  const __m256i mixed = _mm256_castps_si256(_mm256_shuffle_ps(
      _mm256_castsi256_ps(_mm256_srli_epi64(low4, 40)),
      _mm256_castsi256_ps(_mm256_srli_epi64(high4, 40)), _MM_SHUFFLE(2, 0, 2, 0)));
  const __m256i ordered = _mm256_permute4x64_epi64(mixed, _MM_SHUFFLE(3, 1, 2, 0));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(ordered), _mm256_set1_ps(1.0f / 16777216.0f));
}

// One int8 chunk (n <= kInt8Chunk values from `first` on): the scalar loop's operations in the
// same order, 8 values at a time (IEEE division, floor and clamp are exact per lane), so the
// wire and the residual are bit for bit the scalar ones (and the CUDA kernel's).
__attribute__((target("avx2"))) void int8_chunk(const float* g, float* r, std::byte* at,
                                                std::size_t n, std::uint64_t base,
                                                std::uint64_t first, bool update) {
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
  const __m256i exponent = _mm256_set1_epi32(0x7f800000);
  __m256i largest8 = _mm256_setzero_si256();
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(g + i);
    if (r != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(r + i));
    const __m256i bits = _mm256_and_si256(_mm256_castps_si256(v), magnitude);
    const __m256i finite = _mm256_cmpgt_epi32(exponent, bits);
    largest8 = _mm256_max_epu32(largest8, _mm256_and_si256(bits, finite));
  }
  alignas(32) std::uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), largest8);
  float largest = 0;
  for (const std::uint32_t lane : lanes) largest = std::max(largest, std::bit_cast<float>(lane));
  for (std::size_t j = i; j < n; ++j) {
    const float v = r != nullptr ? g[j] + r[j] : g[j];
    if (std::isfinite(v)) largest = std::max(largest, std::fabs(v));
  }
  const float scale = largest > 0 ? largest / 127.0f : 1.0f;
  std::memcpy(at, &scale, 4);
  std::byte* codes = at + 4;
  const __m256 scale8 = _mm256_set1_ps(scale);
  const __m256 top = _mm256_set1_ps(127.0f);
  const __m256 bottom = _mm256_set1_ps(-127.0f);
  for (i = 0; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(g + i);
    if (r != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(r + i));
    const __m256 finite = _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(exponent, _mm256_and_si256(_mm256_castps_si256(v), magnitude)));
    const __m256 x = _mm256_and_ps(_mm256_div_ps(v, scale8), finite);  // non-finite: 0
    const __m256 q = _mm256_min_ps(
        _mm256_max_ps(_mm256_floor_ps(_mm256_add_ps(x, uniform01_8(base, first + i))), bottom),
        top);
    const __m256i q32 = _mm256_cvttps_epi32(q);
    const __m128i q16 =
        _mm_packs_epi32(_mm256_castsi256_si128(q32), _mm256_extracti128_si256(q32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), _mm_packs_epi16(q16, q16));
    if (update) _mm256_storeu_ps(r + i, _mm256_sub_ps(v, _mm256_mul_ps(q, scale8)));
  }
  for (; i < n; ++i) {
    const float v = r != nullptr ? g[i] + r[i] : g[i];
    const std::int8_t code = int8_code(v, scale, detail::format::uniform01_from(base, first + i));
    std::memcpy(codes + i, &code, 1);
    if (update) r[i] = v - static_cast<float>(code) * scale;
  }
}

#endif

class Int8Compressor final : public DenseCompressor {
 public:
  explicit Int8Compressor(CompressionSpec spec) : DenseCompressor(std::move(spec)) {}
  std::string_view name() const noexcept override { return "int8"; }
  std::size_t wire_bytes(std::size_t n) const noexcept override {
    return detail::format::int8_wire_bytes(n);
  }
  static std::size_t chunk_offset(std::size_t chunk) {
    return chunk * detail::format::kInt8ChunkBytes;
  }
  std::size_t block_elements() const noexcept override { return kInt8Chunk; }

  CompressResult compress(std::span<const float> g, std::span<float> r, std::uint64_t step,
                          std::span<std::byte> wire) const override {
    check_sizes(g.size(), r, wire.size(), wire_bytes(g.size()), "int8");
    CompressResult result{wire_bytes(g.size()), count_nonfinite(g)};
    const bool update = !r.empty() && result.nonfinite == 0;
    for (std::size_t begin = 0, chunk = 0; begin < g.size(); begin += kInt8Chunk, ++chunk) {
      const std::size_t end = std::min(g.size(), begin + kInt8Chunk);
#if defined(__x86_64__)
      if (has_avx2()) {
        // (A counter-based draw per value made this a scalar loop at 0.6 GB/s.)
        int8_chunk(g.data() + begin, r.empty() ? nullptr : r.data() + begin,
                   wire.data() + chunk_offset(chunk), end - begin,
                   detail::format::uniform01_base(spec_.seed, step), begin, update);
        continue;
      }
#endif
      float largest = 0;
      for (std::size_t i = begin; i < end; ++i) {
        const float v = corrected(g, r, i);
        if (std::isfinite(v)) largest = std::max(largest, std::fabs(v));
      }
      const float scale = largest > 0 ? largest / 127.0f : 1.0f;
      const std::size_t at = chunk_offset(chunk);
      put(wire, at, scale);
      for (std::size_t i = begin; i < end; ++i) {
        const float v = corrected(g, r, i);
        const std::int8_t code = int8_code(v, scale, uniform01(spec_.seed, step, i));
        put(wire, at + 4 + (i - begin), code);
        if (update) r[i] = v - static_cast<float>(code) * scale;
      }
    }
    return result;
  }

 private:
  void expand(std::span<const std::byte> wire, std::span<float> out, bool add) const override {
    for (std::size_t begin = 0, chunk = 0; begin < out.size(); begin += kInt8Chunk, ++chunk) {
      const std::size_t at = chunk_offset(chunk);
      const float scale = get<float>(wire, at);
      const std::size_t end = std::min(out.size(), begin + kInt8Chunk);
      const auto* codes = reinterpret_cast<const std::int8_t*>(wire.data() + at + 4);
      float* o = out.data() + begin;
      if (add) {
        for (std::size_t i = 0; i < end - begin; ++i) o[i] += static_cast<float>(codes[i]) * scale;
      } else {
        for (std::size_t i = 0; i < end - begin; ++i) o[i] = static_cast<float>(codes[i]) * scale;
      }
    }
  }
};

#if defined(__x86_64__)
// One chunk of onebit with AVX2: the root mean square, then 8 signs per movemask and the
// residual.
__attribute__((target("avx2"))) float onebit_chunk(const float* g, float* r, std::byte* bits,
                                                   std::size_t n, bool update) {
  // Four sums: with one, each addition waits for the one before (the chain, not the loads,
  // was what a chunk cost).
  __m256 sums[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                    _mm256_setzero_ps()};
  std::size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int k = 0; k < 4; ++k) {
      __m256 v = _mm256_loadu_ps(g + i + 8 * k);
      if (r != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(r + i + 8 * k));
      sums[k] = _mm256_add_ps(sums[k], _mm256_mul_ps(v, v));
    }
  }
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(g + i);
    if (r != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(r + i));
    sums[0] = _mm256_add_ps(sums[0], _mm256_mul_ps(v, v));
  }
  const __m256 sum8 =
      _mm256_add_ps(_mm256_add_ps(sums[0], sums[1]), _mm256_add_ps(sums[2], sums[3]));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sum8);
  double sum = 0;
  for (float lane : lanes) sum += lane;
  for (std::size_t j = i; j < n; ++j) {
    const float v = r != nullptr ? g[j] + r[j] : g[j];
    sum += static_cast<double>(v) * v;
  }
  const float scale = static_cast<float>(std::sqrt(sum / static_cast<double>(n)));
  const __m256 plus = _mm256_set1_ps(scale);
  const __m256 minus = _mm256_set1_ps(-scale);
  const __m256 zero = _mm256_setzero_ps();
  std::memset(bits, 0, (n + 7) / 8);
  for (i = 0; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(g + i);
    if (r != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(r + i));
    const __m256 negative = _mm256_cmp_ps(v, zero, _CMP_LT_OQ);  // 0, -0 and NaN: positive
    bits[i / 8] = std::byte{static_cast<unsigned char>(~_mm256_movemask_ps(negative) & 0xff)};
    if (update) _mm256_storeu_ps(r + i, _mm256_sub_ps(v, _mm256_blendv_ps(plus, minus, negative)));
  }
  for (std::size_t j = i; j < n; ++j) {
    const float v = r != nullptr ? g[j] + r[j] : g[j];
    const bool positive = !(v < 0);
    if (positive) bits[j / 8] |= std::byte{static_cast<unsigned char>(1u << (j % 8))};
    if (update) r[j] = v - (positive ? scale : -scale);
  }
  return scale;
}

// Eight signs of a byte to eight floats at once: each lane tests its own bit.
__attribute__((target("avx2"))) void onebit_expand_chunk(const unsigned char* bits, float scale,
                                                         float* out, std::size_t n, bool add) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 plus = _mm256_set1_ps(scale);
  const __m256 minus = _mm256_set1_ps(-scale);
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i byte = _mm256_set1_epi32(bits[i / 8]);
    const __m256 set =
        _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(byte, lane_bit), lane_bit));
    __m256 value = _mm256_blendv_ps(minus, plus, set);
    if (add) value = _mm256_add_ps(value, _mm256_loadu_ps(out + i));
    _mm256_storeu_ps(out + i, value);
  }
  for (; i < n; ++i) {
    const float value = ((bits[i / 8] >> (i % 8)) & 1u) ? scale : -scale;
    out[i] = add ? out[i] + value : value;
  }
}

bool has_avx2() noexcept {
  static const bool supported = __builtin_cpu_supports("avx2");
  return supported;
}
#endif

class OneBitCompressor final : public DenseCompressor {
 public:
  explicit OneBitCompressor(CompressionSpec spec) : DenseCompressor(std::move(spec)) {}
  std::string_view name() const noexcept override { return "onebit"; }
  static constexpr std::size_t kChunkBytes = detail::format::kOneBitChunkBytes;
  std::size_t block_elements() const noexcept override { return kOneBitChunk; }
  std::size_t wire_bytes(std::size_t n) const noexcept override {
    return detail::format::onebit_wire_bytes(n);
  }

  CompressResult compress(std::span<const float> g, std::span<float> r, std::uint64_t,
                          std::span<std::byte> wire) const override {
    check_sizes(g.size(), r, wire.size(), wire_bytes(g.size()), "onebit");
    CompressResult result{wire_bytes(g.size()), count_nonfinite(g)};
    const bool update = !r.empty() && result.nonfinite == 0;
    for (std::size_t begin = 0, chunk = 0; begin < g.size(); begin += kOneBitChunk, ++chunk) {
      const std::size_t end = std::min(g.size(), begin + kOneBitChunk);
#if defined(__x86_64__)
      if (has_avx2()) {
        const std::size_t at = chunk * kChunkBytes;
        const float scale = onebit_chunk(g.data() + begin, r.empty() ? nullptr : r.data() + begin,
                                         wire.data() + at + 4, end - begin, update);
        put(wire, at, scale);
        std::memset(wire.data() + at + 4 + (end - begin + 7) / 8, 0,
                    kOneBitChunk / 8 - (end - begin + 7) / 8);
        continue;
      }
#endif
      // (The caller skips a step with NaN/Inf anyway: no finiteness test in this hot loop.)
      double sum = 0;
      for (std::size_t i = begin; i < end; ++i) {
        const float v = r.empty() ? g[i] : g[i] + r[i];
        sum += static_cast<double>(v) * v;
      }
      const float scale = static_cast<float>(std::sqrt(sum / static_cast<double>(end - begin)));
      const std::size_t at = chunk * kChunkBytes;
      put(wire, at, scale);
      std::byte* bits = wire.data() + at + 4;
      std::memset(bits, 0, kOneBitChunk / 8);
      const float* gp = g.data();
      float* rp = r.empty() ? nullptr : r.data();
      for (std::size_t i = begin; i < end; i += 8) {
        unsigned byte = 0;
        const std::size_t stop = std::min(end, i + 8);
        for (std::size_t j = i; j < stop; ++j) {
          const float v = rp != nullptr ? gp[j] + rp[j] : gp[j];
          const bool positive = !(v < 0);  // 0 (and NaN) map to +scale, by definition
          byte |= static_cast<unsigned>(positive) << (j - i);
          if (update) rp[j] = v - (positive ? scale : -scale);
        }
        bits[(i - begin) / 8] = std::byte{static_cast<unsigned char>(byte)};
      }
    }
    return result;
  }

 private:
  void expand(std::span<const std::byte> wire, std::span<float> out, bool add) const override {
    for (std::size_t begin = 0, chunk = 0; begin < out.size(); begin += kOneBitChunk, ++chunk) {
      const std::size_t at = chunk * kChunkBytes;
      const float scale = get<float>(wire, at);
      const std::size_t n = std::min(out.size(), begin + kOneBitChunk) - begin;
      const auto* bits = reinterpret_cast<const unsigned char*>(wire.data() + at + 4);
      float* o = out.data() + begin;
#if defined(__x86_64__)
      if (has_avx2()) {
        onebit_expand_chunk(bits, scale, o, n, add);
        continue;
      }
#endif
      // Eight elements per byte, branch-free, so that the compiler vectorises the inner loop.
      std::size_t i = 0;
      for (; i + 8 <= n; i += 8) {
        const unsigned byte = bits[i / 8];
        for (unsigned b = 0; b < 8; ++b) {
          const float value =
              static_cast<float>(static_cast<int>((byte >> b) & 1u) * 2 - 1) * scale;
          o[i + b] = add ? o[i + b] + value : value;
        }
      }
      for (; i < n; ++i) {
        const float value = ((bits[i / 8] >> (i % 8)) & 1u) ? scale : -scale;
        o[i] = add ? o[i] + value : value;
      }
    }
  }
};

class TopKCompressor final : public Compressor {
 public:
  explicit TopKCompressor(CompressionSpec spec) : Compressor(std::move(spec)) {}
  std::string_view name() const noexcept override { return "topk"; }
  std::size_t wire_bytes(std::size_t n) const noexcept override {
    return 4 + 8 * k_of(spec_.ratio, n);
  }

  CompressResult compress(std::span<const float> g, std::span<float> r, std::uint64_t step,
                          std::span<std::byte> wire) const override {
    check_sizes(g.size(), r, wire.size(), wire_bytes(g.size()), "topk");
    CompressResult result{wire_bytes(g.size()), count_nonfinite(g)};
    const std::size_t n = g.size();
    const std::size_t k = k_of(spec_.ratio, n);
    std::vector<float> values(n);
    for (std::size_t i = 0; i < n; ++i) {
      const float v = corrected(g, r, i);
      values[i] = std::isfinite(v) ? v : 0.0f;
    }
    std::vector<std::uint32_t> chosen;
    chosen.reserve(k);
    const auto magnitude = [&](std::uint32_t i) { return std::fabs(values[i]); };
    if (spec_.sampled && n > 4 * k) {
      // DGC: estimate the k-th largest magnitude from a sample, take what lies above it, and
      // trim (or top up) to exactly k from those candidates.
      const std::size_t samples = std::min<std::size_t>(n, std::max<std::size_t>(k * 8, 1024));
      std::vector<float> sample(samples);
      for (std::size_t s = 0; s < samples; ++s) {
        sample[s] = std::fabs(values[mix(spec_.seed ^ mix(step) ^ s) % n]);
      }
      const std::size_t rank_in_sample = std::max<std::size_t>(1, samples * k / n);
      std::nth_element(sample.begin(),
                       sample.begin() + static_cast<std::ptrdiff_t>(rank_in_sample - 1),
                       sample.end(), std::greater<float>());
      const float threshold = sample[rank_in_sample - 1] * 0.8f;  // a margin: rather more than k
      for (std::uint32_t i = 0; i < n; ++i) {
        if (magnitude(i) >= threshold) chosen.push_back(i);
      }
    }
    if (chosen.size() < k) {  // exact selection (or the sample's threshold was too high)
      chosen.resize(n);
      std::iota(chosen.begin(), chosen.end(), 0u);
    }
    if (chosen.size() > k) {
      std::nth_element(chosen.begin(), chosen.begin() + static_cast<std::ptrdiff_t>(k - 1),
                       chosen.end(), [&](std::uint32_t a, std::uint32_t b) {
                         return magnitude(a) > magnitude(b) ||
                                (magnitude(a) == magnitude(b) && a < b);
                       });
      chosen.resize(k);
    }
    std::sort(chosen.begin(), chosen.end());
    put(wire, 0, static_cast<std::uint32_t>(k));
    const bool update = !r.empty() && result.nonfinite == 0;
    if (update) {
      for (std::size_t i = 0; i < n; ++i) r[i] = values[i];  // everything stays behind...
    }
    for (std::size_t j = 0; j < chosen.size(); ++j) {
      put(wire, 4 + 8 * j, chosen[j]);
      put(wire, 8 + 8 * j, values[chosen[j]]);
      if (update) r[chosen[j]] = 0;  // ...except what was sent
    }
    return result;
  }

  void decompress(std::span<const std::byte> wire, std::uint64_t step,
                  std::span<float> out) const override {
    std::fill(out.begin(), out.end(), 0.0f);
    decompress_add(wire, step, out);
  }

  void decompress_add(std::span<const std::byte> wire, std::uint64_t,
                      std::span<float> out) const override {
    if (wire.size() < 4) throw Error(kNoRank, "decompress topk", "the wire is shorter than k");
    const auto k = get<std::uint32_t>(wire, 0);
    if (wire.size() < 4 + 8 * static_cast<std::size_t>(k)) {
      throw Error(kNoRank, "decompress topk", "the wire is shorter than its k pairs");
    }
    for (std::size_t j = 0; j < k; ++j) {
      const auto index = get<std::uint32_t>(wire, 4 + 8 * j);
      if (index >= out.size()) {
        throw Error(kNoRank, "decompress topk",
                    "index " + std::to_string(index) + " is past the " +
                        std::to_string(out.size()) + " elements");
      }
      out[index] += get<float>(wire, 8 + 8 * j);
    }
  }
};

class RandomKCompressor final : public Compressor {
 public:
  explicit RandomKCompressor(CompressionSpec spec) : Compressor(std::move(spec)) {}
  std::string_view name() const noexcept override { return "randomk"; }
  std::size_t wire_bytes(std::size_t n) const noexcept override { return 4 * k_of(spec_.ratio, n); }

  CompressResult compress(std::span<const float> g, std::span<float> r, std::uint64_t step,
                          std::span<std::byte> wire) const override {
    check_sizes(g.size(), r, wire.size(), wire_bytes(g.size()), "randomk");
    CompressResult result{wire_bytes(g.size()), count_nonfinite(g)};
    const auto positions =
        randomk_positions(g.size(), k_of(spec_.ratio, g.size()), spec_.seed, step);
    const bool update = !r.empty() && result.nonfinite == 0;
    if (update) {
      for (std::size_t i = 0; i < g.size(); ++i) r[i] = corrected(g, r, i);
    }
    for (std::size_t j = 0; j < positions.size(); ++j) {
      const std::size_t i = positions[j];
      put(wire, 4 * j, update ? r[i] : corrected(g, r, i));
      if (update) r[i] = 0;
    }
    return result;
  }

  void decompress(std::span<const std::byte> wire, std::uint64_t step,
                  std::span<float> out) const override {
    std::fill(out.begin(), out.end(), 0.0f);
    const auto positions =
        randomk_positions(out.size(), k_of(spec_.ratio, out.size()), spec_.seed, step);
    for (std::size_t j = 0; j < positions.size(); ++j) out[positions[j]] = get<float>(wire, 4 * j);
  }
};

class NoCompressor final : public Compressor {
 public:
  explicit NoCompressor(CompressionSpec spec) : Compressor(std::move(spec)) {}
  std::string_view name() const noexcept override { return "none"; }
  std::size_t wire_bytes(std::size_t n) const noexcept override { return 4 * n; }
  CompressResult compress(std::span<const float> g, std::span<float>, std::uint64_t,
                          std::span<std::byte> wire) const override {
    check_sizes(g.size(), {}, wire.size(), wire_bytes(g.size()), "none");
    if (!g.empty()) std::memcpy(wire.data(), g.data(), 4 * g.size());
    return {wire_bytes(g.size()), count_nonfinite(g)};
  }
  void decompress(std::span<const std::byte> wire, std::uint64_t,
                  std::span<float> out) const override {
    if (!out.empty()) std::memcpy(out.data(), wire.data(), 4 * out.size());
  }
};

}  // namespace

void Compressor::decompress_add(std::span<const std::byte> wire, std::uint64_t step,
                                std::span<float> out) const {
  std::vector<float> values(out.size());
  decompress(wire, step, values);
  for (std::size_t i = 0; i < out.size(); ++i) out[i] += values[i];
}

std::vector<std::uint32_t> randomk_positions(std::size_t count, std::size_t k, std::uint64_t seed,
                                             std::uint64_t step) {
  // Floyd's algorithm: k distinct positions with k draws, the same everywhere for (seed, step).
  std::vector<std::uint32_t> picked;
  picked.reserve(k);
  std::vector<char> taken(count, 0);
  std::uint64_t state = mix(seed ^ mix(step + 0x5151));
  for (std::size_t j = count - k; j < count; ++j) {
    state = mix(state);
    const auto t = static_cast<std::uint32_t>(state % (j + 1));
    const auto choice = taken[t] ? static_cast<std::uint32_t>(j) : t;
    taken[choice] = 1;
    picked.push_back(choice);
  }
  std::sort(picked.begin(), picked.end());
  return picked;
}

std::string CompressionSpec::to_string() const {
  std::string text = name;
  if (name == "topk" || name == "randomk") {
    char ratio_text[32];
    std::snprintf(ratio_text, sizeof ratio_text, ":%.17g", ratio);
    text += ratio_text;
  }
  // (Appended piece by piece: GCC 12 warns, wrongly, on ":" + std::to_string(...) here.)
  if (name == "powersgd") text.append(":").append(std::to_string(powersgd_rank));
  if (matrix_rows != 0) text.append(":rows=").append(std::to_string(matrix_rows));
  if (sampled) text += ":sampled";
  if (!error_feedback) text += ":noef";
  if (seed != 0) text.append(":seed=").append(std::to_string(seed));
  return text;
}

CompressionSpec CompressionSpec::parse(std::string_view text) {
  CompressionSpec spec;
  std::size_t start = 0;
  bool first = true;
  while (start <= text.size()) {
    const std::size_t colon = std::min(text.find(':', start), text.size());
    const std::string part(text.substr(start, colon - start));
    if (first) {
      static const char* kNames[] = {"none",   "fp16", "bf16",    "int8",
                                     "onebit", "topk", "randomk", "powersgd"};
      if (std::find(std::begin(kNames), std::end(kNames), part) == std::end(kNames)) {
        throw ConfigError(kNoRank, "compression",
                          "'" + part +
                              "' is not one of none, fp16, bf16, int8, onebit, topk, "
                              "randomk, powersgd");
      }
      spec.name = part;
      first = false;
    } else if (part == "sampled") {
      spec.sampled = true;
    } else if (part == "noef") {
      spec.error_feedback = false;
    } else if (part.rfind("seed=", 0) == 0) {
      try {
        spec.seed = std::stoull(part.substr(5));
      } catch (const std::exception&) {
        throw ConfigError(kNoRank, "compression", "bad seed in '" + std::string(text) + "'");
      }
    } else if (spec.name == "powersgd" && part.rfind("rows=", 0) == 0) {
      char* end = nullptr;
      const unsigned long long rows = std::strtoull(part.c_str() + 5, &end, 10);
      if (end != part.c_str() + part.size() || part.size() == 5 || rows == 0) {
        throw ConfigError(kNoRank, "compression",
                          "'" + part + "' in '" + std::string(text) + "' is not rows=N, N >= 1");
      }
      spec.matrix_rows = static_cast<std::size_t>(rows);
    } else if (spec.name == "powersgd") {
      char* end = nullptr;
      const long rank = std::strtol(part.c_str(), &end, 10);
      if (part.empty() || end != part.c_str() + part.size() || rank < 1 || rank > 256) {
        throw ConfigError(kNoRank, "compression",
                          "'" + part + "' in '" + std::string(text) +
                              "' is not a PowerSGD rank from 1 to 256, 'noef' or 'seed=N'");
      }
      spec.powersgd_rank = static_cast<int>(rank);
    } else {
      char* end = nullptr;
      const double ratio = std::strtod(part.c_str(), &end);
      if (part.empty() || end != part.c_str() + part.size() || !(ratio > 0 && ratio <= 1)) {
        throw ConfigError(kNoRank, "compression",
                          "'" + part + "' in '" + std::string(text) +
                              "' is not a ratio in (0, 1], 'sampled', 'noef' or 'seed=N'");
      }
      spec.ratio = ratio;
    }
    start = colon + 1;
  }
  return spec;
}

std::unique_ptr<Compressor> make_cpu_compressor(const CompressionSpec& spec) {
  if (spec.name == "none") return std::make_unique<NoCompressor>(spec);
  if (spec.name == "fp16") return std::make_unique<HalfCompressor>(spec, false);
  if (spec.name == "bf16") return std::make_unique<HalfCompressor>(spec, true);
  if (spec.name == "int8") return std::make_unique<Int8Compressor>(spec);
  if (spec.name == "onebit") return std::make_unique<OneBitCompressor>(spec);
  if (spec.name == "topk") return std::make_unique<TopKCompressor>(spec);
  if (spec.name == "randomk") return std::make_unique<RandomKCompressor>(spec);
  if (spec.name == "powersgd") {
    throw ConfigError(kNoRank, "compression",
                      "powersgd needs the ranks between its stages: use it through "
                      "CompressedAllreduce or the engine (PowerSgd holds its steps)");
  }
  throw ConfigError(kNoRank, "compression", "unknown compressor '" + spec.name + "'");
}

}  // namespace unimsg
