// The download task queue on 1-5 ranks against a real HTTP server that rank 0 runs on
// 127.0.0.1: every rank submits, workers on every rank fetch; every task completes once, a
// file several ranks want is downloaded once (one node, one cache); a worker that dies holding
// a task (its lease runs out) has the task re-queued and completed once by another; a failing
// file ends as a dead letter with a clear error; a drain() that a rank never joins gives up
// after the stall timeout, naming the rank.

#include <gtest/gtest.h>
#include <httplib.h>
#include <mpi.h>
#include <unistd.h>

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
#include "unimsg/fetch/fetch_queue.hpp"
#include "world_fixture.hpp"

namespace unimsg {
namespace {

// "f<index>". Appending rather than `"f" + std::to_string(index)`: g++ 12 misreads the latter's
// inlined insert as an overlapping memcpy (-Wrestrict, a known false positive).
std::string file_name(int index) {
  std::string name = "f";
  name += std::to_string(index);
  return name;
}

namespace fs = std::filesystem;
using namespace std::chrono_literals;

std::string content(int index) {
  std::mt19937 rng(static_cast<unsigned>(index) + 11);
  std::string data(50000 + static_cast<std::size_t>(index) * 1000, '\0');
  for (auto& c : data) c = static_cast<char>(rng() & 0xff);
  return data;
}

class FetchQueueTest : public testing_support::WorldTest {
 protected:
  void SetUp() override {
    WorldTest::SetUp();
    int pid = static_cast<int>(::getpid());
    MPI_Bcast(&pid, 1, MPI_INT, 0, MPI_COMM_WORLD);
    dir_ = fs::temp_directory_path() /
           ("unimsg-queue-test-" + std::to_string(pid) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    for (int i = 0; i < kFiles; ++i) files_.push_back(content(i));
    if (rank() == 0) {
      fs::remove_all(dir_);
      fs::create_directories(dir_);
      for (int i = 0; i < kFiles; ++i) {
        std::ofstream(dir_ / file_name(i), std::ios::binary) << files_[i];
        shas_.push_back(sha256_file(dir_ / file_name(i)));
      }
      server_.Get(R"(/f(\d+))", [&](const httplib::Request& request, httplib::Response& response) {
        const int index = std::stoi(request.matches[1]);
        {
          std::lock_guard lock(mutex_);
          ++hits_[index];
        }
        if (index >= kFiles) {
          response.status = 404;
          return;
        }
        response.set_content(files_[static_cast<std::size_t>(index)], "application/octet-stream");
      });
      port_ = server_.bind_to_any_port("127.0.0.1");
      thread_ = std::thread([&] { server_.listen_after_bind(); });
      while (!server_.is_running()) std::this_thread::sleep_for(1ms);
    } else {
      shas_.resize(kFiles);
    }
    MPI_Bcast(&port_, 1, MPI_INT, 0, MPI_COMM_WORLD);
    for (auto& sha : shas_) {
      sha.resize(64);
      MPI_Bcast(sha.data(), 64, MPI_CHAR, 0, MPI_COMM_WORLD);
    }
  }
  void TearDown() override {
    MPI_Barrier(MPI_COMM_WORLD);
    if (rank() == 0) {
      server_.stop();
      thread_.join();
      fs::remove_all(dir_);
    }
    WorldTest::TearDown();
  }
  int rank() const { return bus_->rank(); }
  int ranks() const { return bus_->size(); }
  FetchSpec spec(int index) const {
    return {file_name(index),
            "http://127.0.0.1:" + std::to_string(port_) + "/f" + std::to_string(index),
            index < kFiles ? shas_[static_cast<std::size_t>(index)] : std::string(64, '0'),
            std::nullopt};
  }
  FetchQueueOptions options() const {
    FetchQueueOptions o;
    o.workers = 2;
    o.idle_poll = 5ms;
    o.fetch.cache = dir_ / "cache";
    o.fetch.backoff = 5ms;
    o.fetch.max_backoff = 20ms;
    o.fetch.max_attempts = 2;
    return o;
  }
  int hits(int index) {
    std::lock_guard lock(mutex_);
    return hits_[index];
  }

  static constexpr int kFiles = 8;
  fs::path dir_;
  std::vector<std::string> files_, shas_;
  httplib::Server server_;
  int port_ = 0;
  std::thread thread_;
  std::mutex mutex_;
  std::map<int, int> hits_;
};

TEST_F(FetchQueueTest, EveryTaskCompletesOnceAndSharedFilesDownloadOnce) {
  FetchQueueStats stats;
  {
    FetchQueue queue(*bus_, options());
    // Every rank wants every file: kFiles x ranks tasks, kFiles downloads.
    std::vector<std::future<FetchResult>> results;
    for (int i = 0; i < kFiles; ++i) results.push_back(queue.submit(spec((i + rank()) % kFiles)));
    queue.drain();
    int downloaded = 0;
    for (auto& future : results) {
      const FetchResult result = future.get();
      ASSERT_NE(result.outcome.status, FetchStatus::kFailed) << result.outcome.error;
      downloaded += result.outcome.status == FetchStatus::kDownloaded;
      EXPECT_EQ(result.deliveries, 1);
      EXPECT_GE(result.worker_rank, 0);
      EXPECT_LT(result.worker_rank, ranks());
      const auto index = std::stoi(result.outcome.name.substr(1));
      EXPECT_EQ(sha256_file(result.outcome.path), shas_[static_cast<std::size_t>(index)]);
    }
    int total = 0;
    MPI_Allreduce(&downloaded, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    EXPECT_EQ(total, kFiles) << "each file downloaded once on this node, the rest cached";
    stats = queue.stats();
  }
  if (rank() == 0) {
    EXPECT_EQ(stats.submitted, static_cast<std::uint64_t>(kFiles * ranks()));
    EXPECT_EQ(stats.completed, stats.submitted);
    EXPECT_EQ(stats.duplicate_results, 0u);
    EXPECT_TRUE(stats.dead_letters.empty());
    for (int i = 0; i < kFiles; ++i) EXPECT_EQ(hits(i), 1) << "file " << i;
  }
}

// The last rank has the only workers; the first task one of them takes is abandoned (the worker
// stops, as if killed), so the task's lease runs out, rank 0 re-queues it, and the other worker
// completes it: once.
TEST_F(FetchQueueTest, TaskOfADeadWorkerIsRequeuedAndCompletedOnce) {
  auto o = options();
  o.workers = rank() == ranks() - 1 ? 2 : 0;
  o.lease = 300ms;
  FetchQueueStats stats;
  {
    FetchQueue queue(*bus_, o);
    if (rank() == ranks() - 1) queue.abandon_tasks_for_testing(1);
    MPI_Barrier(MPI_COMM_WORLD);  // the hook is set before any task exists
    std::vector<std::future<FetchResult>> results;
    if (rank() == 0) results.push_back(queue.submit(spec(3)));
    queue.drain();
    for (auto& future : results) {
      const FetchResult result = future.get();
      ASSERT_EQ(result.outcome.status, FetchStatus::kDownloaded) << result.outcome.error;
      EXPECT_EQ(result.deliveries, 2) << "handed to the dead worker, then to the live one";
      EXPECT_EQ(result.worker_rank, ranks() - 1);
    }
    stats = queue.stats();
  }
  if (rank() == 0) {
    EXPECT_EQ(stats.requeued, 1u);
    EXPECT_EQ(stats.completed, 1u);
    EXPECT_EQ(hits(3), 1) << "the dead worker never fetched it";
  }
}

TEST_F(FetchQueueTest, FailingFileIsADeadLetterWithItsError) {
  FetchQueueStats stats;
  {
    FetchQueue queue(*bus_, options());
    std::vector<std::future<FetchResult>> results;
    if (rank() == 0) results.push_back(queue.submit(spec(kFiles + 1)));  // a 404
    queue.drain();
    for (auto& future : results) {
      const FetchResult result = future.get();
      EXPECT_EQ(result.outcome.status, FetchStatus::kFailed);
      EXPECT_NE(result.outcome.error.find("404"), std::string::npos) << result.outcome.error;
      EXPECT_EQ(result.outcome.attempts, 1) << "a 404 is not retried";
    }
    stats = queue.stats();
  }
  if (rank() == 0) {
    ASSERT_EQ(stats.dead_letters.size(), 1u);
    EXPECT_EQ(stats.dead_letters[0].outcome.name, file_name(kFiles + 1));
  }
}

// The last rank keeps away from drain() (as a rank that froze would) until the others have
// given up on it or half a minute has passed: their drain() must throw, naming it, once nothing
// has moved for the stall timeout, instead of waiting for ever.
TEST_F(FetchQueueTest, DrainThatARankNeverJoinsGivesUpNamingIt) {
  if (ranks() < 2) GTEST_SKIP() << "needs a second rank";
  auto o = options();
  o.lease = 300ms;
  o.stall_timeout = 1s;
  FetchQueue queue(*bus_, o);
  const int laggard = ranks() - 1;
  MPI_Request gave_up = MPI_REQUEST_NULL;
  if (rank() == laggard) {
    MPI_Ibarrier(MPI_COMM_WORLD, &gave_up);
    const auto deadline = std::chrono::steady_clock::now() + 30s;
    int done = 0;
    while (!done && std::chrono::steady_clock::now() < deadline) {
      MPI_Test(&gave_up, &done, MPI_STATUS_IGNORE);
      std::this_thread::sleep_for(10ms);
    }
    queue.drain();  // everyone else has joined: returns at once
    MPI_Wait(&gave_up, MPI_STATUS_IGNORE);
    return;
  }
  try {
    queue.drain();
    ADD_FAILURE() << "drain() returned though rank " << laggard << " never joined";
  } catch (const TimeoutError& error) {
    const std::string text = error.what();
    EXPECT_NE(text.find("[" + std::to_string(laggard) + "]"), std::string::npos) << text;
    EXPECT_NE(text.find("no progress"), std::string::npos) << text;
  }
  MPI_Ibarrier(MPI_COMM_WORLD, &gave_up);
  MPI_Wait(&gave_up, MPI_STATUS_IGNORE);
}

}  // namespace
}  // namespace unimsg
