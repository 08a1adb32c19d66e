#include "unimsg/torch/process_group.hpp"

#include <ATen/core/ivalue.h>
#include <fmt/format.h>

#include <array>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>

#include "unimsg/torch/ddp.hpp"

namespace unimsg {

namespace {

// c10d's allreduce carries no name, and the engine names every tensor. Calls take the names of a
// window that repeats: the same on every rank (calls come in the same order everywhere), so the
// engine matches them and checks dtype and shape across ranks; reused, so that a steady state
// (DDP's buckets, step after step, when their count divides the window) hits the engine's
// response cache instead of negotiating every call. 60 divides by 1-6, 10, 12, 15, 20 and 30.
constexpr std::size_t kNameWindow = 60;

class UnimsgWork final : public c10d::Work {
 public:
  UnimsgWork(int rank, c10d::OpType type, std::vector<at::Tensor> outputs)
      : c10d::Work(rank, type),
        outputs_(std::move(outputs)),
        future_(c10::make_intrusive<c10::ivalue::Future>(
            c10::ListType::create(c10::TensorType::get()))) {}

  std::vector<at::Tensor> result() override { return outputs_; }
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override { return future_; }

  // wait() returns first; then the future's callbacks run (on the completion thread).
  void complete(const std::exception_ptr& error) {
    finish(error);
    if (error) {
      future_->setError(error);
    } else {
      future_->markCompleted(c10::IValue(outputs_));
    }
  }

 private:
  std::vector<at::Tensor> outputs_;
  c10::intrusive_ptr<c10::ivalue::Future> future_;
};

void wait_within(Work& work, std::chrono::milliseconds timeout) {
  if (timeout == c10d::kUnsetTimeout) {
    work.wait();
  } else {
    work.wait(timeout);
  }
}

ReduceOp to_reduce_op(const c10d::ReduceOp& op, int rank, const char* operation) {
  switch (static_cast<c10d::ReduceOp::RedOpType>(op)) {
    case c10d::ReduceOp::SUM:
      return ReduceOp::kSum;
    case c10d::ReduceOp::AVG:
      return ReduceOp::kAvg;
    case c10d::ReduceOp::MIN:
      return ReduceOp::kMin;
    case c10d::ReduceOp::MAX:
      return ReduceOp::kMax;
    default:
      throw ConfigError(rank, operation,
                        "reduce op " + std::to_string(static_cast<int>(op)) +
                            " is not one unimsg reduces (SUM, AVG, MIN, MAX)");
  }
}

// A contiguous tensor with the data of `tensor` (itself when it already is contiguous).
at::Tensor dense(const at::Tensor& tensor) {
  return tensor.is_contiguous() ? tensor : tensor.contiguous();
}

void copy_back(at::Tensor& tensor, const at::Tensor& dense_copy) {
  if (!tensor.is_same(dense_copy)) tensor.copy_(dense_copy.view(tensor.sizes()));
}

}  // namespace

// Waits for the group's collectives one after another, in the order they were issued (the order
// every rank issues them in), and completes their c10d Work.
class ProcessGroupUnimsg::Completer {
 public:
  Completer(int rank, std::function<void(const TimeoutError&)> on_timeout)
      : rank_(rank), on_timeout_(std::move(on_timeout)), thread_([this] { run(); }) {}
  ~Completer() { stop(); }
  Completer(const Completer&) = delete;
  Completer& operator=(const Completer&) = delete;

  void push(c10::intrusive_ptr<UnimsgWork> work, std::function<void()> finish) {
    {
      std::lock_guard lock(mutex_);
      if (stopping_) throw ShutdownError(rank_, "c10d", "the unimsg process group was shut down");
      queue_.push_back({std::move(work), std::move(finish)});
    }
    ready_.notify_one();
  }

  void stop() {
    {
      std::lock_guard lock(mutex_);
      if (stopping_) return;
      stopping_ = true;
    }
    ready_.notify_one();
    if (thread_.joinable()) thread_.join();
  }

 private:
  struct Entry {
    c10::intrusive_ptr<UnimsgWork> work;
    std::function<void()> finish;
  };

  void run() {
    while (auto entry = next()) {
      std::exception_ptr error;
      try {
        entry->finish();
      } catch (const TimeoutError& timeout) {
        if (on_timeout_) on_timeout_(timeout);
        error = std::current_exception();
      } catch (...) {
        error = std::current_exception();
      }
      entry->work->complete(error);
    }
  }

  // The next collective; none once stopped (those still queued fail).
  std::optional<Entry> next() {
    std::unique_lock lock(mutex_);
    ready_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
    if (!stopping_) {
      Entry entry = std::move(queue_.front());
      queue_.pop_front();
      return entry;
    }
    auto abandoned = std::move(queue_);
    lock.unlock();
    for (auto& entry : abandoned) {
      entry.work->complete(std::make_exception_ptr(
          ShutdownError(rank_, "c10d", "the unimsg process group was shut down")));
    }
    return std::nullopt;
  }

  int rank_;
  std::function<void(const TimeoutError&)> on_timeout_;
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<Entry> queue_;
  bool stopping_ = false;
  std::thread thread_;  // last: starts once the members it uses exist
};

ProcessGroupUnimsg::ProcessGroupUnimsg(Communicator& communicator, Engine& engine,
                                       ProcessGroupOptions options, std::shared_ptr<void> owner)
    : C10dBackendBase(communicator.rank(), communicator.size()),
      communicator_(communicator),
      engine_(engine),
      options_(std::move(options)),
      owner_(std::move(owner)),
      name_users_(kNameWindow),
      completer_(std::make_unique<Completer>(communicator.rank(), options_.on_timeout)) {}

ProcessGroupUnimsg::~ProcessGroupUnimsg() {
  shutdown();
}

void ProcessGroupUnimsg::shutdown() {
  completer_->stop();
}

c10::intrusive_ptr<c10d::Work> ProcessGroupUnimsg::enqueue(c10d::OpType type,
                                                           std::vector<at::Tensor> outputs,
                                                           std::function<void()> finish) {
  auto work = c10::make_intrusive<UnimsgWork>(getRank(), type, std::move(outputs));
  completer_->push(work, std::move(finish));
  return work;
}

namespace {

// The engine's dtype code of a tensor, -1 when the collectives do not reduce it.
std::int64_t dtype_code(const at::Tensor& tensor) {
  switch (tensor.scalar_type()) {
    case at::kFloat:
    case at::kDouble:
    case at::kHalf:
    case at::kBFloat16:
    case at::kInt:
    case at::kLong:
    case at::kByte:
      return static_cast<std::int64_t>(tensor.scalar_type());
    default:
      return -1;
  }
}

std::string unsupported_dtype(const at::Tensor& tensor) {
  return std::string("dtype ") + c10::toString(tensor.scalar_type()) +
         " is not one unimsg reduces (float32/64, float16, bfloat16, int32/64, uint8)";
}

void require(bool condition, int rank, const char* operation, const std::string& cause) {
  if (!condition) throw ConfigError(rank, std::string("c10d.") + operation, cause);
}

TensorView view_of(const at::Tensor& tensor, int rank, const char* operation) {
  require(tensor.device().is_cpu(), rank, operation,
          "only CPU tensors (got " + tensor.device().str() + ")");
  require(dtype_code(tensor) >= 0, rank, operation, unsupported_dtype(tensor));
  return to_view(tensor);
}

}  // namespace

namespace {

// What a rank passed to a collective, as every rank compares it.
struct CallShape {
  std::int64_t valid = 1;  // 0: this rank's arguments were wrong (its own error says how)
  std::int64_t dtype = 0;
  std::int64_t count = 0;
  std::int64_t root = 0;
  std::string describe() const {
    if (valid == 0) return "arguments it rejected";
    return fmt::format("{} elements of {}, root {}", count,
                       c10::toString(static_cast<c10::ScalarType>(dtype)), root);
  }
};

}  // namespace

void ProcessGroupUnimsg::check_same_on_every_rank(const char* operation, const at::Tensor& tensor,
                                                  std::int64_t count, std::int64_t root,
                                                  std::string problem) {
  const auto dtype = dtype_code(tensor);
  if (problem.empty() && dtype < 0) problem = unsupported_dtype(tensor);
  // A rank whose arguments are wrong still takes part, so that the others fail with it instead
  // of waiting for it.
  const CallShape mine{problem.empty() ? 1 : 0, dtype, count, root};
  std::array<std::int64_t, 4> packed{mine.valid, mine.dtype, mine.count, mine.root};
  std::vector<std::int64_t> all(packed.size() * static_cast<std::size_t>(getSize()));
  communicator_
      .allgather(TensorView{packed.data(), packed.size(), DType::kI64, Device::kHost},
                 TensorView{all.data(), all.size(), DType::kI64, Device::kHost},
                 {"c10d.check_shapes"})
      .wait();
  const std::string where = std::string("c10d.") + operation;
  if (!problem.empty()) throw ConfigError(getRank(), where, problem);
  const auto shape_of = [&](int rank) {
    const auto* p = all.data() + static_cast<std::size_t>(rank) * packed.size();
    return CallShape{p[0], p[1], p[2], p[3]};
  };
  std::vector<int> differing;
  for (int rank = 0; rank < getSize(); ++rank) {
    const auto shape = shape_of(rank);
    if (shape.valid != mine.valid || shape.dtype != mine.dtype || shape.count != mine.count ||
        shape.root != mine.root) {
      differing.push_back(rank);
    }
  }
  if (differing.empty()) return;
  throw MismatchError(
      getRank(), where,
      fmt::format("rank(s) {} passed {} where rank {} passed {}", fmt::join(differing, ", "),
                  shape_of(differing.front()).describe(), getRank(), mine.describe()));
}

void ProcessGroupUnimsg::wait_for_name(std::size_t slot) {
  auto& previous = name_users_[slot];
  if (!previous || previous->isCompleted()) return;
  try {
    previous->wait();  // its error belongs to its own caller
  } catch (...) {
  }
}

c10::intrusive_ptr<c10d::Work> ProcessGroupUnimsg::allreduce(
    std::vector<at::Tensor>& tensors, const c10d::AllreduceOptions& options) {
  const int rank = getRank();
  require(!tensors.empty(), rank, "allreduce", "no tensor");
  const ReduceOp op = to_reduce_op(options.reduceOp, rank, "c10d.allreduce");
  std::vector<at::Tensor> staged;
  std::vector<std::pair<std::string, TensorView>> group;
  // (c10d allows calls from several threads; the names must follow one order.)
  std::lock_guard lock(allreduce_mutex_);
  const std::size_t slot = allreduce_calls_++ % kNameWindow;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    staged.push_back(dense(tensors[i]));
    group.emplace_back(fmt::format("{}.allreduce.{}.{}", options_.name_prefix, slot, i),
                       view_of(staged.back(), rank, "allreduce"));
  }
  wait_for_name(slot);
  Work work = group.size() == 1 ? engine_.submit(group[0].first, group[0].second, op)
                                : engine_.submit_group(std::move(group), op);
  auto result = enqueue(c10d::OpType::ALLREDUCE, tensors,
                        [work, tensors, staged, timeout = options.timeout]() mutable {
                          wait_within(work, timeout);
                          for (std::size_t i = 0; i < tensors.size(); ++i) {
                            copy_back(tensors[i], staged[i]);
                          }
                        });
  name_users_[slot] = result;
  return result;
}

c10::intrusive_ptr<c10d::Work> ProcessGroupUnimsg::allreduce_coalesced(
    std::vector<at::Tensor>& tensors, const c10d::AllreduceCoalescedOptions& options) {
  return allreduce(tensors, options);
}

c10::intrusive_ptr<c10d::Work> ProcessGroupUnimsg::allreduce_compressed(
    at::Tensor& tensor, const std::string& name, const CompressionSpec& compression) {
  const int rank = getRank();
  require(tensor.scalar_type() == at::kFloat && tensor.is_contiguous(), rank,
          "allreduce_compressed", "compression takes contiguous float32 tensors");
  Work work = engine_.submit(name, view_of(tensor, rank, "allreduce_compressed"), ReduceOp::kAvg,
                             compression);
  return enqueue(c10d::OpType::ALLREDUCE, {tensor}, [work]() mutable { work.wait(); });
}

c10::intrusive_ptr<c10d::Work> ProcessGroupUnimsg::broadcast(
    std::vector<at::Tensor>& tensors, const c10d::BroadcastOptions& options) {
  const int rank = getRank();
  require(tensors.size() == 1, rank, "broadcast", "one tensor per call");
  require(options.rootRank >= 0 && options.rootRank < getSize(), rank, "broadcast",
          "root " + std::to_string(options.rootRank) + " is not a rank of this group");
  auto& tensor = tensors[0];
  check_same_on_every_rank("broadcast", tensor, tensor.numel(), options.rootRank);
  auto staged = dense(tensor);
  Work work = communicator_.broadcast(view_of(staged, rank, "broadcast"),
                                      {static_cast<int>(options.rootRank), "c10d.broadcast"});
  return enqueue(c10d::OpType::BROADCAST, tensors,
                 [work, tensor, staged, timeout = options.timeout]() mutable {
                   wait_within(work, timeout);
                   copy_back(tensor, staged);
                 });
}

c10::intrusive_ptr<c10d::Work> ProcessGroupUnimsg::_allgather_base(
    at::Tensor& output, at::Tensor& input, const c10d::AllgatherOptions& options) {
  const int rank = getRank();
  const bool fits =
      output.numel() == input.numel() * getSize() && output.scalar_type() == input.scalar_type();
  check_same_on_every_rank("allgather", input, input.numel(), 0,
                           fits ? "" : "the output holds world size x the input's elements");
  auto staged_input = dense(input);
  auto staged_output = dense(output);
  Work work =
      communicator_.allgather(view_of(staged_input, rank, "allgather"),
                              view_of(staged_output, rank, "allgather"), {"c10d.allgather"});
  return enqueue(c10d::OpType::_ALLGATHER_BASE, {output},
                 [work, output, staged_input, staged_output, timeout = options.timeout]() mutable {
                   wait_within(work, timeout);
                   copy_back(output, staged_output);
                 });
}

c10::intrusive_ptr<c10d::Work> ProcessGroupUnimsg::allgather(
    std::vector<std::vector<at::Tensor>>& outputs, std::vector<at::Tensor>& inputs,
    const c10d::AllgatherOptions& options) {
  const int rank = getRank();
  require(inputs.size() == 1 && outputs.size() == 1, rank, "allgather", "one tensor per call");
  auto& input = inputs[0];
  auto targets = outputs[0];
  bool fits = targets.size() == static_cast<std::size_t>(getSize());
  for (const auto& target : targets) {
    fits = fits && target.numel() == input.numel() && target.scalar_type() == input.scalar_type();
  }
  check_same_on_every_rank("allgather", input, input.numel(), 0,
                           fits ? "" : "the output list holds world size tensors like the input");
  auto staged_input = dense(input);
  auto gathered = at::empty({input.numel() * getSize()}, input.options());
  Work work = communicator_.allgather(view_of(staged_input, rank, "allgather"),
                                      view_of(gathered, rank, "allgather"), {"c10d.allgather"});
  const auto count = input.numel();
  return enqueue(
      c10d::OpType::ALLGATHER, targets,
      [work, targets, staged_input, gathered, count, timeout = options.timeout]() mutable {
        wait_within(work, timeout);
        for (std::size_t r = 0; r < targets.size(); ++r) {
          targets[r].copy_(gathered.narrow(0, static_cast<std::int64_t>(r) * count, count)
                               .view(targets[r].sizes()));
        }
      });
}

c10::intrusive_ptr<c10d::Work> ProcessGroupUnimsg::_reduce_scatter_base(
    at::Tensor& output, at::Tensor& input, const c10d::ReduceScatterOptions& options) {
  const int rank = getRank();
  const ReduceOp op = to_reduce_op(options.reduceOp, rank, "c10d.reduce_scatter");
  const bool fits =
      input.numel() == output.numel() * getSize() && output.scalar_type() == input.scalar_type();
  check_same_on_every_rank("reduce_scatter", input, output.numel(), 0,
                           fits ? "" : "the input holds world size x the output's elements");
  auto staged_input = dense(input);
  auto staged_output = dense(output);
  Work work = communicator_.reduce_scatter(view_of(staged_input, rank, "reduce_scatter"),
                                           view_of(staged_output, rank, "reduce_scatter"),
                                           {op, "c10d.reduce_scatter"});
  return enqueue(c10d::OpType::_REDUCE_SCATTER_BASE, {output},
                 [work, output, staged_input, staged_output, timeout = options.timeout]() mutable {
                   wait_within(work, timeout);
                   copy_back(output, staged_output);
                 });
}

c10::intrusive_ptr<c10d::Work> ProcessGroupUnimsg::reduce_scatter(
    std::vector<at::Tensor>& outputs, std::vector<std::vector<at::Tensor>>& inputs,
    const c10d::ReduceScatterOptions& options) {
  const int rank = getRank();
  require(inputs.size() == 1 && outputs.size() == 1, rank, "reduce_scatter", "one tensor per call");
  bool fits = inputs[0].size() == static_cast<std::size_t>(getSize());
  for (const auto& part : inputs[0]) {
    fits = fits && part.numel() == outputs[0].numel() &&
           part.scalar_type() == outputs[0].scalar_type();
  }
  if (!fits) {  // (throws on every rank)
    check_same_on_every_rank("reduce_scatter", outputs[0], outputs[0].numel(), 0,
                             "the input list holds world size tensors like the output");
  }
  std::vector<at::Tensor> flat_parts;
  for (const auto& part : inputs[0]) flat_parts.push_back(part.reshape({-1}));
  auto input = at::cat(flat_parts);
  return _reduce_scatter_base(outputs[0], input, options);
}

c10::intrusive_ptr<c10d::Work> ProcessGroupUnimsg::alltoall_base(
    at::Tensor& output, at::Tensor& input, std::vector<std::int64_t>& output_splits,
    std::vector<std::int64_t>& input_splits, const c10d::AllToAllOptions& options) {
  const int rank = getRank();
  const auto equal = [&](const std::vector<std::int64_t>& splits, const at::Tensor& tensor) {
    if (splits.empty()) return true;
    if (splits.size() != static_cast<std::size_t>(getSize()) || tensor.dim() == 0) return false;
    for (auto split : splits) {
      if (split * getSize() != tensor.size(0)) return false;
    }
    return true;
  };
  require(equal(input_splits, input) && equal(output_splits, output), rank, "alltoall",
          "unequal splits are not supported (every rank sends and receives equal blocks)");
  const bool fits = input.numel() % getSize() == 0 && output.numel() == input.numel() &&
                    output.scalar_type() == input.scalar_type();
  check_same_on_every_rank("alltoall", input, input.numel(), 0,
                           fits ? "" : "input and output hold world size equal blocks");
  auto staged_input = dense(input);
  auto staged_output = dense(output);
  Work work = communicator_.alltoall(view_of(staged_input, rank, "alltoall"),
                                     view_of(staged_output, rank, "alltoall"), {"c10d.alltoall"});
  return enqueue(c10d::OpType::ALLTOALL_BASE, {output},
                 [work, output, staged_input, staged_output, timeout = options.timeout]() mutable {
                   wait_within(work, timeout);
                   copy_back(output, staged_output);
                 });
}

c10::intrusive_ptr<c10d::Work> ProcessGroupUnimsg::alltoall(std::vector<at::Tensor>& outputs,
                                                            std::vector<at::Tensor>& inputs,
                                                            const c10d::AllToAllOptions& options) {
  const auto size = static_cast<std::size_t>(getSize());
  bool fits = inputs.size() == size && outputs.size() == size;
  for (std::size_t r = 0; fits && r < size; ++r) {
    fits = inputs[r].numel() == inputs[0].numel() && outputs[r].numel() == inputs[0].numel() &&
           inputs[r].scalar_type() == inputs[0].scalar_type() &&
           outputs[r].scalar_type() == inputs[0].scalar_type();
  }
  if (!fits) {  // (throws on every rank)
    check_same_on_every_rank("alltoall", inputs.empty() ? at::Tensor() : inputs[0], 0, 0,
                             "world size input and output tensors of equal length");
  }
  std::vector<at::Tensor> flat_parts;
  for (const auto& part : inputs) flat_parts.push_back(part.reshape({-1}));
  auto input = at::cat(flat_parts);
  auto output = at::empty_like(input);
  std::vector<std::int64_t> no_splits;
  auto inner = alltoall_base(output, input, no_splits, no_splits, options);
  const auto count = inputs[0].numel();
  // The blocks go to the caller's tensors once the exchange is done (on the completion thread,
  // which reaches this entry after the exchange's).
  return enqueue(c10d::OpType::ALLTOALL, outputs, [inner, outputs, output, count]() mutable {
    inner->wait();
    for (std::size_t r = 0; r < outputs.size(); ++r) {
      outputs[r].copy_(
          output.narrow(0, static_cast<std::int64_t>(r) * count, count).view(outputs[r].sizes()));
    }
  });
}

c10::intrusive_ptr<c10d::Work> ProcessGroupUnimsg::barrier(const c10d::BarrierOptions& options) {
  Work work = communicator_.barrier({"c10d.barrier"});
  return enqueue(c10d::OpType::BARRIER, {},
                 [work, timeout = options.timeout]() mutable { wait_within(work, timeout); });
}

}  // namespace unimsg
