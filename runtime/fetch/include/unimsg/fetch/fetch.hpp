#pragma once

// Downloads into a content-addressed cache: what training data fetching is made of.
//
//   FetchOptions options;
//   options.cache = "/var/cache/unimsg";
//   const FetchOutcome got = fetch_file({"train.gz", "https://.../train.gz", "<sha256>"}, options);
//   // got.status: downloaded | cached | failed; got.path: <cache>/objects/<sha256>
//
// A file is streamed to <cache>/partial/<sha256>.part and renamed into <cache>/objects/<sha256>
// only once its size and SHA-256 check out, so the cache never holds a bad file. An interrupted
// download resumes with a Range request. Every process on a node that wants the same file takes
// the same lock (<cache>/locks/<sha256>.lock, flock): one downloads, the others find it cached.
//
// Each attempt is classified: retryable (5xx, 408, 429, connection refused or reset, a transfer
// cut short, a timeout) are retried with exponential back-off and jitter up to the attempt limit;
// permanent ones (other 4xx, a missing file:// path, a malformed URL) are not; a checksum or size
// mismatch after a complete download is retried once from scratch, then fails. Every attempt is
// logged. http, https and file URLs (libcurl).

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace spdlog {
class logger;
}

namespace unimsg {

struct FetchSpec {
  std::string name;    // a label for logs and results (e.g. the file name)
  std::string url;     // http://, https:// or file://
  std::string sha256;  // 64 lowercase hex digits
  std::optional<std::uint64_t> size;
};

// `{"files":[{"name":…,"url":…,"sha256":…,"size":…}]}`; ConfigError naming the entry and field
// at fault (missing, wrong type, a sha256 that is not 64 hex digits, a scheme other than http,
// https or file, a name used twice).
std::vector<FetchSpec> parse_manifest(std::string_view json_text);

struct FetchOptions {
  std::filesystem::path cache = "unimsg-cache";
  int max_attempts = 5;                               // per file, the first included
  std::chrono::milliseconds attempt_timeout{300000};  // one attempt, start to end
  std::chrono::milliseconds connect_timeout{10000};
  std::chrono::milliseconds backoff{250};  // before the 2nd attempt; doubles, with jitter
  std::chrono::milliseconds max_backoff{10000};
  std::uint64_t max_bytes_per_second = 0;  // per transfer; 0: unlimited
  // The most bytes a file without a `size` may have (with one, the size is the bound): a
  // transfer that goes past its bound is aborted, so an endless response cannot fill the disk.
  std::uint64_t max_file_bytes = std::uint64_t{64} << 30;
  // Called with (bytes so far, total or 0) at most every progress_interval during a transfer.
  std::function<void(const FetchSpec&, std::uint64_t, std::uint64_t)> progress;
  std::chrono::milliseconds progress_interval{2000};
};

enum class FetchStatus { kDownloaded, kCached, kFailed };
const char* to_string(FetchStatus status) noexcept;

struct FetchOutcome {
  std::string name;
  FetchStatus status = FetchStatus::kFailed;
  int attempts = 0;         // transfers started
  std::uint64_t bytes = 0;  // received over the network by this call (resumes count once)
  double seconds = 0;
  std::filesystem::path path;  // the cached object, when not failed
  std::string error;           // why it failed (the last attempt's cause)
};

// Blocking; thread-safe (any number of calls at once, also from several processes sharing a
// cache). Never throws for download failures (they are the outcome's status); throws Error for
// a cache directory that cannot be created or written.
FetchOutcome fetch_file(const FetchSpec& spec, const FetchOptions& options,
                        const std::shared_ptr<spdlog::logger>& log = nullptr);

// The path a verified object has in `cache`, if it is there.
std::optional<std::filesystem::path> cached_object(const std::filesystem::path& cache,
                                                   const std::string& sha256);

// `url` fit for an error or a log: the password of user:password@ and the value of every query
// parameter (tokens, signatures) replaced with ***.
std::string redact_url(std::string_view url);

// The schemes a redirect from `url` may lead to (libcurl's CURLOPT_REDIR_PROTOCOLS_STR): from
// https only https, so a redirect never downgrades; from anything else http or https.
std::string allowed_redirect_protocols(std::string_view url);

// SHA-256 of a file, lowercase hex (OpenSSL).
std::string sha256_file(const std::filesystem::path& path);

}  // namespace unimsg
