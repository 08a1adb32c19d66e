#include "unimsg/torch/process_group.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <future>
#include <optional>
#include <utility>

#include "unimsg/torch/ddp.hpp"
#include "work_completion.hpp"

namespace unimsg {

using detail::UnimsgWork;

namespace {

// c10d's allreduce carries no name, and the engine names every tensor. Calls take the names of a
// window that repeats: the same on every rank (calls come in the same order everywhere), so the
// engine matches them and checks dtype and shape across ranks; reused, so that a steady state
// (DDP's buckets, step after step, when their count divides the window) hits the engine's
// response cache instead of negotiating every call. 60 divides by 1-6, 10, 12, 15, 20 and 30.
constexpr std::size_t kNameWindow = 60;

// "No limit" as a duration the waits can add to the clock.
constexpr std::chrono::nanoseconds kNoLimit = std::chrono::hours(24 * 365 * 10);

void wait_within(Work& work, std::chrono::milliseconds timeout) {
  work.wait(timeout.count() > 0 ? std::chrono::nanoseconds(timeout) : kNoLimit);
}

const char* reduce_op_name(c10d::ReduceOp::RedOpType op) {
  switch (op) {
    case c10d::ReduceOp::PRODUCT:
      return "PRODUCT";
    case c10d::ReduceOp::BAND:
      return "BAND";
    case c10d::ReduceOp::BOR:
      return "BOR";
    case c10d::ReduceOp::BXOR:
      return "BXOR";
    case c10d::ReduceOp::PREMUL_SUM:
      return "PREMUL_SUM";
    default:
      return "an unknown op";
  }
}

// The engine's reduction, or what is wrong with `op`.
std::optional<ReduceOp> to_reduce_op(const c10d::ReduceOp& op, std::string& problem) {
  const auto type = static_cast<c10d::ReduceOp::RedOpType>(op);
  switch (type) {
    case c10d::ReduceOp::SUM:
      return ReduceOp::kSum;
    case c10d::ReduceOp::AVG:
      return ReduceOp::kAvg;
    case c10d::ReduceOp::MIN:
      return ReduceOp::kMin;
    case c10d::ReduceOp::MAX:
      return ReduceOp::kMax;
    default:
      problem = std::string("reduce op ") + reduce_op_name(type) +
                " is not one unimsg reduces (SUM, AVG, MIN, MAX)";
      return std::nullopt;
  }
}

// The engine's dtype code of a tensor, -1 when the collectives do not reduce it.
std::int64_t dtype_code(const at::Tensor& tensor) {
  if (!tensor.defined()) return -1;
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

// What keeps `tensor` from going to the collectives, or "".
std::string tensor_problem(const at::Tensor& tensor) {
  if (!tensor.defined()) return "no tensor";
  if (!tensor.device().is_cpu()) return "only CPU tensors (got " + tensor.device().str() + ")";
  if (dtype_code(tensor) < 0) {
    return std::string("dtype ") + c10::toString(tensor.scalar_type()) +
           " is not one unimsg reduces (float32/64, float16, bfloat16, int32/64, uint8)";
  }
  return {};
}

// A contiguous tensor with the data of `tensor` (itself when it already is contiguous).
at::Tensor dense(const at::Tensor& tensor) {
  return tensor.is_contiguous() ? tensor : tensor.contiguous();
}

void copy_back(at::Tensor& tensor, const at::Tensor& dense_copy) {
  if (!tensor.is_same(dense_copy)) tensor.copy_(dense_copy.view(tensor.sizes()));
}

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

ProcessGroupUnimsg::ProcessGroupUnimsg(Communicator& communicator, Engine& engine,
                                       ProcessGroupOptions options, std::shared_ptr<void> owner)
    : C10dBackendBase(communicator.rank(), communicator.size()),
      communicator_(communicator),
      engine_(engine),
      options_(std::move(options)),
      owner_(std::move(owner)),
      name_users_(kNameWindow),
      completion_(detail::WorkCompletion::start(communicator.rank(), options_.on_timeout)) {}

ProcessGroupUnimsg::~ProcessGroupUnimsg() {
  completion_->stop();
}

void ProcessGroupUnimsg::shutdown() {
  completion_->join();
}

std::function<void()> ProcessGroupUnimsg::joiner() const {
  return [completion = completion_] { completion->join(); };
}

void ProcessGroupUnimsg::release_resources() {
  completion_->stop();
}

void ProcessGroupUnimsg::ensure_running() const {
  if (completion_->stopped()) {
    throw ShutdownError(getRank(), "c10d", "the unimsg process group was shut down");
  }
}

std::chrono::milliseconds ProcessGroupUnimsg::timeout_of(
    std::chrono::milliseconds requested) const {
  return requested == c10d::kUnsetTimeout ? options_.timeout : requested;
}

c10::intrusive_ptr<c10d::Work> ProcessGroupUnimsg::enqueue(c10d::OpType type,
                                                           std::vector<at::Tensor> outputs,
                                                           std::function<void()> wait) {
  auto work = c10::make_intrusive<UnimsgWork>(getRank(), type, std::move(outputs));
  completion_->push(work, std::move(wait));
  return work;
}

void ProcessGroupUnimsg::check_same_on_every_rank(const char* operation, const at::Tensor& tensor,
                                                  std::int64_t count, std::int64_t root,
                                                  std::string problem) {
  ensure_running();
  if (problem.empty()) problem = tensor_problem(tensor);
  const CallShape mine{problem.empty() ? 1 : 0, dtype_code(tensor), count, root};
  // (shared: if the allgather times out, MPI may still write into them after this returns)
  auto packed = std::make_shared<std::vector<std::int64_t>>(
      std::vector<std::int64_t>{mine.valid, mine.dtype, mine.count, mine.root});
  auto all = std::make_shared<std::vector<std::int64_t>>(packed->size() *
                                                         static_cast<std::size_t>(getSize()));
  const std::string where = std::string("c10d.") + operation;
  Work gather = communicator_.allgather(
      TensorView{packed->data(), packed->size(), DType::kI64, Device::kHost},
      TensorView{all->data(), all->size(), DType::kI64, Device::kHost}, {where});
  try {
    wait_within(gather, options_.timeout);
  } catch (const TimeoutError& timeout) {
    abandoned_.push_back(packed);
    abandoned_.push_back(all);
    if (options_.on_timeout) options_.on_timeout(timeout);
    throw;
  }
  if (!problem.empty()) throw ConfigError(getRank(), where, problem);
  const auto shape_of = [&](int rank) {
    const auto* p = all->data() + static_cast<std::size_t>(rank) * packed->size();
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
  // Until the engine is done with the previous tensor of that name: the waiter thread says so
  // before any callback runs (a callback may itself be issuing an allreduce, waiting for this
  // call's lock).
  auto& previous = name_users_[slot];
  if (previous.valid()) previous.wait();
}

c10::intrusive_ptr<c10d::Work> ProcessGroupUnimsg::reduce_through_engine(
    std::vector<at::Tensor>& tensors, const c10d::AllreduceOptions& options, std::string problem) {
  ensure_running();
  const int rank = getRank();
  if (problem.empty() && tensors.empty()) problem = "no tensor";
  const auto op = to_reduce_op(options.reduceOp, problem);
  for (const auto& tensor : tensors) {
    if (problem.empty()) problem = tensor_problem(tensor);
  }
  // (c10d allows calls from several threads; the names must follow one order.)
  std::lock_guard lock(allreduce_mutex_);
  const std::size_t slot = allreduce_calls_++ % kNameWindow;
  std::vector<std::pair<std::string, TensorView>> group;
  std::vector<at::Tensor> staged;
  const std::size_t names = problem.empty() ? tensors.size() : 1;
  for (std::size_t i = 0; i < names; ++i) {
    const auto name = fmt::format("{}.allreduce.{}.{}", options_.name_prefix, slot, i);
    if (!problem.empty()) {
      // This rank takes part with nothing under the same names, so that the engine fails the
      // others' tensors naming this rank, instead of leaving them waiting for it.
      group.emplace_back(name, TensorView{&placeholder_, 0, DType::kU8, Device::kHost});
      continue;
    }
    staged.push_back(dense(tensors[i]));
    group.emplace_back(name, to_view(staged.back()));
  }
  wait_for_name(slot);
  const auto timeout = timeout_of(options.timeout);
  Work work = engine_.submit_group(std::move(group), op.value_or(ReduceOp::kSum));
  if (!problem.empty()) {
    try {
      wait_within(work, timeout);
    } catch (...) {
    }
    throw ConfigError(rank, "c10d.allreduce", problem);
  }
  auto name_free = std::make_shared<std::promise<void>>();
  name_users_[slot] = name_free->get_future().share();
  return enqueue(c10d::OpType::ALLREDUCE, tensors,
                 [work, tensors, staged, timeout, name_free]() mutable {
                   struct FreeName {  // (also when the wait throws)
                     std::promise<void>& promise;
                     ~FreeName() { promise.set_value(); }
                   } free_name{*name_free};
                   wait_within(work, timeout);
                   for (std::size_t i = 0; i < tensors.size(); ++i) {
                     copy_back(tensors[i], staged[i]);
                   }
                 });
}

c10::intrusive_ptr<c10d::Work> ProcessGroupUnimsg::allreduce(
    std::vector<at::Tensor>& tensors, const c10d::AllreduceOptions& options) {
  // (c10d's list is one tensor per device, reduced across the list too: one CPU tensor here)
  return reduce_through_engine(
      tensors, options,
      tensors.size() > 1 ? "one tensor per call (all_reduce_coalesced takes several)" : "");
}

c10::intrusive_ptr<c10d::Work> ProcessGroupUnimsg::allreduce_coalesced(
    std::vector<at::Tensor>& tensors, const c10d::AllreduceCoalescedOptions& options) {
  return reduce_through_engine(tensors, options);
}

c10::intrusive_ptr<c10d::Work> ProcessGroupUnimsg::allreduce_compressed(
    at::Tensor& tensor, const std::string& name, const CompressionSpec& compression) {
  ensure_running();
  const int rank = getRank();
  if (!tensor.device().is_cpu() || tensor.scalar_type() != at::kFloat || !tensor.is_contiguous()) {
    throw ConfigError(rank, "c10d.allreduce_compressed",
                      "compression takes contiguous float32 CPU tensors");
  }
  Work work = engine_.submit(name, to_view(tensor), ReduceOp::kAvg, compression);
  return enqueue(c10d::OpType::ALLREDUCE, {tensor},
                 [work, timeout = options_.timeout]() mutable { wait_within(work, timeout); });
}

c10::intrusive_ptr<c10d::Work> ProcessGroupUnimsg::broadcast(
    std::vector<at::Tensor>& tensors, const c10d::BroadcastOptions& options) {
  std::string problem;
  if (tensors.size() != 1) problem = "one tensor per call";
  if (options.rootRank < 0 || options.rootRank >= getSize()) {
    problem = "root " + std::to_string(options.rootRank) + " is not a rank of this group";
  }
  at::Tensor tensor = tensors.empty() ? at::Tensor() : tensors[0];
  check_same_on_every_rank("broadcast", tensor, tensor.defined() ? tensor.numel() : 0,
                           options.rootRank, problem);
  auto staged = dense(tensor);
  Work work = communicator_.broadcast(to_view(staged),
                                      {static_cast<int>(options.rootRank), "c10d.broadcast"});
  return enqueue(c10d::OpType::BROADCAST, tensors,
                 [work, tensor, staged, timeout = timeout_of(options.timeout)]() mutable {
                   wait_within(work, timeout);
                   copy_back(tensor, staged);
                 });
}

c10::intrusive_ptr<c10d::Work> ProcessGroupUnimsg::input_to_output(
    c10d::OpType type, const at::Tensor& input, at::Tensor& output,
    std::chrono::milliseconds requested_timeout,
    const std::function<Work(TensorView, TensorView)>& issue) {
  auto staged_input = dense(input);
  auto staged_output = dense(output);
  Work work = issue(to_view(staged_input), to_view(staged_output));
  return enqueue(type, {output},
                 [work, output, staged_input, staged_output,
                  timeout = timeout_of(requested_timeout)]() mutable {
                   wait_within(work, timeout);
                   copy_back(output, staged_output);
                 });
}

c10::intrusive_ptr<c10d::Work> ProcessGroupUnimsg::_allgather_base(
    at::Tensor& output, at::Tensor& input, const c10d::AllgatherOptions& options) {
  std::string problem = tensor_problem(output);
  if (problem.empty() && (output.numel() != input.numel() * getSize() ||
                          output.scalar_type() != input.scalar_type())) {
    problem = "the output holds world size x the input's elements";
  }
  check_same_on_every_rank("allgather", input, input.defined() ? input.numel() : 0, 0, problem);
  return input_to_output(c10d::OpType::_ALLGATHER_BASE, input, output, options.timeout,
                         [this](TensorView send, TensorView recv) {
                           return communicator_.allgather(send, recv, {"c10d.allgather"});
                         });
}

c10::intrusive_ptr<c10d::Work> ProcessGroupUnimsg::allgather(
    std::vector<std::vector<at::Tensor>>& outputs, std::vector<at::Tensor>& inputs,
    const c10d::AllgatherOptions& options) {
  std::string problem;
  const at::Tensor input = inputs.size() == 1 ? inputs[0] : at::Tensor();
  std::vector<at::Tensor> targets = outputs.size() == 1 ? outputs[0] : std::vector<at::Tensor>();
  if (inputs.size() != 1 || outputs.size() != 1) problem = "one tensor per call";
  bool fits = targets.size() == static_cast<std::size_t>(getSize());
  for (const auto& target : targets) {
    fits = fits && tensor_problem(target).empty() && target.numel() == input.numel() &&
           target.scalar_type() == input.scalar_type();
  }
  if (problem.empty() && !fits) problem = "the output list holds world size tensors like the input";
  check_same_on_every_rank("allgather", input, input.defined() ? input.numel() : 0, 0, problem);
  auto staged_input = dense(input);
  auto gathered = at::empty({input.numel() * getSize()}, input.options());
  Work work = communicator_.allgather(to_view(staged_input), to_view(gathered), {"c10d.allgather"});
  const auto count = input.numel();
  return enqueue(
      c10d::OpType::ALLGATHER, targets,
      [work, targets, staged_input, gathered, count,
       timeout = timeout_of(options.timeout)]() mutable {
        wait_within(work, timeout);
        for (std::size_t r = 0; r < targets.size(); ++r) {
          targets[r].copy_(gathered.narrow(0, static_cast<std::int64_t>(r) * count, count)
                               .view(targets[r].sizes()));
        }
      });
}

c10::intrusive_ptr<c10d::Work> ProcessGroupUnimsg::_reduce_scatter_base(
    at::Tensor& output, at::Tensor& input, const c10d::ReduceScatterOptions& options) {
  std::string problem = tensor_problem(output);
  const auto op = to_reduce_op(options.reduceOp, problem);
  if (problem.empty() && (input.numel() != output.numel() * getSize() ||
                          output.scalar_type() != input.scalar_type())) {
    problem = "the input holds world size x the output's elements";
  }
  check_same_on_every_rank("reduce_scatter", input, output.defined() ? output.numel() : 0, 0,
                           problem);
  return input_to_output(
      c10d::OpType::_REDUCE_SCATTER_BASE, input, output, options.timeout,
      [this, op = *op](TensorView send, TensorView recv) {
        return communicator_.reduce_scatter(send, recv, {op, "c10d.reduce_scatter"});
      });
}

c10::intrusive_ptr<c10d::Work> ProcessGroupUnimsg::reduce_scatter(
    std::vector<at::Tensor>& outputs, std::vector<std::vector<at::Tensor>>& inputs,
    const c10d::ReduceScatterOptions& options) {
  bool fits = inputs.size() == 1 && outputs.size() == 1 &&
              inputs[0].size() == static_cast<std::size_t>(getSize());
  for (std::size_t r = 0; fits && r < inputs[0].size(); ++r) {
    const auto& part = inputs[0][r];
    fits = tensor_problem(part).empty() && part.numel() == outputs[0].numel() &&
           part.scalar_type() == outputs[0].scalar_type();
  }
  if (!fits) {  // (throws on every rank)
    check_same_on_every_rank("reduce_scatter", at::Tensor(), 0, 0,
                             "one output and world size inputs like it");
  }
  std::vector<at::Tensor> flat_parts;
  for (const auto& part : inputs[0]) flat_parts.push_back(part.reshape({-1}));
  auto input = at::cat(flat_parts);
  return _reduce_scatter_base(outputs[0], input, options);
}

c10::intrusive_ptr<c10d::Work> ProcessGroupUnimsg::alltoall_base(
    at::Tensor& output, at::Tensor& input, std::vector<std::int64_t>& output_splits,
    std::vector<std::int64_t>& input_splits, const c10d::AllToAllOptions& options) {
  const auto equal = [&](const std::vector<std::int64_t>& splits, const at::Tensor& tensor) {
    if (splits.empty()) return true;
    if (splits.size() != static_cast<std::size_t>(getSize()) || tensor.dim() == 0) return false;
    for (auto split : splits) {
      if (split * getSize() != tensor.size(0)) return false;
    }
    return true;
  };
  std::string problem = tensor_problem(output);
  if (problem.empty() && !(equal(input_splits, input) && equal(output_splits, output))) {
    problem = "unequal splits are not supported (every rank sends and receives equal blocks)";
  }
  if (problem.empty() && (input.numel() % getSize() != 0 || output.numel() != input.numel() ||
                          output.scalar_type() != input.scalar_type())) {
    problem = "input and output hold world size equal blocks";
  }
  check_same_on_every_rank("alltoall", input, input.defined() ? input.numel() : 0, 0, problem);
  return input_to_output(c10d::OpType::ALLTOALL_BASE, input, output, options.timeout,
                         [this](TensorView send, TensorView recv) {
                           return communicator_.alltoall(send, recv, {"c10d.alltoall"});
                         });
}

c10::intrusive_ptr<c10d::Work> ProcessGroupUnimsg::alltoall(std::vector<at::Tensor>& outputs,
                                                            std::vector<at::Tensor>& inputs,
                                                            const c10d::AllToAllOptions& options) {
  const auto size = static_cast<std::size_t>(getSize());
  bool fits = inputs.size() == size && outputs.size() == size;
  for (std::size_t r = 0; fits && r < size; ++r) {
    fits = tensor_problem(inputs[r]).empty() && tensor_problem(outputs[r]).empty() &&
           inputs[r].numel() == inputs[0].numel() && outputs[r].numel() == inputs[0].numel() &&
           inputs[r].scalar_type() == inputs[0].scalar_type() &&
           outputs[r].scalar_type() == inputs[0].scalar_type();
  }
  if (!fits) {  // (throws on every rank)
    check_same_on_every_rank("alltoall", at::Tensor(), 0, 0,
                             "world size input and output tensors of one length and dtype");
  }
  std::vector<at::Tensor> flat_parts;
  for (const auto& part : inputs) flat_parts.push_back(part.reshape({-1}));
  auto input = at::cat(flat_parts);
  auto output = at::empty_like(input);
  std::vector<std::int64_t> no_splits;
  auto inner = alltoall_base(output, input, no_splits, no_splits, options);
  const auto count = inputs[0].numel();
  // The blocks go to the caller's tensors once the exchange is done (the waiter reaches this
  // entry after the exchange's).
  return enqueue(c10d::OpType::ALLTOALL, outputs, [inner, outputs, output, count]() mutable {
    inner->wait();
    for (std::size_t r = 0; r < outputs.size(); ++r) {
      outputs[r].copy_(
          output.narrow(0, static_cast<std::int64_t>(r) * count, count).view(outputs[r].sizes()));
    }
  });
}

c10::intrusive_ptr<c10d::Work> ProcessGroupUnimsg::barrier(const c10d::BarrierOptions& options) {
  ensure_running();
  Work work = communicator_.barrier({"c10d.barrier"});
  return enqueue(
      c10d::OpType::BARRIER, {},
      [work, timeout = timeout_of(options.timeout)]() mutable { wait_within(work, timeout); });
}

}  // namespace unimsg
