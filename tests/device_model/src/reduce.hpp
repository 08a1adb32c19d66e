#pragma once

// The model's reductions: every rank folds the contributions in rank order, one rounding per
// step in the element type, so all ranks get the same bits.

#include <nccl.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace device_model::detail {

inline std::size_t type_size(ncclDataType_t type) {
  switch (type) {
    case ncclInt8:
    case ncclUint8:
      return 1;
    case ncclFloat16:
    case ncclBfloat16:
      return 2;
    case ncclInt32:
    case ncclUint32:
    case ncclFloat32:
      return 4;
    case ncclInt64:
    case ncclUint64:
    case ncclFloat64:
      return 8;
    default:
      return 0;  // (fp8 and anything unknown: not modelled)
  }
}

// bf16 <-> f32, rounding to nearest even (NaN kept quiet).
inline float bf16_value(std::uint16_t bits) {
  const std::uint32_t wide = static_cast<std::uint32_t>(bits) << 16;
  float value = 0;
  std::memcpy(&value, &wide, 4);
  return value;
}
inline std::uint16_t bf16_bits(float value) {
  std::uint32_t wide = 0;
  std::memcpy(&wide, &value, 4);
  if ((wide & 0x7F800000u) == 0x7F800000u && (wide & 0x7FFFFFu) != 0)
    return static_cast<std::uint16_t>((wide >> 16) | 0x40);
  wide += 0x7FFFu + ((wide >> 16) & 1u);
  return static_cast<std::uint16_t>(wide >> 16);
}

template <typename T>
T combine(T a, T b, ncclRedOp_t op) {
  switch (op) {
    case ncclProd:
      return static_cast<T>(a * b);
    case ncclMax:
      return std::max(a, b);
    case ncclMin:
      return std::min(a, b);
    default:  // sum, and avg's sum
      return static_cast<T>(a + b);
  }
}

template <typename T, typename Load, typename Store>
void fold(const std::vector<std::vector<std::byte>>& inbox, void* out, std::size_t count,
          ncclRedOp_t op, Load load, Store store) {
  constexpr std::size_t width = sizeof(T);
  for (std::size_t i = 0; i < count; ++i) {
    T acc = load(inbox[0].data() + i * width);
    for (std::size_t r = 1; r < inbox.size(); ++r)
      acc = combine<T>(acc, load(inbox[r].data() + i * width), op);
    if (op == ncclAvg) acc = static_cast<T>(acc / static_cast<T>(inbox.size()));
    store(static_cast<std::byte*>(out) + i * width, acc);
  }
}

template <typename T>
void fold_plain(const std::vector<std::vector<std::byte>>& inbox, void* out, std::size_t count,
                ncclRedOp_t op) {
  fold<T>(
      inbox, out, count, op,
      [](const std::byte* p) {
        T v;
        std::memcpy(&v, p, sizeof(T));
        return v;
      },
      [](std::byte* p, T v) { std::memcpy(p, &v, sizeof(T)); });
}

inline void reduce_in_rank_order(const std::vector<std::vector<std::byte>>& inbox, void* out,
                                 std::size_t count, ncclDataType_t type, ncclRedOp_t op) {
  switch (type) {
    case ncclInt8:
      return fold_plain<std::int8_t>(inbox, out, count, op);
    case ncclUint8:
      return fold_plain<std::uint8_t>(inbox, out, count, op);
    case ncclInt32:
      return fold_plain<std::int32_t>(inbox, out, count, op);
    case ncclUint32:
      return fold_plain<std::uint32_t>(inbox, out, count, op);
    case ncclInt64:
      return fold_plain<std::int64_t>(inbox, out, count, op);
    case ncclUint64:
      return fold_plain<std::uint64_t>(inbox, out, count, op);
    case ncclFloat32:
      return fold_plain<float>(inbox, out, count, op);
    case ncclFloat64:
      return fold_plain<double>(inbox, out, count, op);
    case ncclFloat16:
      return fold_plain<_Float16>(inbox, out, count, op);
    case ncclBfloat16:
      for (std::size_t i = 0; i < count; ++i) {
        std::uint16_t bits = 0;
        std::memcpy(&bits, inbox[0].data() + 2 * i, 2);
        float acc = bf16_value(bits);
        for (std::size_t r = 1; r < inbox.size(); ++r) {
          std::memcpy(&bits, inbox[r].data() + 2 * i, 2);
          acc = bf16_value(bf16_bits(combine(acc, bf16_value(bits), op)));
        }
        if (op == ncclAvg) acc /= static_cast<float>(inbox.size());
        bits = bf16_bits(acc);
        std::memcpy(static_cast<std::byte*>(out) + 2 * i, &bits, 2);
      }
      return;
    default:
      return;
  }
}

}  // namespace device_model::detail
