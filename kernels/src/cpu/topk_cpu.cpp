// topk: u32 k, then k pairs (u32 index, f32 value): the k largest magnitudes, exact or (sampled)
// from a threshold estimated on a sample, as DGC.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <string>
#include <string_view>
#include <vector>

#include "compress_format.hpp"
#include "cpu_support.hpp"
#include "element_math.hpp"

namespace unimsg::detail {
namespace {

using format::k_of;

class TopKCompressor final : public Compressor {
 public:
  explicit TopKCompressor(CompressionSpec spec) : Compressor(std::move(spec)) {}
  std::string_view name() const noexcept override { return "topk"; }
  std::size_t wire_bytes(std::size_t n) const noexcept override {
    return format::topk_wire_bytes(spec_.ratio, n);
  }

  CompressResult compress(std::span<const float> g, std::span<float> r, std::uint64_t step,
                          std::span<std::byte> wire) const override {
    check_sizes(g.size(), r, wire.size(), wire_bytes(g.size()), "topk");
    CompressResult result{wire_bytes(g.size()), count_nonfinite(g)};
    const std::size_t n = g.size();
    const std::size_t k = k_of(spec_.ratio, n);
    std::vector<float> values(n);
    for (std::size_t i = 0; i < n; ++i) {
      values[i] = math::topk_value(math::corrected(g.data(), r.empty() ? nullptr : r.data(), i));
    }
    std::vector<std::uint32_t> chosen;
    chosen.reserve(k);
    const auto magnitude = [&](std::uint32_t i) { return std::fabs(values[i]); };
    if (spec_.sampled && n > 4 * k) {
      // DGC: estimate the k-th largest magnitude from a sample, take what lies above it, and
      // trim (or top up) to exactly k from those candidates.
      const std::size_t samples = math::topk_samples(k, n);
      std::vector<float> sample(samples);
      for (std::size_t s = 0; s < samples; ++s) {
        sample[s] = std::fabs(values[math::topk_sample_index(spec_.seed, step, s, n)]);
      }
      const std::size_t rank_in_sample = math::topk_rank_in_sample(samples, k, n);
      std::nth_element(sample.begin(),
                       sample.begin() + static_cast<std::ptrdiff_t>(rank_in_sample - 1),
                       sample.end(), std::greater<float>());
      const float threshold = math::topk_threshold(sample[rank_in_sample - 1]);
      for (std::uint32_t i = 0; i < n; ++i) {
        if (magnitude(i) >= threshold) chosen.push_back(i);
      }
    }
    if (chosen.size() < k) {  // exact selection (or the sample's threshold was too high)
      chosen.resize(n);
      std::iota(chosen.begin(), chosen.end(), 0u);
    }
    if (chosen.size() > k) {
      std::nth_element(chosen.begin(), chosen.begin() + static_cast<std::ptrdiff_t>(k - 1),
                       chosen.end(), [&](std::uint32_t a, std::uint32_t b) {
                         return magnitude(a) > magnitude(b) ||
                                (magnitude(a) == magnitude(b) && a < b);
                       });
      chosen.resize(k);
    }
    std::sort(chosen.begin(), chosen.end());
    put(wire, 0, static_cast<std::uint32_t>(k));
    const bool update = !r.empty() && result.nonfinite == 0;
    if (update) {
      for (std::size_t i = 0; i < n; ++i) r[i] = values[i];  // everything stays behind...
    }
    for (std::size_t j = 0; j < chosen.size(); ++j) {
      put(wire, 4 + 8 * j, chosen[j]);
      put(wire, 8 + 8 * j, values[chosen[j]]);
      if (update) r[chosen[j]] = 0;  // ...except what was sent
    }
    return result;
  }

  void decompress(std::span<const std::byte> wire, std::uint64_t step,
                  std::span<float> out) const override {
    std::fill(out.begin(), out.end(), 0.0f);
    decompress_add(wire, step, out);
  }

  void decompress_add(std::span<const std::byte> wire, std::uint64_t,
                      std::span<float> out) const override {
    if (wire.size() < 4) throw Error(kNoRank, "decompress topk", "the wire is shorter than k");
    const auto k = get<std::uint32_t>(wire, 0);
    if (wire.size() < 4 + 8 * static_cast<std::size_t>(k)) {
      throw Error(kNoRank, "decompress topk", "the wire is shorter than its k pairs");
    }
    for (std::size_t j = 0; j < k; ++j) {
      const auto index = get<std::uint32_t>(wire, 4 + 8 * j);
      if (index >= out.size()) {
        throw Error(kNoRank, "decompress topk",
                    "index " + std::to_string(index) + " is past the " +
                        std::to_string(out.size()) + " elements");
      }
      out[index] += get<float>(wire, 8 + 8 * j);
    }
  }
};

}  // namespace

std::unique_ptr<Compressor> make_topk_cpu(const CompressionSpec& spec) {
  return std::make_unique<TopKCompressor>(spec);
}

}  // namespace unimsg::detail
