#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "unimsg/core/error.hpp"
#include "unimsg/launcher/events.hpp"
#include "unimsg/launcher/launcher.hpp"
#include "unimsg/launcher/progress.hpp"

namespace unimsg {
namespace {

TEST(Launcher, DeadProcessFromMpirunAndSrunOutput) {
  EXPECT_EQ(parse_dead_process("mpirun noticed that process rank 2 with PID 4242 on node n3 exited "
                               "on signal 9 (Killed)."),
            (DeadProcess{2, "n3", "signal 9 (Killed)"}));
  EXPECT_EQ(parse_dead_process("  Process name: [[31335,1],3]"),
            (DeadProcess{3, "", "a non-zero exit"}));
  EXPECT_EQ(parse_dead_process("srun: error: n7: task 5: Killed"),
            (DeadProcess{5, "n7", "Killed"}));
  EXPECT_EQ(parse_dead_process("srun: error: c-h2: tasks 4-5: Exited with exit code 75"),
            (DeadProcess{4, "c-h2", "Exited with exit code 75"}));
  for (const char* other :
       {"", "[rank 2] UNIMSG_FAULT_INJECT: killing this rank at step 25",
        "mpirun noticed that process rank x with PID 1", "  Process name: [[31335,1],]",
        "srun: error: Unable to create step", "{\"step\":3}"}) {
    EXPECT_FALSE(parse_dead_process(other)) << other;
  }
}

TEST(Launcher, ShrinkTakesTheLostRanksSlotFromItsOwnHost) {
  const std::vector<Host> hosts{{"a", 2}, {"b", 2}, {"c", 2}};
  FaultReport report;
  report.lost_ranks = {1};
  report.rank_hosts = {"a"};
  const Shrink next = shrink(hosts, 6, report);
  EXPECT_EQ(next.np, 5);
  EXPECT_EQ(next.hosts, (std::vector<Host>{{"a", 1}, {"b", 2}, {"c", 2}}));
  report.rank_hosts = {"elsewhere"};  // unknown host: the last one gives a slot
  EXPECT_EQ(shrink(hosts, 6, report).hosts, (std::vector<Host>{{"a", 2}, {"b", 2}, {"c", 1}}));
}

TEST(Progress, LineFromTheMonitorsStatus) {
  const std::string status = R"({"job":"train","step":1200,"total_steps":4800,
      "samples_per_second":2345.4,"eta_seconds":90.2,"world_size":4,"restart":0,
      "ranks":[{"rank":0,"reported":true,"straggler":false},{"rank":1,"reported":true,
      "straggler":true},{"rank":2,"reported":true},{"rank":3,"reported":false}],"events":[]})";
  EXPECT_EQ(progress_text(status),
            "step 1200/4800 (25.0%) | 2345 samples/s | ETA 1m30s | 4 ranks | 1 straggler");
  // Unknown total and ETA: just what is known.
  EXPECT_EQ(progress_text(R"({"step":7,"total_steps":0,"eta_seconds":null,
                              "ranks":[{"reported":true}]})"),
            "step 7 | 1 rank");
  // Nothing to show: no rank reported yet, or not a status at all (a partial or damaged file).
  for (const char* bad :
       {R"({"step":0,"ranks":[{"reported":false}]})", "", "{\"step\":", "[]",
        R"({"step":-1,"ranks":[]})", R"({"step":1,"ranks":{}})", R"({"step":1,"ranks":[3]})"}) {
    EXPECT_FALSE(progress_text(bad)) << bad;
  }
}

TEST(Progress, DurationsAndModes) {
  EXPECT_EQ(format_duration(42.4), "42s");
  EXPECT_EQ(format_duration(185), "3m05s");
  EXPECT_EQ(format_duration(3720), "1h02m");
  EXPECT_EQ(format_duration(-1), "?");
  EXPECT_EQ(parse_progress_mode("auto", true), ProgressMode::kTerminal);
  EXPECT_EQ(parse_progress_mode("auto", false), ProgressMode::kPlain);
  EXPECT_EQ(parse_progress_mode("tty", false), ProgressMode::kTerminal);
  EXPECT_EQ(parse_progress_mode("plain", true), ProgressMode::kPlain);
  EXPECT_EQ(parse_progress_mode("off", true), ProgressMode::kOff);
  EXPECT_THROW(parse_progress_mode("fancy", true), ConfigError);
}

TEST(Launcher, HostListsParseAndMerge) {
  EXPECT_EQ(parse_host_list("a:2,b,c:4"), (std::vector<Host>{{"a", 2}, {"b", 1}, {"c", 4}}));
  EXPECT_EQ(parse_host_list("a:1,a:2"), (std::vector<Host>{{"a", 3}}));
  for (const char* bad : {"", "a,,b", "a:0", "a:-1", "a:x", ":2", "a b", "a:2:3"}) {
    EXPECT_THROW(parse_host_list(bad), ConfigError) << bad;
  }
}

TEST(Launcher, HostfilesParse) {
  const auto path =
      std::filesystem::temp_directory_path() / ("unimsg_hosts_" + std::to_string(::getpid()));
  std::ofstream(path) << "# cluster\nnode1 slots=4\nnode2:2  # comment\n\nnode3\n";
  EXPECT_EQ(parse_hostfile(path), (std::vector<Host>{{"node1", 4}, {"node2", 2}, {"node3", 1}}));
  std::ofstream(path) << "node1 cores=4\n";
  EXPECT_THROW(parse_hostfile(path), ConfigError);
  std::ofstream(path) << "# nothing\n";
  EXPECT_THROW(parse_hostfile(path), ConfigError);
  std::filesystem::remove(path);
  EXPECT_THROW(parse_hostfile(path), ConfigError);
}

TEST(Launcher, CommandLinesForMpirunAndSrun) {
  LaunchPlan plan;
  plan.np = 4;
  plan.program = {"./train", "--epochs", "1"};
  plan.environment = {{"UNIMSG_RESTART_COUNT", "1"}};
  EXPECT_EQ(build_command(plan),
            (std::vector<std::string>{"mpirun", "-np", "4", "--oversubscribe", "--bind-to", "none",
                                      "-x", "UNIMSG_RESTART_COUNT", "./train", "--epochs", "1"}));
  plan.hosts = {{"a", 2}, {"b", 2}};
  EXPECT_EQ(build_command(plan)[3], "--host");
  EXPECT_EQ(build_command(plan)[4], "a:2,b:2");
  plan.np = 5;
  EXPECT_THROW(build_command(plan), ConfigError);  // more ranks than slots
  plan.np = 4;
  plan.slurm = true;
  EXPECT_EQ(build_command(plan),
            (std::vector<std::string>{"srun", "--mpi=pmix", "--ntasks=4", "--kill-on-bad-exit=1",
                                      "--overlap", "--nodes=2", "--nodelist=a,b", "./train",
                                      "--epochs", "1"}));
  plan.hosts = {{"a", 2}, {"b", 2}, {"c", 2}};
  plan.np = 3;  // srun uses every node it is given: only those that hold the ranks
  EXPECT_EQ(build_command(plan)[6], "--nodelist=a,b");
  plan.np = 7;
  EXPECT_THROW(build_command(plan), ConfigError);
  plan.np = 4;
  plan.program.clear();
  EXPECT_THROW(build_command(plan), ConfigError);
}

TEST(Launcher, ShrinkDropsLostHostsAndSlots) {
  FaultReport unknown;  // something died, nobody said what: one slot less
  EXPECT_EQ(shrink({}, 4, unknown).np, 3);
  const std::vector<Host> hosts{{"a", 2}, {"b", 2}, {"c", 2}};
  FaultReport host_lost;
  host_lost.lost_hosts = {"b"};
  host_lost.lost_ranks = {2, 3};
  const Shrink without_b = shrink(hosts, 6, host_lost);
  EXPECT_EQ(without_b.np, 4);
  EXPECT_EQ(without_b.hosts, (std::vector<Host>{{"a", 2}, {"c", 2}}));
  FaultReport rank_lost;
  rank_lost.lost_ranks = {5};
  const Shrink one_less = shrink(hosts, 6, rank_lost);
  EXPECT_EQ(one_less.np, 5);
  EXPECT_EQ(total_slots(one_less.hosts), 5);
}

TEST(Launcher, FaultReportsAreReadOrRejected) {
  const auto path =
      std::filesystem::temp_directory_path() / ("unimsg_report_" + std::to_string(::getpid()));
  EXPECT_FALSE(read_fault_report(path).has_value());
  std::ofstream(path)
      << R"({"lost_ranks":[1],"lost_hosts":["b"],"reason":"heartbeat","last_step":40})";
  const auto report = read_fault_report(path);
  ASSERT_TRUE(report.has_value());
  EXPECT_EQ(report->lost_ranks, std::vector<int>{1});
  EXPECT_EQ(report->lost_hosts, std::vector<std::string>{"b"});
  EXPECT_EQ(report->last_step, 40);
  // A damaged report (a full disk left it empty, a crash cut it, garbage) is no report: the
  // launcher must still relaunch, not stop on it.
  for (const char* damaged : {R"({"lost_ranks":"one"})", "", "\x00{garbage", R"({"lost_ranks":[1)",
                              R"({"lost_ranks":[1],"last_step":"x"})", "[]"}) {
    std::ofstream(path) << damaged;
    EXPECT_FALSE(read_fault_report(path).has_value()) << damaged;
  }
  std::filesystem::remove(path);
}

TEST(Launcher, CommandLineHoldsNoValues) {
  // Anything on mpirun's command line is visible in ps on every host: names only, the values go
  // through mpirun's environment.
  LaunchPlan plan;
  plan.np = 2;
  plan.program = {"./train"};
  plan.environment = {{"DB_PASSWORD", "pw-s3cr3t"}, {"UNIMSG_API_TOKEN", "tok-hunter2"}};
  const auto command = build_command(plan);
  for (const auto& word : command) {
    EXPECT_EQ(word.find("s3cr3t"), std::string::npos) << word;
    EXPECT_EQ(word.find("hunter2"), std::string::npos) << word;
  }
  EXPECT_NE(std::find(command.begin(), command.end(), "DB_PASSWORD"), command.end());
  EXPECT_NE(std::find(command.begin(), command.end(), "UNIMSG_API_TOKEN"), command.end());
}

TEST(Launcher, SlotCountsThatOverflowAreRefused) {
  EXPECT_THROW(parse_host_list("a:2000000000,b:2000000000"), ConfigError);
  EXPECT_THROW(parse_host_list("a:2000000000,a:2000000000"), ConfigError);
  EXPECT_THROW(parse_host_list("a:99999999999"), ConfigError);
  const auto path =
      std::filesystem::temp_directory_path() / ("unimsg_hosts_big_" + std::to_string(::getpid()));
  std::ofstream(path) << "a slots=2000000000\nb:2000000000\n";
  EXPECT_THROW(parse_hostfile(path), ConfigError);
  std::filesystem::remove(path);
  EXPECT_EQ(total_slots(parse_host_list("a:1000000000,b:1000000000")), 2000000000);
}

TEST(Launcher, DryRunHidesValues) {
  LaunchPlan plan;
  plan.np = 2;
  plan.program = {"./train"};
  plan.environment = {{"DB_PASSWORD", "pw-s3cr3t"}, {"UNIMSG_RUN_DIR", "/runs/a"}};
  const std::string text = describe_launch(plan);
  EXPECT_EQ(text.find("s3cr3t"), std::string::npos) << text;
  EXPECT_EQ(text.find("/runs/a"), std::string::npos) << text;
  EXPECT_NE(text.find("DB_PASSWORD=***"), std::string::npos) << text;
  plan.slurm = true;  // srun passes its environment: the names are still listed, not the values
  EXPECT_EQ(describe_launch(plan).find("s3cr3t"), std::string::npos);
  EXPECT_NE(describe_launch(plan).find("DB_PASSWORD"), std::string::npos);
}

TEST(Launcher, OneJobPerRunDir) {
  const auto dir =
      std::filesystem::temp_directory_path() / ("unimsg_lock_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  {
    const RunDirLock first(dir);
    try {
      const RunDirLock second(dir);
      ADD_FAILURE() << "a second job got the run dir";
    } catch (const ConfigError& refused) {
      const std::string message = refused.what();
      EXPECT_NE(message.find(dir.string()), std::string::npos) << message;
      EXPECT_NE(message.find("--run-dir"), std::string::npos) << message;
    }
  }
  EXPECT_NO_THROW(RunDirLock again(dir));  // released with the first
  std::filesystem::remove_all(dir);
}

TEST(Events, TextIsCutOnACharacterBoundary) {
  const std::string e_acute = "\xC3\xA9";
  const std::string euro = "\xE2\x82\xAC";
  EXPECT_EQ(cut_utf8("abc", 8), "abc");
  EXPECT_EQ(cut_utf8("ab" + e_acute, 3), "ab");  // the cut falls inside é
  EXPECT_EQ(cut_utf8("ab" + e_acute, 4), "ab" + e_acute);
  EXPECT_EQ(cut_utf8("a" + euro + "b", 2), "a");
  EXPECT_EQ(cut_utf8("a" + euro + "b", 3), "a");
  EXPECT_EQ(cut_utf8("a" + euro + "b", 4), "a" + euro);
  EXPECT_EQ(cut_utf8("ab\xFF\xFE", 3), "ab\xFF");  // stray bytes are characters of their own
  EXPECT_EQ(cut_utf8("ab\x82\x82\x82\x82", 4), "ab\x82\x82");
}

TEST(Events, LinesAreValidJsonWhateverTheText) {
  // A 2-byte character across the cut, then bytes that are not UTF-8.
  std::string reason(kMaxEventText - 1, 'x');
  reason += "\xC3\xA9" + std::string(10, 'y') + "\xFF\xFE";
  const std::string line =
      event_line("failure", 1.5, 3, 1, {{"reason", reason}, {"lost_hosts", {"h\xFF"}}});
  const auto parsed = nlohmann::json::parse(line);  // valid UTF-8 and JSON
  const auto cut = parsed.at("reason").get<std::string>();
  EXPECT_EQ(cut, std::string(kMaxEventText - 1, 'x'));
  EXPECT_EQ(parsed.at("lost_hosts").at(0).get<std::string>(), "h\xEF\xBF\xBD");  // U+FFFD
  EXPECT_EQ(parsed.at("event"), "failure");
  EXPECT_EQ(parsed.at("world_size"), 3);
  // Bytes that are not UTF-8 inside the kept part are replaced, not thrown over.
  const auto bad = nlohmann::json::parse(event_line("failure", 1, 1, 0,
                                                    {{"reason",
                                                      "a\xFF"
                                                      "b"}}));
  EXPECT_EQ(bad.at("reason").get<std::string>(),
            "a\xEF\xBF\xBD"
            "b");
}

TEST(Progress, SplitterPassesOnLinesAndBoundsWhatItHolds) {
  LineSplitter splitter;
  std::string relayed;
  std::vector<std::string> lines;
  const LineSplitter::Sink relay = [&](std::string_view text) { relayed += text; };
  const LineSplitter::Sink line = [&](std::string_view text) { lines.emplace_back(text); };
  splitter.feed("one\ntwo\r\nthr", relay, line);
  EXPECT_EQ(relayed, "one\ntwo\r\n");
  EXPECT_EQ(lines, (std::vector<std::string>{"one", "two"}));
  splitter.feed("ee\n", relay, line);
  EXPECT_EQ(lines.back(), "three");
  // A progress bar: each '\r' sends what came before it, at once.
  relayed.clear();
  splitter.feed("10%\r20%\r3", relay, line);
  EXPECT_EQ(relayed, "10%\r20%\r");
  EXPECT_EQ(splitter.held(), 1u);
  splitter.feed("0%\rdone\n", relay, line);
  EXPECT_EQ(relayed, "10%\r20%\r30%\rdone\n");
  EXPECT_EQ(lines.back(), "10%\r20%\r30%\rdone");
  // Output that never ends its line: nothing waits beyond the bound, nothing is lost.
  relayed.clear();
  const std::string chunk(1000, 'b');
  for (int i = 0; i < 100; ++i) {
    splitter.feed(chunk, relay, line);
    EXPECT_LT(splitter.held(), LineSplitter::kMaxHeld);
  }
  EXPECT_GE(relayed.size(), 100 * chunk.size() - LineSplitter::kMaxHeld);
  splitter.finish(relay, line);
  EXPECT_EQ(relayed, std::string(100 * chunk.size(), 'b'));
  EXPECT_EQ(lines.back(), std::string(LineSplitter::kMaxHeld, 'b'));  // the read line is cut
  // A pause sends what is held; the line stays open for reading.
  relayed.clear();
  lines.clear();
  splitter.feed("prompt> ", relay, line);
  splitter.release(relay);
  EXPECT_EQ(relayed, "prompt> ");
  splitter.feed("yes\n", relay, line);
  EXPECT_EQ(lines, (std::vector<std::string>{"prompt> yes"}));
}

}  // namespace
}  // namespace unimsg
