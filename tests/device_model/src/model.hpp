#pragma once

// What the device model's two halves share: the CUDA runtime's devices, memory and streams
// (runtime_model.cpp), which the NCCL half (nccl_model.cpp) enqueues its collectives on.

#include <cuda_runtime_api.h>

#include <cstddef>
#include <functional>
#include <optional>

namespace device_model::detail {

// An allocation made by cudaMalloc (device memory of `device`) or cudaHostAlloc (pinned).
struct Region {
  std::byte* base = nullptr;
  std::size_t bytes = 0;
  int device = -1;
  bool pinned = false;
};

// The device the calling thread has set (cudaSetDevice), 0 until it sets one.
int current_device();

// The allocation that holds `pointer`, if the model made one.
std::optional<Region> find_region(const void* pointer);

// True when [pointer, pointer + bytes) lies in device memory of `device`.
bool device_span(const void* pointer, std::size_t bytes, int device);

// Queues `work` on `stream` (FIFO, on the stream's own thread, after what it must follow):
// cudaErrorInvalidResourceHandle for a stream the model does not know.
cudaError_t enqueue(cudaStream_t stream, std::function<void()> work);

// The device a stream belongs to; -1 for a stream the model does not know.
int stream_device(cudaStream_t stream);

}  // namespace device_model::detail
