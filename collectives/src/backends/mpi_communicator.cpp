#include "unimsg/collectives/mpi_communicator.hpp"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>
#include <thread>
#include <vector>

#include "progress_tracker.hpp"
#include "shm_allreduce.hpp"
#include "unimsg/bus/mpi.hpp"
#include "unimsg/core/config.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/kernels/cast.hpp"
#include "unimsg/kernels/device_memory.hpp"

namespace unimsg {
namespace detail {

struct MpiCommState {
  MpiComm comm;
  Bus* bus = nullptr;
  std::unique_ptr<ProgressTracker> progress;
  std::uint32_t spin_polls = Work::kSpinPolls;  // CommunicatorOptions::wait_spin_polls
  bool oversubscribed = false;                  // more ranks on this node than cores
  CommunicatorOptions options;                  // as made (split passes them on)
  std::unique_ptr<ShmAllreduce> shm;            // where ranks share hosts (ShmAllreduce)
};

}  // namespace detail

namespace {

using detail::MpiCommState;

bool is_half(DType dtype) {
  return dtype == DType::kF16 || dtype == DType::kBF16;
}

MPI_Datatype mpi_type_or_bits(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return MPI_FLOAT;
    case DType::kF64:
      return MPI_DOUBLE;
    case DType::kI32:
      return MPI_INT32_T;
    case DType::kI64:
      return MPI_INT64_T;
    case DType::kU8:
      return MPI_UINT8_T;
    case DType::kF16:
    case DType::kBF16:
      return MPI_UINT16_T;  // moved as bits; reduced in f32
  }
  return MPI_DATATYPE_NULL;
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg:
      return MPI_SUM;  // avg divides afterwards
    case ReduceOp::kMin:
      return MPI_MIN;
    case ReduceOp::kMax:
      return MPI_MAX;
  }
  return MPI_OP_NULL;
}

int as_count(std::size_t count, int rank, const std::string& what) {
  if (count > static_cast<std::size_t>(INT_MAX)) {
    throw Error(rank, what,
                std::to_string(count) + " elements exceed MPI's count limit of 2^31-1: split it");
  }
  return static_cast<int>(count);
}

std::string describe(const char* op_name, const TensorView& view, std::string_view name,
                     const char* extra = nullptr) {
  std::string text = op_name;
  if (extra != nullptr) text += std::string(" ") + extra;
  text += std::string(" ") + to_string(view.dtype) + " x" + std::to_string(view.count);
  if (!name.empty()) text += " '" + std::string(name) + "'";
  return text;
}

void check_host(const TensorView& view, int rank, const std::string& what) {
  if (view.device != Device::kHost) {  // staged before this point; a guard, not a path
    throw Error(rank, what, "device memory reached the MPI call unstaged");
  }
  if (view.data == nullptr && view.count != 0) {
    throw Error(rank, what, "null data pointer for " + std::to_string(view.count) + " elements");
  }
}

void check_pair(const TensorView& a, const TensorView& b, int rank, const std::string& what) {
  check_host(a, rank, what);
  check_host(b, rank, what);
  if (a.dtype != b.dtype) {
    throw Error(
        rank, what,
        std::string("send is ") + to_string(a.dtype) + " but recv is " + to_string(b.dtype));
  }
}

void check_allreduce(const TensorView& send, const TensorView& recv, int rank,
                     const std::string& what) {
  check_pair(send, recv, rank, what);
  if (send.count != recv.count) {
    throw Error(
        rank, what,
        "send has " + std::to_string(send.count) + " elements, recv " + std::to_string(recv.count));
  }
}

bool on_device(const TensorView& view) {
  return view.device == Device::kCuda;
}

// This MPI is not CUDA-aware (Debian's Open MPI is not): device tensors travel through
// page-locked host copies, copied down before the MPI call and the result copied back up once
// it completes. Host tensors pass through untouched.
struct Staging {
  std::shared_ptr<PinnedBuffer> send_host;
  std::shared_ptr<PinnedBuffer> recv_host;
  TensorView send;  // what MPI sees: host memory
  TensorView recv;
  TensorView device_recv;  // where the result goes back, when recv is on the device

  void copy_back() const {
    if (on_device(device_recv)) {
      copy_host_to_device(device_recv.data, recv.data, device_recv.bytes());
    }
  }
};

std::shared_ptr<Staging> stage(TensorView send, TensorView recv, int rank,
                               const std::string& what) {
  auto staging = std::make_shared<Staging>();
  staging->send = send;
  staging->recv = recv;
  try {
    if (on_device(recv)) {
      // Copied down too: in-place operations read it.
      staging->recv_host = std::make_shared<PinnedBuffer>(recv.bytes());
      copy_device_to_host(staging->recv_host->data(), recv.data, recv.bytes());
      staging->recv = {staging->recv_host->data(), recv.count, recv.dtype, Device::kHost};
      staging->device_recv = recv;
    }
    if (on_device(send)) {
      if (send.data == recv.data) {
        staging->send = staging->recv;
      } else {
        staging->send_host = std::make_shared<PinnedBuffer>(send.bytes());
        copy_device_to_host(staging->send_host->data(), send.data, send.bytes());
        staging->send = {staging->send_host->data(), send.count, send.dtype, Device::kHost};
      }
    }
  } catch (const std::exception& error) {
    throw Error(rank, what, std::string("staging device memory through the host: ") + error.what());
  }
  return staging;
}

// Divides by the number of ranks in place (avg = sum / n; integers truncate toward zero).
void divide(void* data, std::size_t count, DType dtype, int ranks) {
  const auto apply = [&](auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    for (std::size_t i = 0; i < count; ++i)
      typed[i] = static_cast<T>(typed[i] / static_cast<T>(ranks));
  };
  switch (dtype) {
    case DType::kF32:
      apply(static_cast<float*>(data));
      break;
    case DType::kF64:
      apply(static_cast<double*>(data));
      break;
    case DType::kI32:
      apply(static_cast<std::int32_t*>(data));
      break;
    case DType::kI64:
      apply(static_cast<std::int64_t*>(data));
      break;
    case DType::kU8:
      apply(static_cast<std::uint8_t*>(data));
      break;
    case DType::kF16:
    case DType::kBF16:
      break;  // reduced in f32: divided there
  }
}

std::vector<float> widen(const void* data, std::size_t count, DType dtype) {
  std::vector<float> wide(count);
  const std::span<const std::uint16_t> bits(static_cast<const std::uint16_t*>(data), count);
  if (dtype == DType::kF16) {
    f16_to_f32(bits, wide);
  } else {
    bf16_to_f32(bits, wide);
  }
  return wide;
}

void narrow(const float* wide, void* data, std::size_t count, DType dtype) {
  const std::span<const float> in(wide, count);
  const std::span<std::uint16_t> bits(static_cast<std::uint16_t*>(data), count);
  if (dtype == DType::kF16) {
    f32_to_f16(in, bits);
  } else {
    f32_to_bf16(in, bits);
  }
}

// Whether a blocking allreduce goes through shared memory. auto: where it was measured faster
// than Open MPI's (docs/benchmarks.md, "Shared memory on one host") — everywhere but on two
// ranks from 512 KiB to 16 MiB, where Open MPI's single-copy transfers move less memory than the
// copies into and out of the segments in place (out of place ours was 1.1-1.2x faster there).
// Only what every rank shares decides: ranks may differ in placing a call in place (a joined
// rank's zeros are packed in place while the others reduce their tensor out of place), and one
// rank in the segments' barriers while another is in MPI_Allreduce would hang both.
bool prefer_shm(const CommunicatorOptions& options, int ranks, std::size_t bytes) {
  using Mode = CommunicatorOptions::Hierarchical;
  if (options.hierarchical == Mode::kOn) return true;
  if (options.hierarchical == Mode::kOff || bytes < options.shm_min_bytes) return false;
  return !(ranks == 2 && bytes >= (512u << 10) && bytes < (16u << 20));
}

// One collective in flight: the MPI request and whatever must outlive it (widened buffers).
struct Pending {
  MPI_Request request = MPI_REQUEST_NULL;
  std::vector<float> wide_in;
  std::vector<float> wide_out;
  std::vector<int> counts;
  std::vector<int> displacements;
};

// One collective's Work: tests its MPI request (which drives MPI's progress).
class MpiWork final : public Work::State {
 public:
  MpiWork(const MpiCommState& state, std::chrono::nanoseconds timeout,
          std::shared_ptr<Pending> pending, std::string description, std::function<void()> finish)
      : pending_(std::move(pending)),
        finish_(std::move(finish)),
        description_(std::move(description)),
        missing_ranks_(state.progress->missing_ranks(state.progress->start())),
        timeout_(timeout),
        spin_polls_(state.spin_polls),
        rank_(state.comm.rank()) {}

  bool poll() override {
    int done = 0;
    check_mpi(MPI_Test(&pending_->request, &done, MPI_STATUS_IGNORE), rank_,
              "collective: MPI_Test");
    return done != 0;
  }
  void finish() override {
    if (finish_) finish_();
  }
  std::string describe() const override { return description_; }
  std::string missing_ranks() const override { return missing_ranks_(); }
  std::uint32_t spin_polls() const override { return spin_polls_; }
  int rank() const override { return rank_; }
  std::chrono::nanoseconds default_timeout() const override { return timeout_; }

 private:
  std::shared_ptr<Pending> pending_;
  std::function<void()> finish_;
  std::string description_;
  std::function<std::string()> missing_ranks_;
  std::chrono::nanoseconds timeout_;
  std::uint32_t spin_polls_;
  int rank_;
};

Work make_work(const std::shared_ptr<MpiCommState>& state, std::chrono::nanoseconds timeout,
               std::shared_ptr<Pending> pending, std::string description,
               std::function<void()> finish) {
  return Work(std::make_shared<MpiWork>(*state, timeout, std::move(pending), std::move(description),
                                        std::move(finish)));
}

}  // namespace

MPI_Datatype mpi_datatype(DType dtype) noexcept {
  return dtype == DType::kF16 || dtype == DType::kBF16 ? MPI_DATATYPE_NULL
                                                       : mpi_type_or_bits(dtype);
}

MpiCommunicator::MpiCommunicator(MPI_Comm parent, Bus& bus, CommunicatorOptions options)
    : state_(std::make_shared<detail::MpiCommState>()) {
  state_->comm = MpiComm(parent);
  state_->bus = &bus;
  check_mpi(MPI_Comm_set_errhandler(state_->comm.get(), MPI_ERRORS_RETURN), state_->comm.rank(),
            "MPI_Comm_set_errhandler");
  state_->progress = std::make_unique<detail::ProgressTracker>(state_->comm.get(), bus);
  set_default_timeout(options.timeout);
  state_->spin_polls = options.wait_spin_polls;
  MPI_Comm node = MPI_COMM_NULL;
  check_mpi(MPI_Comm_split_type(state_->comm.get(), MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node),
            rank(), "MPI_Comm_split_type");
  int on_this_node = 1;
  const int size_error = MPI_Comm_size(node, &on_this_node);
  MPI_Comm_free(&node);  // (nothing between the split and here throws)
  check_mpi(size_error, rank(), "MPI_Comm_size");
  const unsigned cores = std::thread::hardware_concurrency();
  state_->oversubscribed = cores != 0 && static_cast<unsigned>(on_this_node) > cores;
  state_->options = options;
  if (options.hierarchical != CommunicatorOptions::Hierarchical::kOff && size() > 1) {
    state_->shm = std::make_unique<detail::ShmAllreduce>(
        state_->comm.get(), options.shm_chunk_bytes, options.shm_host_ranks);
    if (!state_->shm->usable()) state_->shm.reset();
  }
}

MpiCommunicator::~MpiCommunicator() = default;

int MpiCommunicator::rank() const noexcept {
  return state_->comm.rank();
}
int MpiCommunicator::size() const noexcept {
  return state_->comm.size();
}
std::uint32_t MpiCommunicator::wait_spin_polls() const noexcept {
  return state_->spin_polls;
}

bool MpiCommunicator::oversubscribed() const noexcept {
  return state_->oversubscribed;
}

std::vector<int> MpiCommunicator::hosts() const {
  return state_->shm ? state_->shm->hosts() : std::vector<int>{};
}

const std::vector<int>& MpiCommunicator::world_ranks() const noexcept {
  return state_->progress->world_ranks();
}

Work MpiCommunicator::do_allreduce(TensorView send, TensorView recv,
                                   const AllreduceOptions& options) {
  const ReduceOp op = options.op;
  const std::string_view name = options.name;
  if (on_device(send) || on_device(recv)) {
    const auto staging = stage(send, recv, rank(), "allreduce");
    return do_allreduce(staging->send, staging->recv, options).then([staging] {
      staging->copy_back();
    });
  }
  const std::string what = "allreduce";
  check_allreduce(send, recv, rank(), what);
  const int count = as_count(send.count, rank(), what);
  const bool in_place = send.data == recv.data;
  auto pending = std::make_shared<Pending>();
  const int ranks = size();
  std::function<void()> finish;
  if (is_half(send.dtype)) {
    pending->wide_out = widen(send.data, send.count, send.dtype);
    check_mpi(MPI_Iallreduce(MPI_IN_PLACE, pending->wide_out.data(), count, MPI_FLOAT, mpi_op(op),
                             state_->comm.get(), &pending->request),
              rank(), "MPI_Iallreduce");
    finish = [pending, recv, op, ranks] {
      if (op == ReduceOp::kAvg) divide(pending->wide_out.data(), recv.count, DType::kF32, ranks);
      narrow(pending->wide_out.data(), recv.data, recv.count, recv.dtype);
    };
  } else {
    check_mpi(MPI_Iallreduce(in_place ? MPI_IN_PLACE : send.data, recv.data, count,
                             mpi_type_or_bits(send.dtype), mpi_op(op), state_->comm.get(),
                             &pending->request),
              rank(), "MPI_Iallreduce");
    if (op == ReduceOp::kAvg) {
      finish = [recv, ranks] { divide(recv.data, recv.count, recv.dtype, ranks); };
    }
  }
  return make_work(state_, default_timeout(), pending,
                   describe("allreduce", send, name, to_string(op)), finish);
}

void MpiCommunicator::do_allreduce_now(TensorView send, TensorView recv,
                                       const AllreduceOptions& options) {
  const ReduceOp op = options.op;
  const std::string_view name = options.name;
  if (on_device(send) || on_device(recv)) {
    const auto staging = stage(send, recv, rank(), "allreduce_now");
    do_allreduce_now(staging->send, staging->recv, options);
    staging->copy_back();
    return;
  }
  const std::string what = name.empty() ? "allreduce" : "allreduce '" + std::string(name) + "'";
  check_allreduce(send, recv, rank(), what);
  const int count = as_count(send.count, rank(), what);
  state_->progress->start();
  if (state_->shm && prefer_shm(state_->options, size(), send.bytes())) {
    state_->shm->allreduce(send.data, recv.data, send.count, send.dtype, op, default_timeout());
    return;
  }
  if (is_half(send.dtype)) {
    std::vector<float> wide = widen(send.data, send.count, send.dtype);
    check_mpi(
        MPI_Allreduce(MPI_IN_PLACE, wide.data(), count, MPI_FLOAT, mpi_op(op), state_->comm.get()),
        rank(), "MPI_Allreduce");
    if (op == ReduceOp::kAvg) divide(wide.data(), wide.size(), DType::kF32, size());
    narrow(wide.data(), recv.data, recv.count, recv.dtype);
    return;
  }
  check_mpi(MPI_Allreduce(send.data == recv.data ? MPI_IN_PLACE : send.data, recv.data, count,
                          mpi_type_or_bits(send.dtype), mpi_op(op), state_->comm.get()),
            rank(), "MPI_Allreduce");
  if (op == ReduceOp::kAvg) divide(recv.data, recv.count, recv.dtype, size());
}

bool MpiCommunicator::agreement_rides_on_data(std::size_t count, DType dtype,
                                              std::size_t vote_bytes) const {
  return state_->shm && state_->shm->hosts().empty() && vote_bytes >= 1 &&
         vote_bytes <= detail::ShmAllreduce::kVoteBytes &&
         prefer_shm(state_->options, size(), count * dtype_size(dtype));
}

bool MpiCommunicator::do_allreduce_if_agreed(TensorView send, TensorView recv,
                                             std::span<std::uint8_t> votes,
                                             const AllreduceOptions& options) {
  if (on_device(send) || on_device(recv) ||
      !agreement_rides_on_data(send.count, send.dtype, votes.size())) {
    return Communicator::do_allreduce_if_agreed(send, recv, votes, options);
  }
  if (votes[0] == 0) {
    check_allreduce(send, recv, rank(), "allreduce_if_agreed");
  }
  state_->progress->start();
  return state_->shm->allreduce_if_agreed(send.data, recv.data, send.count, send.dtype, options.op,
                                          default_timeout(), votes);
}

Work MpiCommunicator::do_broadcast(TensorView buffer, const BroadcastOptions& options) {
  const int root = options.root;
  const std::string_view name = options.name;
  if (on_device(buffer)) {
    const auto staging = stage(buffer, buffer, rank(), "broadcast");
    return do_broadcast(staging->recv, options).then([staging] { staging->copy_back(); });
  }
  const std::string what = "broadcast";
  check_host(buffer, rank(), what);
  if (root < 0 || root >= size()) {
    throw Error(rank(), what,
                "root " + std::to_string(root) + " is outside 0.." + std::to_string(size() - 1));
  }
  auto pending = std::make_shared<Pending>();
  check_mpi(MPI_Ibcast(buffer.data, as_count(buffer.count, rank(), what),
                       mpi_type_or_bits(buffer.dtype), root, state_->comm.get(), &pending->request),
            rank(), "MPI_Ibcast");
  return make_work(state_, default_timeout(), pending, describe("broadcast", buffer, name), {});
}

Work MpiCommunicator::do_allgather(TensorView send, TensorView recv,
                                   const CollectiveOptions& options) {
  const std::string_view name = options.name;
  if (on_device(send) || on_device(recv)) {
    const auto staging = stage(send, recv, rank(), "allgather");
    return do_allgather(staging->send, staging->recv, options).then([staging] {
      staging->copy_back();
    });
  }
  const std::string what = "allgather";
  check_pair(send, recv, rank(), what);
  if (recv.count != send.count * static_cast<std::size_t>(size())) {
    throw Error(rank(), what,
                "recv has " + std::to_string(recv.count) + " elements, needs " +
                    std::to_string(size()) + " x " + std::to_string(send.count));
  }
  const int count = as_count(send.count, rank(), what);
  // In place: the send view is this rank's slice of recv.
  const auto* own_slice =
      static_cast<const std::byte*>(recv.data) + static_cast<std::size_t>(rank()) * send.bytes();
  const bool in_place = recv.data != nullptr && send.data == own_slice;
  auto pending = std::make_shared<Pending>();
  check_mpi(MPI_Iallgather(in_place ? MPI_IN_PLACE : send.data, count, mpi_type_or_bits(send.dtype),
                           recv.data, count, mpi_type_or_bits(send.dtype), state_->comm.get(),
                           &pending->request),
            rank(), "MPI_Iallgather");
  return make_work(state_, default_timeout(), pending, describe("allgather", send, name), {});
}

Work MpiCommunicator::do_allgatherv(TensorView send, TensorView recv,
                                    std::span<const std::size_t> counts,
                                    const CollectiveOptions& options) {
  const std::string_view name = options.name;
  if (on_device(send) || on_device(recv)) {
    const auto staging = stage(send, recv, rank(), "allgatherv");
    return do_allgatherv(staging->send, staging->recv, counts, options).then([staging] {
      staging->copy_back();
    });
  }
  const std::string what = "allgatherv";
  check_pair(send, recv, rank(), what);
  if (counts.size() != static_cast<std::size_t>(size())) {
    throw Error(rank(), what,
                std::to_string(counts.size()) + " counts for " + std::to_string(size()) + " ranks");
  }
  if (counts[static_cast<std::size_t>(rank())] != send.count) {
    throw Error(rank(), what,
                "counts says this rank sends " +
                    std::to_string(counts[static_cast<std::size_t>(rank())]) +
                    " elements, send has " + std::to_string(send.count));
  }
  auto pending = std::make_shared<Pending>();
  std::size_t total = 0;
  for (const std::size_t c : counts) {
    pending->displacements.push_back(as_count(total, rank(), what));
    pending->counts.push_back(as_count(c, rank(), what));
    total += c;
  }
  if (recv.count != total) {
    throw Error(rank(), what,
                "recv has " + std::to_string(recv.count) + " elements, the counts add up to " +
                    std::to_string(total));
  }
  check_mpi(
      MPI_Iallgatherv(send.data, as_count(send.count, rank(), what), mpi_type_or_bits(send.dtype),
                      recv.data, pending->counts.data(), pending->displacements.data(),
                      mpi_type_or_bits(send.dtype), state_->comm.get(), &pending->request),
      rank(), "MPI_Iallgatherv");
  return make_work(state_, default_timeout(), pending, describe("allgatherv", send, name), {});
}

Work MpiCommunicator::do_reduce_scatter(TensorView send, TensorView recv,
                                        const ReduceScatterOptions& options) {
  const ReduceOp op = options.op;
  const std::string_view name = options.name;
  if (on_device(send) || on_device(recv)) {
    const auto staging = stage(send, recv, rank(), "reduce_scatter");
    return do_reduce_scatter(staging->send, staging->recv, options).then([staging] {
      staging->copy_back();
    });
  }
  const std::string what = "reduce_scatter";
  check_pair(send, recv, rank(), what);
  const bool in_place = send.data == recv.data;
  const std::size_t share = reduce_scatter_share(send.count, size(), rank());
  if (!in_place && recv.count != share) {
    throw Error(rank(), what,
                "recv has " + std::to_string(recv.count) + " elements, this rank's share of " +
                    std::to_string(send.count) + " is " + std::to_string(share));
  }
  auto pending = std::make_shared<Pending>();
  for (int r = 0; r < size(); ++r) {
    pending->counts.push_back(as_count(reduce_scatter_share(send.count, size(), r), rank(), what));
  }
  as_count(send.count, rank(), what);
  const int ranks = size();
  std::function<void()> finish;
  if (is_half(send.dtype)) {
    pending->wide_in = widen(send.data, send.count, send.dtype);
    pending->wide_out.resize(share);
    check_mpi(MPI_Ireduce_scatter(pending->wide_in.data(), pending->wide_out.data(),
                                  pending->counts.data(), MPI_FLOAT, mpi_op(op), state_->comm.get(),
                                  &pending->request),
              rank(), "MPI_Ireduce_scatter");
    finish = [pending, recv, op, ranks, share] {
      if (op == ReduceOp::kAvg) divide(pending->wide_out.data(), share, DType::kF32, ranks);
      narrow(pending->wide_out.data(), recv.data, share, recv.dtype);
    };
  } else {
    check_mpi(MPI_Ireduce_scatter(in_place ? MPI_IN_PLACE : send.data, recv.data,
                                  pending->counts.data(), mpi_type_or_bits(send.dtype), mpi_op(op),
                                  state_->comm.get(), &pending->request),
              rank(), "MPI_Ireduce_scatter");
    if (op == ReduceOp::kAvg) {
      finish = [recv, ranks, share] { divide(recv.data, share, recv.dtype, ranks); };
    }
  }
  return make_work(state_, default_timeout(), pending,
                   describe("reduce_scatter", send, name, to_string(op)), finish);
}

Work MpiCommunicator::do_alltoall(TensorView send, TensorView recv,
                                  const CollectiveOptions& options) {
  const std::string_view name = options.name;
  if (on_device(send) || on_device(recv)) {
    const auto staging = stage(send, recv, rank(), "alltoall");
    return do_alltoall(staging->send, staging->recv, options).then([staging] {
      staging->copy_back();
    });
  }
  const std::string what = "alltoall";
  check_pair(send, recv, rank(), what);
  const auto ranks = static_cast<std::size_t>(size());
  if (send.count != recv.count || send.count % ranks != 0) {
    throw Error(rank(), what,
                "send and recv need the same count, a multiple of " + std::to_string(ranks) +
                    "; got " + std::to_string(send.count) + " and " + std::to_string(recv.count));
  }
  const int block = as_count(send.count / ranks, rank(), what);
  const bool in_place = send.data == recv.data;
  auto pending = std::make_shared<Pending>();
  check_mpi(MPI_Ialltoall(in_place ? MPI_IN_PLACE : send.data, block, mpi_type_or_bits(send.dtype),
                          recv.data, block, mpi_type_or_bits(send.dtype), state_->comm.get(),
                          &pending->request),
            rank(), "MPI_Ialltoall");
  return make_work(state_, default_timeout(), pending, describe("alltoall", send, name), {});
}

Work MpiCommunicator::do_barrier(const CollectiveOptions& options) {
  const std::string_view name = options.name;
  auto pending = std::make_shared<Pending>();
  check_mpi(MPI_Ibarrier(state_->comm.get(), &pending->request), rank(), "MPI_Ibarrier");
  std::string text = "barrier";
  if (!name.empty()) text += " '" + std::string(name) + "'";
  return make_work(state_, default_timeout(), pending, text, {});
}

std::unique_ptr<Communicator> MpiCommunicator::split(std::span<const int> ranks) {
  const int key = split_position(ranks);
  MPI_Comm child = MPI_COMM_NULL;
  check_mpi(MPI_Comm_split(state_->comm.get(), key >= 0 ? 0 : MPI_UNDEFINED, key, &child), rank(),
            "MPI_Comm_split");
  if (child == MPI_COMM_NULL) return nullptr;
  // The new communicator duplicates `child`; free the split result itself.
  CommunicatorOptions options = state_->options;  // the parent's, as they are now
  options.timeout = default_timeout();
  options.wait_spin_polls = state_->spin_polls;
  auto communicator = std::make_unique<MpiCommunicator>(child, *state_->bus, options);
  MPI_Comm_free(&child);
  // (Its members alone may fit the node's cores; the whole job does not.)
  communicator->state_->oversubscribed |= state_->oversubscribed;
  return communicator;
}

}  // namespace unimsg
