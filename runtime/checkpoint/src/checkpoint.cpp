#include "unimsg/checkpoint/checkpoint.hpp"

#include <spdlog/spdlog.h>
#include <sys/stat.h>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "checkpoint_disk.hpp"
#include "unimsg/core/error.hpp"

namespace unimsg {

namespace fs = std::filesystem;
using namespace checkpoint_disk;

namespace {

std::optional<std::pair<std::uint64_t, std::uint64_t>> directory_id(const fs::path& path) {
  struct stat info {};
  if (::lstat(path.c_str(), &info) != 0 || !S_ISDIR(info.st_mode)) return std::nullopt;
  return std::pair<std::uint64_t, std::uint64_t>{info.st_dev, info.st_ino};
}

// Steps with a directory of their own, newest first (set-aside copies not included).
std::vector<std::uint64_t> own_steps(const fs::path& directory) {
  std::vector<std::uint64_t> found;
  std::error_code error;
  for (const fs::path& entry : entries_of(directory)) {
    if (!fs::is_directory(entry, error)) continue;
    if (const auto step = parse_step(entry.filename().string())) found.push_back(*step);
  }
  std::sort(found.rbegin(), found.rend());
  return found;
}

std::string describe(const std::exception_ptr& failure) {
  try {
    std::rethrow_exception(failure);
  } catch (const std::exception& error) {
    return error.what();
  } catch (...) {
    return "an unknown exception";
  }
}

// A write in progress: its directory, locked (so that no other writer's cleanup takes it for a
// dead writer's) until it is renamed into place.
struct Temporary {
  fs::path path;
  DirLock lock;
};

Temporary create_temporary(int rank, const fs::path& directory, std::uint64_t step) {
  Temporary temp;
  for (int attempt = 0; attempt < 3; ++attempt) {
    temp.path = directory / leftover_name(LeftoverKind::kTemporary, step);
    std::error_code error;
    if (!fs::create_directory(temp.path, error) || error) {
      throw CheckpointError(
          rank, "checkpoint",
          "cannot create " + temp.path.string() + ": " + (error ? error.message() : "it exists"));
    }
    // A cleanup may take it in the instant before it is locked: then a fresh one.
    temp.lock = lock_directory(temp.path, /*wait=*/true);
    if (temp.lock.state == LockState::kHeld || temp.lock.state == LockState::kUnsupported) {
      return temp;
    }
  }
  throw CheckpointError(rank, "checkpoint",
                        "cannot keep a temporary directory in " + directory.string() +
                            ": each one vanished as it was created");
}

// Writes the blobs, then the manifest, every file fsync'd, into a fresh temporary directory.
Temporary write_temporary(int rank, const fs::path& directory, const Checkpoint& checkpoint,
                          const nlohmann::json& metadata) {
  Temporary temp = create_temporary(rank, directory, checkpoint.step);
  try {
    nlohmann::json blobs = nlohmann::json::array();
    std::size_t index = 0;
    for (const auto& [blob_name, bytes] : checkpoint.blobs) {
      const std::string file = std::to_string(index++) + ".blob";
      write_file(rank, temp.path / file, bytes);
      blobs.push_back({{"name", blob_name},
                       {"file", file},
                       {"bytes", bytes.size()},
                       {"xxh3", checksum(bytes)}});
    }
    const std::string text = nlohmann::json{
        {"format", kFormat},
        {"step", checkpoint.step},
        {"blobs", blobs},
        {"metadata", metadata}}.dump(1);
    if (text.size() > kMaxManifestBytes) {
      throw CheckpointError(rank, "checkpoint",
                            "step " + std::to_string(checkpoint.step) + ": a manifest of " +
                                std::to_string(text.size()) +
                                " bytes, more than a loader accepts (" +
                                std::to_string(kMaxManifestBytes) + "): metadata too large?");
    }
    write_file(rank, temp.path / "manifest.json", std::as_bytes(std::span(text)));
    fsync_directory(rank, temp.path);
    return temp;
  } catch (...) {
    std::error_code ignored;
    fs::remove_all(temp.path, ignored);
    throw;
  }
}

}  // namespace

Checkpointer::Checkpointer(std::filesystem::path directory, CheckpointOptions options)
    : directory_(std::move(directory)), options_(std::move(options)) {
  if (options_.keep == 0) throw ConfigError(options_.rank, "checkpoint", "keep must be at least 1");
  std::error_code error;
  fs::create_directories(directory_, error);
  if (error || !fs::is_directory(directory_)) {
    throw CheckpointError(options_.rank, "checkpoint",
                          "cannot use directory " + directory_.string() + ": " +
                              (error ? error.message() : "not a directory"));
  }
  remove_leftovers();
  for (const std::uint64_t step : own_steps(directory_)) {
    if (const auto id = directory_id(directory_ / step_name(step))) present_at_start_[step] = *id;
  }
  writer_ = std::thread([this] { writer_main(); });
}

Checkpointer::~Checkpointer() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  writer_.join();
  if (error_) {
    log().error(
        "checkpoint: the asynchronous save of step {} to {} failed and was never "
        "reported: {}",
        error_step_, directory_.string(), describe(error_));
  }
}

spdlog::logger& Checkpointer::log() const {
  return options_.logger ? *options_.logger : *spdlog::default_logger_raw();
}

void Checkpointer::writer_main() {
  std::unique_lock lock(mutex_);
  while (true) {
    changed_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping, everything written
    Checkpoint next = std::move(queue_.front());
    queue_.pop_front();
    busy_ = true;
    lock.unlock();
    std::exception_ptr failure;
    try {
      write(next);
    } catch (...) {
      failure = std::current_exception();
    }
    lock.lock();
    busy_ = false;
    if (failure && !error_) {
      error_ = failure;
      error_step_ = next.step;
    } else if (failure) {
      // Only the first failure is rethrown: a later one would vanish unseen.
      log().error("checkpoint: the asynchronous save of step {} to {} failed: {}", next.step,
                  directory_.string(), describe(failure));
    }
    changed_.notify_all();
  }
}

void Checkpointer::save(const Checkpoint& checkpoint) {
  flush();  // in step order after the queued ones
  write(checkpoint);
}

void Checkpointer::save_async(Checkpoint checkpoint) {
  std::unique_lock lock(mutex_);
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  changed_.wait(lock, [&] { return queue_.size() < options_.queue_capacity; });
  queue_.push_back(std::move(checkpoint));
  changed_.notify_all();
}

void Checkpointer::flush() {
  std::unique_lock lock(mutex_);
  changed_.wait(lock, [&] { return queue_.empty() && !busy_; });
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
}

std::exception_ptr Checkpointer::last_error() const {
  std::lock_guard lock(mutex_);
  return error_;
}

void Checkpointer::write(const Checkpoint& checkpoint) {
  const int rank = options_.rank;
  std::uint64_t bytes = 0;
  for (const auto& [name, blob] : checkpoint.blobs) bytes += blob.size();
  TraceSpan span(options_.trace, "checkpoint", "checkpoint",
                 options_.trace ? nlohmann::json{{"step", checkpoint.step},
                                                 {"bytes", bytes},
                                                 {"directory", directory_.string()}}
                                      .dump()
                                : std::string());
  nlohmann::json metadata;
  try {
    metadata = nlohmann::json::parse(checkpoint.metadata_json);
  } catch (const nlohmann::json::exception& error) {
    throw CheckpointError(
        rank, "checkpoint",
        "step " + std::to_string(checkpoint.step) + ": metadata is not JSON: " + error.what());
  }
  const Temporary temp = write_temporary(rank, directory_, checkpoint, metadata);
  try {
    replace_directory(rank, temp.path, directory_, checkpoint.step);
    fsync_directory(rank, directory_);
  } catch (...) {
    std::error_code ignored;
    fs::remove_all(temp.path, ignored);
    throw;
  }
  {
    std::lock_guard lock(prune_mutex_);
    if (const auto print = fingerprint(directory_ / step_name(checkpoint.step))) {
      verified_[checkpoint.step] = *print;
    }
  }
  try {
    prune(checkpoint.step);
  } catch (const std::exception& error) {
    // The checkpoint is written: a prune that failed halfway is a warning, not a failed save.
    log().warn("checkpoint: pruning {} after step {} failed: {}", directory_.string(),
               checkpoint.step, error.what());
  }
}

// Dead writers' leftovers: temporary directories are removed; a set-aside copy is put back
// under its step's name when that is missing (a replacement cut short), removed otherwise.
void Checkpointer::remove_leftovers() {
  std::error_code error;
  std::vector<std::pair<Leftover, fs::path>> found;
  for (const fs::path& entry : entries_of(directory_)) {
    if (auto leftover = parse_leftover(entry.filename().string())) {
      found.emplace_back(std::move(*leftover), entry);
    }
  }
  // Set-aside copies first: when one cannot go back, the temporary copy is not needed either.
  std::stable_partition(found.begin(), found.end(), [](const auto& item) {
    return item.first.kind == LeftoverKind::kSetAside;
  });
  for (const auto& [leftover, path] : found) {
    const DirLock lock = lock_directory(path, /*wait=*/false);
    if (lock.state == LockState::kBusy || lock.state == LockState::kGone) continue;
    if (lock.state == LockState::kUnsupported && !owner_dead_here(leftover.owner)) continue;
    const fs::path own = directory_ / step_name(leftover.step);
    if (leftover.kind == LeftoverKind::kSetAside && !fs::exists(own, error)) {
      if (::rename(path.c_str(), own.c_str()) == 0) {
        log().warn("checkpoint: {} put back as {} (its replacement was cut short)", path.string(),
                   own.string());
        continue;
      }
    }
    fs::remove_all(path, error);
  }
}

bool Checkpointer::intact(std::uint64_t step, std::string& why) {
  const fs::path dir = directory_ / step_name(step);
  const auto print = fingerprint(dir);
  const auto known = verified_.find(step);
  if (print && known != verified_.end() && known->second == *print) return true;
  try {
    verify_checkpoint(dir, step);
  } catch (const std::exception& error) {
    why = error.what();
    return false;
  }
  if (print) verified_[step] = *print;
  return true;
}

void Checkpointer::prune(std::uint64_t written) {
  std::lock_guard lock(prune_mutex_);
  remove_leftovers();
  std::size_t kept = 0;
  for (const std::uint64_t step : own_steps(directory_)) {
    const fs::path dir = directory_ / step_name(step);
    const auto id = directory_id(dir);
    std::string why;
    const auto before = present_at_start_.find(step);
    if (step > written && id && before != present_at_start_.end() && before->second == *id) {
      why = "numbered above step " + std::to_string(written) +
            " just written, and there before this run's writer started (an older run's)";
    } else if (kept < options_.keep) {
      if (intact(step, why)) {
        ++kept;
        continue;
      }
      why = "damaged: " + why;
    }
    std::error_code ignored;
    fs::remove_all(dir, ignored);
    verified_.erase(step);
    if (!why.empty()) log().warn("checkpoint: removed {}: {}", dir.string(), why);
  }
}

std::vector<std::uint64_t> Checkpointer::steps() const {
  std::vector<std::uint64_t> found;
  std::error_code error;
  for (const fs::path& entry : entries_of(directory_)) {
    if (!fs::is_directory(entry, error)) continue;
    const std::string name = entry.filename().string();
    if (const auto step = parse_step(name)) {
      found.push_back(*step);
    } else if (const auto leftover = parse_leftover(name);
               leftover && leftover->kind == LeftoverKind::kSetAside) {
      found.push_back(leftover->step);
    }
  }
  std::sort(found.rbegin(), found.rend());
  found.erase(std::unique(found.begin(), found.end()), found.end());
  return found;
}

std::optional<Checkpoint> Checkpointer::load_latest(std::vector<std::string>* skipped) const {
  for (const std::uint64_t step : steps()) {
    for (const fs::path& copy : copies_of(directory_, step)) {
      try {
        return read_checkpoint(copy, step);
      } catch (const std::exception& error) {
        if (skipped) skipped->push_back(copy.string() + ": " + error.what());
      }
    }
  }
  return std::nullopt;
}

Checkpoint Checkpointer::load(std::uint64_t step) const {
  const auto copies = copies_of(directory_, step);
  if (copies.empty()) {
    throw CheckpointError(options_.rank, "checkpoint",
                          "no checkpoint " + (directory_ / step_name(step)).string());
  }
  std::string why;
  for (const fs::path& copy : copies) {
    try {
      return read_checkpoint(copy, step);
    } catch (const std::exception& error) {
      why += (why.empty() ? "" : "; ") + copy.string() + ": " + error.what();
    }
  }
  throw CheckpointError(options_.rank, "checkpoint", why);
}

TieredCheckpointer::TieredCheckpointer(TieredCheckpointOptions options)
    : options_(std::move(options)) {
  if (options_.fast_every > 0) fast_.emplace(options_.fast_directory, options_.options);
  if (options_.persistent_every > 0) {
    persistent_.emplace(options_.persistent_directory, options_.options);
  }
}

bool TieredCheckpointer::due(std::uint64_t step) const noexcept {
  return (fast_ && options_.write_fast && step % options_.fast_every == 0) ||
         (persistent_ && options_.write_persistent && step % options_.persistent_every == 0);
}

bool TieredCheckpointer::maybe_save(std::uint64_t step, const std::function<Checkpoint()>& make) {
  if (!due(step)) return false;
  Checkpoint checkpoint = make();
  checkpoint.step = step;
  const bool to_fast = fast_ && options_.write_fast && step % options_.fast_every == 0;
  const bool to_persistent =
      persistent_ && options_.write_persistent && step % options_.persistent_every == 0;
  if (to_fast && to_persistent) {
    fast_->save_async(checkpoint);
    persistent_->save_async(std::move(checkpoint));
  } else if (to_fast) {
    fast_->save_async(std::move(checkpoint));
  } else {
    persistent_->save_async(std::move(checkpoint));
  }
  return true;
}

void TieredCheckpointer::flush() {
  if (fast_) fast_->flush();
  if (persistent_) persistent_->flush();
}

std::optional<Checkpoint> TieredCheckpointer::load_latest(std::vector<std::string>* skipped) const {
  std::optional<Checkpoint> fast = fast_ ? fast_->load_latest(skipped) : std::nullopt;
  std::optional<Checkpoint> persistent =
      persistent_ ? persistent_->load_latest(skipped) : std::nullopt;
  if (fast && persistent) return fast->step >= persistent->step ? fast : persistent;
  return fast ? fast : persistent;
}

}  // namespace unimsg
