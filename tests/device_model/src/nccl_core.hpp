#pragma once

// The NCCL model's communicator state and its collectives' entry point, shared by the API
// (nccl_model.cpp) and the collectives over MPI (nccl_ops.cpp).

#include <mpi.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace device_model::detail {

// One thread that runs a communicator's asynchronous steps (NCCL's own helper thread).
class Helper {
 public:
  Helper() : thread_([this] { run(); }) {}
  ~Helper() { stop(); }
  void post(std::function<void()> step) {
    std::lock_guard lock(mutex_);
    steps_.push_back(std::move(step));
    changed_.notify_all();
  }
  void stop() {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
      changed_.notify_all();
    }
    if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
  }

 private:
  void run() {
    std::unique_lock lock(mutex_);
    for (;;) {
      changed_.wait(lock, [&] { return stopping_ || !steps_.empty(); });
      if (steps_.empty()) return;
      auto step = std::move(steps_.front());
      steps_.pop_front();
      lock.unlock();
      step();
      lock.lock();
    }
  }
  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<std::function<void()>> steps_;
  bool stopping_ = false;
  std::thread thread_;
};

// A communicator's state, shared by its handle and the work queued on its stream (which may
// outlive the handle: ncclCommAbort frees the handle, not what its stream still runs).
struct Core {
  std::uint64_t id = 0;
  int ranks = 0;
  int rank = 0;
  int device = 0;
  bool blocking = true;
  int tag = 0;             // this communicator's MPI tag on MPI_COMM_WORLD (control: tag + 1)
  std::vector<int> world;  // rank -> MPI_COMM_WORLD rank
  std::uint64_t splits = 0;
  std::atomic<ncclResult_t> async{ncclInProgress};
  std::atomic<bool> aborted{false};
  std::atomic<int> outstanding{0};  // launches not finished on the stream
  std::mutex mutex;
  std::string last_error;
  Helper helper;

  void set_error(ncclResult_t result, const std::string& text) {
    std::lock_guard lock(mutex);
    last_error = text;
    async.store(result);
  }
};

enum class OpKind { kAllReduce, kBroadcast, kReduce, kAllGather, kSend, kRecv };

struct Op {
  OpKind kind;
  const void* send;
  void* recv;
  std::size_t count;
  ncclDataType_t type;
  ncclRedOp_t reduce;
  int peer;  // root or peer
};

// A fault the test asked for: the launch hangs until abort, reporting `first` after `second`.
using Injection = std::optional<std::pair<ncclResult_t, std::chrono::milliseconds>>;

// Waits for MPI requests, giving up (and cancelling them) when the communicator is aborted.
bool wait_all(std::vector<MPI_Request>& requests, const Core& core);

// What a stream runs for one launch: every op of the group, posted together.
void run_launch(const std::shared_ptr<Core>& core, const std::vector<Op>& ops, Injection injection);

}  // namespace device_model::detail
