// unimsg-bench-bus: ping-pong latency and streaming throughput of the bus against raw
// MPI_Send/MPI_Recv between ranks 0 and 1, measured in the same run, alternating trial by trial
// (and which goes first) so that both see the same machine conditions. Reports medians over the
// trials.
//
//   mpirun -np 2 unimsg-bench-bus [--json] [--trials 7] [--quick]

#include <spdlog/spdlog.h>
#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "unimsg/core/cli.hpp"
#include "unimsg/core/config.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/services/runtime.hpp"

namespace {

using Clock = std::chrono::steady_clock;
using unimsg::Kind;
using unimsg::Message;
using unimsg::Payload;
constexpr unimsg::Topic kPingTopic = 1;
constexpr unimsg::Topic kStreamTopic = 2;
constexpr auto kWait = std::chrono::seconds(120);

// Trial t runs the raw measurement first when t is even and second when it is odd: a fixed
// order hands whatever the first (or the second) slot of a pair costs to one side.
template <typename Raw, typename Bus>
void interleaved(int trial, Raw&& raw, Bus&& bus) {
  if (trial % 2 == 0) {
    raw();
    bus();
  } else {
    bus();
    raw();
  }
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t mid = values.size() / 2;
  return values.size() % 2 ? values[mid] : (values[mid - 1] + values[mid]) / 2.0;
}

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// One-way latency in microseconds: half the round trip, averaged over `iterations`.
double raw_pingpong(MPI_Comm comm, int rank, std::vector<std::byte>& buffer, int iterations) {
  const int bytes = static_cast<int>(buffer.size());
  MPI_Barrier(comm);
  const auto start = Clock::now();
  for (int i = 0; i < iterations; ++i) {
    if (rank == 0) {
      MPI_Send(buffer.data(), bytes, MPI_BYTE, 1, 0, comm);
      MPI_Recv(buffer.data(), bytes, MPI_BYTE, 1, 0, comm, MPI_STATUS_IGNORE);
    } else if (rank == 1) {
      MPI_Recv(buffer.data(), bytes, MPI_BYTE, 0, 0, comm, MPI_STATUS_IGNORE);
      MPI_Send(buffer.data(), bytes, MPI_BYTE, 0, 0, comm);
    }
  }
  return seconds_since(start) * 1e6 / (2.0 * iterations);
}

double bus_pingpong(unimsg::Bus& bus, MPI_Comm comm, const Payload& payload, int iterations) {
  const int rank = bus.rank();
  MPI_Barrier(comm);
  const auto start = Clock::now();
  for (int i = 0; i < iterations; ++i) {
    if (rank == 0) {
      bus.send(1, Message::make(Kind::kUser, kPingTopic, payload));
      bus.receive({Kind::kUser, kPingTopic, 1}, kWait);
    } else if (rank == 1) {
      Message ping = bus.receive({Kind::kUser, kPingTopic, 0}, kWait);
      bus.send(0, Message::make(Kind::kUser, kPingTopic, std::move(ping.payload)));
    }
  }
  return seconds_since(start) * 1e6 / (2.0 * iterations);
}

// Streaming: rank 0 sends `count` messages back to back, rank 1 receives them and acknowledges
// the last one; the time is taken on rank 0 from the first send to the acknowledgement.
// Returns GB/s (1e9 bytes per second) of payload.
double raw_stream(MPI_Comm comm, int rank, std::vector<std::byte>& buffer, int count) {
  const int bytes = static_cast<int>(buffer.size());
  constexpr int kWindow = 16;  // as osu_bw: a window of non-blocking sends in flight
  std::vector<MPI_Request> requests(kWindow);
  char ack = 0;
  MPI_Barrier(comm);
  const auto start = Clock::now();
  if (rank == 0) {
    for (int sent = 0; sent < count;) {
      const int batch = std::min(kWindow, count - sent);
      for (int i = 0; i < batch; ++i) {
        MPI_Isend(buffer.data(), bytes, MPI_BYTE, 1, 1, comm,
                  &requests[static_cast<std::size_t>(i)]);
      }
      MPI_Waitall(batch, requests.data(), MPI_STATUSES_IGNORE);
      sent += batch;
    }
    MPI_Recv(&ack, 1, MPI_CHAR, 1, 2, comm, MPI_STATUS_IGNORE);
  } else if (rank == 1) {
    for (int received = 0; received < count;) {
      const int batch = std::min(kWindow, count - received);
      for (int i = 0; i < batch; ++i) {
        MPI_Irecv(buffer.data(), bytes, MPI_BYTE, 0, 1, comm,
                  &requests[static_cast<std::size_t>(i)]);
      }
      MPI_Waitall(batch, requests.data(), MPI_STATUSES_IGNORE);
      received += batch;
    }
    MPI_Send(&ack, 1, MPI_CHAR, 0, 2, comm);
  }
  const double elapsed = seconds_since(start);
  return static_cast<double>(buffer.size()) * count / elapsed / 1e9;
}

double bus_stream(unimsg::Bus& bus, MPI_Comm comm, const Payload& payload, int count) {
  const int rank = bus.rank();
  MPI_Barrier(comm);
  const auto start = Clock::now();
  if (rank == 0) {
    for (int i = 0; i < count; ++i) {
      bus.send(1, Message::make(Kind::kData, kStreamTopic, payload));
    }
    bus.receive({Kind::kControl, kStreamTopic, 1}, kWait);
  } else if (rank == 1) {
    for (int i = 0; i < count; ++i) bus.receive({Kind::kData, kStreamTopic, 0}, kWait);
    bus.send(0, Message::make(Kind::kControl, kStreamTopic));
  }
  const double elapsed = seconds_since(start);
  return static_cast<double>(payload.size()) * count / elapsed / 1e9;
}

double process_cpu_seconds() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  const auto seconds = [](const timeval& t) { return t.tv_sec + t.tv_usec / 1e6; };
  return seconds(usage.ru_utime) + seconds(usage.ru_stime);
}

// CPU used by this whole process (all its threads) while the bus sits idle: nobody waits on it,
// only the progress thread polls. Percent of one core.
double idle_cpu_percent(MPI_Comm comm, double seconds) {
  MPI_Barrier(comm);
  const double cpu_start = process_cpu_seconds();
  const auto start = Clock::now();
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  const double percent = 100.0 * (process_cpu_seconds() - cpu_start) / seconds_since(start);
  double worst = 0;
  MPI_Reduce(&percent, &worst, 1, MPI_DOUBLE, MPI_MAX, 0, comm);
  return worst;
}

struct Row {
  std::string metric;
  std::size_t bytes;
  double unimsg;
  double mpi;
};

struct Settings {
  bool json = false;
  bool quick = false;
  int trials = 7;
  std::uint64_t min_latency = 0;
  std::uint64_t max_latency = 0;
  std::uint64_t min_stream = 0;
  std::uint64_t max_stream = 0;
  double idle_seconds = 0;
};

Settings parse_settings(const cxxopts::ParseResult& args) {
  Settings s;
  s.json = args.count("json") > 0;
  s.quick = args.count("quick") > 0;
  s.trials = s.quick ? 3 : args["trials"].as<int>();
  if (s.trials < 1) throw unimsg::ConfigError(unimsg::kNoRank, "--trials", "must be at least 1");
  const auto size_flag = [&](const char* name) {
    return unimsg::parse_size(args[name].as<std::string>(), std::string("--") + name);
  };
  s.min_latency = std::max<std::uint64_t>(1, size_flag("min-latency-bytes"));
  s.max_latency = size_flag("max-latency-bytes");
  s.min_stream = std::max<std::uint64_t>(1, size_flag("min-stream-bytes"));
  s.max_stream = s.quick ? std::min<std::uint64_t>(size_flag("max-stream-bytes"), 4 << 20)
                         : size_flag("max-stream-bytes");
  s.idle_seconds = s.quick ? std::min(1.0, args["idle-seconds"].as<double>())
                           : args["idle-seconds"].as<double>();
  return s;
}

// What the measurements share.
struct Context {
  const Settings& settings;
  unimsg::Bus& bus;
  MPI_Comm raw_comm;
  int rank;
  int ranks;
};

void report(const Context& ctx, const Row& row) {
  if (ctx.rank != 0) return;
  if (ctx.settings.json) {
    nlohmann::json line = {{"metric", row.metric},
                           {"bytes", row.bytes},
                           {"unimsg", row.unimsg},
                           {"mpi", row.mpi},
                           {"ratio", row.unimsg / row.mpi}};
    std::printf("%s\n", line.dump().c_str());
  } else {
    std::printf("%-16s %10zu %12.3f %12.3f %8.2fx\n", row.metric.c_str(), row.bytes, row.unimsg,
                row.mpi, row.unimsg / row.mpi);
  }
  std::fflush(stdout);
}

void measure_latency(const Context& ctx) {
  const Settings& s = ctx.settings;
  for (std::uint64_t bytes = s.min_latency; bytes <= s.max_latency; bytes *= (s.quick ? 64 : 4)) {
    std::vector<std::byte> raw_buffer(bytes, std::byte{7});
    const Payload payload(std::vector<std::byte>(bytes, std::byte{7}));
    const int iterations =
        std::max(4, static_cast<int>((s.quick ? 2000 : 20000) / (1 + bytes / 8192)));
    bus_pingpong(ctx.bus, ctx.raw_comm, payload, iterations / 4 + 1);  // warm-up both paths
    raw_pingpong(ctx.raw_comm, ctx.rank, raw_buffer, iterations / 4 + 1);
    std::vector<double> bus_times, raw_times;
    for (int t = 0; t < s.trials; ++t) {
      // (Raw and bus take turns going first: see interleaved().)
      interleaved(
          t,
          [&] {
            raw_times.push_back(raw_pingpong(ctx.raw_comm, ctx.rank, raw_buffer, iterations));
          },
          [&] { bus_times.push_back(bus_pingpong(ctx.bus, ctx.raw_comm, payload, iterations)); });
    }
    report(ctx, {"latency_us", bytes, median(bus_times), median(raw_times)});
  }
}

void measure_throughput(const Context& ctx) {
  const Settings& s = ctx.settings;
  for (std::uint64_t bytes = s.min_stream; bytes <= s.max_stream; bytes *= (s.quick ? 16 : 4)) {
    std::vector<std::byte> raw_buffer(bytes, std::byte{3});
    const Payload payload(std::vector<std::byte>(bytes, std::byte{3}));
    const int count =
        std::max(8, static_cast<int>((s.quick ? (64ull << 20) : (1ull << 30)) / bytes));
    bus_stream(ctx.bus, ctx.raw_comm, payload, std::max(2, count / 8));
    raw_stream(ctx.raw_comm, ctx.rank, raw_buffer, std::max(2, count / 8));
    std::vector<double> bus_rates, raw_rates;
    for (int t = 0; t < s.trials; ++t) {
      interleaved(
          t, [&] { raw_rates.push_back(raw_stream(ctx.raw_comm, ctx.rank, raw_buffer, count)); },
          [&] { bus_rates.push_back(bus_stream(ctx.bus, ctx.raw_comm, payload, count)); });
    }
    report(ctx, {"throughput_gbps", bytes, median(bus_rates), median(raw_rates)});
  }
}

void measure_idle(const Context& ctx) {
  const double idle_seconds = ctx.settings.idle_seconds;
  // Twice: with nothing to serve, and with one subscription, as every rank will have (its
  // progress thread then polls at the full rate, UNIMSG_BUS_IDLE_SLEEP_US).
  for (const bool subscribed : {false, true}) {
    unimsg::Subscription subscription;
    if (subscribed) {
      subscription = ctx.bus.subscribe({Kind::kHeartbeat, 99, std::nullopt}, [](const Message&) {});
    }
    const double worst = idle_cpu_percent(ctx.raw_comm, idle_seconds);
    if (ctx.rank != 0) continue;
    if (ctx.settings.json) {
      std::printf("%s\n", nlohmann::json({{"metric", "idle_cpu_percent"},
                                          {"ranks", ctx.ranks},
                                          {"seconds", idle_seconds},
                                          {"subscriptions", subscribed ? 1 : 0},
                                          {"unimsg", worst}})
                              .dump()
                              .c_str());
    } else {
      std::printf("idle CPU of the busiest rank over %.1f s, %s: %.2f%% of one core (%d ranks)\n",
                  idle_seconds, subscribed ? "one subscription" : "no subscription", worst,
                  ctx.ranks);
    }
  }
}

int run(int argc, char** argv) {
  cxxopts::Options cli("unimsg-bench-bus",
                       "Bus ping-pong latency and streaming throughput against raw MPI, between "
                       "ranks 0 and 1 (run with mpirun -np 2).");
  cli.add_options()("json", "print one JSON object per row from rank 0")(
      "trials", "trials per size (median reported, at least 5 for recorded figures)",
      cxxopts::value<int>()->default_value("7"))(
      "quick", "a short smoke run: fewer sizes, iterations and trials")(
      "min-latency-bytes", "smallest ping-pong size",
      cxxopts::value<std::string>()->default_value("8"))(
      "max-latency-bytes", "largest ping-pong size",
      cxxopts::value<std::string>()->default_value("4M"))(
      "min-stream-bytes", "smallest streaming size",
      cxxopts::value<std::string>()->default_value("64K"))(
      "max-stream-bytes", "largest streaming size",
      cxxopts::value<std::string>()->default_value("64M"))(
      "idle-seconds", "measure the idle CPU use of every rank for this long (0: skip)",
      cxxopts::value<double>()->default_value("5"))("h,help", "show this help");
  const auto args = cli.parse(argc, argv);
  if (args.count("help")) {
    std::printf("%s\n", cli.help().c_str());
    return 0;
  }
  const Settings settings = parse_settings(args);

  unimsg::Runtime runtime(&argc, &argv);
  if (runtime.size() < 2) {
    throw unimsg::ConfigError(runtime.rank(), "unimsg-bench-bus",
                              "needs 2 ranks: mpirun -np 2 unimsg-bench-bus");
  }
  MPI_Comm raw_comm = MPI_COMM_NULL;
  MPI_Comm_dup(MPI_COMM_WORLD, &raw_comm);
  const Context ctx{settings, runtime.bus(), raw_comm, runtime.rank(), runtime.size()};
  if (ctx.rank == 0 && !settings.json) {
    std::printf("# unimsg-bench-bus: %d ranks, %d trials per size (median), interleaved\n",
                ctx.ranks, settings.trials);
    std::printf("%-16s %10s %12s %12s %9s\n", "metric", "bytes", "unimsg", "mpi", "ratio");
  }
  measure_latency(ctx);
  measure_throughput(ctx);
  if (settings.idle_seconds > 0) measure_idle(ctx);
  MPI_Comm_free(&raw_comm);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return unimsg::run_program("unimsg-bench-bus", argc, argv, run);
}
