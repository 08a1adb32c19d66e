// Data-parallel training of a small CNN on Fashion-MNIST (the README's main job): every rank
// reads the IDX files, trains on its shard of each global batch, and the DDP wrapper averages
// the gradients through the engine. Per epoch, rank 0 prints the loss, samples/s and test
// accuracy (--json: one object per epoch).
//
//   mpirun -np 4 build/examples/train_fashion_mnist [--epochs 5] [--batch-size 256] [--json]
//
// Exit status: 0, 1 on an error, 2 on a bad flag, 3 when --min-accuracy was not reached.

#include <spdlog/spdlog.h>
#include <torch/torch.h>
#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <future>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "unimsg/checkpoint/checkpoint.hpp"
#include "unimsg/core/cli.hpp"
#include "unimsg/core/config.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/data/idx.hpp"
#include "unimsg/data/sampler.hpp"
#include "unimsg/fetch/fetch_queue.hpp"
#include "unimsg/services/checkpoint_restore.hpp"
#include "unimsg/services/fault_injection.hpp"
#include "unimsg/services/runtime.hpp"
#include "unimsg/session/training_session.hpp"
#include "unimsg/torch/ddp.hpp"
#include "unimsg/torch/state.hpp"

namespace {

using Clock = std::chrono::steady_clock;

// Two 3x3 convolutions (32 and 64 channels, each followed by 2x2 max-pooling), a 128-unit hidden
// layer: the dataset's published small-CNN baseline (0.90-0.92).
struct NetImpl : torch::nn::Module {
  NetImpl()
      : conv1(register_module("conv1",
                              torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 32, 3).padding(1)))),
        conv2(register_module("conv2",
                              torch::nn::Conv2d(torch::nn::Conv2dOptions(32, 64, 3).padding(1)))),
        fc1(register_module("fc1", torch::nn::Linear(64 * 7 * 7, 128))),
        fc2(register_module("fc2", torch::nn::Linear(128, 10))) {}

  torch::Tensor forward(torch::Tensor x) {
    x = torch::max_pool2d(torch::relu(conv1->forward(x)), 2);
    x = torch::max_pool2d(torch::relu(conv2->forward(x)), 2);
    x = torch::relu(fc1->forward(x.flatten(1)));
    return fc2->forward(x);
  }

  torch::nn::Conv2d conv1, conv2;
  torch::nn::Linear fc1, fc2;
};
TORCH_MODULE(Net);

struct Dataset {
  torch::Tensor images;  // [n, 1, 28, 28] float, normalised
  torch::Tensor labels;  // [n] int64
};

Dataset load(const std::filesystem::path& images, const std::filesystem::path& labels,
             std::size_t limit) {
  unimsg::LabelledImages set = unimsg::read_labelled_images(images, labels);
  const auto count = static_cast<std::int64_t>(limit ? std::min(limit, set.count) : set.count);
  const auto rows = static_cast<std::int64_t>(set.rows);
  const auto cols = static_cast<std::int64_t>(set.cols);
  Dataset data;
  data.images = torch::from_blob(set.pixels.data(), {count, 1, rows, cols}, torch::kUInt8)
                    .to(torch::kFloat)
                    .div_(255.0)
                    .sub_(0.2860)
                    .div_(0.3530);  // Fashion-MNIST's mean and standard deviation
  data.labels = torch::from_blob(set.labels.data(), {count}, torch::kUInt8).to(torch::kLong);
  return data;
}

// Fashion-MNIST as Zalando publishes it (and Debian ships it): the SHA-256 of each gzip file.
const std::pair<const char*, const char*> kFashionMnistFiles[] = {
    {"train-images-idx3-ubyte", "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"},
    {"train-labels-idx1-ubyte", "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"},
    {"t10k-images-idx3-ubyte", "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"},
    {"t10k-labels-idx1-ubyte", "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"}};

// With --data-url: every rank asks the download queue for the four files in its host's cache
// (each host downloads each file once) and gets their paths; a failure anywhere stops every rank.
std::map<std::string, std::filesystem::path> fetch_dataset(unimsg::Runtime& runtime,
                                                           const std::string& url,
                                                           std::string cache) {
  std::map<std::string, std::filesystem::path> paths;
  if (url.empty()) return paths;
  if (cache.empty()) {
    const auto run_dir = unimsg::env_value("UNIMSG_RUN_DIR");
    cache = run_dir ? (std::filesystem::path(*run_dir) / "data-cache").string()
                    : std::string("unimsg-data-cache");
  }
  unimsg::FetchQueueOptions options;
  options.fetch.cache = cache;
  options.fetch.progress = [&runtime](const unimsg::FetchSpec& spec, std::uint64_t bytes,
                                      std::uint64_t total) {
    runtime.log().info("fetch {}: {:.1f} of {:.1f} MB", spec.name, bytes / 1e6, total / 1e6);
  };
  std::string error;
  {
    unimsg::FetchQueue queue(runtime.bus(), options);
    std::vector<std::future<unimsg::FetchResult>> results;
    const std::string base = url.back() == '/' ? url : url + "/";
    for (const auto& [stem, sha256] : kFashionMnistFiles) {
      results.push_back(queue.submit({stem, base + stem + ".gz", sha256, std::nullopt},
                                     unimsg::FetchQueue::Placement::kThisHost));
    }
    queue.drain();
    for (auto& future : results) {
      const auto result = future.get();
      if (result.outcome.status == unimsg::FetchStatus::kFailed) {
        error += result.outcome.name + ": " + result.outcome.error + "; ";
      } else {
        paths[result.outcome.name] = result.outcome.path;
      }
    }
  }
  int failed = error.empty() ? 0 : 1;
  MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (failed != 0) {
    throw unimsg::DataError(runtime.rank(), "--data-url",
                            error.empty() ? "another rank could not fetch the data" : error);
  }
  if (runtime.rank() == 0) runtime.log().info("data: the four files are in {}", cache);
  return paths;
}

struct Flags {
  std::uint64_t epochs = 0;
  std::uint64_t global_batch = 0;
  double lr = 0;
  double momentum = 0;
  std::uint64_t lr_decay_epoch = 0;
  std::string data_dir;
  std::string data_url;
  std::string data_cache;
  std::uint64_t seed = 0;
  std::string device;
  std::uint64_t threads = 0;
  std::uint64_t limit = 0;
  std::uint64_t test_limit = 0;
  std::string checkpoint_dir;
  std::uint64_t checkpoint_every = 0;
  std::uint64_t checkpoint_keep = 0;
  bool resume = false;
  std::uint64_t max_steps = 0;
  std::string compress;
  std::uint64_t compress_warmup = 0;
  bool momentum_correction = false;
  double min_accuracy = 0;
  bool json = false;
};

cxxopts::Options make_cli() {
  cxxopts::Options cli("train_fashion_mnist",
                       "Data-parallel CNN training on Fashion-MNIST over unimsg (run under "
                       "mpirun or unimsg-run).");
  cli.add_options()("epochs", "passes over the training set",
                    cxxopts::value<std::uint64_t>()->default_value("5"))(
      "batch-size", "global batch (split evenly across the ranks)",
      cxxopts::value<std::uint64_t>()->default_value("256"))(
      "lr", "learning rate (SGD)", cxxopts::value<double>()->default_value("0.05"))(
      "momentum", "SGD momentum", cxxopts::value<double>()->default_value("0.9"))(
      "lr-decay-epoch", "from this epoch (1-based) on, the learning rate is a fifth (0: never)",
      cxxopts::value<std::uint64_t>()->default_value("4"))(
      "data-dir", "directory with the four IDX files (gzip or not)",
      cxxopts::value<std::string>()->default_value("/usr/share/datasets/fashion-mnist"))(
      "data-url",
      "fetch the four IDX files from URL/<name>.gz through the download queue first (http, "
      "https or file), into --data-cache",
      cxxopts::value<std::string>()->default_value(""))(
      "data-cache", "the download cache (default: <run dir>/data-cache, or ./unimsg-data-cache)",
      cxxopts::value<std::string>()->default_value(""))(
      "seed", "initialisation and shuffling seed",
      cxxopts::value<std::uint64_t>()->default_value("1"))(
      "device",
      "cpu, or cuda (each rank on GPU local-rank mod GPUs; gradients staged through host memory "
      "for the MPI engine)",
      cxxopts::value<std::string>()->default_value("cpu"))(
      "threads", "intra-op threads per rank (0: the cores divided by the ranks on this machine)",
      cxxopts::value<std::uint64_t>()->default_value("0"))(
      "limit", "use only the first N training samples (0: all)",
      cxxopts::value<std::uint64_t>()->default_value("0"))(
      "test-limit", "score only the first N test samples (0: all 10 000)",
      cxxopts::value<std::uint64_t>()->default_value("0"))(
      "checkpoint-dir", "where checkpoints go (rank 0 writes; every rank reads)",
      cxxopts::value<std::string>()->default_value(""))(
      "checkpoint-every", "checkpoint every N optimizer steps (0: never)",
      cxxopts::value<std::uint64_t>()->default_value("0"))(
      "checkpoint-keep", "checkpoints kept (the newest)",
      cxxopts::value<std::uint64_t>()->default_value("3"))(
      "resume", "continue from the newest intact checkpoint in --checkpoint-dir, if any")(
      "max-steps", "stop after this many optimizer steps in all (0: no limit)",
      cxxopts::value<std::uint64_t>()->default_value("0"))(
      "compress",
      "gradient compression: none, fp16, bf16, int8, onebit, topk[:ratio], randomk[:ratio], "
      "with :noef for no error feedback (e.g. topk:0.01)",
      cxxopts::value<std::string>()->default_value("none"))(
      "compress-warmup", "with --compress: optimizer steps reduced uncompressed first",
      cxxopts::value<std::uint64_t>()->default_value("0"))(
      "momentum-correction",
      "with --compress: momentum applied on each rank before compression (DGC) instead of by the "
      "optimizer")("min-accuracy", "exit with status 3 when the final test accuracy is below this",
                   cxxopts::value<double>()->default_value("0"))(
      "json", "print one JSON object per epoch (rank 0)")("h,help", "show this help");
  return cli;
}

Flags read_flags(const cxxopts::ParseResult& args) {
  Flags f;
  f.epochs = args["epochs"].as<std::uint64_t>();
  f.global_batch = args["batch-size"].as<std::uint64_t>();
  f.lr = args["lr"].as<double>();
  f.momentum = args["momentum"].as<double>();
  f.lr_decay_epoch = args["lr-decay-epoch"].as<std::uint64_t>();
  f.data_dir = args["data-dir"].as<std::string>();
  f.data_url = args["data-url"].as<std::string>();
  f.data_cache = args["data-cache"].as<std::string>();
  f.seed = args["seed"].as<std::uint64_t>();
  f.device = args["device"].as<std::string>();
  f.threads = args["threads"].as<std::uint64_t>();
  f.limit = args["limit"].as<std::uint64_t>();
  f.test_limit = args["test-limit"].as<std::uint64_t>();
  f.checkpoint_dir = args["checkpoint-dir"].as<std::string>();
  f.checkpoint_every = args["checkpoint-every"].as<std::uint64_t>();
  f.checkpoint_keep = args["checkpoint-keep"].as<std::uint64_t>();
  f.resume = args.count("resume") > 0;
  f.max_steps = args["max-steps"].as<std::uint64_t>();
  f.compress = args["compress"].as<std::string>();
  f.compress_warmup = args["compress-warmup"].as<std::uint64_t>();
  f.momentum_correction = args.count("momentum-correction") > 0;
  f.min_accuracy = args["min-accuracy"].as<double>();
  f.json = args.count("json") > 0;
  return f;
}

// The flags, checked; nullopt after printing --help.
std::optional<Flags> parse_flags(int argc, char** argv, int rank, int world) {
  cxxopts::Options cli = make_cli();
  const auto args = cli.parse(argc, argv);
  if (args.count("help")) {
    if (rank == 0) std::puts(cli.help().c_str());
    return std::nullopt;
  }
  Flags flags = read_flags(args);
  if (flags.epochs == 0) throw unimsg::ConfigError(rank, "--epochs", "must be at least 1");
  if (flags.global_batch < static_cast<std::uint64_t>(world) ||
      flags.global_batch % static_cast<std::uint64_t>(world) != 0) {
    throw unimsg::ConfigError(rank, "--batch-size",
                              std::to_string(flags.global_batch) +
                                  " does not split evenly across " + std::to_string(world) +
                                  " ranks");
  }
  if (!(flags.lr > 0) || !(flags.momentum >= 0 && flags.momentum < 1)) {
    throw unimsg::ConfigError(rank, "--lr/--momentum", "need lr > 0 and 0 <= momentum < 1");
  }
  return flags;
}

std::uint64_t intra_op_threads(std::uint64_t threads, int world) {
  if (threads != 0) return threads;
  int local_ranks = world;
  if (const auto v = unimsg::env_value("OMPI_COMM_WORLD_LOCAL_SIZE")) {
    local_ranks =
        static_cast<int>(unimsg::parse_uint(*v, "OMPI_COMM_WORLD_LOCAL_SIZE", 1, 1u << 20));
  }
  return std::max<std::uint64_t>(
      1, std::thread::hardware_concurrency() / static_cast<unsigned>(local_ranks));
}

torch::Device choose_device(const std::string& device_name, int rank) {
  if (device_name == "cuda") {
    if (!torch::cuda::is_available()) {
      throw unimsg::ConfigError(rank, "--device",
                                "cuda: libtorch sees no CUDA device (a CPU-only libtorch, such as "
                                "Debian's, or no GPU visible to this rank)");
    }
    int local_rank = rank;
    if (const auto v = unimsg::env_value("OMPI_COMM_WORLD_LOCAL_RANK")) {
      local_rank =
          static_cast<int>(unimsg::parse_uint(*v, "OMPI_COMM_WORLD_LOCAL_RANK", 0, 1u << 20));
    }
    return torch::Device(torch::kCUDA,
                         static_cast<torch::DeviceIndex>(
                             local_rank % static_cast<int>(torch::cuda::device_count())));
  }
  if (device_name != "cpu") {
    throw unimsg::ConfigError(rank, "--device",
                              "invalid value '" + device_name + "': expected cpu or cuda");
  }
  return torch::Device(torch::kCPU);
}

struct Data {
  Dataset train;
  Dataset test;
};

Data load_data(unimsg::Runtime& runtime, const Flags& flags) {
  const std::filesystem::path dir = flags.data_dir;
  const auto fetched = fetch_dataset(runtime, flags.data_url, flags.data_cache);
  const auto find = [&](const std::string& stem) {
    if (const auto it = fetched.find(stem); it != fetched.end()) return it->second;
    for (const auto& name : {stem + ".gz", stem}) {
      if (std::filesystem::exists(dir / name)) return dir / name;
    }
    throw unimsg::DataError(runtime.rank(), "train_fashion_mnist",
                            "no " + stem + "(.gz) in " + dir.string() +
                                " (install Debian's dataset-fashion-mnist or pass --data-dir)");
  };
  Data data;
  data.train = load(find("train-images-idx3-ubyte"), find("train-labels-idx1-ubyte"), flags.limit);
  data.test =
      load(find("t10k-images-idx3-ubyte"), find("t10k-labels-idx1-ubyte"), flags.test_limit);
  return data;
}

Net placed_net(torch::Device device) {
  Net net;
  net->to(device);  // before the wrapper and the optimizer see the parameters
  return net;
}

unimsg::DdpOptions make_ddp_options(const Flags& flags) {
  unimsg::DdpOptions options;
  options.compression = unimsg::CompressionSpec::parse(flags.compress);
  options.compression_warmup_steps = flags.compress_warmup;
  if (options.compression.compresses() && flags.momentum_correction) {
    options.momentum_correction = flags.momentum;
  }
  return options;
}

// The model, its DDP wrapper and the optimizer, constructed in that order.
struct Model {
  Model(const Flags& flags, torch::Device device, unimsg::TrainingSession& session)
      : net(placed_net(device)),
        ddp_options(make_ddp_options(flags)),
        ddp(*net, session.engine(), session.communicator(), ddp_options),
        optimizer(net->parameters(),
                  torch::optim::SGDOptions(flags.lr).momentum(
                      ddp_options.momentum_correction > 0 ? 0 : flags.momentum)) {}

  Net net;
  unimsg::DdpOptions ddp_options;
  unimsg::DistributedDataParallel ddp;
  torch::optim::SGD optimizer;
};

// Checkpoints: model + optimizer, RNG, and where the data stands (epoch, global position).
// Under unimsg-run: its --checkpoint-dir arrives as UNIMSG_CHECKPOINT_DIR, and a relaunch
// (UNIMSG_RESTART_COUNT > 0) resumes from the newest checkpoint.
struct Recovery {
  std::string checkpoint_dir;
  bool resume = false;
  std::optional<unimsg::FaultInjection> fault;
};

Recovery plan_recovery(const Flags& flags, int rank) {
  Recovery recovery;
  recovery.checkpoint_dir = flags.checkpoint_dir;
  if (recovery.checkpoint_dir.empty()) {
    recovery.checkpoint_dir = unimsg::env_value("UNIMSG_CHECKPOINT_DIR").value_or("");
  }
  const bool relaunched = unimsg::env_uint("UNIMSG_RESTART_COUNT", 0, 1u << 30).value_or(0) > 0;
  recovery.resume = flags.resume || (relaunched && !recovery.checkpoint_dir.empty());
  recovery.fault = unimsg::FaultInjection::from_env();
  if ((flags.checkpoint_every > 0 || recovery.resume) && recovery.checkpoint_dir.empty()) {
    throw unimsg::ConfigError(rank, "--checkpoint-every/--resume", "need --checkpoint-dir");
  }
  return recovery;
}

unimsg::CheckpointOptions checkpoint_options(const Flags& flags, int rank,
                                             unimsg::TrainingSession& session) {
  unimsg::CheckpointOptions options;
  options.rank = rank;
  options.keep = static_cast<std::size_t>(flags.checkpoint_keep);
  options.trace = session.trace();
  return options;
}

// Where a resumed run starts.
struct Resume {
  std::uint64_t global_step = 0;
  std::uint64_t epoch = 0;
  std::size_t position = 0;
};

Resume resume_training(unimsg::Runtime& runtime, const unimsg::Checkpointer& checkpointer,
                       Model& model, const Flags& flags) {
  const int rank = runtime.rank();
  Resume resume;
  std::vector<std::string> skipped;
  // The newest intact checkpoint any rank holds (a fast tier may be on one host only).
  std::optional<unimsg::Checkpoint> restored;
  if (auto found = unimsg::restore_newest_anywhere(
          MPI_COMM_WORLD, [&](std::vector<std::string>* s) { return checkpointer.load_latest(s); },
          &skipped)) {
    if (found->received && rank != 0) {
      runtime.log().info("checkpoint of step {} received from rank {}", found->checkpoint.step,
                         found->source_rank);
    }
    restored = std::move(found->checkpoint);
  }
  for (const auto& why : skipped) runtime.log().warn("skipped a damaged checkpoint: {}", why);
  if (!restored) return resume;
  unimsg::load_training_state(restored->blobs.at("training"), *model.net, model.optimizer);
  unimsg::load_rng_state(restored->blobs.at("rng"));
  const auto meta = nlohmann::json::parse(restored->metadata_json);
  resume.global_step = restored->step;
  resume.epoch = meta.at("epoch").get<std::uint64_t>();
  resume.position = meta.at("position").get<std::size_t>();
  if (meta.at("batch_size").get<std::uint64_t>() != flags.global_batch) {
    throw unimsg::ConfigError(
        rank, "--resume",
        "the checkpoint was taken with --batch-size " + meta.at("batch_size").dump());
  }
  if (rank == 0) {  // on stderr, with --json too
    runtime.log().info(
        "resumed from step {} (epoch {}, sample {} of the epoch), saved by {} "
        "rank(s), now {}",
        resume.global_step, resume.epoch + 1, resume.position, meta.at("world_size").get<int>(),
        runtime.size());
  }
  return resume;
}

// Everything the epochs work with.
struct Trainer {
  unimsg::Runtime& runtime;
  unimsg::TrainingSession& session;
  const Flags& flags;
  const Data& data;
  Model& model;
  unimsg::DistributedSampler& sampler;
  std::optional<unimsg::Checkpointer>& checkpointer;
  const std::optional<unimsg::FaultInjection>& fault;
  torch::Device device;
  std::int64_t local_batch;
};

// What the run has done so far.
struct Progress {
  std::uint64_t global_step = 0;
  std::uint64_t skipped_steps = 0;
  bool stop = false;
  double accuracy = 0;
};

// This rank's totals of one epoch's training.
struct EpochTotals {
  double loss_sum = 0;
  std::int64_t batches = 0;
  std::int64_t count = 0;  // samples
};

void save_checkpoint(const Trainer& t, std::uint64_t global_step, std::uint64_t epoch,
                     std::size_t position) {
  const auto every = t.flags.checkpoint_every;
  if (t.runtime.rank() != 0 || every == 0 || global_step % every != 0) return;
  unimsg::Checkpoint checkpoint;
  checkpoint.step = global_step;
  checkpoint.blobs["training"] = unimsg::save_training_state(*t.model.net, t.model.optimizer);
  checkpoint.blobs["rng"] = unimsg::save_rng_state();
  checkpoint.metadata_json = nlohmann::json{
      {"epoch", epoch},
      {"position", position},
      {"world_size", t.runtime.size()},
      {"batch_size",
       t.flags.global_batch}}.dump();
  t.checkpointer->save_async(std::move(checkpoint));
}

// A step decay: the last epochs settle at a fifth of the rate (derived from the epoch, so a
// resumed run decays at the same point).
void set_epoch_lr(Model& model, const Flags& flags, std::uint64_t epoch) {
  const auto decay_epoch = flags.lr_decay_epoch;
  const double epoch_lr = decay_epoch > 0 && epoch + 1 >= decay_epoch ? flags.lr / 5 : flags.lr;
  for (auto& group : model.optimizer.param_groups()) {
    static_cast<torch::optim::SGDOptions&>(group.options()).lr(epoch_lr);
  }
}

void set_total_steps(const Trainer& t, std::uint64_t epoch, std::uint64_t global_step,
                     std::int64_t steps) {
  // (A resumed epoch starts part-way: its steps are those left.)
  std::uint64_t total = global_step + static_cast<std::uint64_t>(steps);
  const auto epochs = t.flags.epochs;
  if (epochs > epoch + 1) {
    const std::size_t full =  // per rank (the sampler drops the remainder)
        static_cast<std::size_t>(t.data.train.images.size(0)) /
        static_cast<std::size_t>(t.runtime.size());
    total += (epochs - epoch - 1) * ((full + static_cast<std::size_t>(t.local_batch) - 1) /
                                     static_cast<std::size_t>(t.local_batch));
  }
  const auto max_steps = t.flags.max_steps;
  t.session.monitor().set_total_steps(max_steps > 0 ? std::min(total, max_steps) : total);
}

void train_step(const Trainer& t, const torch::Tensor& batch_index, EpochTotals& totals,
                Progress& progress) {
  const auto x = t.data.train.images.index_select(0, batch_index).to(t.device);
  const auto y = t.data.train.labels.index_select(0, batch_index).to(t.device);
  t.model.optimizer.zero_grad();
  const auto loss = torch::nn::functional::cross_entropy(t.model.net->forward(x), y);
  loss.backward();
  if (t.model.ddp.synchronize()) {
    t.model.optimizer.step();
  } else {
    ++progress.skipped_steps;  // NaN/Inf in some rank's gradients, as AMP skips
    t.runtime.log().warn("step {}: non-finite gradients on some rank, step skipped",
                         progress.global_step + 1);
    if (t.runtime.rank() == 0) {
      t.session.monitor().event("fault", "step " + std::to_string(progress.global_step + 1) +
                                             ": non-finite gradients on some rank, step skipped");
    }
  }
  const double step_loss = loss.item<double>();
  totals.loss_sum += step_loss;
  ++totals.batches;
  ++progress.global_step;
  t.session.step(progress.global_step, step_loss, static_cast<std::uint64_t>(x.size(0)));
  if (t.fault) t.fault->at_step(t.runtime.rank(), progress.global_step);
}

EpochTotals train_epoch(const Trainer& t, std::uint64_t epoch, std::size_t first_position,
                        Progress& progress) {
  t.sampler.set_epoch(epoch, first_position);
  set_epoch_lr(t.model, t.flags, epoch);
  const std::vector<std::size_t> mine = t.sampler.indices();
  const auto index = torch::from_blob(const_cast<std::size_t*>(mine.data()),
                                      {static_cast<std::int64_t>(mine.size())}, torch::kLong)
                         .clone();
  t.model.net->train();
  EpochTotals totals;
  const auto count = static_cast<std::int64_t>(mine.size());
  totals.count = count;
  const std::int64_t local_batch = t.local_batch;
  const std::int64_t steps = (count + local_batch - 1) / local_batch;
  set_total_steps(t, epoch, progress.global_step, steps);
  t.session.monitor().start_timing();
  for (std::int64_t step = 0; step < steps; ++step) {
    const auto batch_index =
        index.narrow(0, step * local_batch, std::min(local_batch, count - step * local_batch));
    train_step(t, batch_index, totals, progress);
    const std::size_t position = t.sampler.position_after(
        static_cast<std::size_t>(std::min(count, (step + 1) * local_batch)));
    if (step + 1 == steps) {
      save_checkpoint(t, progress.global_step, epoch + 1, 0);
    } else {
      save_checkpoint(t, progress.global_step, epoch, position);
    }
    if (t.flags.max_steps > 0 && progress.global_step >= t.flags.max_steps) {
      progress.stop = true;
      break;
    }
    if (t.runtime.rank() == 0 && !t.flags.json && (step + 1) % 50 == 0) {
      t.runtime.log().info("epoch {} step {}/{} loss {:.4f}", epoch + 1, step + 1, steps,
                           totals.loss_sum / static_cast<double>(totals.batches));
    }
  }
  return totals;
}

// Test accuracy: each rank scores every world-th test sample; the counts are summed.
std::int64_t count_correct(const Trainer& t) {
  torch::NoGradGuard no_grad;
  t.model.net->eval();
  const Dataset& test = t.data.test;
  const auto test_index =
      torch::arange(t.runtime.rank(), test.images.size(0), t.runtime.size(), torch::kLong);
  std::int64_t correct = 0;
  for (std::int64_t from = 0; from < test_index.size(0); from += 1000) {
    const auto chunk =
        test_index.narrow(0, from, std::min<std::int64_t>(1000, test_index.size(0) - from));
    const auto predicted =
        t.model.net->forward(test.images.index_select(0, chunk).to(t.device)).argmax(1);
    correct +=
        predicted.eq(test.labels.index_select(0, chunk).to(t.device)).sum().item<std::int64_t>();
  }
  return correct;
}

// One epoch's line, summed over the ranks.
struct EpochReport {
  std::uint64_t epoch = 0;
  double mean_loss = 0;
  double accuracy = 0;
  double samples_per_s = 0;
  double seconds = 0;
  std::uint64_t wire_before = 0;  // the engine's wire bytes when the epoch began
};

void report_epoch(const Trainer& t, const EpochReport& r, std::uint64_t skipped_steps) {
  const auto epochs = t.flags.epochs;
  char summary[160];
  std::snprintf(summary, sizeof summary,
                "epoch %llu/%llu: loss %.4f, test accuracy %.4f, %.0f samples/s",
                static_cast<unsigned long long>(r.epoch + 1),
                static_cast<unsigned long long>(epochs), r.mean_loss, r.accuracy, r.samples_per_s);
  t.session.monitor().event("epoch", summary);
  if (t.flags.json) {
    nlohmann::json line{{"epoch", r.epoch + 1},
                        {"loss", r.mean_loss},
                        {"test_accuracy", r.accuracy},
                        {"test_samples", t.data.test.images.size(0)},
                        {"samples_per_s", r.samples_per_s},
                        {"seconds", r.seconds},
                        {"ranks", t.runtime.size()},
                        {"batch_size", t.flags.global_batch},
                        {"compress", t.model.ddp_options.compression.to_string()},
                        {"device", t.device.str()},
                        {"wire_bytes_rank0", t.session.engine().stats().wire_bytes - r.wire_before},
                        {"skipped_steps", skipped_steps}};
    std::printf("%s\n", line.dump().c_str());
    std::fflush(stdout);
  } else {
    t.runtime.log().info(
        "epoch {}/{}: loss {:.4f}, test accuracy {:.4f}, {:.0f} samples/s ({:.1f} s)", r.epoch + 1,
        epochs, r.mean_loss, r.accuracy, r.samples_per_s, r.seconds);
  }
}

void run_epochs(const Trainer& t, const Resume& resume, Progress& progress) {
  const int world = t.runtime.size();
  try {
    for (std::uint64_t epoch = resume.epoch; epoch < t.flags.epochs && !progress.stop; ++epoch) {
      EpochReport report;
      report.epoch = epoch;
      const auto start = Clock::now();
      report.wire_before = t.session.engine().stats().wire_bytes;
      const EpochTotals totals =
          train_epoch(t, epoch, epoch == resume.epoch ? resume.position : 0, progress);
      report.seconds = std::chrono::duration<double>(Clock::now() - start).count();
      const std::int64_t correct = count_correct(t);
      std::array<double, 3> sums{totals.loss_sum,
                                 static_cast<double>(std::max<std::int64_t>(totals.batches, 1)),
                                 static_cast<double>(correct)};
      t.session.communicator()
          .allreduce(unimsg::host_view(sums.data(), sums.size()),
                     unimsg::host_view(sums.data(), sums.size()),
                     {unimsg::ReduceOp::kSum, "epoch.totals"})
          .wait();
      report.mean_loss = sums[0] / sums[1];
      progress.accuracy = sums[2] / static_cast<double>(t.data.test.images.size(0));
      report.accuracy = progress.accuracy;
      report.samples_per_s = static_cast<double>(totals.count) * world / report.seconds;
      if (t.runtime.rank() == 0) report_epoch(t, report, progress.skipped_steps);
    }
  } catch (const unimsg::TimeoutError& error) {
    // A collective past UNIMSG_COLLECTIVE_TIMEOUT_S: some rank stopped taking part.
    t.session.abort_restartable(error, progress.global_step);
  }
}

// For comparing runs (a resumed one against an uninterrupted one): the parameters' L2 norm.
void print_final(Net& net, std::uint64_t global_step) {
  double squares = 0;
  for (const auto& parameter : net->parameters()) {
    squares += parameter.to(torch::kDouble).pow(2).sum().item<double>();
  }
  char line[160];
  std::snprintf(line, sizeof line, "{\"final\":true,\"global_step\":%llu,\"params_l2\":%.17g}",
                static_cast<unsigned long long>(global_step), std::sqrt(squares));
  std::printf("%s\n", line);
}

int run(int argc, char** argv) {
  unimsg::Runtime runtime(&argc, &argv);
  const int rank = runtime.rank();
  const int world = runtime.size();
  const std::optional<Flags> flags = parse_flags(argc, argv, rank, world);
  if (!flags) return 0;
  const std::uint64_t threads = intra_op_threads(flags->threads, world);
  torch::set_num_threads(static_cast<int>(threads));
  torch::manual_seed(flags->seed);
  const torch::Device device = choose_device(flags->device, rank);
  const Data data = load_data(runtime, *flags);

  // Heartbeats (a rank that dies or hangs is noticed by the others' watchdogs, which report it
  // and abort the job for unimsg-run to relaunch on the survivors), status to rank 0
  // (metrics.jsonl, UNIMSG_METRICS_PORT's page, UNIMSG_TIMELINE: docs/monitoring.md), the
  // communicator and the engine.
  unimsg::TrainingSession session(runtime, unimsg::TrainingSessionOptions::from_env());
  Model model(*flags, device, session);
  unimsg::DistributedSampler sampler(static_cast<std::size_t>(data.train.images.size(0)), rank,
                                     world, flags->seed);
  const auto local_batch =
      static_cast<std::int64_t>(flags->global_batch / static_cast<std::uint64_t>(world));
  if (rank == 0 && !flags->json) {
    runtime.log().info(
        "training on {} samples, {} ranks x {} per step, {} thread(s) per rank, "
        "{} bucket(s), on {}",
        data.train.images.size(0), world, local_batch, threads, model.ddp.buckets().size(),
        device.str());
  }
  const Recovery recovery = plan_recovery(*flags, rank);
  std::optional<unimsg::Checkpointer> checkpointer;
  if (!recovery.checkpoint_dir.empty()) {
    checkpointer.emplace(recovery.checkpoint_dir, checkpoint_options(*flags, rank, session));
  }
  const Resume resume =
      recovery.resume ? resume_training(runtime, *checkpointer, model, *flags) : Resume{};

  Progress progress;
  progress.global_step = resume.global_step;
  const Trainer trainer{.runtime = runtime,
                        .session = session,
                        .flags = *flags,
                        .data = data,
                        .model = model,
                        .sampler = sampler,
                        .checkpointer = checkpointer,
                        .fault = recovery.fault,
                        .device = device,
                        .local_batch = local_batch};
  run_epochs(trainer, resume, progress);
  if (checkpointer) checkpointer->flush();
  if (rank == 0 && flags->json) print_final(model.net, progress.global_step);
  session.finish();
  if (progress.accuracy < flags->min_accuracy) {
    if (rank == 0) {
      runtime.log().error("test accuracy {:.4f} is below --min-accuracy {:.4f}", progress.accuracy,
                          flags->min_accuracy);
    }
    return 3;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return unimsg::run_program("train_fashion_mnist", argc, argv, run);
}
