#include "unimsg/fetch/fetch.hpp"

#include <curl/curl.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <spdlog/spdlog.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <thread>

#include "unimsg/core/error.hpp"

namespace unimsg {
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

bool is_sha256(const std::string& text) {
  return text.size() == 64 && std::all_of(text.begin(), text.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

// libcurl wants one process-wide initialisation before any thread uses it.
void init_curl_once() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
      throw Error(kNoRank, "fetch", "curl_global_init failed");
    }
  });
}

struct CurlDeleter {
  void operator()(CURL* handle) const noexcept { curl_easy_cleanup(handle); }
};
using CurlHandle = std::unique_ptr<CURL, CurlDeleter>;

struct FileDeleter {
  void operator()(std::FILE* file) const noexcept { std::fclose(file); }
};
using File = std::unique_ptr<std::FILE, FileDeleter>;

// An flock held on a lock file for as long as it lives.
class FileLock {
 public:
  explicit FileLock(const fs::path& path) {
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0) {
      throw Error(kNoRank, "fetch",
                  "cannot open lock file " + path.string() + ": " + std::strerror(errno));
    }
    while (::flock(fd_, LOCK_EX) != 0) {
      if (errno != EINTR) {
        const int saved = errno;
        ::close(fd_);
        throw Error(kNoRank, "fetch", "cannot lock " + path.string() + ": " + std::strerror(saved));
      }
    }
  }
  ~FileLock() {
    ::flock(fd_, LOCK_UN);
    ::close(fd_);
  }
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;

 private:
  int fd_ = -1;
};

// SHA-256 fed as bytes arrive (OpenSSL's EVP).
class Sha256 {
 public:
  Sha256() : context_(EVP_MD_CTX_new(), &EVP_MD_CTX_free) { reset(); }
  void reset() {
    if (!context_ || EVP_DigestInit_ex(context_.get(), EVP_sha256(), nullptr) != 1) {
      throw Error(kNoRank, "fetch", "cannot start a SHA-256 digest");
    }
  }
  void update(const void* data, std::size_t size) { EVP_DigestUpdate(context_.get(), data, size); }
  std::string hex() {
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int length = 0;
    EVP_DigestFinal_ex(context_.get(), digest, &length);
    static const char* kHex = "0123456789abcdef";
    std::string text;
    for (unsigned int i = 0; i < length; ++i) {
      text += kHex[digest[i] >> 4];
      text += kHex[digest[i] & 15];
    }
    return text;
  }
  // Feeds the first `limit` bytes of `path`.
  void update_from_file(const fs::path& path, std::uint64_t limit) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error(kNoRank, "fetch", "cannot read " + path.string());
    std::vector<char> buffer(1 << 20);
    while (limit > 0 && in) {
      in.read(buffer.data(),
              static_cast<std::streamsize>(std::min<std::uint64_t>(buffer.size(), limit)));
      const auto got = static_cast<std::uint64_t>(in.gcount());
      update(buffer.data(), got);
      limit -= got;
    }
    if (in.bad()) throw Error(kNoRank, "fetch", "error reading " + path.string());
  }

 private:
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> context_;
};

enum class Verdict { kDone, kRetry, kRetryFromScratch, kPermanent };

struct Attempt {
  Verdict verdict = Verdict::kPermanent;
  std::string error;
  std::uint64_t received = 0;
  std::string digest;  // of the whole file, when done
};

struct TransferState {
  std::FILE* file = nullptr;
  Sha256* hash = nullptr;  // hashed as it streams: no second pass over the file
  std::uint64_t resume_from = 0;
  std::uint64_t received = 0;
  bool checked_status = false;
  bool restarted = false;  // the server ignored the Range request: start the file over
  CURL* curl = nullptr;
  const FetchSpec* spec = nullptr;
  const FetchOptions* options = nullptr;
  Clock::time_point last_progress;
};

std::size_t write_body(char* data, std::size_t size, std::size_t count, void* user) {
  auto& state = *static_cast<TransferState*>(user);
  if (!state.checked_status) {
    state.checked_status = true;
    long code = 0;
    curl_easy_getinfo(state.curl, CURLINFO_RESPONSE_CODE, &code);
    if (state.resume_from > 0 && code == 200) {
      // A full body instead of the asked-for range: what was kept is overwritten.
      if (std::fseek(state.file, 0, SEEK_SET) != 0 || ::ftruncate(::fileno(state.file), 0) != 0) {
        return 0;
      }
      state.restarted = true;
      state.hash->reset();
    }
  }
  const std::size_t bytes = size * count;
  if (std::fwrite(data, 1, bytes, state.file) != bytes) return 0;  // disk full: abort
  state.hash->update(data, bytes);
  state.received += bytes;
  return bytes;
}

int on_progress(void* user, curl_off_t total, curl_off_t now, curl_off_t, curl_off_t) {
  auto& state = *static_cast<TransferState*>(user);
  if (!state.options->progress) return 0;
  const auto time = Clock::now();
  if (time - state.last_progress < state.options->progress_interval) return 0;
  state.last_progress = time;
  const std::uint64_t base = state.restarted ? 0 : state.resume_from;
  state.options->progress(*state.spec, base + static_cast<std::uint64_t>(now),
                          total > 0 ? base + static_cast<std::uint64_t>(total) : 0);
  return 0;
}

Verdict classify_http(long code) {
  if (code == 408 || code == 429 || code >= 500) return Verdict::kRetry;
  return Verdict::kPermanent;
}

Verdict classify_curl(CURLcode code) {
  switch (code) {
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_PARTIAL_FILE:
    case CURLE_RECV_ERROR:
    case CURLE_SEND_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
      return Verdict::kRetry;
    case CURLE_RANGE_ERROR:
    case CURLE_BAD_DOWNLOAD_RESUME:
      return Verdict::kRetryFromScratch;
    default:
      return Verdict::kPermanent;
  }
}

// One transfer into `part`, resuming from its current length.
Attempt transfer(const FetchSpec& spec, const FetchOptions& options, const fs::path& part) {
  Attempt attempt;
  std::error_code ignored;
  const std::uint64_t have = fs::exists(part, ignored) ? fs::file_size(part, ignored) : 0;
  File file(std::fopen(part.c_str(), "ab"));
  if (!file) {
    throw Error(kNoRank, "fetch", "cannot write " + part.string() + ": " + std::strerror(errno));
  }
  CurlHandle curl(curl_easy_init());
  if (!curl) throw Error(kNoRank, "fetch", "curl_easy_init failed");
  Sha256 hash;
  if (have > 0) hash.update_from_file(part, have);
  TransferState state;
  state.file = file.get();
  state.hash = &hash;
  state.resume_from = have;
  state.curl = curl.get();
  state.spec = &spec;
  state.options = &options;
  state.last_progress = Clock::now();
  char error_text[CURL_ERROR_SIZE] = {0};
  CURL* c = curl.get();
  curl_easy_setopt(c, CURLOPT_URL, spec.url.c_str());
  curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 1L);
  curl_easy_setopt(c, CURLOPT_MAXREDIRS, 10L);
  curl_easy_setopt(c, CURLOPT_FAILONERROR, 1L);  // a 4xx/5xx body is an error page, not data
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);     // timeouts without signals (threads)
  curl_easy_setopt(c, CURLOPT_ERRORBUFFER, error_text);
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, write_body);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, &state);
  curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
  curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, on_progress);
  curl_easy_setopt(c, CURLOPT_XFERINFODATA, &state);
  curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, static_cast<long>(options.attempt_timeout.count()));
  curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS,
                   static_cast<long>(options.connect_timeout.count()));
  if (options.max_bytes_per_second > 0) {
    curl_easy_setopt(c, CURLOPT_MAX_RECV_SPEED_LARGE,
                     static_cast<curl_off_t>(options.max_bytes_per_second));
  }
  if (have > 0) curl_easy_setopt(c, CURLOPT_RESUME_FROM_LARGE, static_cast<curl_off_t>(have));
  const CURLcode result = curl_easy_perform(c);
  long http = 0;
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &http);
  attempt.received = state.received;
  if (std::fflush(file.get()) != 0) {
    attempt.verdict = Verdict::kPermanent;
    attempt.error = "cannot write " + part.string() + ": " + std::strerror(errno);
    return attempt;
  }
  if (result == CURLE_OK) {
    // On disk before it is renamed into the cache, which trusts what it holds.
    if (::fsync(::fileno(file.get())) != 0) {
      attempt.verdict = Verdict::kPermanent;
      attempt.error = "cannot sync " + part.string() + ": " + std::strerror(errno);
      return attempt;
    }
    attempt.verdict = Verdict::kDone;
    attempt.digest = hash.hex();
    return attempt;
  }
  const std::string detail = error_text[0] != 0 ? error_text : curl_easy_strerror(result);
  if (result == CURLE_HTTP_RETURNED_ERROR) {
    attempt.verdict = http == 416 ? Verdict::kRetryFromScratch : classify_http(http);
    attempt.error = "HTTP " + std::to_string(http) + " (" + detail + ")";
  } else {
    attempt.verdict = classify_curl(result);
    attempt.error = detail;
  }
  return attempt;
}

}  // namespace

const char* to_string(FetchStatus status) noexcept {
  switch (status) {
    case FetchStatus::kDownloaded:
      return "downloaded";
    case FetchStatus::kCached:
      return "cached";
    case FetchStatus::kFailed:
      return "failed";
  }
  return "failed";
}

std::vector<FetchSpec> parse_manifest(std::string_view json_text) {
  nlohmann::json document;
  try {
    document = nlohmann::json::parse(json_text);
  } catch (const std::exception& error) {
    throw ConfigError(kNoRank, "manifest", std::string("not valid JSON: ") + error.what());
  }
  if (!document.is_object() || !document.contains("files") || !document["files"].is_array()) {
    throw ConfigError(kNoRank, "manifest", "expected an object with a \"files\" array");
  }
  std::vector<FetchSpec> specs;
  std::set<std::string> names;
  std::size_t index = 0;
  for (const auto& entry : document["files"]) {
    const std::string where = "manifest: files[" + std::to_string(index++) + "]";
    if (!entry.is_object()) throw ConfigError(kNoRank, where, "is not an object");
    const auto text = [&](const char* field) {
      if (!entry.contains(field) || !entry[field].is_string() ||
          entry[field].get<std::string>().empty()) {
        throw ConfigError(kNoRank, where,
                          std::string("\"") + field + "\" is missing or not a non-empty string");
      }
      return entry[field].get<std::string>();
    };
    FetchSpec spec{text("name"), text("url"), text("sha256"), std::nullopt};
    if (!is_sha256(spec.sha256)) {
      throw ConfigError(kNoRank, where + " (" + spec.name + ")",
                        "\"sha256\" must be 64 lowercase hex digits, got '" + spec.sha256 + "'");
    }
    const auto scheme_end = spec.url.find("://");
    const std::string scheme =
        scheme_end == std::string::npos ? "" : spec.url.substr(0, scheme_end);
    if (scheme != "http" && scheme != "https" && scheme != "file") {
      throw ConfigError(kNoRank, where + " (" + spec.name + ")",
                        "\"url\" must be http://, https:// or file://, got '" + spec.url + "'");
    }
    if (entry.contains("size")) {
      if (!entry["size"].is_number_unsigned()) {
        throw ConfigError(kNoRank, where + " (" + spec.name + ")",
                          "\"size\" must be a non-negative integer");
      }
      spec.size = entry["size"].get<std::uint64_t>();
    }
    if (!names.insert(spec.name).second) {
      throw ConfigError(kNoRank, where, "the name '" + spec.name + "' is used twice");
    }
    specs.push_back(std::move(spec));
  }
  return specs;
}

std::string sha256_file(const fs::path& path) {
  std::error_code error;
  const auto size = fs::file_size(path, error);
  if (error) throw Error(kNoRank, "fetch", "cannot read " + path.string() + ": " + error.message());
  Sha256 hash;
  hash.update_from_file(path, size);
  return hash.hex();
}

std::optional<fs::path> cached_object(const fs::path& cache, const std::string& sha256) {
  const fs::path object = cache / "objects" / sha256;
  std::error_code error;
  if (fs::is_regular_file(object, error)) return object;
  return std::nullopt;
}

FetchOutcome fetch_file(const FetchSpec& spec, const FetchOptions& options,
                        const std::shared_ptr<spdlog::logger>& log) {
  init_curl_once();
  const auto start = Clock::now();
  FetchOutcome outcome;
  outcome.name = spec.name;
  const auto finish = [&](FetchStatus status, std::string error = {}) {
    outcome.status = status;
    outcome.error = std::move(error);
    outcome.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    return outcome;
  };
  if (!is_sha256(spec.sha256)) {
    return finish(FetchStatus::kFailed, "sha256 '" + spec.sha256 + "' is not 64 hex digits");
  }
  for (const char* sub : {"objects", "partial", "locks"}) {
    std::error_code error;
    fs::create_directories(options.cache / sub, error);
    if (error) {
      throw Error(kNoRank, "fetch",
                  "cannot create " + (options.cache / sub).string() + ": " + error.message());
    }
  }
  // One download per node: whoever holds the lock downloads; the others then find the object.
  const FileLock lock(options.cache / "locks" / (spec.sha256 + ".lock"));
  if (auto object = cached_object(options.cache, spec.sha256)) {
    outcome.path = *object;
    return finish(FetchStatus::kCached);
  }
  const fs::path part = options.cache / "partial" / (spec.sha256 + ".part");
  const fs::path object = options.cache / "objects" / spec.sha256;
  std::mt19937_64 jitter(std::random_device{}());
  bool mismatch_before = false;
  std::string last_error = "no attempt made (max_attempts < 1)";
  for (int attempt = 1; attempt <= options.max_attempts; ++attempt) {
    if (attempt > 1) {
      // Exponential back-off with full jitter (AWS's advice): spreads retrying ranks apart.
      const auto ceiling = std::min(options.max_backoff.count(), options.backoff.count()
                                                                     << std::min(attempt - 2, 20));
      const auto wait = std::uniform_int_distribution<long long>(ceiling / 2, ceiling)(jitter);
      std::this_thread::sleep_for(std::chrono::milliseconds(wait));
    }
    ++outcome.attempts;
    const Attempt result = transfer(spec, options, part);
    outcome.bytes += result.received;
    if (result.verdict == Verdict::kDone) {
      std::error_code error;
      const std::uint64_t size = fs::file_size(part, error);
      const std::string& digest = result.digest;
      if ((!spec.size || *spec.size == size) && digest == spec.sha256) {
        fs::rename(part, object, error);
        if (error) {
          throw Error(kNoRank, "fetch",
                      "cannot move " + part.string() + " into the cache: " + error.message());
        }
        if (log) {
          log->debug("fetch name={} attempt={}/{} result=verified bytes={} received={}", spec.name,
                     attempt, options.max_attempts, size, outcome.bytes);
        }
        outcome.path = object;
        return finish(FetchStatus::kDownloaded);
      }
      last_error =
          spec.size && *spec.size != size
              ? "size " + std::to_string(size) + " instead of " + std::to_string(*spec.size)
              : "sha256 " + digest + " instead of " + spec.sha256;
      fs::remove(part, error);  // never resume onto bad bytes
      if (log) {
        log->warn("fetch name={} attempt={}/{} result={} error=\"{}\"", spec.name, attempt,
                  options.max_attempts, mismatch_before ? "failed" : "retry-from-scratch",
                  last_error);
      }
      if (mismatch_before) return finish(FetchStatus::kFailed, "checksum mismatch: " + last_error);
      mismatch_before = true;
      continue;
    }
    last_error = result.error;
    if (result.verdict == Verdict::kRetryFromScratch) {
      std::error_code error;
      fs::remove(part, error);
    }
    if (log) {
      log->warn("fetch name={} attempt={}/{} result={} error=\"{}\"", spec.name, attempt,
                options.max_attempts,
                result.verdict == Verdict::kPermanent ? "failed-permanent" : "retry", result.error);
    }
    if (result.verdict == Verdict::kPermanent) {
      std::error_code error;
      if (fs::exists(part, error) && fs::file_size(part, error) == 0) fs::remove(part, error);
      return finish(FetchStatus::kFailed, last_error);
    }
  }
  return finish(FetchStatus::kFailed,
                "gave up after " + std::to_string(outcome.attempts) + " attempts: " + last_error);
}

}  // namespace unimsg
