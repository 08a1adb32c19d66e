#pragma once

// The on-disk side of checkpoints (private to unimsg_checkpoint): names, durable writes, the
// manifest and its verification, the locks that tell a live writer's directories from a dead
// one's, and the crash-safe replacement of a step.
//
// Names in a checkpoint directory:
//   step-<12 digits>                       a checkpoint
//   .tmp-step-<digits>-<host>-<pid>-<seq>  a write in progress (or a dead writer's leftover)
//   .old-step-<digits>-<host>-<pid>-<seq>  a checkpoint set aside while a re-save replaces it
// A writer holds an exclusive flock(2) on each of its own temporary and set-aside directories
// for as long as they are under those names, so "lockable" means "its writer is gone", on any
// host whose filesystem carries flocks; the host and pid in the name are the fallback where it
// does not.

#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "unimsg/checkpoint/checkpoint.hpp"

namespace unimsg::checkpoint_disk {

namespace fs = std::filesystem;

inline constexpr int kFormat = 1;
// A manifest holds names, sizes, checksums and the caller's metadata: anything larger is
// damaged (and is refused before it is read, as it would all be held in memory).
inline constexpr std::uintmax_t kMaxManifestBytes = std::uintmax_t{64} << 20;

std::uint64_t checksum(std::span<const std::byte> bytes);  // XXH3, 64 bits
std::string step_name(std::uint64_t step);
std::optional<std::uint64_t> parse_step(std::string_view name);

enum class LeftoverKind { kTemporary, kSetAside };
struct Leftover {
  LeftoverKind kind;
  std::uint64_t step;
  std::string owner;  // what follows the step in the name: "<host>-<pid>-<seq>" (or "<pid>")
};
std::optional<Leftover> parse_leftover(std::string_view name);
// A fresh name of each kind, unique to this process and call.
std::string leftover_name(LeftoverKind kind, std::uint64_t step);

// An open file descriptor, closed on destruction.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) noexcept : fd_(fd) {}
  Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Fd& operator=(Fd&& other) noexcept;
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd();
  int get() const noexcept { return fd_; }
  int release() noexcept { return std::exchange(fd_, -1); }

 private:
  int fd_ = -1;
};

enum class LockState {
  kHeld,         // locked by us, and still the directory at that path
  kBusy,         // another process holds it (a live writer)
  kGone,         // not there (any more)
  kUnsupported,  // the filesystem has no flocks: held only in name
};
struct DirLock {
  LockState state = LockState::kGone;
  Fd fd;
};
// Locks the directory at `path` (waiting for it, or not) and checks afterwards that the path
// still names the directory locked: one renamed or removed meanwhile is kGone.
DirLock lock_directory(const fs::path& path, bool wait);

// Whether the writer named in a leftover's owner is known dead: same host, no such process.
bool owner_dead_here(const std::string& owner);

void write_file(int rank, const fs::path& path, std::span<const std::byte> bytes);
void fsync_directory(int rank, const fs::path& path);

// Reads and verifies one checkpoint directory; throws std::runtime_error saying what is wrong.
// Memory: the blobs' real sizes, never what a manifest claims.
Checkpoint read_checkpoint(const fs::path& dir, std::uint64_t step);
// The same checks, streaming: nothing of the blobs is held.
void verify_checkpoint(const fs::path& dir, std::uint64_t step);

// Moves the complete checkpoint at `source` to `step`'s name in `directory`, replacing the one
// there if any, so that a crash at any point leaves the old or the new one whole under that
// name, or the old one set aside under a .old- name that the loader reads and the next writer
// renames back.
void replace_directory(int rank, const fs::path& source, const fs::path& directory,
                       std::uint64_t step);

// What changes when anything in a checkpoint directory is rewritten, renamed, resized or touched
// (the directory's and each file's identity, size and modification time), so that a checkpoint
// verified once is verified again only when it may have changed; nullopt if it is not there.
std::optional<std::uint64_t> fingerprint(const fs::path& dir);

// The entries of a directory (none where it cannot be read: never an exception).
std::vector<fs::path> entries_of(const fs::path& dir);

// The copies of `step` in `directory`, in the order to try: the checkpoint itself, then any
// set-aside ones.
std::vector<fs::path> copies_of(const fs::path& directory, std::uint64_t step);

}  // namespace unimsg::checkpoint_disk
