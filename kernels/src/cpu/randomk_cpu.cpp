// randomk: k f32 values at k positions drawn from (seed, step), the same on every rank.

#include <algorithm>
#include <cstdint>
#include <string_view>
#include <vector>

#include "compress_format.hpp"
#include "cpu_support.hpp"

namespace unimsg {
namespace detail {
namespace {

using format::k_of;

class RandomKCompressor final : public Compressor {
 public:
  explicit RandomKCompressor(CompressionSpec spec) : Compressor(std::move(spec)) {}
  std::string_view name() const noexcept override { return "randomk"; }
  std::size_t wire_bytes(std::size_t n) const noexcept override {
    return format::randomk_wire_bytes(spec_.ratio, n);
  }

  CompressResult compress(std::span<const float> g, std::span<float> r, std::uint64_t step,
                          std::span<std::byte> wire) const override {
    check_sizes(g.size(), r, wire.size(), wire_bytes(g.size()), "randomk");
    CompressResult result{wire_bytes(g.size()), count_nonfinite(g)};
    const auto positions =
        randomk_positions(g.size(), k_of(spec_.ratio, g.size()), spec_.seed, step);
    const bool update = !r.empty() && result.nonfinite == 0;
    if (update) {
      for (std::size_t i = 0; i < g.size(); ++i) r[i] = corrected(g, r, i);
    }
    for (std::size_t j = 0; j < positions.size(); ++j) {
      const std::size_t i = positions[j];
      put(wire, 4 * j, update ? r[i] : corrected(g, r, i));
      if (update) r[i] = 0;
    }
    return result;
  }

  void decompress(std::span<const std::byte> wire, std::uint64_t step,
                  std::span<float> out) const override {
    std::fill(out.begin(), out.end(), 0.0f);
    const auto positions =
        randomk_positions(out.size(), k_of(spec_.ratio, out.size()), spec_.seed, step);
    for (std::size_t j = 0; j < positions.size(); ++j) out[positions[j]] = get<float>(wire, 4 * j);
  }

  // Adds at the k positions only, as the kernel scatters: elsewhere `out` is left as it was
  // (adding the zeros the default does would turn -0 into +0 there).
  void decompress_add(std::span<const std::byte> wire, std::uint64_t step,
                      std::span<float> out) const override {
    const auto positions =
        randomk_positions(out.size(), k_of(spec_.ratio, out.size()), spec_.seed, step);
    if (wire.size() < 4 * positions.size()) {
      throw Error(kNoRank, "decompress randomk", "the wire is shorter than its k values");
    }
    for (std::size_t j = 0; j < positions.size(); ++j) {
      out[positions[j]] = math::add_rn(out[positions[j]], get<float>(wire, 4 * j));
    }
  }
};

}  // namespace

std::unique_ptr<Compressor> make_randomk_cpu(const CompressionSpec& spec) {
  return std::make_unique<RandomKCompressor>(spec);
}

}  // namespace detail

std::vector<std::uint32_t> randomk_positions(std::size_t count, std::size_t k, std::uint64_t seed,
                                             std::uint64_t step) {
  // Floyd's algorithm: k distinct positions with k draws, the same everywhere for (seed, step).
  std::vector<std::uint32_t> picked;
  picked.reserve(k);
  std::vector<char> taken(count, 0);
  std::uint64_t state = detail::mix(seed ^ detail::mix(step + 0x5151));
  for (std::size_t j = count - k; j < count; ++j) {
    state = detail::mix(state);
    const auto t = static_cast<std::uint32_t>(state % (j + 1));
    const auto choice = taken[t] ? static_cast<std::uint32_t>(j) : t;
    taken[choice] = 1;
    picked.push_back(choice);
  }
  std::sort(picked.begin(), picked.end());
  return picked;
}

}  // namespace unimsg
