// none: the f32 values themselves.

#include <cstring>
#include <string_view>

#include "compress_format.hpp"
#include "cpu_support.hpp"

namespace unimsg::detail {
namespace {

class NoCompressor final : public Compressor {
 public:
  explicit NoCompressor(CompressionSpec spec) : Compressor(std::move(spec)) {}
  std::string_view name() const noexcept override { return "none"; }
  std::size_t wire_bytes(std::size_t n) const noexcept override {
    return format::none_wire_bytes(n);
  }
  CompressResult compress(std::span<const float> g, std::span<float>, std::uint64_t,
                          std::span<std::byte> wire) const override {
    check_sizes(g.size(), {}, wire.size(), wire_bytes(g.size()), "none");
    if (!g.empty()) std::memcpy(wire.data(), g.data(), 4 * g.size());
    return {wire_bytes(g.size()), count_nonfinite(g)};
  }
  void decompress(std::span<const std::byte> wire, std::uint64_t,
                  std::span<float> out) const override {
    if (!out.empty()) std::memcpy(out.data(), wire.data(), 4 * out.size());
  }
};

}  // namespace

std::unique_ptr<Compressor> make_none_cpu(const CompressionSpec& spec) {
  return std::make_unique<NoCompressor>(spec);
}

}  // namespace unimsg::detail
