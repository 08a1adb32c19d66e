#pragma once

// How the process group's c10d Work and futures complete (process_group.cpp). One waiter thread
// waits for the group's collectives in the order they were issued (every rank issues them in
// the same order, and waiting on one MPI request progresses the others); each completion then
// goes to a runner thread, which marks the Work's future (running its callbacks: DDP's averaging,
// a hook's next step) and then the Work itself. Callbacks may wait for other collectives of the
// group (torch's PowerSGD hook does): a completion that finds every runner busy starts another
// runner, so a callback never waits for a completion that only its own thread could make.
//
// The threads own the object with the group (shared): a group released while collectives are
// pending (torch drops it holding Python's GIL, which the callbacks need) stops taking calls and
// lets its threads finish what was pushed on their own; join() waits for them.

#include <torch/csrc/distributed/c10d/Work.hpp>

#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "unimsg/core/error.hpp"

namespace unimsg::detail {

class UnimsgWork final : public c10d::Work {
 public:
  UnimsgWork(int rank, c10d::OpType type, std::vector<at::Tensor> outputs);

  std::vector<at::Tensor> result() override { return outputs_; }
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override { return future_; }
  // The future first (its callbacks run here), then the Work: whoever wait()ed for the Work
  // finds its future complete too, as with Gloo.
  void complete(const std::exception_ptr& error);

 private:
  std::vector<at::Tensor> outputs_;
  c10::intrusive_ptr<c10::ivalue::Future> future_;
};

class WorkCompletion : public std::enable_shared_from_this<WorkCompletion> {
 public:
  static std::shared_ptr<WorkCompletion> start(int rank,
                                               std::function<void(const TimeoutError&)> on_timeout);
  // (through start(), which starts the threads)
  WorkCompletion(int rank, std::function<void(const TimeoutError&)> on_timeout);
  ~WorkCompletion();
  WorkCompletion(const WorkCompletion&) = delete;
  WorkCompletion& operator=(const WorkCompletion&) = delete;

  // `wait` blocks until the collective is done (throws its error); it runs on the waiter thread.
  // ShutdownError once stopped.
  void push(c10::intrusive_ptr<UnimsgWork> work, std::function<void()> wait);
  bool stopped() const;
  // No more pushes: the threads complete every collective already pushed, then end.
  void stop();
  // stop(), then waits until the threads have ended (not from one of them).
  void join();

 private:
  struct Entry {
    c10::intrusive_ptr<UnimsgWork> work;
    std::function<void()> wait;
  };
  struct Done {
    c10::intrusive_ptr<UnimsgWork> work;
    std::exception_ptr error;
  };
  void wait_loop();
  void run_loop();

  int rank_;
  std::function<void(const TimeoutError&)> on_timeout_;
  mutable std::mutex mutex_;
  std::condition_variable entries_ready_;
  std::condition_variable done_ready_;
  std::deque<Entry> entries_;
  std::deque<Done> done_;
  std::size_t idle_runners_ = 0;
  bool stopping_ = false;
  bool waiter_finished_ = false;
  std::vector<std::thread> runners_;
  std::thread waiter_;
};

}  // namespace unimsg::detail
