// server/service/admission.h — caps the gRPC calls in flight, globally and
// per export.
//
// gRPC's callback server has no admission control of its own; without one
// a burst of slow cache misses queues without bound. Each call that may
// wait for an upstream takes a Ticket for its export; when `limit` calls
// are out in total, or `per_export_limit` for that export, TryAcquire()
// fails and the call is answered RESOURCE_EXHAUSTED at once. The per-export
// cap keeps one flooded export from taking every ticket: the others can
// still be served. Cheap calls (ListExports, GetExportInfo, GetStats,
// health) take no ticket at all.
//
// Cost: the global count is one atomic; the per-export counts are a small
// hash map under one mutex, holding only exports with calls in flight.
// Thread-safety: all methods are thread-safe.
#ifndef BLOCKMETA_SERVER_SERVICE_ADMISSION_H_
#define BLOCKMETA_SERVER_SERVICE_ADMISSION_H_

#include <atomic>
#include <cstdint>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "server/common/mutex.h"

namespace blockmeta {

class Admission {
 public:
  // per_export_limit 0 means max(1, limit / 2).
  explicit Admission(uint32_t limit, uint32_t per_export_limit = 0)
      : limit_(limit == 0 ? 1 : limit),
        per_export_limit_(per_export_limit != 0
                              ? per_export_limit
                              : (limit_ / 2 == 0 ? 1 : limit_ / 2)) {}

  // RAII ticket; empty (false) when admission was refused.
  class Ticket {
   public:
    Ticket() = default;
    Ticket(Admission* a, std::string export_name)
        : owner_(a), export_name_(std::move(export_name)) {}
    Ticket(Ticket&& o) noexcept
        : owner_(o.owner_), export_name_(std::move(o.export_name_)) {
      o.owner_ = nullptr;
    }
    Ticket& operator=(Ticket&& o) noexcept {
      Release();
      owner_ = o.owner_;
      export_name_ = std::move(o.export_name_);
      o.owner_ = nullptr;
      return *this;
    }
    ~Ticket() { Release(); }
    explicit operator bool() const { return owner_ != nullptr; }
    void Release() {
      if (owner_ != nullptr) owner_->ReleaseOne(export_name_);
      owner_ = nullptr;
    }

   private:
    Admission* owner_ = nullptr;
    std::string export_name_;  // "" = global only
  };

  // A ticket counted globally only.
  Ticket TryAcquire() { return TryAcquire(std::string()); }
  // A ticket counted globally and for `export_name` ("" = global only).
  Ticket TryAcquire(const std::string& export_name) ABSL_LOCKS_EXCLUDED(mu_) {
    uint32_t now = in_flight_.fetch_add(1) + 1;
    if (now > limit_) {
      in_flight_.fetch_sub(1);
      refused_global_.fetch_add(1, std::memory_order_relaxed);
      return Ticket();
    }
    if (!export_name.empty()) {
      sync::MutexLock lock(&mu_);
      uint32_t& n = per_export_[export_name];
      if (n >= per_export_limit_) {
        if (n == 0) per_export_.erase(export_name);
        in_flight_.fetch_sub(1);
        refused_export_.fetch_add(1, std::memory_order_relaxed);
        return Ticket();
      }
      ++n;
    }
    return Ticket(this, export_name);
  }

  uint32_t in_flight() const { return in_flight_.load(); }
  uint32_t in_flight(const std::string& export_name) const
      ABSL_LOCKS_EXCLUDED(mu_) {
    sync::MutexLock lock(&mu_);
    auto it = per_export_.find(export_name);
    return it == per_export_.end() ? 0 : it->second;
  }
  uint32_t limit() const { return limit_; }
  uint32_t per_export_limit() const { return per_export_limit_; }
  // Refusals because of the global / the per-export limit.
  uint64_t refused_global() const { return refused_global_.load(); }
  uint64_t refused_export() const { return refused_export_.load(); }

 private:
  void ReleaseOne(const std::string& export_name) ABSL_LOCKS_EXCLUDED(mu_) {
    if (!export_name.empty()) {
      sync::MutexLock lock(&mu_);
      auto it = per_export_.find(export_name);
      if (it != per_export_.end() && --it->second == 0) per_export_.erase(it);
    }
    in_flight_.fetch_sub(1);
  }

  const uint32_t limit_;
  const uint32_t per_export_limit_;
  std::atomic<uint32_t> in_flight_{0};
  std::atomic<uint64_t> refused_global_{0};
  std::atomic<uint64_t> refused_export_{0};
  mutable sync::Mutex mu_;
  absl::flat_hash_map<std::string, uint32_t> per_export_ ABSL_GUARDED_BY(mu_);
};

}  // namespace blockmeta

#endif  // BLOCKMETA_SERVER_SERVICE_ADMISSION_H_
