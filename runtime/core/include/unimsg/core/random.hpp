#pragma once

// splitmix64: a fixed, portable mixing function. Everything that must come out the same on every
// rank and every build from a seed (sampler permutations, compressor seeds, stochastic rounding)
// derives it through this one function.

#include <cstdint>

// CUDA kernels draw from it too, and must draw what the CPU draws.
#if defined(__CUDACC__)
#define UNIMSG_HOST_DEVICE __host__ __device__
#else
#define UNIMSG_HOST_DEVICE
#endif

namespace unimsg {

UNIMSG_HOST_DEVICE constexpr std::uint64_t splitmix64(std::uint64_t x) noexcept {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace unimsg
