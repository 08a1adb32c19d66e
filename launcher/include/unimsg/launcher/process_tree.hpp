#pragma once

// The processes a launch leaves behind. Open MPI runs each launch agent (ssh) in a process group
// of its own, and a killed mpirun orphans them: unimsg-run makes itself a child subreaper, so
// that whatever its job started stays among its descendants, where it can be found and ended.

#include <sys/types.h>

#include <chrono>
#include <vector>

namespace unimsg {

// Orphaned descendants are reparented to this process instead of init (Linux; false elsewhere).
bool become_subreaper();

// Every live process whose chain of parents leads to `root` (root excluded), from /proc, parents
// before their children.
std::vector<pid_t> descendants_of(pid_t root);

// Ends every descendant of this process: SIGTERM, and SIGCONT for the stopped ones (which lets a
// launch agent pass it on to what it runs on its host), then SIGKILL to whatever is left after
// `grace`, reaping them. Returns how many processes it signalled.
int end_descendants(std::chrono::milliseconds grace);

}  // namespace unimsg
