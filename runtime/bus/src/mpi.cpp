#include "unimsg/bus/mpi.hpp"

#include <utility>

#include "unimsg/core/error.hpp"

namespace unimsg {

void check_mpi(int code, int rank, const char* operation) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  MPI_Error_string(code, text, &length);
  throw MpiError(rank, operation, std::string(text, static_cast<std::size_t>(length)));
}

MpiEnvironment::MpiEnvironment(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  int provided = MPI_THREAD_SINGLE;
  if (initialized) {
    MPI_Query_thread(&provided);
  } else {
    check_mpi(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided), kNoRank,
              "MPI_Init_thread");
    owned_ = true;
  }
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
  if (provided < MPI_THREAD_MULTIPLE) {
    if (owned_) MPI_Finalize();
    throw ConfigError(rank_, "mpi.init",
                      "the MPI library provides thread level " + std::to_string(provided) +
                          " but unimsg needs MPI_THREAD_MULTIPLE (" +
                          std::to_string(MPI_THREAD_MULTIPLE) +
                          "); use an MPI built with thread support (Open MPI: "
                          "--enable-mpi-thread-multiple) or initialise it with "
                          "MPI_Init_thread(MPI_THREAD_MULTIPLE)");
  }
}

MpiEnvironment::~MpiEnvironment() {
  if (owned_) MPI_Finalize();
}

MpiComm::MpiComm(MPI_Comm parent) {
  check_mpi(MPI_Comm_dup(parent, &comm_), kNoRank, "MPI_Comm_dup");
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &size_);
}

MpiComm::~MpiComm() {
  reset();
}

MpiComm::MpiComm(MpiComm&& other) noexcept
    : comm_(std::exchange(other.comm_, MPI_COMM_NULL)), rank_(other.rank_), size_(other.size_) {}

MpiComm& MpiComm::operator=(MpiComm&& other) noexcept {
  if (this != &other) {
    reset();
    comm_ = std::exchange(other.comm_, MPI_COMM_NULL);
    rank_ = other.rank_;
    size_ = other.size_;
  }
  return *this;
}

void MpiComm::reset() noexcept {
  if (comm_ == MPI_COMM_NULL) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Comm_free(&comm_);
  comm_ = MPI_COMM_NULL;
}

}  // namespace unimsg
