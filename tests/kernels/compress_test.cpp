#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <vector>

#include "unimsg/core/error.hpp"
#include "unimsg/core/random.hpp"
#include "unimsg/kernels/compressor.hpp"
#include "unimsg/kernels/powersgd.hpp"

namespace unimsg {
namespace {

std::vector<float> gradient(std::size_t n, std::uint32_t seed = 1) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> g(n);
  for (auto& v : g) v = normal(rng);
  return g;
}

struct RoundTrip {
  std::vector<std::byte> wire;
  std::vector<float> out;
  std::vector<float> residual;
  CompressResult result;
};

RoundTrip round_trip(const Compressor& c, const std::vector<float>& g,
                     std::vector<float> residual = {}, std::uint64_t step = 3) {
  RoundTrip rt;
  rt.residual = std::move(residual);
  rt.wire.resize(c.wire_bytes(g.size()));
  rt.result = c.compress(g, rt.residual, step, rt.wire);
  rt.out.resize(g.size());
  c.decompress(rt.wire, step, rt.out);
  return rt;
}

const char* kAll[] = {"fp16", "bf16", "int8", "onebit", "topk", "topk:0.05:sampled", "randomk"};

TEST(CompressTest, RoundTripBounds) {
  const auto g = gradient(5000);
  auto fp16 = make_cpu_compressor(CompressionSpec::parse("fp16"));
  auto bf16 = make_cpu_compressor(CompressionSpec::parse("bf16"));
  const auto h = round_trip(*fp16, g);
  const auto b = round_trip(*bf16, g);
  for (std::size_t i = 0; i < g.size(); ++i) {
    EXPECT_LE(std::fabs(h.out[i] - g[i]), std::fabs(g[i]) * 0x1p-11f + 1e-7f) << i;
    EXPECT_LE(std::fabs(b.out[i] - g[i]), std::fabs(g[i]) * 0x1p-8f + 1e-30f) << i;
  }
  auto int8 = make_cpu_compressor(CompressionSpec::parse("int8"));
  const auto q = round_trip(*int8, g);
  for (std::size_t chunk = 0; chunk * 256 < g.size(); ++chunk) {
    float largest = 0;
    for (std::size_t i = chunk * 256; i < std::min(g.size(), chunk * 256 + 256); ++i) {
      largest = std::max(largest, std::fabs(g[i]));
    }
    for (std::size_t i = chunk * 256; i < std::min(g.size(), chunk * 256 + 256); ++i) {
      EXPECT_LE(std::fabs(q.out[i] - g[i]), largest / 127 * 1.0001f) << i;
    }
  }
  auto onebit = make_cpu_compressor(CompressionSpec::parse("onebit"));
  const auto s = round_trip(*onebit, g);
  for (std::size_t chunk = 0; chunk * 256 < g.size(); ++chunk) {
    double squares = 0;
    const std::size_t end = std::min(g.size(), chunk * 256 + 256);
    for (std::size_t i = chunk * 256; i < end; ++i) squares += double{g[i]} * g[i];
    const double rms = std::sqrt(squares / static_cast<double>(end - chunk * 256));
    for (std::size_t i = chunk * 256; i < end; ++i) {
      EXPECT_NEAR(s.out[i], g[i] < 0 ? -rms : rms, 1e-5 * rms) << i;
    }
  }
  auto topk = make_cpu_compressor(CompressionSpec::parse("topk:0.01"));
  const auto t = round_trip(*topk, g);
  std::vector<float> magnitudes(g.size());
  for (std::size_t i = 0; i < g.size(); ++i) magnitudes[i] = std::fabs(g[i]);
  std::vector<float> sorted = magnitudes;
  std::sort(sorted.rbegin(), sorted.rend());
  std::size_t sent = 0;
  for (std::size_t i = 0; i < g.size(); ++i) {
    if (t.out[i] != 0) {
      ++sent;
      EXPECT_EQ(t.out[i], g[i]);
      EXPECT_GE(magnitudes[i], sorted[49]);
    }
  }
  EXPECT_EQ(sent, 50u);
  EXPECT_EQ(t.result.wire_bytes, 4u + 8u * 50u);
}

TEST(CompressTest, ErrorFeedbackKeepsWhatWasNotSent) {
  const auto g = gradient(3000, 5);
  for (const char* name : kAll) {
    auto c = make_cpu_compressor(CompressionSpec::parse(name));
    std::vector<float> residual = gradient(3000, 9);
    for (auto& v : residual) v *= 0.1f;
    const std::vector<float> before = residual;
    const auto rt = round_trip(*c, g, residual);
    for (std::size_t i = 0; i < g.size(); ++i) {
      // What went on the wire plus what stayed behind is exactly the corrected gradient.
      EXPECT_NEAR(rt.out[i] + rt.residual[i], g[i] + before[i], 1e-5f) << name << " at " << i;
    }
  }
}

TEST(CompressTest, ErrorFeedbackConvergesToTheSum) {
  // Over many steps of the same gradient, sent + final residual = steps * gradient.
  const auto g = gradient(2048, 11);
  for (const char* name : {"onebit", "topk", "int8", "randomk"}) {
    auto c = make_cpu_compressor(CompressionSpec::parse(name));
    std::vector<float> residual(g.size(), 0.0f);
    std::vector<double> sent(g.size(), 0.0);
    constexpr int kSteps = 40;
    for (int step = 0; step < kSteps; ++step) {
      const auto rt = round_trip(*c, g, residual, static_cast<std::uint64_t>(step));
      residual = rt.residual;
      for (std::size_t i = 0; i < g.size(); ++i) sent[i] += rt.out[i];
    }
    for (std::size_t i = 0; i < g.size(); ++i) {
      EXPECT_NEAR(sent[i] + residual[i], kSteps * static_cast<double>(g[i]), 1e-3) << name;
    }
  }
}

TEST(CompressTest, DeterministicForASeed) {
  const auto g = gradient(1000);
  auto a = make_cpu_compressor(CompressionSpec::parse("int8:seed=7"));
  auto b = make_cpu_compressor(CompressionSpec::parse("int8:seed=7"));
  auto c = make_cpu_compressor(CompressionSpec::parse("int8:seed=8"));
  EXPECT_EQ(round_trip(*a, g).wire, round_trip(*b, g).wire);
  EXPECT_NE(round_trip(*a, g).wire, round_trip(*c, g).wire);
  EXPECT_EQ(randomk_positions(1000, 10, 1, 5), randomk_positions(1000, 10, 1, 5));
  EXPECT_NE(randomk_positions(1000, 10, 1, 5), randomk_positions(1000, 10, 1, 6));
  const auto positions = randomk_positions(1000, 100, 1, 5);
  EXPECT_EQ(std::set<std::uint32_t>(positions.begin(), positions.end()).size(), 100u);
  // Stochastic rounding is unbiased: averaged over seeds it approaches the value.
  const std::vector<float> third(256, 1.0f / 3.0f);
  double mean = 0;
  for (std::uint64_t seed = 0; seed < 400; ++seed) {
    CompressionSpec spec = CompressionSpec::parse("int8");
    spec.seed = seed;
    const auto rt = round_trip(*make_cpu_compressor(spec), third);
    mean += rt.out[17] / 400.0;
  }
  EXPECT_NEAR(mean, 1.0 / 3.0, 0.01);
}

TEST(CompressTest, NanAndInfAreReportedAndLeaveTheResidualAlone) {
  auto g = gradient(2000);
  g[10] = std::numeric_limits<float>::quiet_NaN();
  g[20] = std::numeric_limits<float>::infinity();
  for (const char* name : kAll) {
    auto c = make_cpu_compressor(CompressionSpec::parse(name));
    const std::vector<float> residual(g.size(), 0.25f);
    const auto rt = round_trip(*c, g, residual);
    EXPECT_EQ(rt.result.nonfinite, 2u) << name;
    EXPECT_EQ(rt.residual, residual) << name << ": the residual changed on a bad step";
  }
  auto fp16 = make_cpu_compressor(CompressionSpec::parse("fp16"));
  const auto h = round_trip(*fp16, g);
  EXPECT_TRUE(std::isnan(h.out[10]));
  EXPECT_TRUE(std::isinf(h.out[20]));
}

TEST(CompressTest, NonFiniteCountMatchesAPlainCount) {
  // The count runs vectorised with a scalar tail: NaN and +-Inf anywhere, at every length
  // around the vector width, and where a lane's count is flushed.
  const float specials[] = {
      std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::quiet_NaN(),
      std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()};
  std::mt19937 random(3);
  for (const std::size_t n :
       {std::size_t{0}, std::size_t{1}, std::size_t{7}, std::size_t{8}, std::size_t{9},
        std::size_t{31}, std::size_t{33}, std::size_t{1000}, (std::size_t{8} << 20) + 13}) {
    std::vector<float> values(n);
    std::uniform_real_distribution<float> finite(-1.0e38f, 1.0e38f);
    for (float& v : values) v = finite(random);
    std::size_t expected = 0;
    for (std::size_t i = 0; i < n; i += 1 + i % 5 + (n > 100000 ? 4096 : 0)) {
      values[i] = specials[i % 4];
      ++expected;
    }
    if (n > 0) {  // the last element, in the scalar tail
      if (std::isfinite(values[n - 1])) ++expected;
      values[n - 1] = specials[n % 4];
    }
    EXPECT_EQ(count_nonfinite(values), expected) << "n=" << n;
  }
}

TEST(CompressTest, Int8MatchesAPlainReferenceBitForBit) {
  // int8 runs vectorised (the counter-based draws included), and must give exactly what the
  // format defines — the CUDA kernel gives it too: per chunk of 256 the largest finite
  // magnitude / 127 as the scale, then floor(v / scale + u) clamped to +-127, u = the top 24
  // bits of splitmix64(splitmix64(seed ^ splitmix64(step)) + index) / 2^24.
  constexpr std::size_t kChunk = 256;
  const auto uniform = [](std::uint64_t seed, std::uint64_t step, std::uint64_t index) {
    return static_cast<float>(splitmix64(splitmix64(seed ^ splitmix64(step)) + index) >> 40) *
           (1.0f / 16777216.0f);
  };
  std::mt19937 random(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const char* text : {"int8", "int8:seed=9", "int8:noef"}) {
    const auto spec = CompressionSpec::parse(text);
    auto compressor = make_cpu_compressor(spec);
    for (const std::size_t n : {std::size_t{1}, std::size_t{7}, std::size_t{255}, std::size_t{256},
                                std::size_t{257}, std::size_t{1000}, std::size_t{65537}}) {
      for (const int kind : {0, 1, 2}) {  // plain, huge and tiny values, one Inf
        SCOPED_TRACE(std::string(text) + " n=" + std::to_string(n) + " kind " +
                     std::to_string(kind));
        std::vector<float> g(n), r(spec.error_feedback ? n : 0);
        for (std::size_t i = 0; i < n; ++i) {
          g[i] = normal(random) * (kind == 1 ? (i % 3 == 0 ? 3e37f : 1e-38f) : 1.0f);
        }
        for (float& v : r) v = 0.01f * normal(random);
        if (kind == 2) g[n / 2] = std::numeric_limits<float>::infinity();
        const std::uint64_t step = 41;
        std::vector<std::byte> wire(compressor->wire_bytes(n));
        std::vector<float> residual = r;
        const auto result = compressor->compress(g, residual, step, wire);

        std::vector<std::byte> expected(wire.size());
        std::vector<float> expected_residual = r;
        const bool update = !r.empty() && kind != 2;
        for (std::size_t begin = 0; begin < n; begin += kChunk) {
          const std::size_t end = std::min(n, begin + kChunk);
          float largest = 0;
          for (std::size_t i = begin; i < end; ++i) {
            const float v = r.empty() ? g[i] : g[i] + r[i];
            if (std::isfinite(v)) largest = std::max(largest, std::fabs(v));
          }
          const float scale = largest > 0 ? largest / 127.0f : 1.0f;
          std::byte* at = expected.data() + (begin / kChunk) * (4 + kChunk);
          std::memcpy(at, &scale, 4);
          for (std::size_t i = begin; i < end; ++i) {
            const float v = r.empty() ? g[i] : g[i] + r[i];
            const float x = std::isfinite(v) ? v / scale : 0.0f;
            const float q =
                std::min(std::max(std::floor(x + uniform(spec.seed, step, i)), -127.0f), 127.0f);
            const auto code = static_cast<std::int8_t>(q);
            std::memcpy(at + 4 + (i - begin), &code, 1);
            if (update) expected_residual[i] = v - static_cast<float>(code) * scale;
          }
        }
        EXPECT_EQ(result.nonfinite, kind == 2 ? 1u : 0u);
        EXPECT_EQ(0, std::memcmp(wire.data(), expected.data(), wire.size())) << "wire differs";
        ASSERT_EQ(residual.size(), expected_residual.size());
        // Empty without error feedback: memcmp must not see its null data().
        if (!residual.empty()) {
          EXPECT_EQ(0, std::memcmp(residual.data(), expected_residual.data(),
                                   residual.size() * sizeof(float)))
              << "residual differs";
        }
      }
    }
  }
}

TEST(CompressTest, SignOfZeroAndHalfOverflow) {
  auto onebit = make_cpu_compressor(CompressionSpec::parse("onebit"));
  const auto zeros = round_trip(*onebit, std::vector<float>{0.0f, -0.0f, 2.0f, -2.0f});
  EXPECT_GT(zeros.out[0], 0);  // 0 maps to +scale
  EXPECT_GT(zeros.out[1], 0);  // so does -0
  auto fp16 = make_cpu_compressor(CompressionSpec::parse("fp16"));
  const auto big = round_trip(*fp16, std::vector<float>{1e6f, -3e5f, 1.0f});
  EXPECT_NEAR(big.out[0], 1e6f, 1e6f * 1e-3f);  // pre-scaled: no overflow to infinity
  EXPECT_NEAR(big.out[1], -3e5f, 3e5f * 1e-3f);
  // The same inside the vectorised part of the scan (8 lanes), with a NaN in the scalar tail.
  std::vector<float> lanes(21, 0.5f);
  lanes[5] = -2e6f;
  lanes[20] = std::numeric_limits<float>::quiet_NaN();
  const auto mixed = round_trip(*fp16, lanes);
  EXPECT_NEAR(mixed.out[5], -2e6f, 2e6f * 1e-3f);
  EXPECT_EQ(mixed.result.nonfinite, 1u);
}

TEST(CompressTest, SampledTopKFindsNearlyTheTrueTopK) {
  const auto g = gradient(100000, 21);
  auto exact = make_cpu_compressor(CompressionSpec::parse("topk:0.01"));
  auto sampled = make_cpu_compressor(CompressionSpec::parse("topk:0.01:sampled"));
  const auto e = round_trip(*exact, g);
  const auto s = round_trip(*sampled, g);
  std::size_t both = 0, sent = 0;
  for (std::size_t i = 0; i < g.size(); ++i) {
    sent += s.out[i] != 0;
    both += (s.out[i] != 0 && e.out[i] != 0);
  }
  EXPECT_EQ(sent, 1000u);
  EXPECT_GE(both, 900u);
}

TEST(CompressTest, BadSpecsAndWiresAreClearErrors) {
  for (const char* bad : {"gzip", "topk:2", "topk:0", "topk:fast", "int8:seed=x", "powersgd:0",
                          "powersgd:rows=0", "topk:rows=3", "powersgd:0.5"}) {
    EXPECT_THROW(CompressionSpec::parse(bad), ConfigError) << bad;
  }
  auto topk = make_cpu_compressor(CompressionSpec::parse("topk:0.5"));
  auto rt = round_trip(*topk, gradient(10));
  std::vector<float> out(5);  // fewer elements than the indices on the wire
  EXPECT_THROW(topk->decompress(rt.wire, 3, out), Error);
  std::vector<std::byte> small(3);
  EXPECT_THROW(topk->compress(gradient(10), {}, 0, small), Error);
}

// PowerSGD on one rank (no averaging between the stages).
TEST(CompressTest, DecompressAddEqualsDecompressPlusOut) {
  for (const char* text : {"fp16", "bf16", "int8", "onebit", "topk:0.1", "randomk:0.1"}) {
    auto compressor = make_cpu_compressor(CompressionSpec::parse(text));
    for (const std::size_t n : {std::size_t{1}, std::size_t{13}, std::size_t{3000}}) {
      const auto rt = round_trip(*compressor, gradient(n));
      std::vector<float> base(n), added(n), plain(n);
      for (std::size_t i = 0; i < n; ++i) base[i] = added[i] = 0.25f * static_cast<float>(i % 7);
      compressor->decompress(rt.wire, 3, plain);
      compressor->decompress_add(rt.wire, 3, added);
      for (std::size_t i = 0; i < n; ++i) {
        ASSERT_FLOAT_EQ(added[i], base[i] + plain[i]) << text << " n=" << n << " i=" << i;
      }
    }
  }
}

TEST(CompressTest, PowerSgdRecoversALowRankMatrixAndKeepsTheRest) {
  // A rank-2 matrix of 60 x 60 (the flat view of 3600 elements): after a few warm-started power
  // steps the rank-2 approximation is the matrix itself.
  const std::size_t n = 3600;
  std::vector<float> matrix(n);
  for (std::size_t i = 0; i < 60; ++i) {
    for (std::size_t j = 0; j < 60; ++j) {
      matrix[i * 60 + j] = static_cast<float>(std::sin(0.1 * i) * std::cos(0.2 * j) +
                                              0.5 * std::cos(0.3 * i) * std::sin(0.05 * j + 1));
    }
  }
  PowerSgd power(n, 2, 7);
  EXPECT_EQ(power.rows(), 60u);
  EXPECT_EQ(power.cols(), 60u);
  std::vector<float> out(n);
  for (int step = 0; step < 4; ++step) {
    power.begin(matrix, {});
    power.project();
    power.finish(out, {});
  }
  for (std::size_t i = 0; i < n; ++i) ASSERT_NEAR(out[i], matrix[i], 1e-3) << i;

  // Error feedback: what the approximation leaves out stays in the residual, exactly.
  PowerSgd rank1(n, 1, 7);
  std::vector<float> residual(n, 0.0f), gradient_in = matrix;
  for (std::size_t i = 0; i < n; ++i) gradient_in[i] += 0.01f * static_cast<float>(i % 13);
  std::vector<float> before = residual;
  rank1.begin(gradient_in, residual);
  rank1.project();
  rank1.finish(out, residual);
  for (std::size_t i = 0; i < n; ++i) {
    ASSERT_NEAR(out[i] + residual[i], gradient_in[i] + before[i], 1e-5) << i;
  }
}

TEST(CompressTest, PowerSgdSpecsAndSizes) {
  EXPECT_EQ(CompressionSpec::parse("powersgd").powersgd_rank, 4);
  EXPECT_EQ(CompressionSpec::parse("powersgd:2").to_string(), "powersgd:2");
  EXPECT_EQ(CompressionSpec::parse("powersgd:1:noef").to_string(), "powersgd:1:noef");
  EXPECT_THROW(make_cpu_compressor(CompressionSpec::parse("powersgd")), ConfigError);
  EXPECT_FALSE(PowerSgd::compresses(0, 4));
  EXPECT_FALSE(PowerSgd::compresses(10, 4));    // 4 x 3: factors of 4 + 3 rows > 10
  EXPECT_TRUE(PowerSgd::compresses(10000, 4));  // 100 x 100: 800 < 10000
  EXPECT_THROW(PowerSgd(100, 0, 1), ConfigError);
  const PowerSgd shaped(64 * 288, 4, 1, 64);  // a 64x32x3x3 convolution's gradient
  EXPECT_EQ(shaped.rows(), 64u);
  EXPECT_EQ(shaped.cols(), 288u);
  EXPECT_TRUE(PowerSgd::compresses(64 * 288, 4, 64));
  EXPECT_FALSE(PowerSgd::compresses(10 * 3, 4, 10));  // 10 x 3: (10 + 3) x 4 > 30
  PowerSgd power(100, 1, 1);
  std::vector<float> wrong(99);
  EXPECT_THROW(power.begin(wrong, {}), Error);
}

TEST(CompressTest, SpecsSurviveTheirCanonicalText) {
  for (const char* text :
       {"none", "fp16", "bf16", "int8:seed=9", "onebit:noef", "topk:0.01", "topk:0.25:sampled",
        "randomk:0.5", "powersgd:3", "powersgd:2:rows=64:noef"}) {
    const auto spec = CompressionSpec::parse(text);
    EXPECT_EQ(CompressionSpec::parse(spec.to_string()).to_string(), spec.to_string()) << text;
  }
  EXPECT_EQ(CompressionSpec::parse("topk").to_string(), "topk:0.01");
}

}  // namespace
}  // namespace unimsg
