#include <algorithm>
#include <unordered_map>

#include "engine_core.hpp"
#include "unimsg/bus/bus.hpp"
#include "unimsg/core/error.hpp"

namespace unimsg::detail {

bool EngineCore::cycle(bool on_waiting_thread) {
  cycles.fetch_add(1, std::memory_order_relaxed);
  bool joined_here = false;
  const bool stop_here = take_incoming(on_waiting_thread, &joined_here);

  // The votes: a veto of the speculated batch (state[0], set by reduce_speculated), a byte per
  // cache slot, three flags.
  const std::size_t slots = cache.size();
  std::vector<std::uint8_t> state(slots + 4, 0);
  const std::span<std::uint8_t> slot_state(state.data() + 1, slots);
  std::uint8_t& has_new = state[slots + 1];
  std::uint8_t& stop = state[slots + 2];
  std::uint8_t& not_joined = state[slots + 3];
  const auto now = Clock::now();
  mark_ready_slots(slot_state, &has_new, joined_here, now);
  // Stalled tensors due for a warning or an abort need a round of rank 0's stall inspector.
  if (coordinator != nullptr && coordinator->round_due(now)) has_new = 1;
  stop = stop_here ? 1 : 0;
  not_joined = joined_here ? 0 : 1;

  bool speculated_reduced = false;
  if (const auto total = can_speculate(state.size())) {
    speculated_reduced =
        reduce_speculated(state, ready_for_speculation(slot_state, joined_here, stop_here), *total);
  } else {
    Work agreement = comm->allreduce(TensorView{state.data(), state.size(), DType::kU8},
                                     TensorView{state.data(), state.size(), DType::kU8},
                                     {ReduceOp::kMax, "engine.state"});
    if (on_waiting_thread && comm->oversubscribed()) {
      // Here the ranks this allreduce waits for are still submitting a step, some on this core:
      // spinning would take it from them, so yield from the first poll. (The engine thread's
      // cycles run beside the ranks' computation, which a yield hands the core to for a whole
      // time slice: they spin first, as every wait does; docs/benchmarks.md has the figures.)
      agreement.wait(comm->default_timeout(), 0);
    } else {
      agreement.wait();
    }
  }

  if (stop) {
    fail_everything(std::make_exception_ptr(ShutdownError(
        bus.rank(), "engine", "the engine was shut down before this tensor was reduced")));
    return false;
  }
  const bool all_joined = not_joined == 0;
  drop_invalid_slots(slot_state);
  std::vector<std::size_t> ready;
  if (!all_joined) {
    for (std::size_t i = 0; i < slots; ++i) {
      if (cache[i].valid && slot_state[i] == kReady) ready.push_back(i);
    }
  }
  if (speculated_reduced) {  // (done: out of the cycle's list)
    std::erase_if(ready, [&](std::size_t slot) {
      return std::find(speculated.begin(), speculated.end(), slot) != speculated.end();
    });
  }
  std::vector<Response> responses;
  if (has_new) {
    rounds.fetch_add(1, std::memory_order_relaxed);
    TraceSpan span(options.trace, "engine", "negotiate");
    negotiate(joined_here, responses);
  }
  std::vector<std::size_t> single;
  const std::size_t batches = execute(ready, responses, &single);
  if (speculated_reduced) {
    learn_speculation(batches + 1, batches == 0 ? speculated : std::vector<std::size_t>{});
  } else {
    learn_speculation(batches, std::move(single));
  }
  any_pending.store(!pending.empty(), std::memory_order_release);
  if (all_joined && joined_here) {
    std::lock_guard lock(mutex);
    join_requested = false;
    join_done = true;
    join_cv.notify_all();
  }
  return true;
}

// Moves what user threads submitted into `pending`; returns whether the engine is stopping.
bool EngineCore::take_incoming(bool on_waiting_thread, bool* joined_here) {
  std::lock_guard lock(mutex);
  last_cycle_start = Clock::now();
  if (on_waiting_thread && engine_wakes_at != Clock::time_point::min() &&
      engine_wakes_at < last_cycle_start + kIdleCycle) {
    // The engine thread cannot start a cycle before this one ends (cycle_mutex): its timer
    // firing meanwhile would only wake it to block on that lock, and wake it again when the
    // lock is released — two context switches inside a long allreduce, on cores the ranks
    // need. The thread that drives re-arms the timer when it is done (retime_engine in
    // drive()).
    engine_wakes_at = last_cycle_start + kIdleCycle;
    timer.arm(engine_wakes_at);
  }
  for (LocalTensor* tensor : incoming) {
    if (tensor->submitted == Clock::time_point{}) tensor->submitted = last_cycle_start;
    tensor->pending_index = pending.size();
    pending.push_back(tensor);
  }
  incoming.clear();
  *joined_here = join_requested;
  return stopping;
}

// This rank's byte per cache slot (kReady, kNotReady, kInvalid), and whether it has tensors
// rank 0 must hear of (`has_new`).
void EngineCore::mark_ready_slots(std::span<std::uint8_t> slot_state, std::uint8_t* has_new,
                                  bool joined_here, Clock::time_point now) {
  const std::size_t slots = slot_state.size();
  for (std::size_t i = 0; i < slots; ++i) {
    slot_state[i] = (joined_here && cache[i].valid) ? kReady : kNotReady;
  }
  slot_owner.assign(slots, nullptr);
  for (LocalTensor* pending_tensor : pending) {
    LocalTensor& tensor = *pending_tensor;
    tensor.cached = SIZE_MAX;
    if (tensor.sent) continue;
    std::size_t slot = tensor.name_entry->cache_slot;
    if (slot >= slots || !cache[slot].valid || cache[slot].name != tensor.name) {
      const auto it = cache_index.find(tensor.name);
      slot = it == cache_index.end() ? SIZE_MAX : it->second;
      tensor.name_entry->cache_slot = slot;
    }
    if (slot == SIZE_MAX) {
      *has_new = 1;
      continue;
    }
    if (cache[slot].signature != tensor.signature || stall.renegotiate(tensor.submitted, now)) {
      // Renegotiate: a changed tensor must be checked, and a stalled one must reach rank 0's
      // stall inspector, which can name who is missing.
      slot_state[slot] = kInvalid;
      *has_new = 1;
    } else {
      slot_state[slot] = kReady;
      tensor.cached = slot;
      slot_owner[slot] = &tensor;
    }
  }
}

// Invalid entries leave every rank's cache; their tensors are negotiated afresh.
void EngineCore::drop_invalid_slots(std::span<const std::uint8_t> slot_state) {
  for (std::size_t i = 0; i < slot_state.size(); ++i) {
    if (slot_state[i] != kInvalid || !cache[i].valid) continue;
    cache_index.erase(cache[i].name);
    cache[i].valid = false;
    if (slot_owner[i] != nullptr) slot_owner[i]->cached = SIZE_MAX;
    slot_owner[i] = nullptr;
  }
}

void EngineCore::negotiate(bool joined_here, std::vector<Response>& responses) {
  // In the order submitted: rank 0's order becomes the order of the responses, and so of the
  // cache and of every later batch, so that tensors laid out in memory in the order they are
  // submitted can be reduced where they lie (contiguous_span).
  std::vector<LocalTensor*> unsent;
  for (LocalTensor* tensor : pending) {
    if (!tensor->sent && tensor->cached == SIZE_MAX) unsent.push_back(tensor);
  }
  std::sort(unsent.begin(), unsent.end(),
            [](const LocalTensor* a, const LocalTensor* b) { return a->order < b->order; });
  NegotiationRequest request;
  request.joined = joined_here;
  request.tensors.reserve(unsent.size());
  for (LocalTensor* tensor : unsent) {
    tensor->sent = true;
    request.tensors.push_back({tensor->name, tensor->signature});
  }
  responses = controller->negotiate(request);
}

void EngineCore::cache_insert(const std::string& name, const Signature& signature) {
  if (options.cache_capacity == 0) return;
  const auto it = cache_index.find(name);
  if (it != cache_index.end()) {
    cache[it->second].signature = signature;
    cache[it->second].last_used = ++use_clock;
    return;
  }
  std::size_t slot = cache.size();
  for (std::size_t i = 0; i < cache.size(); ++i) {
    if (!cache[i].valid) {
      slot = i;
      break;
    }
  }
  if (slot == cache.size()) {
    if (cache.size() < options.cache_capacity) {
      cache.emplace_back();
    } else {
      // Least recently used; every rank makes the same choice, having run the same responses.
      slot = 0;
      for (std::size_t i = 1; i < cache.size(); ++i) {
        if (cache[i].last_used < cache[slot].last_used) slot = i;
      }
      cache_index.erase(cache[slot].name);
    }
  }
  cache[slot] = CacheEntry{name, signature, ++use_clock, true};
  cache_index[name] = slot;
}

std::size_t EngineCore::execute(const std::vector<std::size_t>& ready,
                                const std::vector<Response>& responses,
                                std::vector<std::size_t>* single) {
  // The same list, in the same order, on every rank: cache hits by slot, then rank 0's responses.
  std::vector<std::pair<Signature, LocalTensor*>> items;
  items.reserve(ready.size() + responses.size());
  std::uint64_t local_hits = 0;
  for (const std::size_t slot : ready) {
    cache[slot].last_used = ++use_clock;
    LocalTensor* local = slot_owner[slot];
    if (local != nullptr) ++local_hits;
    items.emplace_back(cache[slot].signature, local);
  }
  const std::size_t hit_items = items.size();
  hits.fetch_add(local_hits, std::memory_order_relaxed);
  std::unordered_map<std::string_view, LocalTensor*> by_name;  // (only rounds have responses)
  if (!responses.empty()) {
    by_name.reserve(pending.size());
    for (LocalTensor* tensor : pending) by_name.emplace(tensor->name, tensor);
  }
  for (const auto& response : responses) {
    const auto it = by_name.find(response.name);
    LocalTensor* local = it == by_name.end() ? nullptr : it->second;
    if (!response.error.empty()) {
      if (local != nullptr) {
        by_name.erase(it);
        fail_tensor(
            *local,
            response.stalled
                ? std::make_exception_ptr(TimeoutError(bus.rank(), "engine", response.error))
                : std::make_exception_ptr(MismatchError(bus.rank(), "engine", response.error)));
      }
      continue;
    }
    items.emplace_back(response.signature, local);
    cache_insert(response.name, response.signature);
  }

  std::vector<std::pair<Signature, LocalTensor*>> batch;
  std::uint64_t batch_bytes = 0;
  std::size_t batches = 0;
  single->clear();
  if (!items.empty() && items.size() == hit_items && items.front().first.compression == "none" &&
      items.front().first.device == Device::kHost) {
    *single = ready;  // (if they make one batch)
  }
  for (auto& item : items) {
    const std::uint64_t item_bytes = item.first.count * dtype_size(item.first.dtype);
    const bool fits = !batch.empty() && batch.front().first.dtype == item.first.dtype &&
                      batch.front().first.op == item.first.op &&
                      batch.front().first.compression == item.first.compression &&
                      batch.front().first.device == item.first.device &&
                      // (PowerSGD approximates each tensor as the matrix it is.)
                      item.first.compression.rfind("powersgd", 0) != 0 &&
                      batch_bytes + item_bytes <= fusion_threshold.load(std::memory_order_relaxed);
    if (!batch.empty() && !fits) {
      reduce_batch(batch);
      ++batches;
      batch.clear();
      batch_bytes = 0;
    }
    batch.push_back(item);
    batch_bytes += item_bytes;
  }
  if (!batch.empty()) {
    reduce_batch(batch);
    ++batches;
  }
  if (batches != 1) single->clear();
  return batches;
}
}  // namespace unimsg::detail
