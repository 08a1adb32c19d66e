#include "unimsg/data/idx.hpp"

#include <zlib.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>

#include "unimsg/core/error.hpp"

namespace unimsg {
namespace {

[[noreturn]] void fail(const std::filesystem::path& path, const std::string& why) {
  throw DataError(kNoRank, "read_idx", path.string() + ": " + why);
}

struct GzClose {
  void operator()(gzFile file) const noexcept { gzclose(file); }
};

// gzread also reads uncompressed files as they are.
std::vector<std::uint8_t> read_all(const std::filesystem::path& path, std::size_t max_bytes) {
  std::unique_ptr<gzFile_s, GzClose> file(gzopen(path.c_str(), "rb"));
  if (!file) fail(path, "cannot open (" + std::string(std::strerror(errno)) + ")");
  std::vector<std::uint8_t> bytes;
  std::vector<std::uint8_t> chunk(1 << 20);
  while (true) {
    const int got = gzread(file.get(), chunk.data(), static_cast<unsigned>(chunk.size()));
    if (got < 0) {
      int code = 0;
      const char* message = gzerror(file.get(), &code);
      fail(path, std::string("corrupt or truncated gzip data (") + message + ")");
    }
    if (got == 0) break;
    if (bytes.size() + static_cast<std::size_t>(got) > max_bytes) {
      fail(path, "more than " + std::to_string(max_bytes) + " bytes once decompressed");
    }
    bytes.insert(bytes.end(), chunk.begin(), chunk.begin() + got);
  }
  // A gzip stream cut short reads as a clean end in some zlib versions: ask explicitly.
  int code = 0;
  gzerror(file.get(), &code);
  if (code != Z_OK && code != Z_BUF_ERROR) fail(path, "gzip stream ended with an error");
  return bytes;
}

std::uint32_t load_be32(const std::uint8_t* p) {
  return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) |
         std::uint32_t{p[3]};
}

}  // namespace

IdxArray read_idx(const std::filesystem::path& path, std::size_t max_bytes) {
  const std::vector<std::uint8_t> bytes = read_all(path, max_bytes);
  if (bytes.size() < 4) fail(path, "only " + std::to_string(bytes.size()) + " bytes: no header");
  if (bytes[0] != 0 || bytes[1] != 0) fail(path, "does not start with two zero bytes: not IDX");
  if (bytes[2] != 0x08) {
    char code[8];
    std::snprintf(code, sizeof code, "0x%02x", bytes[2]);
    fail(path, std::string("element type ") + code + " is not unsigned byte (0x08)");
  }
  const std::size_t rank = bytes[3];
  if (rank == 0 || rank > 4) fail(path, std::to_string(rank) + " dimensions (expected 1 to 4)");
  const std::size_t header = 4 + 4 * rank;
  if (bytes.size() < header) fail(path, "truncated header");
  IdxArray array;
  std::size_t elements = 1;
  for (std::size_t d = 0; d < rank; ++d) {
    const std::uint32_t dim = load_be32(bytes.data() + 4 + 4 * d);
    if (dim == 0) fail(path, "dimension " + std::to_string(d) + " is zero");
    if (elements > max_bytes / dim) fail(path, "dimensions larger than the size limit");
    elements *= dim;
    array.dims.push_back(dim);
  }
  const std::size_t body = bytes.size() - header;
  if (body != elements) {
    fail(path, "header announces " + std::to_string(elements) + " elements, the file holds " +
                   std::to_string(body) + (body < elements ? " (truncated)" : " (trailing bytes)"));
  }
  array.data.assign(bytes.begin() + static_cast<std::ptrdiff_t>(header), bytes.end());
  return array;
}

LabelledImages read_labelled_images(const std::filesystem::path& images,
                                    const std::filesystem::path& labels, int classes) {
  IdxArray image_array = read_idx(images);
  IdxArray label_array = read_idx(labels);
  if (image_array.dims.size() != 3) {
    fail(images, std::to_string(image_array.dims.size()) + " dimensions, images need 3");
  }
  if (label_array.dims.size() != 1) {
    fail(labels, std::to_string(label_array.dims.size()) + " dimensions, labels need 1");
  }
  if (image_array.dims[0] != label_array.dims[0]) {
    fail(labels, std::to_string(label_array.dims[0]) + " labels for " +
                     std::to_string(image_array.dims[0]) + " images in " + images.string());
  }
  for (std::size_t i = 0; i < label_array.data.size(); ++i) {
    if (label_array.data[i] >= classes) {
      fail(labels, "label " + std::to_string(label_array.data[i]) + " of sample " +
                       std::to_string(i) + " is not below " + std::to_string(classes));
    }
  }
  LabelledImages set;
  set.count = image_array.dims[0];
  set.rows = image_array.dims[1];
  set.cols = image_array.dims[2];
  set.pixels = std::move(image_array.data);
  set.labels = std::move(label_array.data);
  return set;
}

}  // namespace unimsg
