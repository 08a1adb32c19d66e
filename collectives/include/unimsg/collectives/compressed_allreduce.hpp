#pragma once

// Allreduce of f32 gradients through a compressor, with the aggregation each compressor needs:
//   none          a plain allreduce
//   fp16, bf16,   the two-phase scheme of DeepSpeed's 1-bit Adam (for the casts it is simply a
//   onebit, int8  reduce-scatter + allgather allreduce that keeps 16 bits on the wire): each
//                 rank's partition compressed with the worker's error feedback, alltoall of the
//                 partitions, each rank decompresses and reduces its partition in f32,
//                 recompresses it with its server error feedback, allgather
//   topk          allgather of the (index, value) pairs and a sparse sum
//   randomk       allreduce of the values at the positions every rank draws alike
//   powersgd      two allreduces, of the factors P and Q (kernels/powersgd.hpp), Q warm-started
//                 per key; buffers too small for the factors to be smaller go uncompressed
//
// Across hosts (Communicator::hosts(): hosts holding as many ranks each), fp16, bf16, int8, onebit
// and topk compress only what crosses hosts: a reduce-scatter in f32 within the host leaves each
// rank the host's sum of its slice, the slice is reduced compressed with the same slice of every
// other host (the scheme above over those ranks, error feedback kept for the slice alone: the
// rest of `residual` stays zero), then an allgather within the host. none, randomk and PowerSGD
// reduce with allreduce_now, which is already hierarchical there.
//
// Every call first agrees, in one tiny allreduce, whether any rank's gradient holds NaN or Inf:
// then nothing is compressed, no error-feedback state changes on any rank, and the result is
// NaN everywhere, so that every rank skips the step (as AMP does) and none drifts.

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "unimsg/collectives/communicator.hpp"
#include "unimsg/kernels/compressor.hpp"
#include "unimsg/kernels/powersgd.hpp"
#include "unimsg/trace/trace.hpp"

namespace unimsg {

struct CompressedAllreduceResult {
  // Bytes this rank put on the wire. Where a backend hides its traffic (MPI_Allreduce), the ring
  // equivalent 2(n-1)/n x the bytes reduced.
  std::uint64_t wire_bytes = 0;
  std::uint64_t nonfinite_ranks = 0;  // > 0: the step was skipped everywhere
};

class CompressedAllreduce {
 public:
  // Collective calls over `communicator`, which must outlive this object. `across_hosts`: split
  // the work by host where hosts() says the ranks share them (false: one level, as within a
  // slice's ranks).
  CompressedAllreduce(Communicator& communicator, CompressionSpec spec, bool across_hosts = true);
  ~CompressedAllreduce();

  // Reduces `data` (this rank's gradient in, the reduced one out) with sum or avg. `residual` is
  // this rank's error feedback for `data` (empty: none, else data.size() elements). `step` must
  // be the same on every rank (seeds randomk's positions and int8's rounding). `key` names the
  // state kept here between calls for the same buffer (the two-phase server residual).
  // Collective and blocking; every rank passes the same size, op, step and key.
  CompressedAllreduceResult allreduce(std::span<float> data, std::span<float> residual, ReduceOp op,
                                      std::uint64_t step, const std::string& key);

  const CompressionSpec& spec() const noexcept { return spec_; }
  // Records compress / alltoall / decompress / allgather spans on the "engine" lane (null: off).
  void set_trace(TraceRecorder* trace) noexcept { trace_ = trace; }
  // Forgets the server-side state (after a change of world or a restore).
  void reset_state();
  // The server residual kept for `key` (this rank's partition; across hosts, of its slice), for
  // tests.
  std::span<const float> server_residual(const std::string& key) const;
  // Across hosts: this rank's slice [begin, end) of a buffer of `count`; else {0, count}.
  std::pair<std::size_t, std::size_t> host_slice(std::size_t count) const;
  bool across_hosts() const noexcept { return hierarchy_ != nullptr; }
  // The elements [begin, end) of a two-phase buffer of `count` that rank `rank` serves.
  std::pair<std::size_t, std::size_t> partition(std::size_t count, int rank) const;

  // 2(n-1)/n x bytes: what a ring allreduce sends per rank.
  static std::uint64_t ring_allreduce_bytes(std::uint64_t bytes, int ranks) noexcept;

 private:
  struct Hierarchy;
  void split_by_host();
  std::uint64_t reduce(std::span<float> data, std::span<float> residual, ReduceOp op,
                       std::uint64_t step, const std::string& key);
  std::uint64_t reduce_across_hosts(std::span<float> data, std::span<float> residual, ReduceOp op,
                                    std::uint64_t step, const std::string& key);
  std::uint64_t reduce_plain(std::span<float> data, ReduceOp op);
  std::uint64_t reduce_two_phase(std::span<float> data, std::span<float> residual, ReduceOp op,
                                 std::uint64_t step, const std::string& key);
  std::uint64_t reduce_topk(std::span<float> data, std::span<float> residual, ReduceOp op,
                            std::uint64_t step);
  std::uint64_t reduce_powersgd(std::span<float> data, std::span<float> residual, ReduceOp op,
                                const std::string& key);
  std::uint64_t reduce_randomk(std::span<float> data, std::span<float> residual, ReduceOp op,
                               std::uint64_t step);

  Communicator& comm_;
  CompressionSpec spec_;
  TraceRecorder* trace_ = nullptr;
  std::unique_ptr<Compressor> worker_;  // seeded per rank (int8's rounding)
  std::unique_ptr<Compressor> server_;  // two-phase: the partition's recompression
  std::size_t chunk_ = 1;  // two-phase: partitions start at multiples of the format's chunk
  std::map<std::string, std::vector<float>> server_residuals_;
  std::map<std::string, PowerSgd> powersgd_;  // warm-started Q per key
  std::vector<std::byte> wire_, send_, recv_;
  std::vector<float> scratch_;
  std::unique_ptr<Hierarchy> hierarchy_;  // across hosts (null: one level)
};

}  // namespace unimsg
