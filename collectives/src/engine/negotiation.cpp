#include "negotiation.hpp"

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include <stdexcept>
#include <utility>

#include "unimsg/bus/bus.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/kernels/compressor.hpp"

namespace unimsg::detail {
namespace {

using nlohmann::json;

DType parse_dtype(int value) {
  if (value < 0 || value > static_cast<int>(DType::kU8)) throw std::out_of_range("dtype");
  return static_cast<DType>(value);
}

ReduceOp parse_op(int value) {
  if (value < 0 || value > static_cast<int>(ReduceOp::kMax)) throw std::out_of_range("op");
  return static_cast<ReduceOp>(value);
}

Device parse_device(int value) {
  if (value != static_cast<int>(Device::kHost) && value != static_cast<int>(Device::kCuda))
    throw std::out_of_range("device");
  return static_cast<Device>(value);
}

json signature_json(const std::string& name, const Signature& signature) {
  return {{"name", name},
          {"dtype", static_cast<int>(signature.dtype)},
          {"count", signature.count},
          {"op", static_cast<int>(signature.op)},
          {"compression", signature.compression},
          {"device", static_cast<int>(signature.device)}};
}

Signature parse_signature(const json& item) {
  Signature signature{parse_dtype(item.at("dtype").get<int>()), item.at("count").get<std::size_t>(),
                      parse_op(item.at("op").get<int>()), item.at("compression").get<std::string>(),
                      parse_device(item.at("device").get<int>())};
  // Canonical on the wire: a text that does not survive a round trip was not written by a rank.
  if (CompressionSpec::parse(signature.compression).to_string() != signature.compression) {
    throw std::invalid_argument("compression '" + signature.compression + "' is not canonical");
  }
  return signature;
}

}  // namespace

std::string Signature::describe() const {
  std::string text =
      std::string(to_string(dtype)) + " x" + std::to_string(count) + " " + to_string(op);
  if (compression != "none") text += " compressed " + compression;
  if (device == Device::kCuda) text += " in device memory";
  return text;
}

std::string rank_list(const std::set<int>& ranks) {
  std::string text = "[";
  for (const int r : ranks) text += (text.size() > 1 ? ", " : "") + std::to_string(r);
  return text + "]";
}

// --- The wire

std::string encode_request(const NegotiationRequest& request) {
  json tensors = json::array();
  for (const auto& tensor : request.tensors) {
    tensors.push_back(signature_json(tensor.name, tensor.signature));
  }
  return json{{"joined", request.joined}, {"requests", std::move(tensors)}}.dump();
}

NegotiationRequest decode_request(std::string_view payload) {
  const json parsed = json::parse(payload);
  NegotiationRequest request;
  request.joined = parsed.at("joined").get<bool>();
  for (const auto& item : parsed.at("requests")) {
    request.tensors.push_back({item.at("name").get<std::string>(), parse_signature(item)});
  }
  return request;
}

std::string encode_responses(const std::vector<Response>& responses) {
  json out = json::array();
  for (const auto& response : responses) {
    json item = signature_json(response.name, response.signature);
    item["error"] = response.error;
    item["stalled"] = response.stalled;
    out.push_back(std::move(item));
  }
  return json{{"responses", std::move(out)}}.dump();
}

std::vector<Response> decode_responses(std::string_view payload) {
  const json parsed = json::parse(payload);
  std::vector<Response> responses;
  for (const auto& item : parsed.at("responses")) {
    Response response;
    response.name = item.at("name").get<std::string>();
    response.signature = parse_signature(item);
    response.error = item.at("error").get<std::string>();
    response.stalled = item.at("stalled").get<bool>();
    responses.push_back(std::move(response));
  }
  return responses;
}

// --- Over the bus

BusNegotiationChannel::BusNegotiationChannel(Bus& bus, const Communicator& comm,
                                             std::uint32_t request_topic,
                                             std::uint32_t response_topic)
    : bus_(bus), comm_(comm), request_topic_(request_topic), response_topic_(response_topic) {}

void BusNegotiationChannel::send_request(std::string payload) {
  bus_.send(comm_.world_ranks()[0], Message::make(Kind::kNegotiation, request_topic_,
                                                  Payload::from_string(std::move(payload))));
}

std::string BusNegotiationChannel::receive_request(int rank) {
  const int source = comm_.world_ranks()[static_cast<std::size_t>(rank)];
  const Message message =
      bus_.receive({Kind::kNegotiation, request_topic_, source}, comm_.default_timeout());
  return std::string(message.payload.as_string());
}

void BusNegotiationChannel::send_responses(const std::string& payload) {
  for (const int member : comm_.world_ranks()) {
    bus_.send(member,
              Message::make(Kind::kNegotiation, response_topic_, Payload::from_string(payload)));
  }
}

std::string BusNegotiationChannel::receive_responses() {
  const int coordinator = comm_.world_ranks()[0];
  const Message message =
      bus_.receive({Kind::kNegotiation, response_topic_, coordinator}, comm_.default_timeout());
  return std::string(message.payload.as_string());
}

// --- Stalls

StallInspector::Verdict StallInspector::judge(Clock::time_point first_seen, bool warned,
                                              Clock::time_point now) const {
  const auto waited = now - first_seen;
  if (abort_.count() > 0 && waited > abort_) return Verdict::kAbort;
  if (warning_.count() > 0 && waited > warning_ && !warned) return Verdict::kWarn;
  return Verdict::kWait;
}

// --- Rank 0

Coordinator::Coordinator(int size, StallInspector stall, std::shared_ptr<spdlog::logger> log)
    : size_(size), stall_(stall), log_(std::move(log)) {}

bool Coordinator::round_due(Clock::time_point now) const {
  for (const auto& [name, entry] : table_) {
    if (stall_.round_due(entry.first_seen, entry.warned, now)) return true;
  }
  return false;
}

std::string Coordinator::mismatch(const std::string& name, const Entry& entry) const {
  std::map<std::string, std::set<int>> by_signature;
  for (const auto& [r, signature] : entry.submitted) by_signature[signature.describe()].insert(r);
  if (by_signature.size() <= 1) return {};
  std::string error = "tensor '" + name + "' differs between ranks:";
  for (const auto& [text, ranks] : by_signature) {
    error += " " + text + " on ranks " + rank_list(ranks) + ";";
  }
  return error;
}

std::vector<Response> Coordinator::coordinate(std::span<const NegotiationRequest> requests,
                                              Clock::time_point now) {
  std::set<int> joined;
  for (int r = 0; r < static_cast<int>(requests.size()); ++r) {
    const NegotiationRequest& request = requests[static_cast<std::size_t>(r)];
    if (request.joined) joined.insert(r);
    for (const auto& tensor : request.tensors) {
      auto [it, inserted] = table_.try_emplace(tensor.name);
      if (inserted) {
        it->second.first_seen = now;
        order_.push_back(tensor.name);
      }
      it->second.submitted[r] = tensor.signature;
    }
  }
  std::vector<Response> responses;
  std::vector<std::string> still_open;
  for (const auto& name : order_) {
    auto it = table_.find(name);
    if (it == table_.end()) continue;
    Entry& entry = it->second;
    std::set<int> missing;
    for (int r = 0; r < size_; ++r) {
      if (!entry.submitted.count(r) && !joined.count(r)) missing.insert(r);
    }
    Response response{name, entry.submitted.begin()->second, {}, false};
    if (missing.empty()) {
      response.error = mismatch(name, entry);  // everyone is in: do they agree?
    } else {
      const auto verdict = stall_.judge(entry.first_seen, entry.warned, now);
      const auto waited_s =
          std::chrono::duration_cast<std::chrono::seconds>(now - entry.first_seen).count();
      std::set<int> submitted;
      for (const auto& [r, signature] : entry.submitted) submitted.insert(r);
      if (verdict != StallInspector::Verdict::kAbort) {
        if (verdict == StallInspector::Verdict::kWarn) {
          entry.warned = true;
          log_->warn("engine stall: tensor '{}' submitted by ranks {} but not by ranks {} for {} s",
                     name, rank_list(submitted), rank_list(missing), waited_s);
        }
        still_open.push_back(name);
        continue;
      }
      response.stalled = true;
      response.error = "tensor '" + name + "' stalled: submitted by ranks " + rank_list(submitted) +
                       " but not by ranks " + rank_list(missing) + " for " +
                       std::to_string(waited_s) + " s";
    }
    responses.push_back(std::move(response));
    table_.erase(it);
  }
  order_ = std::move(still_open);
  return responses;
}

// --- Every rank

Controller::Controller(NegotiationChannel& channel, int size, Coordinator* coordinator,
                       int bus_rank)
    : channel_(channel), size_(size), coordinator_(coordinator), bus_rank_(bus_rank) {}

std::vector<Response> Controller::negotiate(const NegotiationRequest& request) {
  channel_.send_request(encode_request(request));
  if (coordinator_ != nullptr) {
    std::vector<NegotiationRequest> requests(static_cast<std::size_t>(size_));
    for (int r = 0; r < size_; ++r) {
      const std::string payload = channel_.receive_request(r);
      try {
        requests[static_cast<std::size_t>(r)] = decode_request(payload);
      } catch (const std::exception& error) {
        throw Error(
            bus_rank_, "engine.coordinate",
            "malformed negotiation message from rank " + std::to_string(r) + ": " + error.what());
      }
    }
    channel_.send_responses(encode_responses(coordinator_->coordinate(requests, Clock::now())));
  }
  const std::string answer = channel_.receive_responses();
  try {
    return decode_responses(answer);
  } catch (const std::exception& error) {
    throw Error(bus_rank_, "engine.negotiate",
                std::string("malformed response from rank 0: ") + error.what());
  }
}

}  // namespace unimsg::detail
