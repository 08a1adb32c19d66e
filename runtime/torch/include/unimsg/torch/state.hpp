#pragma once

// Training state as checkpoint blobs: a module with its optimizer (libtorch's archive format),
// and the CPU random generator. Every rank holds the same replicated state in data-parallel
// training, so one rank's blobs restore any rank, on any world size.

#include <torch/torch.h>

#include <cstddef>
#include <span>
#include <vector>

namespace unimsg {

std::vector<std::byte> save_training_state(torch::nn::Module& module,
                                           torch::optim::Optimizer& optimizer);
// CheckpointError when the bytes do not hold a state for this module and optimizer.
void load_training_state(std::span<const std::byte> bytes, torch::nn::Module& module,
                         torch::optim::Optimizer& optimizer);

std::vector<std::byte> save_rng_state();
void load_rng_state(std::span<const std::byte> bytes);

}  // namespace unimsg
