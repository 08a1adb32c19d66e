#pragma once

// The compression tests' gradient: different per rank, step and element, with magnitudes spread
// over 1e-3..10.

#include <cmath>
#include <cstddef>
#include <cstdint>

namespace unimsg::testing_support {

inline float gradient(int rank, std::uint64_t step, std::size_t i) {
  const double phase =
      0.37 * static_cast<double>(i) + 1.3 * rank + 0.71 * static_cast<double>(step);
  return static_cast<float>(std::sin(phase) * std::pow(10.0, static_cast<double>(i % 5) - 2.0));
}

}  // namespace unimsg::testing_support
