// The bus demo (the README's main job until the training example lands): every rank exchanges
// messages of every kind with the others and prints what it saw; rank 0 checks that every rank
// saw every kind and exits non-zero otherwise.
//
//   mpirun -np 4 build/examples/unimsg-bus-demo [--json] [--data-bytes N]

#include <spdlog/spdlog.h>
#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "unimsg/core/cli.hpp"
#include "unimsg/core/config.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/core/wall_clock.hpp"
#include "unimsg/services/runtime.hpp"

namespace {

using namespace std::chrono_literals;
using unimsg::Kind;
using unimsg::Message;
using unimsg::Payload;

constexpr unimsg::Topic kDemoTopic = 1;
constexpr unimsg::Topic kSummaryTopic = 2;
constexpr auto kWait = 60s;

struct Seen {
  Kind kind;
  int source;
  unimsg::Topic topic;
  std::size_t bytes;
  double latency_us;
  std::string text;
};

Seen record(const Message& m) {
  const double latency =
      static_cast<double>(unimsg::WallClock::system_ns() - m.header.timestamp_ns) / 1000.0;
  std::string text(m.payload.as_string().substr(0, 48));
  if (m.header.kind == Kind::kData) text = std::to_string(m.payload.size()) + " bytes of data";
  return {m.header.kind, m.header.source, m.header.topic, m.payload.size(), latency, text};
}

Payload text_payload(const std::string& s) {
  return Payload::from_string(s);
}

// This rank and its neighbours on the ring.
struct Ring {
  int rank;
  int size;
  int next;
  int previous;
};

// What this rank saw, from the handlers' threads and from this one.
struct Observed {
  std::mutex mutex;
  std::vector<Seen> seen;
  std::atomic<int> heartbeats{0};

  void keep(const Message& m) {
    std::lock_guard lock(mutex);
    seen.push_back(record(m));
  }
};

struct Subscriptions {
  unimsg::Subscription heartbeat;
  unimsg::Subscription task;
};

// Heartbeats arrive through a subscription; tasks are answered by one (request/reply).
Subscriptions subscribe(unimsg::Bus& bus, Observed& observed) {
  auto heartbeat_sub =
      bus.subscribe({Kind::kHeartbeat, kDemoTopic, std::nullopt}, [&](const Message& m) {
        observed.keep(m);
        ++observed.heartbeats;
      });
  auto task_sub = bus.subscribe({Kind::kTask, kDemoTopic, std::nullopt}, [&](const Message& m) {
    observed.keep(m);
    bus.reply(m.header,
              Message::make(Kind::kTaskResult, kDemoTopic,
                            Payload::from_string("done: " + std::string(m.payload.as_string()))));
  });
  return {std::move(heartbeat_sub), std::move(task_sub)};
}

// One message of every kind: to all, to the next rank, and a task to the previous one.
void send_every_kind(unimsg::Bus& bus, const Ring& ring, std::uint64_t data_bytes,
                     Observed& observed) {
  const auto text = text_payload;
  bus.publish(kDemoTopic, Message::make(Kind::kHeartbeat, 0, text("alive, step 0")));
  bus.broadcast(Message::make(Kind::kControl, kDemoTopic,
                              text("hello from rank " + std::to_string(ring.rank))));
  const int next = ring.next;
  bus.send(next, Message::make(Kind::kNegotiation, kDemoTopic, text("tensor grad.fc1 ready")));
  bus.send(next, Message::make(Kind::kStatus, kDemoTopic,
                               text(R"({"step":0,"loss":2.30,"samples_per_s":0})")));
  bus.send(next, Message::make(Kind::kFault, kDemoTopic, text("drill: no fault, just the kind")));
  bus.send(next, Message::make(Kind::kCheckpoint, kDemoTopic, text("checkpoint step 0 written")));
  bus.send(next, Message::make(Kind::kData, kDemoTopic,
                               Payload(std::vector<std::byte>(data_bytes, std::byte{1}))));
  bus.send(next, Message::make(Kind::kUser, kDemoTopic, text("hi from your left neighbour")));
  const Message result =
      bus.request(ring.previous,
                  Message::make(Kind::kTask, kDemoTopic,
                                text("fetch shard " + std::to_string(ring.rank))),
                  kWait)
          .get();
  observed.keep(result);
}

void receive_every_kind(unimsg::Bus& bus, const Ring& ring, Observed& observed) {
  for (int source = 0; source < ring.size; ++source) {
    observed.keep(bus.receive({Kind::kControl, kDemoTopic, source}, kWait));
  }
  for (const Kind kind : {Kind::kNegotiation, Kind::kStatus, Kind::kFault, Kind::kCheckpoint,
                          Kind::kData, Kind::kUser}) {
    observed.keep(bus.receive({kind, kDemoTopic, ring.previous}, kWait));
  }
  const auto deadline = std::chrono::steady_clock::now() + kWait;
  while (observed.heartbeats < ring.size && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(1ms);
  }
}

// Prints what this rank saw; returns the count per kind.
std::map<Kind, int> print_seen(unimsg::Runtime& runtime, Observed& observed, bool json) {
  std::map<Kind, int> per_kind;
  std::lock_guard lock(observed.mutex);
  for (const auto& s : observed.seen) {
    ++per_kind[s.kind];
    if (json) {
      nlohmann::json line = {{"rank", runtime.rank()}, {"kind", unimsg::to_string(s.kind)},
                             {"source", s.source},     {"topic", s.topic},
                             {"bytes", s.bytes},       {"latency_us", s.latency_us}};
      std::printf("%s\n", line.dump().c_str());
    } else {
      runtime.log().info("saw {:<11} from rank {} ({:>7} B, {:8.1f} us): {}",
                         unimsg::to_string(s.kind), s.source, s.bytes, s.latency_us, s.text);
    }
  }
  return per_kind;
}

// Rank 0: every rank's kinds, and whether each saw them all. Returns the exit status.
int summarize(unimsg::Runtime& runtime, bool json) {
  const int size = runtime.size();
  nlohmann::json summary = {{"ranks", size}, {"per_rank", nlohmann::json::array()}};
  bool complete = true;
  for (int source = 0; source < size; ++source) {
    const Message m = runtime.bus().receive({Kind::kStatus, kSummaryTopic, source}, kWait);
    const auto kinds = nlohmann::json::parse(m.payload.as_string());
    complete = complete && kinds.size() == unimsg::kAllKinds.size();
    summary["per_rank"].push_back({{"rank", source}, {"kinds", kinds}});
  }
  summary["all_kinds_everywhere"] = complete;
  if (json) {
    std::printf("%s\n", summary.dump().c_str());
  } else {
    runtime.log().info("{} ranks; every rank saw all {} kinds: {}", size, unimsg::kAllKinds.size(),
                       complete ? "yes" : "NO");
  }
  return complete ? 0 : 1;
}

int run(int argc, char** argv) {
  cxxopts::Options cli("unimsg-bus-demo",
                       "Every rank exchanges messages of every kind over the unimsg bus and "
                       "prints what it saw. Run under mpirun.");
  cli.add_options()("json", "print one JSON object per message seen, and a summary object")(
      "data-bytes", "size of the Data message (K/M/G suffixes)",
      cxxopts::value<std::string>()->default_value("1M"))("h,help", "show this help");
  const auto args = cli.parse(argc, argv);
  if (args.count("help")) {
    std::printf("%s\n", cli.help().c_str());
    return 0;
  }
  const bool json = args.count("json") > 0;
  const auto data_bytes = unimsg::parse_size(args["data-bytes"].as<std::string>(), "--data-bytes");

  unimsg::Runtime runtime(&argc, &argv);
  auto& bus = runtime.bus();
  const int rank = runtime.rank();
  const int size = runtime.size();
  const Ring ring{rank, size, (rank + 1) % size, (rank + size - 1) % size};

  Observed observed;
  Subscriptions subscriptions = subscribe(bus, observed);
  MPI_Barrier(MPI_COMM_WORLD);  // all subscribed before anyone publishes
  send_every_kind(bus, ring, data_bytes, observed);
  receive_every_kind(bus, ring, observed);
  MPI_Barrier(MPI_COMM_WORLD);  // nobody stops answering tasks while others still ask
  subscriptions.heartbeat.reset();
  subscriptions.task.reset();

  const std::map<Kind, int> per_kind = print_seen(runtime, observed, json);
  // Every rank reports the kinds it saw to rank 0, over the bus.
  nlohmann::json report;
  for (const auto& [kind, count] : per_kind) report[unimsg::to_string(kind)] = count;
  bus.send(0, Message::make(Kind::kStatus, kSummaryTopic, text_payload(report.dump())));
  int exit_code = 0;
  if (rank == 0) exit_code = summarize(runtime, json);
  const auto stats = bus.stats();
  runtime.log().debug("bus stats: sent {} msgs / {} B, received {} msgs / {} B, rejected {}",
                      stats.sent_messages, stats.sent_bytes, stats.received_messages,
                      stats.received_bytes, stats.rejected_messages);
  return exit_code;
}

}  // namespace

int main(int argc, char** argv) {
  return unimsg::run_program("unimsg-bus-demo", argc, argv, run);
}
