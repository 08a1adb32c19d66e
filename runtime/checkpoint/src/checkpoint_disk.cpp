#include "checkpoint_disk.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__x86_64__)
#define XXH_DISPATCH_DISABLE_REPLACE 1
#include <xxh_x86dispatch.h>
#else
#include <xxhash.h>
#endif
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <set>
#include <stdexcept>

#include "unimsg/core/error.hpp"

namespace unimsg::checkpoint_disk {
namespace {

constexpr std::string_view kPrefix = "step-";
constexpr std::string_view kTemporaryPrefix = ".tmp-";
constexpr std::string_view kSetAsidePrefix = ".old-";
constexpr std::size_t kVerifyChunk = std::size_t{1} << 20;

[[noreturn]] void fail_errno(int rank, const std::string& what, const fs::path& path) {
  throw CheckpointError(rank, "checkpoint",
                        what + " " + path.string() + ": " + std::strerror(errno));
}

// Host names go into directory names: anything but letters, digits, dots and dashes becomes '_'.
const std::string& this_host() {
  static const std::string host = [] {
    char name[256] = {};
    if (::gethostname(name, sizeof name - 1) != 0 || name[0] == '\0') return std::string("host");
    std::string text(name);
    for (char& c : text) {
      const bool plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                         (c >= '0' && c <= '9') || c == '.' || c == '-';
      if (!plain) c = '_';
    }
    return text;
  }();
  return host;
}

template <typename Integer>
std::optional<Integer> parse_integer(std::string_view text) {
  Integer value = 0;
  const auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (text.empty() || ec != std::errc() || ptr != text.data() + text.size()) return std::nullopt;
  return value;
}

struct BlobEntry {
  std::string name;
  std::string file;
  std::uint64_t bytes = 0;
  std::uint64_t xxh3 = 0;
};
struct Manifest {
  std::string metadata_json;
  std::vector<BlobEntry> blobs;
};

nlohmann::json read_manifest_json(const fs::path& dir) {
  const fs::path path = dir / "manifest.json";
  std::error_code error;
  const auto size = fs::file_size(path, error);
  if (error) throw std::runtime_error("no manifest.json (an incomplete write?)");
  if (size > kMaxManifestBytes) {
    throw std::runtime_error("manifest.json is " + std::to_string(size) +
                             " bytes, more than a manifest may hold (" +
                             std::to_string(kMaxManifestBytes) + ")");
  }
  std::ifstream in(path);
  if (!in) throw std::runtime_error("no manifest.json (an incomplete write?)");
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& failure) {
    throw std::runtime_error(std::string("manifest.json is not valid JSON: ") + failure.what());
  }
}

// A blob's file must be a regular file of exactly the announced size: checked here, before
// anything is allocated for it.
void check_blob_file(const fs::path& dir, const BlobEntry& blob) {
  const fs::path path = dir / blob.file;
  std::error_code error;
  const auto status = fs::symlink_status(path, error);
  if (error || !fs::exists(status)) throw std::runtime_error("cannot open " + blob.file);
  if (!fs::is_regular_file(status)) throw std::runtime_error(blob.file + " is not a plain file");
  const auto size = fs::file_size(path, error);
  if (error) throw std::runtime_error("cannot read the size of " + blob.file);
  if (size != blob.bytes) {
    throw std::runtime_error(blob.file + " holds " + std::to_string(size) +
                             " bytes, the manifest says " + std::to_string(blob.bytes));
  }
}

BlobEntry parse_blob(const nlohmann::json& blob) {
  BlobEntry entry{blob.at("name").get<std::string>(), blob.at("file").get<std::string>(),
                  blob.at("bytes").get<std::uint64_t>(), blob.at("xxh3").get<std::uint64_t>()};
  if (entry.file.empty() || entry.file.find('/') != std::string::npos || entry.file == ".." ||
      entry.file == ".") {
    throw std::runtime_error("blob file name '" + entry.file + "' leaves the directory");
  }
  return entry;
}

// Parses and checks the manifest and the blob files' sizes; nothing of the blobs is read.
Manifest read_manifest(const fs::path& dir, std::uint64_t step) {
  const nlohmann::json json = read_manifest_json(dir);
  try {
    if (json.at("format").get<int>() != kFormat) {
      throw std::runtime_error("manifest format " + json.at("format").dump() +
                               ", this build reads " + std::to_string(kFormat));
    }
    if (json.at("step").get<std::uint64_t>() != step) {
      throw std::runtime_error("manifest names step " + json.at("step").dump());
    }
    Manifest manifest;
    manifest.metadata_json = json.at("metadata").dump();
    std::set<std::string> names;
    std::set<std::string> files;
    for (const auto& blob : json.at("blobs")) {
      BlobEntry entry = parse_blob(blob);
      if (!names.insert(entry.name).second) {
        throw std::runtime_error("blob '" + entry.name + "' is listed twice");
      }
      if (!files.insert(entry.file).second) {
        throw std::runtime_error("file " + entry.file + " is listed twice");
      }
      manifest.blobs.push_back(std::move(entry));
    }
    for (const auto& blob : manifest.blobs) check_blob_file(dir, blob);
    return manifest;
  } catch (const nlohmann::json::exception& failure) {
    throw std::runtime_error(std::string("manifest.json is malformed: ") + failure.what());
  }
}

std::vector<std::byte> read_blob(const fs::path& dir, const BlobEntry& blob) {
  const fs::path path = dir / blob.file;
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + blob.file);
  std::vector<std::byte> bytes(static_cast<std::size_t>(blob.bytes));
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  // The size was checked a moment ago; a file that changed since is damaged all the same.
  if (static_cast<std::size_t>(in.gcount()) != bytes.size() ||
      in.peek() != std::char_traits<char>::eof()) {
    throw std::runtime_error(blob.file + " changed size while it was read");
  }
  if (checksum(bytes) != blob.xxh3) {
    throw std::runtime_error("blob '" + blob.name + "' fails its checksum (damaged)");
  }
  return bytes;
}

struct HashStateDeleter {
  void operator()(XXH3_state_t* state) const noexcept { XXH3_freeState(state); }
};

void verify_blob(const fs::path& dir, const BlobEntry& blob, std::vector<char>& buffer) {
  std::ifstream in(dir / blob.file, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + blob.file);
  const std::unique_ptr<XXH3_state_t, HashStateDeleter> state(XXH3_createState());
  if (!state || XXH3_64bits_reset(state.get()) != XXH_OK) throw std::bad_alloc();
  std::uint64_t total = 0;
  while (in) {
    in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    const auto got = static_cast<std::size_t>(in.gcount());
    total += got;
#if defined(__x86_64__)
    XXH3_64bits_update_dispatch(state.get(), buffer.data(), got);
#else
    XXH3_64bits_update(state.get(), buffer.data(), got);
#endif
  }
  if (total != blob.bytes) throw std::runtime_error(blob.file + " changed size while it was read");
  if (XXH3_64bits_digest(state.get()) != blob.xxh3) {
    throw std::runtime_error("blob '" + blob.name + "' fails its checksum (damaged)");
  }
}

}  // namespace

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

std::optional<std::uint64_t> parse_step(std::string_view name) {
  if (name.size() <= kPrefix.size() || name.substr(0, kPrefix.size()) != kPrefix) {
    return std::nullopt;
  }
  return parse_integer<std::uint64_t>(name.substr(kPrefix.size()));
}

std::optional<Leftover> parse_leftover(std::string_view name) {
  LeftoverKind kind;
  if (name.substr(0, kTemporaryPrefix.size()) == kTemporaryPrefix) {
    kind = LeftoverKind::kTemporary;
  } else if (name.substr(0, kSetAsidePrefix.size()) == kSetAsidePrefix) {
    kind = LeftoverKind::kSetAside;
  } else {
    return std::nullopt;
  }
  const std::string_view rest = name.substr(kTemporaryPrefix.size());  // both prefixes: 5 chars
  if (rest.substr(0, kPrefix.size()) != kPrefix) return std::nullopt;
  const auto dash = rest.find('-', kPrefix.size());
  if (dash == std::string_view::npos || dash + 1 == rest.size()) return std::nullopt;
  const auto step = parse_step(rest.substr(0, dash));
  if (!step) return std::nullopt;
  return Leftover{kind, *step, std::string(rest.substr(dash + 1))};
}

std::string leftover_name(LeftoverKind kind, std::uint64_t step) {
  static std::atomic<std::uint64_t> sequence{0};
  const std::string_view prefix =
      kind == LeftoverKind::kTemporary ? kTemporaryPrefix : kSetAsidePrefix;
  return std::string(prefix) + step_name(step) + "-" + this_host() + "-" +
         std::to_string(::getpid()) + "-" + std::to_string(sequence++);
}

Fd& Fd::operator=(Fd&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(other.fd_, -1);
  }
  return *this;
}

Fd::~Fd() {
  if (fd_ >= 0) ::close(fd_);
}

DirLock lock_directory(const fs::path& path, bool wait) {
  DirLock lock;
  Fd fd(::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (fd.get() < 0) return lock;
  int rc = 0;
  do {
    rc = ::flock(fd.get(), wait ? LOCK_EX : LOCK_EX | LOCK_NB);
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) {
    if (errno != ENOLCK && errno != EOPNOTSUPP && errno != ENOSYS && errno != EINVAL) {
      lock.state = LockState::kBusy;  // EWOULDBLOCK, or a failure that proves nothing
      return lock;
    }
    lock.state = LockState::kUnsupported;
  } else {
    lock.state = LockState::kHeld;
  }
  // Renamed or removed (and perhaps recreated) between open() and flock(): not the one locked.
  struct stat held {};
  struct stat named {};
  if (::fstat(fd.get(), &held) != 0 || ::lstat(path.c_str(), &named) != 0 ||
      held.st_dev != named.st_dev || held.st_ino != named.st_ino) {
    lock.state = LockState::kGone;
    return lock;
  }
  lock.fd = std::move(fd);
  return lock;
}

bool owner_dead_here(const std::string& owner) {
  // "<host>-<pid>-<seq>"; the host may itself hold dashes.
  const auto last = owner.rfind('-');
  if (last == std::string::npos || last == 0) return false;
  const auto before = owner.rfind('-', last - 1);
  if (before == std::string::npos) return false;
  if (owner.substr(0, before) != this_host()) return false;
  const auto pid =
      parse_integer<int>(std::string_view(owner).substr(before + 1, last - before - 1));
  if (!pid || *pid <= 0 ||
      !parse_integer<std::uint64_t>(std::string_view(owner).substr(last + 1))) {
    return false;
  }
  return ::kill(*pid, 0) != 0 && errno == ESRCH;
}

void write_file(int rank, const fs::path& path, std::span<const std::byte> bytes) {
  Fd file(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (file.get() < 0) fail_errno(rank, "cannot create", path);
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(file.get(), bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail_errno(rank, "cannot write", path);
    }
    done += static_cast<std::size_t>(n);
  }
  if (::fsync(file.get()) != 0) fail_errno(rank, "cannot fsync", path);
  if (::close(file.release()) != 0) fail_errno(rank, "cannot close", path);
}

void fsync_directory(int rank, const fs::path& path) {
  const Fd dir(::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir.get() < 0) fail_errno(rank, "cannot open directory", path);
  if (::fsync(dir.get()) != 0) fail_errno(rank, "cannot fsync directory", path);
}

Checkpoint read_checkpoint(const fs::path& dir, std::uint64_t step) {
  const Manifest manifest = read_manifest(dir, step);
  Checkpoint checkpoint;
  checkpoint.step = step;
  checkpoint.metadata_json = manifest.metadata_json;
  for (const auto& blob : manifest.blobs) checkpoint.blobs.emplace(blob.name, read_blob(dir, blob));
  return checkpoint;
}

void verify_checkpoint(const fs::path& dir, std::uint64_t step) {
  const Manifest manifest = read_manifest(dir, step);
  std::vector<char> buffer(kVerifyChunk);
  for (const auto& blob : manifest.blobs) verify_blob(dir, blob, buffer);
}

void replace_directory(int rank, const fs::path& source, const fs::path& directory,
                       std::uint64_t step) {
  const fs::path target = directory / step_name(step);
  bool exchange = true;
  for (int attempt = 0; attempt < 4; ++attempt) {
#if defined(RENAME_EXCHANGE)
    if (exchange) {
      // One atomic step: the new checkpoint in, the old one out under the temporary name.
      if (::renameat2(AT_FDCWD, source.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) == 0) {
        fsync_directory(rank, directory);
        std::error_code ignored;
        fs::remove_all(source, ignored);
        return;
      }
      if (errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP) {
        exchange = false;  // this filesystem cannot: set aside, below
      } else if (errno != ENOENT) {
        fail_errno(rank, "cannot move the new checkpoint to", target);
      }
    }
#else
    exchange = false;
#endif
    std::error_code error;
    if (!fs::exists(target, error)) {
      if (::rename(source.c_str(), target.c_str()) == 0) return;
      if (errno == ENOTEMPTY || errno == EEXIST) continue;  // another writer's copy appeared
      fail_errno(rank, "cannot move the new checkpoint to", target);
    }
    if (exchange) continue;
    // Without an exchange: the old copy aside (locked, so no cleaner takes it for a dead
    // writer's), the new one in, the old one out. A crash in between leaves the set-aside copy,
    // which the loader reads and the next writer renames back.
    DirLock old = lock_directory(target, /*wait=*/true);
    if (old.state == LockState::kGone) continue;
    const fs::path aside = directory / leftover_name(LeftoverKind::kSetAside, step);
    if (::rename(target.c_str(), aside.c_str()) != 0) {
      if (errno == ENOENT) continue;
      fail_errno(rank, "cannot set aside the previous", target);
    }
    if (::rename(source.c_str(), target.c_str()) != 0) {
      const int cause = errno;
      (void)::rename(aside.c_str(), target.c_str());
      errno = cause;
      fail_errno(rank, "cannot move the new checkpoint to", target);
    }
    fsync_directory(rank, directory);
    fs::remove_all(aside, error);
    return;
  }
  throw CheckpointError(rank, "checkpoint",
                        "cannot replace " + target.string() + ": other writers kept replacing it");
}

std::optional<std::uint64_t> fingerprint(const fs::path& dir) {
  std::vector<std::uint64_t> facts;
  const auto add = [&](const struct stat& info) {
    facts.insert(
        facts.end(),
        {static_cast<std::uint64_t>(info.st_dev), static_cast<std::uint64_t>(info.st_ino),
         static_cast<std::uint64_t>(info.st_size), static_cast<std::uint64_t>(info.st_mtim.tv_sec),
         static_cast<std::uint64_t>(info.st_mtim.tv_nsec)});
  };
  struct stat info {};
  if (::lstat(dir.c_str(), &info) != 0 || !S_ISDIR(info.st_mode)) return std::nullopt;
  add(info);
  std::vector<fs::path> files = entries_of(dir);
  std::sort(files.begin(), files.end());
  for (const auto& file : files) {
    if (::lstat(file.c_str(), &info) != 0) return std::nullopt;
    add(info);
    const std::string name = file.filename().string();
    facts.push_back(checksum(std::as_bytes(std::span(name))));
  }
  return checksum(std::as_bytes(std::span(facts)));
}

std::vector<fs::path> entries_of(const fs::path& dir) {
  std::vector<fs::path> entries;
  std::error_code error;
  for (fs::directory_iterator it(dir, error); !error && it != fs::directory_iterator();
       it.increment(error)) {
    entries.push_back(it->path());
  }
  return entries;
}

std::vector<fs::path> copies_of(const fs::path& directory, std::uint64_t step) {
  std::vector<fs::path> copies;
  const fs::path main = directory / step_name(step);
  std::error_code error;
  if (fs::is_directory(main, error)) copies.push_back(main);
  std::vector<fs::path> set_aside;
  for (const fs::path& entry : entries_of(directory)) {
    const auto leftover = parse_leftover(entry.filename().string());
    if (leftover && leftover->kind == LeftoverKind::kSetAside && leftover->step == step) {
      set_aside.push_back(entry);
    }
  }
  std::sort(set_aside.begin(), set_aside.end());
  copies.insert(copies.end(), set_aside.begin(), set_aside.end());
  return copies;
}

}  // namespace unimsg::checkpoint_disk
