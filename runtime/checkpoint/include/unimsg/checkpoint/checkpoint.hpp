#pragma once

// Checkpoints: named blobs (model, optimizer, data position, RNG state, anything serialised)
// plus JSON metadata, written atomically and checksummed, in one directory per step:
//
//   <dir>/step-000000000120/manifest.json   {"format":1, "step":120, "blobs":[{name, file,
//                                            bytes, xxh3}], "metadata":{...}}
//   <dir>/step-000000000120/<n>.blob
//
// A write goes to a temporary directory (every file fsync'd), which is renamed into place and
// the parent directory fsync'd: a checkpoint either exists whole or not at all, and a failed
// write (read-only or full disk) leaves the previous ones untouched. Re-saving a step swaps the
// new copy in atomically (renameat2 RENAME_EXCHANGE), or where the filesystem cannot, sets the
// old one aside first: after a crash in between, the set-aside copy is read and put back.
// Temporary and set-aside directories of writers that died are removed when a writer starts and
// after each write; a live writer's (it holds an flock on them) are left alone.
//
// After each write, the newest `keep` intact checkpoints are kept (each verified once per writer,
// and again when its files change): damaged ones do not count and are removed, and so are
// checkpoints numbered above the step just written that were already there when this
// Checkpointer started (left by an older or abandoned run: kept, they would outlive every prune
// and be restored after this run's next crash).
// Restore takes the newest intact checkpoint; a damaged one (missing file, wrong size or
// checksum, bad manifest) is reported and skipped, never loaded.

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "unimsg/trace/trace.hpp"

namespace spdlog {
class logger;
}

namespace unimsg {

struct Checkpoint {
  std::uint64_t step = 0;
  std::map<std::string, std::vector<std::byte>> blobs;
  std::string metadata_json = "{}";  // a JSON object, stored as given
};

struct CheckpointOptions {
  std::size_t keep = 3;            // complete checkpoints kept (the newest)
  std::size_t queue_capacity = 2;  // asynchronous saves waiting; save_async() blocks beyond
  int rank = -1;                   // for error messages and logs
  // Each write is a "checkpoint" span on this timeline (monitor.hpp), when set.
  TraceRecorder* trace = nullptr;
  // Where failures nobody is left to rethrow, and removed damaged checkpoints, are reported;
  // null: spdlog's default logger.
  std::shared_ptr<spdlog::logger> logger;
};

class Checkpointer {
 public:
  // Creates `directory` if needed (a CheckpointError if it cannot) and removes dead writers'
  // leftovers in it.
  explicit Checkpointer(std::filesystem::path directory, CheckpointOptions options = {});
  // Finishes queued saves; a failure among them that was never rethrown is logged (as error).
  ~Checkpointer();
  Checkpointer(const Checkpointer&) = delete;
  Checkpointer& operator=(const Checkpointer&) = delete;

  // Writes now (CheckpointError on failure; the previous checkpoints stay).
  void save(const Checkpoint& checkpoint);
  // Queues the write on the writer thread (blocks while the queue is full). A failure is
  // rethrown by the next save_async() or flush(); last_error() shows it meanwhile.
  void save_async(Checkpoint checkpoint);
  // Waits for queued saves; rethrows the first failure among them.
  void flush();
  // The first failure of an asynchronous save not yet rethrown, or null; it stays pending.
  std::exception_ptr last_error() const;

  // Steps of the checkpoint directories present (complete or not, or only set aside by a
  // replacement that was cut short), newest first.
  std::vector<std::uint64_t> steps() const;
  // The newest checkpoint that verifies; damaged ones are skipped and described in `skipped`.
  std::optional<Checkpoint> load_latest(std::vector<std::string>* skipped = nullptr) const;
  // One step; CheckpointError if it is missing or damaged.
  Checkpoint load(std::uint64_t step) const;

  const std::filesystem::path& directory() const noexcept { return directory_; }

 private:
  using DirectoryId = std::pair<std::uint64_t, std::uint64_t>;  // device, inode

  void write(const Checkpoint& checkpoint);
  void prune(std::uint64_t written);
  void remove_leftovers();
  bool intact(std::uint64_t step, std::string& why);
  void writer_main();
  spdlog::logger& log() const;

  std::filesystem::path directory_;
  CheckpointOptions options_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<Checkpoint> queue_;
  bool busy_ = false;
  bool stopping_ = false;
  std::exception_ptr error_;
  std::uint64_t error_step_ = 0;
  // Prune's state: the step directories there when this writer started, and the fingerprints
  // of those verified (a checkpoint is read again only once it may have changed, not on every
  // save).
  std::mutex prune_mutex_;
  std::map<std::uint64_t, DirectoryId> present_at_start_;
  std::map<std::uint64_t, std::uint64_t> verified_;
  std::thread writer_;
};

// Two tiers: a fast node-local one (e.g. /dev/shm) written every `fast_every` steps and a
// persistent one every `persistent_every` steps (0 turns a tier off). Restore takes the newest
// intact checkpoint of either tier. A rank that only reads a tier (the job's other ranks, which
// may find the newest copy after a relaunch) sets its write_* false.
struct TieredCheckpointOptions {
  std::filesystem::path fast_directory;
  std::uint64_t fast_every = 0;
  std::filesystem::path persistent_directory;
  std::uint64_t persistent_every = 0;
  bool write_fast = true;
  bool write_persistent = true;
  CheckpointOptions options;
};

class TieredCheckpointer {
 public:
  explicit TieredCheckpointer(TieredCheckpointOptions options);
  // True when `step` is due in some tier.
  bool due(std::uint64_t step) const noexcept;
  // Saves asynchronously to every tier for which `step` is due; `make` builds the checkpoint
  // only when one is.
  bool maybe_save(std::uint64_t step, const std::function<Checkpoint()>& make);
  void flush();
  std::optional<Checkpoint> load_latest(std::vector<std::string>* skipped = nullptr) const;

 private:
  TieredCheckpointOptions options_;
  std::optional<Checkpointer> fast_;
  std::optional<Checkpointer> persistent_;
};

}  // namespace unimsg
