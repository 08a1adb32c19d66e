// train_linear: a dependency-free data-parallel trainer (no libtorch) for fault tests and the
// recovery benchmark. It fits a linear model to deterministic synthetic data (y = X w* + noise)
// with minibatch SGD; gradients are averaged by the engine. It checkpoints through the
// checkpoint service (a fast tier every --fast-every steps, a persistent one every
// --checkpoint-every), heartbeats, honours UNIMSG_FAULT_INJECT, and resumes by itself when
// unimsg-run relaunches it.
//
//   unimsg-run -np 4 --checkpoint-dir ck -- build/examples/train_linear --steps 200 --json

#include <spdlog/spdlog.h>
#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "unimsg/checkpoint/checkpoint.hpp"
#include "unimsg/core/cli.hpp"
#include "unimsg/core/config.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/core/random.hpp"
#include "unimsg/data/sampler.hpp"
#include "unimsg/services/checkpoint_restore.hpp"
#include "unimsg/services/fault_injection.hpp"
#include "unimsg/services/runtime.hpp"
#include "unimsg/session/training_session.hpp"

namespace {

double unix_time() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Uniform in [-1, 1): the same data on every rank and every run.
double uniform(std::uint64_t index) {
  return static_cast<double>(unimsg::splitmix64(index) >> 11) / static_cast<double>(1ull << 52) -
         1.0;
}

struct Data {
  std::size_t samples;
  std::size_t dim;
  std::vector<double> x;  // samples x dim
  std::vector<double> y;
};

Data make_data(std::size_t samples, std::size_t dim) {
  Data data{samples, dim, std::vector<double>(samples * dim), std::vector<double>(samples)};
  std::vector<double> truth(dim);
  for (std::size_t j = 0; j < dim; ++j) truth[j] = uniform(1'000'000 + j) * 2;
  for (std::size_t i = 0; i < samples; ++i) {
    double dot = 0;
    for (std::size_t j = 0; j < dim; ++j) {
      data.x[i * dim + j] = uniform(i * dim + j);
      dot += data.x[i * dim + j] * truth[j];
    }
    data.y[i] = dot + 0.01 * uniform(2'000'000 + i);
  }
  return data;
}

std::vector<std::byte> as_bytes(const std::vector<double>& values) {
  const auto* p = reinterpret_cast<const std::byte*>(values.data());
  return {p, p + values.size() * sizeof(double)};
}

struct Settings {
  std::uint64_t steps = 0;
  std::uint64_t global_batch = 0;
  std::uint64_t samples = 0;
  std::size_t dim = 0;
  double lr = 0;
  std::uint64_t step_ms = 0;
  std::string persistent_dir;
  std::uint64_t checkpoint_every = 0;
  std::uint64_t checkpoint_keep = 0;
  std::string fast_dir;
  std::uint64_t fast_every = 0;
  bool json = false;
};

cxxopts::Options make_cli() {
  cxxopts::Options cli("train_linear",
                       "Data-parallel linear regression on synthetic data, for fault tests and "
                       "the recovery benchmark (run under unimsg-run or mpirun).");
  cli.add_options()("steps", "optimizer steps in all",
                    cxxopts::value<std::uint64_t>()->default_value("200"))(
      "batch-size", "global batch (split evenly across the ranks)",
      cxxopts::value<std::uint64_t>()->default_value("240"))(
      "samples", "synthetic samples", cxxopts::value<std::uint64_t>()->default_value("4800"))(
      "dim", "features", cxxopts::value<std::uint64_t>()->default_value("32"))(
      "lr", "learning rate", cxxopts::value<double>()->default_value("0.05"))(
      "step-ms", "extra time per step, standing in for compute",
      cxxopts::value<std::uint64_t>()->default_value("0"))(
      "checkpoint-dir", "persistent checkpoints (default: UNIMSG_CHECKPOINT_DIR)",
      cxxopts::value<std::string>()->default_value(""))(
      "checkpoint-every", "persistent checkpoint every N steps (0: never)",
      cxxopts::value<std::uint64_t>()->default_value("20"))(
      "checkpoint-keep", "checkpoints kept per tier (the newest)",
      cxxopts::value<std::uint64_t>()->default_value("3"))(
      "fast-dir", "node-local checkpoints (e.g. /dev/shm/...; empty: no fast tier)",
      cxxopts::value<std::string>()->default_value(""))(
      "fast-every", "fast checkpoint every N steps (0: never)",
      cxxopts::value<std::uint64_t>()->default_value("5"))(
      "json", "one JSON object per step (rank 0)")("h,help", "show this help");
  return cli;
}

// The flags, checked; nullopt after printing --help.
std::optional<Settings> parse_settings(int argc, char** argv, int rank, int world) {
  cxxopts::Options cli = make_cli();
  const auto args = cli.parse(argc, argv);
  if (args.count("help")) {
    if (rank == 0) std::puts(cli.help().c_str());
    return std::nullopt;
  }
  Settings s;
  s.steps = args["steps"].as<std::uint64_t>();
  s.global_batch = args["batch-size"].as<std::uint64_t>();
  s.samples = args["samples"].as<std::uint64_t>();
  s.dim = static_cast<std::size_t>(args["dim"].as<std::uint64_t>());
  s.lr = args["lr"].as<double>();
  s.step_ms = args["step-ms"].as<std::uint64_t>();
  s.checkpoint_every = args["checkpoint-every"].as<std::uint64_t>();
  s.checkpoint_keep = args["checkpoint-keep"].as<std::uint64_t>();
  s.fast_dir = args["fast-dir"].as<std::string>();
  s.fast_every = args["fast-every"].as<std::uint64_t>();
  s.json = args.count("json") > 0;
  if (s.global_batch % static_cast<std::uint64_t>(world) != 0 || s.global_batch == 0) {
    throw unimsg::ConfigError(rank, "--batch-size", "must split evenly across the ranks");
  }
  if (s.samples < s.global_batch || s.dim == 0 || !(s.lr > 0)) {
    throw unimsg::ConfigError(rank, "train_linear", "need samples >= batch, dim > 0, lr > 0");
  }
  s.persistent_dir = args["checkpoint-dir"].as<std::string>();
  if (s.persistent_dir.empty())
    s.persistent_dir = unimsg::env_value("UNIMSG_CHECKPOINT_DIR").value_or("");
  return s;
}

// Rank 0 writes both tiers; its buddy on another host writes a replica of the node-local fast
// tier (fast_tier_writers), so that losing rank 0's host loses at most the fast interval.
unimsg::TieredCheckpointOptions tier_options(const Settings& s, int rank,
                                             unimsg::TrainingSession& session) {
  unimsg::TieredCheckpointOptions tiers;
  tiers.persistent_directory = s.persistent_dir;
  tiers.persistent_every = s.persistent_dir.empty() ? 0 : s.checkpoint_every;
  tiers.write_persistent = rank == 0;
  tiers.fast_directory = s.fast_dir;
  tiers.fast_every = tiers.fast_directory.empty() ? 0 : s.fast_every;
  const auto writers = unimsg::fast_tier_writers(session.host_of_rank());
  tiers.write_fast = std::find(writers.begin(), writers.end(), rank) != writers.end();
  tiers.options.rank = rank;
  tiers.options.trace = session.trace();
  tiers.options.keep = static_cast<std::size_t>(s.checkpoint_keep);
  return tiers;
}

// What a checkpoint holds: the weights and where the data stands.
struct State {
  std::vector<double> w;
  std::uint64_t step = 0;
  std::uint64_t epoch = 0;
  std::size_t position = 0;
};

// Everything the training loop works with.
struct Job {
  unimsg::Runtime& runtime;
  unimsg::TrainingSession& session;
  unimsg::TieredCheckpointer& checkpoints;
  const std::optional<unimsg::FaultInjection>& fault;
  const Settings& settings;
  const Data& data;
  std::uint64_t restart;
};

void resume(const Job& job, State& state) {
  const int rank = job.runtime.rank();
  std::vector<std::string> skipped;
  // The newest intact checkpoint any rank holds (a fast tier may be on one host only).
  std::optional<unimsg::Checkpoint> restored;
  if (auto found = unimsg::restore_newest_anywhere(
          MPI_COMM_WORLD,
          [&](std::vector<std::string>* s) { return job.checkpoints.load_latest(s); }, &skipped)) {
    restored = std::move(found->checkpoint);
  }
  if (restored) {
    const auto& blob = restored->blobs.at("w");
    if (blob.size() != job.settings.dim * sizeof(double)) {
      throw unimsg::CheckpointError(rank, "train_linear", "the checkpoint is for another --dim");
    }
    std::memcpy(state.w.data(), blob.data(), blob.size());
    const auto meta = nlohmann::json::parse(restored->metadata_json);
    state.step = restored->step;
    state.epoch = meta.at("epoch").get<std::uint64_t>();
    state.position = meta.at("position").get<std::size_t>();
    if (rank == 0) {
      job.runtime.log().info("resumed from step {} (launch {})", state.step, job.restart);
      if (job.settings.json) {
        std::printf("%s\n", nlohmann::json{{"event", "resumed"},
                                           {"step", state.step},
                                           {"time", unix_time()},
                                           {"restart", job.restart}}
                                .dump()
                                .c_str());
      }
    }
  }
  for (const auto& why : skipped) job.runtime.log().warn("skipped a damaged checkpoint: {}", why);
}

// This rank's gradient of the mean squared error over the samples mine[next, next + local_batch),
// with the local loss in gradient[dim].
void local_gradient(const Data& data, const std::vector<double>& w,
                    const std::vector<std::size_t>& mine, std::size_t next, std::size_t local_batch,
                    std::vector<double>& gradient) {
  const std::size_t dim = data.dim;
  std::fill(gradient.begin(), gradient.end(), 0.0);
  for (std::size_t k = 0; k < local_batch; ++k) {
    const std::size_t i = mine[next + k];
    double error = -data.y[i];
    for (std::size_t j = 0; j < dim; ++j) error += data.x[i * dim + j] * w[j];
    for (std::size_t j = 0; j < dim; ++j) {
      gradient[j] += 2 * error * data.x[i * dim + j] / static_cast<double>(local_batch);
    }
    gradient[dim] += error * error / static_cast<double>(local_batch);
  }
}

// The step's JSON line, the fault injection's, and the fault itself.
void after_step(const Job& job, std::uint64_t step, double loss) {
  const int rank = job.runtime.rank();
  const bool json = job.settings.json;
  if (rank == 0 && json) {
    std::printf("%s\n", nlohmann::json{{"step", step},
                                       {"loss", loss},
                                       {"time", unix_time()},
                                       {"world_size", job.runtime.size()},
                                       {"restart", job.restart}}
                            .dump()
                            .c_str());
    std::fflush(stdout);
  }
  const auto& fault = job.fault;
  if (fault && fault->rank == rank && fault->step == step && json) {
    std::printf(
        "%s\n",
        nlohmann::json{{"event", "inject"}, {"step", step}, {"time", unix_time()}}.dump().c_str());
    std::fflush(stdout);
  }
  if (fault) fault->at_step(rank, step);
}

void train(const Job& job, State& state) {
  const int rank = job.runtime.rank();
  const int world = job.runtime.size();
  const Settings& s = job.settings;
  unimsg::DistributedSampler sampler(s.samples, rank, world, /*seed=*/3);
  sampler.set_epoch(state.epoch, state.position);
  const std::size_t local_batch = s.global_batch / static_cast<std::uint64_t>(world);
  std::vector<std::size_t> mine = sampler.indices();
  std::size_t next = 0;
  std::vector<double> gradient(s.dim + 1);  // + the local loss, reduced along
  try {
    while (state.step < s.steps) {
      if (mine.size() - next < local_batch) {  // the epoch ran out: the next one
        sampler.set_epoch(++state.epoch, 0);
        mine = sampler.indices();
        next = 0;
      }
      local_gradient(job.data, state.w, mine, next, local_batch, gradient);
      next += local_batch;
      if (const auto ms = s.step_ms) {
        std::this_thread::sleep_for(std::chrono::milliseconds(ms));
      }
      job.session.engine()
          .submit("grad", unimsg::host_view(gradient.data(), gradient.size()),
                  unimsg::ReduceOp::kAvg)
          .wait();
      for (std::size_t j = 0; j < s.dim; ++j) state.w[j] -= s.lr * gradient[j];
      ++state.step;
      job.session.step(state.step, gradient[s.dim], local_batch);
      after_step(job, state.step, gradient[s.dim]);
      if (job.checkpoints.due(state.step)) {  // only on the ranks that write a tier
        job.checkpoints.maybe_save(state.step, [&] {
          unimsg::Checkpoint checkpoint;
          checkpoint.blobs["w"] = as_bytes(state.w);
          checkpoint.metadata_json = nlohmann::json{
              {"epoch", state.epoch},
              {"position", sampler.position_after(next)},
              {"world_size", world}}.dump();
          return checkpoint;
        });
      }
    }
  } catch (const unimsg::TimeoutError& error) {
    job.session.abort_restartable(error, state.step);
  }
}

void report_final(unimsg::Runtime& runtime, const State& state, bool json) {
  double norm = 0;
  for (double v : state.w) norm += v * v;
  if (json) {
    char line[128];
    std::snprintf(line, sizeof line, "{\"final\":true,\"step\":%llu,\"w_l2\":%.17g}",
                  static_cast<unsigned long long>(state.step), std::sqrt(norm));
    std::printf("%s\n", line);
  } else {
    runtime.log().info("done: {} steps, |w| = {:.6f}", state.step, std::sqrt(norm));
  }
}

int run(int argc, char** argv) {
  unimsg::Runtime runtime(&argc, &argv);
  const int rank = runtime.rank();
  const auto settings = parse_settings(argc, argv, rank, runtime.size());
  if (!settings) return 0;
  // Heartbeats, status to rank 0 (docs/monitoring.md), the communicator and the engine.
  unimsg::TrainingSession session(runtime, unimsg::TrainingSessionOptions::from_env());
  unimsg::TieredCheckpointer checkpoints(tier_options(*settings, rank, session));
  session.monitor().set_total_steps(settings->steps);
  const auto fault = unimsg::FaultInjection::from_env();

  const Data data = make_data(settings->samples, settings->dim);
  State state;
  state.w.assign(settings->dim, 0.0);
  const auto restart = unimsg::env_uint("UNIMSG_RESTART_COUNT", 0, 1u << 30).value_or(0);
  const Job job{.runtime = runtime,
                .session = session,
                .checkpoints = checkpoints,
                .fault = fault,
                .settings = *settings,
                .data = data,
                .restart = restart};
  resume(job, state);
  train(job, state);
  checkpoints.flush();
  session.finish();
  if (rank == 0) report_final(runtime, state, settings->json);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return unimsg::run_program("train_linear", argc, argv, run);
}
