// The compressors' per-element arithmetic is one set of formulas for the CPU's scalar paths, its
// SIMD loops and the CUDA kernels (kernels/src/element_math.hpp). These tests state the formulas
// independently and check the CPU against them at lengths that exercise both the SIMD body and
// its scalar tail; kernels_unit_portable runs them again with UNIMSG_CPU_SIMD=off (the portable
// path), and gpu_compress checks the device against the CPU bit for bit.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include "unimsg/kernels/cast.hpp"
#include "unimsg/kernels/compressor.hpp"

namespace unimsg {
namespace {

std::uint32_t bits(float value) {
  std::uint32_t b;
  std::memcpy(&b, &value, 4);
  return b;
}

// The fp16 wire, stated: scale = 32768 / largest finite |v| when that exceeds 32768 (else 1);
// each value v * scale rounded to f16 (NaN: 0x7E00); decoded as f16 * (1 / scale); the residual
// v - decoded. Each step one IEEE rounding.
struct Fp16Expected {
  float scale = 1.0f;
  std::vector<std::uint16_t> halves;
  std::vector<float> residual, decoded;
};
Fp16Expected fp16_expected(const std::vector<float>& g, const std::vector<float>& r) {
  Fp16Expected e;
  float largest = 0;
  for (std::size_t i = 0; i < g.size(); ++i) {
    const float v = g[i] + r[i];
    if (std::isfinite(v)) largest = std::max(largest, std::fabs(v));
  }
  e.scale = largest > 32768.0f ? 32768.0f / largest : 1.0f;
  const float inverse = 1.0f / e.scale;
  for (std::size_t i = 0; i < g.size(); ++i) {
    const float v = g[i] + r[i];
    const float scaled = v * e.scale;
    const std::uint16_t h = std::isnan(scaled) ? 0x7e00 : f32_to_f16(scaled);
    const float decoded =
        std::isnan(scaled) ? std::numeric_limits<float>::quiet_NaN() : f16_to_f32(h) * inverse;
    e.halves.push_back(h);
    e.decoded.push_back(decoded);
    e.residual.push_back(v - decoded);
  }
  return e;
}

// A value at which dividing by the scale and multiplying by its inverse round apart: the CPU's
// scalar tail once divided where its SIMD body and the kernels multiply.
float divide_multiply_witness(float scale, std::mt19937& rng) {
  std::uniform_real_distribution<float> any(-60000.0f, 60000.0f);
  for (int tries = 0; tries < 1000000; ++tries) {
    const float v = any(rng);
    const float half = f16_to_f32(f32_to_f16(v * scale));
    if (half / scale != half * (1.0f / scale)) return v;
  }
  ADD_FAILURE() << "no value tells dividing by " << scale << " from multiplying by its inverse";
  return 1.0f;
}

TEST(ElementMathTest, Fp16IsOneFormulaInTheBodyAndTheTail) {
  auto fp16 = make_cpu_compressor(CompressionSpec::parse("fp16"));
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> wide(-1e5f, 1e5f), small(-1.0f, 1.0f);
  for (std::size_t n : {7u, 9u, 16u, 65537u}) {
    std::vector<float> g(n), r(n);
    for (auto& v : g) v = wide(rng);
    for (auto& v : r) v = small(rng);
    g[0] = 123457.0f;  // the largest: scale = 32768 / 123457 < 1
    r[0] = 0.0f;
    const float scale = 32768.0f / 123457.0f;
    g[n - 1] = divide_multiply_witness(scale, rng);  // in the tail (n % 8 != 0) or the body
    r[n - 1] = 0.0f;
    const auto expected = fp16_expected(g, r);
    ASSERT_EQ(expected.scale, scale);
    std::vector<std::byte> wire(fp16->wire_bytes(n));
    std::vector<float> residual = r;
    fp16->compress(g, residual, 1, wire);
    float wire_scale;
    std::memcpy(&wire_scale, wire.data(), 4);
    EXPECT_EQ(wire_scale, expected.scale) << n;
    std::vector<float> out(n, 5.0f);
    fp16->decompress(wire, 1, out);
    int wrong = 0;
    for (std::size_t i = 0; i < n && wrong < 5; ++i) {
      std::uint16_t h;
      std::memcpy(&h, wire.data() + 4 + 2 * i, 2);
      const bool ok = h == expected.halves[i] && bits(residual[i]) == bits(expected.residual[i]) &&
                      bits(out[i]) == bits(expected.decoded[i]);
      if (!ok) ++wrong;
      EXPECT_TRUE(ok) << "n " << n << " at " << i << ": wire " << h << " vs " << expected.halves[i]
                      << ", residual " << residual[i] << " vs " << expected.residual[i]
                      << ", decoded " << out[i] << " vs " << expected.decoded[i];
    }
  }
}

TEST(ElementMathTest, SignedZerosSurviveAndNaNIsCanonical) {
  for (const char* spec : {"fp16", "bf16"}) {
    auto c = make_cpu_compressor(CompressionSpec::parse(spec));
    for (std::size_t n : {3u, 11u}) {  // all tail; body and tail
      std::vector<float> g(n, 1.5f);
      g[1] = -0.0f;
      g[n - 1] = -0.0f;
      std::vector<std::byte> wire(c->wire_bytes(n));
      c->compress(g, {}, 1, wire);
      std::vector<float> out(n, 7.0f);
      c->decompress(wire, 1, out);
      EXPECT_EQ(bits(out[1]), 0x80000000u) << spec << " n " << n;
      EXPECT_EQ(bits(out[n - 1]), 0x80000000u) << spec << " n " << n;
      std::vector<float> sum(n, -0.0f);
      c->decompress_add(wire, 1, sum);  // -0 + -0 is -0
      EXPECT_EQ(bits(sum[n - 1]), 0x80000000u) << spec << " n " << n;
    }
  }
  // randomk adds at its k positions only (the kernel scatters): -0 elsewhere stays -0.
  auto randomk = make_cpu_compressor(CompressionSpec::parse("randomk:0.25"));
  std::vector<float> g(16, 2.0f);
  std::vector<std::byte> wire(randomk->wire_bytes(g.size()));
  randomk->compress(g, {}, 3, wire);
  std::vector<float> sum(g.size(), -0.0f);
  randomk->decompress_add(wire, 3, sum);
  const auto picked = randomk_positions(g.size(), wire.size() / 4, 0, 3);
  for (std::size_t i = 0; i < sum.size(); ++i) {
    const bool at_k = std::find(picked.begin(), picked.end(), i) != picked.end();
    EXPECT_EQ(bits(sum[i]), at_k ? bits(2.0f) : 0x80000000u) << "randomk at " << i;
  }
  auto fp16 = make_cpu_compressor(CompressionSpec::parse("fp16"));
  for (std::size_t n : {3u, 17u}) {
    std::vector<float> g(n, 0.25f);
    float payload_nan;
    const std::uint32_t nan_bits = 0xffc12345u;  // negative, with a payload
    std::memcpy(&payload_nan, &nan_bits, 4);
    g[0] = payload_nan;
    g[n - 1] = payload_nan;
    std::vector<std::byte> wire(fp16->wire_bytes(n));
    const auto result = fp16->compress(g, {}, 1, wire);
    EXPECT_EQ(result.nonfinite, 2u);
    for (std::size_t i : {std::size_t{0}, n - 1}) {
      std::uint16_t h;
      std::memcpy(&h, wire.data() + 4 + 2 * i, 2);
      EXPECT_EQ(h, 0x7e00) << "n " << n << " at " << i;
    }
    std::vector<float> out(n);
    fp16->decompress(wire, 1, out);
    EXPECT_EQ(bits(out[0]), 0x7fc00000u);
    EXPECT_EQ(bits(out[n - 1]), 0x7fc00000u);
  }
}

// Every dense format's wire, residual and decoded values over lengths that end chunks and groups
// of eight part-way, reduced to one digest per format. The digests are constants, so the SIMD run
// (kernels_unit) and the portable run (kernels_unit_portable) must both give them: the paths agree
// bit for bit, and a change to any formula shows here (and then on the device, which gpu_compress
// compares with the CPU).
std::uint64_t fnv1a(std::uint64_t hash, const void* data, std::size_t size) {
  const auto* bytes = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < size; ++i) hash = (hash ^ bytes[i]) * 0x100000001b3ull;
  return hash;
}

TEST(ElementMathTest, EveryPathGivesTheSameBits) {
  const std::pair<const char*, std::uint64_t> expected[] = {
      {"fp16", 0x34528972f8fd2b28ull},     {"bf16", 0x1406492ae5ef281dull},
      {"int8", 0xd1cc6664ce25f647ull},     {"onebit", 0xfc4bf3fa1853c537ull},
      {"topk:0.1", 0xa94f91a9ea5a13c7ull}, {"topk:0.05:sampled", 0x565978d9edda1344ull}};
  for (const auto& [spec, digest] : expected) {
    auto c = make_cpu_compressor(CompressionSpec::parse(spec));
    std::uint64_t hash = 0xcbf29ce484222325ull;
    std::mt19937 rng(11);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (std::size_t n : {7u, 300u, 1000u}) {
      std::vector<float> g(n), r(n);
      for (auto& v : g) v = normal(rng) * 3e4f;  // fp16 scales these down
      for (auto& v : r) v = normal(rng) * 0.01f;
      std::vector<std::byte> wire(c->wire_bytes(n));
      c->compress(g, r, 2, wire);
      std::vector<float> out(n), sum(n, 1.0f);
      c->decompress(wire, 2, out);
      c->decompress_add(wire, 2, sum);
      hash = fnv1a(hash, wire.data(), wire.size());
      hash = fnv1a(hash, r.data(), 4 * n);
      hash = fnv1a(hash, out.data(), 4 * n);
      hash = fnv1a(hash, sum.data(), 4 * n);
    }
    EXPECT_EQ(hash, digest) << spec << ": 0x" << std::hex << hash;
  }
}

}  // namespace
}  // namespace unimsg
