#pragma once

// Bounded waiting for multi-rank tests: a condition that never comes fails the test, it does not
// hang it.

#include <chrono>
#include <thread>

namespace unimsg {

// Waits (bounded) until `condition` holds; returns whether it did.
template <typename Condition>
bool eventually(Condition condition,
                std::chrono::milliseconds limit = std::chrono::milliseconds(60000)) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!condition()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

}  // namespace unimsg
