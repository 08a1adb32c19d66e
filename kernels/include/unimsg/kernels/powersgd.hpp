#pragma once

// PowerSGD (Vogels et al., 2019): a rank-r approximation P Q^T of a gradient matrix M, found by
// one step of power iteration warm-started from the previous step's Q, with error feedback.
// Unlike the single-pass compressors it needs the ranks between its stages, so it exposes them:
//
//   P = (M = gradient + residual) Q        -> allreduce-average P
//   orthonormalise P, Q = M^T P            -> allreduce-average Q
//   out = P Q^T, residual = M - out
//
// Averaging P and Q is averaging the approximation: P P^T avg(M) with P orthonormal. A flat
// buffer of n elements is the matrix its caller names (a parameter's first dimension x the
// rest, as PyTorch's PowerSGD hook views it), or else rows x cols with cols = ceil(sqrt(n)),
// padded with zeros. CPU reference over BLAS (OpenBLAS); CudaPowerSgd runs the same stages with
// cuBLAS on device memory.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

namespace unimsg {

class PowerSgd {
 public:
  // `count` elements, approximation rank `rank`; the first Q is drawn from `seed`, which must be
  // the same on every rank.
  // `rows` > 0 dividing `count`: the buffer is that matrix (a parameter's first dimension);
  // otherwise near-square.
  PowerSgd(std::size_t count, int rank, std::uint64_t seed, std::size_t rows = 0);

  std::size_t count() const noexcept { return count_; }
  std::size_t rows() const noexcept { return rows_; }
  std::size_t cols() const noexcept { return cols_; }
  int rank() const noexcept { return rank_; }
  // Worth it: the factors are smaller than the matrix (else send it uncompressed).
  static bool compresses(std::size_t count, int rank, std::size_t rows = 0) noexcept;

  // Stage 1: M = gradient + residual (residual may be empty), P = M Q. Returns P (rows x rank,
  // row-major) for the caller to average across ranks in place.
  std::span<float> begin(std::span<const float> gradient, std::span<const float> residual);
  // Stage 2, after P was averaged: orthonormalises P's columns, Q = M^T P. Returns Q
  // (cols x rank) to average in place.
  std::span<float> project();
  // Stage 3, after Q was averaged: out = P Q^T (count elements), residual = M - out when the
  // residual is not empty. Q stays for the next step's warm start.
  void finish(std::span<float> out, std::span<float> residual);

 private:
  std::size_t count_, rows_, cols_;
  int rank_;
  std::vector<float> matrix_, p_, q_;
};

// The same stages on the GPU: gradient, residual, P, Q and out are device memory (P and Q are
// returned for the caller to average in place, with NCCL say). The products run in cuBLAS; P's
// orthonormalisation (rows x rank values) runs on the host exactly as the CPU's, and the first Q
// is the CPU's draw, so the two agree to the products' rounding. Every stage returns when its
// work is done, and expects the caller's work on P or Q (the averaging) to be done before it is
// called. Throws Error in a build without CUDA or without a device.
class CudaPowerSgd {
 public:
  CudaPowerSgd(std::size_t count, int rank, std::uint64_t seed, std::size_t rows = 0);
  ~CudaPowerSgd();
  CudaPowerSgd(const CudaPowerSgd&) = delete;
  CudaPowerSgd& operator=(const CudaPowerSgd&) = delete;
  CudaPowerSgd(CudaPowerSgd&&) noexcept;
  CudaPowerSgd& operator=(CudaPowerSgd&&) noexcept;

  std::size_t count() const noexcept;
  std::size_t rows() const noexcept;
  std::size_t cols() const noexcept;
  int rank() const noexcept;

  std::span<float> begin(std::span<const float> gradient, std::span<const float> residual);
  std::span<float> project();
  void finish(std::span<float> out, std::span<float> residual);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// Threads of the BLAS library's pool for this process (OpenBLAS's setting: process-wide). One
// per rank is right when ranks share a host's cores; unimsg-run sets OPENBLAS_NUM_THREADS=1.
void set_blas_threads(int threads);

}  // namespace unimsg
