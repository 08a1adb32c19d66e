#include "unimsg/collectives/compressed_allreduce.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <map>
#include <optional>

#include "unimsg/core/error.hpp"
#include "unimsg/core/random.hpp"
#include "unimsg/kernels/powersgd.hpp"

namespace unimsg {
namespace {

bool is_two_phase(const std::string& name) {
  return name == "fp16" || name == "bf16" || name == "int8" || name == "onebit";
}

TensorView bytes_view(std::byte* data, std::size_t count) {
  return TensorView{data, count, DType::kU8, Device::kHost};
}

}  // namespace

// Across hosts: this host's ranks, the ranks of this local rank on every host, and the one-level
// compressed allreduce over the latter.
struct CompressedAllreduce::Hierarchy {
  std::unique_ptr<Communicator> host;
  std::unique_ptr<Communicator> across;
  std::unique_ptr<CompressedAllreduce> slice;
  std::vector<float> values;  // this rank's slice of the host's sum
};

CompressedAllreduce::~CompressedAllreduce() = default;

CompressedAllreduce::CompressedAllreduce(Communicator& communicator, CompressionSpec spec,
                                         bool across_hosts)
    : comm_(communicator), spec_(std::move(spec)) {
  if (across_hosts && (is_two_phase(spec_.name) || spec_.name == "topk")) split_by_host();
  // int8 rounds stochastically: ranks drawing the same noise would not average it away.
  CompressionSpec worker = spec_;
  CompressionSpec server = spec_;
  if (spec_.name == "int8") {
    const auto rank =
        static_cast<std::uint64_t>(comm_.world_ranks()[static_cast<std::size_t>(comm_.rank())]);
    worker.seed = spec_.seed ^ splitmix64(2 * rank + 1);
    server.seed = spec_.seed ^ splitmix64(2 * rank + 2);
  }
  if (spec_.name == "powersgd") return;  // state per key, made on first use
  worker_ = make_cpu_compressor(worker);
  if (is_two_phase(spec_.name)) {
    server_ = make_cpu_compressor(server);
    chunk_ = worker_->block_elements();
  }
}

void CompressedAllreduce::split_by_host() {
  const std::vector<int> hosts = comm_.hosts();
  if (hosts.size() != static_cast<std::size_t>(comm_.size())) return;
  std::map<int, std::vector<int>> members;  // host -> its ranks, in rank order
  for (int r = 0; r < comm_.size(); ++r) members[hosts[static_cast<std::size_t>(r)]].push_back(r);
  const std::size_t local = members.begin()->second.size();
  if (members.size() < 2 || local < 2) return;
  for (const auto& [host, ranks] : members) {
    if (ranks.size() != local) return;  // (hosts() promises even hosts; every rank sees the same)
  }
  // Collective splits, the same lists on every rank.
  auto hierarchy = std::make_unique<Hierarchy>();
  for (const auto& [host, ranks] : members) {
    if (auto made = comm_.split(ranks)) hierarchy->host = std::move(made);
  }
  for (std::size_t l = 0; l < local; ++l) {
    std::vector<int> peers;
    for (const auto& [host, ranks] : members) peers.push_back(ranks[l]);
    if (auto made = comm_.split(peers)) hierarchy->across = std::move(made);
  }
  hierarchy->slice = std::make_unique<CompressedAllreduce>(*hierarchy->across, spec_, false);
  hierarchy_ = std::move(hierarchy);
}

void CompressedAllreduce::reset_state() {
  server_residuals_.clear();
  powersgd_.clear();
  if (hierarchy_) hierarchy_->slice->reset_state();  // (the slices' server residuals)
}

std::pair<std::size_t, std::size_t> CompressedAllreduce::host_slice(std::size_t count) const {
  if (!hierarchy_) return {0, count};
  const Communicator& host = *hierarchy_->host;
  const std::size_t begin = Communicator::reduce_scatter_offset(count, host.size(), host.rank());
  return {begin, begin + Communicator::reduce_scatter_share(count, host.size(), host.rank())};
}

std::uint64_t CompressedAllreduce::ring_allreduce_bytes(std::uint64_t bytes, int ranks) noexcept {
  if (ranks <= 1) return 0;
  return bytes * 2 * static_cast<std::uint64_t>(ranks - 1) / static_cast<std::uint64_t>(ranks);
}

std::pair<std::size_t, std::size_t> CompressedAllreduce::partition(std::size_t count,
                                                                   int rank) const {
  // Whole chunks of the format per rank, so that a partition compresses as it would in one
  // piece; the last chunk may be short.
  const std::size_t chunks = (count + chunk_ - 1) / chunk_;
  const int ranks = comm_.size();
  const std::size_t first = Communicator::reduce_scatter_offset(chunks, ranks, rank);
  const std::size_t share = Communicator::reduce_scatter_share(chunks, ranks, rank);
  const std::size_t begin = std::min(count, first * chunk_);
  const std::size_t end = std::min(count, (first + share) * chunk_);
  return {begin, end};
}

std::span<const float> CompressedAllreduce::server_residual(const std::string& key) const {
  if (hierarchy_) return hierarchy_->slice->server_residual(key);
  const auto it = server_residuals_.find(key);
  if (it == server_residuals_.end()) return {};
  return it->second;
}

CompressedAllreduceResult CompressedAllreduce::allreduce(std::span<float> data,
                                                         std::span<float> residual, ReduceOp op,
                                                         std::uint64_t step,
                                                         const std::string& key) {
  const int rank = comm_.world_ranks()[static_cast<std::size_t>(comm_.rank())];
  if (op != ReduceOp::kSum && op != ReduceOp::kAvg) {
    throw Error(rank, "compressed allreduce " + spec_.to_string(),
                std::string("compression reduces with sum or avg, not ") + to_string(op));
  }
  if (!residual.empty() && residual.size() != data.size()) {
    throw Error(rank, "compressed allreduce " + spec_.to_string(),
                "the residual holds " + std::to_string(residual.size()) + " elements, the data " +
                    std::to_string(data.size()));
  }
  if (!spec_.error_feedback) residual = {};

  CompressedAllreduceResult result;
  if (spec_.compresses()) {
    // Agree first whether any rank saw NaN/Inf, so that no rank's error feedback moves on a step
    // that every rank then skips.
    // (Waited for with the communicator's timeout: the first collective of a call is where a
    // missing rank shows.)
    std::int32_t bad = count_nonfinite(data) + count_nonfinite(residual) > 0 ? 1 : 0;
    comm_
        .allreduce(TensorView{&bad, 1, DType::kI32}, TensorView{&bad, 1, DType::kI32},
                   {ReduceOp::kSum, "compress.nonfinite"})
        .wait();
    if (bad != 0) {
      result.nonfinite_ranks = static_cast<std::uint64_t>(bad);
      std::fill(data.begin(), data.end(), std::numeric_limits<float>::quiet_NaN());
      return result;
    }
  }
  result.wire_bytes = hierarchy_ ? reduce_across_hosts(data, residual, op, step, key)
                                 : reduce(data, residual, op, step, key);
  return result;
}

// (After the agreement on non-finite values.)
std::uint64_t CompressedAllreduce::reduce(std::span<float> data, std::span<float> residual,
                                          ReduceOp op, std::uint64_t step, const std::string& key) {
  if (!spec_.compresses()) return reduce_plain(data, op);
  if (server_) return reduce_two_phase(data, residual, op, step, key);
  if (spec_.name == "powersgd") return reduce_powersgd(data, residual, op, key);
  if (spec_.name == "topk") return reduce_topk(data, residual, op, step);
  return reduce_randomk(data, residual, op, step);
}

// f32 within the host, compressed across hosts (this rank's slice only), f32 within the host.
std::uint64_t CompressedAllreduce::reduce_across_hosts(std::span<float> data,
                                                       std::span<float> residual, ReduceOp op,
                                                       std::uint64_t step, const std::string& key) {
  Hierarchy& h = *hierarchy_;
  const auto [begin, end] = host_slice(data.size());
  const std::size_t count = end - begin;
  h.values.resize(count);
  std::optional<TraceSpan> span(std::in_place, trace_, "engine", "host_reduce_scatter");
  h.host
      ->reduce_scatter(TensorView{data.data(), data.size(), DType::kF32},
                       TensorView{h.values.data(), count, DType::kF32},
                       {ReduceOp::kSum, "compress.host.reduce_scatter"})
      .wait();
  span.reset();
  std::uint64_t wire = 0;
  if (count > 0) {  // (the same count on every host: the slice's ranks all skip or all call)
    h.slice->set_trace(trace_);
    wire = h.slice->reduce(h.values, residual.empty() ? residual : residual.subspan(begin, count),
                           ReduceOp::kSum, step, key);
  }
  if (op == ReduceOp::kAvg) {
    const float inverse = 1.0f / static_cast<float>(comm_.size());
    for (float& v : h.values) v *= inverse;
  }
  std::vector<std::size_t> counts(static_cast<std::size_t>(h.host->size()));
  for (int r = 0; r < h.host->size(); ++r) {
    counts[static_cast<std::size_t>(r)] =
        Communicator::reduce_scatter_share(data.size(), h.host->size(), r);
  }
  span.emplace(trace_, "engine", "host_allgather");
  h.host
      ->allgatherv(TensorView{h.values.data(), count, DType::kF32},
                   TensorView{data.data(), data.size(), DType::kF32}, counts,
                   {"compress.host.allgather"})
      .wait();
  return wire;
}

std::uint64_t CompressedAllreduce::reduce_plain(std::span<float> data, ReduceOp op) {
  TraceSpan span(trace_, "engine", "allreduce");
  const TensorView view{data.data(), data.size(), DType::kF32};
  comm_.allreduce_now(view, view, {op, "compress.none"});
  return ring_allreduce_bytes(data.size_bytes(), comm_.size());
}

std::uint64_t CompressedAllreduce::reduce_two_phase(std::span<float> data,
                                                    std::span<float> residual, ReduceOp op,
                                                    std::uint64_t step, const std::string& key) {
  const int ranks = comm_.size();
  const auto n = static_cast<std::size_t>(ranks);
  std::size_t block = 0;
  for (int p = 0; p < ranks; ++p) {
    const auto [begin, end] = partition(data.size(), p);
    block = std::max(block, worker_->wire_bytes(end - begin));
  }
  // Worker: each partition compressed on its own (with its own scale) into its block.
  // (A partition's padding up to the block length travels but is never read: no need to clear.)
  send_.resize(n * block);
  recv_.resize(n * block);
  std::optional<TraceSpan> span(std::in_place, trace_, "engine", "compress");
  for (int p = 0; p < ranks; ++p) {
    const auto [begin, end] = partition(data.size(), p);
    const auto length = end - begin;
    worker_->compress(data.subspan(begin, length),
                      residual.empty() ? residual : residual.subspan(begin, length), step,
                      std::span(send_).subspan(static_cast<std::size_t>(p) * block, block));
  }
  span.emplace(trace_, "engine", "alltoall");
  comm_
      .alltoall(bytes_view(send_.data(), n * block), bytes_view(recv_.data(), n * block),
                {"compress.alltoall"})
      .wait();
  span.emplace(trace_, "engine", "decompress");

  // Server: reduce this rank's partition in f32, recompress it with the server's feedback.
  const auto [mine_begin, mine_end] = partition(data.size(), comm_.rank());
  const std::size_t mine = mine_end - mine_begin;
  scratch_.assign(mine, 0.0f);
  for (std::size_t p = 0; p < n; ++p) {
    worker_->decompress_add(std::span<const std::byte>(recv_).subspan(p * block, block), step,
                            scratch_);
  }
  if (op == ReduceOp::kAvg) {
    const float inverse = 1.0f / static_cast<float>(ranks);
    for (float& v : scratch_) v *= inverse;
  }
  std::span<float> server_residual;
  if (spec_.error_feedback) {
    auto& kept = server_residuals_[key];
    if (kept.size() != mine) kept.assign(mine, 0.0f);
    server_residual = kept;
  }
  std::vector<std::byte>& gathered = send_;  // the worker blocks are spent
  span.emplace(trace_, "engine", "compress");
  server_->compress(scratch_, server_residual, step, std::span(recv_).subspan(0, block));
  span.emplace(trace_, "engine", "allgather");
  comm_
      .allgather(bytes_view(recv_.data(), block), bytes_view(gathered.data(), n * block),
                 {"compress.allgather"})
      .wait();
  span.emplace(trace_, "engine", "decompress");
  for (int p = 0; p < ranks; ++p) {
    const auto [begin, end] = partition(data.size(), p);
    server_->decompress(
        std::span<const std::byte>(gathered).subspan(static_cast<std::size_t>(p) * block, block),
        step, data.subspan(begin, end - begin));
  }
  return 2 * static_cast<std::uint64_t>(ranks - 1) * block;
}

std::uint64_t CompressedAllreduce::reduce_powersgd(std::span<float> data, std::span<float> residual,
                                                   ReduceOp op, const std::string& key) {
  const int rank = spec_.powersgd_rank;
  if (!PowerSgd::compresses(data.size(), rank, spec_.matrix_rows)) {
    // Vectors and small matrices: the factors would not be smaller (PyTorch's hook, too, sends
    // these as they are). Nothing is lost, so the residual has nothing to keep.
    if (!residual.empty()) std::fill(residual.begin(), residual.end(), 0.0f);
    return reduce_plain(data, op);
  }
  auto it = powersgd_.find(key);
  if (it == powersgd_.end() || it->second.count() != data.size()) {
    // The first Q must be the same on every rank: drawn from the seed and the size.
    const std::uint64_t seed = spec_.seed ^ splitmix64(data.size());
    it =
        powersgd_.insert_or_assign(key, PowerSgd(data.size(), rank, seed, spec_.matrix_rows)).first;
  }
  PowerSgd& state = it->second;
  const auto average = [&](std::span<float> factor, const char* name) {
    TraceSpan span(trace_, "engine", "allreduce");
    const TensorView view{factor.data(), factor.size(), DType::kF32};
    comm_.allreduce_now(view, view, {ReduceOp::kAvg, name});
    return ring_allreduce_bytes(factor.size_bytes(), comm_.size());
  };
  std::optional<TraceSpan> span(std::in_place, trace_, "engine", "compress");
  const auto p = state.begin(data, residual);
  span.reset();
  std::uint64_t wire = average(p, "compress.powersgd.p");
  span.emplace(trace_, "engine", "compress");
  const auto q = state.project();
  span.reset();
  wire += average(q, "compress.powersgd.q");
  span.emplace(trace_, "engine", "decompress");
  state.finish(data, residual);
  if (op == ReduceOp::kSum) {
    const auto ranks = static_cast<float>(comm_.size());
    for (float& v : data) v *= ranks;
  }
  return wire;
}

std::uint64_t CompressedAllreduce::reduce_topk(std::span<float> data, std::span<float> residual,
                                               ReduceOp op, std::uint64_t step) {
  const int ranks = comm_.size();
  const std::size_t block = worker_->wire_bytes(data.size());  // k is fixed by n and the ratio
  wire_.resize(block);
  recv_.resize(static_cast<std::size_t>(ranks) * block);
  std::optional<TraceSpan> span(std::in_place, trace_, "engine", "compress");
  worker_->compress(data, residual, step, wire_);
  span.emplace(trace_, "engine", "allgather");
  comm_
      .allgather(bytes_view(wire_.data(), block),
                 bytes_view(recv_.data(), static_cast<std::size_t>(ranks) * block),
                 {"compress.topk.allgather"})
      .wait();
  span.emplace(trace_, "engine", "decompress");
  std::fill(data.begin(), data.end(), 0.0f);
  for (std::size_t p = 0; p < static_cast<std::size_t>(ranks); ++p) {
    worker_->decompress_add(std::span<const std::byte>(recv_).subspan(p * block, block), step,
                            data);
  }
  if (op == ReduceOp::kAvg) {
    const float inverse = 1.0f / static_cast<float>(ranks);
    for (float& v : data) v *= inverse;
  }
  return static_cast<std::uint64_t>(ranks - 1) * block;
}

std::uint64_t CompressedAllreduce::reduce_randomk(std::span<float> data, std::span<float> residual,
                                                  ReduceOp op, std::uint64_t step) {
  const std::size_t block = worker_->wire_bytes(data.size());
  wire_.resize(block);
  std::optional<TraceSpan> span(std::in_place, trace_, "engine", "compress");
  worker_->compress(data, residual, step, wire_);
  // The wire is k f32 values at the same positions on every rank: reduce them as they are.
  const TensorView values{wire_.data(), block / sizeof(float), DType::kF32};
  span.emplace(trace_, "engine", "allreduce");
  comm_.allreduce_now(values, values, {op, "compress.randomk"});
  span.emplace(trace_, "engine", "decompress");
  worker_->decompress(wire_, step, data);
  return ring_allreduce_bytes(block, comm_.size());
}

}  // namespace unimsg
