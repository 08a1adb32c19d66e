#include "unimsg/checkpoint/checkpoint.hpp"

#include <fcntl.h>
#include <unistd.h>

#if defined(__x86_64__)
#define XXH_DISPATCH_DISABLE_REPLACE 1
#include <xxh_x86dispatch.h>
#else
#include <xxhash.h>
#endif
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "unimsg/core/error.hpp"

namespace unimsg {
namespace {

namespace fs = std::filesystem;
constexpr int kFormat = 1;
constexpr std::string_view kPrefix = "step-";

std::uint64_t checksum(std::span<const std::byte> bytes) {
#if defined(__x86_64__)
  return XXH3_64bits_dispatch(bytes.data(), bytes.size());
#else
  return XXH3_64bits(bytes.data(), bytes.size());
#endif
}

std::string step_name(std::uint64_t step) {
  char name[32];
  std::snprintf(name, sizeof name, "step-%012llu", static_cast<unsigned long long>(step));
  return name;
}

std::optional<std::uint64_t> parse_step(const std::string& name) {
  if (name.size() <= kPrefix.size() || name.compare(0, kPrefix.size(), kPrefix) != 0) {
    return std::nullopt;
  }
  std::uint64_t step = 0;
  const char* begin = name.data() + kPrefix.size();
  const char* end = name.data() + name.size();
  const auto [ptr, ec] = std::from_chars(begin, end, step);
  if (ec != std::errc() || ptr != end) return std::nullopt;
  return step;
}

struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

[[noreturn]] void fail_errno(int rank, const std::string& what, const fs::path& path) {
  throw CheckpointError(rank, "checkpoint",
                        what + " " + path.string() + ": " + std::strerror(errno));
}

void write_file(int rank, const fs::path& path, std::span<const std::byte> bytes) {
  Fd file{::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)};
  if (file.fd < 0) fail_errno(rank, "cannot create", path);
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(file.fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail_errno(rank, "cannot write", path);
    }
    done += static_cast<std::size_t>(n);
  }
  if (::fsync(file.fd) != 0) fail_errno(rank, "cannot fsync", path);
  const int fd = file.fd;
  file.fd = -1;
  if (::close(fd) != 0) fail_errno(rank, "cannot close", path);
}

void fsync_directory(int rank, const fs::path& path) {
  Fd dir{::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)};
  if (dir.fd < 0) fail_errno(rank, "cannot open directory", path);
  if (::fsync(dir.fd) != 0) fail_errno(rank, "cannot fsync directory", path);
}

std::vector<std::byte> read_file(const fs::path& path, std::size_t expected) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path.filename().string());
  std::vector<std::byte> bytes(expected);
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(expected));
  if (static_cast<std::size_t>(in.gcount()) != expected) {
    throw std::runtime_error(path.filename().string() + " holds " + std::to_string(in.gcount()) +
                             " bytes, the manifest says " + std::to_string(expected));
  }
  if (in.peek() != std::char_traits<char>::eof()) {
    throw std::runtime_error(path.filename().string() + " is longer than the manifest says");
  }
  return bytes;
}

// Reads and verifies one checkpoint directory; throws std::runtime_error saying what is wrong.
Checkpoint read_checkpoint(const fs::path& dir, std::uint64_t step) {
  const fs::path manifest_path = dir / "manifest.json";
  std::ifstream in(manifest_path);
  if (!in) throw std::runtime_error("no manifest.json (an incomplete write?)");
  nlohmann::json manifest;
  try {
    manifest = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& error) {
    throw std::runtime_error(std::string("manifest.json is not valid JSON: ") + error.what());
  }
  try {
    if (manifest.at("format").get<int>() != kFormat) {
      throw std::runtime_error("manifest format " + manifest.at("format").dump() +
                               ", this build reads " + std::to_string(kFormat));
    }
    if (manifest.at("step").get<std::uint64_t>() != step) {
      throw std::runtime_error("manifest names step " + manifest.at("step").dump());
    }
    Checkpoint checkpoint;
    checkpoint.step = step;
    checkpoint.metadata_json = manifest.at("metadata").dump();
    for (const auto& blob : manifest.at("blobs")) {
      const auto name = blob.at("name").get<std::string>();
      const auto file = blob.at("file").get<std::string>();
      if (file.find('/') != std::string::npos || file == ".." || file == ".") {
        throw std::runtime_error("blob file name '" + file + "' leaves the directory");
      }
      const auto bytes = blob.at("bytes").get<std::uint64_t>();
      const auto expected = blob.at("xxh3").get<std::uint64_t>();
      auto data = read_file(dir / file, static_cast<std::size_t>(bytes));
      if (checksum(data) != expected) {
        throw std::runtime_error("blob '" + name + "' fails its checksum (damaged)");
      }
      checkpoint.blobs.emplace(name, std::move(data));
    }
    return checkpoint;
  } catch (const nlohmann::json::exception& error) {
    throw std::runtime_error(std::string("manifest.json is malformed: ") + error.what());
  }
}

}  // namespace

Checkpointer::Checkpointer(std::filesystem::path directory, CheckpointOptions options)
    : directory_(std::move(directory)), options_(options) {
  if (options_.keep == 0) throw ConfigError(options_.rank, "checkpoint", "keep must be at least 1");
  std::error_code error;
  fs::create_directories(directory_, error);
  if (error || !fs::is_directory(directory_)) {
    throw CheckpointError(options_.rank, "checkpoint",
                          "cannot use directory " + directory_.string() + ": " +
                              (error ? error.message() : "not a directory"));
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
    if (failure && !error_) error_ = failure;
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
  try {
    (void)nlohmann::json::parse(checkpoint.metadata_json).is_object();
  } catch (const nlohmann::json::exception& error) {
    throw CheckpointError(rank, "checkpoint", std::string("metadata is not JSON: ") + error.what());
  }
  const std::string name = step_name(checkpoint.step);
  const fs::path final_dir = directory_ / name;
  const fs::path temp_dir = directory_ / (".tmp-" + name + "-" + std::to_string(::getpid()));
  std::error_code ignored;
  fs::remove_all(temp_dir, ignored);
  try {
    if (!fs::create_directory(temp_dir)) {
      throw CheckpointError(rank, "checkpoint", "cannot create " + temp_dir.string());
    }
  } catch (const fs::filesystem_error& error) {
    throw CheckpointError(rank, "checkpoint",
                          "cannot create " + temp_dir.string() + ": " + error.code().message());
  }
  try {
    nlohmann::json blobs = nlohmann::json::array();
    std::size_t index = 0;
    for (const auto& [blob_name, bytes] : checkpoint.blobs) {
      const std::string file = std::to_string(index++) + ".blob";
      write_file(rank, temp_dir / file, bytes);
      blobs.push_back({{"name", blob_name},
                       {"file", file},
                       {"bytes", bytes.size()},
                       {"xxh3", checksum(bytes)}});
    }
    const nlohmann::json manifest{{"format", kFormat},
                                  {"step", checkpoint.step},
                                  {"blobs", blobs},
                                  {"metadata", nlohmann::json::parse(checkpoint.metadata_json)}};
    const std::string text = manifest.dump(1);
    write_file(rank, temp_dir / "manifest.json", std::as_bytes(std::span(text)));
    fsync_directory(rank, temp_dir);
    // Replacing an existing checkpoint of the same step: move it away first (rename cannot
    // replace a non-empty directory).
    if (fs::exists(final_dir)) fs::remove_all(final_dir);
    fs::rename(temp_dir, final_dir);
    fsync_directory(rank, directory_);
  } catch (const fs::filesystem_error& error) {
    fs::remove_all(temp_dir, ignored);
    throw CheckpointError(rank, "checkpoint",
                          "cannot write step " + std::to_string(checkpoint.step) + " to " +
                              directory_.string() + ": " + error.code().message());
  } catch (...) {
    fs::remove_all(temp_dir, ignored);
    throw;
  }
  prune();
}

void Checkpointer::prune() {
  const auto all = steps();
  for (std::size_t i = options_.keep; i < all.size(); ++i) {
    std::error_code ignored;
    fs::remove_all(directory_ / step_name(all[i]), ignored);
  }
}

std::vector<std::uint64_t> Checkpointer::steps() const {
  std::vector<std::uint64_t> found;
  std::error_code error;
  for (const auto& entry : fs::directory_iterator(directory_, error)) {
    if (!entry.is_directory()) continue;
    if (const auto step = parse_step(entry.path().filename().string())) found.push_back(*step);
  }
  std::sort(found.rbegin(), found.rend());
  return found;
}

std::optional<Checkpoint> Checkpointer::load_latest(std::vector<std::string>* skipped) const {
  for (const std::uint64_t step : steps()) {
    try {
      return read_checkpoint(directory_ / step_name(step), step);
    } catch (const std::exception& error) {
      if (skipped) {
        skipped->push_back((directory_ / step_name(step)).string() + ": " + error.what());
      }
    }
  }
  return std::nullopt;
}

Checkpoint Checkpointer::load(std::uint64_t step) const {
  const fs::path dir = directory_ / step_name(step);
  if (!fs::is_directory(dir)) {
    throw CheckpointError(options_.rank, "checkpoint", "no checkpoint " + dir.string());
  }
  try {
    return read_checkpoint(dir, step);
  } catch (const std::exception& error) {
    throw CheckpointError(options_.rank, "checkpoint", dir.string() + ": " + error.what());
  }
}

TieredCheckpointer::TieredCheckpointer(TieredCheckpointOptions options)
    : options_(std::move(options)) {
  if (options_.fast_every > 0) fast_.emplace(options_.fast_directory, options_.options);
  if (options_.persistent_every > 0) {
    persistent_.emplace(options_.persistent_directory, options_.options);
  }
}

bool TieredCheckpointer::due(std::uint64_t step) const noexcept {
  return (fast_ && step % options_.fast_every == 0) ||
         (persistent_ && step % options_.persistent_every == 0);
}

bool TieredCheckpointer::maybe_save(std::uint64_t step, const std::function<Checkpoint()>& make) {
  if (!due(step)) return false;
  Checkpoint checkpoint = make();
  checkpoint.step = step;
  const bool to_fast = fast_ && step % options_.fast_every == 0;
  const bool to_persistent = persistent_ && step % options_.persistent_every == 0;
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
