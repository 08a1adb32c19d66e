#pragma once

// Reader for the IDX format of MNIST and Fashion-MNIST (optionally gzip-compressed): a big-endian
// header (two zero bytes, a type code, the number of dimensions, then each dimension as a u32)
// followed by the elements. Only unsigned bytes (type 0x08) are read, which is what these
// datasets hold. Every malformed file is a DataError naming the file and what was wrong.

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <vector>

namespace unimsg {

struct IdxArray {
  std::vector<std::uint32_t> dims;
  std::vector<std::uint8_t> data;  // row-major, product(dims) bytes
};

// `max_bytes` bounds the decompressed size (a gzip bomb or a lying header fails instead of
// exhausting memory).
IdxArray read_idx(const std::filesystem::path& path, std::size_t max_bytes = std::size_t{1} << 31);

// A labelled image set: images [n, rows, cols] and labels [n], checked against each other.
struct LabelledImages {
  std::size_t count = 0;
  std::size_t rows = 0;
  std::size_t cols = 0;
  std::vector<std::uint8_t> pixels;  // count * rows * cols
  std::vector<std::uint8_t> labels;  // count, each < classes
};

LabelledImages read_labelled_images(const std::filesystem::path& images,
                                    const std::filesystem::path& labels, int classes = 10);

}  // namespace unimsg
