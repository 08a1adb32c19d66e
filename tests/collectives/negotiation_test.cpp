// The engine's controller without MPI or a bus: rank 0's coordinator and every rank's
// controller over an in-memory channel, each rank on a thread of its own.

#include <gtest/gtest.h>
#include <spdlog/sinks/null_sink.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "negotiation.hpp"
#include "unimsg/core/error.hpp"

namespace unimsg::detail {
namespace {

using namespace std::chrono_literals;

// One blocking queue per (receiver, sender) pair: the bus's per-source order, in memory.
class World {
 public:
  explicit World(int size) : size_(size), queues_(static_cast<std::size_t>(size * size)) {}
  void send(int from, int to, std::string payload) {
    std::lock_guard lock(mutex_);
    queue(to, from).push_back(std::move(payload));
    cv_.notify_all();
  }
  std::string receive(int at, int from) {
    std::unique_lock lock(mutex_);
    if (!cv_.wait_for(lock, 30s, [&] { return !queue(at, from).empty(); })) {
      throw TimeoutError(at, "test.receive", "nothing from rank " + std::to_string(from));
    }
    std::string payload = std::move(queue(at, from).front());
    queue(at, from).pop_front();
    return payload;
  }
  int size() const { return size_; }

 private:
  std::deque<std::string>& queue(int to, int from) {
    return queues_[static_cast<std::size_t>(to * size_ + from)];
  }
  int size_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<std::deque<std::string>> queues_;
};

class MemoryChannel final : public NegotiationChannel {
 public:
  MemoryChannel(World& world, int rank) : world_(world), rank_(rank) {}
  void send_request(std::string payload) override { world_.send(rank_, 0, std::move(payload)); }
  std::string receive_request(int rank) override { return world_.receive(0, rank); }
  void send_responses(const std::string& payload) override {
    for (int r = 0; r < world_.size(); ++r) world_.send(0, r, payload);
  }
  std::string receive_responses() override { return world_.receive(rank_, 0); }

 private:
  World& world_;
  int rank_;
};

std::shared_ptr<spdlog::logger> quiet_logger() {
  return std::make_shared<spdlog::logger>("test", std::make_shared<spdlog::sinks::null_sink_mt>());
}

Signature f32(std::size_t count) {
  return {DType::kF32, count, ReduceOp::kSum, "none"};
}

// Runs one round on every rank (each its own thread) and returns each rank's responses.
std::vector<std::vector<Response>> round(World& world, Coordinator& coordinator,
                                         const std::vector<NegotiationRequest>& requests) {
  const int size = world.size();
  std::vector<std::vector<Response>> responses(static_cast<std::size_t>(size));
  std::vector<std::string> errors(static_cast<std::size_t>(size));
  std::vector<std::thread> ranks;
  for (int r = 0; r < size; ++r) {
    ranks.emplace_back([&, r] {
      MemoryChannel channel(world, r);
      Controller controller(channel, size, r == 0 ? &coordinator : nullptr, r);
      try {
        responses[static_cast<std::size_t>(r)] =
            controller.negotiate(requests[static_cast<std::size_t>(r)]);
      } catch (const std::exception& error) {
        errors[static_cast<std::size_t>(r)] = error.what();
      }
    });
  }
  for (auto& rank : ranks) rank.join();
  for (int r = 0; r < size; ++r) {
    EXPECT_EQ(errors[static_cast<std::size_t>(r)], "") << "rank " << r;
  }
  return responses;
}

std::vector<std::string> names(const std::vector<Response>& responses) {
  std::vector<std::string> out;
  for (const auto& response : responses) out.push_back(response.name);
  return out;
}

TEST(Negotiation, TensorsSubmittedInAnyOrderComeBackInRankZerosOrderOnEveryRank) {
  World world(3);
  Coordinator coordinator(3, StallInspector(60s, 0s), quiet_logger());
  const std::vector<NegotiationRequest> requests = {
      {false, {{"a", f32(4)}, {"b", f32(8)}, {"c", f32(1)}}},
      {false, {{"c", f32(1)}, {"a", f32(4)}, {"b", f32(8)}}},
      {false, {{"b", f32(8)}, {"c", f32(1)}, {"a", f32(4)}}}};
  const auto responses = round(world, coordinator, requests);
  for (const auto& rank : responses) {
    EXPECT_EQ(names(rank), (std::vector<std::string>{"a", "b", "c"}));
    for (const auto& response : rank) EXPECT_EQ(response.error, "");
  }
  EXPECT_EQ(responses[0][1].signature, f32(8));
}

TEST(Negotiation, ATensorWaitsForTheRankThatHasNotSubmittedIt) {
  World world(3);
  Coordinator coordinator(3, StallInspector(60s, 0s), quiet_logger());
  auto responses = round(world, coordinator,
                         {{false, {{"a", f32(4)}, {"b", f32(2)}}},
                          {false, {{"a", f32(4)}}},
                          {false, {{"a", f32(4)}}}});
  for (const auto& rank : responses) EXPECT_EQ(names(rank), std::vector<std::string>{"a"});
  // "b" comes when the last rank submits it; the others have nothing new.
  responses =
      round(world, coordinator, {{false, {}}, {false, {{"b", f32(2)}}}, {false, {{"b", f32(2)}}}});
  for (const auto& rank : responses) EXPECT_EQ(names(rank), std::vector<std::string>{"b"});
}

TEST(Negotiation, AJoinedRankStandsInForEveryTensor) {
  World world(2);
  Coordinator coordinator(2, StallInspector(60s, 0s), quiet_logger());
  const auto responses = round(world, coordinator, {{false, {{"a", f32(3)}}}, {true, {}}});
  for (const auto& rank : responses) {
    ASSERT_EQ(names(rank), std::vector<std::string>{"a"});
    EXPECT_EQ(rank[0].error, "");
  }
}

TEST(Negotiation, AMismatchIsAnErrorNamingWhatEachRankSubmitted) {
  World world(3);
  Coordinator coordinator(3, StallInspector(60s, 0s), quiet_logger());
  const Signature f64{DType::kF64, 4, ReduceOp::kSum, "none"};
  const auto responses =
      round(world, coordinator,
            {{false, {{"w", f32(4)}}}, {false, {{"w", f32(4)}}}, {false, {{"w", f64}}}});
  for (const auto& rank : responses) {
    ASSERT_EQ(rank.size(), 1u);
    EXPECT_FALSE(rank[0].stalled);
    EXPECT_NE(rank[0].error.find("tensor 'w' differs between ranks"), std::string::npos);
    EXPECT_NE(rank[0].error.find("on ranks [0, 1]"), std::string::npos) << rank[0].error;
    EXPECT_NE(rank[0].error.find("on ranks [2]"), std::string::npos) << rank[0].error;
  }
}

TEST(Negotiation, TheStallInspectorWarnsThenFailsNamingTheMissingRanks) {
  const StallInspector stall(10s, 30s);
  const auto t0 = Clock::now();
  EXPECT_EQ(stall.judge(t0, false, t0 + 5s), StallInspector::Verdict::kWait);
  EXPECT_EQ(stall.judge(t0, false, t0 + 11s), StallInspector::Verdict::kWarn);
  EXPECT_EQ(stall.judge(t0, true, t0 + 11s), StallInspector::Verdict::kWait);  // warned once
  EXPECT_EQ(stall.judge(t0, true, t0 + 31s), StallInspector::Verdict::kAbort);
  EXPECT_FALSE(stall.renegotiate(t0, t0 + 4s));
  EXPECT_TRUE(stall.renegotiate(t0, t0 + 6s));  // after half the warning time
  EXPECT_FALSE(StallInspector(0s, 0s).renegotiate(t0, t0 + 1000s));

  Coordinator coordinator(3, stall, quiet_logger());
  const std::vector<NegotiationRequest> requests = {
      {false, {{"g", f32(1)}}}, {false, {}}, {false, {{"g", f32(1)}}}};
  EXPECT_TRUE(coordinator.coordinate(requests, t0).empty());
  EXPECT_FALSE(coordinator.round_due(t0 + 5s));
  EXPECT_TRUE(coordinator.round_due(t0 + 11s));
  EXPECT_TRUE(coordinator.coordinate(std::vector<NegotiationRequest>(3), t0 + 11s).empty());
  EXPECT_FALSE(coordinator.round_due(t0 + 12s));  // warned
  EXPECT_TRUE(coordinator.round_due(t0 + 31s));
  const auto failed = coordinator.coordinate(std::vector<NegotiationRequest>(3), t0 + 31s);
  ASSERT_EQ(failed.size(), 1u);
  EXPECT_TRUE(failed[0].stalled);
  EXPECT_EQ(failed[0].error,
            "tensor 'g' stalled: submitted by ranks [0, 2] but not by ranks [1] for 31 s");
  EXPECT_FALSE(coordinator.round_due(t0 + 100s));  // gone from the table
}

TEST(Negotiation, TheWireRoundTripsAndRefusesWhatNoRankWrites) {
  const NegotiationRequest request{
      true, {{"x", {DType::kBF16, 7, ReduceOp::kMax, "topk:0.01", Device::kCuda}}}};
  const NegotiationRequest back = decode_request(encode_request(request));
  EXPECT_TRUE(back.joined);
  ASSERT_EQ(back.tensors.size(), 1u);
  EXPECT_EQ(back.tensors[0].name, "x");
  EXPECT_EQ(back.tensors[0].signature, request.tensors[0].signature);
  const std::vector<Response> responses{{"y", f32(2), "boom", true}};
  const auto decoded = decode_responses(encode_responses(responses));
  ASSERT_EQ(decoded.size(), 1u);
  EXPECT_EQ(decoded[0].error, "boom");
  EXPECT_TRUE(decoded[0].stalled);
  for (
      const char* bad :
      {"", "{}", "[1]", R"({"joined":true})",
       R"({"joined":false,"requests":[{"name":"a","dtype":99,"count":1,"op":0,"compression":"none","device":0}]})",
       R"({"joined":false,"requests":[{"name":"a","dtype":0,"count":1,"op":0,"compression":"TOPK","device":0}]})",
       R"({"joined":false,"requests":[{"name":"a","dtype":0,"count":1,"op":0,"compression":"none","device":7}]})",
       R"({"joined":false,"requests":[{"name":"a","dtype":0,"count":1,"op":0,"compression":"none"}]})"}) {
    EXPECT_ANY_THROW(decode_request(bad)) << bad;
  }
}

TEST(Negotiation, AMalformedRequestFailsTheRoundNamingTheRank) {
  World world(2);
  Coordinator coordinator(2, StallInspector(60s, 0s), quiet_logger());
  world.send(1, 0, "not json");
  MemoryChannel channel(world, 0);
  Controller controller(channel, 2, &coordinator, 0);
  try {
    controller.negotiate({false, {}});
    ADD_FAILURE() << "accepted a malformed request";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("malformed negotiation message from rank 1"),
              std::string::npos)
        << error.what();
  }
}

}  // namespace
}  // namespace unimsg::detail
