#include "unimsg/collectives/communicator.hpp"

#include <thread>
#include <vector>

#include "unimsg/core/backoff.hpp"
#include "unimsg/core/config.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/kernels/cast.hpp"

namespace unimsg {

std::size_t dtype_size(DType dtype) noexcept {
  switch (dtype) {
    case DType::kF32:
      return 4;
    case DType::kF16:
      return 2;
    case DType::kBF16:
      return 2;
    case DType::kF64:
      return 8;
    case DType::kI32:
      return 4;
    case DType::kI64:
      return 8;
    case DType::kU8:
      return 1;
  }
  return 0;
}

const char* to_string(DType dtype) noexcept {
  switch (dtype) {
    case DType::kF32:
      return "f32";
    case DType::kF16:
      return "f16";
    case DType::kBF16:
      return "bf16";
    case DType::kF64:
      return "f64";
    case DType::kI32:
      return "i32";
    case DType::kI64:
      return "i64";
    case DType::kU8:
      return "u8";
  }
  return "unknown";
}

const char* to_string(ReduceOp op) noexcept {
  switch (op) {
    case ReduceOp::kSum:
      return "sum";
    case ReduceOp::kAvg:
      return "avg";
    case ReduceOp::kMin:
      return "min";
    case ReduceOp::kMax:
      return "max";
  }
  return "unknown";
}

double load_element(const void* data, DType dtype, std::size_t index) noexcept {
  const void* p = static_cast<const std::byte*>(data) + index * dtype_size(dtype);
  switch (dtype) {
    case DType::kF32:
      return *static_cast<const float*>(p);
    case DType::kF64:
      return *static_cast<const double*>(p);
    case DType::kI32:
      return *static_cast<const std::int32_t*>(p);
    case DType::kI64:
      return static_cast<double>(*static_cast<const std::int64_t*>(p));
    case DType::kU8:
      return *static_cast<const std::uint8_t*>(p);
    case DType::kF16:
      return f16_to_f32(*static_cast<const std::uint16_t*>(p));
    case DType::kBF16:
      return bf16_to_f32(*static_cast<const std::uint16_t*>(p));
  }
  return 0;
}

void store_element(void* data, DType dtype, std::size_t index, double value) noexcept {
  void* p = static_cast<std::byte*>(data) + index * dtype_size(dtype);
  switch (dtype) {
    case DType::kF32:
      *static_cast<float*>(p) = static_cast<float>(value);
      break;
    case DType::kF64:
      *static_cast<double*>(p) = value;
      break;
    case DType::kI32:
      *static_cast<std::int32_t*>(p) = static_cast<std::int32_t>(value);
      break;
    case DType::kI64:
      *static_cast<std::int64_t*>(p) = static_cast<std::int64_t>(value);
      break;
    case DType::kU8:
      *static_cast<std::uint8_t*>(p) = static_cast<std::uint8_t>(value);
      break;
    case DType::kF16:
      *static_cast<std::uint16_t*>(p) = f32_to_f16(static_cast<float>(value));
      break;
    case DType::kBF16:
      *static_cast<std::uint16_t*>(p) = f32_to_bf16(static_cast<float>(value));
      break;
  }
}

namespace {

// Polls after the tight ones that yield the core before wait() sleeps between polls.
constexpr std::uint64_t kYieldPolls = 18001;

// A Work that completes when `first` has and `after` has run.
class ThenState final : public Work::State {
 public:
  ThenState(Work first, std::shared_ptr<Work::State> inner, std::function<void()> after)
      : first_(std::move(first)), inner_(std::move(inner)), after_(std::move(after)) {}
  bool poll() override { return first_.test(); }
  void finish() override {
    if (after_) after_();
  }
  std::string describe() const override { return inner_->describe(); }
  std::string missing_ranks() const override { return inner_->missing_ranks(); }
  void on_timeout() override { inner_->on_timeout(); }
  int rank() const override { return inner_->rank(); }
  std::chrono::nanoseconds default_timeout() const override { return inner_->default_timeout(); }

 private:
  Work first_;
  std::shared_ptr<Work::State> inner_;
  std::function<void()> after_;
};

}  // namespace

CommunicatorOptions CommunicatorOptions::from_env() {
  CommunicatorOptions options;
  if (const auto seconds = env_uint("UNIMSG_COLLECTIVE_TIMEOUT_S", 1, 7 * 24 * 3600)) {
    options.timeout = std::chrono::seconds(*seconds);
  }
  if (const auto polls = env_uint("UNIMSG_WAIT_SPIN_POLLS", 0, 1u << 30)) {
    options.wait_spin_polls = static_cast<std::uint32_t>(*polls);
  }
  if (const auto mode = env_value("UNIMSG_HIERARCHICAL")) {
    if (*mode == "auto") {
      options.hierarchical = CommunicatorOptions::Hierarchical::kAuto;
    } else if (*mode == "on") {
      options.hierarchical = CommunicatorOptions::Hierarchical::kOn;
    } else if (*mode == "off") {
      options.hierarchical = CommunicatorOptions::Hierarchical::kOff;
    } else {
      throw ConfigError(kNoRank, "UNIMSG_HIERARCHICAL",
                        "'" + *mode + "' is not one of auto, on, off");
    }
  }
  if (const auto bytes = env_size("UNIMSG_SHM_MIN_BYTES", 0, std::uint64_t{1} << 40)) {
    options.shm_min_bytes = *bytes;
  }
  // (A multiple of 64, so that every element size divides it: at least one 64-byte line.)
  if (const auto bytes = env_size("UNIMSG_SHM_CHUNK_BYTES", 64, std::uint64_t{1} << 30)) {
    options.shm_chunk_bytes = *bytes / 64 * 64;
  }
  return options;
}

Work::Work(std::shared_ptr<State> state) : state_(std::move(state)) {
  if (!state_) throw Error(kNoRank, "work", "a Work needs a state");
}

Work Work::then(std::function<void()> after) const {
  if (!state_) throw Error(kNoRank, "work.then", "then() on an empty Work");
  return Work(std::make_shared<ThenState>(*this, state_, std::move(after)));
}

bool Work::test() {
  if (!state_) throw Error(kNoRank, "work.test", "test() on an empty Work");
  if (state_->complete_) return true;
  if (!state_->poll()) return false;
  state_->complete_ = true;
  state_->finish();
  return true;
}

void Work::wait() {
  if (!state_) throw Error(kNoRank, "work.wait", "wait() on an empty Work");
  wait(state_->default_timeout());
}

void Work::wait(std::chrono::nanoseconds timeout) {
  if (!state_) throw Error(kNoRank, "work.wait", "wait() on an empty Work");
  wait(timeout, state_->spin_polls());
}

void Work::wait(std::chrono::nanoseconds timeout, std::uint32_t spin_polls) {
  if (!state_) throw Error(kNoRank, "work.wait", "wait() on an empty Work");
  if (test()) return;  // (the common case after a fused step: no clock read)
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = timeout > std::chrono::hours(24 * 365)
                            ? start + std::chrono::hours(24 * 365)
                            : start + timeout;
  if (const auto blocked = state_->block(deadline)) {
    if (*blocked && test()) return;
  } else {
    // Test (which drives MPI progress) in a tight loop first, then yield, then sleep briefly: a
    // long wait must not starve the ranks it waits for on an oversubscribed machine.
    Backoff backoff(spin_polls, kYieldPolls);
    for (std::uint64_t round = 0;; ++round) {
      if (test()) return;
      if (round % 64 == 0 && std::chrono::steady_clock::now() >= deadline) break;
      backoff.pause(std::chrono::microseconds(50));
    }
  }
  const std::string missing = state_->missing_ranks();
  state_->on_timeout();
  throw TimeoutError(
      state_->rank(), "collective.wait",
      state_->describe() + " did not complete within " +
          std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(timeout).count()) +
          " ms; ranks that have not started it: " + missing);
}

bool Communicator::allreduce_if_agreed(TensorView send, TensorView recv,
                                       std::span<std::uint8_t> votes,
                                       const AllreduceOptions& options) {
  if (votes.empty()) throw Error(rank(), "allreduce_if_agreed", "no votes (votes[0] is the veto)");
  if (send.count != recv.count || send.dtype != recv.dtype) {
    throw Error(rank(), "allreduce_if_agreed", "send and recv differ in count or dtype");
  }
  if (votes[0] == 0 && send.count != 0 && (send.data == nullptr || recv.data == nullptr)) {
    throw Error(rank(), "allreduce_if_agreed", "a rank that does not veto passes its data");
  }
  return do_allreduce_if_agreed(send, recv, votes, options);
}

bool Communicator::do_allreduce_if_agreed(TensorView send, TensorView recv,
                                          std::span<std::uint8_t> votes,
                                          const AllreduceOptions& options) {
  const TensorView ballot{votes.data(), votes.size(), DType::kU8};
  allreduce(ballot, ballot, {ReduceOp::kMax, "votes"}).wait();
  if (votes[0] != 0) return false;
  allreduce_now(send, recv, options);
  return true;
}

int Communicator::split_position(std::span<const int> ranks) const {
  std::vector<char> seen(static_cast<std::size_t>(size()), 0);
  int position = -1;
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    const int member = ranks[i];
    if (member < 0 || member >= size() || seen[static_cast<std::size_t>(member)]) {
      throw Error(rank(), "split",
                  "rank list entry " + std::to_string(member) +
                      " is out of range or repeated (ranks 0.." + std::to_string(size() - 1) + ")");
    }
    seen[static_cast<std::size_t>(member)] = 1;
    if (member == rank()) position = static_cast<int>(i);
  }
  return position;
}

std::size_t Communicator::reduce_scatter_share(std::size_t count, int size, int rank) noexcept {
  const auto ranks = static_cast<std::size_t>(size);
  return count / ranks + (static_cast<std::size_t>(rank) < count % ranks ? 1 : 0);
}

std::size_t Communicator::reduce_scatter_offset(std::size_t count, int size, int rank) noexcept {
  const auto ranks = static_cast<std::size_t>(size);
  const auto r = static_cast<std::size_t>(rank);
  return r * (count / ranks) + std::min(r, count % ranks);
}

}  // namespace unimsg
