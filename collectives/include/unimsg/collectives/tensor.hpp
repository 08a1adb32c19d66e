#pragma once

// Element types, reductions and the non-owning tensor view that collectives take.

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace unimsg {

enum class DType : std::uint8_t { kF32, kF16, kBF16, kF64, kI32, kI64, kU8 };
inline constexpr DType kAllDTypes[] = {DType::kF32, DType::kF16, DType::kBF16, DType::kF64,
                                       DType::kI32, DType::kI64, DType::kU8};
std::size_t dtype_size(DType dtype) noexcept;
const char* to_string(DType dtype) noexcept;

// Avg divides the sum by the number of ranks; on integer types it truncates toward zero.
enum class ReduceOp : std::uint8_t { kSum, kAvg, kMin, kMax };
inline constexpr ReduceOp kAllReduceOps[] = {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMin,
                                             ReduceOp::kMax};
const char* to_string(ReduceOp op) noexcept;

enum class Device : std::uint8_t { kHost, kCuda };

// Element `index` of a typed host buffer as a double, and back (f16/bf16 converted, integers
// truncated): for checks, tests and benchmarks, not for hot paths.
double load_element(const void* data, DType dtype, std::size_t index) noexcept;
void store_element(void* data, DType dtype, std::size_t index, double value) noexcept;

// `count` elements of `dtype` at `data`, in host or device memory. Does not own the memory.
struct TensorView {
  void* data = nullptr;
  std::size_t count = 0;
  DType dtype = DType::kF32;
  Device device = Device::kHost;

  std::size_t bytes() const noexcept { return count * dtype_size(dtype); }
};

template <typename T>
DType dtype_of();
template <>
inline DType dtype_of<float>() {
  return DType::kF32;
}
template <>
inline DType dtype_of<double>() {
  return DType::kF64;
}
template <>
inline DType dtype_of<std::int32_t>() {
  return DType::kI32;
}
template <>
inline DType dtype_of<std::int64_t>() {
  return DType::kI64;
}
template <>
inline DType dtype_of<std::uint8_t>() {
  return DType::kU8;
}

// A host view of a typed array (f16/bf16 hold their bits in std::uint16_t: pass the dtype).
template <typename T>
TensorView host_view(T* data, std::size_t count, DType dtype = dtype_of<T>()) {
  return TensorView{data, count, dtype, Device::kHost};
}

}  // namespace unimsg
