// unimsg-bench-allreduce: an nccl-tests style allreduce sweep. Backends (raw MPI_Allreduce, the
// unimsg engine) are measured interleaved — size by size, iteration by iteration, in reverse
// order every other iteration — so that their ratio comes from the same machine conditions.
//
//   mpirun -np 4 unimsg-bench-allreduce -b 8 -e 64M -f 2 -n 20 -w 5 -c 1 --backend mpi,engine

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "unimsg/collectives/engine.hpp"
#include "unimsg/collectives/mpi_communicator.hpp"
#include "unimsg/core/cli.hpp"
#include "unimsg/core/config.hpp"
#include "unimsg/core/error.hpp"
#ifdef UNIMSG_WITH_NCCL
#include "unimsg/collectives/nccl_communicator.hpp"
#include "unimsg/kernels/device.hpp"
#include "unimsg/kernels/device_memory.hpp"
#endif
#include "unimsg/services/runtime.hpp"

namespace {

using Clock = std::chrono::steady_clock;
using unimsg::DType;
using unimsg::ReduceOp;

struct DTypeName {
  const char* name;
  DType dtype;
};
constexpr DTypeName kDTypes[] = {{"float", DType::kF32},     {"half", DType::kF16},
                                 {"bfloat16", DType::kBF16}, {"double", DType::kF64},
                                 {"int32", DType::kI32},     {"int64", DType::kI64},
                                 {"uint8", DType::kU8}};

DType parse_dtype(const std::string& text) {
  for (const auto& d : kDTypes) {
    if (text == d.name || text == unimsg::to_string(d.dtype)) return d.dtype;
  }
  throw unimsg::ConfigError(
      unimsg::kNoRank, "-d",
      "unknown datatype '" + text + "' (float, half, bfloat16, double, int32, int64, uint8)");
}
const char* dtype_name(DType dtype) {
  for (const auto& d : kDTypes) {
    if (d.dtype == dtype) return d.name;
  }
  return "?";
}

ReduceOp parse_op(const std::string& text) {
  if (text == "sum") return ReduceOp::kSum;
  if (text == "avg") return ReduceOp::kAvg;
  if (text == "min") return ReduceOp::kMin;
  if (text == "max") return ReduceOp::kMax;
  throw unimsg::ConfigError(unimsg::kNoRank, "-o",
                            "unknown op '" + text + "' (sum, avg, min, max)");
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kMin:
      return MPI_MIN;
    case ReduceOp::kMax:
      return MPI_MAX;
    default:
      return MPI_SUM;
  }
}

// Small integers: exact in every dtype for up to 8 ranks.
double input(int rank, std::size_t i) {
  return static_cast<double>((rank + i) % 7);
}

double expected(ReduceOp op, DType dtype, int ranks, std::size_t i) {
  double result = input(0, i);
  for (int r = 1; r < ranks; ++r) {
    const double v = input(r, i);
    if (op == ReduceOp::kMin)
      result = std::min(result, v);
    else if (op == ReduceOp::kMax)
      result = std::max(result, v);
    else
      result += v;
  }
  if (op == ReduceOp::kAvg) {
    const bool integer = dtype == DType::kI32 || dtype == DType::kI64 || dtype == DType::kU8;
    result = integer ? std::trunc(result / ranks) : result / ranks;
  }
  return result;
}

#ifdef UNIMSG_WITH_NCCL
// A device buffer addressed by bytes.
struct DeviceBytes : unimsg::DeviceBuffer {
  using DeviceBuffer::DeviceBuffer;
  std::byte* data() { return static_cast<std::byte*>(DeviceBuffer::data()); }
};
#endif

struct Variant {
  std::string backend;  // "mpi", "nccl", "engine" or "engine+trace"
  int tensors = 1;
  unimsg::CompressionSpec compress;  // the engine's; the raw backends never compress
};

struct Measurement {
  std::vector<double> times_us;
  std::uint64_t wrong = 0;
  double extra_wire_bytes = 0;   // engine: bus negotiation bytes per iteration
  double engine_wire_bytes = 0;  // engine: what it counted for the tensors (compressed or ring)
};

double percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const std::size_t index =
      std::min(values.size() - 1, static_cast<std::size_t>(p * static_cast<double>(values.size())));
  return values[index];
}

int run(int argc, char** argv) {
  cxxopts::Options cli("unimsg-bench-allreduce",
                       "nccl-tests style allreduce sweep of raw MPI and the unimsg engine, "
                       "measured interleaved. Run under mpirun.");
  cli.add_options()("b,minbytes", "smallest size (K/M/G suffixes)",
                    cxxopts::value<std::string>()->default_value("8"))(
      "e,maxbytes", "largest size", cxxopts::value<std::string>()->default_value("64M"))(
      "f,stepfactor", "size multiplier between rows", cxxopts::value<int>()->default_value("2"))(
      "n,iters", "timed iterations per size", cxxopts::value<int>()->default_value("20"))(
      "w,warmup_iters", "warm-up iterations per size", cxxopts::value<int>()->default_value("5"))(
      "c,check", "check results (0/1)", cxxopts::value<int>()->default_value("1"))(
      "d,datatype", "float, half, bfloat16, double, int32, int64, uint8",
      cxxopts::value<std::string>()->default_value("float"))(
      "o,op", "sum, avg, min, max", cxxopts::value<std::string>()->default_value("sum"))(
      "backend",
      "mpi, engine, nccl (device memory, one GPU per rank), or a comma list measured "
      "interleaved",
      cxxopts::value<std::string>()->default_value("mpi,engine"))(
      "compress",
      "the engine's compression: none, fp16, bf16, int8, onebit, topk[:ratio], randomk[:ratio] "
      "(with :noef, :sampled) or a comma list, each an engine row; busbw is on the "
      "uncompressed size",
      cxxopts::value<std::string>()->default_value("none"))(
      "tensors", "split each size into K tensors (raw backends: K calls and 1 call)",
      cxxopts::value<int>()->default_value("1"))("json", "one JSON object per row, from rank 0")(
      "min-bw", "exit 1 when a backend's average bus bandwidth (GB/s) is below this",
      cxxopts::value<double>()->default_value("0"))(
      "stats", "add p50/p99 times per row (out of place / in place)")("h,help", "show this help");
  const auto args = cli.parse(argc, argv);
  if (args.count("help")) {
    std::printf("%s\n", cli.help().c_str());
    return 0;
  }
  const auto min_bytes = unimsg::parse_size(args["minbytes"].as<std::string>(), "-b");
  const auto max_bytes = unimsg::parse_size(args["maxbytes"].as<std::string>(), "-e");
  const int factor = args["stepfactor"].as<int>();
  const int iters = args["iters"].as<int>();
  const int warmup = args["warmup_iters"].as<int>();
  const bool check = args["check"].as<int>() != 0;
  const DType dtype = parse_dtype(args["datatype"].as<std::string>());
  const ReduceOp op = parse_op(args["op"].as<std::string>());
  const int tensors = args["tensors"].as<int>();
  const bool json = args.count("json") > 0;
  const bool stats = args.count("stats") > 0;
  const double min_bw = args["min-bw"].as<double>();
  if (factor < 2) throw unimsg::ConfigError(unimsg::kNoRank, "-f", "must be at least 2");
  if (iters < 1 || warmup < 0)
    throw unimsg::ConfigError(unimsg::kNoRank, "-n/-w", "-n >= 1, -w >= 0");
  if (tensors < 1) throw unimsg::ConfigError(unimsg::kNoRank, "--tensors", "must be at least 1");
  if (min_bytes == 0 || min_bytes > max_bytes) {
    throw unimsg::ConfigError(unimsg::kNoRank, "-b/-e", "need 0 < minbytes <= maxbytes");
  }
  std::vector<Variant> variants;
  {
    std::stringstream list(args["backend"].as<std::string>());
    std::string name;
    while (std::getline(list, name, ',')) {
      if (name == "mpi") {
        if (unimsg::mpi_datatype(dtype) == MPI_DATATYPE_NULL) {
          throw unimsg::ConfigError(unimsg::kNoRank, "--backend",
                                    std::string("raw MPI has no datatype for ") +
                                        dtype_name(dtype) + "; use --backend engine");
        }
        variants.push_back({"mpi", tensors, {}});
        if (tensors > 1) variants.push_back({"mpi", 1, {}});
      } else if (name == "engine" || name == "engine+trace") {
        std::stringstream compressors(args["compress"].as<std::string>());
        std::string text;
        while (std::getline(compressors, text, ',')) {
          const auto spec = unimsg::CompressionSpec::parse(text);
          if (spec.compresses() &&
              (dtype != DType::kF32 || (op != ReduceOp::kSum && op != ReduceOp::kAvg))) {
            throw unimsg::ConfigError(unimsg::kNoRank, "--compress",
                                      "compression takes -d float with -o sum or avg");
          }
          variants.push_back({name, tensors, spec});
        }
      } else if (name == "nccl") {
#ifdef UNIMSG_WITH_NCCL
        variants.push_back({"nccl", tensors, {}});
#else
        throw unimsg::ConfigError(unimsg::kNoRank, "--backend",
                                  "this build has no NCCL backend (UNIMSG_WITH_NCCL=OFF)");
#endif
      } else {
        throw unimsg::ConfigError(
            unimsg::kNoRank, "--backend",
            "unknown backend '" + name + "' (mpi, engine, engine+trace, nccl)");
      }
    }
  }

  unimsg::Runtime runtime(&argc, &argv);
  const int rank = runtime.rank();
  const int ranks = runtime.size();
  unimsg::MpiCommunicator communicator(MPI_COMM_WORLD, runtime.bus(),
                                       unimsg::CommunicatorOptions::from_env());
  std::unique_ptr<unimsg::Engine> engine;
  // engine+trace: a second engine recording timeline spans (UNIMSG_TIMELINE's cost).
  unimsg::TraceRecorder recorder;
  std::unique_ptr<unimsg::Engine> traced_engine;
  for (const auto& v : variants) {
    if (v.backend == "engine" && !engine) {
      engine = std::make_unique<unimsg::Engine>(communicator, runtime.bus(),
                                                unimsg::EngineOptions::from_env());
    }
    if (v.backend == "engine+trace" && !traced_engine) {
      auto options = unimsg::EngineOptions::from_env();
      options.trace = &recorder;
      traced_engine = std::make_unique<unimsg::Engine>(communicator, runtime.bus(), options);
    }
  }
#ifdef UNIMSG_WITH_NCCL
  std::unique_ptr<unimsg::NcclCommunicator> nccl;
  for (const auto& v : variants) {
    if (v.backend == "nccl" && !nccl) {
      const auto devices = unimsg::query_devices();
      if (devices.count == 0) {
        throw unimsg::ConfigError(rank, "--backend nccl", "no GPU: " + devices.reason);
      }
      unimsg::set_device(rank % devices.count);
      nccl = std::make_unique<unimsg::NcclCommunicator>(MPI_COMM_WORLD, runtime.bus(),
                                                        rank % devices.count,
                                                        unimsg::CommunicatorOptions::from_env());
    }
  }
#endif
  MPI_Comm raw = MPI_COMM_NULL;
  MPI_Comm_dup(MPI_COMM_WORLD, &raw);
  const std::size_t element = unimsg::dtype_size(dtype);
  const double bus_factor = ranks > 1 ? 2.0 * (ranks - 1) / ranks : 0.0;

  if (rank == 0 && !json) {
    std::printf("# unimsg-bench-allreduce: %d ranks, %s %s, %d iters, %d warm-up, interleaved\n",
                ranks, dtype_name(dtype), args["op"].as<std::string>().c_str(), iters, warmup);
    std::printf("#%31s %12s %12s %6s %6s %41s %41s\n", "", "", "", "", "", "out-of-place",
                "in-place");
    std::printf("# %-8s %4s %12s %12s %8s %6s %6s %9s %8s %8s %6s %9s %8s %8s %6s\n", "backend",
                "tens", "size", "count", "type", "redop", "root", "time", "algbw", "busbw",
                "#wrong", "time", "algbw", "busbw", "#wrong");
    std::printf("# %-8s %4s %12s %12s %8s %6s %6s %9s %8s %8s %6s %9s %8s %8s %6s\n", "", "", "(B)",
                "(elements)", "", "", "", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(GB/s)",
                "(GB/s)", "");
    std::fflush(stdout);
  }

  std::map<std::string, std::pair<double, int>> bw_sum;  // per variant: sum of busbw, rows
  std::uint64_t total_wrong = 0;
  for (std::uint64_t bytes = min_bytes; bytes <= max_bytes;
       bytes *= static_cast<std::uint64_t>(factor)) {
    const std::size_t count = std::max<std::size_t>(1, bytes / element);
    const std::size_t size_bytes = count * element;
    std::vector<std::byte> send(size_bytes + 1), recv(size_bytes + 1), reference(size_bytes + 1);
#ifdef UNIMSG_WITH_NCCL
    std::unique_ptr<DeviceBytes> device_send, device_recv;
    if (nccl) {
      device_send = std::make_unique<DeviceBytes>(size_bytes);
      device_recv = std::make_unique<DeviceBytes>(size_bytes);
    }
#endif
    for (std::size_t i = 0; i < count; ++i)
      unimsg::store_element(reference.data(), dtype, i, input(rank, i));
    // Tensor k covers [k * count / K, (k + 1) * count / K).
    const auto slice = [&](int k, int of) {
      const std::size_t begin = count * static_cast<std::size_t>(k) / static_cast<std::size_t>(of);
      const std::size_t end =
          count * static_cast<std::size_t>(k + 1) / static_cast<std::size_t>(of);
      return std::pair<std::size_t, std::size_t>(begin, end - begin);
    };

    // Built before timing, as a trainer's parameter names are: the engine's time is its own.
    std::vector<std::vector<std::string>> tensor_names(variants.size());
    for (std::size_t v = 0; v < variants.size(); ++v) {
      for (int k = 0; k < variants[v].tensors; ++k) {
        tensor_names[v].push_back("bench." + std::to_string(v) + "." + std::to_string(k));
      }
    }
    std::map<std::pair<std::size_t, bool>, Measurement> results;  // (variant, inplace)
    const auto run_once = [&](std::size_t v, bool inplace, bool timed, int iteration) {
      const Variant& variant = variants[v];
      std::memcpy(send.data(), reference.data(), size_bytes);
      if (inplace) std::memset(recv.data(), 0, size_bytes);
      std::byte* result = inplace ? send.data() : recv.data();
#ifdef UNIMSG_WITH_NCCL
      if (variant.backend == "nccl") device_send->copy_from_host(reference.data(), size_bytes);
#endif
      const auto bus_before = runtime.bus().stats().sent_bytes;
      unimsg::Engine* const chosen =
          variant.backend == "engine+trace" ? traced_engine.get() : engine.get();
      const auto engine_before = chosen ? chosen->stats().wire_bytes : 0;
      MPI_Barrier(raw);
      const auto start = Clock::now();
      if (variant.backend == "mpi") {
        for (int k = 0; k < variant.tensors; ++k) {
          const auto [offset, n] = slice(k, variant.tensors);
          MPI_Allreduce(inplace ? MPI_IN_PLACE : send.data() + offset * element,
                        result + offset * element, static_cast<int>(n), unimsg::mpi_datatype(dtype),
                        mpi_op(op), raw);
        }
        if (op == ReduceOp::kAvg) {
          for (std::size_t i = 0; i < count; ++i) {
            unimsg::store_element(result, dtype, i, unimsg::load_element(result, dtype, i) / ranks);
          }
        }
#ifdef UNIMSG_WITH_NCCL
      } else if (variant.backend == "nccl") {
        std::vector<unimsg::Work> works;
        for (int k = 0; k < variant.tensors; ++k) {
          const auto [offset, n] = slice(k, variant.tensors);
          const unimsg::TensorView in{device_send->data() + offset * element, n, dtype,
                                      unimsg::Device::kCuda};
          const unimsg::TensorView out{
              (inplace ? device_send->data() : device_recv->data()) + offset * element, n, dtype,
              unimsg::Device::kCuda};
          works.push_back(nccl->allreduce(in, out, op));
        }
        for (auto& work : works) work.wait();
#endif
      } else {
        std::vector<unimsg::Work> works;
        for (int k = 0; k < variant.tensors; ++k) {
          const auto [offset, n] = slice(k, variant.tensors);
          const unimsg::TensorView in{send.data() + offset * element, n, dtype,
                                      unimsg::Device::kHost};
          const unimsg::TensorView out{result + offset * element, n, dtype, unimsg::Device::kHost};
          works.push_back(chosen->submit(tensor_names[v][static_cast<std::size_t>(k)], in, out, op,
                                         variant.compress));
        }
        for (auto& work : works) work.wait();
      }
      const double us = std::chrono::duration<double, std::micro>(Clock::now() - start).count();
      if (chosen == traced_engine.get() && chosen != nullptr) recorder.take();  // bounded memory
      if (!timed) return;
      Measurement& m = results[{v, inplace}];
      m.times_us.push_back(us);
      m.extra_wire_bytes += static_cast<double>(runtime.bus().stats().sent_bytes - bus_before);
      if (chosen)
        m.engine_wire_bytes += static_cast<double>(chosen->stats().wire_bytes - engine_before);
      if (check && iteration == 0 && variant.compress.compresses()) {
        // Lossy by design: every rank must hold bitwise the same result, and fp16/bf16 must stay
        // within their rounding (the inputs are small integers).
        std::vector<std::byte> first(result, result + size_bytes);
        MPI_Bcast(first.data(), static_cast<int>(size_bytes), MPI_BYTE, 0, raw);
        const bool cast = variant.compress.name == "fp16" || variant.compress.name == "bf16";
        const double tolerance = variant.compress.name == "fp16" ? 2e-3 : 1.6e-2;
        for (std::size_t i = 0; i < count; ++i) {
          const double got = unimsg::load_element(result, dtype, i);
          const double want = expected(op, dtype, ranks, i);
          if (std::memcmp(first.data() + i * element, result + i * element, element) != 0 ||
              (cast && std::abs(got - want) > tolerance * std::abs(want) + 1e-6)) {
            ++m.wrong;
          }
        }
      } else if (check && iteration == 0) {
#ifdef UNIMSG_WITH_NCCL
        if (variant.backend == "nccl") {
          (inplace ? device_send : device_recv)->copy_to_host(result, size_bytes);
        }
#endif
        for (std::size_t i = 0; i < count; ++i) {
          const double want = expected(op, dtype, ranks, i);
          const double got = unimsg::load_element(result, dtype, i);
          if (std::abs(got - want) > 1e-3 * std::abs(want)) ++m.wrong;
        }
      }
    };
    // Every other iteration runs the backends in reverse order. In a fixed order the slot an
    // operation takes in the sequence biases it: measured, 4 ranks on 2 cores, 1-2 MiB, the
    // second out-of-place and the first in-place operation of each iteration ran 15-30 % slower
    // whichever backend took them, so a fixed order handed that bias to one backend.
    const auto in_turn = [&](int iteration, std::size_t position) {
      return iteration % 2 == 0 ? position : variants.size() - 1 - position;
    };
    for (int w = 0; w < warmup; ++w) {
      for (const bool inplace : {false, true}) {
        for (std::size_t v = 0; v < variants.size(); ++v)
          run_once(in_turn(w, v), inplace, false, w);
      }
    }
    for (int it = 0; it < iters; ++it) {
      for (const bool inplace : {false, true}) {
        for (std::size_t v = 0; v < variants.size(); ++v)
          run_once(in_turn(it, v), inplace, true, it);
      }
    }
    // The slowest rank's time per iteration, and everyone's wrong counts.
    for (auto& [key, m] : results) {
      MPI_Allreduce(MPI_IN_PLACE, m.times_us.data(), static_cast<int>(m.times_us.size()),
                    MPI_DOUBLE, MPI_MAX, raw);
      MPI_Allreduce(MPI_IN_PLACE, &m.wrong, 1, MPI_UINT64_T, MPI_SUM, raw);
    }
    if (rank != 0) continue;
    for (std::size_t v = 0; v < variants.size(); ++v) {
      const Variant& variant = variants[v];
      double row_time[2], row_alg[2], row_bus[2];
      std::uint64_t row_wrong[2];
      for (const bool inplace : {false, true}) {
        const Measurement& m = results[{v, inplace}];
        double total = 0;
        for (const double t : m.times_us) total += t;
        const double avg = total / static_cast<double>(m.times_us.size());
        const double algbw = static_cast<double>(size_bytes) / (avg * 1e-6) / 1e9;
        const double busbw = algbw * bus_factor;
        const int i = inplace ? 1 : 0;
        row_time[i] = avg;
        row_alg[i] = algbw;
        row_bus[i] = busbw;
        row_wrong[i] = m.wrong;
        total_wrong += m.wrong;
        auto& sum = bw_sum[variant.backend + "/" + std::to_string(variant.tensors) + "/" +
                           variant.compress.to_string()];
        sum.first += busbw;
        sum.second += 1;
        if (json) {
          nlohmann::json row = {
              {"backend", variant.backend},
              {"compress", variant.compress.to_string()},
              {"tensors", variant.tensors},
              {"inplace", inplace},
              {"bytes", size_bytes},
              {"count", count},
              {"dtype", dtype_name(dtype)},
              {"op", args["op"].as<std::string>()},
              {"ranks", ranks},
              {"time_us", avg},
              {"algbw", algbw},
              {"busbw", busbw},
              {"wrong", m.wrong},
              {"wire_bytes", (variant.backend.rfind("engine", 0) == 0
                                  ? m.engine_wire_bytes
                                  : static_cast<double>(size_bytes) * bus_factor *
                                        static_cast<double>(m.times_us.size())) /
                                     static_cast<double>(m.times_us.size()) +
                                 m.extra_wire_bytes / static_cast<double>(m.times_us.size())}};
          if (stats) {
            row["p50_us"] = percentile(m.times_us, 0.5);
            row["p99_us"] = percentile(m.times_us, 0.99);
          }
          std::printf("%s\n", row.dump().c_str());
        }
      }
      if (!json) {
        std::printf(
            "  %-8s %4d %12zu %12zu %8s %6s %6d %9.1f %8.2f %8.2f %6llu %9.1f %8.2f %8.2f %6llu",
            variant.compress.compresses()
                ? ("e:" + variant.compress.to_string().substr(0, 6)).c_str()
                : variant.backend.c_str(),
            variant.tensors, size_bytes, count, dtype_name(dtype),
            args["op"].as<std::string>().c_str(), -1, row_time[0], row_alg[0], row_bus[0],
            static_cast<unsigned long long>(row_wrong[0]), row_time[1], row_alg[1], row_bus[1],
            static_cast<unsigned long long>(row_wrong[1]));
        if (stats) {
          std::printf("   p50 %.1f / %.1f p99 %.1f / %.1f us",
                      percentile(results[{v, false}].times_us, 0.5),
                      percentile(results[{v, true}].times_us, 0.5),
                      percentile(results[{v, false}].times_us, 0.99),
                      percentile(results[{v, true}].times_us, 0.99));
        }
        std::printf("\n");
      }
    }
    std::fflush(stdout);
  }
  int exit_code = 0;
  if (engine && rank == 0) {
    const auto s = engine->stats();
    if (!json) {
      std::printf(
          "# engine: %llu cycles, %llu negotiation rounds, %llu cache hits, %llu tensors in "
          "%llu collectives (%llu fused where the tensors lay), engine thread woken %llu times\n",
          static_cast<unsigned long long>(s.cycles),
          static_cast<unsigned long long>(s.negotiation_rounds),
          static_cast<unsigned long long>(s.cache_hits),
          static_cast<unsigned long long>(s.tensors_reduced),
          static_cast<unsigned long long>(s.collectives),
          static_cast<unsigned long long>(s.fused_in_place),
          static_cast<unsigned long long>(s.engine_thread_wakeups));
    }
  }
  if (rank == 0) {
    if (!json)
      std::printf("# Out of bounds values : %llu %s\n",
                  static_cast<unsigned long long>(total_wrong), total_wrong ? "FAILED" : "OK");
    for (const auto& [name, sum] : bw_sum) {
      const double avg = sum.first / sum.second;
      if (!json) std::printf("# Avg bus bandwidth    : %.4f GB/s (%s)\n", avg, name.c_str());
      if (min_bw > 0 && avg < min_bw) {
        std::fprintf(
            stderr,
            "unimsg-bench-allreduce: %s average bus bandwidth %.4f GB/s is below --min-bw %.4f\n",
            name.c_str(), avg, min_bw);
        exit_code = 1;
      }
    }
    // The timeline's cost: the traced engine against the same engine untraced, same run.
    for (const auto& [name, sum] : bw_sum) {
      if (name.rfind("engine+trace/", 0) != 0) continue;
      const auto plain = bw_sum.find("engine/" + name.substr(std::string("engine+trace/").size()));
      if (plain == bw_sum.end() || plain->second.first <= 0) continue;
      const double ratio = (sum.first / sum.second) / (plain->second.first / plain->second.second);
      if (!json) std::printf("# engine+trace / engine busbw: %.3f (%s)\n", ratio, name.c_str());
    }
    if (total_wrong) exit_code = 1;
  }
  MPI_Bcast(&exit_code, 1, MPI_INT, 0, raw);
  MPI_Comm_free(&raw);
  return exit_code;
}

}  // namespace

int main(int argc, char** argv) {
  return unimsg::run_program("unimsg-bench-allreduce", argc, argv, run);
}
