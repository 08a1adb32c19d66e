#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>

#include "engine_core.hpp"
#include "unimsg/bus/bus.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/kernels/device_memory.hpp"

namespace unimsg::detail {

// Records on the timeline how long this rank's tensors waited for the other ranks (from the
// earliest submission; the lane is clipped so that consecutive batches do not overlap on it);
// returns the batch's names for its spans. Nothing without a timeline.
std::string EngineCore::trace_wait_for_data(
    const std::vector<std::pair<Signature, LocalTensor*>>& batch, Clock::time_point started) {
  std::string names;
  if (options.trace == nullptr) return names;
  auto submitted = started;
  for (const auto& [signature, local] : batch) {
    if (local == nullptr) continue;
    submitted = std::min(submitted, local->submitted);
    if (names.size() < 200) names += (names.empty() ? "" : ",") + local->name;
  }
  submitted = std::max(submitted, wait_lane_end);
  if (started > submitted) {
    options.trace->record({"engine.wait", "wait_for_data", submitted, started - submitted,
                           nlohmann::json{{"tensors", names}}.dump()});
  }
  wait_lane_end = started;
  return names;
}

Communicator& EngineCore::reducer(Device device) const {
  return device == Device::kCuda && device_comm ? *device_comm : *comm;
}

void EngineCore::reduce_through_fusion_buffer(
    const std::vector<std::pair<Signature, LocalTensor*>>& batch, std::size_t total,
    const std::string& span_args) {
  const DType dtype = batch.front().first.dtype;
  const ReduceOp op = batch.front().first.op;
  const Device device = batch.front().first.device;
  const std::size_t element = dtype_size(dtype);
  // Pack (a joined rank's missing tensors as zeros), reduce once, unpack. Device tensors are
  // fused in device memory: the copies queue on the device in order with the collective.
  std::optional<TraceSpan> fuse(std::in_place, options.trace, "engine", "fuse");
  std::byte* buffer = nullptr;
  std::optional<ScopedDevice> on_gpu;  // (the copies and the buffer on the tensors' GPU)
  if (device == Device::kCuda) {
    // (A rank that joined before it submitted any device tensor: the thread's own device.)
    const int gpu = device_index.load();
    on_gpu.emplace(gpu >= 0 ? gpu : current_device());
    if (!device_fusion_buffer || device_fusion_buffer->bytes() < total * element)
      device_fusion_buffer = std::make_unique<DeviceBuffer>(total * element);
    buffer = static_cast<std::byte*>(device_fusion_buffer->data());
  } else {
    if (fusion_buffer.size() < total * element) fusion_buffer.resize(total * element);
    buffer = fusion_buffer.data();
  }
  const auto copy = [device](void* to, const void* from, std::size_t n) {
    if (n == 0) return;
    if (device == Device::kCuda) {
      copy_device_to_device(to, from, n);
    } else {
      std::memcpy(to, from, n);
    }
  };
  std::vector<std::byte> zeros;  // (a joined rank's stand-in, for device memory)
  std::size_t offset = 0;
  for (const auto& [signature, local] : batch) {
    const std::size_t n = signature.count * element;
    if (local != nullptr) {
      copy(buffer + offset, local->input.data, n);
    } else if (device == Device::kCuda) {
      zeros.assign(n, std::byte{0});
      copy_host_to_device(buffer + offset, zeros.data(), n);
    } else {
      std::memset(buffer + offset, 0, n);
    }
    offset += n;
  }
  fuse.reset();
  const TensorView fused{buffer, total, dtype, device};
  {
    TraceSpan span(options.trace, "engine", "allreduce", span_args);
    reducer(device).allreduce_now(fused, fused, {op, "engine.fused"});
  }
  TraceSpan unfuse(options.trace, "engine", "unfuse");
  offset = 0;
  for (const auto& [signature, local] : batch) {
    const std::size_t n = signature.count * element;
    if (local != nullptr) copy(local->view.data, buffer + offset, n);
    offset += n;
  }
}

void EngineCore::reduce_batch(std::vector<std::pair<Signature, LocalTensor*>>& batch) {
  const DType dtype = batch.front().first.dtype;
  const ReduceOp op = batch.front().first.op;
  const std::size_t element = dtype_size(dtype);
  std::size_t total = 0;
  for (const auto& [signature, local] : batch) total += signature.count;
  const std::uint64_t dense = count_collective(total * element);
  notify(EngineEvent::Type::kReduceStart, batch, total * element);
  const auto started = Clock::now();
  const std::string names = trace_wait_for_data(batch, started);  // for the timeline
  const auto args = [&] {
    return options.trace ? nlohmann::json{{"tensors", names},
                                          {"count", batch.size()},
                                          {"bytes", total * element},
                                          {"compression", batch.front().first.compression}}
                               .dump()
                         : std::string();
  };
  if (batch.front().first.compression != "none") {
    TraceSpan span(options.trace, "engine", "compressed_allreduce", args());
    reduce_compressed(batch, total);
  } else if (batch.size() == 1 && batch.front().second != nullptr) {
    wire.fetch_add(dense, std::memory_order_relaxed);
    LocalTensor* local = batch.front().second;
    TraceSpan span(options.trace, "engine", "allreduce", args());
    reducer(local->view.device).allreduce_now(local->input, local->view, {op, local->name});
  } else if (const auto span = contiguous_span(batch, total)) {
    // The tensors lie back to back in memory, in batch order (as a model's flattened gradients
    // do): reduced where they are, with no copy into or out of a fusion buffer.
    wire.fetch_add(dense, std::memory_order_relaxed);
    fused_in_place.fetch_add(1, std::memory_order_relaxed);
    TraceSpan span_trace(options.trace, "engine", "allreduce", args());
    reducer(span->first.device).allreduce_now(span->first, span->second, {op, "engine.fused"});
  } else {
    wire.fetch_add(dense, std::memory_order_relaxed);
    reduce_through_fusion_buffer(batch, total, args());
  }
  count_busy(started);
  notify(EngineEvent::Type::kReduceEnd, batch, total * element);
  complete(batch);
}

std::uint64_t EngineCore::count_collective(std::uint64_t batch_bytes) {
  collectives.fetch_add(1, std::memory_order_relaxed);
  bytes.fetch_add(batch_bytes, std::memory_order_relaxed);
  const std::uint64_t dense = CompressedAllreduce::ring_allreduce_bytes(batch_bytes, size);
  dense_wire.fetch_add(dense, std::memory_order_relaxed);
  return dense;
}

void EngineCore::count_busy(Clock::time_point started) {
  busy_ns.fetch_add(
      static_cast<std::uint64_t>(std::chrono::nanoseconds(Clock::now() - started).count()),
      std::memory_order_relaxed);
}

std::optional<std::pair<TensorView, TensorView>> EngineCore::contiguous_span(
    const std::vector<std::pair<Signature, LocalTensor*>>& batch, std::size_t total) const {
  const LocalTensor* first = batch.front().second;
  if (first == nullptr || first->input.data == nullptr || first->view.data == nullptr) return {};
  auto* const input = static_cast<std::byte*>(first->input.data);
  auto* const output = static_cast<std::byte*>(first->view.data);
  const std::size_t element = dtype_size(first->input.dtype);
  std::size_t offset = 0;
  for (const auto& [signature, local] : batch) {
    if (local == nullptr) return {};  // a joined rank's zeros must be packed
    const std::size_t n = signature.count * element;
    if (n != 0 && (local->input.data != input + offset || local->view.data != output + offset)) {
      return {};
    }
    offset += n;
  }
  return std::pair{TensorView{input, total, first->input.dtype, first->input.device},
                   TensorView{output, total, first->view.dtype, first->view.device}};
}

void EngineCore::reduce_compressed(std::vector<std::pair<Signature, LocalTensor*>>& batch,
                                   std::size_t total) {
  const Signature& signature = batch.front().first;
  // Compressors work in place (with error feedback per tensor): out of place starts from a copy.
  for (const auto& [item, local] : batch) {
    if (local != nullptr && local->input.data != local->view.data && item.count != 0) {
      std::memcpy(local->view.data, local->input.data, item.count * sizeof(float));
    }
  }
  auto& compressor = compressors[signature.compression];
  if (!compressor) {
    compressor =
        std::make_unique<CompressedAllreduce>(*comm, CompressionSpec::parse(signature.compression));
    compressor->set_trace(options.trace);
  }
  const bool feedback = compressor->spec().error_feedback;
  // Error feedback is kept per tensor (a tensor may be fused with others one step and not the
  // next); the server side of the two-phase scheme per fused group.
  const auto residual_of = [&](LocalTensor* local) -> std::span<float> {
    if (!feedback || local == nullptr) return {};
    // (A tensor reduced with another compression starts a feedback of its own.)
    auto& kept = residuals[local->name + '\n' + signature.compression];
    if (kept.size() != local->view.count) kept.assign(local->view.count, 0.0f);
    return kept;
  };
  std::string key;
  for (const auto& [item, local] : batch) key += (local ? local->name : "?") + "\n";
  const std::uint64_t step = compressed_steps++;
  CompressedAllreduceResult result;
  if (batch.size() == 1 && batch.front().second != nullptr) {
    LocalTensor* local = batch.front().second;
    const std::span<float> data(static_cast<float*>(local->view.data), local->view.count);
    result = compressor->allreduce(data, residual_of(local), signature.op, step, key);
  } else {
    // Pack gradients and residuals (a joined rank's missing tensors as zeros), reduce, unpack.
    fused_values.resize(total);
    fused_residual.resize(feedback ? total : 0);
    std::size_t offset = 0;
    for (const auto& [item, local] : batch) {
      // (Empty tensors are skipped: memmove must not see their null data, UBSan says.)
      if (item.count == 0) continue;
      float* values = fused_values.data() + offset;
      float* residuals = feedback ? fused_residual.data() + offset : nullptr;
      if (local != nullptr) {
        std::copy_n(static_cast<const float*>(local->view.data), item.count, values);
        const auto kept = residual_of(local);
        if (!kept.empty()) std::copy(kept.begin(), kept.end(), residuals);
      } else {  // a joined rank's missing tensor: zeros
        std::fill_n(values, item.count, 0.0f);
        if (residuals != nullptr) std::fill_n(residuals, item.count, 0.0f);
      }
      offset += item.count;
    }
    result = compressor->allreduce(fused_values, fused_residual, signature.op, step, key);
    offset = 0;
    for (const auto& [item, local] : batch) {
      if (local != nullptr && item.count != 0) {
        std::memcpy(local->view.data, fused_values.data() + offset, item.count * sizeof(float));
        const auto kept = residual_of(local);
        if (!kept.empty()) {
          std::copy_n(fused_residual.begin() + static_cast<std::ptrdiff_t>(offset), item.count,
                      kept.begin());
        }
      }
      offset += item.count;
    }
  }
  wire.fetch_add(result.wire_bytes, std::memory_order_relaxed);
  if (result.nonfinite_ranks > 0) {
    nonfinite.fetch_add(1, std::memory_order_relaxed);
    log->warn(
        "engine: NaN/Inf in the gradients of {} rank(s) for '{}': result set to NaN, error "
        "feedback unchanged (skip this step)",
        result.nonfinite_ranks, key.substr(0, key.find('\n')));
  }
}

void EngineCore::complete(const std::vector<std::pair<Signature, LocalTensor*>>& batch) {
  std::vector<std::shared_ptr<Completion>> completions;
  completions.reserve(batch.size());
  {
    // The names are free again before a waiter can see completion and resubmit them.
    std::lock_guard lock(mutex);
    for (const auto& [signature, local] : batch) {
      if (local != nullptr) local->name_entry->pending = false;
    }
  }
  for (const auto& [signature, local] : batch) {
    if (local == nullptr) continue;
    // (Whoever waits may free the Submission once its completion is signalled: the tensor
    // leaves `pending` first.)
    remove_pending(*local);
    completions.push_back(std::move(local->completion));
  }
  reduced.fetch_add(completions.size(), std::memory_order_relaxed);
  for (const auto& completion : completions) completion->finish_one();
}

void EngineCore::remove_pending(LocalTensor& tensor) {
  LocalTensor* const last = pending.back();
  pending[tensor.pending_index] = last;
  last->pending_index = tensor.pending_index;
  pending.pop_back();
}

void EngineCore::fail_tensor(LocalTensor& tensor, std::exception_ptr error) {
  {
    std::lock_guard lock(mutex);
    tensor.name_entry->pending = false;
  }
  remove_pending(tensor);  // (before the completion is released, as in complete())
  const auto completion = std::move(tensor.completion);
  completion->fail(std::move(error));
}

void EngineCore::fail_everything(std::exception_ptr error) {
  std::vector<std::shared_ptr<Completion>> failed;
  for (LocalTensor* tensor : pending) failed.push_back(std::move(tensor->completion));
  pending.clear();
  any_pending.store(false, std::memory_order_release);
  {
    std::lock_guard lock(mutex);
    for (LocalTensor* tensor : incoming) failed.push_back(std::move(tensor->completion));
    incoming.clear();
    names.clear();  // (nothing points into it any more)
    fatal = error;
    join_done = true;
  }
  join_cv.notify_all();
  for (const auto& completion : failed) completion->fail(error);
}

void EngineCore::notify(EngineEvent::Type type,
                        const std::vector<std::pair<Signature, LocalTensor*>>& batch,
                        std::uint64_t batch_bytes) {
  std::shared_ptr<const EngineListener> current;
  {
    std::lock_guard lock(listener_mutex);
    current = listener;
  }
  if (!current) return;
  EngineEvent event;
  event.type = type;
  event.bytes = batch_bytes;
  event.time = Clock::now();
  for (const auto& [signature, local] : batch) {
    if (local != nullptr) event.tensors.push_back(local->name);
  }
  try {
    (*current)(event);
  } catch (const std::exception& error) {
    log->error("engine: listener threw: {}", error.what());
  }
}

}  // namespace unimsg::detail
