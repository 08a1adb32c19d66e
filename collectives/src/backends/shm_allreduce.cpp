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
#include "unimsg/core/error.hpp"
#include "unimsg/kernels/cast.hpp"

namespace unimsg::detail {
namespace {

using Clock = std::chrono::steady_clock;

// A segment: this rank's barrier epoch on a cache line of its own, then two halves.
constexpr std::size_t kControlBytes = 64;
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

}  // namespace

ShmAllreduce::ShmAllreduce(MPI_Comm comm, std::size_t chunk_bytes) : chunk_bytes_(chunk_bytes) {
  int rank = 0;
  int ranks = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &ranks);
  check_mpi(MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node_), rank,
            "MPI_Comm_split_type");
  int on_host = 1;
  MPI_Comm_size(node_, &on_host);
  // (Every rank learns whether all are on one host from its own count: the same everywhere.)
  if (on_host != ranks || ranks < 2) return;
  MPI_Comm_rank(node_, &rank_);
  ranks_ = on_host;
  MPI_Info info = MPI_INFO_NULL;
  MPI_Info_create(&info);
  MPI_Info_set(info, "alloc_shared_noncontig", "true");  // (each segment on its owner's pages)
  void* base = nullptr;
  const auto bytes = static_cast<MPI_Aint>(kControlBytes + 2 * chunk_bytes_);
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
  if (node_ != MPI_COMM_NULL) MPI_Comm_free(&node_);
}

std::byte* ShmAllreduce::half(int rank, std::uint64_t slot) const noexcept {
  return bases_[static_cast<std::size_t>(rank)] + kControlBytes + (slot % 2) * chunk_bytes_;
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
  // Block by block, so that the block being accumulated stays in cache while every peer's is
  // folded in: the slice is read once per rank and written once.
  const std::size_t element = dtype_size(dtype);
  for (std::size_t done = 0; done < count; done += kBlockElements) {
    reduce_block(offset + done * element, std::min(kBlockElements, count - done), dtype, op, slot);
  }
}

void ShmAllreduce::reduce_block(std::size_t offset, std::size_t count, DType dtype, ReduceOp op,
                                std::uint64_t slot) {
  std::byte* mine = half(rank_, slot) + offset;
  const auto peers = [&](auto* dst) {
    using T = std::remove_pointer_t<decltype(dst)>;
    for (int r = 0; r < ranks_; ++r) {
      if (r != rank_) fold(dst, reinterpret_cast<const T*>(half(r, slot) + offset), count, op);
    }
    if (op == ReduceOp::kAvg) divide(dst, count, ranks_);
  };
  switch (dtype) {
    case DType::kF32:
      return peers(reinterpret_cast<float*>(mine));
    case DType::kF64:
      return peers(reinterpret_cast<double*>(mine));
    case DType::kI32:
      return peers(reinterpret_cast<std::int32_t*>(mine));
    case DType::kI64:
      return peers(reinterpret_cast<std::int64_t*>(mine));
    case DType::kU8:
      return peers(reinterpret_cast<std::uint8_t*>(mine));
    case DType::kF16:
    case DType::kBF16:
      break;
  }
  // Halves: summed in f32 in rank order, rounded once.
  const bool f16 = dtype == DType::kF16;
  const auto widen = [&](const std::byte* from, std::span<float> to) {
    const std::span<const std::uint16_t> bits(reinterpret_cast<const std::uint16_t*>(from), count);
    f16 ? f16_to_f32(bits, to) : bf16_to_f32(bits, to);
  };
  wide_.resize(count);
  widened_.resize(count);
  widen(half(0, slot) + offset, wide_);
  for (int r = 1; r < ranks_; ++r) {
    widen(half(r, slot) + offset, widened_);
    fold(wide_.data(), widened_.data(), count, op);
  }
  if (op == ReduceOp::kAvg) divide(wide_.data(), count, ranks_);
  const std::span<std::uint16_t> out(reinterpret_cast<std::uint16_t*>(mine), count);
  f16 ? f32_to_f16(wide_, out) : f32_to_bf16(wide_, out);
}

void ShmAllreduce::allreduce(const void* send, void* recv, std::size_t count, DType dtype,
                             ReduceOp op, std::chrono::nanoseconds timeout) {
  const std::size_t element = dtype_size(dtype);
  const std::size_t per_chunk = chunk_bytes_ / element;
  const auto* in = static_cast<const std::byte*>(send);
  auto* out = static_cast<std::byte*>(recv);
  const auto deadline = Clock::now() + timeout;
  for (std::size_t start = 0; start < count; start += per_chunk) {
    const std::size_t n = std::min(per_chunk, count - start);
    const std::uint64_t slot = chunks_++;
    std::memcpy(half(rank_, slot), in + start * element, n * element);
    barrier(deadline);
    reduce_slice(Communicator::reduce_scatter_offset(n, ranks_, rank_) * element,
                 Communicator::reduce_scatter_share(n, ranks_, rank_), dtype, op, slot);
    barrier(deadline);
    for (int r = 0; r < ranks_; ++r) {
      const std::size_t at = Communicator::reduce_scatter_offset(n, ranks_, r) * element;
      std::memcpy(out + start * element + at, half(r, slot) + at,
                  Communicator::reduce_scatter_share(n, ranks_, r) * element);
    }
  }
}

}  // namespace unimsg::detail
