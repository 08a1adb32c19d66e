#include "unimsg/services/checkpoint_restore.hpp"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstring>
#include <memory>
#include <mutex>

#include "unimsg/bus/mpi.hpp"
#include "unimsg/core/backoff.hpp"
#include "unimsg/core/error.hpp"

namespace unimsg {
namespace {

void put_u64(std::vector<std::byte>& out, std::uint64_t value) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<std::byte>((value >> (8 * i)) & 0xff));
}
void put_bytes(std::vector<std::byte>& out, const void* data, std::size_t size) {
  put_u64(out, size);
  const auto* p = static_cast<const std::byte*>(data);
  out.insert(out.end(), p, p + size);
}

class Reader {
 public:
  Reader(const std::vector<std::byte>& bytes, int rank) : bytes_(bytes), rank_(rank) {}
  std::uint64_t u64() {
    need(8);
    std::uint64_t value = 0;
    for (int i = 0; i < 8; ++i) {
      value |= static_cast<std::uint64_t>(std::to_integer<unsigned>(bytes_[at_ + i])) << (8 * i);
    }
    at_ += 8;
    return value;
  }
  const std::byte* take(std::uint64_t size) {
    need(size);
    const std::byte* p = bytes_.data() + at_;
    at_ += static_cast<std::size_t>(size);
    return p;
  }
  bool done() const noexcept { return at_ == bytes_.size(); }

 private:
  void need(std::uint64_t size) const {
    if (size > bytes_.size() - at_) {
      throw CheckpointError(rank_, "checkpoint transfer",
                            "truncated: " + std::to_string(size) + " bytes wanted at offset " +
                                std::to_string(at_) + " of " + std::to_string(bytes_.size()));
    }
  }
  const std::vector<std::byte>& bytes_;
  int rank_;
  std::size_t at_ = 0;
};

// What a restore's pending MPI operations may still write into: the communicator and the
// buffers. A started MPI collective cannot be cancelled, so after a timeout it stays pending
// (it completes if the late rank ever arrives): its buffers are parked until the process exits
// instead of being freed under it, and the communicator is not freed.
struct Exchange {
  MPI_Comm comm = MPI_COMM_NULL;
  std::vector<long long> table;  // per rank: newest intact step (-1: none), load failed (0/1)
  unsigned long long size = 0;
  std::vector<std::byte> bytes;
};

void park(std::unique_ptr<Exchange> exchange) {
  static std::mutex mutex;
  static std::vector<std::unique_ptr<Exchange>> parked;
  const std::lock_guard lock(mutex);
  parked.push_back(std::move(exchange));
}

// The restore's own communicator (a duplicate of the caller's, so that an abandoned operation
// never mixes with the caller's later collectives), every wait on it bounded by `timeout`.
class RestoreChannel {
 public:
  RestoreChannel(MPI_Comm parent, int rank, std::chrono::nanoseconds timeout)
      : exchange_(std::make_unique<Exchange>()), rank_(rank), timeout_(timeout) {
    MPI_Request request = MPI_REQUEST_NULL;
    check_mpi(MPI_Comm_idup(parent, &exchange_->comm, &request), rank_, "restore: MPI_Comm_idup");
    try {
      wait(request, "duplicating the communicator");
    } catch (...) {
      park(std::move(exchange_));  // the destructor does not run for a throwing constructor
      throw;
    }
  }
  ~RestoreChannel() {
    if (abandoned_) {
      park(std::move(exchange_));
    } else if (exchange_->comm != MPI_COMM_NULL) {
      MPI_Comm_free(&exchange_->comm);
    }
  }
  RestoreChannel(const RestoreChannel&) = delete;
  RestoreChannel& operator=(const RestoreChannel&) = delete;

  Exchange& exchange() noexcept { return *exchange_; }
  MPI_Comm comm() const noexcept { return exchange_->comm; }

  // Tests `request` until it completes; a TimeoutError naming the restore once `timeout` has
  // passed (the operation is then abandoned, with everything it may write into).
  void wait(MPI_Request& request, const char* what) {
    const auto start = std::chrono::steady_clock::now();
    Backoff backoff(kSpinPolls, kYieldPolls);
    while (true) {
      int done = 0;
      check_mpi(MPI_Test(&request, &done, MPI_STATUS_IGNORE), rank_, "restore: MPI_Test");
      if (done) return;
      if (std::chrono::steady_clock::now() - start >= timeout_) break;
      backoff.pause(std::chrono::microseconds(200));
    }
    abandoned_ = true;
    throw TimeoutError(
        rank_, "restore",
        std::string("checkpoint restore: ") + what + " did not complete within " +
            std::to_string(
                std::chrono::duration_cast<std::chrono::milliseconds>(timeout_).count()) +
            " ms: a rank has not reached it (stuck loading its checkpoints, or gone)");
  }

 private:
  static constexpr std::uint64_t kSpinPolls = 200;
  static constexpr std::uint64_t kYieldPolls = 2000;
  std::unique_ptr<Exchange> exchange_;
  int rank_;
  std::chrono::nanoseconds timeout_;
  bool abandoned_ = false;
};

// MPI counts are ints: large buffers go in pieces.
void broadcast_bytes(RestoreChannel& channel, int root, int rank) {
  constexpr std::size_t kPiece = std::size_t{1} << 30;
  std::vector<std::byte>& bytes = channel.exchange().bytes;
  for (std::size_t offset = 0; offset < bytes.size(); offset += kPiece) {
    const auto count = static_cast<int>(std::min(kPiece, bytes.size() - offset));
    MPI_Request request = MPI_REQUEST_NULL;
    check_mpi(MPI_Ibcast(bytes.data() + offset, count, MPI_BYTE, root, channel.comm(), &request),
              rank, "restore: MPI_Ibcast");
    channel.wait(request, "sending the checkpoint");
  }
}

}  // namespace

std::vector<std::byte> serialize_checkpoint(const Checkpoint& checkpoint) {
  std::vector<std::byte> out;
  put_u64(out, checkpoint.step);
  put_bytes(out, checkpoint.metadata_json.data(), checkpoint.metadata_json.size());
  put_u64(out, checkpoint.blobs.size());
  for (const auto& [name, blob] : checkpoint.blobs) {
    put_bytes(out, name.data(), name.size());
    put_bytes(out, blob.data(), blob.size());
  }
  return out;
}

Checkpoint deserialize_checkpoint(const std::vector<std::byte>& bytes, int rank) {
  Reader in(bytes, rank);
  Checkpoint checkpoint;
  checkpoint.step = in.u64();
  const auto metadata_size = in.u64();
  const auto* metadata = in.take(metadata_size);
  checkpoint.metadata_json.assign(reinterpret_cast<const char*>(metadata), metadata_size);
  const auto blobs = in.u64();
  for (std::uint64_t i = 0; i < blobs; ++i) {
    const auto name_size = in.u64();
    const auto* name = in.take(name_size);
    const auto blob_size = in.u64();
    const auto* blob = in.take(blob_size);
    auto [it, inserted] =
        checkpoint.blobs.try_emplace(std::string(reinterpret_cast<const char*>(name), name_size),
                                     std::vector<std::byte>(blob, blob + blob_size));
    if (!inserted)
      throw CheckpointError(rank, "checkpoint transfer", "blob '" + it->first + "' twice");
  }
  if (!in.done()) throw CheckpointError(rank, "checkpoint transfer", "bytes after the last blob");
  return checkpoint;
}

std::optional<RestoredCheckpoint> restore_newest_anywhere(MPI_Comm comm,
                                                          const LocalCheckpointLoader& load_local,
                                                          std::vector<std::string>* skipped,
                                                          const RestoreOptions& options) {
  int rank = 0;
  int size = 1;
  check_mpi(MPI_Comm_rank(comm, &rank), kNoRank, "restore: MPI_Comm_rank");
  check_mpi(MPI_Comm_size(comm, &size), rank, "restore: MPI_Comm_size");
  RestoreChannel channel(comm, rank, options.timeout);
  Exchange& exchange = channel.exchange();
  // Load what this rank sees; an error (an unreadable directory) must not leave the others
  // waiting in the collectives below, so it travels as "nothing here" and is rethrown after.
  std::optional<Checkpoint> local;
  std::exception_ptr failure;
  try {
    local = load_local(skipped);
  } catch (...) {
    failure = std::current_exception();
  }
  const long long mine = local ? static_cast<long long>(local->step) : -1;
  // One agreement: every rank's newest step and whether its load failed.
  exchange.table.assign(2 * static_cast<std::size_t>(size) + 2, 0);
  long long* const sent = exchange.table.data() + 2 * size;
  sent[0] = mine;
  sent[1] = failure ? 1 : 0;
  MPI_Request request = MPI_REQUEST_NULL;
  check_mpi(MPI_Iallgather(sent, 2, MPI_LONG_LONG, exchange.table.data(), 2, MPI_LONG_LONG,
                           channel.comm(), &request),
            rank, "restore: MPI_Iallgather");
  channel.wait(request, "agreeing on the newest step");
  if (failure) std::rethrow_exception(failure);
  long long newest = -1;
  bool failed = false;
  for (int r = 0; r < size; ++r) {
    newest = std::max(newest, exchange.table[2 * static_cast<std::size_t>(r)]);
    failed = failed || exchange.table[2 * static_cast<std::size_t>(r) + 1] != 0;
  }
  if (failed) throw CheckpointError(rank, "restore", "another rank could not read its checkpoints");
  if (newest < 0) return std::nullopt;
  int holder = INT_MAX;
  bool lacking = false;
  for (int r = 0; r < size; ++r) {
    const bool holds = exchange.table[2 * static_cast<std::size_t>(r)] == newest;
    if (holds) holder = std::min(holder, r);
    lacking = lacking || !holds;
  }
  RestoredCheckpoint restored;
  restored.source_rank = mine == newest ? rank : holder;
  if (!lacking) {
    restored.checkpoint = std::move(*local);
    return restored;
  }
  // The holder sends its copy (verified when it loaded it) to everyone; those who hold the
  // same step keep their own.
  if (rank == holder) exchange.bytes = serialize_checkpoint(*local);
  exchange.size = exchange.bytes.size();
  check_mpi(MPI_Ibcast(&exchange.size, 1, MPI_UNSIGNED_LONG_LONG, holder, channel.comm(), &request),
            rank, "restore: MPI_Ibcast");
  channel.wait(request, "sending the checkpoint's size");
  exchange.bytes.resize(exchange.size);
  broadcast_bytes(channel, holder, rank);
  if (mine == newest) {
    restored.checkpoint = std::move(*local);
  } else {
    restored.checkpoint = deserialize_checkpoint(exchange.bytes, rank);
    restored.received = true;
    if (restored.checkpoint.step != static_cast<std::uint64_t>(newest)) {
      throw CheckpointError(rank, "restore",
                            "rank " + std::to_string(holder) + " sent step " +
                                std::to_string(restored.checkpoint.step) + ", not " +
                                std::to_string(newest));
    }
  }
  return restored;
}

std::vector<int> fast_tier_writers(const std::vector<std::string>& host_of_rank) {
  if (host_of_rank.empty()) return {};
  // Each host's lowest rank, hosts in the order those ranks come.
  std::vector<int> first_of_host;
  for (int rank = 0; rank < static_cast<int>(host_of_rank.size()); ++rank) {
    const auto& host = host_of_rank[static_cast<std::size_t>(rank)];
    bool seen = false;
    for (const int first : first_of_host) {
      seen = seen || host_of_rank[static_cast<std::size_t>(first)] == host;
    }
    if (!seen) first_of_host.push_back(rank);
  }
  if (first_of_host.size() < 2) return {0};
  return {0, first_of_host[1]};
}

}  // namespace unimsg
