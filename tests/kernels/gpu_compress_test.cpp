// The CUDA compressors against the CPU reference: the same wire bytes, the same residuals and
// the same decompressed values, wires readable across the two, NaN/Inf handling and bad
// pointers. Skips, saying why, where there is no GPU.

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "unimsg/core/error.hpp"
#include "unimsg/kernels/compressor.hpp"
#include "unimsg/kernels/device.hpp"
#include "unimsg/kernels/device_memory.hpp"
#include "unimsg/kernels/powersgd.hpp"

namespace unimsg {
namespace {

class GpuCompressTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto info = query_devices();
    if (info.count == 0) GTEST_SKIP() << "no GPU: " << info.reason;
    set_device(0);
  }
};

// A gradient with a spread of magnitudes, exact zeros, negative zeros and (optionally) values
// that make fp16 scale down.
std::vector<float> gradient(std::size_t n, bool huge) {
  std::vector<float> g(n);
  for (std::size_t i = 0; i < n; ++i) {
    const double x =
        std::sin(0.7 * static_cast<double>(i) + 0.3) * (1 + static_cast<double>(i % 17));
    g[i] = static_cast<float>(i % 29 == 0 ? 0.0 : x);
    if (i % 31 == 5) g[i] = -0.0f;
  }
  if (huge && n > 3) g[3] = 1.5e5f;
  return g;
}

std::vector<float> residual_for(std::size_t n) {
  std::vector<float> r(n);
  for (std::size_t i = 0; i < n; ++i)
    r[i] = static_cast<float>(std::cos(1.3 * static_cast<double>(i))) * 0.25f;
  return r;
}

template <typename T>
DeviceBuffer upload(const std::vector<T>& host) {
  DeviceBuffer device(host.size() * sizeof(T));
  if (!host.empty()) device.copy_from_host(host.data(), host.size() * sizeof(T));
  return device;
}

template <typename T>
std::vector<T> download(const DeviceBuffer& device, std::size_t count) {
  std::vector<T> host(count);
  if (count != 0) device.copy_to_host(host.data(), count * sizeof(T));
  return host;
}

struct Outcome {
  std::vector<std::byte> wire;
  std::vector<float> residual;
  std::vector<float> out;
  std::size_t nonfinite = 0;
};

Outcome on_cpu(const CompressionSpec& spec, const std::vector<float>& g, std::vector<float> r,
               std::uint64_t step) {
  const auto compressor = make_cpu_compressor(spec);
  Outcome o;
  o.wire.resize(compressor->wire_bytes(g.size()));
  o.nonfinite = compressor->compress(g, r, step, o.wire).nonfinite;
  o.residual = std::move(r);
  o.out.resize(g.size());
  compressor->decompress(o.wire, step, o.out);
  return o;
}

Outcome on_gpu(const CompressionSpec& spec, const std::vector<float>& g,
               const std::vector<float>& r, std::uint64_t step) {
  const auto compressor = make_cuda_compressor(spec);
  const std::size_t n = g.size();
  DeviceBuffer device_g = upload(g);
  DeviceBuffer device_r = upload(r);
  DeviceBuffer device_wire(compressor->wire_bytes(n));
  DeviceBuffer device_out(n * 4);
  Outcome o;
  o.nonfinite =
      compressor
          ->compress(std::span<const float>(static_cast<const float*>(device_g.data()), n),
                     std::span<float>(static_cast<float*>(device_r.data()), r.size()), step,
                     std::span<std::byte>(static_cast<std::byte*>(device_wire.data()),
                                          compressor->wire_bytes(n)))
          .nonfinite;
  compressor->decompress(
      std::span<const std::byte>(static_cast<const std::byte*>(device_wire.data()),
                                 compressor->wire_bytes(n)),
      step, std::span<float>(static_cast<float*>(device_out.data()), n));
  o.wire = download<std::byte>(device_wire, compressor->wire_bytes(n));
  o.residual = download<float>(device_r, r.size());
  o.out = download<float>(device_out, n);
  return o;
}

// onebit's scale comes from a sum whose order the CPU's scalar path (no AVX2) does differently:
// there, scales and what they feed may differ by an ulp or so.
void expect_close(const std::vector<float>& cpu, const std::vector<float>& gpu, const char* what,
                  bool exact) {
  ASSERT_EQ(cpu.size(), gpu.size()) << what;
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    if (std::isnan(cpu[i])) {
      EXPECT_TRUE(std::isnan(gpu[i])) << what << " " << i;
    } else if (exact) {
      EXPECT_EQ(cpu[i], gpu[i]) << what << " " << i;
    } else {
      EXPECT_NEAR(cpu[i], gpu[i], 1e-6f * (std::fabs(cpu[i]) + 1.0f)) << what << " " << i;
    }
  }
}

TEST_F(GpuCompressTest, GpuCompressAgreesWithTheCpuReference) {
  const char* specs[] = {"none",
                         "fp16",
                         "bf16",
                         "int8",
                         "int8:seed=9",
                         "onebit",
                         "onebit:noef",
                         "topk:0.01",
                         "topk:0.05:sampled",
                         "randomk:0.01",
                         "randomk:0.3:noef"};
  for (const char* text : specs) {
    const auto spec = CompressionSpec::parse(text);
    const bool onebit = spec.name == "onebit";
    for (const std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{7}, std::size_t{256},
                                std::size_t{1000}, std::size_t{65537}}) {
      for (const bool huge : {false, true}) {
        SCOPED_TRACE(std::string(text) + " n=" + std::to_string(n) + (huge ? " huge" : ""));
        const auto g = gradient(n, huge);
        const auto r = spec.error_feedback ? residual_for(n) : std::vector<float>{};
        const Outcome cpu = on_cpu(spec, g, r, 5);
        const Outcome gpu = on_gpu(spec, g, r, 5);
        EXPECT_EQ(cpu.nonfinite, gpu.nonfinite);
        ASSERT_EQ(cpu.wire.size(), gpu.wire.size());
        if (!onebit) {
          EXPECT_EQ(0, std::memcmp(cpu.wire.data(), gpu.wire.data(), cpu.wire.size()))
              << "wire bytes differ";
        }
        expect_close(cpu.residual, gpu.residual, "residual", !onebit);
        expect_close(cpu.out, gpu.out, "decompressed", !onebit);
        // Either side reads the other's wire (onebit: the GPU's, with its own scales).
        const auto cpu_reader = make_cpu_compressor(spec);
        std::vector<float> read(n);
        cpu_reader->decompress(gpu.wire, 5, read);
        expect_close(gpu.out, read, "GPU wire read on the CPU", true);
      }
    }
  }
}

TEST_F(GpuCompressTest, GpuCompressAddsIntoTheOutput) {
  for (const char* text : {"fp16", "bf16", "int8", "onebit", "topk:0.1", "randomk:0.1", "none"}) {
    SCOPED_TRACE(text);
    const auto spec = CompressionSpec::parse(text);
    const auto cpu = make_cpu_compressor(spec);
    const auto gpu = make_cuda_compressor(spec);
    const std::size_t n = 3000;
    const auto g = gradient(n, false);
    std::vector<std::byte> wire(cpu->wire_bytes(n));
    std::vector<float> none;
    cpu->compress(g, none, 2, wire);
    std::vector<float> base(n);
    for (std::size_t i = 0; i < n; ++i) base[i] = static_cast<float>(i % 5) - 2.0f;
    std::vector<float> expected = base;
    cpu->decompress_add(wire, 2, expected);
    DeviceBuffer device_wire = upload(wire);
    DeviceBuffer device_out = upload(base);
    gpu->decompress_add(
        std::span<const std::byte>(static_cast<const std::byte*>(device_wire.data()), wire.size()),
        2, std::span<float>(static_cast<float*>(device_out.data()), n));
    expect_close(expected, download<float>(device_out, n), "decompress_add", true);
  }
}

TEST_F(GpuCompressTest, GpuCompressNonFiniteLeavesTheResidual) {
  for (const char* text : {"fp16", "bf16", "int8", "onebit", "topk:0.1", "randomk:0.1"}) {
    SCOPED_TRACE(text);
    auto g = gradient(600, false);
    g[10] = std::numeric_limits<float>::quiet_NaN();
    g[300] = -std::numeric_limits<float>::infinity();
    const auto r = residual_for(600);
    const Outcome gpu = on_gpu(CompressionSpec::parse(text), g, r, 1);
    EXPECT_EQ(gpu.nonfinite, 2u);
    EXPECT_EQ(gpu.residual, r) << "the residual moved on a step with NaN/Inf";
  }
}

TEST_F(GpuCompressTest, GpuCompressRefusesHostPointersAndShortWires) {
  const auto compressor = make_cuda_compressor(CompressionSpec::parse("onebit"));
  std::vector<float> host(512, 1.0f);
  std::vector<std::byte> host_wire(compressor->wire_bytes(512));
  EXPECT_THROW(compressor->compress(host, {}, 0, host_wire), Error);
  DeviceBuffer device_g = upload(host);
  DeviceBuffer short_wire(8);
  EXPECT_THROW(compressor->compress(
                   std::span<const float>(static_cast<const float*>(device_g.data()), 512), {}, 0,
                   std::span<std::byte>(static_cast<std::byte*>(short_wire.data()), 8)),
               Error);
  const auto topk = make_cuda_compressor(CompressionSpec::parse("topk:0.5"));
  // A pair whose index lies past the output: an error, not a stray write on the device.
  std::vector<std::uint32_t> bad = {1, 4096, 0};
  DeviceBuffer device_bad = upload(bad);
  DeviceBuffer out(16 * 4);
  EXPECT_THROW(topk->decompress(
                   std::span<const std::byte>(static_cast<const std::byte*>(device_bad.data()), 12),
                   0, std::span<float>(static_cast<float*>(out.data()), 16)),
               Error);
  // ...also into an empty output, as the CPU refuses it.
  EXPECT_THROW(topk->decompress(
                   std::span<const std::byte>(static_cast<const std::byte*>(device_bad.data()), 12),
                   0, std::span<float>()),
               Error);
  EXPECT_THROW(make_cpu_compressor(CompressionSpec::parse("topk:0.5"))
                   ->decompress(std::as_bytes(std::span(bad)), 0, std::span<float>()),
               Error);
  EXPECT_THROW(make_cuda_compressor(CompressionSpec::parse("powersgd")), ConfigError);
}

// PowerSGD with cuBLAS against the CPU's OpenBLAS: the same P, Q, approximation and residual over
// two steps (the second warm-started), to the products' rounding.
TEST_F(GpuCompressTest, GpuCompressPowerSgdAgreesWithTheCpu) {
  struct Shape {
    std::size_t count, rows;
    int rank;
  };
  for (const Shape shape : {Shape{300 * 200, 300, 4}, Shape{10007, 0, 2}, Shape{64 * 9, 64, 1}}) {
    SCOPED_TRACE(std::to_string(shape.count) + " rank " + std::to_string(shape.rank));
    PowerSgd cpu(shape.count, shape.rank, 11, shape.rows);
    CudaPowerSgd gpu(shape.count, shape.rank, 11, shape.rows);
    ASSERT_EQ(cpu.rows(), gpu.rows());
    ASSERT_EQ(cpu.cols(), gpu.cols());
    std::vector<float> cpu_residual(shape.count, 0.0f);
    DeviceBuffer gpu_residual = upload(cpu_residual);
    const auto close = [](std::span<const float> expected, const std::vector<float>& got,
                          const char* what) {
      ASSERT_EQ(expected.size(), got.size()) << what;
      float largest = 0;
      for (const float v : expected) largest = std::max(largest, std::fabs(v));
      for (std::size_t i = 0; i < got.size(); ++i) {
        ASSERT_NEAR(expected[i], got[i], 1e-3f * (largest + 1e-6f)) << what << " " << i;
      }
    };
    for (int step = 0; step < 2; ++step) {
      auto g = gradient(shape.count, false);
      for (float& v : g) v *= static_cast<float>(step + 1);
      DeviceBuffer device_g = upload(g);
      const auto p = cpu.begin(g, cpu_residual);
      const auto device_p = gpu.begin(
          std::span<const float>(static_cast<const float*>(device_g.data()), shape.count),
          std::span<const float>(static_cast<const float*>(gpu_residual.data()), shape.count));
      std::vector<float> got_p(device_p.size());
      copy_device_to_host(got_p.data(), device_p.data(), 4 * got_p.size());
      close(p, got_p, "P");
      const auto q = cpu.project();
      const auto device_q = gpu.project();
      std::vector<float> got_q(device_q.size());
      copy_device_to_host(got_q.data(), device_q.data(), 4 * got_q.size());
      close(q, got_q, "Q");
      std::vector<float> out(shape.count);
      cpu.finish(out, cpu_residual);
      DeviceBuffer device_out(4 * shape.count);
      gpu.finish(std::span<float>(static_cast<float*>(device_out.data()), shape.count),
                 std::span<float>(static_cast<float*>(gpu_residual.data()), shape.count));
      close(out, download<float>(device_out, shape.count), "approximation");
      close(cpu_residual, download<float>(gpu_residual, shape.count), "residual");
    }
  }
}

}  // namespace
}  // namespace unimsg
