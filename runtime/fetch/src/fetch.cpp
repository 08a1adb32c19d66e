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
#include <exception>
#include <fstream>
#include <limits>
#include <mutex>
#include <random>
#include <span>
#include <thread>

#include "fetch_internal.hpp"
#include "unimsg/core/error.hpp"

namespace unimsg {
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

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
  std::string digest;         // of the whole file, when done
  bool drop_partial = false;  // what it kept is no use to a later attempt
};

struct TransferState {
  std::FILE* file = nullptr;
  Sha256* hash = nullptr;  // hashed as it streams: no second pass over the file
  std::uint64_t resume_from = 0;
  std::uint64_t received = 0;
  std::uint64_t bound = 0;  // the most bytes the whole file may have
  bool over_bound = false;
  bool checked_status = false;
  bool restarted = false;  // the server ignored the Range request: start the file over
  CURL* curl = nullptr;
  const FetchSpec* spec = nullptr;
  const FetchOptions* options = nullptr;
  Clock::time_point last_progress;
  // Thrown inside a callback: an exception must not unwind through libcurl's C frames, so it
  // waits here until curl_easy_perform has returned.
  std::exception_ptr callback_error;
};

// The bytes of the file this transfer's response starts at.
std::uint64_t base_offset(const TransferState& state) {
  return state.restarted ? 0 : state.resume_from;
}

// The write callback's work; returns false to abort the transfer.
bool write_chunk(TransferState& state, std::span<const char> chunk) {
  if (!state.checked_status) {
    state.checked_status = true;
    long code = 0;
    curl_easy_getinfo(state.curl, CURLINFO_RESPONSE_CODE, &code);
    if (state.resume_from > 0 && code == 200) {
      // A full body instead of the asked-for range: what was kept is overwritten.
      if (std::fseek(state.file, 0, SEEK_SET) != 0 || ::ftruncate(::fileno(state.file), 0) != 0) {
        return false;
      }
      state.restarted = true;
      state.hash->reset();
    }
  }
  // Checked before writing: the partial file never holds more than the bound, however many
  // attempts resume it.
  if (chunk.size() > state.bound - std::min(state.bound, base_offset(state) + state.received)) {
    state.over_bound = true;
    return false;
  }
  if (std::fwrite(chunk.data(), 1, chunk.size(), state.file) != chunk.size()) return false;
  state.hash->update(chunk.data(), chunk.size());
  state.received += chunk.size();
  return true;
}

std::size_t write_body(char* data, std::size_t size, std::size_t count, void* user) {
  auto& state = *static_cast<TransferState*>(user);
  const std::size_t bytes = size * count;
  try {
    // Any other count than `bytes` aborts (CURLE_WRITE_ERROR); 0 is never a valid chunk size.
    return write_chunk(state, std::span<const char>(data, bytes)) ? bytes : 0;
  } catch (...) {
    state.callback_error = std::current_exception();
    return 0;
  }
}

int on_progress(void* user, curl_off_t total, curl_off_t now, curl_off_t, curl_off_t) {
  auto& state = *static_cast<TransferState*>(user);
  if (!state.options->progress) return 0;
  const auto time = Clock::now();
  if (time - state.last_progress < state.options->progress_interval) return 0;
  state.last_progress = time;
  const std::uint64_t base = base_offset(state);
  try {
    state.options->progress(*state.spec, base + static_cast<std::uint64_t>(now),
                            total > 0 ? base + static_cast<std::uint64_t>(total) : 0);
  } catch (...) {
    state.callback_error = std::current_exception();
    return 1;  // non-zero: libcurl aborts the transfer (CURLE_ABORTED_BY_CALLBACK)
  }
  return 0;
}

// Rethrows what a callback threw, as an unimsg Error (an Error thrown, a cancellation's
// ShutdownError say, is kept as it was).
[[noreturn]] void rethrow_callback_error(const std::exception_ptr& error, const FetchSpec& spec) {
  try {
    std::rethrow_exception(error);
  } catch (const Error&) {
    throw;
  } catch (const std::exception& thrown) {
    throw Error(kNoRank, "fetch",
                "the progress callback for '" + spec.name + "' threw: " + thrown.what());
  } catch (...) {
    throw Error(kNoRank, "fetch",
                "the progress callback for '" + spec.name + "' threw a non-standard exception");
  }
}

std::string bound_error(const FetchSpec& spec, std::uint64_t bound) {
  if (spec.size) {
    return "larger than the expected size of " + std::to_string(bound) +
           " bytes (the manifest's \"size\"): transfer aborted";
  }
  return "larger than the cap of " + std::to_string(bound) +
         " bytes for a file without a size (max_file_bytes; unimsg-fetch --max-size): transfer "
         "aborted";
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

void set_options(CURL* c, const FetchSpec& spec, const FetchOptions& options, TransferState& state,
                 char* error_text) {
  curl_easy_setopt(c, CURLOPT_URL, spec.url.c_str());
  curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https,file");
  curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 1L);
  curl_easy_setopt(c, CURLOPT_MAXREDIRS, 10L);
  // Never from https down to http, never to file:// or another scheme.
  const std::string redirects = allowed_redirect_protocols(spec.url);
  curl_easy_setopt(c, CURLOPT_REDIR_PROTOCOLS_STR, redirects.c_str());
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
  // A response that announces more than the bound is refused before its body (the write
  // callback catches the ones that announce nothing). A full body instead of a resumed range
  // announces the whole size, hence the bound rather than what is left of it. 0 means no limit
  // to libcurl: an empty file's bound is left to the write callback.
  if (state.bound > 0) {
    curl_easy_setopt(c, CURLOPT_MAXFILESIZE_LARGE,
                     static_cast<curl_off_t>(std::min<std::uint64_t>(
                         state.bound, std::numeric_limits<curl_off_t>::max())));
  }
  if (options.max_bytes_per_second > 0) {
    curl_easy_setopt(c, CURLOPT_MAX_RECV_SPEED_LARGE,
                     static_cast<curl_off_t>(options.max_bytes_per_second));
  }
  if (state.resume_from > 0) {
    curl_easy_setopt(c, CURLOPT_RESUME_FROM_LARGE, static_cast<curl_off_t>(state.resume_from));
  }
}

// The verdict on a transfer that did not end with CURLE_OK.
void classify_failure(Attempt& attempt, CURL* c, CURLcode result, const TransferState& state,
                      const FetchSpec& spec, const std::string& curl_text) {
  const std::string detail = detail::redact_text(curl_text, spec.url);
  long http = 0;
  curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &http);
  long redirects = 0;
  curl_easy_getinfo(c, CURLINFO_REDIRECT_COUNT, &redirects);
  if (state.over_bound || result == CURLE_FILESIZE_EXCEEDED) {
    // More bytes than the file may have: another attempt would only fetch them again.
    attempt.verdict = Verdict::kPermanent;
    attempt.drop_partial = true;
    attempt.error = bound_error(spec, state.bound);
  } else if (result == CURLE_HTTP_RETURNED_ERROR) {
    attempt.verdict = http == 416 ? Verdict::kRetryFromScratch : classify_http(http);
    attempt.error = "HTTP " + std::to_string(http) + " (" + detail + ")";
  } else if (result == CURLE_UNSUPPORTED_PROTOCOL && redirects > 0) {
    const char* target = nullptr;
    curl_easy_getinfo(c, CURLINFO_EFFECTIVE_URL, &target);
    attempt.verdict = Verdict::kPermanent;
    attempt.error = "redirect to '" + redact_url(target ? target : "?") + "' refused: only " +
                    allowed_redirect_protocols(spec.url) + " may be followed from this URL (" +
                    detail + ")";
  } else {
    attempt.verdict = classify_curl(result);
    attempt.error = detail;
  }
}

// One transfer into `part`, resuming from its current length.
Attempt transfer(const FetchSpec& spec, const FetchOptions& options, const fs::path& part) {
  Attempt attempt;
  const std::uint64_t bound = spec.size.value_or(options.max_file_bytes);
  std::error_code ignored;
  std::uint64_t have = fs::exists(part, ignored) ? fs::file_size(part, ignored) : 0;
  if (have > bound) {
    fs::remove(part, ignored);  // left by an attempt with another bound: not worth resuming
    have = 0;
  }
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
  state.bound = bound;
  state.curl = curl.get();
  state.spec = &spec;
  state.options = &options;
  state.last_progress = Clock::now();
  char error_text[CURL_ERROR_SIZE] = {0};
  set_options(curl.get(), spec, options, state, error_text);
  const CURLcode result = curl_easy_perform(curl.get());
  if (state.callback_error) rethrow_callback_error(state.callback_error, spec);
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
  classify_failure(attempt, curl.get(), result, state, spec,
                   error_text[0] != 0 ? error_text : curl_easy_strerror(result));
  return attempt;
}

void create_cache_dirs(const fs::path& cache) {
  for (const char* sub : {"objects", "partial", "locks"}) {
    std::error_code error;
    fs::create_directories(cache / sub, error);
    if (error) {
      throw Error(kNoRank, "fetch",
                  "cannot create " + (cache / sub).string() + ": " + error.message());
    }
  }
}

// Exponential back-off with full jitter (AWS's advice): spreads retrying ranks apart.
void back_off(const FetchOptions& options, int attempt, std::mt19937_64& jitter) {
  const auto ceiling =
      std::min(options.max_backoff.count(), options.backoff.count() << std::min(attempt - 2, 20));
  const auto wait = std::uniform_int_distribution<long long>(ceiling / 2, ceiling)(jitter);
  std::this_thread::sleep_for(std::chrono::milliseconds(wait));
}

// A complete download goes into the cache if its size and digest check out; otherwise it is
// deleted (never resume onto bad bytes) and the mismatch returned.
std::optional<std::string> store_if_verified(const FetchSpec& spec, const fs::path& part,
                                             const fs::path& object, const std::string& digest,
                                             std::uint64_t& size) {
  std::error_code error;
  size = fs::file_size(part, error);
  if ((!spec.size || *spec.size == size) && digest == spec.sha256) {
    fs::rename(part, object, error);
    if (error) {
      throw Error(kNoRank, "fetch",
                  "cannot move " + part.string() + " into the cache: " + error.message());
    }
    return std::nullopt;
  }
  fs::remove(part, error);
  return spec.size && *spec.size != size
             ? "size " + std::to_string(size) + " instead of " + std::to_string(*spec.size)
             : "sha256 " + digest + " instead of " + spec.sha256;
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
  if (!detail::is_sha256(spec.sha256)) {
    return finish(FetchStatus::kFailed, "sha256 '" + spec.sha256 + "' is not 64 hex digits");
  }
  create_cache_dirs(options.cache);
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
    if (attempt > 1) back_off(options, attempt, jitter);
    ++outcome.attempts;
    const Attempt result = transfer(spec, options, part);
    outcome.bytes += result.received;
    if (result.verdict == Verdict::kDone) {
      std::uint64_t size = 0;
      const auto mismatch = store_if_verified(spec, part, object, result.digest, size);
      if (!mismatch) {
        if (log) {
          log->debug("fetch name={} attempt={}/{} result=verified bytes={} received={}", spec.name,
                     attempt, options.max_attempts, size, outcome.bytes);
        }
        outcome.path = object;
        return finish(FetchStatus::kDownloaded);
      }
      last_error = *mismatch;
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
    if (result.verdict == Verdict::kRetryFromScratch || result.drop_partial) {
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
  std::error_code error;
  if (fs::exists(part, error) && fs::file_size(part, error) == 0) fs::remove(part, error);
  return finish(FetchStatus::kFailed,
                "gave up after " + std::to_string(outcome.attempts) + " attempts: " + last_error);
}

}  // namespace unimsg
