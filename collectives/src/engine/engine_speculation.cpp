// The cycle's agreement riding on the data (issue 25, part 4). In steady state every step is the
// same batch, and a cycle's agreement allreduce only says what the cycle before it already said:
// every rank is ready for that batch. A separate allreduce then costs a synchronization of its
// own before the batch's (on ranks that share cores, the wait for the last one to arrive, twice
// per step). So once the same batch was reduced alone in two consecutive cycles that reduced
// anything, the next cycle sends its votes with that batch's data in one collective
// (Communicator::allreduce_if_agreed): the data is reduced only if no rank vetoed (every rank had
// the batch's tensors ready, none stopping or joined), and left untouched otherwise. Either way
// every rank ends with the agreed votes, and the cycle goes on from them as it always did. A
// mismatch is therefore caught as before: a changed tensor marks its slot invalid, a vote no
// ready rank can outvote.

#include <algorithm>
#include <cstring>
#include <optional>

#include "engine_core.hpp"

namespace unimsg::detail {

std::optional<std::size_t> EngineCore::can_speculate(std::size_t vote_bytes) const {
  if (!options.speculate || speculated.empty()) return {};
  for (const std::size_t slot : speculated) {
    if (slot >= cache.size() || !cache[slot].valid) return {};
  }
  const Signature& kind = cache[speculated.front()].signature;
  if (kind.compression != "none" || kind.device != Device::kHost) return {};
  std::size_t total = 0;
  for (const std::size_t slot : speculated) {
    const Signature& signature = cache[slot].signature;
    if (signature.dtype != kind.dtype || signature.op != kind.op ||
        signature.compression != kind.compression || signature.device != kind.device) {
      return {};
    }
    total += signature.count;
  }
  // (A fusion threshold lowered since the batch was learnt splits it: no longer the batch.)
  if (speculated.size() > 1 &&
      total * dtype_size(kind.dtype) > fusion_threshold.load(std::memory_order_relaxed)) {
    return {};
  }
  if (!comm->agreement_rides_on_data(total, kind.dtype, vote_bytes)) return {};
  return total;
}

bool EngineCore::ready_for_speculation(std::span<const std::uint8_t> slot_state, bool joined_here,
                                       bool stop_here) const {
  if (joined_here || stop_here) return false;
  return std::all_of(speculated.begin(), speculated.end(), [&](std::size_t slot) {
    return slot_state[slot] == kReady && slot_owner[slot] != nullptr;
  });
}

bool EngineCore::reduce_speculated(std::span<std::uint8_t> votes, bool ready_here,
                                   std::size_t total) {
  const Signature& kind = cache[speculated.front()].signature;
  const std::size_t element = dtype_size(kind.dtype);
  std::vector<std::pair<Signature, LocalTensor*>> batch;
  TensorView input{nullptr, total, kind.dtype};
  TensorView output = input;
  bool packed = false;
  bool where_they_lie = false;
  if (ready_here) {
    for (const std::size_t slot : speculated) {
      batch.emplace_back(cache[slot].signature, slot_owner[slot]);
    }
    if (batch.size() == 1) {
      input = batch.front().second->input;
      output = batch.front().second->view;
    } else if (const auto span = contiguous_span(batch, total)) {
      std::tie(input, output) = *span;
      where_they_lie = true;
    } else {
      // Packed here, unpacked only once reduced: a veto leaves every tensor as it was.
      if (fusion_buffer.size() < total * element) fusion_buffer.resize(total * element);
      std::size_t offset = 0;
      for (const auto& [signature, local] : batch) {
        const std::size_t n = signature.count * element;
        if (n != 0) std::memcpy(fusion_buffer.data() + offset, local->input.data, n);
        offset += n;
      }
      input = output = TensorView{fusion_buffer.data(), total, kind.dtype};
      packed = true;
    }
  }
  votes[0] = ready_here ? 0 : 1;
  speculations.fetch_add(1, std::memory_order_relaxed);
  const auto started = Clock::now();
  bool reduced_here = false;
  {
    TraceSpan span(options.trace, "engine", "agreement_on_data");
    reduced_here = comm->allreduce_if_agreed(input, output, votes, {kind.op, "engine.speculated"});
  }
  if (!reduced_here) return false;

  speculations_reduced.fetch_add(1, std::memory_order_relaxed);
  if (packed) {
    std::size_t offset = 0;
    for (const auto& [signature, local] : batch) {
      const std::size_t n = signature.count * element;
      if (n != 0) std::memcpy(local->view.data, fusion_buffer.data() + offset, n);
      offset += n;
    }
  }
  // The bookkeeping execute() and reduce_batch() do for a batch of cache hits, in the same order
  // on every rank.
  for (const std::size_t slot : speculated) cache[slot].last_used = ++use_clock;
  hits.fetch_add(batch.size(), std::memory_order_relaxed);
  if (where_they_lie) fused_in_place.fetch_add(1, std::memory_order_relaxed);
  wire.fetch_add(count_collective(total * element), std::memory_order_relaxed);
  count_busy(started);
  notify(EngineEvent::Type::kReduceStart, batch, total * element);
  notify(EngineEvent::Type::kReduceEnd, batch, total * element);
  complete(batch);
  return true;
}

void EngineCore::learn_speculation(std::size_t batches, std::vector<std::size_t> single) {
  if (batches == 0) return;  // (a cycle that reduced nothing neither confirms nor breaks it)
  if (single.empty()) {
    speculated.clear();
    last_single_batch.clear();
    return;
  }
  speculated = single == last_single_batch ? single : std::vector<std::size_t>{};
  last_single_batch = std::move(single);
}

}  // namespace unimsg::detail
