// BusCore's construction: options checked, the wire compatibility of every rank, the receive ring.

#include "bus_core.hpp"

#include <algorithm>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "unimsg/core/error.hpp"
#include "unimsg/core/log.hpp"

namespace unimsg::detail {

BusCore::BusCore(MPI_Comm parent, BusOptions opts) : comm(parent), options(std::move(opts)) {
  rank = comm.rank();
  size = comm.size();
  // Errors on the bus's own communicator become MpiError exceptions (and a truncated foreign
  // message a rejection), not an abort of the whole job.
  check_mpi(MPI_Comm_set_errhandler(comm.get(), MPI_ERRORS_RETURN), rank,
            "MPI_Comm_set_errhandler");
  log = options.logger ? options.logger : make_rank_logger(rank, size);
  if (options.max_payload_bytes > static_cast<std::uint64_t>(std::numeric_limits<int>::max())) {
    throw ConfigError(rank, "bus", "max_payload_bytes must be below 2 GiB (MPI counts are int)");
  }
  if (options.window_per_peer < 2) {
    throw ConfigError(rank, "bus", "window_per_peer must be at least 2");
  }
  limits.max_payload_bytes = options.max_payload_bytes;
  peers.resize(static_cast<std::size_t>(size));
  pending_receives.resize(static_cast<std::size_t>(size));
  posted_payload_bytes.resize(static_cast<std::size_t>(size), 0);
  goodbye_from.assign(static_cast<std::size_t>(size), 0);
  express_peers.resize(static_cast<std::size_t>(size));
  express_dropping.assign(static_cast<std::size_t>(size), 0);
  buffers = std::make_shared<BufferPool>(options.buffer_pool_bytes);

  check_wire_compatibility();

  int* tag_upper_bound = nullptr;
  int found = 0;
  check_mpi(MPI_Comm_get_attr(comm.get(), MPI_TAG_UB, &tag_upper_bound, &found), rank,
            "MPI_Comm_get_attr(MPI_TAG_UB)");
  const int tag_ub = found && tag_upper_bound ? *tag_upper_bound : 32767;
  payload_tag_span = std::min(1 << 20, tag_ub - kTagPayloadBase + 1);
  // No more slots than the inbox may hold: a posted slot receives whether anyone reads or not.
  ring.resize(
      static_cast<std::size_t>(std::clamp<std::uint64_t>(options.inbox_messages, 1, kRingSlots)));
  for (auto& slot : ring) post_ring_slot(slot);
  // Not bounded by the inbox: express messages never enter it unless it has room.
  for (std::size_t slot = 0; slot < kExpressSlots; ++slot) post_express_slot(slot);
}

// Every rank must speak the same wire format and envelope limits: the receive ring's buffers are
// kPackedLimit bytes (the express receives' kExpressLimit), and Open MPI 4.1 (vader, single-copy)
// writes a longer message past the end of the receive buffer instead of truncating it. So each
// sender caps its envelopes, and here every rank checks, once, that every other one does the same.
void BusCore::check_wire_compatibility() {
  constexpr int kFields = 3;
  const std::array<int, kFields> mine{kMessageVersion, static_cast<int>(kPackedLimit),
                                      static_cast<int>(kExpressLimit)};
  std::vector<int> all(kFields * static_cast<std::size_t>(size));
  check_mpi(MPI_Allgather(mine.data(), kFields, MPI_INT, all.data(), kFields, MPI_INT, comm.get()),
            rank, "bus: MPI_Allgather");
  const auto limits_text = [](const int* fields) {
    return "version " + std::to_string(fields[0]) + ", envelope limit " +
           std::to_string(fields[1]) + ", express limit " + std::to_string(fields[2]);
  };
  std::string different;
  for (int peer = 0; peer < size; ++peer) {
    const int* theirs = all.data() + kFields * static_cast<std::size_t>(peer);
    if (!std::equal(mine.begin(), mine.end(), theirs)) {
      different += (different.empty() ? "" : ", ") + std::string("rank ") + std::to_string(peer) +
                   " (" + limits_text(theirs) + ")";
    }
  }
  if (!different.empty()) {
    throw ConfigError(rank, "bus",
                      "ranks run incompatible unimsg builds: this rank has " +
                          limits_text(mine.data()) + ", but " + different);
  }
}

}  // namespace unimsg::detail
