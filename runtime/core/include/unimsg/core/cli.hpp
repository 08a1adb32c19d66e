#pragma once

// The main() of every unimsg program: runs `run` and turns what it throws into a message on
// stderr and an exit code — 2 for a bad flag or setting (cxxopts, ConfigError), 1 otherwise.

#include <cxxopts.hpp>

#include <cstdio>
#include <exception>

#include "unimsg/core/error.hpp"

namespace unimsg {

template <typename Run>
int run_program(const char* program, int argc, char** argv, Run&& run) {
  try {
    return run(argc, argv);
  } catch (const cxxopts::exceptions::exception& error) {
    std::fprintf(stderr, "%s: %s (see --help)\n", program, error.what());
    return 2;
  } catch (const ConfigError& error) {
    std::fprintf(stderr, "%s: %s\n", program, error.what());
    return 2;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "%s: %s\n", program, error.what());
    return 1;
  }
}

}  // namespace unimsg
