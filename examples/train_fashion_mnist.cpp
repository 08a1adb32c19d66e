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

int run(int argc, char** argv) {
  unimsg::Runtime runtime(&argc, &argv);
  const int rank = runtime.rank();
  const int world = runtime.size();

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
  const auto args = cli.parse(argc, argv);
  if (args.count("help")) {
    if (rank == 0) std::puts(cli.help().c_str());
    return 0;
  }
  const auto epochs = args["epochs"].as<std::uint64_t>();
  const auto global_batch = args["batch-size"].as<std::uint64_t>();
  const double lr = args["lr"].as<double>();
  const double momentum = args["momentum"].as<double>();
  const bool json = args.count("json") > 0;
  if (epochs == 0) throw unimsg::ConfigError(rank, "--epochs", "must be at least 1");
  if (global_batch < static_cast<std::uint64_t>(world) ||
      global_batch % static_cast<std::uint64_t>(world) != 0) {
    throw unimsg::ConfigError(rank, "--batch-size",
                              std::to_string(global_batch) + " does not split evenly across " +
                                  std::to_string(world) + " ranks");
  }
  if (!(lr > 0) || !(momentum >= 0 && momentum < 1)) {
    throw unimsg::ConfigError(rank, "--lr/--momentum", "need lr > 0 and 0 <= momentum < 1");
  }
  std::uint64_t threads = args["threads"].as<std::uint64_t>();
  if (threads == 0) {
    int local_ranks = world;
    if (const auto v = unimsg::env_value("OMPI_COMM_WORLD_LOCAL_SIZE")) {
      local_ranks =
          static_cast<int>(unimsg::parse_uint(*v, "OMPI_COMM_WORLD_LOCAL_SIZE", 1, 1u << 20));
    }
    threads = std::max<std::uint64_t>(
        1, std::thread::hardware_concurrency() / static_cast<unsigned>(local_ranks));
  }
  torch::set_num_threads(static_cast<int>(threads));
  torch::manual_seed(args["seed"].as<std::uint64_t>());
  const std::string device_name = args["device"].as<std::string>();
  torch::Device device(torch::kCPU);
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
    device = torch::Device(torch::kCUDA,
                           static_cast<torch::DeviceIndex>(
                               local_rank % static_cast<int>(torch::cuda::device_count())));
  } else if (device_name != "cpu") {
    throw unimsg::ConfigError(rank, "--device",
                              "invalid value '" + device_name + "': expected cpu or cuda");
  }

  const std::filesystem::path dir = args["data-dir"].as<std::string>();
  const auto fetched = fetch_dataset(runtime, args["data-url"].as<std::string>(),
                                     args["data-cache"].as<std::string>());
  const auto find = [&](const std::string& stem) {
    if (const auto it = fetched.find(stem); it != fetched.end()) return it->second;
    for (const auto& name : {stem + ".gz", stem}) {
      if (std::filesystem::exists(dir / name)) return dir / name;
    }
    throw unimsg::DataError(rank, "train_fashion_mnist",
                            "no " + stem + "(.gz) in " + dir.string() +
                                " (install Debian's dataset-fashion-mnist or pass --data-dir)");
  };
  const Dataset train = load(find("train-images-idx3-ubyte"), find("train-labels-idx1-ubyte"),
                             args["limit"].as<std::uint64_t>());
  const Dataset test = load(find("t10k-images-idx3-ubyte"), find("t10k-labels-idx1-ubyte"),
                            args["test-limit"].as<std::uint64_t>());

  // Heartbeats (a rank that dies or hangs is noticed by the others' watchdogs, which report it
  // and abort the job for unimsg-run to relaunch on the survivors), status to rank 0
  // (metrics.jsonl, UNIMSG_METRICS_PORT's page, UNIMSG_TIMELINE: docs/monitoring.md), the
  // communicator and the engine.
  unimsg::TrainingSession session(runtime, unimsg::TrainingSessionOptions::from_env());
  unimsg::Monitor& monitor = session.monitor();
  unimsg::Engine& engine = session.engine();
  Net model;
  model->to(device);  // before the wrapper and the optimizer see the parameters
  unimsg::DdpOptions ddp_options;
  ddp_options.compression = unimsg::CompressionSpec::parse(args["compress"].as<std::string>());
  ddp_options.compression_warmup_steps = args["compress-warmup"].as<std::uint64_t>();
  if (ddp_options.compression.compresses() && args.count("momentum-correction")) {
    ddp_options.momentum_correction = momentum;
  }
  unimsg::DistributedDataParallel ddp(*model, engine, session.communicator(), ddp_options);
  torch::optim::SGD optimizer(
      model->parameters(),
      torch::optim::SGDOptions(lr).momentum(ddp_options.momentum_correction > 0 ? 0 : momentum));
  unimsg::DistributedSampler sampler(static_cast<std::size_t>(train.images.size(0)), rank, world,
                                     args["seed"].as<std::uint64_t>());
  const auto local_batch =
      static_cast<std::int64_t>(global_batch / static_cast<std::uint64_t>(world));
  if (rank == 0 && !json) {
    runtime.log().info(
        "training on {} samples, {} ranks x {} per step, {} thread(s) per rank, "
        "{} bucket(s), on {}",
        train.images.size(0), world, local_batch, threads, ddp.buckets().size(), device.str());
  }

  // Checkpoints: model + optimizer, RNG, and where the data stands (epoch, global position).
  // Under unimsg-run: its --checkpoint-dir arrives as UNIMSG_CHECKPOINT_DIR, and a relaunch
  // (UNIMSG_RESTART_COUNT > 0) resumes from the newest checkpoint.
  std::string checkpoint_dir = args["checkpoint-dir"].as<std::string>();
  if (checkpoint_dir.empty()) {
    checkpoint_dir = unimsg::env_value("UNIMSG_CHECKPOINT_DIR").value_or("");
  }
  const bool relaunched = unimsg::env_uint("UNIMSG_RESTART_COUNT", 0, 1u << 30).value_or(0) > 0;
  const bool resume = args.count("resume") > 0 || (relaunched && !checkpoint_dir.empty());
  const auto fault = unimsg::FaultInjection::from_env();
  const auto checkpoint_every = args["checkpoint-every"].as<std::uint64_t>();
  const auto max_steps = args["max-steps"].as<std::uint64_t>();
  if ((checkpoint_every > 0 || resume) && checkpoint_dir.empty()) {
    throw unimsg::ConfigError(rank, "--checkpoint-every/--resume", "need --checkpoint-dir");
  }
  std::optional<unimsg::Checkpointer> checkpointer;
  if (!checkpoint_dir.empty()) {
    unimsg::CheckpointOptions checkpoint_options;
    checkpoint_options.rank = rank;
    checkpoint_options.keep = static_cast<std::size_t>(args["checkpoint-keep"].as<std::uint64_t>());
    checkpoint_options.trace = session.trace();
    checkpointer.emplace(checkpoint_dir, checkpoint_options);
  }
  std::uint64_t global_step = 0;
  std::uint64_t first_epoch = 0;
  std::size_t first_position = 0;
  if (resume) {
    std::vector<std::string> skipped;
    // The newest intact checkpoint any rank holds (a fast tier may be on one host only).
    std::optional<unimsg::Checkpoint> restored;
    if (auto found = unimsg::restore_newest_anywhere(
            MPI_COMM_WORLD,
            [&](std::vector<std::string>* s) { return checkpointer->load_latest(s); }, &skipped)) {
      if (found->received && rank != 0) {
        runtime.log().info("checkpoint of step {} received from rank {}", found->checkpoint.step,
                           found->source_rank);
      }
      restored = std::move(found->checkpoint);
    }
    for (const auto& why : skipped) runtime.log().warn("skipped a damaged checkpoint: {}", why);
    if (restored) {
      unimsg::load_training_state(restored->blobs.at("training"), *model, optimizer);
      unimsg::load_rng_state(restored->blobs.at("rng"));
      const auto meta = nlohmann::json::parse(restored->metadata_json);
      global_step = restored->step;
      first_epoch = meta.at("epoch").get<std::uint64_t>();
      first_position = meta.at("position").get<std::size_t>();
      if (meta.at("batch_size").get<std::uint64_t>() != global_batch) {
        throw unimsg::ConfigError(
            rank, "--resume",
            "the checkpoint was taken with --batch-size " + meta.at("batch_size").dump());
      }
      if (rank == 0) {  // on stderr, with --json too
        runtime.log().info(
            "resumed from step {} (epoch {}, sample {} of the epoch), saved by {} "
            "rank(s), now {}",
            global_step, first_epoch + 1, first_position, meta.at("world_size").get<int>(), world);
      }
    }
  }
  const auto save_checkpoint = [&](std::uint64_t epoch, std::size_t position) {
    if (rank != 0 || checkpoint_every == 0 || global_step % checkpoint_every != 0) return;
    unimsg::Checkpoint checkpoint;
    checkpoint.step = global_step;
    checkpoint.blobs["training"] = unimsg::save_training_state(*model, optimizer);
    checkpoint.blobs["rng"] = unimsg::save_rng_state();
    checkpoint.metadata_json = nlohmann::json{
        {"epoch", epoch},
        {"position", position},
        {"world_size", world},
        {"batch_size",
         global_batch}}.dump();
    checkpointer->save_async(std::move(checkpoint));
  };

  double accuracy = 0;
  std::uint64_t skipped_steps = 0;
  bool stop = false;
  try {
    for (std::uint64_t epoch = first_epoch; epoch < epochs && !stop; ++epoch) {
      const auto start = Clock::now();
      const auto wire_before = engine.stats().wire_bytes;
      sampler.set_epoch(epoch, epoch == first_epoch ? first_position : 0);
      // A step decay: the last epochs settle at a fifth of the rate (derived from the epoch, so a
      // resumed run decays at the same point).
      const auto decay_epoch = args["lr-decay-epoch"].as<std::uint64_t>();
      const double epoch_lr = decay_epoch > 0 && epoch + 1 >= decay_epoch ? lr / 5 : lr;
      for (auto& group : optimizer.param_groups()) {
        static_cast<torch::optim::SGDOptions&>(group.options()).lr(epoch_lr);
      }
      const std::vector<std::size_t> mine = sampler.indices();
      const auto index = torch::from_blob(const_cast<std::size_t*>(mine.data()),
                                          {static_cast<std::int64_t>(mine.size())}, torch::kLong)
                             .clone();
      model->train();
      double loss_sum = 0;
      std::int64_t batches = 0;
      const auto count = static_cast<std::int64_t>(mine.size());
      const std::int64_t steps = (count + local_batch - 1) / local_batch;
      {
        // (A resumed epoch starts part-way: its steps are those left.)
        std::uint64_t total = global_step + static_cast<std::uint64_t>(steps);
        if (epochs > epoch + 1) {
          const std::size_t full =  // per rank (the sampler drops the remainder)
              static_cast<std::size_t>(train.images.size(0)) / static_cast<std::size_t>(world);
          total += (epochs - epoch - 1) * ((full + static_cast<std::size_t>(local_batch) - 1) /
                                           static_cast<std::size_t>(local_batch));
        }
        monitor.set_total_steps(max_steps > 0 ? std::min(total, max_steps) : total);
      }
      monitor.start_timing();
      for (std::int64_t step = 0; step < steps; ++step) {
        const auto batch_index =
            index.narrow(0, step * local_batch, std::min(local_batch, count - step * local_batch));
        const auto x = train.images.index_select(0, batch_index).to(device);
        const auto y = train.labels.index_select(0, batch_index).to(device);
        optimizer.zero_grad();
        const auto loss = torch::nn::functional::cross_entropy(model->forward(x), y);
        loss.backward();
        if (ddp.synchronize()) {
          optimizer.step();
        } else {
          ++skipped_steps;  // NaN/Inf in some rank's gradients, as AMP skips
          runtime.log().warn("step {}: non-finite gradients on some rank, step skipped",
                             global_step + 1);
          if (rank == 0) {
            monitor.event("fault", "step " + std::to_string(global_step + 1) +
                                       ": non-finite gradients on some rank, step skipped");
          }
        }
        const double step_loss = loss.item<double>();
        loss_sum += step_loss;
        ++batches;
        ++global_step;
        session.step(global_step, step_loss, static_cast<std::uint64_t>(x.size(0)));
        if (fault) fault->at_step(rank, global_step);
        const std::size_t position = sampler.position_after(
            static_cast<std::size_t>(std::min(count, (step + 1) * local_batch)));
        if (step + 1 == steps) {
          save_checkpoint(epoch + 1, 0);
        } else {
          save_checkpoint(epoch, position);
        }
        if (max_steps > 0 && global_step >= max_steps) {
          stop = true;
          break;
        }
        if (rank == 0 && !json && (step + 1) % 50 == 0) {
          runtime.log().info("epoch {} step {}/{} loss {:.4f}", epoch + 1, step + 1, steps,
                             loss_sum / static_cast<double>(batches));
        }
      }
      const double seconds = std::chrono::duration<double>(Clock::now() - start).count();

      // Test accuracy: each rank scores every world-th test sample; the counts are summed.
      torch::NoGradGuard no_grad;
      model->eval();
      const auto test_index = torch::arange(rank, test.images.size(0), world, torch::kLong);
      std::int64_t correct = 0;
      for (std::int64_t from = 0; from < test_index.size(0); from += 1000) {
        const auto chunk =
            test_index.narrow(0, from, std::min<std::int64_t>(1000, test_index.size(0) - from));
        const auto predicted =
            model->forward(test.images.index_select(0, chunk).to(device)).argmax(1);
        correct +=
            predicted.eq(test.labels.index_select(0, chunk).to(device)).sum().item<std::int64_t>();
      }
      std::array<double, 3> totals{loss_sum,
                                   static_cast<double>(std::max<std::int64_t>(batches, 1)),
                                   static_cast<double>(correct)};
      session.communicator()
          .allreduce(unimsg::host_view(totals.data(), totals.size()),
                     unimsg::host_view(totals.data(), totals.size()), unimsg::ReduceOp::kSum,
                     "epoch.totals")
          .wait();
      const double mean_loss = totals[0] / totals[1];
      accuracy = totals[2] / static_cast<double>(test.images.size(0));
      const double samples_per_s = static_cast<double>(count) * world / seconds;
      if (rank == 0) {
        char summary[160];
        std::snprintf(summary, sizeof summary,
                      "epoch %llu/%llu: loss %.4f, test accuracy %.4f, %.0f samples/s",
                      static_cast<unsigned long long>(epoch + 1),
                      static_cast<unsigned long long>(epochs), mean_loss, accuracy, samples_per_s);
        monitor.event("epoch", summary);
        if (json) {
          nlohmann::json line{{"epoch", epoch + 1},
                              {"loss", mean_loss},
                              {"test_accuracy", accuracy},
                              {"test_samples", test.images.size(0)},
                              {"samples_per_s", samples_per_s},
                              {"seconds", seconds},
                              {"ranks", world},
                              {"batch_size", global_batch},
                              {"compress", ddp_options.compression.to_string()},
                              {"device", device.str()},
                              {"wire_bytes_rank0", engine.stats().wire_bytes - wire_before},
                              {"skipped_steps", skipped_steps}};
          std::printf("%s\n", line.dump().c_str());
          std::fflush(stdout);
        } else {
          runtime.log().info(
              "epoch {}/{}: loss {:.4f}, test accuracy {:.4f}, {:.0f} samples/s ({:.1f} s)",
              epoch + 1, epochs, mean_loss, accuracy, samples_per_s, seconds);
        }
      }
    }
  } catch (const unimsg::TimeoutError& error) {
    // A collective past UNIMSG_COLLECTIVE_TIMEOUT_S: some rank stopped taking part.
    session.abort_restartable(error, global_step);
  }
  if (checkpointer) checkpointer->flush();
  if (rank == 0 && json) {
    // For comparing runs (a resumed one against an uninterrupted one): the parameters' L2 norm.
    double squares = 0;
    for (const auto& parameter : model->parameters()) {
      squares += parameter.to(torch::kDouble).pow(2).sum().item<double>();
    }
    char line[160];
    std::snprintf(line, sizeof line, "{\"final\":true,\"global_step\":%llu,\"params_l2\":%.17g}",
                  static_cast<unsigned long long>(global_step), std::sqrt(squares));
    std::printf("%s\n", line);
  }
  session.finish();
  const double min_accuracy = args["min-accuracy"].as<double>();
  if (accuracy < min_accuracy) {
    if (rank == 0) {
      runtime.log().error("test accuracy {:.4f} is below --min-accuracy {:.4f}", accuracy,
                          min_accuracy);
    }
    return 3;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return unimsg::run_program("train_fashion_mnist", argc, argv, run);
}
