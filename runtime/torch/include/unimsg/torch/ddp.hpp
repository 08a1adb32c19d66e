#pragma once

// DistributedDataParallel for libtorch modules, over the engine (PyTorch DDP's design, see
// torch/csrc/distributed/c10d/reducer.cpp): parameters are grouped into buckets in reverse order
// (the order backward produces their gradients; the first bucket small so that communication
// starts early), a hook per parameter copies its gradient into its bucket, and a complete bucket
// is handed to the engine at once, so its allreduce overlaps the rest of backward.
// synchronize() waits for every bucket and writes the averaged gradients into .grad.
//
//   DistributedDataParallel ddp(model, engine, communicator);   // broadcasts rank 0's weights
//   loss.backward();
//   ddp.synchronize();
//   optimizer.step();

#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "unimsg/collectives/communicator.hpp"
#include "unimsg/collectives/engine.hpp"

namespace unimsg {

// A host tensor as the collectives see it (contiguous CPU tensors of the engine's dtypes).
TensorView to_view(const torch::Tensor& tensor);

struct DdpOptions {
  std::uint64_t first_bucket_bytes = 1ull << 20;
  std::uint64_t bucket_bytes = 25ull << 20;
  // Prefix of the engine tensor names ("<name>.bucket<i>"); two wrappers in one process need
  // different names.
  std::string name = "ddp";
  // Gradient compression for the buckets (the engine's CompressedAllreduce; error feedback per
  // bucket). A step whose gradients held NaN/Inf on any rank is reported by synchronize().
  CompressionSpec compression;
  // Momentum correction (Lin et al., Deep Gradient Compression, 2018), for compressed buckets:
  // each rank keeps a velocity v = m v + g and that is what is compressed and averaged, so
  // error feedback works on a smoothed signal rather than on raw gradients that momentum would
  // integrate with their compression error. The optimizer must then run without momentum (the
  // averaged velocity is the update direction). Uncompressed, it is the same as momentum SGD.
  // 0: off.
  double momentum_correction = 0;
  // Steps reduced uncompressed before compression starts (1-bit Adam's and DGC's warm-up: error
  // feedback on the large, fast-changing gradients of the first steps destabilises training).
  std::uint64_t compression_warmup_steps = 0;
};

class DistributedDataParallel {
 public:
  // Collective: every rank constructs it with the same module architecture. Broadcasts rank 0's
  // parameters and buffers, so every replica starts equal.
  DistributedDataParallel(torch::nn::Module& module, Engine& engine, Communicator& communicator,
                          DdpOptions options = {});
  ~DistributedDataParallel();
  DistributedDataParallel(const DistributedDataParallel&) = delete;
  DistributedDataParallel& operator=(const DistributedDataParallel&) = delete;

  // After backward: submits the buckets that did not fill (parameters unused in this step add
  // zeros, on this rank only), waits for all of them and writes each parameter's gradient,
  // averaged over the ranks, into .grad. A parameter no rank used keeps its .grad as it was.
  // Returns false when a compressed bucket held NaN/Inf on some rank: its gradients are NaN and
  // the step should be skipped (every rank gets false; error feedback was left unchanged).
  bool synchronize();

  // While a NoSync lives, backward accumulates gradients without communicating (gradient
  // accumulation); the next synchronize() averages everything accumulated since the last one.
  class NoSync {
   public:
    explicit NoSync(DistributedDataParallel& ddp);
    ~NoSync();
    NoSync(const NoSync&) = delete;
    NoSync& operator=(const NoSync&) = delete;

   private:
    DistributedDataParallel& ddp_;
  };
  NoSync no_sync() { return NoSync(*this); }

  struct BucketInfo {
    std::string name;
    std::size_t parameters = 0;
    std::size_t bytes = 0;
  };
  std::vector<BucketInfo> buckets() const;
  // When each bucket of the last synchronized step was handed to the engine (steady clock), and
  // when synchronize() was called (backward had ended by then).
  std::vector<std::chrono::steady_clock::time_point> last_submit_times() const;
  std::chrono::steady_clock::time_point last_synchronize_time() const;

 private:
  struct Bucket;
  struct Slot {
    std::size_t bucket = 0;
    std::size_t offset = 0;  // elements into the bucket's buffer
    torch::Tensor parameter;
    unsigned hook = 0;  // register_hook's handle, removed with the wrapper
  };

  void on_gradient(std::size_t slot, const torch::Tensor& gradient);
  void submit(Bucket& bucket);

  Engine& engine_;
  Communicator& communicator_;
  DdpOptions options_;
  std::vector<Slot> slots_;
  std::uint64_t synchronized_steps_ = 0;
  std::vector<std::unique_ptr<Bucket>> buckets_;
  mutable std::mutex mutex_;  // hooks may run on autograd worker threads
  bool accumulating_ = false;
  std::chrono::steady_clock::time_point synchronize_time_;
  std::vector<std::chrono::steady_clock::time_point> submit_times_;
};

}  // namespace unimsg
