#include "work_completion.hpp"

#include <ATen/core/ivalue.h>

#include <utility>

namespace unimsg::detail {

UnimsgWork::UnimsgWork(int rank, c10d::OpType type, std::vector<at::Tensor> outputs)
    : c10d::Work(rank, type),
      outputs_(std::move(outputs)),
      future_(
          c10::make_intrusive<c10::ivalue::Future>(c10::ListType::create(c10::TensorType::get()))) {
}

void UnimsgWork::complete(const std::exception_ptr& error) {
  try {
    if (error) {
      future_->setError(error);
    } else {
      future_->markCompleted(c10::IValue(outputs_));
    }
  } catch (...) {  // (a callback's error belongs to the future it returns, never here)
  }
  finish(error);
}

WorkCompletion::WorkCompletion(int rank, std::function<void(const TimeoutError&)> on_timeout)
    : rank_(rank), on_timeout_(std::move(on_timeout)) {}

std::shared_ptr<WorkCompletion> WorkCompletion::start(
    int rank, std::function<void(const TimeoutError&)> on_timeout) {
  auto completion = std::make_shared<WorkCompletion>(rank, std::move(on_timeout));
  completion->waiter_ = std::thread([self = completion] { self->wait_loop(); });
  return completion;
}

WorkCompletion::~WorkCompletion() {
  // Every thread has ended, or is the one dropping the last reference (its loop has returned).
  if (waiter_.joinable()) waiter_.detach();
  for (auto& runner : runners_) {
    if (runner.joinable()) runner.detach();
  }
}

void WorkCompletion::push(c10::intrusive_ptr<UnimsgWork> work, std::function<void()> wait) {
  {
    std::lock_guard lock(mutex_);
    if (stopping_) throw ShutdownError(rank_, "c10d", "the unimsg process group was shut down");
    entries_.push_back({std::move(work), std::move(wait)});
  }
  entries_ready_.notify_one();
}

bool WorkCompletion::stopped() const {
  std::lock_guard lock(mutex_);
  return stopping_;
}

void WorkCompletion::stop() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  entries_ready_.notify_one();
}

void WorkCompletion::join() {
  stop();
  const auto self = std::this_thread::get_id();
  if (waiter_.joinable() && waiter_.get_id() != self) waiter_.join();
  // (the waiter has ended: no runner is added any more)
  for (auto& runner : runners_) {
    if (runner.joinable() && runner.get_id() != self) runner.join();
  }
}

void WorkCompletion::wait_loop() {
  for (;;) {
    Entry entry;
    {
      std::unique_lock lock(mutex_);
      entries_ready_.wait(lock, [this] { return stopping_ || !entries_.empty(); });
      if (entries_.empty()) {  // stopping, and everything pushed is done
        waiter_finished_ = true;
        done_ready_.notify_all();
        return;
      }
      entry = std::move(entries_.front());
      entries_.pop_front();
    }
    std::exception_ptr error;
    try {
      entry.wait();
    } catch (const TimeoutError& timeout) {
      if (on_timeout_) on_timeout_(timeout);
      error = std::current_exception();
    } catch (...) {
      error = std::current_exception();
    }
    std::lock_guard lock(mutex_);
    done_.push_back({std::move(entry.work), error});
    if (done_.size() > idle_runners_) {
      runners_.emplace_back([self = shared_from_this()] { self->run_loop(); });
    } else {
      done_ready_.notify_one();
    }
  }
}

void WorkCompletion::run_loop() {
  std::unique_lock lock(mutex_);
  for (;;) {
    ++idle_runners_;
    done_ready_.wait(lock, [this] { return waiter_finished_ || !done_.empty(); });
    --idle_runners_;
    if (done_.empty()) return;  // the waiter has finished and nothing is left
    Done done = std::move(done_.front());
    done_.pop_front();
    lock.unlock();
    done.work->complete(done.error);
    done.work.reset();  // (its last reference may hold tensors: dropped without the lock)
    lock.lock();
  }
}

}  // namespace unimsg::detail
