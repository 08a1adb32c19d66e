#include "progress_tracker.hpp"

#include <cstring>
#include <random>

#include "unimsg/bus/mpi.hpp"
#include "unimsg/core/error.hpp"

namespace unimsg::detail {
namespace {

Payload u64_payload(std::uint64_t value) {
  std::vector<std::byte> bytes(8);
  std::memcpy(bytes.data(), &value, 8);
  return Payload(std::move(bytes));
}

}  // namespace

std::vector<int> world_ranks_of(MPI_Comm comm) {
  int size = 0;
  MPI_Comm_size(comm, &size);
  MPI_Group group = MPI_GROUP_NULL;
  MPI_Group world_group = MPI_GROUP_NULL;
  MPI_Comm_group(comm, &group);
  MPI_Comm_group(MPI_COMM_WORLD, &world_group);
  std::vector<int> local(static_cast<std::size_t>(size));
  for (int i = 0; i < size; ++i) local[static_cast<std::size_t>(i)] = i;
  std::vector<int> world(local.size());
  MPI_Group_translate_ranks(group, size, local.data(), world_group, world.data());
  MPI_Group_free(&group);
  MPI_Group_free(&world_group);
  return world;
}

ProgressTracker::ProgressTracker(MPI_Comm comm, Bus& bus) : state_(std::make_shared<State>()) {
  state_->bus = &bus;
  state_->world_ranks = world_ranks_of(comm);
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  std::uint32_t draw = 0;
  if (rank == 0) draw = std::random_device{}();
  check_mpi(MPI_Bcast(&draw, 1, MPI_UINT32_T, 0, comm), rank, "MPI_Bcast");
  state_->topic = kServiceTopicBase + draw % (kReservedTopicBase - kServiceTopicBase);
  std::weak_ptr<State> weak = state_;
  answers_ = bus.subscribe(
      {Kind::kNegotiation, state_->topic, std::nullopt}, [weak](const Message& query) {
        const auto state = weak.lock();
        if (!state) return;
        state->bus->reply(query.header, Message::make(Kind::kNegotiation, query.header.topic,
                                                      u64_payload(state->started.load())));
      });
}

std::uint64_t ProgressTracker::start() {
  return state_->started.fetch_add(1) + 1;
}

std::function<std::string()> ProgressTracker::missing_ranks(std::uint64_t index) const {
  return [state = state_, index] {
    Bus& bus = *state->bus;
    std::vector<std::pair<std::size_t, PendingReply>> asked;
    for (std::size_t member = 0; member < state->world_ranks.size(); ++member) {
      try {
        asked.emplace_back(
            member, bus.request(state->world_ranks[member],
                                Message::make(Kind::kNegotiation, state->topic, u64_payload(index)),
                                std::chrono::seconds(2)));
      } catch (const Error&) {
        asked.emplace_back(member, PendingReply{});
      }
    }
    std::string missing;
    for (auto& [member, reply] : asked) {
      std::string verdict;
      try {
        const Message answer = reply.get();
        std::uint64_t started = 0;
        if (answer.payload.size() == 8) std::memcpy(&started, answer.payload.data(), 8);
        if (started < index) verdict = std::to_string(member);
      } catch (const Error&) {
        verdict = std::to_string(member) + " (no answer)";
      }
      if (!verdict.empty()) missing += (missing.empty() ? "" : ", ") + verdict;
    }
    return "[" + missing + "]";
  };
}

}  // namespace unimsg::detail
