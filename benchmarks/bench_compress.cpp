// unimsg-bench-compress: throughput of each compressor (compress with error feedback, and
// decompress) in GB/s of uncompressed f32 data, against memcpy of the same bytes measured in the
// same run, single thread.
//
//   unimsg-bench-compress [--device cpu] [-b 64K] [-e 64M] [-f 4] [--json]

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "unimsg/cli.hpp"
#include "unimsg/compressor.hpp"
#include "unimsg/config.hpp"
#include "unimsg/error.hpp"
#include "unimsg/powersgd.hpp"

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

int run(int argc, char** argv) {
  cxxopts::Options cli("unimsg-bench-compress",
                       "Compressor throughput (GB/s of f32 input) against memcpy, one thread.");
  cli.add_options()("device", "cpu (CUDA kernels are not built yet)",
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
  if (args["device"].as<std::string>() != "cpu") {
    throw unimsg::ConfigError(unimsg::kNoRank, "--device",
                              "only cpu: the CUDA kernels are not built yet");
  }
  const auto smallest = unimsg::parse_size(args["b"].as<std::string>(), "-b");
  const auto largest = unimsg::parse_size(args["e"].as<std::string>(), "-e");
  const auto factor = args["f"].as<std::uint64_t>();
  if (smallest < 4 || largest < smallest || factor < 2) {
    throw unimsg::ConfigError(unimsg::kNoRank, "-b/-e/-f", "need 4 <= b <= e and f >= 2");
  }
  std::vector<std::string> names;
  const std::string list = args["compressors"].as<std::string>();
  for (std::size_t start = 0; start <= list.size();) {
    const auto comma = std::min(list.find(',', start), list.size());
    names.push_back(list.substr(start, comma - start));
    start = comma + 1;
  }
  const bool json = args.count("json") > 0;
  if (!json) {
    std::printf("# unimsg-bench-compress: device cpu, one thread, GB/s of f32 input\n");
    std::printf("%-18s %12s %14s %16s %10s %9s %9s\n", "compressor", "bytes", "compress_gbps",
                "decompress_gbps", "copy_gbps", "compress", "wire/in");
  }
  unimsg::kernels::set_blas_threads(1);  // one thread, as for every compressor here
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (std::uint64_t bytes = smallest; bytes <= largest; bytes *= factor) {
    const std::size_t n = bytes / 4;
    std::vector<float> gradient(n);
    for (auto& v : gradient) v = normal(rng);
    std::vector<float> copy(n);
    const double copy_s = time_median([&] { std::memcpy(copy.data(), gradient.data(), n * 4); });
    const double copy_gbps = static_cast<double>(n * 4) / copy_s / 1e9;
    for (const auto& name : names) {
      const auto spec = unimsg::kernels::CompressionSpec::parse(name);
      std::vector<float> residual(n, 0.0f);
      std::vector<float> out(n);
      double compress_s = 0, decompress_s = 0;
      std::size_t wire_bytes = 0;
      if (spec.name == "powersgd") {
        // Compress: M = gradient + residual, P = M Q, orthonormalise, Q = M^T P (one rank: no
        // averaging between); decompress: P Q^T and the new residual.
        unimsg::kernels::PowerSgd power(n, spec.powersgd_rank, 1);
        wire_bytes = (power.rows() + power.cols()) * static_cast<std::size_t>(power.rank()) * 4;
        compress_s = time_median([&] {
          power.begin(gradient, residual);
          power.project();
        });
        decompress_s = time_median([&] { power.finish(out, residual); });
      } else {
        const auto compressor = unimsg::kernels::make_cpu_compressor(spec);
        std::vector<std::byte> wire(compressor->wire_bytes(n));
        wire_bytes = wire.size();
        compress_s = time_median([&] { compressor->compress(gradient, residual, 1, wire); });
        decompress_s = time_median([&] { compressor->decompress(wire, 1, out); });
      }
      const double in = static_cast<double>(n * 4);
      const double compress_gbps = in / compress_s / 1e9;
      const double decompress_gbps = in / decompress_s / 1e9;
      if (json) {
        std::printf("%s\n", nlohmann::json{{"compressor", name},
                                           {"device", "cpu"},
                                           {"bytes", n * 4},
                                           {"compress_gbps", compress_gbps},
                                           {"decompress_gbps", decompress_gbps},
                                           {"copy_gbps", copy_gbps},
                                           {"wire_bytes", wire_bytes}}
                                .dump()
                                .c_str());
      } else {
        std::printf("%-18s %12zu %14.2f %16.2f %10.2f %8.0f%% %9.4f\n", name.c_str(), n * 4,
                    compress_gbps, decompress_gbps, copy_gbps, 100 * compress_gbps / copy_gbps,
                    static_cast<double>(wire_bytes) / in);
      }
      std::fflush(stdout);
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return unimsg::run_program("unimsg-bench-compress", argc, argv, run);
}
