// server/cache/memory_account.h — exact memory accounting of the interval
// maps, and the coarse-LRU stamp eviction reads (internal to server/cache).
//
// MemAccount: bytes one key's map allocated, added into the cache-wide total
// that Options::memory_limit_bytes bounds (relaxed atomics, no lock).
// CountingAllocator: the std::allocator every interval map uses, charging
// its MemAccount (btree nodes exactly; malloc's own overhead excluded).
// LruTick: the stamp readers write under a shared lock (a relaxed atomic).
#ifndef BLOCKMETA_SERVER_CACHE_MEMORY_ACCOUNT_H_
#define BLOCKMETA_SERVER_CACHE_MEMORY_ACCOUNT_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

namespace blockmeta {
namespace cache_internal {

// Bytes allocated by one key's interval map; the total over all keys is
// what the memory limit bounds.
struct MemAccount {
  explicit MemAccount(std::atomic<int64_t>* t) : total(t) {}
  void Add(int64_t n) {
    bytes.fetch_add(n, std::memory_order_relaxed);
    total->fetch_add(n, std::memory_order_relaxed);
  }
  std::atomic<int64_t> bytes{0};
  std::atomic<int64_t>* const total;
};

// std::allocator that charges a MemAccount: memory_bytes is exact for the
// btree nodes (malloc's own per-chunk overhead excluded).
template <typename T>
class CountingAllocator {
 public:
  using value_type = T;
  explicit CountingAllocator(MemAccount* account) : account_(account) {}
  template <typename U>
  CountingAllocator(const CountingAllocator<U>& other)  // NOLINT: rebinding
      : account_(other.account()) {}
  T* allocate(size_t n) {
    T* p = std::allocator<T>().allocate(n);
    account_->Add(static_cast<int64_t>(n * sizeof(T)));
    return p;
  }
  void deallocate(T* p, size_t n) {
    std::allocator<T>().deallocate(p, n);
    account_->Add(-static_cast<int64_t>(n * sizeof(T)));
  }
  MemAccount* account() const { return account_; }
  template <typename U>
  bool operator==(const CountingAllocator<U>& o) const {
    return account_ == o.account();
  }
  template <typename U>
  bool operator!=(const CountingAllocator<U>& o) const {
    return account_ != o.account();
  }

 private:
  MemAccount* account_;
};

// LRU stamp. Readers touch it under a shared lock, so it is atomic; the
// copy operations (used by the btree when it moves slots, under the
// exclusive lock) load relaxed.
class LruTick {
 public:
  explicit LruTick(uint32_t v = 0) : v_(v) {}
  LruTick(const LruTick& o) : v_(o.Get()) {}
  LruTick& operator=(const LruTick& o) {
    v_.store(o.Get(), std::memory_order_relaxed);
    return *this;
  }
  uint32_t Get() const { return v_.load(std::memory_order_relaxed); }
  // Stores only when it changes, so hot intervals do not bounce cache lines.
  void Touch(uint32_t now) {
    if (Get() != now) v_.store(now, std::memory_order_relaxed);
  }

 private:
  std::atomic<uint32_t> v_;
};

// Age of a stamp relative to the clock; stamps newer than `now` (touched
// after the clock was read) are age 0. Wrap-safe for ages below 2^31 fills.
inline uint32_t Age(uint32_t now, uint32_t tick) {
  const uint32_t d = now - tick;
  return static_cast<int32_t>(d) < 0 ? 0 : d;
}

}  // namespace cache_internal
}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_CACHE_MEMORY_ACCOUNT_H_
