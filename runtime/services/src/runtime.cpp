#include "unimsg/services/runtime.hpp"

#include <spdlog/spdlog.h>

#include "unimsg/core/log.hpp"

namespace unimsg {

Runtime::Runtime(int* argc, char*** argv)
    : mpi_(argc, argv), logger_(make_rank_logger(mpi_.world_rank(), mpi_.world_size())) {
  BusOptions options = BusOptions::from_env();
  options.logger = logger_;
  bus_ = std::make_unique<Bus>(MPI_COMM_WORLD, std::move(options));
}

Runtime::~Runtime() {
  bus_.reset();
}

}  // namespace unimsg
