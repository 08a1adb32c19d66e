// The CPU compressors' shared non-inline parts: the size checks, the run-time CPU feature checks
// and the non-finite count (public: count_nonfinite in compressor.hpp).

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu_support.hpp"

namespace unimsg {
namespace detail {

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

#if defined(__x86_64__)
namespace {
// UNIMSG_CPU_SIMD=off turns the AVX2/F16C paths off (the portable ones give the same bits:
// kernels_unit_portable checks that).
bool simd_allowed() noexcept {
  const char* value = std::getenv("UNIMSG_CPU_SIMD");
  return value == nullptr || (std::strcmp(value, "off") != 0 && std::strcmp(value, "0") != 0);
}
}  // namespace

bool has_avx2() noexcept {
  static const bool supported = simd_allowed() && __builtin_cpu_supports("avx2");
  return supported;
}

bool has_f16c() noexcept {
  // (clang's __builtin_cpu_supports knows no "f16c": ask cpuid, leaf 1, ECX bit 29.)
  static const bool supported = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return simd_allowed() && __builtin_cpu_supports("avx2") &&
           __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & (1u << 29)) != 0;
  }();
  return supported;
}
#endif

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
}  // namespace detail

std::size_t count_nonfinite(std::span<const float> gradient) noexcept {
#if defined(__x86_64__)
  if (detail::has_avx2()) return detail::count_nonfinite_avx2(gradient.data(), gradient.size());
#endif
  return detail::count_nonfinite_portable(gradient.data(), gradient.size());
}

}  // namespace unimsg
