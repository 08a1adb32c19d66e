#include "unimsg/collectives/nccl_communicator.hpp"
#include "unimsg/kernels/cuda_checks.hpp"

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstring>
#include <mutex>
#include <random>

#include "nccl_state.hpp"
#include "progress_tracker.hpp"
#include "unimsg/bus/mpi.hpp"
#include "unimsg/core/config.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/kernels/device_memory.hpp"

namespace unimsg {
namespace detail {
namespace {

ncclDataType_t nccl_type(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return ncclFloat32;
    case DType::kF16:
      return ncclFloat16;
    case DType::kBF16:
      return ncclBfloat16;
    case DType::kF64:
      return ncclFloat64;
    case DType::kI32:
      return ncclInt32;
    case DType::kI64:
      return ncclInt64;
    case DType::kU8:
      return ncclUint8;
  }
  return ncclFloat32;
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return ncclSum;
    case ReduceOp::kAvg:
      return ncclAvg;
    case ReduceOp::kMin:
      return ncclMin;
    case ReduceOp::kMax:
      return ncclMax;
  }
  return ncclSum;
}

void check_device(const TensorView& view, int rank, const char* what) {
  if (view.device != Device::kCuda) {
    throw Error(rank, what, "the NCCL backend takes device memory; host tensors go through MPI");
  }
  if (view.data == nullptr && view.count != 0) {
    throw Error(rank, what, "null data pointer for " + std::to_string(view.count) + " elements");
  }
}

void check_pair(const TensorView& send, const TensorView& recv, int rank, const char* what) {
  check_device(send, rank, what);
  check_device(recv, rank, what);
  if (send.dtype != recv.dtype) {
    throw Error(
        rank, what,
        std::string("send is ") + to_string(send.dtype) + " but recv is " + to_string(recv.dtype));
  }
}

std::string describe(const char* op, const TensorView& view, std::string_view name) {
  std::string text =
      std::string(op) + " " + to_string(view.dtype) + " x" + std::to_string(view.count);
  if (!name.empty()) text += " '" + std::string(name) + "'";
  return text;
}

std::byte* at(const TensorView& view, std::size_t elements) {
  return static_cast<std::byte*>(view.data) + elements * dtype_size(view.dtype);
}

// One collective's Work: polls the event recorded after it, and NCCL's asynchronous error; a
// wait that times out aborts the communicator (a hung collective cannot be cancelled).
class NcclWork final : public Work::State {
 public:
  NcclWork(std::shared_ptr<NcclState> state, std::uint64_t seq, EventHandle event,
           std::shared_ptr<void> keep, std::string description, std::chrono::nanoseconds timeout,
           std::function<std::string()> missing_ranks)
      : state_(std::move(state)),
        seq_(seq),
        event_(std::move(event)),
        keep_(std::move(keep)),
        description_(std::move(description)),
        timeout_(timeout),
        missing_ranks_(std::move(missing_ranks)),
        rank_(state_->comm.rank()) {}

  bool poll() override {
    const cudaError_t status = cudaEventQuery(event_.get());
    // (`aborted` is set before ncclCommAbort ends the stream's work early: an event found
    // complete with no abort yet was completed by the collective itself.)
    if (status == cudaSuccess && !state_->aborted.load()) return true;
    {
      std::lock_guard lock(state_->launch_mutex);
      if (state_->aborted.load()) {
        // Done is done, whatever happened to the communicator since; cut short is an error.
        if (seq_ <= state_->done_before_abort) return true;
        throw_aborted(*state_, description_);
      }
      async_state(*state_, description_);  // (an asynchronous error: abort, and an Error)
    }
    if (status == cudaSuccess) return true;
    if (status == cudaErrorNotReady) return false;
    check_cuda(status, rank_, "nccl wait");
    return false;  // (not reached: status is an error)
  }
  std::string describe() const override { return description_; }
  std::string missing_ranks() const override { return missing_ranks_(); }
  void on_timeout() override {
    abort_communicator(*state_, description_ + " did not complete within the timeout");
  }
  int rank() const override { return rank_; }
  std::chrono::nanoseconds default_timeout() const override { return timeout_; }

 private:
  std::shared_ptr<NcclState> state_;
  std::uint64_t seq_;  // its place in the stream's order of launches
  EventHandle event_;
  std::shared_ptr<void> keep_;  // buffers that must live until the operation completes
  std::string description_;
  std::chrono::nanoseconds timeout_;
  std::function<std::string()> missing_ranks_;
  int rank_;
};

// Issues `calls` (NCCL and stream work) under the launch lock on the communicator's device, waits
// until NCCL has enqueued them, runs `after_enqueue` (stream work that must follow the NCCL
// kernels: a non-blocking communicator enqueues them from a helper thread, so work queued right
// after ncclGroupEnd could reach the stream first), then records an event that the Work polls.
// `keep` holds buffers that must live until the operation completes.
Work launch(const std::shared_ptr<NcclState>& state, std::chrono::nanoseconds timeout,
            std::string description, const std::function<void()>& calls,
            std::shared_ptr<void> keep = {}, const std::function<void()>& after_enqueue = {}) {
  const int rank = state->comm.rank();
  const std::uint64_t index = state->progress->start();
  EventHandle event;
  std::uint64_t seq = 0;
  {
    std::lock_guard lock(state->launch_mutex);
    if (state->aborted.load()) throw_aborted(*state, description);
    const DeviceGuard device(state->device, rank, description);
    calls();
    wait_enqueued(*state, "nccl launch", timeout);
    if (after_enqueue) after_enqueue();
    cudaEvent_t raw_event = nullptr;
    check_cuda(cudaEventCreateWithFlags(&raw_event, cudaEventDisableTiming), rank,
               "cudaEventCreate");
    event = EventHandle(raw_event, [](cudaEvent_t e) { cudaEventDestroy(e); });
    check_cuda(cudaEventRecord(raw_event, state->stream), rank, "cudaEventRecord");
    seq = ++state->launched;
    track_launch(*state, seq, event);
  }
  return Work(std::make_shared<NcclWork>(state, seq, std::move(event), std::move(keep),
                                         std::move(description), timeout,
                                         state->progress->missing_ranks(index)));
}

std::uint32_t draw_topic_seed(const MpiComm& comm) {
  std::uint32_t draw = 0;
  if (comm.rank() == 0) draw = std::random_device{}();
  check_mpi(MPI_Bcast(&draw, 1, MPI_UINT32_T, 0, comm.get()), comm.rank(), "MPI_Bcast");
  return draw;
}

void finish_setup(NcclState& state, std::chrono::nanoseconds timeout) {
  {
    std::lock_guard lock(state.launch_mutex);
    wait_enqueued(state, "ncclCommInitRankConfig", timeout);
  }
  const DeviceGuard device(state.device, state.comm.rank(), "nccl.init");
  // A blocking stream: ordered after the legacy default stream, where cudaMemcpy from pageable
  // memory queues its DMA (it may return before the DMA lands): a collective must not read its
  // input before that copy (DeviceBuffer::copy_from_host, the staging of host tensors).
  check_cuda(cudaStreamCreate(&state.stream), state.comm.rank(), "cudaStreamCreate");
  state.barrier_scratch = std::make_unique<DeviceBuffer>(sizeof(float));
}

}  // namespace
}  // namespace detail

using detail::NcclState;

NcclCommunicator::NcclCommunicator(MPI_Comm parent, Bus& bus, int device,
                                   CommunicatorOptions options)
    : state_(std::make_shared<NcclState>()) {
  NcclState& state = *state_;
  state.comm = MpiComm(parent);
  state.bus = &bus;
  state.device = device;
  state.progress = std::make_unique<detail::ProgressTracker>(state.comm.get(), bus);
  set_default_timeout(options.timeout);
  const int rank = state.comm.rank();
  check_cuda(cudaSetDevice(device), rank, "cudaSetDevice");

  // The ncclUniqueId travels over the bus, from rank 0 to every member.
  const Topic topic = kServiceTopicBase + detail::draw_topic_seed(state.comm) %
                                              (kReservedTopicBase - kServiceTopicBase);
  ncclUniqueId id{};
  const auto& members = state.progress->world_ranks();
  if (rank == 0) {
    detail::check_nccl(ncclGetUniqueId(&id), state, "ncclGetUniqueId");
    const auto bytes = std::as_bytes(std::span(&id, 1));
    for (std::size_t m = 1; m < members.size(); ++m) {
      bus.send(members[m], Message::make(Kind::kControl, topic, Payload::copy_of(bytes)));
    }
  } else {
    const Message got = bus.receive({Kind::kControl, topic, members[0]}, default_timeout());
    if (got.payload.size() != sizeof(id)) {
      throw Error(rank, "nccl.init",
                  "rank 0 sent an ncclUniqueId of " + std::to_string(got.payload.size()) +
                      " bytes, expected " + std::to_string(sizeof(id)));
    }
    std::memcpy(&id, got.payload.data(), sizeof(id));
  }
  // Non-blocking, so that a hung peer can be aborted instead of hanging this rank.
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  detail::check_nccl(ncclCommInitRankConfig(&state.nccl, state.comm.size(), id, rank, &config),
                     state, "ncclCommInitRankConfig");
  detail::finish_setup(state, default_timeout());
}

NcclCommunicator::NcclCommunicator(std::shared_ptr<NcclState> state) : state_(std::move(state)) {}

NcclCommunicator::~NcclCommunicator() = default;

int NcclCommunicator::rank() const noexcept {
  return state_->comm.rank();
}
int NcclCommunicator::size() const noexcept {
  return state_->comm.size();
}
const std::vector<int>& NcclCommunicator::world_ranks() const noexcept {
  return state_->progress->world_ranks();
}

Work NcclCommunicator::do_allreduce(TensorView send, TensorView recv,
                                    const AllreduceOptions& options) {
  const ReduceOp op = options.op;
  const std::string_view name = options.name;
  detail::check_pair(send, recv, rank(), "allreduce");
  if (send.count != recv.count) {
    throw Error(
        rank(), "allreduce",
        "send has " + std::to_string(send.count) + " elements, recv " + std::to_string(recv.count));
  }
  auto& state = *state_;
  return detail::launch(state_, default_timeout(), detail::describe("allreduce", send, name), [&] {
    detail::check_nccl(
        ncclAllReduce(send.data, recv.data, send.count, detail::nccl_type(send.dtype),
                      detail::nccl_op(op), state.nccl, state.stream),
        state, "ncclAllReduce");
  });
}

Work NcclCommunicator::do_broadcast(TensorView buffer, const BroadcastOptions& options) {
  const int root = options.root;
  const std::string_view name = options.name;
  detail::check_device(buffer, rank(), "broadcast");
  if (root < 0 || root >= size()) {
    throw Error(rank(), "broadcast",
                "root " + std::to_string(root) + " is outside 0.." + std::to_string(size() - 1));
  }
  auto& state = *state_;
  return detail::launch(
      state_, default_timeout(), detail::describe("broadcast", buffer, name), [&] {
        detail::check_nccl(
            ncclBroadcast(buffer.data, buffer.data, buffer.count, detail::nccl_type(buffer.dtype),
                          root, state.nccl, state.stream),
            state, "ncclBroadcast");
      });
}

Work NcclCommunicator::do_allgather(TensorView send, TensorView recv,
                                    const CollectiveOptions& options) {
  const std::string_view name = options.name;
  detail::check_pair(send, recv, rank(), "allgather");
  if (recv.count != send.count * static_cast<std::size_t>(size())) {
    throw Error(rank(), "allgather",
                "recv has " + std::to_string(recv.count) + " elements, needs " +
                    std::to_string(size()) + " x " + std::to_string(send.count));
  }
  auto& state = *state_;
  // NCCL's in-place convention is ours: send is this rank's slice of recv.
  return detail::launch(state_, default_timeout(), detail::describe("allgather", send, name), [&] {
    detail::check_nccl(ncclAllGather(send.data, recv.data, send.count,
                                     detail::nccl_type(send.dtype), state.nccl, state.stream),
                       state, "ncclAllGather");
  });
}

Work NcclCommunicator::do_allgatherv(TensorView send, TensorView recv,
                                     std::span<const std::size_t> counts,
                                     const CollectiveOptions& options) {
  const std::string_view name = options.name;
  detail::check_pair(send, recv, rank(), "allgatherv");
  if (counts.size() != static_cast<std::size_t>(size()) ||
      counts[static_cast<std::size_t>(rank())] != send.count) {
    throw Error(rank(), "allgatherv",
                "counts needs one entry per rank, this rank's equal to send's count");
  }
  std::size_t total = 0;
  for (const std::size_t c : counts) total += c;
  if (recv.count != total) {
    throw Error(rank(), "allgatherv",
                "recv has " + std::to_string(recv.count) + " elements, the counts add up to " +
                    std::to_string(total));
  }
  auto& state = *state_;
  const std::vector<std::size_t> sizes(counts.begin(), counts.end());
  // NCCL has no allgatherv: one broadcast per rank, grouped.
  return detail::launch(state_, default_timeout(), detail::describe("allgatherv", send, name), [&] {
    detail::NcclGroup group(state);
    std::size_t offset = 0;
    for (int r = 0; r < size(); ++r) {
      std::byte* slot = detail::at(recv, offset);
      const void* source = r == rank() ? send.data : slot;
      detail::check_nccl(ncclBroadcast(source, slot, sizes[static_cast<std::size_t>(r)],
                                       detail::nccl_type(send.dtype), r, state.nccl, state.stream),
                         state, "ncclBroadcast");
      offset += sizes[static_cast<std::size_t>(r)];
    }
    group.end();
  });
}

Work NcclCommunicator::do_reduce_scatter(TensorView send, TensorView recv,
                                         const ReduceScatterOptions& options) {
  const ReduceOp op = options.op;
  const std::string_view name = options.name;
  detail::check_pair(send, recv, rank(), "reduce_scatter");
  const bool in_place = send.data == recv.data;
  const std::size_t share = reduce_scatter_share(send.count, size(), rank());
  if (!in_place && recv.count != share) {
    throw Error(rank(), "reduce_scatter",
                "recv has " + std::to_string(recv.count) + " elements, this rank's share of " +
                    std::to_string(send.count) + " is " + std::to_string(share));
  }
  auto& state = *state_;
  const std::size_t element = dtype_size(send.dtype);
  // In place, the share is reduced into scratch and copied to the start of the buffer: the group
  // below still reads other ranks' shares from that buffer.
  std::shared_ptr<DeviceBuffer> scratch;
  if (in_place) {
    const DeviceGuard device(state.device, rank(), "reduce_scatter");  // (scratch on its GPU)
    scratch = std::make_shared<DeviceBuffer>(share * element);
  }
  void* target = in_place ? scratch->data() : recv.data;
  return detail::launch(
      state_, default_timeout(), detail::describe("reduce_scatter", send, name),
      [&] {
        detail::NcclGroup group(state);
        for (int r = 0; r < size(); ++r) {
          const std::size_t n = reduce_scatter_share(send.count, size(), r);
          const std::byte* source = detail::at(send, reduce_scatter_offset(send.count, size(), r));
          void* destination = r == rank() ? target : const_cast<std::byte*>(source);
          detail::check_nccl(ncclReduce(source, destination, n, detail::nccl_type(send.dtype),
                                        detail::nccl_op(op), r, state.nccl, state.stream),
                             state, "ncclReduce");
        }
        group.end();
      },
      scratch,
      [&] {
        // After the reduction is enqueued, not merely issued (launch()).
        if (in_place && share != 0) {
          check_cuda(cudaMemcpyAsync(send.data, target, share * element, cudaMemcpyDeviceToDevice,
                                     state.stream),
                     rank(), "cudaMemcpyAsync");
        }
      });
}

Work NcclCommunicator::do_alltoall(TensorView send, TensorView recv,
                                   const CollectiveOptions& options) {
  const std::string_view name = options.name;
  detail::check_pair(send, recv, rank(), "alltoall");
  const auto ranks = static_cast<std::size_t>(size());
  if (send.count != recv.count || send.count % ranks != 0) {
    throw Error(rank(), "alltoall",
                "send and recv need the same count, a multiple of " + std::to_string(ranks));
  }
  auto& state = *state_;
  const std::size_t block = send.count / ranks;
  const std::size_t element = dtype_size(send.dtype);
  // In place, the outgoing blocks are copied aside first: sends and receives run concurrently.
  std::shared_ptr<DeviceBuffer> copy;
  if (send.data == recv.data) {
    const DeviceGuard device(state.device, rank(), "alltoall");  // (the copy on its GPU)
    copy = std::make_shared<DeviceBuffer>(send.bytes());
  }
  return detail::launch(
      state_, default_timeout(), detail::describe("alltoall", send, name),
      [&] {
        const std::byte* source = static_cast<const std::byte*>(send.data);
        if (copy) {
          check_cuda(cudaMemcpyAsync(copy->data(), send.data, send.bytes(),
                                     cudaMemcpyDeviceToDevice, state.stream),
                     rank(), "cudaMemcpyAsync");
          source = static_cast<const std::byte*>(copy->data());
        }
        detail::NcclGroup group(state);
        for (std::size_t r = 0; r < ranks; ++r) {
          detail::check_nccl(
              ncclSend(source + r * block * element, block, detail::nccl_type(send.dtype),
                       static_cast<int>(r), state.nccl, state.stream),
              state, "ncclSend");
          detail::check_nccl(
              ncclRecv(detail::at(recv, r * block), block, detail::nccl_type(send.dtype),
                       static_cast<int>(r), state.nccl, state.stream),
              state, "ncclRecv");
        }
        group.end();
      },
      copy);
}

Work NcclCommunicator::do_barrier(const CollectiveOptions& options) {
  const std::string_view name = options.name;
  auto& state = *state_;
  std::string text = "barrier";
  if (!name.empty()) text += " '" + std::string(name) + "'";
  return detail::launch(state_, default_timeout(), text, [&] {
    detail::check_nccl(ncclAllReduce(state.barrier_scratch->data(), state.barrier_scratch->data(),
                                     1, ncclFloat32, ncclSum, state.nccl, state.stream),
                       state, "ncclAllReduce (barrier)");
  });
}

std::unique_ptr<Communicator> NcclCommunicator::split(std::span<const int> ranks) {
  const int key = split_position(ranks);
  // Membership on the host side (MPI) and on the device side (NCCL), split the same way.
  MPI_Comm child = MPI_COMM_NULL;
  check_mpi(MPI_Comm_split(state_->comm.get(), key >= 0 ? 0 : MPI_UNDEFINED, key, &child), rank(),
            "MPI_Comm_split");
  ncclComm_t nccl_child = nullptr;
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  {
    std::lock_guard lock(state_->launch_mutex);
    if (state_->aborted.load()) {
      if (child != MPI_COMM_NULL) MPI_Comm_free(&child);
      detail::throw_aborted(*state_, "split");
    }
    const DeviceGuard device(state_->device, rank(), "split");
    detail::check_nccl(ncclCommSplit(state_->nccl, key >= 0 ? 0 : NCCL_SPLIT_NOCOLOR,
                                     std::max(key, 0), &nccl_child, &config),
                       *state_, "ncclCommSplit");
    detail::wait_enqueued(*state_, "ncclCommSplit", default_timeout());
  }
  if (child == MPI_COMM_NULL) return nullptr;
  auto state = std::make_shared<NcclState>();
  state->comm = MpiComm(child);
  MPI_Comm_free(&child);
  state->bus = state_->bus;
  state->device = state_->device;
  state->nccl = nccl_child;
  state->progress = std::make_unique<detail::ProgressTracker>(state->comm.get(), *state->bus);
  detail::finish_setup(*state, default_timeout());
  auto communicator = std::make_unique<NcclCommunicator>(std::move(state));
  communicator->set_default_timeout(default_timeout());
  return communicator;
}

}  // namespace unimsg
