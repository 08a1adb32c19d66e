#include "unimsg/kernels/powersgd.hpp"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>

#include "powersgd_detail.hpp"
#include "unimsg/core/error.hpp"

namespace unimsg {
namespace detail {

std::size_t powersgd_cols(std::size_t count, std::size_t rows) {
  if (rows > 0 && count % rows == 0) return std::max<std::size_t>(count / rows, 1);
  auto cols = static_cast<std::size_t>(std::ceil(std::sqrt(static_cast<double>(count))));
  return std::max<std::size_t>(cols, 1);
}

std::vector<float> powersgd_first_q(std::size_t cols, int rank, std::uint64_t seed) {
  std::vector<float> q(cols * static_cast<std::size_t>(rank));
  // (The standard library's engine and distribution: the same draw on every rank of one build.)
  std::mt19937_64 engine(seed);
  std::normal_distribution<float> normal;
  for (float& v : q) v = normal(engine);
  return q;
}

// The epsilon keeps a zero column (a zero gradient) at zero instead of dividing by zero, as
// PyTorch's PowerSGD hook does.
void powersgd_orthonormalise(std::span<float> p, std::size_t rows, int rank) {
  const auto r = static_cast<std::size_t>(rank);
  for (std::size_t c = 0; c < r; ++c) {
    for (std::size_t previous = 0; previous < c; ++previous) {
      double dot = 0;
      for (std::size_t i = 0; i < rows; ++i) dot += double(p[i * r + c]) * p[i * r + previous];
      for (std::size_t i = 0; i < rows; ++i) p[i * r + c] -= float(dot) * p[i * r + previous];
    }
    double norm = 0;
    for (std::size_t i = 0; i < rows; ++i) norm += double(p[i * r + c]) * p[i * r + c];
    const float inverse = static_cast<float>(1.0 / (std::sqrt(norm) + 1e-8));
    for (std::size_t i = 0; i < rows; ++i) p[i * r + c] *= inverse;
  }
}

}  // namespace detail

bool PowerSgd::compresses(std::size_t count, int rank, std::size_t rows_hint) noexcept {
  if (count == 0 || rank < 1) return false;
  const std::size_t cols = detail::powersgd_cols(count, rows_hint);
  const std::size_t rows = (count + cols - 1) / cols;
  return (rows + cols) * static_cast<std::size_t>(rank) < count;
}

PowerSgd::PowerSgd(std::size_t count, int rank, std::uint64_t seed, std::size_t rows)
    : count_(count), cols_(detail::powersgd_cols(count, rows)), rank_(rank) {
  if (rank < 1) throw ConfigError(kNoRank, "powersgd", "the rank must be at least 1");
  rows_ = (count + cols_ - 1) / cols_;
  const auto r = static_cast<std::size_t>(rank);
  matrix_.assign(rows_ * cols_, 0.0f);
  p_.assign(rows_ * r, 0.0f);
  q_ = detail::powersgd_first_q(cols_, rank, seed);
}

std::span<float> PowerSgd::begin(std::span<const float> gradient, std::span<const float> residual) {
  if (gradient.size() != count_ || (!residual.empty() && residual.size() != count_)) {
    throw Error(
        kNoRank, "powersgd",
        "expected " + std::to_string(count_) + " elements, got " + std::to_string(gradient.size()));
  }
  for (std::size_t i = 0; i < count_; ++i) {
    matrix_[i] = residual.empty() ? gradient[i] : gradient[i] + residual[i];
  }
  const auto r = static_cast<int>(rank_);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(rows_), r,
              static_cast<int>(cols_), 1.0f, matrix_.data(), static_cast<int>(cols_), q_.data(), r,
              0.0f, p_.data(), r);
  return p_;
}

std::span<float> PowerSgd::project() {
  detail::powersgd_orthonormalise(p_, rows_, rank_);
  const auto r = static_cast<int>(rank_);
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, static_cast<int>(cols_), r,
              static_cast<int>(rows_), 1.0f, matrix_.data(), static_cast<int>(cols_), p_.data(), r,
              0.0f, q_.data(), r);
  return q_;
}

void PowerSgd::finish(std::span<float> out, std::span<float> residual) {
  if (out.size() != count_ || (!residual.empty() && residual.size() != count_)) {
    throw Error(kNoRank, "powersgd", "expected " + std::to_string(count_) + " elements");
  }
  // M's padding is not needed any more: the approximation overwrites the matrix, and the
  // residual is M - approximation, computed before.
  std::vector<float> approximation(rows_ * cols_);
  const auto r = static_cast<int>(rank_);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows_),
              static_cast<int>(cols_), r, 1.0f, p_.data(), r, q_.data(), r, 0.0f,
              approximation.data(), static_cast<int>(cols_));
  for (std::size_t i = 0; i < count_; ++i) {
    if (!residual.empty()) residual[i] = matrix_[i] - approximation[i];
    out[i] = approximation[i];
  }
}

void set_blas_threads(int threads) {
  openblas_set_num_threads(std::max(threads, 1));
}

}  // namespace unimsg
