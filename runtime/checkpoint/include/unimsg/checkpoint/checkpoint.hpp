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
// write (read-only or full disk) leaves the previous ones untouched. The last `keep` are kept.
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
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "unimsg/trace/trace.hpp"

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
};

class Checkpointer {
 public:
  // Creates `directory` if needed (a CheckpointError if it cannot).
  explicit Checkpointer(std::filesystem::path directory, CheckpointOptions options = {});
  ~Checkpointer();  // finishes queued saves
  Checkpointer(const Checkpointer&) = delete;
  Checkpointer& operator=(const Checkpointer&) = delete;

  // Writes now (CheckpointError on failure; the previous checkpoints stay).
  void save(const Checkpoint& checkpoint);
  // Queues the write on the writer thread (blocks while the queue is full). A failure is
  // rethrown by the next save_async(), flush() or the destructor's caller via last_error().
  void save_async(Checkpoint checkpoint);
  // Waits for queued saves; rethrows the first failure among them.
  void flush();

  // Steps of the checkpoint directories present (complete or not), newest first.
  std::vector<std::uint64_t> steps() const;
  // The newest checkpoint that verifies; damaged ones are skipped and described in `skipped`.
  std::optional<Checkpoint> load_latest(std::vector<std::string>* skipped = nullptr) const;
  // One step; CheckpointError if it is missing or damaged.
  Checkpoint load(std::uint64_t step) const;

  const std::filesystem::path& directory() const noexcept { return directory_; }

 private:
  void write(const Checkpoint& checkpoint);
  void prune();
  void writer_main();

  std::filesystem::path directory_;
  CheckpointOptions options_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<Checkpoint> queue_;
  bool busy_ = false;
  bool stopping_ = false;
  std::exception_ptr error_;
  std::thread writer_;
};

// Two tiers: a fast node-local one (e.g. /dev/shm) written every `fast_every` steps and a
// persistent one every `persistent_every` steps (0 turns a tier off). Restore takes the newest
// intact checkpoint of either tier.
struct TieredCheckpointOptions {
  std::filesystem::path fast_directory;
  std::uint64_t fast_every = 0;
  std::filesystem::path persistent_directory;
  std::uint64_t persistent_every = 0;
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
