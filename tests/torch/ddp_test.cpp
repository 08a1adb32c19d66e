// The DDP wrapper on 1-5 ranks: the same parameters as one process with the same global batch,
// communication overlapping backward, unused parameters, gradient accumulation.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <vector>

#include "unimsg/collectives/engine.hpp"
#include "unimsg/torch/ddp.hpp"
#include "world_fixture.hpp"

namespace unimsg {
namespace {

using Clock = std::chrono::steady_clock;

struct MlpImpl : torch::nn::Module {
  MlpImpl()
      : a(register_module("a", torch::nn::Linear(16, 64))),
        b(register_module("b", torch::nn::Linear(64, 64))),
        c(register_module("c", torch::nn::Linear(64, 5))) {}
  torch::Tensor forward(torch::Tensor x) {
    return c->forward(torch::tanh(b->forward(torch::tanh(a->forward(x)))));
  }
  torch::nn::Linear a, b, c;
};
TORCH_MODULE(Mlp);

class DdpTest : public testing_support::WorldTest {
 protected:
  void SetUp() override {
    WorldTest::SetUp();
    torch::set_num_threads(1);
    engine_ = std::make_unique<Engine>(*comm_, *bus_, EngineOptions::from_env());
  }
  void TearDown() override {
    engine_.reset();
    WorldTest::TearDown();
  }
  int rank() const { return bus_->rank(); }
  int size() const { return bus_->size(); }

  std::unique_ptr<Engine> engine_;
};

// Global batch of `kBatch` samples; rank r takes rows r, r+W, r+2W, ... (as DistributedSampler).
constexpr std::int64_t kBatch = 60;  // divisible by 1..5 ranks

torch::Tensor rows_of(const torch::Tensor& all, int rank, int world) {
  return all.index_select(0, torch::arange(rank, all.size(0), world, torch::kLong));
}

void copy_parameters(torch::nn::Module& from, torch::nn::Module& to) {
  torch::NoGradGuard no_grad;
  auto source = from.parameters();
  auto target = to.parameters();
  for (std::size_t i = 0; i < source.size(); ++i) target[i].copy_(source[i]);
}

// Trains `model` through DDP with `options` for a few steps and returns its parameters; the
// optimizer runs without momentum when DDP applies it (momentum correction).
std::vector<torch::Tensor> train_compressed(Mlp& model, Engine& engine, Communicator& comm,
                                            DdpOptions options, int rank, int world,
                                            int steps = 5) {
  options.first_bucket_bytes = 1024;
  options.bucket_bytes = 8 * 1024;
  DistributedDataParallel ddp(*model, engine, comm, options);
  torch::optim::SGD optimizer(
      model->parameters(),
      torch::optim::SGDOptions(0.1).momentum(options.momentum_correction > 0 ? 0.0 : 0.9));
  torch::manual_seed(7);
  for (int step = 0; step < steps; ++step) {
    const auto x = torch::randn({kBatch, 16});
    const auto y = torch::randint(0, 5, {kBatch}, torch::kLong);
    optimizer.zero_grad();
    torch::nn::functional::cross_entropy(model->forward(rows_of(x, rank, world)),
                                         rows_of(y, rank, world))
        .backward();
    EXPECT_TRUE(ddp.synchronize());
    optimizer.step();
  }
  std::vector<torch::Tensor> out;
  for (const auto& p : model->parameters()) out.push_back(p.detach().clone());
  return out;
}

// Momentum applied by DDP before the reduction (DGC's correction) is momentum SGD: without
// compression the two give the same parameters.
TEST_F(DdpTest, CompressMomentumCorrectionEqualsMomentumSgdUncompressed) {
  torch::manual_seed(3);
  Mlp plain, corrected;
  copy_parameters(*plain, *corrected);
  const auto expected = train_compressed(plain, *engine_, *comm_, {}, rank(), size());
  DdpOptions options;
  options.name = "corrected";
  options.momentum_correction = 0.9;
  const auto trained = train_compressed(corrected, *engine_, *comm_, options, rank(), size());
  for (std::size_t i = 0; i < trained.size(); ++i) {
    EXPECT_TRUE(torch::allclose(trained[i], expected[i], 1e-4, 1e-5)) << "parameter " << i;
  }
}

// fp16 buckets (error feedback, used-marks beside them) train to nearly the same parameters as
// f32; topk at 25 % and PowerSGD rank 2 (per matrix) with a warm-up stay close too. Every rank ends
// with the same parameters.
TEST_F(DdpTest, CompressedBucketsTrainCloseToUncompressed) {
  torch::manual_seed(3);
  Mlp reference_model;
  const auto expected = train_compressed(reference_model, *engine_, *comm_, {}, rank(), size());
  for (const auto& [text, tolerance] :
       {std::pair{"fp16", 1e-4}, std::pair{"topk:0.25", 0.03}, std::pair{"powersgd:2", 0.03}}) {
    SCOPED_TRACE(text);
    torch::manual_seed(3);
    Mlp model;
    DdpOptions options;
    options.name = std::string("ddp.") + text;
    options.compression = CompressionSpec::parse(text);
    options.compression_warmup_steps = 1;
    const auto trained = train_compressed(model, *engine_, *comm_, options, rank(), size());
    for (std::size_t i = 0; i < trained.size(); ++i) {
      const float off = (trained[i] - expected[i]).abs().max().item<float>();
      EXPECT_LT(off, tolerance) << "parameter " << i;
      auto gathered = trained[i].contiguous().clone();
      auto first = gathered.clone();
      comm_->broadcast(to_view(first), {0}).wait();
      EXPECT_TRUE(torch::equal(first, gathered)) << "rank " << rank() << " parameter " << i;
    }
  }
}

TEST_F(DdpTest, NRanksEqualOneProcessWithTheSameGlobalBatch) {
  torch::manual_seed(100 + rank());  // different initial weights per rank: DDP must broadcast
  Mlp model;
  DdpOptions options;
  options.first_bucket_bytes = 1024;  // several buckets even for this small model
  options.bucket_bytes = 8 * 1024;
  DistributedDataParallel ddp(*model, *engine_, *comm_, options);
  ASSERT_GE(ddp.buckets().size(), 3u);
  Mlp reference;
  copy_parameters(*model, *reference);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  torch::optim::SGD reference_optimizer(reference->parameters(),
                                        torch::optim::SGDOptions(0.1).momentum(0.9));
  torch::manual_seed(7);  // the same data on every rank
  for (int step = 0; step < 5; ++step) {
    const auto x = torch::randn({kBatch, 16});
    const auto y = torch::randint(0, 5, {kBatch}, torch::kLong);
    optimizer.zero_grad();
    torch::nn::functional::cross_entropy(model->forward(rows_of(x, rank(), size())),
                                         rows_of(y, rank(), size()))
        .backward();
    ddp.synchronize();
    optimizer.step();
    reference_optimizer.zero_grad();
    torch::nn::functional::cross_entropy(reference->forward(x), y).backward();
    reference_optimizer.step();
  }
  // Tolerance: float sums in another order, through five steps of momentum SGD.
  const auto trained = model->parameters();
  const auto expected = reference->parameters();
  for (std::size_t i = 0; i < trained.size(); ++i) {
    EXPECT_TRUE(torch::allclose(trained[i], expected[i], /*rtol=*/1e-4, /*atol=*/1e-5))
        << "parameter " << i << " differs by "
        << (trained[i] - expected[i]).abs().max().item<float>();
  }
}

// A deep stack whose last layers finish backward first: their bucket must be reducing while the
// first layers' gradients are still being computed.
struct DeepImpl : torch::nn::Module {
  DeepImpl() {
    for (int i = 0; i < 12; ++i) {
      std::string name = "layer";
      name += std::to_string(i);  // (not "layer" + ...: a false -Wrestrict in GCC 12 at -O3)
      layers.push_back(register_module(name, torch::nn::Linear(256, 256)));
    }
  }
  torch::Tensor forward(torch::Tensor x) {
    for (auto& layer : layers) x = torch::relu(layer->forward(x));
    return x;
  }
  std::vector<torch::nn::Linear> layers;
};
TORCH_MODULE(Deep);

TEST_F(DdpTest, BucketsAreReducedWhileBackwardStillRuns) {
  Deep model;
  DdpOptions options;
  options.first_bucket_bytes = 300 * 1024;  // about one layer per bucket
  options.bucket_bytes = 300 * 1024;
  DistributedDataParallel ddp(*model, *engine_, *comm_, options);
  ASSERT_GE(ddp.buckets().size(), 6u);
  std::mutex mutex;
  std::vector<Clock::time_point> starts;
  engine_->set_listener([&](const EngineEvent& event) {
    if (event.type != EngineEvent::Type::kReduceStart) return;
    std::lock_guard lock(mutex);
    starts.push_back(event.time);
  });
  // Scheduling on a loaded machine decides how early the engine thread runs, so look for the
  // overlap over several steps rather than demanding it in one.
  bool overlapped = false;
  const auto x = torch::randn({512, 256});
  for (int step = 0; step < 8 && !overlapped; ++step) {
    {
      std::lock_guard lock(mutex);
      starts.clear();
    }
    model->forward(x).sum().backward();
    const auto backward_end = Clock::now();
    ddp.synchronize();
    std::int32_t here = 0;
    {
      std::lock_guard lock(mutex);
      ASSERT_FALSE(starts.empty());
      here = *std::min_element(starts.begin(), starts.end()) < backward_end ? 1 : 0;
    }
    // Every rank leaves the loop at the same step (the ranks' own timings differ).
    std::int32_t anywhere = here;
    comm_->allreduce(host_view(&here, 1), host_view(&anywhere, 1), {ReduceOp::kMax}).wait();
    overlapped = anywhere != 0;
  }
  engine_->set_listener({});
  EXPECT_TRUE(overlapped) << "no bucket's allreduce started before backward ended in 8 steps";
}

struct BranchImpl : torch::nn::Module {
  BranchImpl()
      : trunk(register_module("trunk", torch::nn::Linear(4, 4))),
        branch(register_module("branch", torch::nn::Linear(4, 4))) {}
  torch::nn::Linear trunk, branch;
};
TORCH_MODULE(Branch);

TEST_F(DdpTest, ParametersUnusedOnSomeRanksDoNotHang) {
  Branch model;
  DistributedDataParallel ddp(*model, *engine_, *comm_);
  torch::manual_seed(3);
  const auto x = torch::randn({8, 4});
  // Only even ranks use the branch; every rank uses the trunk.
  auto out = model->trunk->forward(x);
  if (rank() % 2 == 0) out = model->branch->forward(out);
  out.sum().backward();
  ddp.synchronize();  // must return on every rank
  // The branch weight's gradient is the average over all ranks, the odd ones adding zero.
  torch::Tensor expected;
  {
    Branch copy;
    copy_parameters(*model, *copy);
    copy->branch->forward(copy->trunk->forward(x)).sum().backward();
    const int users = (size() + 1) / 2;
    expected = copy->branch->weight.grad() * static_cast<double>(users) / size();
  }
  ASSERT_TRUE(model->branch->weight.grad().defined());
  EXPECT_TRUE(torch::allclose(model->branch->weight.grad(), expected, 1e-5, 1e-6));
}

TEST_F(DdpTest, NoSyncAccumulatesLocallyThenAveragesEverything) {
  Mlp model;
  DistributedDataParallel ddp(*model, *engine_, *comm_);
  Mlp reference;
  copy_parameters(*model, *reference);
  torch::manual_seed(11);
  const auto x1 = torch::randn({kBatch, 16});
  const auto x2 = torch::randn({kBatch, 16});
  {
    auto guard = ddp.no_sync();
    model->forward(rows_of(x1, rank(), size())).pow(2).mean().backward();
  }
  model->forward(rows_of(x2, rank(), size())).pow(2).mean().backward();
  ddp.synchronize();
  reference->forward(x1).pow(2).mean().backward();
  reference->forward(x2).pow(2).mean().backward();
  const auto got = model->parameters();
  const auto want = reference->parameters();
  for (std::size_t i = 0; i < got.size(); ++i) {
    EXPECT_TRUE(torch::allclose(got[i].grad(), want[i].grad(), 1e-4, 1e-6)) << "parameter " << i;
  }
}

TEST_F(DdpTest, TheModuleOutlivesTheWrapper) {
  Mlp model;
  {
    DistributedDataParallel ddp(*model, *engine_, *comm_);
    model->forward(torch::randn({4, 16})).sum().backward();
    ddp.synchronize();
  }
  // No hook of the destroyed wrapper runs: plain local gradients.
  for (auto& parameter : model->parameters()) parameter.mutable_grad() = torch::Tensor();
  model->forward(torch::ones({4, 16})).sum().backward();
  EXPECT_TRUE(model->c->bias.grad().defined());
  EXPECT_TRUE(torch::allclose(model->c->bias.grad(), torch::full({5}, 4.0)));
}

}  // namespace
}  // namespace unimsg
