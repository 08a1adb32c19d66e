#pragma once

// The engine's controller (Horovod's lesson): every cycle that has new tensors, each rank tells
// rank 0 what it submitted; rank 0 keeps the table of who submitted what, answers with the
// tensors every (non-joined) rank has, in the order it first saw them, each checked for
// agreement, and names the missing ranks of a stalled one. The protocol talks to the ranks
// through a NegotiationChannel, so it runs and is tested apart from the bus and MPI
// (tests/collectives/negotiation_test.cpp).

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "unimsg/collectives/communicator.hpp"

namespace spdlog {
class logger;
}

namespace unimsg {

class Bus;

namespace detail {

using Clock = std::chrono::steady_clock;

// What a tensor is, as far as the ranks must agree on it.
struct Signature {
  DType dtype = DType::kF32;
  std::size_t count = 0;
  ReduceOp op = ReduceOp::kSum;
  std::string compression = "none";  // CompressionSpec::to_string()
  Device device = Device::kHost;     // every rank's tensor in host or in device memory

  bool operator==(const Signature&) const = default;
  std::string describe() const;
};

struct TensorRequest {
  std::string name;
  Signature signature;
};

// One rank's message to rank 0 in a round.
struct NegotiationRequest {
  bool joined = false;  // this rank called join(): it stands in for every tensor with zeros
  std::vector<TensorRequest> tensors;  // in the order submitted here
};

// Rank 0's answer, one per tensor that is decided.
struct Response {
  std::string name;
  Signature signature;
  std::string error;  // empty: reduce it
  bool stalled = false;
};

// The wire (JSON on Kind::kNegotiation messages). The decoders throw std::exception on
// malformed input, and accept only canonical compression texts: what no rank would write is
// refused.
std::string encode_request(const NegotiationRequest& request);
NegotiationRequest decode_request(std::string_view payload);
std::string encode_responses(const std::vector<Response>& responses);
std::vector<Response> decode_responses(std::string_view payload);

// How the controller reaches the ranks. Ranks are the engine communicator's (0 coordinates).
class NegotiationChannel {
 public:
  virtual ~NegotiationChannel() = default;
  virtual void send_request(std::string payload) = 0;           // to rank 0
  virtual std::string receive_request(int rank) = 0;            // rank 0: from `rank`
  virtual void send_responses(const std::string& payload) = 0;  // rank 0: to every rank
  virtual std::string receive_responses() = 0;                  // from rank 0
};

// Over the bus, on two topics the engine's ranks agreed on; receives wait up to the
// communicator's collective timeout.
class BusNegotiationChannel final : public NegotiationChannel {
 public:
  BusNegotiationChannel(Bus& bus, const Communicator& comm, std::uint32_t request_topic,
                        std::uint32_t response_topic);
  void send_request(std::string payload) override;
  std::string receive_request(int rank) override;
  void send_responses(const std::string& payload) override;
  std::string receive_responses() override;

 private:
  Bus& bus_;
  const Communicator& comm_;
  std::uint32_t request_topic_, response_topic_;
};

// Every stall decision, in one place. A tensor some rank submitted and another has not:
// after `warning` rank 0 logs the ranks that submitted it and those that did not, after `abort`
// it fails it on every rank with the same names (0: never).
class StallInspector {
 public:
  StallInspector(std::chrono::seconds warning, std::chrono::seconds abort)
      : warning_(warning), abort_(abort) {}
  enum class Verdict { kWait, kWarn, kAbort };
  // Rank 0: what to do with an entry first seen at `first_seen` (kWarn once: `warned`).
  Verdict judge(Clock::time_point first_seen, bool warned, Clock::time_point now) const;
  // Rank 0: whether an entry needs a negotiation round for its warning or abort.
  bool round_due(Clock::time_point first_seen, bool warned, Clock::time_point now) const {
    return judge(first_seen, warned, now) != Verdict::kWait;
  }
  // A rank: whether a tensor ready in the response cache is announced to rank 0 again, so that
  // rank 0's table sees it (a cached tensor never reaches rank 0 otherwise, and rank 0 could not
  // name who is missing).
  bool renegotiate(Clock::time_point submitted, Clock::time_point now) const {
    return warning_.count() > 0 && now - submitted > warning_ / 2;
  }

 private:
  std::chrono::seconds warning_, abort_;
};

// Rank 0's table of tensors being negotiated.
class Coordinator {
 public:
  Coordinator(int size, StallInspector stall, std::shared_ptr<spdlog::logger> log);
  // Whether some tensor is due for a stall warning or abort (a reason for a round).
  bool round_due(Clock::time_point now) const;
  // One round: every rank's request (index: rank) in; the decided tensors out, in the order
  // first seen. Tensors still waiting for a rank stay in the table.
  std::vector<Response> coordinate(std::span<const NegotiationRequest> requests,
                                   Clock::time_point now);

 private:
  struct Entry {
    std::map<int, Signature> submitted;  // rank -> what it submitted
    Clock::time_point first_seen;
    bool warned = false;
  };
  std::string mismatch(const std::string& name, const Entry& entry) const;

  int size_;
  StallInspector stall_;
  std::shared_ptr<spdlog::logger> log_;
  std::vector<std::string> order_;  // first-seen order
  std::map<std::string, Entry> table_;
};

// One rank's side of a round: its request to rank 0 (which also coordinates), rank 0's answer.
class Controller {
 public:
  // `coordinator` is rank 0's (null elsewhere); `bus_rank` names this rank in errors.
  Controller(NegotiationChannel& channel, int size, Coordinator* coordinator, int bus_rank);
  std::vector<Response> negotiate(const NegotiationRequest& request);

 private:
  NegotiationChannel& channel_;
  int size_;
  Coordinator* coordinator_;
  int bus_rank_;
};

std::string rank_list(const std::set<int>& ranks);

}  // namespace detail
}  // namespace unimsg
