// PowerSGD's stages on the GPU with cuBLAS (see powersgd.hpp). cuBLAS is column-major: a
// row-major a x b matrix is the column-major b x a matrix of the same bytes, so each row-major
// product below is computed as its transpose.

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "cuda_support.cuh"
#include "powersgd_detail.hpp"
#include "unimsg/core/error.hpp"
#include "unimsg/kernels/device_memory.hpp"
#include "unimsg/kernels/powersgd.hpp"

namespace unimsg {
namespace {

void check(cudaError_t status, const char* what) {
  detail::cuda::check(status, "cuda powersgd", what);
}

void check(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw Error(kNoRank, "cuda powersgd", std::string(what) + ": " + cublasGetStatusString(status));
  }
}

void check_device(const void* pointer, const char* what, int device) {
  detail::cuda::check_device_pointer(pointer, what, "cuda powersgd", device);
}

// M = gradient (+ residual) over the first `count` elements; the padding stays zero.
__global__ void sum_kernel(const float* gradient, const float* residual, float* matrix,
                           std::size_t count) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    matrix[i] = residual != nullptr ? __fadd_rn(gradient[i], residual[i]) : gradient[i];
  }
}

__global__ void finish_kernel(const float* matrix, const float* approximation, float* out,
                              float* residual, std::size_t count) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    if (residual != nullptr) residual[i] = __fsub_rn(matrix[i], approximation[i]);
    out[i] = approximation[i];
  }
}

using detail::cuda::grid_for;

}  // namespace

struct CudaPowerSgd::State {
  std::size_t count = 0, rows = 0, cols = 0;
  int rank = 1;
  int gpu = 0;  // the device current at construction: its stream, handle and buffers live there
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  std::optional<DeviceBuffer> matrix, p, q, approximation;
  std::vector<float> host_p;  // P, orthonormalised on the host as the CPU does

  ~State() {
    if (blas != nullptr) cublasDestroy(blas);
    if (stream != nullptr) cudaStreamDestroy(stream);
  }
  float* device(std::optional<DeviceBuffer>& buffer) { return static_cast<float*>(buffer->data()); }
};

CudaPowerSgd::CudaPowerSgd(std::size_t count, int rank, std::uint64_t seed, std::size_t rows)
    : state_(std::make_unique<State>()) {
  if (rank < 1) throw ConfigError(kNoRank, "powersgd", "the rank must be at least 1");
  State& s = *state_;
  s.count = count;
  s.rank = rank;
  s.cols = detail::powersgd_cols(count, rows);
  s.rows = (count + s.cols - 1) / s.cols;
  const auto r = static_cast<std::size_t>(rank);
  s.gpu = current_device(kNoRank, "cuda powersgd");
  // A blocking stream: ordered after what the caller put on the legacy default stream.
  check(cudaStreamCreate(&s.stream), "cudaStreamCreate");
  check(cublasCreate(&s.blas), "cublasCreate");
  check(cublasSetStream(s.blas, s.stream), "cublasSetStream");
  // Plain float products, as the CPU's BLAS: no TF32.
  check(cublasSetMathMode(s.blas, CUBLAS_PEDANTIC_MATH), "cublasSetMathMode");
  s.matrix.emplace(4 * s.rows * s.cols);
  check(cudaMemset(s.matrix->data(), 0, 4 * s.rows * s.cols), "cudaMemset");
  s.p.emplace(4 * s.rows * r);
  s.approximation.emplace(4 * s.rows * s.cols);
  const auto q = detail::powersgd_first_q(s.cols, rank, seed);
  s.q.emplace(4 * q.size());
  s.q->copy_from_host(q.data(), 4 * q.size());
  s.host_p.resize(s.rows * r);
}

CudaPowerSgd::~CudaPowerSgd() = default;
CudaPowerSgd::CudaPowerSgd(CudaPowerSgd&&) noexcept = default;
CudaPowerSgd& CudaPowerSgd::operator=(CudaPowerSgd&&) noexcept = default;

std::size_t CudaPowerSgd::count() const noexcept {
  return state_->count;
}
std::size_t CudaPowerSgd::rows() const noexcept {
  return state_->rows;
}
std::size_t CudaPowerSgd::cols() const noexcept {
  return state_->cols;
}
int CudaPowerSgd::rank() const noexcept {
  return state_->rank;
}

std::span<float> CudaPowerSgd::begin(std::span<const float> gradient,
                                     std::span<const float> residual) {
  State& s = *state_;
  const DeviceGuard guard(s.gpu, kNoRank, "cuda powersgd");
  if (gradient.size() != s.count || (!residual.empty() && residual.size() != s.count)) {
    throw Error(kNoRank, "cuda powersgd",
                "expected " + std::to_string(s.count) + " elements, got " +
                    std::to_string(gradient.size()));
  }
  if (s.count == 0) return {s.device(s.p), 0};
  check_device(gradient.data(), "gradient", s.gpu);
  if (!residual.empty()) check_device(residual.data(), "residual", s.gpu);
  sum_kernel<<<grid_for(s.count), detail::cuda::kThreads, 0, s.stream>>>(
      gradient.data(), residual.empty() ? nullptr : residual.data(), s.device(s.matrix), s.count);
  check(cudaGetLastError(), "sum kernel");
  // P (rows x rank, row-major) = M Q; column-major: P^T (rank x rows) = Q^T (rank x cols) M^T.
  const float one = 1.0f, zero = 0.0f;
  const int r = s.rank;
  check(cublasSgemm(s.blas, CUBLAS_OP_N, CUBLAS_OP_N, r, static_cast<int>(s.rows),
                    static_cast<int>(s.cols), &one, s.device(s.q), r, s.device(s.matrix),
                    static_cast<int>(s.cols), &zero, s.device(s.p), r),
        "cublasSgemm P = M Q");
  check(cudaStreamSynchronize(s.stream), "P = M Q");
  return {s.device(s.p), s.rows * static_cast<std::size_t>(r)};
}

std::span<float> CudaPowerSgd::project() {
  State& s = *state_;
  const DeviceGuard guard(s.gpu, kNoRank, "cuda powersgd");
  const int r = s.rank;
  if (s.count == 0) return {s.device(s.q), 0};
  // Orthonormalised where the CPU does it, the CPU's way: rows x rank values.
  s.p->copy_to_host(s.host_p.data(), 4 * s.host_p.size());
  detail::powersgd_orthonormalise(s.host_p, s.rows, r);
  s.p->copy_from_host(s.host_p.data(), 4 * s.host_p.size());
  // Q (cols x rank, row-major) = M^T P; column-major: Q^T (rank x cols) = P^T (rank x rows) M.
  const float one = 1.0f, zero = 0.0f;
  check(cublasSgemm(s.blas, CUBLAS_OP_N, CUBLAS_OP_T, r, static_cast<int>(s.cols),
                    static_cast<int>(s.rows), &one, s.device(s.p), r, s.device(s.matrix),
                    static_cast<int>(s.cols), &zero, s.device(s.q), r),
        "cublasSgemm Q = M^T P");
  check(cudaStreamSynchronize(s.stream), "Q = M^T P");
  return {s.device(s.q), s.cols * static_cast<std::size_t>(r)};
}

void CudaPowerSgd::finish(std::span<float> out, std::span<float> residual) {
  State& s = *state_;
  const DeviceGuard guard(s.gpu, kNoRank, "cuda powersgd");
  if (out.size() != s.count || (!residual.empty() && residual.size() != s.count)) {
    throw Error(kNoRank, "cuda powersgd", "expected " + std::to_string(s.count) + " elements");
  }
  if (s.count == 0) return;
  check_device(out.data(), "output", s.gpu);
  if (!residual.empty()) check_device(residual.data(), "residual", s.gpu);
  // P Q^T (rows x cols, row-major); column-major: (cols x rows) = Q (cols x rank) P^T.
  const float one = 1.0f, zero = 0.0f;
  const int r = s.rank;
  check(cublasSgemm(s.blas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(s.cols),
                    static_cast<int>(s.rows), r, &one, s.device(s.q), r, s.device(s.p), r, &zero,
                    s.device(s.approximation), static_cast<int>(s.cols)),
        "cublasSgemm P Q^T");
  finish_kernel<<<grid_for(s.count), detail::cuda::kThreads, 0, s.stream>>>(
      s.device(s.matrix), s.device(s.approximation), out.data(),
      residual.empty() ? nullptr : residual.data(), s.count);
  check(cudaGetLastError(), "finish kernel");
  check(cudaStreamSynchronize(s.stream), "P Q^T");
}

}  // namespace unimsg
