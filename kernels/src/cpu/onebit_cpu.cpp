// onebit: per chunk of 256 values an f32 scale (the chunk's root mean square), then 32 bytes of
// signs; AVX2 where the CPU has it.

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string_view>

#include "compress_format.hpp"
#include "cpu_support.hpp"
#include "element_math.hpp"

namespace unimsg::detail {
namespace {

using format::kOneBitChunk;

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
    const float v = math::corrected(g, r, j);
    sum += static_cast<double>(v) * static_cast<double>(v);
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
  for (std::size_t j = i; j < n; ++j) {  // the shared formulas, as the body computes them
    const float v = math::corrected(g, r, j);
    if (math::onebit_positive(v))
      bits[j / 8] |= std::byte{static_cast<unsigned char>(1u << (j % 8))};
    if (update) r[j] = math::onebit_residual(v, scale);
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
#endif

class OneBitCompressor final : public DenseCompressor {
 public:
  explicit OneBitCompressor(CompressionSpec spec) : DenseCompressor(std::move(spec)) {}
  std::string_view name() const noexcept override { return "onebit"; }
  static constexpr std::size_t kChunkBytes = format::kOneBitChunkBytes;
  std::size_t block_elements() const noexcept override { return kOneBitChunk; }
  std::size_t wire_bytes(std::size_t n) const noexcept override {
    return format::onebit_wire_bytes(n);
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
      // The AVX2 loop's summation order, element by element (element_math.hpp).
      const std::size_t n = end - begin;
      float values[kOneBitChunk];
      for (std::size_t i = 0; i < n; ++i) {
        values[i] = math::corrected(g.data(), r.empty() ? nullptr : r.data(), begin + i);
      }
      float lanes[math::kOneBitLanes];
      for (int lane = 0; lane < math::kOneBitLanes; ++lane) {
        lanes[lane] = math::onebit_lane_sum(values, n, lane);
      }
      const float scale = math::onebit_scale(lanes, values, n);
      const std::size_t at = chunk * kChunkBytes;
      put(wire, at, scale);
      std::byte* bits = wire.data() + at + 4;
      std::memset(bits, 0, kOneBitChunk / 8);
      for (std::size_t i = 0; i < n; i += 8) {
        unsigned byte = 0;
        for (std::size_t j = i; j < std::min(n, i + 8); ++j) {
          byte |= static_cast<unsigned>(math::onebit_positive(values[j])) << (j - i);
          if (update) r[begin + j] = math::onebit_residual(values[j], scale);
        }
        bits[i / 8] = std::byte{static_cast<unsigned char>(byte)};
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

}  // namespace

std::unique_ptr<Compressor> make_onebit_cpu(const CompressionSpec& spec) {
  return std::make_unique<OneBitCompressor>(spec);
}

}  // namespace unimsg::detail
