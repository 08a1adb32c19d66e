// fp16 and bf16: an f32 scale, then one 16-bit value per element (F16C where the CPU has it).

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "compress_format.hpp"
#include "cpu_support.hpp"
#include "element_math.hpp"
#include "unimsg/kernels/cast.hpp"

namespace unimsg::detail {
namespace {

#if defined(__x86_64__)
// F16C converts 8 floats per instruction with IEEE round-to-nearest-even, NaN and infinity kept:
// the scalar reference's semantics at ~20x its speed. Chosen at run time.
// (A NaN keeps its payload here: compress() makes it canonical afterwards, when there is one.)
__attribute__((target("avx2,f16c"))) void to_f16_with_feedback(const float* g, float* r,
                                                               std::byte* wire, std::size_t n,
                                                               float scale, bool update) {
  const float inverse = math::fp16_inverse(scale);
  const __m256 scale8 = _mm256_set1_ps(scale);
  const __m256 inverse8 = _mm256_set1_ps(inverse);
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
  for (; i < n; ++i) {  // the shared formulas, as the body computes them 8 at a time
    const float v = math::corrected(g, r, i);
    const std::uint16_t h = math::fp16_encode(v, scale);
    std::memcpy(wire + 2 * i, &h, 2);
    if (update) r[i] = math::fp16_residual(v, h, inverse);
  }
}

__attribute__((target("avx2,f16c"))) void from_f16(const std::byte* wire, float* out, std::size_t n,
                                                   float scale, bool add) {
  const float inverse = math::fp16_inverse(scale);
  const __m256 inverse8 = _mm256_set1_ps(inverse);
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wire + 2 * i));
    __m256 v = _mm256_mul_ps(_mm256_cvtph_ps(h), inverse8);
    if (add) v = _mm256_add_ps(_mm256_loadu_ps(out + i), v);
    _mm256_storeu_ps(out + i, v);
  }
  for (; i < n; ++i) {
    std::uint16_t h;
    std::memcpy(&h, wire + 2 * i, 2);
    out[i] = math::accumulate(out[i], math::fp16_decode(h, inverse), add);
  }
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
#endif

template <bool kResidual>
std::size_t scan_magnitudes(const float* g, const float* r, std::size_t n,
                            std::uint32_t& largest_bits) {
#if defined(__x86_64__)
  if (has_avx2()) return scan_magnitudes_avx2<kResidual>(g, r, n, largest_bits);
#endif
  return scan_magnitudes_body<kResidual>(g, r, n, largest_bits);
}

class HalfCompressor final : public DenseCompressor {
 public:
  HalfCompressor(CompressionSpec spec, bool bf16) : DenseCompressor(std::move(spec)), bf16_(bf16) {}
  std::string_view name() const noexcept override { return bf16_ ? "bf16" : "fp16"; }
  std::size_t wire_bytes(std::size_t n) const noexcept override {
    return format::half_wire_bytes(n);
  }

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
    const float scale = math::fp16_scale(largest);
    put(wire, 0, scale);
    const bool update = !r.empty() && result.nonfinite == 0;
    const float* residual = r.empty() ? nullptr : r.data();
#if defined(__x86_64__)
    if (has_f16c()) {
      to_f16_with_feedback(g.data(), r.empty() ? nullptr : r.data(), wire.data() + 4, g.size(),
                           scale, update);
      // F16C keeps a NaN's payload, the device does not: the wire's NaN is canonical. (Only a
      // non-finite gradient makes a NaN: the residual stays finite.)
      for (std::size_t i = 0; result.nonfinite > 0 && i < g.size(); ++i) {
        if (math::is_nan(math::corrected(g.data(), residual, i)))
          put(wire, 4 + 2 * i, math::kF16NaN);
      }
      return result;
    }
#endif
    const float inverse = math::fp16_inverse(scale);
    for (std::size_t i = 0; i < g.size(); ++i) {
      const float v = math::corrected(g.data(), residual, i);
      const std::uint16_t h = math::fp16_encode(v, scale);
      put(wire, 4 + 2 * i, h);
      if (update) r[i] = math::fp16_residual(v, h, inverse);
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
    const float inverse = math::fp16_inverse(scale);
    for (std::size_t i = 0; i < out.size(); ++i) {
      const auto h = get<std::uint16_t>(wire, 4 + 2 * i);
      out[i] = math::accumulate(out[i], math::fp16_decode(h, inverse), add);
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
        const float v = math::corrected(gp, rp, i);
        const std::uint16_t h = math::bf16_encode(v);
        block[i] = h;
        if (update) rp[i] = math::bf16_residual(v, h);
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
      for (std::size_t i = 0; i < n; ++i)
        o[i] = math::accumulate(o[i], math::bf16_decode(block[i]), add);
    }
  }

  bool bf16_;
};

}  // namespace

std::unique_ptr<Compressor> make_half_cpu(const CompressionSpec& spec, bool bf16) {
  return std::make_unique<HalfCompressor>(spec, bf16);
}

}  // namespace unimsg::detail
