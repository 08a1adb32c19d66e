// The monitor on 1-5 ranks: reports reach rank 0 and come out as metrics.jsonl, status.json,
// Prometheus /metrics, /api/status and the page; every rank's spans land in one merged
// timeline; a slowed rank is flagged as a straggler; malformed reports are ignored.

#include <arpa/inet.h>
#include <httplib.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "unimsg/checkpoint/checkpoint.hpp"
#include "unimsg/collectives/engine.hpp"
#include "unimsg/monitor/monitor.hpp"
#include "unimsg/session/training_session.hpp"
#include "world_fixture.hpp"

namespace unimsg {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;
using testing_support::WorldTest;

// Rank 0 picks a directory; every rank learns it.
fs::path shared_directory(const char* name) {
  char path[256] = {};
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank == 0) {
    const auto dir = fs::temp_directory_path() /
                     (std::string("unimsg-") + name + "-" + std::to_string(::getpid()));
    fs::remove_all(dir);
    fs::create_directories(dir);
    std::snprintf(path, sizeof path, "%s", dir.c_str());
  }
  MPI_Bcast(path, sizeof path, MPI_CHAR, 0, MPI_COMM_WORLD);
  return path;
}

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  socklen_t length = sizeof address;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    ::close(fd);
    return 0;
  }
  ::close(fd);
  return ntohs(address.sin_port);
}

std::vector<json> read_lines(const fs::path& path) {
  std::vector<json> lines;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) lines.push_back(json::parse(line));
  return lines;
}

MonitorOptions test_options(const fs::path& dir) {
  MonitorOptions options;
  options.run_dir = dir / "run";
  options.report_interval = std::chrono::milliseconds(10);
  options.finish_timeout = std::chrono::seconds(120);
  options.job = "monitor_test";
  return options;
}

class MonitorTest : public WorldTest {};

TEST_F(MonitorTest, StatusReachesRankZeroAndTheTimelineMerges) {
  const int rank = bus_->rank();
  const int size = bus_->size();
  const fs::path dir = shared_directory("monitor");
  MonitorOptions options = test_options(dir);
  options.timeline = dir / "timeline.json";
  options.metrics_address = "127.0.0.1";
  options.metrics_port = rank == 0 ? free_port() : 0;
  ASSERT_TRUE(rank != 0 || options.metrics_port > 0);
  constexpr std::uint64_t kSteps = 30;
  {
    Monitor monitor(*bus_, options);
    ASSERT_NE(monitor.trace(), nullptr);
    EngineOptions engine_options;
    engine_options.trace = monitor.trace();
    Engine engine(*comm_, *bus_, engine_options);
    monitor.watch([&engine] { return communication_counters(engine); });
    monitor.set_total_steps(kSteps);
    CheckpointOptions checkpoint_options;
    checkpoint_options.rank = rank;
    checkpoint_options.trace = monitor.trace();
    std::optional<Checkpointer> checkpointer;
    if (rank == 0) checkpointer.emplace(dir / "checkpoints", checkpoint_options);
    std::vector<float> plain(1000, 1.0f), plain2(300, 2.0f), compressed(4096, 0.5f);
    monitor.start_timing();
    for (std::uint64_t step = 1; step <= kSteps; ++step) {
      // (A group is reduced in one cycle, fused: the timeline gets fuse and unfuse spans.)
      Work a = engine.submit_group({{"plain", host_view(plain.data(), plain.size())},
                                    {"plain2", host_view(plain2.data(), plain2.size())}},
                                   ReduceOp::kAvg);
      Work b = engine.submit("compressed", host_view(compressed.data(), compressed.size()),
                             ReduceOp::kAvg, CompressionSpec::parse("fp16"));
      a.wait();
      b.wait();
      monitor.step(step, 1.0 / static_cast<double>(step), 8);
      if (checkpointer && step % 10 == 0) {
        Checkpoint checkpoint;
        checkpoint.step = step;
        checkpoint.blobs["w"] = std::vector<std::byte>(64, std::byte{1});
        checkpointer->save_async(std::move(checkpoint));
      }
    }
    if (checkpointer) checkpointer->flush();
    EXPECT_FLOAT_EQ(plain.front(), 1.0f);  // averages of equal values
    EXPECT_FLOAT_EQ(plain2.back(), 2.0f);
    monitor.event("info", "hello from rank " + std::to_string(rank));
    EXPECT_EQ(engine.stats().dense_wire_bytes > engine.stats().wire_bytes, size > 1);

    comm_->barrier().wait();
    if (rank == 0) {
      EXPECT_EQ(monitor.metrics_port(), options.metrics_port);
      httplib::Client client("127.0.0.1", options.metrics_port);
      client.set_read_timeout(30, 0);
      // Every rank's step series, once their reports have arrived.
      std::string metrics;
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
      bool all = false;
      while (!all && std::chrono::steady_clock::now() < deadline) {
        const auto response = client.Get("/metrics");
        ASSERT_TRUE(response) << "no answer from /metrics";
        ASSERT_EQ(response->status, 200);
        EXPECT_NE(response->get_header_value("Content-Type").find("text/plain"), std::string::npos);
        metrics = response->body;
        all = true;
        for (int r = 0; r < size; ++r) {
          all = all && metrics.find("unimsg_step{rank=\"" + std::to_string(r) + "\"} " +
                                    std::to_string(kSteps) + "\n") != std::string::npos;
        }
        if (!all) std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
      ASSERT_TRUE(all) << metrics;
      for (int r = 0; r < size; ++r) {
        const std::string label = "{rank=\"" + std::to_string(r) + "\"} ";
        for (const char* name :
             {"unimsg_samples_per_second", "unimsg_allreduce_bytes_total", "unimsg_step_seconds",
              "unimsg_compute_seconds", "unimsg_wait_seconds", "unimsg_memory_rss_bytes"}) {
          EXPECT_NE(metrics.find(std::string(name) + label), std::string::npos) << name << label;
        }
      }
      const auto page = client.Get("/");
      ASSERT_TRUE(page);
      EXPECT_EQ(page->status, 200);
      EXPECT_NE(page->body.find("<canvas id=\"chart-step\""), std::string::npos);
      const auto api = client.Get("/api/status");
      ASSERT_TRUE(api);
      const json status = json::parse(api->body);
      EXPECT_EQ(status.at("world_size"), size);
      EXPECT_EQ(status.at("ranks").size(), static_cast<std::size_t>(size));
      EXPECT_EQ(status.at("total_steps"), kSteps);
      EXPECT_EQ(status.at("history").size(), static_cast<std::size_t>(size));
      EXPECT_EQ(client.Get("/nothing-here")->status, 404);
    }
    monitor.finish();
  }

  if (rank == 0) {
    // metrics.jsonl: a start, reports of every rank with a final one each, the events, a finish.
    const auto lines = read_lines(dir / "run" / "metrics.jsonl");
    ASSERT_GE(lines.size(), static_cast<std::size_t>(2 + 2 * size));
    EXPECT_EQ(lines.front().at("type"), "start");
    EXPECT_EQ(lines.back().at("type"), "finish");
    std::map<int, int> reports, finals;
    std::set<std::string> events;
    for (const auto& line : lines) {
      if (line.at("type") == "report") {
        ++reports[line.at("rank").get<int>()];
        if (line.at("final").get<bool>()) {
          ++finals[line.at("rank").get<int>()];
          EXPECT_EQ(line.at("step"), kSteps);
        }
      } else if (line.at("type") == "event") {
        events.insert(line.at("text").get<std::string>());
      }
    }
    for (int r = 0; r < size; ++r) {
      EXPECT_GE(reports[r], 2) << "rank " << r;
      EXPECT_EQ(finals[r], 1) << "rank " << r;
      EXPECT_TRUE(
          events.count("rank " + std::to_string(r) + ": hello from rank " + std::to_string(r)))
          << "rank " << r;
    }
    // status.json: the last state.
    std::ifstream status_file(dir / "run" / "status.json");
    const json status = json::parse(status_file);
    EXPECT_EQ(status.at("step"), kSteps);
    for (const auto& r : status.at("ranks")) EXPECT_TRUE(r.at("final").get<bool>());

    // The timeline: one process per rank, each with its engine, training and (rank 0) checkpoint
    // activity, on a common clock.
    std::ifstream timeline_file(dir / "timeline.json");
    const json timeline = json::parse(timeline_file);
    EXPECT_TRUE(timeline.at("otherData").at("missing_ranks").empty());
    std::map<int, std::set<std::string>> names;
    std::map<int, double> first_step;
    for (const auto& event : timeline.at("traceEvents")) {
      const int pid = event.at("pid").get<int>();
      if (event.at("ph") != "X") continue;
      names[pid].insert(event.at("name").get<std::string>());
      EXPECT_GE(event.at("dur").get<double>(), 0.0);
      if (event.at("name") == "step" && !first_step.count(pid)) {
        first_step[pid] = event.at("ts").get<double>();
      }
    }
    ASSERT_EQ(names.size(), static_cast<std::size_t>(size));
    for (int r = 0; r < size; ++r) {
      for (const char* name : {"negotiate", "wait_for_data", "fuse", "allreduce", "unfuse",
                               "compressed_allreduce", "compress", "decompress", "step"}) {
        EXPECT_TRUE(names[r].count(name)) << "rank " << r << " has no " << name;
      }
      // The ranks started their steps together (generously: within a minute of each other).
      EXPECT_NEAR(first_step[r], first_step[0], 60e6) << "rank " << r;
      EXPECT_GE(first_step[r], 0.0);
    }
    EXPECT_TRUE(names[0].count("checkpoint"));
    fs::remove_all(dir);
  }
}

TEST_F(MonitorTest, ASlowRankIsFlaggedAsAStraggler) {
  const int rank = bus_->rank();
  const int size = bus_->size();
  if (size < 2) GTEST_SKIP() << "a straggler needs other ranks to be compared with";
  const fs::path dir = shared_directory("straggler");
  MonitorOptions options = test_options(dir);
  options.straggler.steps = 5;
  options.straggler.factor = 1.5;
  options.straggler.min_excess = std::chrono::milliseconds(5);
  const int slow_rank = size - 1;
  {
    Monitor monitor(*bus_, options);
    Engine engine(*comm_, *bus_, EngineOptions::from_env());
    monitor.watch([&engine] { return communication_counters(engine); });
    std::vector<float> gradient(100, 1.0f);
    monitor.start_timing();
    for (std::uint64_t step = 1; step <= 30; ++step) {
      if (rank == slow_rank) std::this_thread::sleep_for(std::chrono::milliseconds(40));
      engine.submit("g", host_view(gradient.data(), gradient.size()), ReduceOp::kSum).wait();
      monitor.step(step, 0.5, 4);
    }
    monitor.finish();
  }
  if (rank == 0) {
    bool flagged = false;
    for (const auto& line : read_lines(dir / "run" / "metrics.jsonl")) {
      if (line.at("type") == "event" && line.at("kind") == "straggler" &&
          line.at("rank") == slow_rank) {
        flagged = true;
        EXPECT_NE(line.at("text").get<std::string>().find("is a straggler"), std::string::npos);
      }
    }
    EXPECT_TRUE(flagged) << "rank " << slow_rank << " was not flagged";
    std::ifstream status_file(dir / "run" / "status.json");
    const json status = json::parse(status_file);
    EXPECT_TRUE(
        status.at("ranks")[static_cast<std::size_t>(slow_rank)].at("straggler").get<bool>());
    fs::remove_all(dir);
  }
}

TEST_F(MonitorTest, MalformedReportsAreIgnoredAndTheRealOnesCount) {
  const int rank = bus_->rank();
  const int size = bus_->size();
  const fs::path dir = shared_directory("malformed");
  {
    Monitor monitor(*bus_, test_options(dir));
    if (rank != 0) {
      for (const char* payload :
           {"{not json", "[]", R"({"rank":0,"step":1})", "{\"rank\":0}", ""}) {
        bus_->send(0,
                   Message::make(Kind::kStatus, kStatusReportTopic, Payload::from_string(payload)));
      }
      bus_->send(0, Message::make(Kind::kStatus, kStatusEventTopic,
                                  Payload::from_string(R"({"kind":7})")));
    }
    for (std::uint64_t step = 1; step <= 5; ++step) monitor.step(step, 1.0, 1);
    monitor.finish();
  }
  if (rank == 0) {
    std::map<int, int> finals;
    int events = 0;
    for (const auto& line : read_lines(dir / "run" / "metrics.jsonl")) {
      if (line.at("type") == "report" && line.at("final").get<bool>()) {
        ++finals[line.at("rank").get<int>()];
        EXPECT_EQ(line.at("step"), 5);
      }
      if (line.at("type") == "event") ++events;
    }
    for (int r = 0; r < size; ++r) EXPECT_EQ(finals[r], 1) << "rank " << r;
    EXPECT_EQ(events, 0);
    fs::remove_all(dir);
  }
}

}  // namespace
}  // namespace unimsg
