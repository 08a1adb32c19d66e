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
  std::string backend;  // "mpi", "shm", "nccl", "engine", "engine+trace" or "engine-agreed"
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

struct Settings {
  std::uint64_t min_bytes = 0;
  std::uint64_t max_bytes = 0;
  int factor = 2;
  int iters = 20;
  int warmup = 5;
  bool check = true;
  DType dtype = DType::kF32;
  ReduceOp op = ReduceOp::kSum;
  std::string op_text;  // as given, for the printed rows
  int tensors = 1;
  bool json = false;
  bool stats = false;
  double min_bw = 0;
  std::string backends;
  std::string compress;
};

void declare_options(cxxopts::Options& cli) {
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
      "mpi, engine, engine+trace (recording a timeline), engine-agreed (without speculation: an "
      "agreement allreduce every cycle), shm (unimsg's MPI backend with its shared-memory "
      "allreduce on: within each host, hierarchical across hosts that hold as many ranks each), "
      "nccl (device memory, one GPU per rank), or a comma list measured interleaved",
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
}

Settings parse_settings(const cxxopts::ParseResult& args) {
  Settings s;
  s.min_bytes = unimsg::parse_size(args["minbytes"].as<std::string>(), "-b");
  s.max_bytes = unimsg::parse_size(args["maxbytes"].as<std::string>(), "-e");
  s.factor = args["stepfactor"].as<int>();
  s.iters = args["iters"].as<int>();
  s.warmup = args["warmup_iters"].as<int>();
  s.check = args["check"].as<int>() != 0;
  s.dtype = parse_dtype(args["datatype"].as<std::string>());
  s.op_text = args["op"].as<std::string>();
  s.op = parse_op(s.op_text);
  s.tensors = args["tensors"].as<int>();
  s.json = args.count("json") > 0;
  s.stats = args.count("stats") > 0;
  s.min_bw = args["min-bw"].as<double>();
  s.backends = args["backend"].as<std::string>();
  s.compress = args["compress"].as<std::string>();
  if (s.factor < 2) throw unimsg::ConfigError(unimsg::kNoRank, "-f", "must be at least 2");
  if (s.iters < 1 || s.warmup < 0)
    throw unimsg::ConfigError(unimsg::kNoRank, "-n/-w", "-n >= 1, -w >= 0");
  if (s.tensors < 1) throw unimsg::ConfigError(unimsg::kNoRank, "--tensors", "must be at least 1");
  if (s.min_bytes == 0 || s.min_bytes > s.max_bytes) {
    throw unimsg::ConfigError(unimsg::kNoRank, "-b/-e", "need 0 < minbytes <= maxbytes");
  }
  return s;
}

// One engine row per --compress entry.
void add_engine_variants(const Settings& s, const std::string& name,
                         std::vector<Variant>& variants) {
  std::stringstream compressors(s.compress);
  std::string text;
  while (std::getline(compressors, text, ',')) {
    const auto spec = unimsg::CompressionSpec::parse(text);
    if (spec.compresses() &&
        (s.dtype != DType::kF32 || (s.op != ReduceOp::kSum && s.op != ReduceOp::kAvg))) {
      throw unimsg::ConfigError(unimsg::kNoRank, "--compress",
                                "compression takes -d float with -o sum or avg");
    }
    variants.push_back({name, s.tensors, spec});
  }
}

std::vector<Variant> parse_variants(const Settings& s) {
  std::vector<Variant> variants;
  std::stringstream list(s.backends);
  std::string name;
  while (std::getline(list, name, ',')) {
    if (name == "mpi") {
      if (unimsg::mpi_datatype(s.dtype) == MPI_DATATYPE_NULL) {
        throw unimsg::ConfigError(unimsg::kNoRank, "--backend",
                                  std::string("raw MPI has no datatype for ") +
                                      dtype_name(s.dtype) + "; use --backend engine");
      }
      variants.push_back({"mpi", s.tensors, {}});
      if (s.tensors > 1) variants.push_back({"mpi", 1, {}});
    } else if (name == "engine" || name == "engine+trace" || name == "engine-agreed") {
      add_engine_variants(s, name, variants);
    } else if (name == "shm") {
      variants.push_back({"shm", s.tensors, {}});
    } else if (name == "nccl") {
#ifdef UNIMSG_WITH_NCCL
      variants.push_back({"nccl", s.tensors, {}});
#else
      throw unimsg::ConfigError(unimsg::kNoRank, "--backend",
                                "this build has no NCCL backend (UNIMSG_WITH_NCCL=OFF)");
#endif
    } else {
      throw unimsg::ConfigError(
          unimsg::kNoRank, "--backend",
          "unknown backend '" + name + "' (mpi, engine, engine+trace, engine-agreed, shm, nccl)");
    }
  }
  return variants;
}

// The communicators and engines the variants need, each made once.
struct Backends {
  unimsg::MpiCommunicator communicator;
  std::unique_ptr<unimsg::Engine> engine;
  // engine+trace: a second engine recording timeline spans (UNIMSG_TIMELINE's cost).
  unimsg::TraceRecorder recorder;
  std::unique_ptr<unimsg::Engine> traced_engine;
  // engine-agreed: an engine whose every cycle has an agreement allreduce of its own (what
  // speculation saves).
  std::unique_ptr<unimsg::Engine> agreed_engine;
  // shm: the MPI backend with its shared-memory allreduce at every size.
  std::unique_ptr<unimsg::MpiCommunicator> shm;
#ifdef UNIMSG_WITH_NCCL
  std::unique_ptr<unimsg::NcclCommunicator> nccl;
#endif

  Backends(unimsg::Runtime& runtime, const std::vector<Variant>& variants)
      : communicator(MPI_COMM_WORLD, runtime.bus(), unimsg::CommunicatorOptions::from_env()) {
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
      if (v.backend == "engine-agreed" && !agreed_engine) {
        auto options = unimsg::EngineOptions::from_env();
        options.speculate = false;
        agreed_engine = std::make_unique<unimsg::Engine>(communicator, runtime.bus(), options);
      }
      if (v.backend == "shm" && !shm) {
        auto options = unimsg::CommunicatorOptions::from_env();
        options.hierarchical = unimsg::CommunicatorOptions::Hierarchical::kOn;
        shm = std::make_unique<unimsg::MpiCommunicator>(MPI_COMM_WORLD, runtime.bus(), options);
      }
    }
#ifdef UNIMSG_WITH_NCCL
    const int rank = runtime.rank();
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
  }
};

// What every size of the sweep shares.
struct Context {
  const Settings& settings;
  const std::vector<Variant>& variants;
  unimsg::Runtime& runtime;
  Backends& backends;
  MPI_Comm raw;
  int rank;
  int ranks;
  std::size_t element;
  double bus_factor;
};

void print_header(const Context& ctx) {
  const Settings& s = ctx.settings;
  std::printf("# unimsg-bench-allreduce: %d ranks, %s %s, %d iters, %d warm-up, interleaved\n",
              ctx.ranks, dtype_name(s.dtype), s.op_text.c_str(), s.iters, s.warmup);
  std::printf("#%31s %12s %12s %6s %6s %41s %41s\n", "", "", "", "", "", "out-of-place",
              "in-place");
  std::printf("# %-8s %4s %12s %12s %8s %6s %6s %9s %8s %8s %6s %9s %8s %8s %6s\n", "backend",
              "tens", "size", "count", "type", "redop", "root", "time", "algbw", "busbw", "#wrong",
              "time", "algbw", "busbw", "#wrong");
  std::printf("# %-8s %4s %12s %12s %8s %6s %6s %9s %8s %8s %6s %9s %8s %8s %6s\n", "", "", "(B)",
              "(elements)", "", "", "", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(GB/s)", "(GB/s)",
              "");
  std::fflush(stdout);
}

// What rank 0 adds up over the sweep.
struct Totals {
  std::map<std::string, std::pair<double, int>> bw_sum;  // per variant: sum of busbw, rows
  std::uint64_t wrong = 0;
};

// One row's figures, out of place or in place.
struct RowFigures {
  double time = 0;
  double algbw = 0;
  double busbw = 0;
  std::uint64_t wrong = 0;
};

// One size of the sweep: its buffers, its measurements and its rows.
class SizeRun {
 public:
  SizeRun(const Context& ctx, std::uint64_t bytes)
      : ctx_(ctx),
        dtype_(ctx.settings.dtype),
        op_(ctx.settings.op),
        count_(std::max<std::size_t>(1, bytes / ctx.element)),
        size_bytes_(count_ * ctx.element),
        send_(size_bytes_ + 1),
        recv_(size_bytes_ + 1),
        reference_(size_bytes_ + 1) {
#ifdef UNIMSG_WITH_NCCL
    if (ctx_.backends.nccl) {
      device_send_ = std::make_unique<DeviceBytes>(size_bytes_);
      device_recv_ = std::make_unique<DeviceBytes>(size_bytes_);
    }
#endif
    for (std::size_t i = 0; i < count_; ++i)
      unimsg::store_element(reference_.data(), dtype_, i, input(ctx_.rank, i));
    // Built before timing, as a trainer's parameter names are: the engine's time is its own.
    tensor_names_.resize(ctx_.variants.size());
    for (std::size_t v = 0; v < ctx_.variants.size(); ++v) {
      for (int k = 0; k < ctx_.variants[v].tensors; ++k) {
        tensor_names_[v].push_back("bench." + std::to_string(v) + "." + std::to_string(k));
      }
    }
  }

  // Every other iteration runs the backends in reverse order. In a fixed order the slot an
  // operation takes in the sequence biases it: measured, 4 ranks on 2 cores, 1-2 MiB, the
  // second out-of-place and the first in-place operation of each iteration ran 15-30 % slower
  // whichever backend took them, so a fixed order handed that bias to one backend.
  void measure() {
    const std::size_t variants = ctx_.variants.size();
    const auto in_turn = [&](int iteration, std::size_t position) {
      return iteration % 2 == 0 ? position : variants - 1 - position;
    };
    for (int w = 0; w < ctx_.settings.warmup; ++w) {
      for (const bool inplace : {false, true}) {
        for (std::size_t v = 0; v < variants; ++v) run_once(in_turn(w, v), inplace, false, w);
      }
    }
    for (int it = 0; it < ctx_.settings.iters; ++it) {
      for (const bool inplace : {false, true}) {
        for (std::size_t v = 0; v < variants; ++v) run_once(in_turn(it, v), inplace, true, it);
      }
    }
  }

  // The slowest rank's time per iteration, and everyone's wrong counts.
  void reduce_across_ranks() {
    for (auto& [key, m] : results_) {
      MPI_Allreduce(MPI_IN_PLACE, m.times_us.data(), static_cast<int>(m.times_us.size()),
                    MPI_DOUBLE, MPI_MAX, ctx_.raw);
      MPI_Allreduce(MPI_IN_PLACE, &m.wrong, 1, MPI_UINT64_T, MPI_SUM, ctx_.raw);
    }
  }

  // Rank 0: one row per variant, or two JSON objects.
  void report(Totals& totals) {
    for (std::size_t v = 0; v < ctx_.variants.size(); ++v) report_variant(v, totals);
  }

 private:
  // Tensor k covers [k * count / K, (k + 1) * count / K).
  std::pair<std::size_t, std::size_t> slice(int k, int of) const {
    const std::size_t begin = count_ * static_cast<std::size_t>(k) / static_cast<std::size_t>(of);
    const std::size_t end = count_ * static_cast<std::size_t>(k + 1) / static_cast<std::size_t>(of);
    return std::pair<std::size_t, std::size_t>(begin, end - begin);
  }

  void run_once(std::size_t v, bool inplace, bool timed, int iteration);
  void call_mpi(const Variant& variant, bool inplace, std::byte* result);
  void call_shm(const Variant& variant, bool inplace, std::byte* result);
#ifdef UNIMSG_WITH_NCCL
  void call_nccl(const Variant& variant, bool inplace);
#endif
  void call_engine(unimsg::Engine& chosen, std::size_t v, std::byte* result);
  std::uint64_t count_compressed_wrong(const Variant& variant, const std::byte* result);
  std::uint64_t count_wrong(const std::byte* result) const;
  RowFigures figures(const Measurement& m) const;
  void print_json_row(const Variant& variant, bool inplace, const Measurement& m,
                      const RowFigures& f) const;
  void print_text_row(std::size_t v, const RowFigures (&row)[2]);
  void report_variant(std::size_t v, Totals& totals);

  const Context& ctx_;
  const DType dtype_;
  const ReduceOp op_;
  const std::size_t count_;
  const std::size_t size_bytes_;
  std::vector<std::byte> send_, recv_, reference_;
#ifdef UNIMSG_WITH_NCCL
  std::unique_ptr<DeviceBytes> device_send_, device_recv_;
#endif
  std::vector<std::vector<std::string>> tensor_names_;
  std::map<std::pair<std::size_t, bool>, Measurement> results_;  // (variant, inplace)
};

void SizeRun::run_once(std::size_t v, bool inplace, bool timed, int iteration) {
  const Variant& variant = ctx_.variants[v];
  std::memcpy(send_.data(), reference_.data(), size_bytes_);
  if (inplace) std::memset(recv_.data(), 0, size_bytes_);
  std::byte* result = inplace ? send_.data() : recv_.data();
#ifdef UNIMSG_WITH_NCCL
  if (variant.backend == "nccl") device_send_->copy_from_host(reference_.data(), size_bytes_);
#endif
  const auto bus_before = ctx_.runtime.bus().stats().sent_bytes;
  unimsg::Engine* const chosen =
      variant.backend == "engine+trace"    ? ctx_.backends.traced_engine.get()
      : variant.backend == "engine-agreed" ? ctx_.backends.agreed_engine.get()
                                           : ctx_.backends.engine.get();
  const auto engine_before = chosen ? chosen->stats().wire_bytes : 0;
  MPI_Barrier(ctx_.raw);
  const auto start = Clock::now();
  if (variant.backend == "mpi") {
    call_mpi(variant, inplace, result);
  } else if (variant.backend == "shm") {
    call_shm(variant, inplace, result);
#ifdef UNIMSG_WITH_NCCL
  } else if (variant.backend == "nccl") {
    call_nccl(variant, inplace);
#endif
  } else {
    call_engine(*chosen, v, result);
  }
  const double us = std::chrono::duration<double, std::micro>(Clock::now() - start).count();
  if (chosen == ctx_.backends.traced_engine.get() && chosen != nullptr)
    ctx_.backends.recorder.take();  // bounded memory
  if (!timed) return;
  Measurement& m = results_[{v, inplace}];
  m.times_us.push_back(us);
  m.extra_wire_bytes += static_cast<double>(ctx_.runtime.bus().stats().sent_bytes - bus_before);
  if (chosen)
    m.engine_wire_bytes += static_cast<double>(chosen->stats().wire_bytes - engine_before);
  if (ctx_.settings.check && iteration == 0 && variant.compress.compresses()) {
    m.wrong += count_compressed_wrong(variant, result);
  } else if (ctx_.settings.check && iteration == 0) {
#ifdef UNIMSG_WITH_NCCL
    if (variant.backend == "nccl") {
      (inplace ? device_send_ : device_recv_)->copy_to_host(result, size_bytes_);
    }
#endif
    m.wrong += count_wrong(result);
  }
}

void SizeRun::call_mpi(const Variant& variant, bool inplace, std::byte* result) {
  const std::size_t element = ctx_.element;
  for (int k = 0; k < variant.tensors; ++k) {
    const auto [offset, n] = slice(k, variant.tensors);
    MPI_Allreduce(inplace ? MPI_IN_PLACE : send_.data() + offset * element,
                  result + offset * element, static_cast<int>(n), unimsg::mpi_datatype(dtype_),
                  mpi_op(op_), ctx_.raw);
  }
  if (op_ == ReduceOp::kAvg) {
    for (std::size_t i = 0; i < count_; ++i) {
      unimsg::store_element(result, dtype_, i,
                            unimsg::load_element(result, dtype_, i) / ctx_.ranks);
    }
  }
}

void SizeRun::call_shm(const Variant& variant, bool inplace, std::byte* result) {
  const std::size_t element = ctx_.element;
  for (int k = 0; k < variant.tensors; ++k) {
    const auto [offset, n] = slice(k, variant.tensors);
    const unimsg::TensorView in{send_.data() + offset * element, n, dtype_};
    const unimsg::TensorView out{result + offset * element, n, dtype_};
    ctx_.backends.shm->allreduce_now(inplace ? out : in, out, {op_});
  }
}

#ifdef UNIMSG_WITH_NCCL
void SizeRun::call_nccl(const Variant& variant, bool inplace) {
  const std::size_t element = ctx_.element;
  std::vector<unimsg::Work> works;
  for (int k = 0; k < variant.tensors; ++k) {
    const auto [offset, n] = slice(k, variant.tensors);
    const unimsg::TensorView in{device_send_->data() + offset * element, n, dtype_,
                                unimsg::Device::kCuda};
    const unimsg::TensorView out{
        (inplace ? device_send_->data() : device_recv_->data()) + offset * element, n, dtype_,
        unimsg::Device::kCuda};
    works.push_back(ctx_.backends.nccl->allreduce(in, out, op_));
  }
  for (auto& work : works) work.wait();
}
#endif

void SizeRun::call_engine(unimsg::Engine& chosen, std::size_t v, std::byte* result) {
  const Variant& variant = ctx_.variants[v];
  const std::size_t element = ctx_.element;
  std::vector<unimsg::Work> works;
  for (int k = 0; k < variant.tensors; ++k) {
    const auto [offset, n] = slice(k, variant.tensors);
    const unimsg::TensorView in{send_.data() + offset * element, n, dtype_, unimsg::Device::kHost};
    const unimsg::TensorView out{result + offset * element, n, dtype_, unimsg::Device::kHost};
    works.push_back(chosen.submit(tensor_names_[v][static_cast<std::size_t>(k)], in, out, op_,
                                  variant.compress));
  }
  for (auto& work : works) work.wait();
}

std::uint64_t SizeRun::count_compressed_wrong(const Variant& variant, const std::byte* result) {
  // Lossy by design: every rank must hold bitwise the same result, and fp16/bf16 must stay
  // within their rounding (the inputs are small integers).
  const std::size_t element = ctx_.element;
  std::uint64_t wrong = 0;
  std::vector<std::byte> first(result, result + size_bytes_);
  MPI_Bcast(first.data(), static_cast<int>(size_bytes_), MPI_BYTE, 0, ctx_.raw);
  const bool cast = variant.compress.name == "fp16" || variant.compress.name == "bf16";
  const double tolerance = variant.compress.name == "fp16" ? 2e-3 : 1.6e-2;
  for (std::size_t i = 0; i < count_; ++i) {
    const double got = unimsg::load_element(result, dtype_, i);
    const double want = expected(op_, dtype_, ctx_.ranks, i);
    if (std::memcmp(first.data() + i * element, result + i * element, element) != 0 ||
        (cast && std::abs(got - want) > tolerance * std::abs(want) + 1e-6)) {
      ++wrong;
    }
  }
  return wrong;
}

std::uint64_t SizeRun::count_wrong(const std::byte* result) const {
  std::uint64_t wrong = 0;
  for (std::size_t i = 0; i < count_; ++i) {
    const double want = expected(op_, dtype_, ctx_.ranks, i);
    const double got = unimsg::load_element(result, dtype_, i);
    if (std::abs(got - want) > 1e-3 * std::abs(want)) ++wrong;
  }
  return wrong;
}

RowFigures SizeRun::figures(const Measurement& m) const {
  double total = 0;
  for (const double t : m.times_us) total += t;
  RowFigures f;
  f.time = total / static_cast<double>(m.times_us.size());
  f.algbw = static_cast<double>(size_bytes_) / (f.time * 1e-6) / 1e9;
  f.busbw = f.algbw * ctx_.bus_factor;
  f.wrong = m.wrong;
  return f;
}

void SizeRun::print_json_row(const Variant& variant, bool inplace, const Measurement& m,
                             const RowFigures& f) const {
  const double bus_factor = ctx_.bus_factor;
  nlohmann::json row = {
      {"backend", variant.backend},
      {"compress", variant.compress.to_string()},
      {"tensors", variant.tensors},
      {"inplace", inplace},
      {"bytes", size_bytes_},
      {"count", count_},
      {"dtype", dtype_name(dtype_)},
      {"op", ctx_.settings.op_text},
      {"ranks", ctx_.ranks},
      {"time_us", f.time},
      {"algbw", f.algbw},
      {"busbw", f.busbw},
      {"wrong", m.wrong},
      {"wire_bytes",
       (variant.backend.rfind("engine", 0) == 0 ? m.engine_wire_bytes
                                                : static_cast<double>(size_bytes_) * bus_factor *
                                                      static_cast<double>(m.times_us.size())) /
               static_cast<double>(m.times_us.size()) +
           m.extra_wire_bytes / static_cast<double>(m.times_us.size())}};
  if (ctx_.settings.stats) {
    row["p50_us"] = percentile(m.times_us, 0.5);
    row["p99_us"] = percentile(m.times_us, 0.99);
  }
  std::printf("%s\n", row.dump().c_str());
}

void SizeRun::print_text_row(std::size_t v, const RowFigures (&row)[2]) {
  const Variant& variant = ctx_.variants[v];
  std::printf(
      "  %-8s %4d %12zu %12zu %8s %6s %6d %9.1f %8.2f %8.2f %6llu %9.1f %8.2f %8.2f %6llu",
      variant.compress.compresses() ? ("e:" + variant.compress.to_string().substr(0, 6)).c_str()
                                    : variant.backend.c_str(),
      variant.tensors, size_bytes_, count_, dtype_name(dtype_), ctx_.settings.op_text.c_str(), -1,
      row[0].time, row[0].algbw, row[0].busbw, static_cast<unsigned long long>(row[0].wrong),
      row[1].time, row[1].algbw, row[1].busbw, static_cast<unsigned long long>(row[1].wrong));
  if (ctx_.settings.stats) {
    std::printf("   p50 %.1f / %.1f p99 %.1f / %.1f us",
                percentile(results_[{v, false}].times_us, 0.5),
                percentile(results_[{v, true}].times_us, 0.5),
                percentile(results_[{v, false}].times_us, 0.99),
                percentile(results_[{v, true}].times_us, 0.99));
  }
  std::printf("\n");
}

void SizeRun::report_variant(std::size_t v, Totals& totals) {
  const Variant& variant = ctx_.variants[v];
  RowFigures row[2];
  for (const bool inplace : {false, true}) {
    const Measurement& m = results_[{v, inplace}];
    const RowFigures f = figures(m);
    row[inplace ? 1 : 0] = f;
    totals.wrong += m.wrong;
    auto& sum = totals.bw_sum[variant.backend + "/" + std::to_string(variant.tensors) + "/" +
                              variant.compress.to_string()];
    sum.first += f.busbw;
    sum.second += 1;
    if (ctx_.settings.json) print_json_row(variant, inplace, m, f);
  }
  if (!ctx_.settings.json) print_text_row(v, row);
}

void print_engine_stats(const unimsg::Engine& engine, bool json) {
  const auto s = engine.stats();
  if (json) return;
  std::printf(
      "# engine: %llu cycles, %llu negotiation rounds, %llu cache hits, %llu tensors in "
      "%llu collectives (%llu fused where the tensors lay), engine thread woken %llu times, "
      "%llu of %llu speculated batches reduced with their agreement\n",
      static_cast<unsigned long long>(s.cycles),
      static_cast<unsigned long long>(s.negotiation_rounds),
      static_cast<unsigned long long>(s.cache_hits),
      static_cast<unsigned long long>(s.tensors_reduced),
      static_cast<unsigned long long>(s.collectives),
      static_cast<unsigned long long>(s.fused_in_place),
      static_cast<unsigned long long>(s.engine_thread_wakeups),
      static_cast<unsigned long long>(s.speculations_reduced),
      static_cast<unsigned long long>(s.speculations));
}

// "# A / B busbw" for every row of backend A (`a`: its prefix in Totals) that B has too.
void print_ratio(const Settings& settings, const Totals& totals, const std::string& a,
                 const std::string& b) {
  for (const auto& [name, sum] : totals.bw_sum) {
    if (name.rfind(a, 0) != 0) continue;
    const auto other = totals.bw_sum.find(b + name.substr(a.size()));
    if (other == totals.bw_sum.end() || other->second.first <= 0) continue;
    const double ratio = (sum.first / sum.second) / (other->second.first / other->second.second);
    if (!settings.json) {
      std::printf("# %s / %s busbw: %.3f (%s)\n", a.substr(0, a.size() - 1).c_str(),
                  b.substr(0, b.size() - 1).c_str(), ratio, name.c_str());
    }
  }
}

// Rank 0's summary lines; the exit status.
int summarize(const Settings& settings, const Totals& totals) {
  int exit_code = 0;
  if (!settings.json)
    std::printf("# Out of bounds values : %llu %s\n", static_cast<unsigned long long>(totals.wrong),
                totals.wrong ? "FAILED" : "OK");
  for (const auto& [name, sum] : totals.bw_sum) {
    const double avg = sum.first / sum.second;
    if (!settings.json) std::printf("# Avg bus bandwidth    : %.4f GB/s (%s)\n", avg, name.c_str());
    if (settings.min_bw > 0 && avg < settings.min_bw) {
      std::fprintf(
          stderr,
          "unimsg-bench-allreduce: %s average bus bandwidth %.4f GB/s is below --min-bw %.4f\n",
          name.c_str(), avg, settings.min_bw);
      exit_code = 1;
    }
  }
  // Same run, same tensors: the traced engine against the engine (the timeline's cost), the
  // engine against the engine without speculation, the shared-memory allreduce against raw MPI.
  print_ratio(settings, totals, "engine+trace/", "engine/");
  print_ratio(settings, totals, "engine/", "engine-agreed/");
  print_ratio(settings, totals, "shm/", "mpi/");
  if (totals.wrong) exit_code = 1;
  return exit_code;
}

int run(int argc, char** argv) {
  cxxopts::Options cli("unimsg-bench-allreduce",
                       "nccl-tests style allreduce sweep of raw MPI and the unimsg engine, "
                       "measured interleaved. Run under mpirun.");
  declare_options(cli);
  const auto args = cli.parse(argc, argv);
  if (args.count("help")) {
    std::printf("%s\n", cli.help().c_str());
    return 0;
  }
  const Settings settings = parse_settings(args);
  const std::vector<Variant> variants = parse_variants(settings);

  unimsg::Runtime runtime(&argc, &argv);
  Backends backends(runtime, variants);
  MPI_Comm raw = MPI_COMM_NULL;
  MPI_Comm_dup(MPI_COMM_WORLD, &raw);
  const int ranks = runtime.size();
  const Context ctx{settings,
                    variants,
                    runtime,
                    backends,
                    raw,
                    runtime.rank(),
                    ranks,
                    unimsg::dtype_size(settings.dtype),
                    ranks > 1 ? 2.0 * (ranks - 1) / ranks : 0.0};
  if (ctx.rank == 0 && !settings.json) print_header(ctx);

  Totals totals;
  for (std::uint64_t bytes = settings.min_bytes; bytes <= settings.max_bytes;
       bytes *= static_cast<std::uint64_t>(settings.factor)) {
    SizeRun size_run(ctx, bytes);
    size_run.measure();
    size_run.reduce_across_ranks();
    if (ctx.rank != 0) continue;
    size_run.report(totals);
    std::fflush(stdout);
  }
  int exit_code = 0;
  if (backends.engine && ctx.rank == 0) print_engine_stats(*backends.engine, settings.json);
  if (ctx.rank == 0) exit_code = summarize(settings, totals);
  MPI_Bcast(&exit_code, 1, MPI_INT, 0, raw);
  MPI_Comm_free(&raw);
  return exit_code;
}

}  // namespace

int main(int argc, char** argv) {
  return unimsg::run_program("unimsg-bench-allreduce", argc, argv, run);
}
