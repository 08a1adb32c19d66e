#include "unimsg/services/checkpoint_restore.hpp"

#include <algorithm>
#include <climits>
#include <cstring>

#include "unimsg/bus/mpi.hpp"
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

// MPI counts are ints: large buffers go in pieces.
void broadcast_bytes(std::vector<std::byte>& bytes, int root, MPI_Comm comm, int rank) {
  constexpr std::size_t kPiece = std::size_t{1} << 30;
  for (std::size_t offset = 0; offset < bytes.size(); offset += kPiece) {
    const auto count = static_cast<int>(std::min(kPiece, bytes.size() - offset));
    check_mpi(MPI_Bcast(bytes.data() + offset, count, MPI_BYTE, root, comm), rank,
              "restore: MPI_Bcast");
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
                                                          std::vector<std::string>* skipped) {
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  // Load what this rank sees; an error (an unreadable directory) must not leave the others
  // waiting in the collectives below, so it travels as "nothing here" and is rethrown after.
  std::optional<Checkpoint> local;
  std::exception_ptr failure;
  try {
    local = load_local(skipped);
  } catch (...) {
    failure = std::current_exception();
  }
  long long mine = local ? static_cast<long long>(local->step) : -1;
  long long newest = -1;
  check_mpi(MPI_Allreduce(&mine, &newest, 1, MPI_LONG_LONG, MPI_MAX, comm), rank,
            "restore: MPI_Allreduce");
  int failed = failure ? 1 : 0;
  check_mpi(MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, comm), rank,
            "restore: MPI_Allreduce");
  if (failure) std::rethrow_exception(failure);
  if (failed) {
    throw CheckpointError(rank, "restore", "another rank could not read its checkpoints");
  }
  if (newest < 0) return std::nullopt;
  int holder = mine == newest ? rank : INT_MAX;
  check_mpi(MPI_Allreduce(MPI_IN_PLACE, &holder, 1, MPI_INT, MPI_MIN, comm), rank,
            "restore: MPI_Allreduce");
  int lacking = mine == newest ? 0 : 1;
  check_mpi(MPI_Allreduce(MPI_IN_PLACE, &lacking, 1, MPI_INT, MPI_SUM, comm), rank,
            "restore: MPI_Allreduce");
  RestoredCheckpoint restored;
  restored.source_rank = mine == newest ? rank : holder;
  if (lacking == 0) {
    restored.checkpoint = std::move(*local);
    return restored;
  }
  // The holder sends its copy (verified when it loaded it) to everyone; those who hold the
  // same step keep their own.
  std::vector<std::byte> bytes;
  if (rank == holder) bytes = serialize_checkpoint(*local);
  unsigned long long size = bytes.size();
  check_mpi(MPI_Bcast(&size, 1, MPI_UNSIGNED_LONG_LONG, holder, comm), rank, "restore: MPI_Bcast");
  bytes.resize(size);
  broadcast_bytes(bytes, holder, comm, rank);
  if (mine == newest) {
    restored.checkpoint = std::move(*local);
  } else {
    restored.checkpoint = deserialize_checkpoint(bytes, rank);
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

}  // namespace unimsg
