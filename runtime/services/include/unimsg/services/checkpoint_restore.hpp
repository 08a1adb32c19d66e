#pragma once

// Restore after a relaunch: the newest intact checkpoint that *any* surviving rank holds, on
// every rank. A fast tier is node-local (/dev/shm), so after a re-rank the newest checkpoint may
// sit on one host only: every rank loads the newest intact one it can see, the ranks agree on the
// newest step, and the lowest rank holding it broadcasts it to the ranks that lack it.

#include <mpi.h>

#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "unimsg/checkpoint/checkpoint.hpp"

namespace unimsg {

using LocalCheckpointLoader =
    std::function<std::optional<Checkpoint>(std::vector<std::string>* skipped)>;

struct RestoredCheckpoint {
  Checkpoint checkpoint;
  int source_rank = 0;    // the rank whose copy it is (this one, or the one that sent it)
  bool received = false;  // it came over MPI: this rank held no copy of that step
};

struct RestoreOptions {
  // How long each of the restore's collectives waits for the other ranks (a rank stuck loading
  // from a slow filesystem still heartbeats, so only this bound notices it). The default is
  // CommunicatorOptions{}.timeout's; a caller with a communicator passes its timeout.
  std::chrono::nanoseconds timeout = std::chrono::seconds(300);
};

// Collective over `comm` (on a duplicate of it). `load_local` is this rank's view
// (Checkpointer::load_latest or TieredCheckpointer::load_latest); damaged checkpoints it skipped
// are added to `skipped`. nullopt on every rank when no rank holds one. A TimeoutError naming
// the checkpoint restore when the other ranks do not reach one of its collectives within
// options.timeout: the restore's communicator is then abandoned (a started MPI collective
// cannot be cancelled), so the caller should treat it as a fault of the job.
std::optional<RestoredCheckpoint> restore_newest_anywhere(
    MPI_Comm comm, const LocalCheckpointLoader& load_local,
    std::vector<std::string>* skipped = nullptr, const RestoreOptions& options = {});

// Who writes the node-local fast tier, given each rank's host: rank 0 and its buddy, the lowest
// rank on the next host (hosts in order of their lowest rank, the last host's buddy the first),
// so that every fast checkpoint lives on two hosts and the loss of either keeps the other's copy
// (Gemini's placement, for a job whose ranks all hold the same state: the buddy writes its own
// replica, nothing crosses the network). One host: rank 0 alone.
std::vector<int> fast_tier_writers(const std::vector<std::string>& host_of_rank);

// The byte form a checkpoint travels in (step, metadata, named blobs; lengths first), and back
// (CheckpointError for truncated or inconsistent bytes: never an over-read).
std::vector<std::byte> serialize_checkpoint(const Checkpoint& checkpoint);
Checkpoint deserialize_checkpoint(const std::vector<std::byte>& bytes, int rank = -1);

}  // namespace unimsg
