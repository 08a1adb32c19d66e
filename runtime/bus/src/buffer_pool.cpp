// The receive buffer pool (bus_core.hpp says why it exists).

#include "bus_core.hpp"

#include <algorithm>
#include <cstddef>
#include <iterator>
#include <memory>
#include <mutex>
#include <utility>

namespace unimsg::detail {

std::shared_ptr<std::byte[]> BufferPool::acquire(std::size_t size) {
  if (size < kMinPooled)
    return std::make_shared_for_overwrite<std::byte[]>(std::max<std::size_t>(size, 1));
  std::unique_ptr<std::byte[]> storage;
  std::size_t capacity = size;
  {
    std::lock_guard lock(mutex_);
    // A cached buffer up to twice the size will do; of equal ones the last returned, which is
    // the most likely to be still in cache.
    auto it = free_.lower_bound(size);
    if (it != free_.end() && it->first <= 2 * size) {
      it = std::prev(free_.upper_bound(it->first));
      capacity = it->first;
      storage = std::move(it->second);
      cached_ -= capacity;
      free_.erase(it);
    }
  }
  if (!storage) storage = std::make_unique_for_overwrite<std::byte[]>(capacity);
  std::byte* data = storage.get();
  auto recycle = [pool = weak_from_this(), capacity](std::byte* released) {
    std::unique_ptr<std::byte[]> owned(released);
    if (auto alive = pool.lock()) alive->give_back(std::move(owned), capacity);
  };
  storage.release();  // owned by `recycle` from here on
  return std::shared_ptr<std::byte[]>(data, std::move(recycle));
}

void BufferPool::give_back(std::unique_ptr<std::byte[]> storage, std::size_t capacity) {
  std::lock_guard lock(mutex_);
  if (cached_ + capacity > max_cached_) return;  // frees it
  cached_ += capacity;
  free_.emplace(capacity, std::move(storage));
}

}  // namespace unimsg::detail
