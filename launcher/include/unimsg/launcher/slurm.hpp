#pragma once

// unimsg-run inside a Slurm allocation: the allocation's nodes and CPUs as a host list, so that a
// lost node leaves the node list of the relaunch as a lost host leaves the host list of mpirun.

#include <string>
#include <string_view>
#include <vector>

#include "unimsg/launcher/launcher.hpp"

namespace unimsg {

// SLURM_JOB_CPUS_PER_NODE's form, "2(x3),1,4(x2)": one count per node, in node order.
// ConfigError naming the variable on anything else (or on more than `max_nodes` nodes).
std::vector<int> parse_slurm_counts(std::string_view text, std::size_t max_nodes = 100000);

// The nodes (as `scontrol show hostnames` lists them) paired with their CPUs; ConfigError when
// the two lists differ in length or a name is not a host name.
std::vector<Host> slurm_hosts(const std::vector<std::string>& nodes, std::string_view cpus);

// This allocation's hosts: SLURM_JOB_NODELIST expanded by `scontrol show hostnames` (Slurm's own
// reading of its compressed form), slots from SLURM_JOB_CPUS_PER_NODE. Empty outside an
// allocation (no SLURM_JOB_NODELIST): srun then makes its own. ConfigError when scontrol fails.
std::vector<Host> allocation_hosts(const std::string& scontrol = "scontrol");

}  // namespace unimsg
