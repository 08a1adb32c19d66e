// NCCL, modelled on the CPU over MPI for the NCCL backend's tests. What it keeps of NCCL's
// semantics, because the backend's correctness depends on them:
// - collectives run on the caller's stream (runtime_model.cpp), in stream order, reading their
//   inputs when the stream reaches them; across processes they travel over MPI_COMM_WORLD
//   (point-to-point, one tag pair per communicator), reduced in rank order;
// - a non-blocking communicator (config.blocking = 0) returns ncclInProgress from init, split,
//   finalize and every launch, and a helper thread enqueues the work a few milliseconds later
//   (work queued on the stream in between runs first); a launch while it is still in progress is
//   refused;
// - groups (ncclGroupStart/End) per thread, closed only by ncclGroupEnd;
// - buffers must be device memory of the communicator's GPU, the stream on that GPU (NCCL's
//   pointer check, always on);
// - asynchronous errors on demand (device_model.hpp), a collective then hanging until abort;
// - ncclCommAbort ends the communicator's queued work and frees the handle: any later use of it
//   stops the process, naming the call (the real one reads freed memory).
// Not modelled: topology, algorithms, protocols, speed, kernels, ncclCommShrink.

#include <mpi.h>
#include <nccl.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "device_model.hpp"
#include "model.hpp"
#include "nccl_core.hpp"
#include "reduce.hpp"

namespace device_model::detail {
namespace {

using namespace std::chrono_literals;

// How long a non-blocking communicator's helper takes to enqueue what it was handed.
constexpr auto kEnqueueDelay = 5ms;
constexpr std::uint32_t kIdMagic = 0x4C444D55;  // "UMDL"

}  // namespace
}  // namespace device_model::detail

using namespace device_model::detail;

struct ncclComm {
  std::shared_ptr<Core> core;
};

namespace device_model::detail {
namespace {

struct Registry {
  std::mutex mutex;
  std::map<ncclComm*, std::unique_ptr<ncclComm>> live;
  std::uint64_t aborts = 0;
  std::uint64_t launches = 0;
  std::uint64_t next_id = 0;
  std::map<std::string, std::pair<int, ncclResult_t>> failures;  // function -> (nth, result)
  Injection injection;
};

Registry& registry() {
  static Registry instance;
  return instance;
}

thread_local std::string tls_last_error;

// The communicator behind a handle; a freed or unknown handle stops the process, as reading a
// freed communicator would crash or corrupt a real one.
std::shared_ptr<Core> core_of(ncclComm_t comm, const char* call) {
  Registry& r = registry();
  std::lock_guard lock(r.mutex);
  const auto found = r.live.find(comm);
  if (found == r.live.end()) {
    std::fprintf(stderr,
                 "device model: %s on NCCL communicator %p, which is not live (freed by "
                 "ncclCommAbort or ncclCommDestroy, or never made): a use after free\n",
                 call, static_cast<void*>(comm));
    std::fflush(stderr);
    std::abort();
  }
  return found->second->core;
}

ncclResult_t refuse(ncclResult_t result, const std::string& text) {
  tls_last_error = text;
  return result;
}

// A failure the test asked for (device_model::fail_call), counted per function.
bool injected_failure(const char* function, ncclResult_t& result) {
  Registry& r = registry();
  std::lock_guard lock(r.mutex);
  const auto found = r.failures.find(function);
  if (found == r.failures.end()) return false;
  if (found->second.first-- > 0) return false;
  result = found->second.second;
  r.failures.erase(found);
  tls_last_error = std::string("device model: injected failure of ") + function;
  return true;
}

ncclComm_t add_live(std::shared_ptr<Core> core) {
  auto handle = std::make_unique<ncclComm>();
  handle->core = std::move(core);
  Registry& r = registry();
  std::lock_guard lock(r.mutex);
  ncclComm_t raw = handle.get();
  r.live.emplace(raw, std::move(handle));
  return raw;
}

std::unique_ptr<ncclComm> remove_live(ncclComm_t comm) {
  Registry& r = registry();
  std::lock_guard lock(r.mutex);
  auto found = r.live.find(comm);
  auto owned = std::move(found->second);
  r.live.erase(found);
  return owned;
}

int tag_for(std::uint64_t id) {
  std::uint64_t h = id * 0x9E3779B97F4A7C15ull;
  h ^= h >> 29;
  return 16384 + static_cast<int>(h % 4096) * 2;
}

// --- Groups -------------------------------------------------------------------------------------

struct Pending {
  std::shared_ptr<Core> core;
  cudaStream_t stream;
  std::vector<Op> ops;
};

struct Group {
  int depth = 0;
  std::vector<Pending> pending;
};

thread_local Group tls_group;

// Hands a communicator's ops to its stream: now (blocking) or from the helper (non-blocking).
ncclResult_t launch(Pending pending) {
  auto& core = pending.core;
  Injection injection;
  {
    Registry& r = registry();
    std::lock_guard lock(r.mutex);
    injection = std::exchange(r.injection, std::nullopt);
    ++r.launches;
  }
  ++core->outstanding;
  auto work = [core, ops = std::move(pending.ops), injection] { run_launch(core, ops, injection); };
  if (core->blocking) {
    enqueue(pending.stream, std::move(work));
    return ncclSuccess;
  }
  core->async.store(ncclInProgress);
  core->helper.post([core, stream = pending.stream, work = std::move(work)]() mutable {
    std::this_thread::sleep_for(kEnqueueDelay);
    enqueue(stream, std::move(work));
    ncclResult_t expected = ncclInProgress;
    core->async.compare_exchange_strong(expected, ncclSuccess);
  });
  return ncclInProgress;
}

ncclResult_t end_group() {
  auto pending = std::move(tls_group.pending);
  tls_group.pending.clear();
  ncclResult_t result = ncclSuccess;
  for (auto& launch_of : pending) {
    if (launch(std::move(launch_of)) == ncclInProgress) result = ncclInProgress;
  }
  return result;
}

// Checks a call's arguments and adds it to the thread's group (a group of one outside
// ncclGroupStart .. ncclGroupEnd).
ncclResult_t issue(const char* call, ncclComm_t comm, cudaStream_t stream, Op op,
                   std::size_t send_bytes, std::size_t recv_bytes) {
  auto core = core_of(comm, call);
  ncclResult_t injected = ncclSuccess;
  if (injected_failure(call, injected)) return injected;
  if (core->aborted.load()) return refuse(ncclInvalidUsage, std::string(call) + ": aborted");
  if (core->async.load() == ncclInProgress && tls_group.depth == 0)
    return refuse(ncclInvalidUsage,
                  std::string(call) + " while the communicator is still in progress");
  if (op.type < 0 || op.type >= ncclNumTypes || type_size(op.type) == 0)
    return refuse(ncclInvalidArgument, std::string(call) + ": unsupported data type");
  if (op.reduce < 0 || op.reduce >= ncclNumOps)
    return refuse(ncclInvalidArgument, std::string(call) + ": invalid reduction");
  if (op.peer < 0 || op.peer >= core->ranks)
    return refuse(ncclInvalidArgument, std::string(call) + ": root or peer out of range");
  if (stream_device(stream) != core->device)
    return refuse(ncclInvalidArgument, std::string(call) +
                                           ": the stream is not on the communicator's GPU " +
                                           std::to_string(core->device));
  const auto on_device = [&](const void* pointer, std::size_t bytes) {
    return bytes == 0 || device_span(pointer, bytes, core->device);
  };
  if (!on_device(op.send, send_bytes) || !on_device(op.recv, recv_bytes))
    return refuse(ncclInvalidArgument,
                  std::string(call) + ": a buffer is not device memory of the communicator's GPU " +
                      std::to_string(core->device));
  Group& group = tls_group;
  Pending* into = nullptr;
  for (auto& p : group.pending) {
    if (p.core == core) into = &p;
  }
  if (into == nullptr) {
    group.pending.push_back(Pending{core, stream, {}});
    into = &group.pending.back();
  } else if (into->stream != stream) {
    return refuse(ncclInvalidUsage,
                  std::string(call) + ": one communicator, two streams in a group");
  }
  into->ops.push_back(op);
  return group.depth == 0 ? end_group() : ncclSuccess;
}

// --- Setup --------------------------------------------------------------------------------------

// Rank 0 learns every member's MPI rank, then tells them all. False when aborted or refused.
bool exchange_members(Core& core, int root_world) {
  if (core.ranks == 1) return true;
  std::vector<MPI_Request> requests;
  if (core.rank == 0) {
    std::vector<std::array<int, 2>> heard(static_cast<std::size_t>(core.ranks - 1));
    for (auto& entry : heard) {
      requests.emplace_back();
      MPI_Irecv(entry.data(), 2, MPI_INT, MPI_ANY_SOURCE, core.tag + 1, MPI_COMM_WORLD,
                &requests.back());
    }
    if (!wait_all(requests, core)) return false;
    for (const auto& [rank, world] : heard) {
      if (rank <= 0 || rank >= core.ranks || core.world[static_cast<std::size_t>(rank)] >= 0) {
        core.set_error(ncclInvalidUsage, "device model: two members claimed one rank");
        return false;
      }
      core.world[static_cast<std::size_t>(rank)] = world;
    }
    requests.clear();
    for (int p = 1; p < core.ranks; ++p) {
      requests.emplace_back();
      MPI_Isend(core.world.data(), core.ranks, MPI_INT, core.world[static_cast<std::size_t>(p)],
                core.tag + 1, MPI_COMM_WORLD, &requests.back());
    }
    return wait_all(requests, core);
  }
  std::array<int, 2> mine{core.rank, core.world[static_cast<std::size_t>(core.rank)]};
  requests.resize(2);
  MPI_Isend(mine.data(), 2, MPI_INT, root_world, core.tag + 1, MPI_COMM_WORLD, &requests[0]);
  MPI_Irecv(core.world.data(), core.ranks, MPI_INT, root_world, core.tag + 1, MPI_COMM_WORLD,
            &requests[1]);
  return wait_all(requests, core);
}

int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

// Runs a setup step now (blocking) or on the helper (non-blocking: ncclInProgress until done).
ncclResult_t run_setup(const std::shared_ptr<Core>& core, std::function<bool()> step) {
  core->async.store(ncclInProgress);
  auto task = [core, step = std::move(step)] {
    if (step()) {
      ncclResult_t expected = ncclInProgress;
      core->async.compare_exchange_strong(expected, ncclSuccess);
    } else if (!core->aborted.load() && core->async.load() == ncclInProgress) {
      core->set_error(ncclSystemError, "device model: setup failed");
    }
  };
  if (core->blocking) {
    task();
    return core->async.load();
  }
  core->helper.post(std::move(task));
  return ncclInProgress;
}

}  // namespace
}  // namespace device_model::detail

// --- Test hooks ---------------------------------------------------------------------------------

namespace device_model {

void inject_async_error(ncclResult_t error, std::chrono::milliseconds after) {
  auto& r = detail::registry();
  std::lock_guard lock(r.mutex);
  r.injection = std::pair{error, after};
}

void fail_call(const std::string& function, int nth, ncclResult_t error) {
  auto& r = detail::registry();
  std::lock_guard lock(r.mutex);
  r.failures[function] = {nth, error};
}

int group_depth() {
  return detail::tls_group.depth;
}

std::uint64_t launches() {
  auto& r = detail::registry();
  std::lock_guard lock(r.mutex);
  return r.launches;
}

std::uint64_t aborts() {
  auto& r = detail::registry();
  std::lock_guard lock(r.mutex);
  return r.aborts;
}

int live_communicators() {
  auto& r = detail::registry();
  std::lock_guard lock(r.mutex);
  return static_cast<int>(r.live.size());
}

}  // namespace device_model

// --- The NCCL API -------------------------------------------------------------------------------

extern "C" {

const char* ncclGetErrorString(ncclResult_t result) {
  switch (result) {
    case ncclSuccess:
      return "no error";
    case ncclUnhandledCudaError:
      return "unhandled cuda error";
    case ncclSystemError:
      return "unhandled system error";
    case ncclInternalError:
      return "internal error - please report this issue to the NCCL developers";
    case ncclInvalidArgument:
      return "invalid argument";
    case ncclInvalidUsage:
      return "invalid usage";
    case ncclRemoteError:
      return "remote process exited or there was a network error";
    case ncclInProgress:
      return "NCCL operation in progress";
    default:
      return "unknown result code";
  }
}

const char* ncclGetLastError(ncclComm_t comm) {
  if (comm != nullptr) {
    const auto core = core_of(comm, "ncclGetLastError");
    std::lock_guard lock(core->mutex);
    if (!core->last_error.empty()) tls_last_error = core->last_error;
  }
  return tls_last_error.c_str();
}

ncclResult_t ncclGetVersion(int* version) {
  *version = NCCL_VERSION_CODE;
  return ncclSuccess;
}

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  int initialised = 0;
  MPI_Initialized(&initialised);
  if (!initialised)
    return refuse(ncclSystemError, "device model: NCCL is modelled over MPI: initialise MPI first");
  auto& r = registry();
  std::uint64_t serial = 0;
  {
    std::lock_guard lock(r.mutex);
    serial = r.next_id++;
  }
  const std::int32_t root = world_rank();
  std::memset(id->internal, 0, sizeof(id->internal));
  std::memcpy(id->internal, &kIdMagic, 4);
  std::memcpy(id->internal + 4, &root, 4);
  const std::uint64_t unique = (static_cast<std::uint64_t>(root) << 32) ^ serial;
  std::memcpy(id->internal + 8, &unique, 8);
  return ncclSuccess;
}

ncclResult_t ncclCommInitRankConfig(ncclComm_t* comm, int ranks, ncclUniqueId id, int rank,
                                    ncclConfig_t* config) {
  std::uint32_t magic = 0;
  std::int32_t root = 0;
  std::uint64_t unique = 0;
  std::memcpy(&magic, id.internal, 4);
  std::memcpy(&root, id.internal + 4, 4);
  std::memcpy(&unique, id.internal + 8, 8);
  if (magic != kIdMagic)
    return refuse(ncclInvalidArgument, "device model: not a unique id of its own");
  if (ranks < 1 || rank < 0 || rank >= ranks)
    return refuse(ncclInvalidArgument, "device model: rank outside 0..ranks-1");
  auto core = std::make_shared<Core>();
  core->id = unique;
  core->ranks = ranks;
  core->rank = rank;
  core->device = current_device();
  core->blocking = config == nullptr || config->blocking != 0;
  core->tag = tag_for(unique);
  core->world.assign(static_cast<std::size_t>(ranks), -1);
  core->world[static_cast<std::size_t>(rank)] = world_rank();
  if (rank == 0) core->world[0] = root;
  *comm = add_live(core);
  return run_setup(core, [core = core.get(), root] { return exchange_members(*core, root); });
}

ncclResult_t ncclCommSplit(ncclComm_t comm, int color, int key, ncclComm_t* child,
                           ncclConfig_t* config) {
  auto parent = core_of(comm, "ncclCommSplit");
  if (parent->aborted.load()) return refuse(ncclInvalidUsage, "ncclCommSplit: aborted");
  auto made = std::make_shared<Core>();
  made->blocking = config == nullptr || config->blocking != 0;
  made->device = current_device();
  made->id =
      parent->id * 1000003u + parent->splits++ * 131u + static_cast<std::uint64_t>(color + 1);
  made->tag = tag_for(made->id);
  *child = color == NCCL_SPLIT_NOCOLOR ? nullptr : add_live(made);
  parent->async.store(ncclInProgress);
  // Every member learns every member's (color, key) over the parent's control tag.
  auto step = [parent, made, color, key] {
    const auto n = static_cast<std::size_t>(parent->ranks);
    std::vector<std::array<int, 2>> all(n);
    all[static_cast<std::size_t>(parent->rank)] = {color, key};
    std::vector<MPI_Request> requests;
    for (std::size_t p = 0; p < n; ++p) {
      if (static_cast<int>(p) == parent->rank) continue;
      requests.emplace_back();
      MPI_Isend(all[static_cast<std::size_t>(parent->rank)].data(), 2, MPI_INT, parent->world[p],
                parent->tag + 1, MPI_COMM_WORLD, &requests.back());
      requests.emplace_back();
      MPI_Irecv(all[p].data(), 2, MPI_INT, parent->world[p], parent->tag + 1, MPI_COMM_WORLD,
                &requests.back());
    }
    if (!wait_all(requests, *parent)) return false;
    std::vector<std::array<int, 2>> members;  // (key, parent rank) of this color
    for (std::size_t p = 0; p < n; ++p) {
      if (all[p][0] == color && color != NCCL_SPLIT_NOCOLOR)
        members.push_back({all[p][1], static_cast<int>(p)});
    }
    std::sort(members.begin(), members.end());
    made->ranks = static_cast<int>(members.size());
    for (std::size_t i = 0; i < members.size(); ++i) {
      made->world.push_back(parent->world[static_cast<std::size_t>(members[i][1])]);
      if (members[i][1] == parent->rank) made->rank = static_cast<int>(i);
    }
    made->async.store(ncclSuccess);
    return true;
  };
  made->async.store(ncclInProgress);
  return run_setup(parent, std::move(step));
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* result) {
  *result = core_of(comm, "ncclCommGetAsyncError")->async.load();
  return ncclSuccess;
}

ncclResult_t ncclCommFinalize(ncclComm_t comm) {
  auto core = core_of(comm, "ncclCommFinalize");
  return run_setup(core, [core = core.get()] {
    while (core->outstanding.load() > 0 && !core->aborted.load()) std::this_thread::sleep_for(1ms);
    return !core->aborted.load();
  });
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  core_of(comm, "ncclCommDestroy");
  auto owned = remove_live(comm);
  owned->core->helper.stop();
  return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) {
  auto core = core_of(comm, "ncclCommAbort");
  core->aborted.store(true);
  {
    auto& r = registry();
    std::lock_guard lock(r.mutex);
    ++r.aborts;
  }
  auto owned = remove_live(comm);
  core->helper.stop();
  return ncclSuccess;
}

ncclResult_t ncclGroupStart() {
  ++tls_group.depth;
  return ncclSuccess;
}

ncclResult_t ncclGroupEnd() {
  if (tls_group.depth == 0) return refuse(ncclInvalidUsage, "ncclGroupEnd without ncclGroupStart");
  return --tls_group.depth == 0 ? end_group() : ncclSuccess;
}

ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, ncclDataType_t type,
                           ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
  const std::size_t bytes = count * type_size(type);
  return issue("ncclAllReduce", comm, stream, {OpKind::kAllReduce, send, recv, count, type, op, 0},
               bytes, bytes);
}

ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, ncclDataType_t type,
                           int root, ncclComm_t comm, cudaStream_t stream) {
  const std::size_t bytes = count * type_size(type);
  const bool is_root = core_of(comm, "ncclBroadcast")->rank == root;
  return issue("ncclBroadcast", comm, stream,
               {OpKind::kBroadcast, send, recv, count, type, ncclSum, root}, is_root ? bytes : 0,
               bytes);
}

ncclResult_t ncclReduce(const void* send, void* recv, size_t count, ncclDataType_t type,
                        ncclRedOp_t op, int root, ncclComm_t comm, cudaStream_t stream) {
  const std::size_t bytes = count * type_size(type);
  const bool is_root = core_of(comm, "ncclReduce")->rank == root;
  return issue("ncclReduce", comm, stream, {OpKind::kReduce, send, recv, count, type, op, root},
               bytes, is_root ? bytes : 0);
}

ncclResult_t ncclAllGather(const void* send, void* recv, size_t count, ncclDataType_t type,
                           ncclComm_t comm, cudaStream_t stream) {
  const std::size_t bytes = count * type_size(type);
  const int ranks = core_of(comm, "ncclAllGather")->ranks;
  return issue("ncclAllGather", comm, stream,
               {OpKind::kAllGather, send, recv, count, type, ncclSum, 0}, bytes,
               bytes * static_cast<std::size_t>(ranks));
}

ncclResult_t ncclSend(const void* send, size_t count, ncclDataType_t type, int peer,
                      ncclComm_t comm, cudaStream_t stream) {
  return issue("ncclSend", comm, stream, {OpKind::kSend, send, nullptr, count, type, ncclSum, peer},
               count * type_size(type), 0);
}

ncclResult_t ncclRecv(void* recv, size_t count, ncclDataType_t type, int peer, ncclComm_t comm,
                      cudaStream_t stream) {
  return issue("ncclRecv", comm, stream, {OpKind::kRecv, nullptr, recv, count, type, ncclSum, peer},
               0, count * type_size(type));
}

}  // extern "C"
