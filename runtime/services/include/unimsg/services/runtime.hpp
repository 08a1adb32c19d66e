#pragma once

// The one runtime context of a process: MPI (initialised or adopted), the rank-prefixed logger
// and the bus. Services added by later modules hang off it. Destroyed in reverse order: the bus
// shuts down (collectively) before MPI is finalised.

#include <memory>

#include "unimsg/bus/bus.hpp"
#include "unimsg/bus/mpi.hpp"

namespace spdlog {
class logger;
}

namespace unimsg {

class Runtime {
 public:
  // Reads UNIMSG_* settings from the environment; a bad one is a ConfigError.
  Runtime(int* argc, char*** argv);
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  int rank() const noexcept { return mpi_.world_rank(); }
  int size() const noexcept { return mpi_.world_size(); }
  Bus& bus() noexcept { return *bus_; }
  spdlog::logger& log() noexcept { return *logger_; }

 private:
  MpiEnvironment mpi_;
  std::shared_ptr<spdlog::logger> logger_;
  std::unique_ptr<Bus> bus_;
};

}  // namespace unimsg
