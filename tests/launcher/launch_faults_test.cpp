// What unimsg-run reads off a multi-host launch (hosts lost by the launch agent, hostfiles with a
// line per slot, the agent on mpirun's command line) and the processes a launch leaves behind.

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "unimsg/core/error.hpp"
#include "unimsg/launcher/launcher.hpp"
#include "unimsg/launcher/process_tree.hpp"
#include "unimsg/launcher/slurm.hpp"

namespace unimsg {
namespace {

TEST(LaunchFaults, HostsLostAsTheLaunchAgentSaysIt) {
  EXPECT_EQ(parse_lost_host("ssh: connect to host n3 port 22: No route to host")->host, "n3");
  EXPECT_EQ(
      parse_lost_host("ssh: Could not resolve hostname node-7: Name or service not known")->host,
      "node-7");
  const auto closed = parse_lost_host("Connection to c1-h2 closed by remote host.\r\n");
  ASSERT_TRUE(closed);
  EXPECT_EQ(*closed, (LostHost{"c1-h2", "Connection to c1-h2 closed by remote host."}));
  EXPECT_EQ(parse_lost_host("Timeout, server n9.example not responding.")->host, "n9.example");
  EXPECT_EQ(parse_lost_host("srun: error: Node failure on c1-h1")->host, "c1-h1");
  for (const char* other :
       {"", "Connection to n3 closed.", "ssh: connect to host  port 22: refused",
        "srun: error: Node failure on ", "srun: error: Node failure on a b",
        "ssh: connect to host a;rm port 22: x", "mpirun noticed that process rank 2 with PID 1",
        "{\"step\":3}", "Connection to ", "[rank 3] ssh: connect to host n3 port 22: refused"}) {
    EXPECT_FALSE(parse_lost_host(other)) << other;
  }
  // A host name is never taken from an absurdly long line whole.
  const std::string long_line = "ssh: connect to host n3 port 22: " + std::string(10000, 'x');
  EXPECT_LE(parse_lost_host(long_line)->how.size(), 4096u);
}

TEST(LaunchFaults, SlurmAllocationsAsHostLists) {
  EXPECT_EQ(parse_slurm_counts("2(x3)"), (std::vector<int>{2, 2, 2}));
  EXPECT_EQ(parse_slurm_counts("4,1(x2),8"), (std::vector<int>{4, 1, 1, 8}));
  for (const char* bad :
       {"", "0", "2(x0)", "2(x3", "x", "2,,1", "2(x-1)", "-2", "2(x99999999)", "99999999999"}) {
    EXPECT_THROW(parse_slurm_counts(bad), ConfigError) << bad;
  }
  EXPECT_EQ(slurm_hosts({"c-h0", "c-h2"}, "2(x2)"), (std::vector<Host>{{"c-h0", 2}, {"c-h2", 2}}));
  EXPECT_THROW(slurm_hosts({"c-h0", "c-h2"}, "2"), ConfigError);         // counts for 1 of 2 nodes
  EXPECT_THROW(slurm_hosts({"c-h0"}, "2(x2)"), ConfigError);             // 2 counts for 1 node
  EXPECT_THROW(slurm_hosts({"c h0"}, "2"), ConfigError);                 // not a host name
  EXPECT_THROW(slurm_hosts({"a", "b"}, "2147483647(x2)"), ConfigError);  // past an int
}

TEST(LaunchFaults, AnAllocationNeedsScontrolToReadItsNodeList) {
  ::setenv("SLURM_JOB_NODELIST", "c-h[0-2]", 1);
  ::setenv("SLURM_JOB_CPUS_PER_NODE", "2(x3)", 1);
  EXPECT_THROW(allocation_hosts("/nonexistent/scontrol"), ConfigError);
  EXPECT_THROW(allocation_hosts("false"), ConfigError);
  ::unsetenv("SLURM_JOB_NODELIST");
  EXPECT_TRUE(allocation_hosts("/nonexistent/scontrol").empty());  // no allocation
  ::unsetenv("SLURM_JOB_CPUS_PER_NODE");
}

TEST(LaunchFaults, AHostOnSeveralLinesIsOneHost) {
  const auto path =
      std::filesystem::temp_directory_path() / ("unimsg_nodefile_" + std::to_string(::getpid()));
  // $PBS_NODEFILE: one line per slot.
  std::ofstream(path) << "n1\nn1\nn2\nn1\nn2 slots=2\n";
  const auto hosts = parse_hostfile(path);
  std::filesystem::remove(path);
  ASSERT_EQ(hosts, (std::vector<Host>{{"n1", 3}, {"n2", 3}}));
  FaultReport report;
  report.lost_hosts = {"n1"};
  const Shrink next = shrink(hosts, 6, report);
  EXPECT_EQ(next.hosts, (std::vector<Host>{{"n2", 3}}));
  EXPECT_EQ(next.np, 3);
}

TEST(LaunchFaults, TheLaunchAgentIsOnTheCommandLineAndSettingsInTheDryRun) {
  LaunchPlan plan;
  plan.np = 4;
  plan.hosts = {{"c-h0", 2}, {"c-h1", 2}};
  plan.program = {"train"};
  plan.launch_agent = "/run/unimsg-cluster/c/agent";
  plan.mpi_settings = {{"OMPI_MCA_btl_tcp_if_include", "198.18.0.0/24"}};
  const auto command = build_command(plan);
  const auto mca = std::find(command.begin(), command.end(), "plm_rsh_agent");
  ASSERT_NE(mca, command.end());
  EXPECT_EQ(*(mca - 1), "--mca");
  EXPECT_EQ(*(mca + 1), "/run/unimsg-cluster/c/agent");
  EXPECT_LT(mca - command.begin(),
            std::find(command.begin(), command.end(), "train") - command.begin());
  const std::string dry = describe_launch(plan);
  EXPECT_NE(dry.find("--mca plm_rsh_agent /run/unimsg-cluster/c/agent"), std::string::npos);
  EXPECT_NE(dry.find("OMPI_MCA_btl_tcp_if_include=198.18.0.0/24"), std::string::npos);
  plan.launch_agent.clear();
  const auto plain = build_command(plan);
  EXPECT_EQ(std::find(plain.begin(), plain.end(), "plm_rsh_agent"), plain.end());
}

bool alive(pid_t pid) {
  return ::kill(pid, 0) == 0;
}

// A launch that orphans a process in a process group of its own (as Open MPI's launch agents
// are): as a subreaper this process adopts it, finds it, and ends it.
TEST(ProcessTree, OrphansOfALaunchAreFoundAndEnded) {
  ASSERT_TRUE(become_subreaper());
  const auto marker =
      std::filesystem::temp_directory_path() / ("unimsg_orphan_" + std::to_string(::getpid()));
  std::filesystem::remove(marker);
  const pid_t launcher = ::fork();
  ASSERT_GE(launcher, 0);
  if (launcher == 0) {
    // The "mpirun": starts a grandchild in its own group, which ignores nothing, then exits.
    const pid_t agent = ::fork();
    if (agent == 0) {
      ::setpgid(0, 0);
      std::ofstream(marker) << ::getpid();
      ::execlp("sleep", "sleep", "300", static_cast<char*>(nullptr));
      ::_exit(127);
    }
    ::_exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(launcher, &status, 0), launcher);
  pid_t orphan = 0;
  for (int i = 0; i < 100 && orphan == 0; ++i) {
    std::ifstream(marker) >> orphan;
    if (orphan == 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  std::filesystem::remove(marker);
  ASSERT_GT(orphan, 0);
  const auto found = descendants_of(::getpid());
  EXPECT_NE(std::find(found.begin(), found.end(), orphan), found.end())
      << "the orphan was not adopted";
  EXPECT_GE(end_descendants(std::chrono::seconds(5)), 1);
  EXPECT_FALSE(alive(orphan));
  EXPECT_TRUE(descendants_of(::getpid()).empty());
}

}  // namespace
}  // namespace unimsg
