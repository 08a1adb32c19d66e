// CPU reference compressors: one pass per element where possible (error feedback, scaling and
// packing fused), as the CUDA kernels do. One file per format (none_cpu.cpp, half_cpu.cpp,
// int8_cpu.cpp, onebit_cpu.cpp, topk_cpu.cpp, randomk_cpu.cpp), what they share in
// cpu_support.hpp; here the factory and the default decompress_add.

#include <memory>
#include <vector>

#include "cpu_support.hpp"

namespace unimsg {

void Compressor::decompress_add(std::span<const std::byte> wire, std::uint64_t step,
                                std::span<float> out) const {
  std::vector<float> values(out.size());
  decompress(wire, step, values);
  for (std::size_t i = 0; i < out.size(); ++i) out[i] += values[i];
}

std::unique_ptr<Compressor> make_cpu_compressor(const CompressionSpec& spec) {
  if (spec.name == "none") return detail::make_none_cpu(spec);
  if (spec.name == "fp16") return detail::make_half_cpu(spec, false);
  if (spec.name == "bf16") return detail::make_half_cpu(spec, true);
  if (spec.name == "int8") return detail::make_int8_cpu(spec);
  if (spec.name == "onebit") return detail::make_onebit_cpu(spec);
  if (spec.name == "topk") return detail::make_topk_cpu(spec);
  if (spec.name == "randomk") return detail::make_randomk_cpu(spec);
  if (spec.name == "powersgd") {
    throw ConfigError(kNoRank, "compression",
                      "powersgd needs the ranks between its stages: use it through "
                      "CompressedAllreduce or the engine (PowerSgd holds its steps)");
  }
  throw ConfigError(kNoRank, "compression", "unknown compressor '" + spec.name + "'");
}

}  // namespace unimsg
