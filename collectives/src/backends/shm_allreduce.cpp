#include "shm_allreduce.hpp"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <span>
#include <string>
#include <thread>
#include <type_traits>

#include "unimsg/bus/mpi.hpp"
#include "unimsg/collectives/communicator.hpp"
#include "unimsg/collectives/mpi_communicator.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/kernels/cast.hpp"

namespace unimsg::detail {
namespace {

using Clock = std::chrono::steady_clock;

// A segment: this rank's barrier epoch on a cache line of its own, two vote areas, then kSlots
// slots.
constexpr std::size_t kControlBytes = 64;
constexpr std::size_t kHeaderBytes = kControlBytes + 2 * ShmAllreduce::kVoteBytes;
// Elements reduced at a time (16 KiB of f32: in L1 with a peer's block beside it).
constexpr std::size_t kBlockElements = 4096;

std::atomic_ref<std::uint64_t> epoch_of(std::byte* segment) {
  return std::atomic_ref<std::uint64_t>(*reinterpret_cast<std::uint64_t*>(segment));
}

template <typename T>
T combine(T a, T b, ReduceOp op) {
  switch (op) {
    case ReduceOp::kMin:
      return std::min(a, b);
    case ReduceOp::kMax:
      return std::max(a, b);
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      break;
  }
  return static_cast<T>(a + b);
}

// dst[i] = op(dst[i], peer[i]) over one slice.
template <typename T>
void fold(T* dst, const T* peer, std::size_t count, ReduceOp op) {
  if (op == ReduceOp::kSum || op == ReduceOp::kAvg) {
    for (std::size_t i = 0; i < count; ++i) dst[i] = static_cast<T>(dst[i] + peer[i]);
  } else {
    for (std::size_t i = 0; i < count; ++i) dst[i] = combine(dst[i], peer[i], op);
  }
}

template <typename T>
void divide(T* data, std::size_t count, int ranks) {
  for (std::size_t i = 0; i < count; ++i) data[i] = static_cast<T>(data[i] / static_cast<T>(ranks));
}

// Calls f with `data` as the element type of a full-width dtype (not f16/bf16).
template <typename F>
void typed(DType dtype, std::byte* data, F&& f) {
  switch (dtype) {
    case DType::kF32:
      return f(reinterpret_cast<float*>(data));
    case DType::kF64:
      return f(reinterpret_cast<double*>(data));
    case DType::kI32:
      return f(reinterpret_cast<std::int32_t*>(data));
    case DType::kI64:
      return f(reinterpret_cast<std::int64_t*>(data));
    case DType::kU8:
      return f(reinterpret_cast<std::uint8_t*>(data));
    case DType::kF16:
    case DType::kBF16:
      return;
  }
}

}  // namespace

ShmAllreduce::ShmAllreduce(MPI_Comm comm, std::size_t chunk_bytes, int host_group)
    : chunk_bytes_(chunk_bytes) {
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &total_ranks_);
  check_mpi(MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node_), rank,
            "MPI_Comm_split_type");
  if (host_group > 0) {  // (tests: every host_group ranks of a host stand for one host)
    int node_rank = 0;
    MPI_Comm_rank(node_, &node_rank);
    MPI_Comm group = MPI_COMM_NULL;
    const int split = MPI_Comm_split(node_, node_rank / host_group, node_rank, &group);
    MPI_Comm_free(&node_);
    check_mpi(split, rank, "MPI_Comm_split");
    node_ = group;
  }
  int on_host = 1;
  MPI_Comm_size(node_, &on_host);
  // Shared memory where ranks share a host; across hosts only when every host holds as many
  // ranks (then local rank l's slice is the same range everywhere).
  int fewest = on_host;
  int most = on_host;
  check_mpi(MPI_Allreduce(&on_host, &fewest, 1, MPI_INT, MPI_MIN, comm), rank, "MPI_Allreduce");
  check_mpi(MPI_Allreduce(&on_host, &most, 1, MPI_INT, MPI_MAX, comm), rank, "MPI_Allreduce");
  if (fewest != most || on_host < 2) return;
  MPI_Comm_rank(node_, &rank_);
  ranks_ = on_host;
  if (on_host < total_ranks_) {
    check_mpi(MPI_Comm_split(comm, rank_, rank, &cross_), rank, "MPI_Comm_split");
    int host = rank;  // (its first rank names a host)
    check_mpi(MPI_Bcast(&host, 1, MPI_INT, 0, node_), rank, "MPI_Bcast");
    hosts_.resize(static_cast<std::size_t>(total_ranks_));
    check_mpi(MPI_Allgather(&host, 1, MPI_INT, hosts_.data(), 1, MPI_INT, comm), rank,
              "MPI_Allgather");
  }
  MPI_Info info = MPI_INFO_NULL;
  MPI_Info_create(&info);
  MPI_Info_set(info, "alloc_shared_noncontig", "true");  // (each segment on its owner's pages)
  void* base = nullptr;
  const auto bytes = static_cast<MPI_Aint>(kHeaderBytes + kSlots * chunk_bytes_);
  const int made = MPI_Win_allocate_shared(bytes, 1, info, node_, &base, &window_);
  MPI_Info_free(&info);
  check_mpi(made, rank, "MPI_Win_allocate_shared");
  bases_.resize(static_cast<std::size_t>(ranks_));
  for (int r = 0; r < ranks_; ++r) {
    MPI_Aint size = 0;
    int unit = 0;
    void* mapped = nullptr;
    check_mpi(MPI_Win_shared_query(window_, r, &size, &unit, &mapped), rank,
              "MPI_Win_shared_query");
    bases_[static_cast<std::size_t>(r)] = static_cast<std::byte*>(mapped);
  }
  epoch_of(bases_[static_cast<std::size_t>(rank_)]).store(0, std::memory_order_release);
  // A passive-target epoch for the window's life: its memory is read and written directly.
  check_mpi(MPI_Win_lock_all(MPI_MODE_NOCHECK, window_), rank, "MPI_Win_lock_all");
  check_mpi(MPI_Barrier(node_), rank, "MPI_Barrier");  // (every epoch counter zeroed)
}

ShmAllreduce::~ShmAllreduce() {
  if (window_ != MPI_WIN_NULL) {
    MPI_Win_unlock_all(window_);
    MPI_Win_free(&window_);
  }
  if (cross_ != MPI_COMM_NULL) MPI_Comm_free(&cross_);
  if (node_ != MPI_COMM_NULL) MPI_Comm_free(&node_);
}

std::byte* ShmAllreduce::half(int rank, std::uint64_t slot) const noexcept {
  return bases_[static_cast<std::size_t>(rank)] + kHeaderBytes + (slot % kSlots) * chunk_bytes_;
}

std::byte* ShmAllreduce::votes_of(int rank, std::uint64_t ballot) const noexcept {
  return bases_[static_cast<std::size_t>(rank)] + kControlBytes + (ballot % 2) * kVoteBytes;
}

void ShmAllreduce::barrier(Clock::time_point deadline) {
  ++epoch_;
  epoch_of(bases_[static_cast<std::size_t>(rank_)]).store(epoch_, std::memory_order_release);
  for (int r = 0; r < ranks_; ++r) {
    if (r == rank_) continue;
    const auto peer = epoch_of(bases_[static_cast<std::size_t>(r)]);
    for (std::uint32_t spins = 0; peer.load(std::memory_order_acquire) < epoch_; ++spins) {
      if (spins < 64) continue;
      // (More ranks than cores: the peer needs this core to arrive.)
      progress_across();
      std::this_thread::yield();
      if (spins % 1024 == 0 && Clock::now() > deadline) {
        throw TimeoutError(rank_, "shared-memory allreduce",
                           "host rank " + std::to_string(r) + " did not reach the barrier");
      }
    }
  }
}

void ShmAllreduce::reduce_slice(std::size_t offset, std::size_t count, DType dtype, ReduceOp op,
                                std::uint64_t slot) {
  const bool halves = dtype == DType::kF16 || dtype == DType::kBF16;
  // avg: a sum here and across hosts, divided once at the end; halves stay f32 until then.
  const ReduceOp sum_or_op = op == ReduceOp::kAvg ? ReduceOp::kSum : op;
  const std::size_t element = dtype_size(dtype);
  auto& wide = wide_[slot % kSlots];
  if (halves) wide.resize(count);
  // Block by block, so that the block being accumulated stays in cache while every peer's is
  // folded in: the slice is read once per rank and written once.
  for (std::size_t done = 0; done < count; done += kBlockElements) {
    reduce_block(offset + done * element, std::min(kBlockElements, count - done), dtype, sum_or_op,
                 slot, halves ? wide.data() + done : nullptr);
  }
  if (cross_ == MPI_COMM_NULL) return;
  // This host's slice with the same slice of every other host (local rank l's peers).
  const DType carried = halves ? DType::kF32 : dtype;
  std::byte* data = halves ? reinterpret_cast<std::byte*>(wide.data()) : half(rank_, slot) + offset;
  across_[slot % kSlots].start(
      cross_, static_cast<int>(slot % kSlots), data, count, mpi_datatype(carried),
      dtype_size(carried),
      [carried, sum_or_op](std::byte* dst, const std::byte* src, std::size_t n) {
        typed(carried, dst, [&](auto* into) {
          using T = std::remove_pointer_t<decltype(into)>;
          fold(into, reinterpret_cast<const T*>(src), n, sum_or_op);
        });
      });
}

void ShmAllreduce::finish_slice(std::size_t offset, std::size_t count, DType dtype, ReduceOp op,
                                std::uint64_t slot) {
  const bool halves = dtype == DType::kF16 || dtype == DType::kBF16;
  auto& wide = wide_[slot % kSlots];
  std::byte* mine = half(rank_, slot) + offset;
  if (op == ReduceOp::kAvg) {
    if (halves) {
      divide(wide.data(), count, total_ranks_);
    } else {
      typed(dtype, mine, [&](auto* data) { divide(data, count, total_ranks_); });
    }
  }
  if (halves) {
    const std::span<std::uint16_t> out(reinterpret_cast<std::uint16_t*>(mine), count);
    dtype == DType::kF16 ? f32_to_f16(wide, out) : f32_to_bf16(wide, out);
  }
}

void ShmAllreduce::reduce_block(std::size_t offset, std::size_t count, DType dtype, ReduceOp op,
                                std::uint64_t slot, float* wide) {
  if (wide == nullptr) {
    typed(dtype, half(rank_, slot) + offset, [&](auto* dst) {
      using T = std::remove_pointer_t<decltype(dst)>;
      for (int r = 0; r < ranks_; ++r) {
        if (r != rank_) fold(dst, reinterpret_cast<const T*>(half(r, slot) + offset), count, op);
      }
    });
    return;
  }
  // Halves: summed in f32 in rank order into `wide`.
  const auto widen = [&](const std::byte* from, std::span<float> to) {
    const std::span<const std::uint16_t> bits(reinterpret_cast<const std::uint16_t*>(from), count);
    dtype == DType::kF16 ? f16_to_f32(bits, to) : bf16_to_f32(bits, to);
  };
  widened_.resize(count);
  widen(half(0, slot) + offset, std::span<float>(wide, count));
  for (int r = 1; r < ranks_; ++r) {
    widen(half(r, slot) + offset, widened_);
    fold(wide, widened_.data(), count, op);
  }
}

void ShmAllreduce::progress_across() {
  for (auto& ring : across_) ring.progress();
}

void ShmAllreduce::wait_across(std::uint64_t slot, Clock::time_point deadline) {
  for (std::uint32_t polls = 0; !across_[slot % kSlots].progress(); ++polls) {
    progress_across();  // (the next chunk's slice too: it is already under way)
    std::this_thread::yield();
    if (polls % 1024 == 1023 && Clock::now() > deadline) {
      for (auto& ring : across_) ring.abandon();
      throw TimeoutError(rank_, "shared-memory allreduce",
                         "the slice's allreduce across hosts did not complete (a host missing)");
    }
  }
}

void ShmAllreduce::chunk_in(const Call& call, const Chunk& chunk) {
  copy_in(call, chunk);
  barrier(call.deadline);
  reduce_in(call, chunk);
}

void ShmAllreduce::copy_in(const Call& call, const Chunk& chunk) {
  const std::size_t element = dtype_size(call.dtype);
  std::memcpy(half(rank_, chunk.slot), call.in + chunk.start * element, chunk.count * element);
}

void ShmAllreduce::reduce_in(const Call& call, const Chunk& chunk) {
  const std::size_t element = dtype_size(call.dtype);
  reduce_slice(Communicator::reduce_scatter_offset(chunk.count, ranks_, rank_) * element,
               Communicator::reduce_scatter_share(chunk.count, ranks_, rank_), call.dtype, call.op,
               chunk.slot);
}

void ShmAllreduce::chunk_out(const Call& call, const Chunk& chunk) {
  const std::size_t element = dtype_size(call.dtype);
  wait_across(chunk.slot, call.deadline);
  finish_slice(Communicator::reduce_scatter_offset(chunk.count, ranks_, rank_) * element,
               Communicator::reduce_scatter_share(chunk.count, ranks_, rank_), call.dtype, call.op,
               chunk.slot);
  barrier(call.deadline);
  for (int r = 0; r < ranks_; ++r) {
    const std::size_t at = Communicator::reduce_scatter_offset(chunk.count, ranks_, r) * element;
    std::memcpy(call.out + chunk.start * element + at, half(r, chunk.slot) + at,
                Communicator::reduce_scatter_share(chunk.count, ranks_, r) * element);
  }
}

void ShmAllreduce::allreduce(const void* send, void* recv, std::size_t count, DType dtype,
                             ReduceOp op, std::chrono::nanoseconds timeout) {
  const Call call{static_cast<const std::byte*>(send), static_cast<std::byte*>(recv), dtype, op,
                  Clock::now() + timeout};
  pipeline(call, 0, count, nullptr);
}

bool ShmAllreduce::allreduce_if_agreed(const void* send, void* recv, std::size_t count, DType dtype,
                                       ReduceOp op, std::chrono::nanoseconds timeout,
                                       std::span<std::uint8_t> votes) {
  if (!hosts_.empty() || votes.empty() || votes.size() > kVoteBytes) {
    throw Error(
        rank_, "shared-memory allreduce",
        "votes ride on the data only on one host, 1 to " + std::to_string(kVoteBytes) + " of them");
  }
  const Call call{static_cast<const std::byte*>(send), static_cast<std::byte*>(recv), dtype, op,
                  Clock::now() + timeout};
  const std::uint64_t ballot = ballots_++;
  std::memcpy(votes_of(rank_, ballot), votes.data(), votes.size());
  const Chunk first{0, std::min(chunk_bytes_ / dtype_size(dtype), count), chunks_++};
  if (votes[0] == 0 && first.count > 0) copy_in(call, first);  // (wasted if a peer vetoes)
  barrier(call.deadline);
  for (int r = 0; r < ranks_; ++r) {
    if (r == rank_) continue;
    const auto* theirs = reinterpret_cast<const std::uint8_t*>(votes_of(r, ballot));
    for (std::size_t i = 0; i < votes.size(); ++i) votes[i] = std::max(votes[i], theirs[i]);
  }
  if (votes[0] != 0) return false;
  pipeline(call, 0, count, &first);
  return true;
}

void ShmAllreduce::pipeline(const Call& call, std::size_t start, std::size_t count,
                            const Chunk* first_in) {
  const std::size_t per_chunk = chunk_bytes_ / dtype_size(call.dtype);
  // Chunk k+1 goes in (and starts across hosts) before chunk k comes out.
  Chunk previous;
  bool pending = false;
  if (first_in != nullptr && first_in->count > 0) {
    reduce_in(call, *first_in);
    previous = *first_in;
    pending = true;
    start += first_in->count;
  }
  for (; start < count; start += per_chunk) {
    Chunk chunk{start, std::min(per_chunk, count - start), chunks_++};
    chunk_in(call, chunk);
    if (pending) chunk_out(call, previous);
    previous = chunk;
    pending = true;
  }
  if (pending) chunk_out(call, previous);
}

}  // namespace unimsg::detail
