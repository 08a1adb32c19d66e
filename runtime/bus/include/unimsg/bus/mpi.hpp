#pragma once

// RAII around the MPI handles the runtime owns.

#include <mpi.h>

#include <string>

namespace unimsg {

// Throws MpiError naming `operation` when `code` is not MPI_SUCCESS.
void check_mpi(int code, int rank, const char* operation);

// Initialises MPI with MPI_THREAD_MULTIPLE, or adopts an MPI the program already initialised
// (then it is left for the program to finalise). Fails clearly when the library cannot provide
// MPI_THREAD_MULTIPLE, which the bus needs.
class MpiEnvironment {
 public:
  MpiEnvironment(int* argc, char*** argv);
  ~MpiEnvironment();
  MpiEnvironment(const MpiEnvironment&) = delete;
  MpiEnvironment& operator=(const MpiEnvironment&) = delete;

  bool owns_mpi() const noexcept { return owned_; }
  int world_rank() const noexcept { return rank_; }
  int world_size() const noexcept { return size_; }

 private:
  bool owned_ = false;
  int rank_ = 0;
  int size_ = 1;
};

// A communicator of our own: MPI_Comm_dup of `parent`, freed on destruction.
class MpiComm {
 public:
  MpiComm() = default;
  explicit MpiComm(MPI_Comm parent);
  ~MpiComm();
  MpiComm(MpiComm&& other) noexcept;
  MpiComm& operator=(MpiComm&& other) noexcept;
  MpiComm(const MpiComm&) = delete;
  MpiComm& operator=(const MpiComm&) = delete;

  MPI_Comm get() const noexcept { return comm_; }
  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }

 private:
  void reset() noexcept;
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 0;
};

}  // namespace unimsg
