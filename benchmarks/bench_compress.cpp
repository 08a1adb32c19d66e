// unimsg-bench-compress: throughput of each compressor (compress with error feedback, and
// decompress) in GB/s of uncompressed f32 data, against a copy of the same bytes measured in the
// same run: memcpy on one CPU thread, or a device-to-device copy with the CUDA kernels.
//
//   unimsg-bench-compress [--device cpu|cuda] [-b 64K] [-e 64M] [-f 4] [--json]

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "unimsg/core/cli.hpp"
#include "unimsg/core/config.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/kernels/compressor.hpp"
#include "unimsg/kernels/device.hpp"
#include "unimsg/kernels/device_memory.hpp"
#include "unimsg/kernels/powersgd.hpp"

namespace {

using Clock = std::chrono::steady_clock;

// Median seconds of `trials` runs of `body`, each repeated until it lasts at least ~20 ms.
template <typename Body>
double time_median(Body&& body, int trials = 5) {
  int repeat = 1;
  while (true) {
    const auto start = Clock::now();
    for (int r = 0; r < repeat; ++r) body();
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    if (seconds > 0.02 || repeat > (1 << 20)) break;
    repeat *= 2;
  }
  std::vector<double> times;
  for (int t = 0; t < trials; ++t) {
    const auto start = Clock::now();
    for (int r = 0; r < repeat; ++r) body();
    times.push_back(std::chrono::duration<double>(Clock::now() - start).count() / repeat);
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

struct Settings {
  std::string device;
  bool cuda = false;
  std::string device_name = "cpu, one thread";
  std::uint64_t smallest = 0;
  std::uint64_t largest = 0;
  std::uint64_t factor = 4;
  std::vector<std::string> names;
  bool json = false;
};

// Checks the options and, for --device cuda, selects GPU 0.
Settings parse_settings(const cxxopts::ParseResult& args) {
  Settings s;
  s.device = args["device"].as<std::string>();
  if (s.device != "cpu" && s.device != "cuda") {
    throw unimsg::ConfigError(unimsg::kNoRank, "--device", "'" + s.device + "' is not cpu or cuda");
  }
  s.cuda = s.device == "cuda";
  if (s.cuda) {
    const auto info = unimsg::query_devices();
    if (info.count == 0) {
      throw unimsg::Error(unimsg::kNoRank, "--device cuda", "no GPU: " + info.reason);
    }
    unimsg::set_device(0);
    s.device_name = info.name;
  }
  s.smallest = unimsg::parse_size(args["b"].as<std::string>(), "-b");
  s.largest = unimsg::parse_size(args["e"].as<std::string>(), "-e");
  s.factor = args["f"].as<std::uint64_t>();
  if (s.smallest < 4 || s.largest < s.smallest || s.factor < 2) {
    throw unimsg::ConfigError(unimsg::kNoRank, "-b/-e/-f", "need 4 <= b <= e and f >= 2");
  }
  const std::string list = args["compressors"].as<std::string>();
  for (std::size_t start = 0; start <= list.size();) {
    const auto comma = std::min(list.find(',', start), list.size());
    s.names.push_back(list.substr(start, comma - start));
    start = comma + 1;
  }
  s.json = args.count("json") > 0;
  return s;
}

// One size's gradient, and its copy's time.
struct SizeBuffers {
  std::size_t n;
  std::vector<float> gradient;
  std::vector<float> copy;
  // On the GPU: the gradient, a residual, an output and a copy target in device memory.
  std::optional<unimsg::DeviceBuffer> device_gradient, device_residual, device_out, device_copy;
  double copy_s = 0;

  SizeBuffers(std::size_t elements, bool cuda, std::mt19937& rng,
              std::normal_distribution<float>& normal)
      : n(elements), gradient(n) {
    for (auto& v : gradient) v = normal(rng);
    copy.resize(n);
    if (cuda) {
      device_gradient.emplace(n * 4);
      device_gradient->copy_from_host(gradient.data(), n * 4);
      device_residual.emplace(n * 4);
      device_out.emplace(n * 4);
      device_copy.emplace(n * 4);
      copy_s = time_median([&] {
        unimsg::copy_device_to_device(device_copy->data(), device_gradient->data(), n * 4);
      });
    } else {
      copy_s = time_median([&] { std::memcpy(copy.data(), gradient.data(), n * 4); });
    }
  }
};

struct Timing {
  double compress_s = 0;
  double decompress_s = 0;
  std::size_t wire_bytes = 0;
};

Timing time_cuda_powersgd(const unimsg::CompressionSpec& spec, SizeBuffers& b,
                          const std::vector<float>& residual) {
  // As on the CPU: M = gradient + residual, P = M Q, orthonormalise, Q = M^T P; then P Q^T
  // and the new residual (cuBLAS; P orthonormalised on the host).
  const std::size_t n = b.n;
  Timing t;
  unimsg::CudaPowerSgd power(n, spec.powersgd_rank, 1);
  t.wire_bytes = (power.rows() + power.cols()) * static_cast<std::size_t>(power.rank()) * 4;
  b.device_residual->copy_from_host(residual.data(), n * 4);
  const std::span<const float> g(static_cast<const float*>(b.device_gradient->data()), n);
  const std::span<float> r(static_cast<float*>(b.device_residual->data()), n);
  const std::span<float> o(static_cast<float*>(b.device_out->data()), n);
  t.compress_s = time_median([&] {
    power.begin(g, r);
    power.project();
  });
  t.decompress_s = time_median([&] { power.finish(o, r); });
  return t;
}

Timing time_cuda_compressor(const unimsg::CompressionSpec& spec, SizeBuffers& b,
                            const std::vector<float>& residual) {
  const std::size_t n = b.n;
  Timing t;
  const auto compressor = unimsg::make_cuda_compressor(spec);
  b.device_residual->copy_from_host(residual.data(), n * 4);
  unimsg::DeviceBuffer wire(compressor->wire_bytes(n));
  t.wire_bytes = compressor->wire_bytes(n);
  const std::span<const float> g(static_cast<const float*>(b.device_gradient->data()), n);
  const std::span<float> r(static_cast<float*>(b.device_residual->data()), n);
  const std::span<std::byte> w(static_cast<std::byte*>(wire.data()), t.wire_bytes);
  const std::span<float> o(static_cast<float*>(b.device_out->data()), n);
  t.compress_s = time_median([&] { compressor->compress(g, r, 1, w); });
  t.decompress_s = time_median([&] { compressor->decompress(w, 1, o); });
  return t;
}

Timing time_cpu_powersgd(const unimsg::CompressionSpec& spec, SizeBuffers& b,
                         std::vector<float>& residual, std::vector<float>& out) {
  // Compress: M = gradient + residual, P = M Q, orthonormalise, Q = M^T P (one rank: no
  // averaging between); decompress: P Q^T and the new residual.
  Timing t;
  unimsg::PowerSgd power(b.n, spec.powersgd_rank, 1);
  t.wire_bytes = (power.rows() + power.cols()) * static_cast<std::size_t>(power.rank()) * 4;
  t.compress_s = time_median([&] {
    power.begin(b.gradient, residual);
    power.project();
  });
  t.decompress_s = time_median([&] { power.finish(out, residual); });
  return t;
}

Timing time_cpu_compressor(const unimsg::CompressionSpec& spec, SizeBuffers& b,
                           std::vector<float>& residual, std::vector<float>& out) {
  Timing t;
  const auto compressor = unimsg::make_cpu_compressor(spec);
  std::vector<std::byte> wire(compressor->wire_bytes(b.n));
  t.wire_bytes = wire.size();
  t.compress_s = time_median([&] { compressor->compress(b.gradient, residual, 1, wire); });
  t.decompress_s = time_median([&] { compressor->decompress(wire, 1, out); });
  return t;
}

Timing time_compressor(const unimsg::CompressionSpec& spec, SizeBuffers& b, bool cuda) {
  std::vector<float> residual(b.n, 0.0f);
  std::vector<float> out(b.n);
  if (cuda && spec.name == "powersgd") return time_cuda_powersgd(spec, b, residual);
  if (cuda) return time_cuda_compressor(spec, b, residual);
  if (spec.name == "powersgd") return time_cpu_powersgd(spec, b, residual, out);
  return time_cpu_compressor(spec, b, residual, out);
}

void print_row(const Settings& s, const std::string& name, std::size_t n, double copy_gbps,
               const Timing& t) {
  const double in = static_cast<double>(n * 4);
  const double compress_gbps = in / t.compress_s / 1e9;
  const double decompress_gbps = in / t.decompress_s / 1e9;
  if (s.json) {
    std::printf("%s\n", nlohmann::json{{"compressor", name},
                                       {"device", s.device},
                                       {"bytes", n * 4},
                                       {"compress_gbps", compress_gbps},
                                       {"decompress_gbps", decompress_gbps},
                                       {"copy_gbps", copy_gbps},
                                       {"wire_bytes", t.wire_bytes}}
                            .dump()
                            .c_str());
  } else {
    std::printf("%-18s %12zu %14.2f %16.2f %10.2f %8.0f%% %9.4f\n", name.c_str(), n * 4,
                compress_gbps, decompress_gbps, copy_gbps, 100 * compress_gbps / copy_gbps,
                static_cast<double>(t.wire_bytes) / in);
  }
}

int run(int argc, char** argv) {
  cxxopts::Options cli(
      "unimsg-bench-compress",
      "Compressor throughput (GB/s of f32 input) against a copy of the same bytes: "
      "memcpy on one CPU thread, or a device-to-device copy on the GPU.");
  cli.add_options()("device", "cpu (one thread) or cuda (the CUDA kernels on GPU 0)",
                    cxxopts::value<std::string>()->default_value("cpu"))(
      "b", "smallest size", cxxopts::value<std::string>()->default_value("64K"))(
      "e", "largest size", cxxopts::value<std::string>()->default_value("64M"))(
      "f", "size factor", cxxopts::value<std::uint64_t>()->default_value("4"))(
      "compressors", "comma list",
      cxxopts::value<std::string>()->default_value(
          "fp16,bf16,int8,onebit,topk,topk:0.01:sampled,randomk,powersgd:4"))(
      "json", "one JSON object per row")("h,help", "show this help");
  const auto args = cli.parse(argc, argv);
  if (args.count("help")) {
    std::puts(cli.help().c_str());
    return 0;
  }
  const Settings settings = parse_settings(args);
  if (!settings.json) {
    std::printf("# unimsg-bench-compress: device %s, GB/s of f32 input\n",
                settings.device_name.c_str());
    std::printf("%-18s %12s %14s %16s %10s %9s %9s\n", "compressor", "bytes", "compress_gbps",
                "decompress_gbps", "copy_gbps", "compress", "wire/in");
  }
  unimsg::set_blas_threads(1);  // one thread, as for every compressor here
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (std::uint64_t bytes = settings.smallest; bytes <= settings.largest;
       bytes *= settings.factor) {
    SizeBuffers buffers(bytes / 4, settings.cuda, rng, normal);
    const double copy_gbps = static_cast<double>(buffers.n * 4) / buffers.copy_s / 1e9;
    for (const auto& name : settings.names) {
      const auto spec = unimsg::CompressionSpec::parse(name);
      const Timing timing = time_compressor(spec, buffers, settings.cuda);
      print_row(settings, name, buffers.n, copy_gbps, timing);
      std::fflush(stdout);
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return unimsg::run_program("unimsg-bench-compress", argc, argv, run);
}
