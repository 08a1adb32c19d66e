// The CUDA runtime, modelled on the CPU for the code that only moves device memory (the NCCL
// backend, DeviceBuffer, the MPI backend's staging). What it keeps of CUDA's semantics, because
// the NCCL backend's correctness depends on them:
// - device memory is host memory the model hands out per device, filled with 0xFF (stale data
//   shows as NaN), bounds-checked on every copy and freed at cudaFree (AddressSanitizer sees a use
//   after free);
// - every stream is a thread running its work in FIFO order; the legacy default stream (0) of a
//   device and its blocking streams wait for each other's earlier work, non-blocking streams do
//   not;
// - cudaMemcpy from pageable host memory returns once the source is staged, before the "DMA"
//   (a delayed copy on the legacy stream) lands, as the real one may;
// - cudaSetDevice is per thread; streams, events and allocations belong to the device current
//   when they are made, and recording an event of one device on a stream of another fails.
// No kernels run: the model stands in for libcudart only where no kernel is launched.

#include <cuda_runtime_api.h>

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "model.hpp"

namespace device_model::detail {
namespace {

using namespace std::chrono_literals;

// How long a pageable host-to-device copy's "DMA" takes after cudaMemcpy returned: long enough
// that work which does not wait for it reads the old contents.
constexpr auto kPageableDmaDelay = 20ms;
constexpr int kMaxDevices = 64;

// One stream's work: a thread that runs it in order.
struct Queue {
  int device = 0;
  bool legacy = false;    // the legacy default stream of `device`
  bool blocking = false;  // ordered with the legacy stream (cudaStreamDefault)
  struct Entry {
    std::function<void()> work;
    std::vector<std::pair<std::shared_ptr<Queue>, std::uint64_t>> after;  // (queue, completed)
  };
  std::deque<Entry> entries;
  std::uint64_t submitted = 0;
  std::uint64_t completed = 0;
  bool stopping = false;
  std::thread worker;
};

struct Model {
  std::mutex mutex;
  std::condition_variable changed;
  std::map<std::uintptr_t, std::pair<std::unique_ptr<std::byte[]>, Region>> regions;
  std::map<const void*, std::shared_ptr<Queue>> streams;  // cudaStream_t -> its queue
  std::map<int, std::shared_ptr<Queue>> legacy;           // per device
  int device_count = -1;

  ~Model() {
    std::vector<std::shared_ptr<Queue>> queues;
    {
      std::lock_guard lock(mutex);
      for (auto& [handle, queue] : streams) queues.push_back(queue);
      for (auto& [device, queue] : legacy) queues.push_back(queue);
      for (auto& queue : queues) queue->stopping = true;
      changed.notify_all();
    }
    for (auto& queue : queues) {
      if (queue->worker.joinable()) queue->worker.join();
    }
  }
};

Model& model() {
  static Model instance;
  return instance;
}

thread_local int tls_device = 0;
thread_local cudaError_t tls_last_error = cudaSuccess;

cudaError_t fail(cudaError_t error) {
  tls_last_error = error;
  return error;
}

void run_queue(const std::shared_ptr<Queue>& queue) {
  Model& m = model();
  std::unique_lock lock(m.mutex);
  for (;;) {
    m.changed.wait(lock, [&] { return queue->stopping || !queue->entries.empty(); });
    if (queue->entries.empty()) return;
    auto& entry = queue->entries.front();
    m.changed.wait(lock, [&] {
      return std::all_of(entry.after.begin(), entry.after.end(),
                         [](const auto& fence) { return fence.first->completed >= fence.second; });
    });
    auto work = std::move(entry.work);
    lock.unlock();
    work();
    lock.lock();
    queue->entries.pop_front();
    ++queue->completed;
    m.changed.notify_all();
  }
}

std::shared_ptr<Queue> start_queue(int device, bool legacy, bool blocking) {
  auto queue = std::make_shared<Queue>();
  queue->device = device;
  queue->legacy = legacy;
  queue->blocking = blocking;
  queue->worker = std::thread([queue] { run_queue(queue); });
  return queue;
}

// The queue behind a stream handle (0: the legacy stream of the current device); mutex held.
std::shared_ptr<Queue> queue_locked(Model& m, cudaStream_t stream) {
  if (stream == nullptr) {
    auto& queue = m.legacy[tls_device];
    if (!queue) queue = start_queue(tls_device, true, true);
    return queue;
  }
  const auto found = m.streams.find(stream);
  return found == m.streams.end() ? nullptr : found->second;
}

// Appends work to a queue with the fences CUDA's stream semantics give it; mutex held. Returns
// the count the queue's `completed` reaches when the work is done.
std::uint64_t push_locked(Model& m, const std::shared_ptr<Queue>& queue,
                          std::function<void()> work) {
  Queue::Entry entry{std::move(work), {}};
  if (queue->legacy) {
    for (auto& [handle, other] : m.streams) {
      if (other->blocking && other->device == queue->device && other->submitted > 0)
        entry.after.emplace_back(other, other->submitted);
    }
  } else if (queue->blocking) {
    auto& legacy = m.legacy[queue->device];
    if (legacy) entry.after.emplace_back(legacy, legacy->submitted);
  }
  queue->entries.push_back(std::move(entry));
  m.changed.notify_all();
  return ++queue->submitted;
}

void wait_for(Model& m, std::unique_lock<std::mutex>& lock, const std::shared_ptr<Queue>& queue,
              std::uint64_t target) {
  m.changed.wait(lock, [&] { return queue->completed >= target; });
}

// Waits for every queue of `device` to finish what it has been given; mutex held.
void synchronize_device_locked(Model& m, std::unique_lock<std::mutex>& lock, int device) {
  std::vector<std::pair<std::shared_ptr<Queue>, std::uint64_t>> targets;
  for (auto& [handle, queue] : m.streams)
    if (queue->device == device) targets.emplace_back(queue, queue->submitted);
  if (auto& legacy = m.legacy[device]) targets.emplace_back(legacy, legacy->submitted);
  for (auto& [queue, target] : targets) wait_for(m, lock, queue, target);
}

std::optional<Region> find_region_locked(Model& m, const void* pointer) {
  const auto address = reinterpret_cast<std::uintptr_t>(pointer);
  auto found = m.regions.upper_bound(address);
  if (found == m.regions.begin()) return std::nullopt;
  --found;
  const Region& region = found->second.second;
  if (address >= found->first + std::max<std::size_t>(region.bytes, 1)) return std::nullopt;
  return region;
}

bool spans(const std::optional<Region>& region, const void* pointer, std::size_t bytes) {
  return region && static_cast<const std::byte*>(pointer) + bytes <= region->base + region->bytes;
}

cudaError_t allocate(void** pointer, std::size_t bytes, bool pinned) {
  if (pointer == nullptr) return fail(cudaErrorInvalidValue);
  Model& m = model();
  auto storage = std::make_unique<std::byte[]>(std::max<std::size_t>(bytes, 1));
  std::memset(storage.get(), 0xFF, std::max<std::size_t>(bytes, 1));
  Region region{storage.get(), bytes, pinned ? -1 : tls_device, pinned};
  const auto address = reinterpret_cast<std::uintptr_t>(storage.get());
  *pointer = storage.get();
  std::lock_guard lock(m.mutex);
  m.regions.emplace(address, std::pair{std::move(storage), region});
  return cudaSuccess;
}

cudaError_t release(void* pointer, bool pinned) {
  if (pointer == nullptr) return cudaSuccess;
  Model& m = model();
  std::unique_lock lock(m.mutex);
  const auto found = m.regions.find(reinterpret_cast<std::uintptr_t>(pointer));
  if (found == m.regions.end() || found->second.second.pinned != pinned)
    return fail(cudaErrorInvalidValue);
  // (cudaFree waits for the device's work first, as the real one does.)
  if (!pinned) synchronize_device_locked(m, lock, found->second.second.device);
  m.regions.erase(reinterpret_cast<std::uintptr_t>(pointer));
  return cudaSuccess;
}

// The direction of a copy, checked against what the model allocated: device sides must lie in
// device memory, host sides must not.
cudaError_t check_copy(Model& m, void* to, const void* from, std::size_t bytes,
                       cudaMemcpyKind& kind) {
  const auto to_region = find_region_locked(m, to);
  const auto from_region = find_region_locked(m, from);
  const bool to_device = to_region && !to_region->pinned;
  const bool from_device = from_region && !from_region->pinned;
  if (kind == cudaMemcpyDefault) {
    kind = to_device ? (from_device ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice)
                     : (from_device ? cudaMemcpyDeviceToHost : cudaMemcpyHostToHost);
  }
  const bool want_to_device = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  const bool want_from_device = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if (want_to_device != to_device || want_from_device != from_device) return cudaErrorInvalidValue;
  if ((to_device && !spans(to_region, to, bytes)) ||
      (from_device && !spans(from_region, from, bytes)))
    return cudaErrorInvalidValue;
  return cudaSuccess;
}

int parse_device_count() {
  // UNIMSG_MODEL_GPUS: how many devices each process sees (8 by default, 0 for none).
  const char* text = std::getenv("UNIMSG_MODEL_GPUS");
  if (text == nullptr || *text == '\0') return 8;
  char* end = nullptr;
  const long value = std::strtol(text, &end, 10);
  if (*end != '\0' || value < 0 || value > kMaxDevices) {
    std::fprintf(stderr, "device model: UNIMSG_MODEL_GPUS=\"%s\" is not a count 0..%d\n", text,
                 kMaxDevices);
    std::abort();
  }
  return static_cast<int>(value);
}

}  // namespace

int current_device() {
  return tls_device;
}

std::optional<Region> find_region(const void* pointer) {
  Model& m = model();
  std::lock_guard lock(m.mutex);
  return find_region_locked(m, pointer);
}

bool device_span(const void* pointer, std::size_t bytes, int device) {
  const auto region = find_region(pointer);
  return region && !region->pinned && region->device == device && spans(region, pointer, bytes);
}

cudaError_t enqueue(cudaStream_t stream, std::function<void()> work) {
  Model& m = model();
  std::lock_guard lock(m.mutex);
  const auto queue = queue_locked(m, stream);
  if (!queue) return cudaErrorInvalidResourceHandle;
  push_locked(m, queue, std::move(work));
  return cudaSuccess;
}

int stream_device(cudaStream_t stream) {
  Model& m = model();
  std::lock_guard lock(m.mutex);
  if (stream == nullptr) return tls_device;
  const auto found = m.streams.find(stream);
  return found == m.streams.end() ? -1 : found->second->device;
}

}  // namespace device_model::detail

using namespace device_model::detail;

// (An event: the count its stream's work reaches when everything before the record is done.)
struct CUevent_st {
  int device = 0;
  std::shared_ptr<Queue> queue;
  std::uint64_t target = 0;
};

namespace {

std::set<const CUevent_st*>& live_events() {
  static std::set<const CUevent_st*> events;
  return events;
}

}  // namespace

extern "C" {

cudaError_t cudaGetDeviceCount(int* count) {
  Model& m = model();
  std::lock_guard lock(m.mutex);
  if (m.device_count < 0) m.device_count = parse_device_count();
  *count = m.device_count;
  return m.device_count == 0 ? fail(cudaErrorNoDevice) : cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* properties, int device) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || device < 0 || device >= count)
    return fail(cudaErrorInvalidDevice);
  *properties = cudaDeviceProp{};
  std::snprintf(properties->name, sizeof(properties->name), "unimsg device model %d", device);
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || device < 0 || device >= count)
    return fail(cudaErrorInvalidDevice);
  tls_device = device;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = tls_device;
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  return std::exchange(tls_last_error, cudaSuccess);
}

cudaError_t cudaPeekAtLastError() {
  return tls_last_error;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorMemoryAllocation:
      return "out of memory";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
    case cudaErrorNoDevice:
      return "no CUDA-capable device is detected";
    case cudaErrorInvalidResourceHandle:
      return "invalid resource handle";
    case cudaErrorNotReady:
      return "device not ready";
    default:
      return "unknown error (device model)";
  }
}

cudaError_t cudaMalloc(void** pointer, size_t bytes) {
  return allocate(pointer, bytes, false);
}

cudaError_t cudaFree(void* pointer) {
  return release(pointer, false);
}

cudaError_t cudaHostAlloc(void** pointer, size_t bytes, unsigned int) {
  return allocate(pointer, bytes, true);
}

cudaError_t cudaMallocHost(void** pointer, size_t bytes) {
  return allocate(pointer, bytes, true);
}

cudaError_t cudaFreeHost(void* pointer) {
  return release(pointer, true);
}

cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attributes, const void* pointer) {
  *attributes = cudaPointerAttributes{};
  const auto region = find_region(pointer);
  attributes->type = !region          ? cudaMemoryTypeUnregistered
                     : region->pinned ? cudaMemoryTypeHost
                                      : cudaMemoryTypeDevice;
  attributes->device = region && !region->pinned ? region->device : -1;
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* to, const void* from, size_t bytes, cudaMemcpyKind kind) {
  if (bytes == 0) return cudaSuccess;
  Model& m = model();
  std::unique_lock lock(m.mutex);
  if (const cudaError_t error = check_copy(m, to, from, bytes, kind); error != cudaSuccess)
    return fail(error);
  const auto queue = queue_locked(m, nullptr);
  const auto from_region = find_region_locked(m, from);
  if (kind == cudaMemcpyHostToDevice && !from_region) {
    // Pageable source: staged now, the copy to the device lands later.
    auto staged = std::make_shared<std::vector<std::byte>>(
        static_cast<const std::byte*>(from), static_cast<const std::byte*>(from) + bytes);
    push_locked(m, queue, [to, staged] {
      std::this_thread::sleep_for(kPageableDmaDelay);
      std::memcpy(to, staged->data(), staged->size());
    });
    return cudaSuccess;
  }
  const std::uint64_t done =
      push_locked(m, queue, [to, from, bytes] { std::memmove(to, from, bytes); });
  // Device to device returns at once; copies that involve the host wait for it.
  if (kind != cudaMemcpyDeviceToDevice) wait_for(m, lock, queue, done);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* to, const void* from, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t stream) {
  if (bytes == 0) return cudaSuccess;
  Model& m = model();
  std::lock_guard lock(m.mutex);
  if (const cudaError_t error = check_copy(m, to, from, bytes, kind); error != cudaSuccess)
    return fail(error);
  const auto queue = queue_locked(m, stream);
  if (!queue) return fail(cudaErrorInvalidResourceHandle);
  push_locked(m, queue, [to, from, bytes] { std::memmove(to, from, bytes); });
  return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
  Model& m = model();
  const bool blocking = (flags & cudaStreamNonBlocking) == 0;
  auto queue = start_queue(tls_device, false, blocking);
  std::lock_guard lock(m.mutex);
  // (The queue's address is the handle: CUstream_st stays an incomplete type.)
  *stream = reinterpret_cast<cudaStream_t>(queue.get());
  m.streams.emplace(queue.get(), std::move(queue));
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t* stream) {
  return cudaStreamCreateWithFlags(stream, cudaStreamDefault);
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  Model& m = model();
  std::unique_lock lock(m.mutex);
  const auto queue = queue_locked(m, stream);
  if (!queue) return fail(cudaErrorInvalidResourceHandle);
  wait_for(m, lock, queue, queue->submitted);
  return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  Model& m = model();
  std::shared_ptr<Queue> queue;
  {
    std::unique_lock lock(m.mutex);
    const auto found = m.streams.find(stream);
    if (stream == nullptr || found == m.streams.end()) return fail(cudaErrorInvalidResourceHandle);
    queue = found->second;
    m.streams.erase(found);
    queue->stopping = true;  // (its thread finishes what was queued, then ends)
    m.changed.notify_all();
  }
  queue->worker.join();
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() {
  Model& m = model();
  std::unique_lock lock(m.mutex);
  synchronize_device_locked(m, lock, tls_device);
  return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) {
  auto created = std::make_unique<CUevent_st>();
  created->device = tls_device;
  Model& m = model();
  std::lock_guard lock(m.mutex);
  *event = created.release();
  live_events().insert(*event);
  return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t* event) {
  return cudaEventCreateWithFlags(event, cudaEventDefault);
}

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  Model& m = model();
  std::lock_guard lock(m.mutex);
  if (live_events().erase(event) == 0) return fail(cudaErrorInvalidResourceHandle);
  std::unique_ptr<CUevent_st> owned(event);
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  Model& m = model();
  std::lock_guard lock(m.mutex);
  if (live_events().count(event) == 0) return fail(cudaErrorInvalidResourceHandle);
  const auto queue = queue_locked(m, stream);
  // (An event and the stream it is recorded on belong to one device.)
  if (!queue || queue->device != event->device) return fail(cudaErrorInvalidResourceHandle);
  event->queue = queue;
  event->target = queue->submitted;
  return cudaSuccess;
}

cudaError_t cudaEventQuery(cudaEvent_t event) {
  Model& m = model();
  std::lock_guard lock(m.mutex);
  if (live_events().count(event) == 0) return fail(cudaErrorInvalidResourceHandle);
  if (!event->queue || event->queue->completed >= event->target) return cudaSuccess;
  return cudaErrorNotReady;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  Model& m = model();
  std::unique_lock lock(m.mutex);
  if (live_events().count(event) == 0) return fail(cudaErrorInvalidResourceHandle);
  if (event->queue) wait_for(m, lock, event->queue, event->target);
  return cudaSuccess;
}

}  // extern "C"
