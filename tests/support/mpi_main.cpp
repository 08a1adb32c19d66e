// GoogleTest main for multi-rank suites: initialises MPI with MPI_THREAD_MULTIPLE, runs every
// test on every rank, and fails the run on every rank if any rank failed, naming that rank and
// its failed tests. Only rank 0 prints the usual progress; other ranks print their failures.

#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "unimsg/bus/mpi.hpp"

namespace {

// Keeps ranks in step: a test starts on all ranks only after the previous one ended on all.
class BarrierListener : public testing::EmptyTestEventListener {
  void OnTestEnd(const testing::TestInfo&) override { MPI_Barrier(MPI_COMM_WORLD); }
};

// On ranks other than 0: print only failures, prefixed with the rank.
class RankFailurePrinter : public testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank_,
                 result.file_name() ? result.file_name() : "?", result.line_number(),
                 result.summary());
  }
  void OnTestEnd(const testing::TestInfo& info) override {
    if (info.result()->Failed()) {
      std::fprintf(stderr, "[rank %d] [  FAILED  ] %s.%s\n", rank_, info.test_suite_name(),
                   info.name());
    }
  }

 private:
  int rank_;
};

std::string failed_tests(const testing::UnitTest& unit) {
  std::string names;
  for (int s = 0; s < unit.total_test_suite_count(); ++s) {
    const auto* suite = unit.GetTestSuite(s);
    for (int t = 0; t < suite->total_test_count(); ++t) {
      const auto* info = suite->GetTestInfo(t);
      if (info->result()->Failed()) {
        if (!names.empty()) names += ", ";
        names += std::string(suite->name()) + "." + info->name();
      }
    }
  }
  return names;
}

}  // namespace

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  unimsg::MpiEnvironment mpi(&argc, &argv);
  const int rank = mpi.world_rank();
  const int size = mpi.world_size();

  auto& listeners = testing::UnitTest::GetInstance()->listeners();
  if (rank != 0) {
    std::unique_ptr<testing::TestEventListener> printer(
        listeners.Release(listeners.default_result_printer()));
    listeners.Append(std::make_unique<RankFailurePrinter>(rank).release());  // gtest owns it
  }
  listeners.Append(std::make_unique<BarrierListener>().release());

  const int local_failed = RUN_ALL_TESTS() != 0 ? 1 : 0;

  // Gather who failed; rank 0 names them.
  std::vector<int> failed(static_cast<std::size_t>(size), 0);
  MPI_Gather(&local_failed, 1, MPI_INT, failed.data(), 1, MPI_INT, 0, MPI_COMM_WORLD);
  const std::string names = failed_tests(*testing::UnitTest::GetInstance());
  if (local_failed) {
    std::fprintf(stderr, "[rank %d of %d] FAILED: %s\n", rank, size, names.c_str());
  }
  int any_failed = 0;
  MPI_Allreduce(&local_failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0) {
    std::string ranks;
    for (int r = 0; r < size; ++r) {
      if (failed[static_cast<std::size_t>(r)])
        ranks += (ranks.empty() ? "" : ", ") + std::to_string(r);
    }
    if (any_failed) {
      std::fprintf(stderr, "multi-rank run FAILED on rank(s) [%s] of %d\n", ranks.c_str(), size);
    } else {
      std::printf("multi-rank run passed on all %d rank(s)\n", size);
    }
  }
  return any_failed ? 1 : 0;
}
