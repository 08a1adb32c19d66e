#include "unimsg/torch/ddp.hpp"

#include <algorithm>
#include <string>

#include "unimsg/core/error.hpp"

namespace unimsg {

TensorView to_view(const torch::Tensor& tensor) {
  if (!tensor.device().is_cpu()) {
    throw Error(kNoRank, "to_view",
                "only CPU tensors go through the MPI engine (got " + tensor.device().str() + ")");
  }
  if (!tensor.is_contiguous()) throw Error(kNoRank, "to_view", "the tensor is not contiguous");
  DType dtype = DType::kF32;
  switch (tensor.scalar_type()) {
    case torch::kFloat:
      dtype = DType::kF32;
      break;
    case torch::kDouble:
      dtype = DType::kF64;
      break;
    case torch::kHalf:
      dtype = DType::kF16;
      break;
    case torch::kBFloat16:
      dtype = DType::kBF16;
      break;
    case torch::kInt:
      dtype = DType::kI32;
      break;
    case torch::kLong:
      dtype = DType::kI64;
      break;
    case torch::kByte:
      dtype = DType::kU8;
      break;
    default:
      throw Error(kNoRank, "to_view",
                  std::string("dtype ") + c10::toString(tensor.scalar_type()) +
                      " is not one the collectives reduce");
  }
  return TensorView{tensor.data_ptr(), static_cast<std::size_t>(tensor.numel()), dtype,
                    Device::kHost};
}

struct DistributedDataParallel::Bucket {
  std::size_t index = 0;
  std::string name;
  std::vector<std::size_t> slots;
  std::size_t elements = 0;  // gradient elements; then one "used" mark per slot
  torch::Tensor buffer;      // [elements + slots.size()]
  torch::Tensor velocity;    // momentum correction: this rank's velocity
  std::vector<char> ready;   // per slot of this bucket, this step
  std::size_t ready_count = 0;
  bool submitted = false;
  std::vector<Work> works;  // the bucket, or its parts when compressed
};

DistributedDataParallel::DistributedDataParallel(torch::nn::Module& module, Engine& engine,
                                                 Communicator& communicator, DdpOptions options)
    : engine_(engine), communicator_(communicator), options_(std::move(options)) {
  torch::NoGradGuard no_grad;
  // Every replica starts from rank 0's state: parameters and buffers (batch-norm statistics).
  // Tensors in device memory are staged through host copies (the MPI engine takes host memory).
  std::vector<Work> broadcasts;
  std::vector<std::pair<torch::Tensor, torch::Tensor>> staged;  // (device tensor, host copy)
  const auto broadcast = [&](torch::Tensor& tensor) {
    if (tensor.device().is_cpu()) {
      broadcasts.push_back(communicator_.broadcast(to_view(tensor), {0, "ddp.init"}));
      return;
    }
    staged.emplace_back(tensor, tensor.to(torch::kCPU).contiguous());
    broadcasts.push_back(communicator_.broadcast(to_view(staged.back().second), {0, "ddp.init"}));
  };
  for (auto& tensor : module.parameters()) broadcast(tensor);
  for (auto& tensor : module.buffers()) broadcast(tensor);
  for (auto& work : broadcasts) work.wait();
  for (auto& [device_tensor, host] : staged) device_tensor.copy_(host);

  // Buckets in reverse registration order; a new bucket when the limit or the dtype changes.
  std::vector<torch::Tensor> parameters;
  for (auto& parameter : module.parameters()) {
    if (parameter.requires_grad()) parameters.push_back(parameter);
  }
  std::reverse(parameters.begin(), parameters.end());
  std::uint64_t limit = options_.first_bucket_bytes;
  for (auto& parameter : parameters) {
    const std::uint64_t bytes = static_cast<std::uint64_t>(parameter.numel()) *
                                static_cast<std::uint64_t>(parameter.element_size());
    Bucket* current = buckets_.empty() ? nullptr : buckets_.back().get();
    const bool fits =
        current != nullptr && current->buffer.scalar_type() == parameter.scalar_type() &&
        (current->elements * static_cast<std::uint64_t>(parameter.element_size()) + bytes <=
             limit ||
         current->elements == 0);
    if (!fits) {
      if (current != nullptr) limit = options_.bucket_bytes;
      auto bucket = std::make_unique<Bucket>();
      bucket->index = buckets_.size();
      bucket->name = options_.name + ".bucket" + std::to_string(buckets_.size());
      // Buckets live in host memory whatever the parameters' device: gradients of device
      // parameters are copied in as they arrive and the averages copied back.
      bucket->buffer = torch::empty({0}, parameter.options().device(torch::kCPU));
      buckets_.push_back(std::move(bucket));
      current = buckets_.back().get();
    }
    Slot slot;
    slot.bucket = buckets_.size() - 1;
    slot.offset = current->elements;
    slot.parameter = parameter;
    current->elements += static_cast<std::size_t>(parameter.numel());
    current->slots.push_back(slots_.size());
    slots_.push_back(std::move(slot));
  }
  for (auto& bucket : buckets_) {
    bucket->buffer =
        torch::zeros({static_cast<std::int64_t>(bucket->elements + bucket->slots.size())},
                     bucket->buffer.options());
    bucket->ready.assign(bucket->slots.size(), 0);
  }
  submit_times_.resize(buckets_.size());
  for (std::size_t i = 0; i < slots_.size(); ++i) {
    slots_[i].hook = slots_[i].parameter.register_hook(
        [this, i](const torch::Tensor& gradient) { on_gradient(i, gradient); });
  }
}

DistributedDataParallel::~DistributedDataParallel() {
  // The module may outlive this wrapper: its backward must not call into a dead one.
  for (auto& slot : slots_) slot.parameter.remove_hook(slot.hook);
  // Work still pending refers to our buffers: let it finish (a failure was reported already or
  // will be by whoever synchronizes).
  for (auto& bucket : buckets_) {
    if (!bucket->submitted) continue;
    for (auto& work : bucket->works) {
      try {
        if (work.valid()) work.wait();
      } catch (const std::exception&) {
      }
    }
  }
}

void DistributedDataParallel::on_gradient(std::size_t index, const torch::Tensor& gradient) {
  torch::NoGradGuard no_grad;
  std::lock_guard lock(mutex_);
  const Slot& slot = slots_[index];
  Bucket& bucket = *buckets_[slot.bucket];
  if (bucket.submitted) {
    throw Error(communicator_.rank(), "ddp",
                "a gradient for bucket '" + bucket.name +
                    "' arrived after the bucket was sent: call synchronize() after each backward "
                    "(or use no_sync())");
  }
  const auto numel = slot.parameter.numel();
  bucket.buffer.narrow(0, static_cast<std::int64_t>(slot.offset), numel)
      .add_(gradient.reshape({numel}).to(torch::kCPU));
  const std::size_t position = static_cast<std::size_t>(
      std::find(bucket.slots.begin(), bucket.slots.end(), index) - bucket.slots.begin());
  bucket.buffer[static_cast<std::int64_t>(bucket.elements + position)] = 1;
  // Readiness counts only in the backward that communicates: gradients accumulated under
  // no_sync() are already in the buffer.
  if (accumulating_) return;
  if (!bucket.ready[position]) {
    bucket.ready[position] = 1;
    ++bucket.ready_count;
  }
  if (bucket.ready_count == bucket.slots.size()) submit(bucket);
}

void DistributedDataParallel::submit(Bucket& bucket) {
  bucket.submitted = true;
  submit_times_[bucket.index] = std::chrono::steady_clock::now();
  const auto elements = static_cast<std::int64_t>(bucket.elements);
  if (options_.momentum_correction > 0) {
    // DGC's momentum correction: what is reduced (compressed, and kept by error feedback) is
    // this rank's velocity, not the raw gradient; during a warm-up too, as the optimizer runs
    // without momentum throughout.
    auto gradients = bucket.buffer.narrow(0, 0, elements);
    if (!bucket.velocity.defined()) bucket.velocity = torch::zeros_like(gradients);
    bucket.velocity.mul_(options_.momentum_correction).add_(gradients);
    gradients.copy_(bucket.velocity);
  }
  if (!options_.compression.compresses() ||
      synchronized_steps_ < options_.compression_warmup_steps) {
    bucket.works.push_back(engine_.submit(bucket.name, to_view(bucket.buffer), ReduceOp::kAvg));
    return;
  }
  // The "used" marks must arrive intact: they travel beside the compressed gradients, as a
  // tensor of their own.
  const auto marks = static_cast<std::int64_t>(bucket.slots.size());
  bucket.works.push_back(engine_.submit(
      bucket.name + ".used", to_view(bucket.buffer.narrow(0, elements, marks)), ReduceOp::kAvg));
  if (options_.compression.name != "powersgd") {
    bucket.works.push_back(engine_.submit(bucket.name,
                                          to_view(bucket.buffer.narrow(0, 0, elements)),
                                          ReduceOp::kAvg, options_.compression));
    return;
  }
  // PowerSGD approximates matrices: each parameter of two or more dimensions goes as its own
  // (rows = first dimension, as PyTorch's PowerSGD hook views it); vectors (biases) uncompressed.
  for (std::size_t position = 0; position < bucket.slots.size(); ++position) {
    const Slot& slot = slots_[bucket.slots[position]];
    const auto part =
        bucket.buffer.narrow(0, static_cast<std::int64_t>(slot.offset), slot.parameter.numel());
    const std::string name = bucket.name + "." + std::to_string(position);
    if (slot.parameter.dim() < 2) {
      bucket.works.push_back(engine_.submit(name, to_view(part), ReduceOp::kAvg));
      continue;
    }
    auto spec = options_.compression;
    spec.matrix_rows = static_cast<std::size_t>(slot.parameter.size(0));
    bucket.works.push_back(engine_.submit(name, to_view(part), ReduceOp::kAvg, spec));
  }
}

bool DistributedDataParallel::synchronize() {
  TraceSpan span(engine_.trace(), "training", "synchronize");
  torch::NoGradGuard no_grad;
  const auto skipped_before = engine_.stats().nonfinite_steps;
  std::unique_lock lock(mutex_);
  synchronize_time_ = std::chrono::steady_clock::now();
  for (auto& bucket : buckets_) {
    if (!bucket->submitted) submit(*bucket);
  }
  lock.unlock();
  for (auto& bucket : buckets_) {
    for (auto& work : bucket->works) work.wait();
  }
  lock.lock();
  for (auto& bucket : buckets_) {
    for (std::size_t position = 0; position < bucket->slots.size(); ++position) {
      Slot& slot = slots_[bucket->slots[position]];
      const float used_anywhere =
          bucket->buffer[static_cast<std::int64_t>(bucket->elements + position)].item<float>();
      if (used_anywhere <= 0) continue;  // no rank produced a gradient for it
      const auto averaged =
          bucket->buffer.narrow(0, static_cast<std::int64_t>(slot.offset), slot.parameter.numel())
              .view(slot.parameter.sizes());
      auto& grad = slot.parameter.mutable_grad();
      // (A new gradient is the parameter's own tensor, on its device: not a view of the bucket,
      // which is cleared below.)
      if (!grad.defined()) grad = torch::empty_like(slot.parameter);
      grad.copy_(averaged);
    }
    bucket->buffer.zero_();
    std::fill(bucket->ready.begin(), bucket->ready.end(), 0);
    bucket->ready_count = 0;
    bucket->submitted = false;
    bucket->works.clear();
  }
  ++synchronized_steps_;
  return engine_.stats().nonfinite_steps == skipped_before;
}

DistributedDataParallel::NoSync::NoSync(DistributedDataParallel& ddp) : ddp_(ddp) {
  std::lock_guard lock(ddp_.mutex_);
  ddp_.accumulating_ = true;
}

DistributedDataParallel::NoSync::~NoSync() {
  std::lock_guard lock(ddp_.mutex_);
  ddp_.accumulating_ = false;
}

std::vector<DistributedDataParallel::BucketInfo> DistributedDataParallel::buckets() const {
  std::vector<BucketInfo> out;
  for (const auto& bucket : buckets_) {
    out.push_back({bucket->name, bucket->slots.size(),
                   bucket->elements * static_cast<std::size_t>(bucket->buffer.element_size())});
  }
  return out;
}

std::vector<std::chrono::steady_clock::time_point> DistributedDataParallel::last_submit_times()
    const {
  std::lock_guard lock(mutex_);
  return submit_times_;
}

std::chrono::steady_clock::time_point DistributedDataParallel::last_synchronize_time() const {
  std::lock_guard lock(mutex_);
  return synchronize_time_;
}

}  // namespace unimsg
