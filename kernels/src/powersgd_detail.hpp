#pragma once

// What the CPU and CUDA PowerSGD share, so that the two agree: the matrix shape, the first Q and
// the orthonormalisation of P (defined in powersgd_cpu.cpp).

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace unimsg::detail {

// Columns of the matrix a flat buffer of `count` elements is viewed as (`rows` dividing it: a
// parameter's first dimension; else near-square).
std::size_t powersgd_cols(std::size_t count, std::size_t rows);
// The first Q (cols x rank, row-major), the same on every rank for one seed.
std::vector<float> powersgd_first_q(std::size_t cols, int rank, std::uint64_t seed);
// Gram-Schmidt on the columns of a row-major rows x rank matrix.
void powersgd_orthonormalise(std::span<float> p, std::size_t rows, int rank);

}  // namespace unimsg::detail
