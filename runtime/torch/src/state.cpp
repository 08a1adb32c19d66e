#include "unimsg/torch/state.hpp"

#include <ATen/CPUGeneratorImpl.h>

#include <cstring>
#include <sstream>
#include <string>

#include "unimsg/core/error.hpp"

namespace unimsg {
namespace {

std::vector<std::byte> bytes_of(const std::string& text) {
  const auto* p = reinterpret_cast<const std::byte*>(text.data());
  return {p, p + text.size()};
}

}  // namespace

std::vector<std::byte> save_training_state(torch::nn::Module& module,
                                           torch::optim::Optimizer& optimizer) {
  torch::serialize::OutputArchive module_archive;
  module.save(module_archive);
  torch::serialize::OutputArchive optimizer_archive;
  optimizer.save(optimizer_archive);
  torch::serialize::OutputArchive archive;
  archive.write("module", module_archive);
  archive.write("optimizer", optimizer_archive);
  std::ostringstream out;
  archive.save_to(out);
  return bytes_of(out.str());
}

void load_training_state(std::span<const std::byte> bytes, torch::nn::Module& module,
                         torch::optim::Optimizer& optimizer) {
  try {
    std::istringstream in(std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
    torch::serialize::InputArchive archive;
    archive.load_from(in);
    torch::serialize::InputArchive module_archive;
    torch::serialize::InputArchive optimizer_archive;
    archive.read("module", module_archive);
    archive.read("optimizer", optimizer_archive);
    module.load(module_archive);
    optimizer.load(optimizer_archive);
  } catch (const c10::Error& error) {
    throw CheckpointError(kNoRank, "load_training_state",
                          std::string("the checkpoint does not hold this model's state: ") +
                              error.what_without_backtrace());
  }
}

std::vector<std::byte> save_rng_state() {
  auto generator = at::detail::getDefaultCPUGenerator();
  std::lock_guard lock(generator.mutex());
  const at::Tensor state = generator.get_state();
  const auto* p = static_cast<const std::byte*>(state.data_ptr());
  return {p, p + state.numel()};
}

void load_rng_state(std::span<const std::byte> bytes) {
  auto generator = at::detail::getDefaultCPUGenerator();
  std::lock_guard lock(generator.mutex());
  at::Tensor state = torch::empty({static_cast<std::int64_t>(bytes.size())}, torch::kUInt8);
  std::memcpy(state.data_ptr(), bytes.data(), bytes.size());
  try {
    generator.set_state(state);
  } catch (const c10::Error& error) {
    throw CheckpointError(
        kNoRank, "load_rng_state",
        std::string("not a CPU generator state: ") + error.what_without_backtrace());
  }
}

}  // namespace unimsg
