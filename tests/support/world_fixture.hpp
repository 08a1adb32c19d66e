#pragma once

// A bus and an MPI communicator over MPI_COMM_WORLD, made afresh for every test (both are
// collective to create and destroy, so every rank runs the same tests in the same order).

#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <memory>

#include "unimsg/bus/bus.hpp"
#include "unimsg/collectives/mpi_communicator.hpp"

namespace unimsg::testing_support {

class WorldTest : public ::testing::Test {
 protected:
  void SetUp() override {
    BusOptions options;
    options.shutdown_timeout = std::chrono::seconds(60);
    bus_ = std::make_unique<Bus>(MPI_COMM_WORLD, options);
    comm_ =
        std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, *bus_, CommunicatorOptions::from_env());
  }
  void TearDown() override {
    comm_.reset();
    bus_.reset();
  }

  std::unique_ptr<Bus> bus_;
  std::unique_ptr<MpiCommunicator> comm_;
};

}  // namespace unimsg::testing_support
