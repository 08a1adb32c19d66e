#pragma once

// Gradient compressors: one interface, two implementations with the same wire formats and
// semantics: the CPU reference and CUDA kernels (make_cuda_compressor). Every compressor turns an
// f32 gradient into wire bytes and back, with optional error feedback: the part of (gradient +
// residual) that the wire could not carry is kept in the residual and added to the next step's
// gradient, so nothing is lost for good (EF-SignSGD, 1-bit Adam, DGC).
//
// Wire formats (little-endian), n elements:
//   fp16, bf16  f32 scale, then n 16-bit values of gradient*scale (scale < 1 only when the
//               largest magnitude would overflow f16; NaN and Inf pass through and are counted)
//   int8        per chunk of 256: f32 scale (max|x|/127), then 256 int8 rounded stochastically
//               (QSGD-style, unbiased; seeded by spec.seed, step and position)
//   onebit      per chunk of 256: f32 scale (root mean square of the chunk), then 32 bytes of
//               signs (bit set: +scale, clear: -scale; 0 maps to +scale). The RMS keeps the
//               norm of what is sent equal to the norm of what was compressed, as DeepSpeed's
//               1-bit Adam does; the mean |x| (the least-squares scale) sends a shorter step
//               whenever magnitudes vary within a chunk, and error feedback then holds the
//               largest elements back for many steps (it cost points of test accuracy on
//               Fashion-MNIST: docs/benchmarks.md)
//   topk        u32 k, then k pairs (u32 index, f32 value): the k largest magnitudes (exact), or
//               those above a threshold estimated from a sample (sampled, as DGC)
//   randomk     k f32 values at k positions drawn from (seed, step): every rank draws the same
//               positions, so only values travel and a plain allreduce aggregates them
//
// A gradient holding NaN or Inf leaves the residual as it was before the step and is reported
// (CompressResult::nonfinite), so that the trainer can skip the step as AMP does.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace unimsg {

struct CompressionSpec {
  std::string name = "none";  // none fp16 bf16 int8 onebit topk randomk powersgd
  double ratio = 0.01;        // topk, randomk: fraction of the elements sent
  bool sampled = false;       // topk: threshold from a sample instead of an exact selection
  int powersgd_rank = 4;      // powersgd: rank of the approximation ("powersgd:2")
  // powersgd: the buffer is a matrix of this many rows ("rows=64"; 0: near-square)
  std::size_t matrix_rows = 0;
  bool error_feedback = true;
  std::uint64_t seed = 0;
  // "topk:0.01", "topk:0.01:sampled", "onebit:noef", "int8:seed=7" ... (ConfigError when bad)
  static CompressionSpec parse(std::string_view text);
  // The canonical text: parse(to_string()) gives this spec back; equal specs, equal texts.
  std::string to_string() const;
  bool compresses() const noexcept { return name != "none"; }
};

struct CompressResult {
  std::size_t wire_bytes = 0;
  std::size_t nonfinite = 0;  // NaN/Inf elements seen; > 0 means the residual was not touched
};

class Compressor {
 public:
  virtual ~Compressor() = default;
  virtual std::string_view name() const noexcept = 0;
  // Wire bytes for n elements (exact for every format here).
  virtual std::size_t wire_bytes(std::size_t count) const noexcept = 0;
  // Elements coded together under one scale: a part of a tensor that starts at a multiple of
  // it compresses exactly as it would inside the whole (1 for element-wise formats).
  virtual std::size_t block_elements() const noexcept { return 1; }
  // `residual` is empty (no error feedback) or holds gradient.size() elements.
  virtual CompressResult compress(std::span<const float> gradient, std::span<float> residual,
                                  std::uint64_t step, std::span<std::byte> wire) const = 0;
  // Writes all out.size() elements (zeros where nothing was sent).
  virtual void decompress(std::span<const std::byte> wire, std::uint64_t step,
                          std::span<float> out) const = 0;
  // Adds the decompressed values to `out` (a sparse sum for topk: only the sent pairs are
  // touched).
  virtual void decompress_add(std::span<const std::byte> wire, std::uint64_t step,
                              std::span<float> out) const;
  const CompressionSpec& spec() const noexcept { return spec_; }

 protected:
  explicit Compressor(CompressionSpec spec) : spec_(std::move(spec)) {}
  CompressionSpec spec_;
};

std::unique_ptr<Compressor> make_cpu_compressor(const CompressionSpec& spec);

// The CUDA kernels: gradient, residual, wire and output are device memory (the wire 4-byte
// aligned; a host pointer is an Error); each call runs on the compressor's own stream and returns
// when its work is done. Results agree with make_cpu_compressor's (bit for bit where the CPU
// reference takes its AVX2 path; onebit's scale and the residuals it feeds to within an ulp
// otherwise). Throws Error in a build without CUDA or without a device; ConfigError for
// powersgd, whose stages need the ranks between them (CudaPowerSgd in powersgd.hpp).
std::unique_ptr<Compressor> make_cuda_compressor(const CompressionSpec& spec);

// Elements that are NaN or infinite (on the bits: an exponent of all ones).
std::size_t count_nonfinite(std::span<const float> values) noexcept;

// Positions randomk sends at `step`: k distinct, sorted, the same on every rank.
std::vector<std::uint32_t> randomk_positions(std::size_t count, std::size_t k, std::uint64_t seed,
                                             std::uint64_t step);

}  // namespace unimsg
