// unimsg._C: what the Python package (python/unimsg/) calls. The backend, the compressed
// allreduce and the services of the process's one runtime context (python_context.hpp).

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <mpi.h>
#include <netinet/in.h>
#include <pybind11/chrono.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <spdlog/spdlog.h>
#include <torch/extension.h>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "python_context.hpp"
#include "unimsg/checkpoint/checkpoint.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/services/checkpoint_restore.hpp"

namespace py = pybind11;

namespace unimsg::python {
namespace {

using GilRelease = py::call_guard<py::gil_scoped_release>;

c10::intrusive_ptr<C10dBackendBase> create_backend(const c10::intrusive_ptr<c10d::Store>&, int rank,
                                                   int size,
                                                   const std::chrono::duration<float>& timeout) {
  return Context::get().create_group(
      rank, size, std::chrono::duration_cast<std::chrono::milliseconds>(timeout));
}

// A collective of the rendezvous that never completes means a rank is missing: a fault, as in
// the process groups (its buffers must not be freed under MPI either).
void wait_or_abort(Work& work) {
  try {
    work.wait();
  } catch (const TimeoutError& timeout) {
    Context::get().abort_restartable(timeout);
  }
}

ProcessGroupUnimsg& unimsg_group(const c10::intrusive_ptr<c10d::ProcessGroup>& group) {
  C10dBackendBase* backend = group.get();
#if TORCH_VERSION_MAJOR >= 2
  backend = group->getBackend(c10::DeviceType::CPU).get();
#endif
  auto* unimsg = dynamic_cast<ProcessGroupUnimsg*>(backend);
  if (unimsg == nullptr) {
    throw ConfigError(kNoRank, "unimsg.torch", "the process group's backend is not \"unimsg\"");
  }
  return *unimsg;
}

c10::intrusive_ptr<c10d::Work> allreduce_compressed(
    const c10::intrusive_ptr<c10d::ProcessGroup>& group, at::Tensor tensor, const std::string& name,
    const std::string& compression) {
  return unimsg_group(group).allreduce_compressed(tensor, name,
                                                  CompressionSpec::parse(compression));
}

// `text` from rank `root` to every rank (rendezvous details before torch.distributed exists).
std::string broadcast_string(const std::string& text, int root) {
  auto& communicator = Context::get().session().communicator();
  std::int64_t length = static_cast<std::int64_t>(text.size());
  Work length_sent =
      communicator.broadcast(TensorView{&length, 1, DType::kI64, Device::kHost}, {root});
  wait_or_abort(length_sent);
  std::string received = communicator.rank() == root ? text : std::string(length, '\0');
  Work text_sent = communicator.broadcast(
      TensorView{received.data(), received.size(), DType::kU8, Device::kHost}, {root});
  wait_or_abort(text_sent);
  return received;
}

// The minimum over the ranks of each value (rank 0's rendezvous address: the first one every rank
// shares a subnet with).
std::vector<std::int32_t> min_over_ranks(std::vector<std::int32_t> values) {
  auto& communicator = Context::get().session().communicator();
  const TensorView view{values.data(), values.size(), DType::kI32, Device::kHost};
  Work reduced = communicator.allreduce(view, view, {ReduceOp::kMin, "python.min_over_ranks"});
  wait_or_abort(reduced);
  return values;
}

// This host's IPv4 interfaces: (name, address, netmask), loopback included.
std::vector<std::tuple<std::string, std::string, std::string>> ipv4_interfaces() {
  std::vector<std::tuple<std::string, std::string, std::string>> found;
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) != 0) return found;
  const std::unique_ptr<ifaddrs, decltype(&freeifaddrs)> owner(list, &freeifaddrs);
  for (const ifaddrs* entry = list; entry != nullptr; entry = entry->ifa_next) {
    if (entry->ifa_addr == nullptr || entry->ifa_netmask == nullptr ||
        entry->ifa_addr->sa_family != AF_INET) {
      continue;
    }
    const auto text = [](const sockaddr* address) {
      char buffer[INET_ADDRSTRLEN] = {};
      inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(address)->sin_addr, buffer,
                sizeof buffer);
      return std::string(buffer);
    };
    found.emplace_back(entry->ifa_name, text(entry->ifa_addr), text(entry->ifa_netmask));
  }
  return found;
}

py::dict engine_stats() {
  const auto stats = Context::get().session().engine().stats();
  py::dict out;
  out["cycles"] = stats.cycles;
  out["negotiation_rounds"] = stats.negotiation_rounds;
  out["cache_hits"] = stats.cache_hits;
  out["tensors_reduced"] = stats.tensors_reduced;
  out["collectives"] = stats.collectives;
  out["bytes_reduced"] = stats.bytes_reduced;
  out["wire_bytes"] = stats.wire_bytes;
  out["dense_wire_bytes"] = stats.dense_wire_bytes;
  out["communication_seconds"] = stats.communication_seconds;
  out["wait_seconds"] = stats.wait_seconds;
  out["nonfinite_steps"] = stats.nonfinite_steps;
  return out;
}

// Checkpoints of the context's rank, blobs as Python bytes (torch.save's).
class PyCheckpointer {
 public:
  PyCheckpointer(const std::string& directory, std::size_t keep)
      : checkpointer_(directory, options(keep)) {}

  void save(std::uint64_t step, const std::map<std::string, py::bytes>& blobs,
            const std::string& metadata_json) {
    Checkpoint checkpoint;
    checkpoint.step = step;
    checkpoint.metadata_json = metadata_json;
    for (const auto& [name, data] : blobs) {
      const std::string_view bytes = data;  // (holds the GIL: a copy, then the writer thread)
      auto& blob = checkpoint.blobs[name];
      blob.resize(bytes.size());
      std::memcpy(blob.data(), bytes.data(), bytes.size());
    }
    py::gil_scoped_release release;
    checkpointer_.save_async(std::move(checkpoint));
  }

  void flush() {
    py::gil_scoped_release release;
    checkpointer_.flush();
  }

  std::vector<std::uint64_t> steps() const { return checkpointer_.steps(); }

  // Collective: the newest intact checkpoint any rank holds, or None.
  py::object load_newest() {
    std::optional<RestoredCheckpoint> found;
    std::vector<std::string> skipped;
    {
      py::gil_scoped_release release;
      RestoreOptions restore;
      restore.timeout = Context::get().session().communicator().default_timeout();
      found = restore_newest_anywhere(
          MPI_COMM_WORLD,
          [this](std::vector<std::string>* s) { return checkpointer_.load_latest(s); }, &skipped,
          restore);
    }
    for (const auto& why : skipped) {
      Context::get().runtime().log().warn("skipped a damaged checkpoint: {}", why);
    }
    if (!found) return py::none();
    py::dict blobs;
    for (const auto& [name, blob] : found->checkpoint.blobs) {
      blobs[py::str(name)] = py::bytes(reinterpret_cast<const char*>(blob.data()), blob.size());
    }
    return py::make_tuple(found->checkpoint.step, blobs, found->checkpoint.metadata_json,
                          found->source_rank);
  }

 private:
  static CheckpointOptions options(std::size_t keep) {
    CheckpointOptions options;
    options.keep = keep;
    options.rank = Context::get().runtime().rank();
    // (no timeline spans: a Python checkpointer may outlive the monitor that owns the timeline)
    return options;
  }
  Checkpointer checkpointer_;
};

void register_errors(py::module_& m) {
  static py::exception<Error> base(m, "Error", PyExc_RuntimeError);
  py::register_exception<ConfigError>(m, "ConfigError", base.ptr());
  py::register_exception<MismatchError>(m, "MismatchError", base.ptr());
  py::register_exception<TimeoutError>(m, "TimeoutError", base.ptr());
  py::register_exception<ShutdownError>(m, "ShutdownError", base.ptr());
  py::register_exception<CheckpointError>(m, "CheckpointError", base.ptr());
}

}  // namespace
}  // namespace unimsg::python

PYBIND11_MODULE(_C, m) {
  using namespace unimsg;
  using namespace unimsg::python;
  m.doc() = "unimsg's runtime for Python (use the unimsg.torch package)";
  register_errors(m);
  m.attr("torch_version_major") = TORCH_VERSION_MAJOR;

  m.def(
      "init", [] { Context::get(); }, GilRelease(),
      "Collective: MPI, the bus, heartbeats, the monitor and the engine (once per process)");
  m.def("initialized", &Context::exists);
  m.def("finish", &Context::finish, GilRelease(),
        "Collective: ends the services in order, then MPI (at the interpreter's exit)");
  m.def(
      "abort", [](int status) { MPI_Abort(MPI_COMM_WORLD, status); },
      "Ends every rank of the job at once (an uncaught exception on one rank)");
  m.def("rank", [] { return Context::get().runtime().rank(); });
  m.def("size", [] { return Context::get().runtime().size(); });
  m.def("hosts", [] { return Context::get().session().host_of_rank(); });
  m.def("broadcast_string", &broadcast_string, py::arg("text"), py::arg("root") = 0, GilRelease());
  m.def("min_over_ranks", &min_over_ranks, GilRelease());
  m.def("ipv4_interfaces", &ipv4_interfaces);
  m.def("create_backend", &create_backend, GilRelease());
  m.def("allreduce_compressed", &allreduce_compressed, py::arg("group"), py::arg("tensor"),
        py::arg("name"), py::arg("compression"), GilRelease());
  m.def("canonical_compression",
        [](const std::string& text) { return CompressionSpec::parse(text).to_string(); });
  m.def(
      "step",
      [](std::uint64_t step, double loss, std::uint64_t samples) {
        Context::get().step(step, loss, samples);
      },
      GilRelease());
  m.def("last_step", [] { return Context::get().last_step(); });
  m.def("set_total_steps",
        [](std::uint64_t total) { Context::get().session().monitor().set_total_steps(total); });
  m.def("start_timing", [] { Context::get().session().monitor().start_timing(); });
  m.def("event", [](std::string kind, std::string text) {
    Context::get().session().monitor().event(std::move(kind), std::move(text));
  });
  m.def("engine_stats", &engine_stats);

  py::class_<PyCheckpointer>(m, "Checkpointer")
      .def(py::init<const std::string&, std::size_t>(), py::arg("directory"), py::arg("keep") = 3)
      .def("save", &PyCheckpointer::save, py::arg("step"), py::arg("blobs"),
           py::arg("metadata_json") = "{}")
      .def("flush", &PyCheckpointer::flush)
      .def("steps", &PyCheckpointer::steps)
      .def("load_newest", &PyCheckpointer::load_newest);
}
