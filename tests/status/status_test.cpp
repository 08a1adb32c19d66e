// Status reports, straggler detection, rank 0's board (Prometheus text, snapshot JSON), timeline
// serialisation: everything of the monitor that needs no MPI.

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <map>
#include <string>

#include "unimsg/core/error.hpp"
#include "unimsg/status/status.hpp"
#include "unimsg/trace/trace.hpp"

namespace unimsg {
namespace {

using nlohmann::json;

StatusReport sample_report(int rank) {
  StatusReport report;
  report.rank = rank;
  report.step = 40;
  report.total_steps = 100;
  report.steps = 10;
  report.samples = 640;
  report.seconds = 0.5;
  report.compute_seconds = 0.3;
  report.communication_seconds = 0.15;
  report.wait_seconds = 0.2;
  report.loss = 0.25;
  report.wire_bytes = 1000;
  report.dense_wire_bytes = 32000;
  report.rss_bytes = 123456789;
  report.heartbeat_age_seconds = 0.4;
  report.host = "node-" + std::to_string(rank);
  return report;
}

TEST(StatusReport, RoundTripsThroughJson) {
  const StatusReport report = sample_report(2);
  const StatusReport back = StatusReport::parse(report.to_json(), 2, 4);
  EXPECT_EQ(back.rank, 2);
  EXPECT_EQ(back.step, 40u);
  EXPECT_EQ(back.total_steps, 100u);
  EXPECT_EQ(back.steps, 10u);
  EXPECT_EQ(back.samples, 640u);
  EXPECT_DOUBLE_EQ(back.seconds, 0.5);
  EXPECT_DOUBLE_EQ(back.compute_seconds, 0.3);
  EXPECT_DOUBLE_EQ(back.communication_seconds, 0.15);
  EXPECT_DOUBLE_EQ(back.wait_seconds, 0.2);
  EXPECT_DOUBLE_EQ(back.loss, 0.25);
  EXPECT_EQ(back.wire_bytes, 1000u);
  EXPECT_EQ(back.dense_wire_bytes, 32000u);
  EXPECT_EQ(back.rss_bytes, 123456789u);
  EXPECT_EQ(back.host, "node-2");
  EXPECT_FALSE(back.final_report);
}

TEST(StatusReport, UnknownLossTravelsAsNull) {
  StatusReport report = sample_report(0);
  report.loss = std::nan("");
  EXPECT_NE(report.to_json().find("\"loss\":null"), std::string::npos);
  EXPECT_TRUE(std::isnan(StatusReport::parse(report.to_json(), 0, 1).loss));
}

TEST(StatusReport, RejectsMalformedPayloadsNamingTheProblem) {
  const std::string good = sample_report(1).to_json();
  const auto with = [&](const char* key, json value) {
    json object = json::parse(good);
    object[key] = std::move(value);
    return object.dump();
  };
  const auto without = [&](const char* key) {
    json object = json::parse(good);
    object.erase(key);
    return object.dump();
  };
  const std::map<std::string, std::string> bad{
      {"not JSON", "{\"rank\":"},
      {"not a JSON object", "[1,2]"},
      {"claims to come from rank 3", with("rank", 3)},
      {"\"step\" is not a non-negative integer", with("step", -1)},
      {"\"samples\" is not a non-negative integer", with("samples", "many")},
      {"\"seconds\" is out of range", with("seconds", -0.5)},
      {"\"wait_seconds\" is out of range", with("wait_seconds", 1e300)},
      {"no \"compute_seconds\"", without("compute_seconds")},
      {"\"loss\" is neither a number nor null", with("loss", "low")},
      {"no \"host\" string", with("host", 7)},
      {"\"host\" is longer than 255 bytes", with("host", std::string(300, 'h'))},
      {"no \"final\" boolean", with("final", 1)},
      {"more steps in the window than in all", with("steps", 41)},
  };
  for (const auto& [why, payload] : bad) {
    try {
      StatusReport::parse(payload, 1, 4);
      ADD_FAILURE() << "accepted: " << payload;
    } catch (const DecodeError& error) {
      EXPECT_EQ(error.code(), DecodeErrorCode::kBadPayload);
      EXPECT_NE(std::string(error.what()).find(why), std::string::npos) << error.what();
      EXPECT_NE(std::string(error.what()).find("rank 1"), std::string::npos) << error.what();
    }
  }
  // A rank outside the world, even if the payload agrees.
  EXPECT_THROW(StatusReport::parse(sample_report(5).to_json(), 5, 4), DecodeError);
}

TEST(StragglerDetector, FlagsAfterTheConfiguredStepsAndClearsWhenBackInLine) {
  StragglerOptions options;
  options.factor = 1.5;
  options.steps = 20;
  options.min_excess = std::chrono::milliseconds(1);
  StragglerDetector detector(4, options);
  // Nobody to compare with until other ranks report.
  EXPECT_FALSE(detector.add(2, 10, 0.050));
  for (int rank : {0, 1, 3}) EXPECT_FALSE(detector.add(rank, 10, 0.010));
  // Rank 2: 50 ms against a median of 10 ms, for 10 steps and then 10 more: flagged.
  EXPECT_FALSE(detector.add(2, 10, 0.050));
  const auto flagged = detector.add(2, 10, 0.050);
  ASSERT_TRUE(flagged);
  EXPECT_TRUE(flagged->straggler);
  EXPECT_EQ(flagged->rank, 2);
  EXPECT_EQ(flagged->steps, 20u);
  EXPECT_NEAR(flagged->median_of_others, 0.010, 1e-12);
  EXPECT_TRUE(detector.flagged(2));
  EXPECT_FALSE(detector.add(2, 10, 0.050));  // still flagged: no new change
  // One short window back in line is not enough; `steps` steps are.
  EXPECT_FALSE(detector.add(2, 10, 0.011));
  EXPECT_TRUE(detector.flagged(2));
  const auto cleared = detector.add(2, 10, 0.011);
  ASSERT_TRUE(cleared);
  EXPECT_FALSE(cleared->straggler);
  EXPECT_FALSE(detector.flagged(2));
  EXPECT_FALSE(detector.add(2, 10, 0.011));
}

TEST(StragglerDetector, NeedsConsecutiveSlowStepsAndAMeaningfulExcess) {
  StragglerOptions options;
  options.factor = 1.5;
  options.steps = 20;
  options.min_excess = std::chrono::milliseconds(5);
  StragglerDetector detector(3, options);
  detector.add(0, 1, 0.010);
  detector.add(1, 1, 0.010);
  // 15 slow steps, then a normal window: the count restarts.
  EXPECT_FALSE(detector.add(2, 15, 0.050));
  EXPECT_FALSE(detector.add(2, 1, 0.010));
  EXPECT_FALSE(detector.add(2, 15, 0.050));
  EXPECT_FALSE(detector.flagged(2));
  // Twice as slow but only 1 ms more: scheduling noise on a millisecond step, not a straggler.
  StragglerDetector fast(2, options);
  fast.add(0, 1, 0.001);
  EXPECT_FALSE(fast.add(1, 100, 0.002));
  EXPECT_FALSE(fast.flagged(1));
}

TEST(StragglerOptions, ReadsTheEnvironmentStrictly) {
  ::setenv("UNIMSG_STRAGGLER_FACTOR", "2.5", 1);
  ::setenv("UNIMSG_STRAGGLER_STEPS", "7", 1);
  ::setenv("UNIMSG_STRAGGLER_MIN_MS", "0.5", 1);
  const auto options = StragglerOptions::from_env();
  EXPECT_DOUBLE_EQ(options.factor, 2.5);
  EXPECT_EQ(options.steps, 7u);
  EXPECT_NEAR(options.min_excess.count(), 0.0005, 1e-12);
  ::setenv("UNIMSG_STRAGGLER_FACTOR", "1", 1);  // must be above 1
  EXPECT_THROW(StragglerOptions::from_env(), ConfigError);
  ::setenv("UNIMSG_STRAGGLER_FACTOR", "fast", 1);
  EXPECT_THROW(StragglerOptions::from_env(), ConfigError);
  ::unsetenv("UNIMSG_STRAGGLER_FACTOR");
  ::setenv("UNIMSG_STRAGGLER_STEPS", "0", 1);
  EXPECT_THROW(StragglerOptions::from_env(), ConfigError);
  ::unsetenv("UNIMSG_STRAGGLER_STEPS");
  ::unsetenv("UNIMSG_STRAGGLER_MIN_MS");
}

TEST(StatusBoard, RendersPrometheusSeriesPerRank) {
  StatusBoard board(3, {}, "job", 1);
  board.add(sample_report(0), 1000.0);
  StatusReport big = sample_report(2);
  big.wire_bytes = 123456789012345;  // a counter keeps every digit
  big.dense_wire_bytes = 123456789012345;
  board.add(big, 1000.0);
  board.set_heartbeat_ages({0.0, 12.5, 0.3});
  const std::string text = board.prometheus(1001.0);
  for (const char* line :
       {"# TYPE unimsg_step gauge\n", "unimsg_step{rank=\"0\"} 40\n",
        "unimsg_step{rank=\"2\"} 40\n", "# TYPE unimsg_allreduce_bytes_total counter\n",
        "unimsg_allreduce_bytes_total{rank=\"2\"} 123456789012345\n",
        "unimsg_samples_per_second{rank=\"0\"} 1280\n", "unimsg_step_seconds{rank=\"0\"} 0.05\n",
        "unimsg_compute_seconds{rank=\"0\"} 0.03\n", "unimsg_wait_seconds{rank=\"0\"} 0.02\n",
        "unimsg_compression_ratio{rank=\"0\"} 32\n", "unimsg_loss{rank=\"2\"} 0.25\n",
        "unimsg_memory_rss_bytes{rank=\"0\"} 123456789\n",
        // Rank 1 never reported, but rank 0 hears (or misses) its heartbeats.
        "unimsg_heartbeat_age_seconds{rank=\"1\"} 12.5\n", "unimsg_straggler{rank=\"1\"} 0\n",
        "unimsg_report_age_seconds{rank=\"0\"} 1\n", "unimsg_world_size 3\n",
        "unimsg_restarts_total 1\n"}) {
    EXPECT_NE(text.find(line), std::string::npos) << "missing: " << line << "\n" << text;
  }
  EXPECT_EQ(text.find("unimsg_step{rank=\"1\"}"), std::string::npos);
  // Every sample line is "name{labels} value" or "name value"; every family has HELP and TYPE.
  std::size_t samples = 0;
  std::size_t start = 0;
  while (start < text.size()) {
    const std::size_t end = text.find('\n', start);
    ASSERT_NE(end, std::string::npos) << "the exposition ends with a newline";
    const std::string line = text.substr(start, end - start);
    start = end + 1;
    if (line.rfind("# HELP ", 0) == 0 || line.rfind("# TYPE ", 0) == 0) continue;
    ++samples;
    EXPECT_EQ(line.rfind("unimsg_", 0), 0u) << line;
    EXPECT_NE(line.find(' '), std::string::npos) << line;
  }
  EXPECT_GT(samples, 20u);
}

TEST(StatusBoard, SnapshotSummarisesAndFlagsStragglers) {
  StragglerOptions options;
  options.steps = 10;
  StatusBoard board(2, options, "train", 0);
  StatusReport fast = sample_report(0);
  StatusReport slow = sample_report(1);
  slow.compute_seconds = 1.0;  // 100 ms per step against 30 ms
  board.add(fast, 10.0);
  const auto change = board.add(slow, 10.0);
  ASSERT_TRUE(change);
  EXPECT_TRUE(change->straggler);
  board.add_event({11.0, "failure", "rank 3 lost"});
  board.sample(12.0);
  const json snapshot = board.snapshot(12.0, true);
  EXPECT_EQ(snapshot.at("job"), "train");
  EXPECT_EQ(snapshot.at("world_size"), 2);
  EXPECT_EQ(snapshot.at("step"), 40);
  EXPECT_EQ(snapshot.at("total_steps"), 100);
  EXPECT_DOUBLE_EQ(snapshot.at("samples_per_second").get<double>(), 2560.0);
  EXPECT_NEAR(snapshot.at("eta_seconds").get<double>(), 60 * 0.05, 1e-9);
  ASSERT_EQ(snapshot.at("ranks").size(), 2u);
  EXPECT_FALSE(snapshot.at("ranks")[0].at("straggler").get<bool>());
  EXPECT_TRUE(snapshot.at("ranks")[1].at("straggler").get<bool>());
  EXPECT_EQ(snapshot.at("ranks")[1].at("host"), "node-1");
  ASSERT_EQ(snapshot.at("events").size(), 2u);
  EXPECT_EQ(snapshot.at("events")[0].at("kind"), "straggler");
  EXPECT_NE(snapshot.at("events")[0].at("text").get<std::string>().find("rank 1 is a straggler"),
            std::string::npos);
  EXPECT_EQ(snapshot.at("events")[1].at("kind"), "failure");
  ASSERT_EQ(snapshot.at("history").at("1").size(), 1u);
  EXPECT_DOUBLE_EQ(snapshot.at("history").at("1")[0][3].get<double>(), 0.1);
  // Without history, no points.
  EXPECT_FALSE(board.snapshot(12.0, false).contains("history"));
}

TEST(StatusBoard, AnEmptyLastWindowKeepsThePreviousFigures) {
  StatusBoard board(1, {}, "job", 0);
  board.add(sample_report(0), 1.0);
  StatusReport last = sample_report(0);
  last.step = 41;
  last.steps = 0;
  last.samples = 0;
  last.seconds = 0;
  last.final_report = true;
  EXPECT_FALSE(board.add(last, 2.0));
  const json rank = board.snapshot(2.0, false).at("ranks")[0];
  EXPECT_EQ(rank.at("step"), 41);
  EXPECT_TRUE(rank.at("final").get<bool>());
  EXPECT_DOUBLE_EQ(rank.at("samples_per_second").get<double>(), 1280.0);
  EXPECT_DOUBLE_EQ(rank.at("step_seconds").get<double>(), 0.05);
}

TEST(StatusBoard, HistoryAndEventsAreBounded) {
  StatusBoard board(1, {}, "job", 0);
  board.add(sample_report(0), 0.0);
  for (std::size_t i = 0; i < StatusBoard::kHistoryPoints + 50; ++i) {
    board.sample(static_cast<double>(i));
  }
  for (std::size_t i = 0; i < StatusBoard::kEventsKept + 50; ++i) board.add_event({0, "x", "y"});
  const json snapshot = board.snapshot(1.0, true);
  EXPECT_EQ(snapshot.at("history").at("0").size(), StatusBoard::kHistoryPoints);
  EXPECT_EQ(snapshot.at("events").size(), StatusBoard::kEventsKept);
}

TEST(Trace, WritesChromeTraceCompleteEventsWithLanesAsThreads) {
  TraceRecorder recorder(3);
  const auto origin = std::chrono::steady_clock::now();
  recorder.record({"engine", "allreduce", origin + std::chrono::microseconds(10),
                   std::chrono::microseconds(5), R"({"bytes":64})"});
  recorder.record({"training", "step", origin + std::chrono::microseconds(2),
                   std::chrono::microseconds(20), ""});
  recorder.record({"engine", "negotiate", origin, std::chrono::microseconds(1), "not json"});
  recorder.record({"engine", "dropped", origin, std::chrono::microseconds(1), ""});
  EXPECT_EQ(recorder.dropped(), 1u);
  const auto events = recorder.take();
  ASSERT_EQ(events.size(), 3u);
  EXPECT_TRUE(recorder.take().empty());

  std::map<std::string, int> lanes;
  const std::string text =
      to_chrome_trace_events(events, 3, std::chrono::microseconds(100), origin, lanes);
  const json parsed = json::parse("[" + text + "]");
  int complete = 0;
  bool process_named = false;
  std::map<int, std::string> thread_names;
  for (const auto& event : parsed) {
    EXPECT_EQ(event.at("pid"), 3);
    if (event.at("ph") == "M" && event.at("name") == "process_name") {
      process_named = event.at("args").at("name") == "rank 3";
    } else if (event.at("ph") == "M" && event.at("name") == "thread_name") {
      thread_names[event.at("tid").get<int>()] = event.at("args").at("name");
    } else if (event.at("ph") == "X") {
      ++complete;
      if (event.at("name") == "allreduce") {
        EXPECT_DOUBLE_EQ(event.at("ts").get<double>(), 110.0);  // shifted by the offset
        EXPECT_DOUBLE_EQ(event.at("dur").get<double>(), 5.0);
        EXPECT_EQ(event.at("args").at("bytes"), 64);
        EXPECT_EQ(thread_names.at(event.at("tid").get<int>()), "engine");
      }
      if (event.at("name") == "negotiate") {
        EXPECT_FALSE(event.contains("args"));
      }
    }
  }
  EXPECT_TRUE(process_named);
  EXPECT_EQ(complete, 3);
  EXPECT_EQ(thread_names.size(), 2u);
  // A later slice of the same rank reuses the lanes' ids and names nothing again.
  const std::string more = to_chrome_trace_events(events, 3, {}, origin, lanes);
  EXPECT_EQ(more.find("thread_name"), std::string::npos);
  EXPECT_EQ(more.find("process_name"), std::string::npos);
}

TEST(Trace, NullRecorderSpansCostNothing) {
  { TraceSpan span(nullptr, "engine", "nothing"); }
  TraceRecorder recorder;
  {
    TraceSpan span(&recorder, "checkpoint", "checkpoint");
    span.set_args(R"({"step":3})");
  }
  const auto events = recorder.take();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].lane, "checkpoint");
  EXPECT_EQ(events[0].args_json, R"({"step":3})");
  EXPECT_GE(events[0].duration.count(), 0);
}

}  // namespace
}  // namespace unimsg
