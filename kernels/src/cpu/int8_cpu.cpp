// int8: per chunk of 256 values an f32 scale (max|x|/127), then 256 codes rounded
// stochastically; the AVX2 chunk gives bit for bit the scalar loop's wire and residual.

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "compress_format.hpp"
#include "cpu_support.hpp"
#include "element_math.hpp"

namespace unimsg::detail {
namespace {

using format::kInt8Chunk;
using format::uniform01;

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

// format::uniform01 for the 8 indices first .. first + 7, `base` being its inner
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
    const float v = math::corrected(g, r, j);
    if (std::isfinite(v)) largest = std::max(largest, std::fabs(v));
  }
  const float scale = math::int8_scale(largest);
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
  for (; i < n; ++i) {  // the shared formulas, as the body computes them 8 at a time
    const float v = math::corrected(g, r, i);
    const std::int8_t code = math::int8_code(v, scale, format::uniform01_from(base, first + i));
    std::memcpy(codes + i, &code, 1);
    if (update) r[i] = math::int8_residual(v, code, scale);
  }
}

#endif

class Int8Compressor final : public DenseCompressor {
 public:
  explicit Int8Compressor(CompressionSpec spec) : DenseCompressor(std::move(spec)) {}
  std::string_view name() const noexcept override { return "int8"; }
  std::size_t wire_bytes(std::size_t n) const noexcept override {
    return format::int8_wire_bytes(n);
  }
  static std::size_t chunk_offset(std::size_t chunk) { return chunk * format::kInt8ChunkBytes; }
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
                   format::uniform01_base(spec_.seed, step), begin, update);
        continue;
      }
#endif
      const float* residual = r.empty() ? nullptr : r.data();
      float largest = 0;
      for (std::size_t i = begin; i < end; ++i) {
        const float v = math::corrected(g.data(), residual, i);
        if (std::isfinite(v)) largest = std::max(largest, std::fabs(v));
      }
      const float scale = math::int8_scale(largest);
      const std::size_t at = chunk_offset(chunk);
      put(wire, at, scale);
      for (std::size_t i = begin; i < end; ++i) {
        const float v = math::corrected(g.data(), residual, i);
        const std::int8_t code = math::int8_code(v, scale, uniform01(spec_.seed, step, i));
        put(wire, at + 4 + (i - begin), code);
        if (update) r[i] = math::int8_residual(v, code, scale);
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
        for (std::size_t i = 0; i < end - begin; ++i) {
          o[i] = math::accumulate(o[i], math::int8_decode(codes[i], scale), true);
        }
      } else {
        for (std::size_t i = 0; i < end - begin; ++i) o[i] = math::int8_decode(codes[i], scale);
      }
    }
  }
};

}  // namespace

std::unique_ptr<Compressor> make_int8_cpu(const CompressionSpec& spec) {
  return std::make_unique<Int8Compressor>(spec);
}

}  // namespace unimsg::detail
