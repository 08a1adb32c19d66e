// Downloads against a real HTTP server on 127.0.0.1 (cpp-httplib) with injected faults: a 500
// then success, a connection cut mid-body (resumed with Range), a server slower than the
// timeout, a wrong checksum, a 404; the content-addressed cache (one download per node even
// when several want the file at once); file:// URLs; manifest validation. Hardening: an endless
// body cut at its bound (the size, or the cap), redirects to other schemes refused, credentials
// kept out of errors, a progress callback that throws.

#include <gtest/gtest.h>
#include <httplib.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "unimsg/core/error.hpp"
#include "unimsg/fetch/fetch.hpp"

namespace unimsg {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

std::string random_bytes(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::string data(n, '\0');
  for (auto& c : data) c = static_cast<char>(rng() & 0xff);
  return data;
}

std::string sha256_of(const std::string& data, const fs::path& scratch) {
  {
    std::ofstream out(scratch, std::ios::binary);
    out << data;
  }
  return sha256_file(scratch);
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

class FetchTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("unimsg-fetch-test-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    data_ = random_bytes(300000, 1);
    sha_ = sha256_of(data_, dir_ / "scratch");

    server_.Get("/file", [&](const httplib::Request& request, httplib::Response& response) {
      count(request);
      response.set_content(data_, "application/octet-stream");
    });
    server_.Get("/flaky", [&](const httplib::Request& request, httplib::Response& response) {
      if (count(request) == 1) {
        response.status = 500;
        return;
      }
      response.set_content(data_, "application/octet-stream");
    });
    server_.Get("/cut", [&](const httplib::Request& request, httplib::Response& response) {
      if (count(request) == 1) {
        // Announce the whole body, send a third of it, then drop the connection.
        response.set_content_provider(
            data_.size(), "application/octet-stream",
            [&](std::size_t offset, std::size_t, httplib::DataSink& sink) {
              if (offset >= data_.size() / 3) return false;
              sink.write(data_.data(), data_.size() / 3);
              return true;
            });
        return;
      }
      response.set_content(data_, "application/octet-stream");
    });
    server_.Get("/slow", [&](const httplib::Request& request, httplib::Response& response) {
      count(request);
      std::this_thread::sleep_for(1500ms);
      response.set_content(data_, "application/octet-stream");
    });
    server_.Get("/wrong", [&](const httplib::Request& request, httplib::Response& response) {
      count(request);
      response.set_content(random_bytes(1000, 2), "application/octet-stream");
    });
    server_.Get("/missing", [&](const httplib::Request& request, httplib::Response& response) {
      count(request);
      response.status = 404;
    });
    // A body that never ends; a Range request is honoured (206 from the asked offset), so each
    // resumed attempt appends to the same partial file.
    server_.Get("/endless", [&](const httplib::Request& request, httplib::Response& response) {
      count(request);
      if (request.has_header("Range")) {
        const std::string range = request.get_header_value("Range");  // bytes=N-
        response.status = 206;
        response.set_header("Content-Range",
                            "bytes " + range.substr(6, range.find('-') - 6) + "-999999999999/*");
      }
      response.set_chunked_content_provider("application/octet-stream",
                                            [](std::size_t, httplib::DataSink& sink) {
                                              const std::string chunk(16384, 'x');
                                              std::this_thread::sleep_for(10ms);
                                              return sink.write(chunk.data(), chunk.size());
                                            });
    });
    server_.Get("/to-ftp", [&](const httplib::Request& request, httplib::Response& response) {
      count(request);
      response.set_redirect("ftp://127.0.0.1:1/x");
    });
    server_.Get("/to-file", [&](const httplib::Request& request, httplib::Response& response) {
      count(request);
      response.set_redirect("file://" + (dir_ / "scratch").string());
    });
    port_ = server_.bind_to_any_port("127.0.0.1");
    ASSERT_GT(port_, 0);
    thread_ = std::thread([&] { server_.listen_after_bind(); });
    while (!server_.is_running()) std::this_thread::sleep_for(1ms);
    options_.cache = dir_ / "cache";
    options_.backoff = 10ms;
    options_.max_backoff = 50ms;
    options_.max_attempts = 4;
  }
  void TearDown() override {
    server_.stop();
    if (thread_.joinable()) thread_.join();
    fs::remove_all(dir_);
  }
  int count(const httplib::Request& request) {
    std::lock_guard lock(mutex_);
    if (request.has_header("Range"))
      ranges_[request.path].push_back(request.get_header_value("Range"));
    return ++hits_[request.path];
  }
  int hits(const std::string& path) {
    std::lock_guard lock(mutex_);
    return hits_[path];
  }
  FetchSpec spec(const std::string& path, const std::string& sha = {}) {
    return {path.substr(1), "http://127.0.0.1:" + std::to_string(port_) + path,
            sha.empty() ? sha_ : sha, std::nullopt};
  }

  fs::path dir_;
  std::string data_, sha_;
  httplib::Server server_;
  int port_ = 0;
  std::thread thread_;
  std::mutex mutex_;
  std::map<std::string, int> hits_;
  std::map<std::string, std::vector<std::string>> ranges_;
  FetchOptions options_;
};

TEST_F(FetchTest, DownloadsVerifiesAndCaches) {
  const auto first = fetch_file(spec("/file"), options_);
  ASSERT_EQ(first.status, FetchStatus::kDownloaded) << first.error;
  EXPECT_EQ(first.attempts, 1);
  EXPECT_EQ(first.bytes, data_.size());
  EXPECT_EQ(first.path, options_.cache / "objects" / sha_);
  EXPECT_EQ(read_file(first.path), data_);
  const auto second = fetch_file(spec("/file"), options_);
  EXPECT_EQ(second.status, FetchStatus::kCached);
  EXPECT_EQ(second.attempts, 0);
  EXPECT_EQ(hits("/file"), 1) << "a cached file must not be fetched again";
}

TEST_F(FetchTest, ServerErrorIsRetried) {
  const auto got = fetch_file(spec("/flaky"), options_);
  ASSERT_EQ(got.status, FetchStatus::kDownloaded) << got.error;
  EXPECT_EQ(got.attempts, 2);
  EXPECT_EQ(hits("/flaky"), 2);
  EXPECT_EQ(read_file(got.path), data_);
}

TEST_F(FetchTest, ConnectionCutMidBodyResumesWithRange) {
  const auto got = fetch_file(spec("/cut"), options_);
  ASSERT_EQ(got.status, FetchStatus::kDownloaded) << got.error;
  EXPECT_EQ(got.attempts, 2);
  EXPECT_EQ(read_file(got.path), data_);
  std::lock_guard lock(mutex_);
  ASSERT_EQ(ranges_["/cut"].size(), 1u) << "the second request must ask for the rest only";
  EXPECT_EQ(ranges_["/cut"][0], "bytes=" + std::to_string(data_.size() / 3) + "-");
  EXPECT_EQ(got.bytes, data_.size()) << "resumed bytes are not fetched twice";
}

TEST_F(FetchTest, SlowerThanTheTimeoutFailsAfterTheRetries) {
  options_.attempt_timeout = 300ms;
  options_.max_attempts = 2;
  const auto start = std::chrono::steady_clock::now();
  const auto got = fetch_file(spec("/slow"), options_);
  EXPECT_EQ(got.status, FetchStatus::kFailed);
  EXPECT_EQ(got.attempts, 2);
  EXPECT_NE(got.error.find("gave up after 2 attempts"), std::string::npos) << got.error;
  EXPECT_LT(std::chrono::steady_clock::now() - start, 30s);
  EXPECT_FALSE(cached_object(options_.cache, sha_));
}

TEST_F(FetchTest, WrongChecksumIsRetriedOnceThenFails) {
  const auto got = fetch_file(spec("/wrong"), options_);
  EXPECT_EQ(got.status, FetchStatus::kFailed);
  EXPECT_EQ(hits("/wrong"), 2);
  EXPECT_NE(got.error.find("checksum mismatch"), std::string::npos) << got.error;
  EXPECT_FALSE(cached_object(options_.cache, sha_)) << "a bad file must never enter the cache";
  EXPECT_FALSE(fs::exists(options_.cache / "partial" / (sha_ + ".part")));
}

TEST_F(FetchTest, NotFoundIsNotRetried) {
  const auto got = fetch_file(spec("/missing"), options_);
  EXPECT_EQ(got.status, FetchStatus::kFailed);
  EXPECT_EQ(got.attempts, 1);
  EXPECT_EQ(hits("/missing"), 1);
  EXPECT_NE(got.error.find("404"), std::string::npos) << got.error;
}

TEST_F(FetchTest, SeveralWantingOneFileDownloadItOnce) {
  std::vector<FetchOutcome> outcomes(4);
  std::vector<std::thread> threads;
  for (auto& outcome : outcomes) {
    threads.emplace_back([&] { outcome = fetch_file(spec("/file"), options_); });
  }
  for (auto& thread : threads) thread.join();
  int downloaded = 0, cached = 0;
  for (const auto& outcome : outcomes) {
    downloaded += outcome.status == FetchStatus::kDownloaded;
    cached += outcome.status == FetchStatus::kCached;
  }
  EXPECT_EQ(downloaded, 1);
  EXPECT_EQ(cached, 3);
  EXPECT_EQ(hits("/file"), 1);
}

TEST_F(FetchTest, FileUrlsAndSizes) {
  const fs::path source = dir_ / "source.bin";
  {
    std::ofstream out(source, std::ios::binary);
    out << data_;
  }
  FetchSpec local{"local", "file://" + source.string(), sha_, data_.size()};
  const auto got = fetch_file(local, options_);
  ASSERT_EQ(got.status, FetchStatus::kDownloaded) << got.error;
  EXPECT_EQ(read_file(got.path), data_);

  FetchSpec wrong_size{"sized", "file://" + source.string(), sha256_of("x", dir_ / "x"), 1};
  const auto bad = fetch_file(wrong_size, options_);
  EXPECT_EQ(bad.status, FetchStatus::kFailed);
  EXPECT_NE(bad.error.find("larger than the expected size of 1 bytes"), std::string::npos)
      << bad.error;

  FetchSpec absent{"absent", "file://" + (dir_ / "nope").string(), sha256_of("y", dir_ / "y"),
                   std::nullopt};
  const auto missing = fetch_file(absent, options_);
  EXPECT_EQ(missing.status, FetchStatus::kFailed);
  EXPECT_EQ(missing.attempts, 1) << "a missing local file is permanent";
}

TEST_F(FetchTest, EndlessBodyFailsAtTheCapAndKeepsNoMoreOnDisk) {
  options_.max_file_bytes = 100000;
  options_.attempt_timeout = 2s;
  options_.max_attempts = 3;
  const auto got = fetch_file(spec("/endless"), options_);
  EXPECT_EQ(got.status, FetchStatus::kFailed);
  EXPECT_NE(got.error.find("100000"), std::string::npos) << got.error;
  EXPECT_NE(got.error.find("max_file_bytes"), std::string::npos) << got.error;
  EXPECT_LE(got.bytes, 100000u);
  const fs::path part = options_.cache / "partial" / (sha_ + ".part");
  std::error_code ignored;
  EXPECT_LE(fs::exists(part) ? fs::file_size(part, ignored) : 0, 100000u);
}

// Attempts cut short by the timeout keep their partial file and resume; the resumed file still
// never goes past the bound, however many attempts there are.
TEST_F(FetchTest, ResumedAttemptsNeverGrowThePartialFilePastTheBound) {
  options_.attempt_timeout = 300ms;
  options_.max_attempts = 6;
  FetchSpec sized = spec("/endless");
  sized.size = 120000;
  const auto got = fetch_file(sized, options_);
  EXPECT_EQ(got.status, FetchStatus::kFailed);
  EXPECT_LE(got.bytes, 120000u);
  const fs::path part = options_.cache / "partial" / (sha_ + ".part");
  std::error_code ignored;
  EXPECT_LE(fs::exists(part) ? fs::file_size(part, ignored) : 0, 120000u);
  if (got.error.find("gave up") == std::string::npos) {
    EXPECT_NE(got.error.find("120000"), std::string::npos) << got.error;
  }
}

TEST_F(FetchTest, AnnouncedBodyLargerThanTheSizeIsRefusedAtOnce) {
  FetchSpec sized = spec("/file");
  sized.size = 1000;
  const auto got = fetch_file(sized, options_);
  EXPECT_EQ(got.status, FetchStatus::kFailed);
  EXPECT_EQ(got.attempts, 1);
  EXPECT_EQ(hits("/file"), 1);
  EXPECT_NE(got.error.find("1000 bytes"), std::string::npos) << got.error;
  EXPECT_FALSE(fs::exists(options_.cache / "partial" / (sha_ + ".part")));
}

TEST_F(FetchTest, PartialFileAlreadyOverTheBoundIsDropped) {
  fs::create_directories(options_.cache / "partial");
  {
    std::ofstream out(options_.cache / "partial" / (sha_ + ".part"), std::ios::binary);
    out << random_bytes(data_.size() + 100000, 3);
  }
  FetchSpec sized = spec("/file");
  sized.size = data_.size();
  const auto got = fetch_file(sized, options_);
  ASSERT_EQ(got.status, FetchStatus::kDownloaded) << got.error;
  EXPECT_EQ(got.attempts, 1) << "an oversized partial file is not resumed";
  EXPECT_EQ(read_file(got.path), data_);
}

TEST_F(FetchTest, RedirectToAnotherSchemeIsRefused) {
  const auto to_ftp = fetch_file(spec("/to-ftp"), options_);
  EXPECT_EQ(to_ftp.status, FetchStatus::kFailed);
  EXPECT_EQ(to_ftp.attempts, 1) << "a refused redirect is permanent: " << to_ftp.error;
  EXPECT_NE(to_ftp.error.find("redirect"), std::string::npos) << to_ftp.error;
  std::ofstream(dir_ / "scratch", std::ios::binary) << data_;
  const auto to_file = fetch_file(spec("/to-file"), options_);
  EXPECT_EQ(to_file.status, FetchStatus::kFailed);
  EXPECT_FALSE(cached_object(options_.cache, sha_)) << "file:// reached through http";
  EXPECT_EQ(allowed_redirect_protocols("https://x/a"), "https");
  EXPECT_EQ(allowed_redirect_protocols("HTTPS://x/a"), "https");
  EXPECT_EQ(allowed_redirect_protocols("http://x/a"), "http,https");
  EXPECT_EQ(allowed_redirect_protocols("file:///a"), "http,https");
}

TEST_F(FetchTest, CredentialsStayOutOfErrors) {
  FetchSpec secret{"secret", "http://alice:hunter2@127.0.0.1:1/x?token=s3cret&b=1", sha_,
                   std::nullopt};
  options_.max_attempts = 1;
  const auto got = fetch_file(secret, options_);
  EXPECT_EQ(got.status, FetchStatus::kFailed);
  EXPECT_EQ(got.error.find("hunter2"), std::string::npos) << got.error;
  EXPECT_EQ(got.error.find("s3cret"), std::string::npos) << got.error;
  EXPECT_EQ(redact_url("https://alice:hunter2@host/a?token=s3cret&x=1#f"),
            "https://alice:***@host/a?token=***&x=***#f");
  EXPECT_EQ(redact_url("https://host/a"), "https://host/a");
  EXPECT_EQ(redact_url("https://alice@host/a?flag"), "https://alice@host/a?flag");
}

TEST_F(FetchTest, ThrowingProgressCallbackIsAnErrorNotACrash) {
  options_.progress_interval = 0ms;
  options_.progress = [](const FetchSpec&, std::uint64_t, std::uint64_t) {
    throw std::runtime_error("cancelled by the caller");
  };
  try {
    fetch_file(spec("/file"), options_);
    ADD_FAILURE() << "no exception";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("cancelled by the caller"), std::string::npos)
        << error.what();
    EXPECT_NE(std::string(error.what()).find("file"), std::string::npos) << error.what();
  }
  options_.progress = [](const FetchSpec&, std::uint64_t, std::uint64_t) {
    throw ShutdownError(kNoRank, "test", "stopping");
  };
  EXPECT_THROW(fetch_file(spec("/file"), options_), ShutdownError);
  EXPECT_FALSE(cached_object(options_.cache, sha_));
  options_.progress = nullptr;
  const auto after = fetch_file(spec("/file"), options_);
  EXPECT_EQ(after.status, FetchStatus::kDownloaded) << "the lock was released: " << after.error;
}

TEST(FetchManifestTest, ParsesAndRejectsClearly) {
  const std::string sha(64, 'a');
  const auto files =
      parse_manifest(R"({"files":[{"name":"a","url":"https://x/a","sha256":")" + sha +
                     R"(","size":12},{"name":"b","url":"file:///b","sha256":")" + sha + R"("}]})");
  ASSERT_EQ(files.size(), 2u);
  EXPECT_EQ(files[0].size, 12u);
  EXPECT_FALSE(files[1].size);
  const auto rejects = [](const std::string& text, const std::string& expected) {
    try {
      parse_manifest(text);
      ADD_FAILURE() << "accepted: " << text;
    } catch (const ConfigError& error) {
      EXPECT_NE(std::string(error.what()).find(expected), std::string::npos) << error.what();
    }
  };
  rejects("{", "not valid JSON");
  rejects(R"({"file":[]})", "\"files\" array");
  rejects(R"({"files":[{"url":"http://x","sha256":")" + sha + R"("}]})", "\"name\"");
  rejects(R"({"files":[{"name":"a","url":"http://x","sha256":"abc"}]})", "64 lowercase hex");
  rejects(R"({"files":[{"name":"a","url":"ftp://x","sha256":")" + sha + R"("}]})",
          "http://, https:// or file://");
  rejects(R"({"files":[{"name":"a","url":"http://x","sha256":")" + sha + R"(","size":-1}]})",
          "\"size\"");
  rejects(R"({"files":[{"name":"a","url":"http://x","sha256":")" + sha +
              R"("},{"name":"a","url":"http://y","sha256":")" + sha + R"("}]})",
          "used twice");
  try {
    parse_manifest(R"({"files":[{"name":"a","url":"ftp://bob:hunter2@x/a?sig=s3cret","sha256":")" +
                   sha + R"("}]})");
    ADD_FAILURE() << "an ftp URL accepted";
  } catch (const ConfigError& error) {
    const std::string text = error.what();
    EXPECT_EQ(text.find("hunter2"), std::string::npos) << text;
    EXPECT_EQ(text.find("s3cret"), std::string::npos) << text;
    EXPECT_NE(text.find("ftp://bob:***@x/a"), std::string::npos) << text;
  }
}

}  // namespace
}  // namespace unimsg
