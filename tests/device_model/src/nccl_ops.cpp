// The NCCL model's collectives: every op of a launch posted as MPI point-to-point transfers on
// MPI_COMM_WORLD (the communicator's tag), then reductions folded in rank order.

#include <cstring>

#include "model.hpp"
#include "nccl_core.hpp"
#include "reduce.hpp"

namespace device_model::detail {

using namespace std::chrono_literals;

// Waits for MPI requests, giving up (and cancelling them) when the communicator is aborted.
bool wait_all(std::vector<MPI_Request>& requests, const Core& core) {
  for (int spins = 0;; ++spins) {
    int done = 0;
    MPI_Testall(static_cast<int>(requests.size()), requests.data(), &done, MPI_STATUSES_IGNORE);
    if (done) return true;
    if (core.aborted.load()) {
      for (auto& request : requests) {
        if (request == MPI_REQUEST_NULL) continue;
        MPI_Cancel(&request);
        MPI_Request_free(&request);
      }
      return false;
    }
    if (spins > 64) std::this_thread::sleep_for(100us);
  }
}

namespace {

struct Posted {
  std::vector<std::vector<std::byte>> inbox;  // per rank, for reductions
};

void post(const Core& core, const Op& op, Posted& posted, std::vector<MPI_Request>& requests) {
  const std::size_t bytes = op.count * type_size(op.type);
  const auto isend = [&](const void* data, int to) {
    requests.emplace_back();
    MPI_Isend(data, static_cast<int>(bytes), MPI_BYTE, core.world[to], core.tag, MPI_COMM_WORLD,
              &requests.back());
  };
  const auto irecv = [&](void* data, int from) {
    requests.emplace_back();
    MPI_Irecv(data, static_cast<int>(bytes), MPI_BYTE, core.world[from], core.tag, MPI_COMM_WORLD,
              &requests.back());
  };
  const auto gather_inbox = [&] {
    posted.inbox.assign(static_cast<std::size_t>(core.ranks), std::vector<std::byte>(bytes));
    for (int p = 0; p < core.ranks; ++p) {
      if (p != core.rank) irecv(posted.inbox[static_cast<std::size_t>(p)].data(), p);
    }
    std::memcpy(posted.inbox[static_cast<std::size_t>(core.rank)].data(), op.send, bytes);
  };
  if (bytes == 0) return;
  switch (op.kind) {
    case OpKind::kAllReduce:
      for (int p = 0; p < core.ranks; ++p) {
        if (p != core.rank) isend(op.send, p);
      }
      gather_inbox();
      break;
    case OpKind::kReduce:
      if (core.rank == op.peer) {
        gather_inbox();
      } else {
        isend(op.send, op.peer);
      }
      break;
    case OpKind::kBroadcast:
      if (core.rank == op.peer) {
        for (int p = 0; p < core.ranks; ++p) {
          if (p != core.rank) isend(op.send, p);
        }
      } else {
        irecv(op.recv, op.peer);
      }
      break;
    case OpKind::kAllGather:
      for (int p = 0; p < core.ranks; ++p) {
        if (p == core.rank) continue;
        isend(op.send, p);
        irecv(static_cast<std::byte*>(op.recv) + static_cast<std::size_t>(p) * bytes, p);
      }
      break;
    case OpKind::kSend:
      isend(op.send, op.peer);
      break;
    case OpKind::kRecv:
      irecv(op.recv, op.peer);
      break;
  }
}

void finish(const Core& core, const Op& op, Posted& posted) {
  const std::size_t bytes = op.count * type_size(op.type);
  if (bytes == 0) return;
  switch (op.kind) {
    case OpKind::kAllReduce:
      reduce_in_rank_order(posted.inbox, op.recv, op.count, op.type, op.reduce);
      break;
    case OpKind::kReduce:
      if (core.rank == op.peer)
        reduce_in_rank_order(posted.inbox, op.recv, op.count, op.type, op.reduce);
      break;
    case OpKind::kBroadcast:
      if (core.rank == op.peer && op.send != op.recv) std::memmove(op.recv, op.send, bytes);
      break;
    case OpKind::kAllGather: {
      std::byte* mine =
          static_cast<std::byte*>(op.recv) + static_cast<std::size_t>(core.rank) * bytes;
      if (mine != op.send) std::memmove(mine, op.send, bytes);
      break;
    }
    case OpKind::kSend:
    case OpKind::kRecv:
      break;
  }
}

}  // namespace

// What a stream runs for one launch: every op of the group, posted together.
void run_launch(const std::shared_ptr<Core>& core, const std::vector<Op>& ops,
                Injection injection) {
  if (injection) {
    std::this_thread::sleep_for(injection->second);
    core->set_error(injection->first, "device model: injected asynchronous error");
    while (!core->aborted.load()) std::this_thread::sleep_for(1ms);
  } else if (!core->aborted.load()) {
    std::vector<Posted> posted(ops.size());
    std::vector<MPI_Request> requests;
    for (std::size_t i = 0; i < ops.size(); ++i) post(*core, ops[i], posted[i], requests);
    if (wait_all(requests, *core)) {
      for (std::size_t i = 0; i < ops.size(); ++i) finish(*core, ops[i], posted[i]);
    }
  }
  --core->outstanding;
}

}  // namespace device_model::detail
