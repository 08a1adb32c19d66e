#include "unimsg/core/error.hpp"
#include "unimsg/kernels/powersgd.hpp"

namespace unimsg {

struct CudaPowerSgd::State {};

CudaPowerSgd::CudaPowerSgd(std::size_t, int, std::uint64_t, std::size_t) {
  throw Error(kNoRank, "cuda powersgd",
              "unimsg was built without CUDA (UNIMSG_WITH_CUDA=OFF): no CUDA PowerSGD");
}
CudaPowerSgd::~CudaPowerSgd() = default;
CudaPowerSgd::CudaPowerSgd(CudaPowerSgd&&) noexcept = default;
CudaPowerSgd& CudaPowerSgd::operator=(CudaPowerSgd&&) noexcept = default;
// (Never reached: no object is ever constructed in this build.)
std::size_t CudaPowerSgd::count() const noexcept {
  return 0;
}
std::size_t CudaPowerSgd::rows() const noexcept {
  return 0;
}
std::size_t CudaPowerSgd::cols() const noexcept {
  return 0;
}
int CudaPowerSgd::rank() const noexcept {
  return 0;
}
std::span<float> CudaPowerSgd::begin(std::span<const float>, std::span<const float>) {
  return {};
}
std::span<float> CudaPowerSgd::project() {
  return {};
}
void CudaPowerSgd::finish(std::span<float>, std::span<float>) {}

}  // namespace unimsg
